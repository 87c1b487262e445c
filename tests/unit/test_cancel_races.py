"""A cancel that arrives in the same moment as what a loop waits for still ends it.

Python 3.11's ``asyncio.wait_for`` returns the inner result and drops such a cancel
(gh-86296); these set the awaited thing and cancel in one step, which makes that order
certain: the inner wake-up is queued before the cancel's.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from nats.aio.client import Client as NATS

from agent.apps import AppReconciler
from agent.outbox import Outbox
from protocol import codec
from protocol.messages import AnyEventPayload, AppSyncReply, Severity


async def _settle() -> None:
    """Let the tasks just started run up to where they wait (no I/O is involved)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def _ended(task: asyncio.Task[object], within: float) -> bool:
    done, _ = await asyncio.wait({task}, timeout=within)
    if not done:  # the bug: clean up for the next test, bounded
        for _ in range(10):
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                break
        return False
    return True


async def test_outbox_loop_ends_when_cancelled_as_the_connection_returns() -> None:
    outbox = Outbox(capacity=4, log=logging.getLogger("test.outbox"))
    outbox.enqueue("n:1", b"batch")
    connected = asyncio.Event()
    nc = NATS()  # never connected: the loop waits for the reconnected callback
    task = asyncio.create_task(outbox.publish_loop(nc=nc, connected=connected,
                                                   subject="metrics.n"))
    await _settle()
    connected.set()  # the reconnected callback, in the same moment as the agent's stop
    task.cancel()
    # Before the fix the loop went on, waiting a second at a time, for ever.
    assert await _ended(task, 3.0), "publish loop survived its cancel"
    assert task.cancelled()
    assert outbox.buffer  # nothing was sent or dropped


async def test_app_pass_ends_when_cancelled_as_the_sync_reply_arrives(tmp_path: Path) -> None:
    reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    asked = asyncio.Event()

    async def request(payload: bytes) -> bytes:
        asked.set()
        return await reply

    async def emit(payload: AnyEventPayload, message: str, severity: Severity) -> None:
        pass

    apps = AppReconciler(state_dir=tmp_path, request=request, emit=emit,
                         node_id=lambda: "n-1", sync_timeout=30.0)
    apps.trigger()
    await asked.wait()
    await _settle()
    task = apps._queued
    assert task is not None
    reply.set_result(codec.encode(AppSyncReply(releases=[])))
    task.cancel()  # what close() does when the agent stops
    assert await _ended(task, 3.0)
    # Before the fix the pass went on past the cancel: it converged (here to nothing;
    # for real to the releases, running their steps while stop() waited) and counted.
    assert task.cancelled()
    assert apps.passes == 0
    await apps.close()
