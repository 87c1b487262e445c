"""Publish pre-encoded metric batches into JetStream, as a fleet's agents would.

A child of bench/ingest.py (its ``live`` variant): publishing runs in its own process, as
it does on the agents' machines, instead of on the ingest workers' event loop. Reads
``[[subject, payload], ...]`` (msgpack) from the file given, says ``ready`` on stdout, and
starts when a line arrives on stdin. Loopback only.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgspec
import nats


async def main(url: str, path: str) -> None:
    payloads: list[tuple[str, bytes]] = msgspec.msgpack.decode(
        Path(path).read_bytes(), type=list[tuple[str, bytes]]
    )
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for i in range(0, len(payloads), 500):
            for subject, data in payloads[i : i + 500]:
                await js.publish_async(subject, data)
            await js.publish_async_completed()
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
