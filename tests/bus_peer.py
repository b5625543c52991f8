"""A bus member in its own process, for tests that kill, stop or outlive its router.

    python tests/bus_peer.py --endpoint tcp://127.0.0.1:PORT --identity rank-a --interval 0.2

Prints one line per event on stdout (``ready PID``, ``registered``, ``refused REASON``,
``router-lost``) and runs until it is signalled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

import zmq.asyncio

from pdbus.actor import BusMember
from pdbus.messages import PROTOCOL_VERSION, Hello, Load
from pdbus.security import client_curve_keys


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class ReportingMember(BusMember):
    """Reports registration events; nothing else."""

    name = "peer"

    async def dispatch(self, peer, msg, frames) -> None:
        was_registered = self.registered.is_set()
        await super().dispatch(peer, msg, frames)
        if self.registered.is_set() and not was_registered:
            say("registered")

    def on_refused(self, reason: str) -> None:
        say(f"refused {reason}")

    def router_lost(self) -> None:
        say("router-lost")


async def main(args) -> int:
    ctx = zmq.asyncio.Context()
    member = ReportingMember(
        args.endpoint,
        identity=args.identity,
        hello=lambda: Hello(
            protocol=args.protocol,
            instance_id=args.identity,
            role=args.role,
            host="127.0.0.1",
            http_port=0,
            model="tiny",
            config_hash="h",
            pid=os.getpid(),
        ),
        load=lambda: Load(free_blocks=7, total_blocks=8),
        heartbeat_interval=args.interval,
        ctx=ctx,
        curve_client=client_curve_keys(args.key_file),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    member.start()
    say(f"ready {os.getpid()}")
    await stop.wait()
    await member.close()
    ctx.destroy(linger=0)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--interval", type=float, default=0.2)
    p.add_argument("--role", default="decode")
    p.add_argument("--protocol", type=int, default=PROTOCOL_VERSION)
    p.add_argument("--key-file", default=None)
    sys.exit(asyncio.run(main(p.parse_args())))
