"""Redis outages as the operator meets them: quick 503s, one log line each way, self-repair.

When Redis goes away (killed, restarting, a failover) or stalls, every request that needs it
would otherwise wait for its socket timeout, and every background loop would log a warning per
attempt. Instead one :class:`RedisOutage` per process is told about each failure: the first one
logs a single line and opens the breaker, so requests answer ``503 redis_unavailable`` at once
(no Redis call, no waiting thread) until a probe sees Redis answer again, which logs one line
more. The probe (:func:`watch_redis`) also restarts the embedded Redis when this process uses
one and it died, on the same data dir and AOF, so ``intake serve`` recovers by itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import redis
from aiohttp import web

log = logging.getLogger("intake.redis")

#: Errors that mean "Redis is not answering", as opposed to a refused command.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError)

#: Paths that never need Redis: liveness must say the process is alive whatever Redis does.
_NO_REDIS = frozenset({"/healthz"})


class RedisOutage:
    """This process's view of whether Redis answers. Thread-safe; logs only on transitions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self.outages = 0

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException, where: str) -> None:
        """Note a failed Redis call; the first one of an outage logs one line (no traceback,
        no request data: the error's type and where it was met)."""
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
            self.outages += 1
        log.warning("Redis unavailable (%s in %s): answering 503 until it is back", type(exc).__name__, where)

    def answered(self) -> None:
        """Note that Redis answered; ends an outage with one line."""
        with self._lock:
            if self._since is None:
                return
            lasted, self._since = time.monotonic() - self._since, None
        log.info("Redis is back after %.1f s", lasted)


def unavailable() -> web.Response:
    return web.json_response({"ok": False, "error": "redis_unavailable",
                              "message": "intake's storage is unavailable; try again shortly"},
                             status=503, headers={"Retry-After": "1"})


def outage_middleware(outage: RedisOutage) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Answer 503 at once while Redis is down, and turn a Redis failure met by a handler into a
    503 (noted once) instead of a 500 with a traceback. Nothing is written on either path, and
    a client's retry after the outage is deduplicated by its delivery id as usual."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if request.path in _NO_REDIS:
            return await handler(request)
        if outage.down:
            return unavailable()
        try:
            return await handler(request)
        except OUTAGE_ERRORS as exc:
            outage.failed(exc, "a request")
            return unavailable()

    return middleware


async def watch_redis(outage: RedisOutage, ping: Callable[[], object], revive: Callable[[], bool] | None,
                      *, every_s: float = 1.0, down_every_s: float = 0.25) -> None:
    """Probe Redis forever: note outages and recoveries; while it is down and ``revive`` is
    given (the embedded server this process uses), ask it to restart the server."""
    while True:
        try:
            await asyncio.to_thread(ping)
            outage.answered()
        except OUTAGE_ERRORS as exc:
            outage.failed(exc, "the probe")
            if revive is not None:
                try:
                    if await asyncio.to_thread(revive):
                        log.warning("the embedded Redis had stopped; restarted it on the same data (AOF)")
                except Exception as exc:  # a start-up failure names its cause; keep probing
                    log.error("could not restart the embedded Redis: %s", exc)
        await asyncio.sleep(down_every_s if outage.down else every_s)
