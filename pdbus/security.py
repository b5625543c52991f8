"""Bus keys: CurveZMQ so that only holders of the cluster key can join the bus.

A cluster key file (``pdbus keygen FILE``) holds one Curve key pair. The router uses it as its
server key and, through a ZAP authenticator, admits only clients presenting that same public
key; instances load the same file as their client key pair. No file: plain TCP (loopback or a
trusted network only).
"""

from __future__ import annotations

import os

import zmq

from pdbus.log import get_logger

log = get_logger("bus.auth")


def generate_key_file(path: str) -> None:
    public, secret = zmq.curve_keypair()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"public = {public.decode()}\nsecret = {secret.decode()}\n")


def load_key_file(path: str) -> tuple[bytes, bytes]:
    values = {}
    try:
        with open(path) as fh:
            for line in fh:
                key, sep, value = line.partition("=")
                if sep:
                    values[key.strip()] = value.strip().encode()
    except OSError as exc:
        raise ValueError(f"bus key file {path}: {exc.strerror}") from None
    if len(values.get("public", b"")) != 40 or len(values.get("secret", b"")) != 40:
        raise ValueError(f"bus key file {path}: expected 'public = ...' and 'secret = ...' Z85 keys")
    return values["public"], values["secret"]


def client_curve_keys(path: str | None) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret) for a DEALER, or None without a key file."""
    if not path:
        return None
    public, secret = load_key_file(path)
    return public, public, secret


def server_secret(path: str | None) -> bytes | None:
    if not path:
        return None
    return load_key_file(path)[1]


class OneKey:
    """ZAP credentials provider: admit exactly one client key, the cluster's.

    pyzmq passes the client's public key to ``callback`` Z85-encoded, as in the key file.
    """

    def __init__(self, public_z85: bytes):
        self.public = public_z85
        self.num_refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.public:
            return True
        self.num_refused += 1
        log.warning("refused a bus connection with an unknown CurveZMQ key")
        return False


def start_authenticator(ctx: zmq.Context, path: str):
    """Start a ZAP handler on ``ctx`` (the bus server's context, inside its running event loop)
    that admits only the key file's public key. Start it before peers connect; ``stop()`` it
    at shutdown."""
    from zmq.auth.asyncio import AsyncioAuthenticator

    public, _ = load_key_file(path)
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=OneKey(public))
    return auth
