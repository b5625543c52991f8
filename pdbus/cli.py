"""``pdbus router | serve | multi-serve | client | keygen`` (FastDeploy's flag names).

Each command imports its actor inside the function that starts it: the one place where the
bus layer reaches up into ``actors``.
"""

from __future__ import annotations

import argparse
import sys

from pdbus.config import ConfigError


def _fail(msg: str, code: int = 2) -> int:
    print(f"pdbus: error: {msg}", file=sys.stderr)
    return code


def _config(prog: str, description: str, add_args, from_args, argv: list[str] | None):
    """Parse the flags into a validated config, or the exit code of its one-line error."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_args(p)
    args = p.parse_args(argv)
    try:
        return from_args(args)
    except ConfigError as exc:
        return _fail(str(exc))


def router_main(argv: list[str] | None = None) -> int:
    from pdbus.config import add_router_args, router_config_from_args

    cfg = _config("pdbus router", "OpenAI API + PD router (FastDeploy: fastdeploy.router.launch)", add_router_args, router_config_from_args, argv)
    if isinstance(cfg, int):
        return cfg
    from actors.router.server import serve_router

    try:
        return serve_router(cfg)
    except ConfigError as exc:  # a bad --bus-key-file found at startup
        return _fail(str(exc))


def serve_main(argv: list[str] | None = None) -> int:
    from pdbus.config import add_serve_args, serve_config_from_args

    cfg = _config("pdbus serve", "One rank server (FastDeploy: api_server)", add_serve_args, serve_config_from_args, argv)
    if isinstance(cfg, int):
        return cfg
    from actors.rank import serve

    try:
        if cfg.splitwise_role == "mixed" and not cfg.router:  # the router serves the API, this the engine
            from pdbus.launch import serve_with_router

            return serve_with_router(cfg, serve)
        return serve(cfg)
    except Exception as exc:  # a startup failure is one line, not a traceback
        if type(exc).__name__ in ("LoadError", "ConfigError", "TransferError", "RuntimeError", "OSError"):
            return _fail(f"{type(exc).__name__}: {exc}", 1)
        raise


def multi_serve_main(argv: list[str] | None = None) -> int:
    from pdbus.multi_serve import main

    return main(argv)


def client_main(argv: list[str] | None = None) -> int:
    from pdbus.client import add_client_args, run_client
    from pdbus.sockets import BusError

    p = argparse.ArgumentParser(prog="pdbus client", description="Send a prompt over the bus and stream tokens")
    add_client_args(p)
    args = p.parse_args(argv)
    try:
        return run_client(args)
    except (OSError, BusError, ValueError, TimeoutError) as exc:  # router unreachable, refused, bad key file
        return _fail(f"client: {getattr(exc, 'reason', None) or exc}", 1)


def keygen_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pdbus keygen", description="Write a CurveZMQ cluster key file for --bus-key-file")
    p.add_argument("path")
    args = p.parse_args(argv)
    from pdbus.security import generate_key_file

    try:
        generate_key_file(args.path)
    except OSError as exc:
        return _fail(f"keygen: {args.path}: {exc.strerror}", 1)
    print(f"wrote {args.path} (keep it secret; give it to the router and every instance)")
    return 0


COMMANDS = {
    "router": router_main,
    "serve": serve_main,
    "multi-serve": multi_serve_main,
    "client": client_main,
    "keygen": keygen_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: pdbus {" + ",".join(COMMANDS) + "} ..."
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        return _fail(f"unknown command {argv[0]!r} ({usage})")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, file=sys.stderr)
        return 0 if argv else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
