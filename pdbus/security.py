"""Bus keys: CurveZMQ so that only holders of the cluster key can join the bus.

A cluster key file (``pdbus keygen FILE``) holds one Curve key pair. The router uses it as its
server key and, through a ZAP authenticator, admits only clients presenting that same public
key; instances load the same file as their client key pair. No file: plain TCP (loopback or a
trusted network only).
"""

from __future__ import annotations

import os
import time

import zmq

from pdbus.config import ConfigError
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
        raise ConfigError(f"bus key file {path}: {exc.strerror}") from None
    if len(values.get("public", b"")) != 40 or len(values.get("secret", b"")) != 40:
        raise ConfigError(f"bus key file {path}: expected 'public = ...' and 'secret = ...' Z85 keys")
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


_HANDSHAKE_FAILED = {
    "EVENT_HANDSHAKE_FAILED_NO_DETAIL": "CurveZMQ handshake failed",
    "EVENT_HANDSHAKE_FAILED_PROTOCOL": "the peer does not speak CurveZMQ",
    "EVENT_HANDSHAKE_FAILED_AUTH": "the peer's key is not this cluster's",
}


async def log_refused_handshakes(sock, every_s: float = 30.0) -> None:
    """Log each kind of handshake a Curve server socket refused (at most once per ``every_s``):
    a peer without the cluster key never reaches ZAP, so without this nothing would say why an
    instance does not register. libzmq names the listening endpoint, not the peer. Runs until
    cancelled."""
    import zmq
    from zmq.utils.monitor import parse_monitor_message

    masks = {getattr(zmq, name): why for name, why in _HANDSHAKE_FAILED.items() if hasattr(zmq, name)}
    mon = sock.get_monitor_socket(sum(masks))
    last: dict[int, float] = {}
    refused = 0
    try:
        while True:
            event = parse_monitor_message(await mon.recv_multipart())
            why = masks.get(event["event"])
            if why is None:
                continue
            refused += 1
            now = time.monotonic()
            if now - last.get(event["event"], -every_s) >= every_s:
                last[event["event"]] = now
                where = event["endpoint"]
                where = where.decode(errors="replace") if isinstance(where, bytes) else str(where)
                log.warning(
                    "refused a bus connection on %s: %s (%d refused so far); "
                    "every instance needs the router's --bus-key-file",
                    where,
                    why,
                    refused,
                )
    finally:
        try:
            sock.disable_monitor()
        except Exception:  # the socket is already closed at shutdown
            pass
        mon.close(linger=0)
