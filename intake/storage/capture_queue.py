"""Group commit for captures in a long-running server.

Each channel request awaits :meth:`CaptureQueue.capture`; a few writer tasks each drain what
queued up while other batches were in flight and store it in one Redis round trip, one call of
the batch capture script (:data:`intake.storage.store.CAPTURE_SCRIPT`, the one the CLI's
:meth:`~intake.storage.store.Store.capture` runs). The writers use an asyncio Redis client in the event
loop: no thread hop, so no wait for the GIL between a reply and its request. A request is
answered only after its batch is stored, so "durable before ack" holds.
"""

from __future__ import annotations

import asyncio
import contextlib

from redis.exceptions import NoScriptError

from intake.core.errors import IntakeError, NotFound
from intake.core.models import Idea, IdeaDraft
from intake.core.redis_conn import make_async_client
from intake.storage.store import CAPTURE_SCRIPT, Store


class CaptureQueue:
    def __init__(self, store: Store, url: str, *, ttl_s: int, max_batch: int = 256, writers: int = 3) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_batch = max_batch
        self.writers = writers  # batches in flight at once, so the event loop never idles on one
        self._redis = make_async_client(url)
        self._sha = ""
        self._queue: asyncio.Queue[tuple[IdeaDraft, asyncio.Future[tuple[Idea, bool]]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def capture(self, draft: IdeaDraft) -> tuple[Idea, bool]:
        """Store ``draft`` durably (batched with concurrent ones); raises the refusal if any."""
        future: asyncio.Future[tuple[Idea, bool]] = asyncio.get_running_loop().create_future()
        await self._queue.put((draft, future))
        return await future

    async def start(self) -> None:
        self._sha = await self._redis.script_load(CAPTURE_SCRIPT)
        self._tasks = [asyncio.create_task(self._run(), name=f"capture-writer-{i}") for i in range(self.writers)]

    async def stop(self) -> None:
        """Stop the writers; anything still waiting is failed (never left hanging or acked)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(IntakeError("intake is shutting down; try again"))
        await self._redis.aclose()

    async def _store(self, drafts: list[IdeaDraft]) -> list[tuple[Idea, bool] | IntakeError]:
        results: list[tuple[Idea, bool] | IntakeError] = []
        prepared: list[int] = []
        keys: list[str] = []
        args: list[object] = []
        for i, draft in enumerate(drafts):
            try:
                idea, its_keys, its_args = self.store.prepare_capture(draft, self.ttl_s)
            except IntakeError as exc:
                results.append(exc)
                continue
            results.append((idea, True))
            prepared.append(i)
            keys += its_keys
            args += its_args
        if not prepared:
            return results
        for attempt in range(2):
            try:
                replies = await self._redis.evalsha(self._sha, len(keys), *keys, *args)
                break
            except NoScriptError:  # Redis restarted and lost its script cache
                if attempt:
                    raise
                self._sha = await self._redis.script_load(CAPTURE_SCRIPT)
        for i, existing in zip(prepared, replies, strict=True):
            if existing is not None:  # a delivery seen before: hand back the first idea
                raw = await self._redis.get(self.store.keys.idea(existing))
                results[i] = (Idea.model_validate_json(raw), False) if raw else NotFound(
                    f"delivery already captured as {existing}, which is gone"
                )
        self.store.audit.kick()
        return results

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await self._store([draft for draft, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(IntakeError("intake is shutting down; try again"))
                raise
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
