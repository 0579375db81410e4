"""Group commit for captures in a long-running server.

Each channel request awaits :meth:`CaptureQueue.capture`; one writer task drains everything that
queued up while the previous batch was in flight and stores it with
:meth:`~intake.store.Store.capture_many` (one Redis round trip, each capture its own atomic
script). A request is answered only after its batch is stored, so "durable before ack" holds;
under load, many requests share one round trip and one thread hop instead of paying one each.
"""

from __future__ import annotations

import asyncio
import contextlib

from intake.errors import IntakeError
from intake.models import Idea, IdeaDraft
from intake.store import Store


class CaptureQueue:
    def __init__(self, store: Store, *, ttl_s: int, max_batch: int = 256) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[IdeaDraft, asyncio.Future[tuple[Idea, bool]]]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    async def capture(self, draft: IdeaDraft) -> tuple[Idea, bool]:
        """Store ``draft`` durably (batched with concurrent ones); raises the refusal if any."""
        future: asyncio.Future[tuple[Idea, bool]] = asyncio.get_running_loop().create_future()
        await self._queue.put((draft, future))
        return await future

    def start(self) -> None:
        self._writer = asyncio.create_task(self._run(), name="capture-writer")

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await asyncio.to_thread(
                    self.store.capture_many, [draft for draft, _ in batch], ttl_s=self.ttl_s
                )
            except Exception as exc:  # Redis down: every waiter fails, nothing is acked as stored
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():  # the request was cancelled meanwhile
                    continue
                if isinstance(result, IntakeError):
                    future.set_exception(result)
                else:
                    future.set_result(result)
