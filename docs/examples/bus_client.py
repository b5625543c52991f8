"""Stream a completion over the ZeroMQ bus, without HTTP.

    python docs/examples/bus_client.py --router 127.0.0.1:8109 "What is 12 + 7?"
"""

import argparse
import asyncio

from pdbus.client import BusClient


async def main(router: str, prompt: str) -> None:
    async with BusClient(router) as client:
        messages = [{"role": "user", "content": prompt}]
        async for chunk in client.generate(messages=messages, max_tokens=64, temperature=0):
            if chunk.error:
                raise SystemExit(f"error: {chunk.error}")
            print(chunk.text, end="", flush=True)
        print()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("prompt")
    p.add_argument("--router", default="127.0.0.1:8109")
    args = p.parse_args()
    asyncio.run(main(args.router, args.prompt))
