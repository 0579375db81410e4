"""The aiohttp application: ``create_app(settings)`` builds it; resources open and close in
``cleanup_ctx`` entries; app state uses typed ``web.AppKey``s. Channels mount their routes here.

Start-up (Redis, which may still be loading a long AOF, then the ledger) runs as one task,
:class:`Startup`. ``intake serve`` accepts connections while it runs: ``/healthz`` answers at
once, ``/readyz`` and every other route answer 503 ``starting`` until the broker is ready (a
start that fails stops the server with its one-line reason). Embedders and tests that want the
app whole before the first request pass ``wait_ready=True``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis
from aiohttp import web
from prometheus_client import CollectorRegistry

from intake.api.routes import mount_api
from intake.channels.email.listener import mount_email
from intake.channels.email.reply import email_sender
from intake.channels.github import GitHub
from intake.channels.gitlab import GitLab
from intake.channels.jira import Jira
from intake.channels.replies import mount_replies
from intake.channels.slack.transport import SlackMode, mount_slack
from intake.channels.webhooks import mount_webhooks, webhook_senders
from intake.console import mount_console
from intake.core.errors import ConfigError
from intake.core.redis_conn import EmbeddedRedis
from intake.core.settings import Settings
from intake.operations.metrics import metrics_registry, render_metrics
from intake.runtime import Broker, open_broker
from intake.storage.capture_queue import CaptureQueue
from intake.storage.outage import (
    OUTAGE_ERRORS,
    RedisOutage,
    outage_middleware,
    watch_redis,
)
from intake.tasks.worker_reports import ReportProcessor, ensure_worker_key, policy_scope

log = logging.getLogger("intake.app")

BROKER = web.AppKey("broker", Broker)
SETTINGS = web.AppKey("settings", Settings)
CAPTURE = web.AppKey("capture", CaptureQueue)
SLACK_MODE = web.AppKey("slack_mode", SlackMode)
METRICS = web.AppKey("metrics", CollectorRegistry)
METRICS_PORT = web.AppKey("metrics_port", int)  # where /metrics listens (when INTAKE_METRICS_PORT is set)
OUTAGE = web.AppKey("redis_outage", RedisOutage)


class Startup:
    """The broker's start-up, run in the background. Each resource that needs the broker
    (:func:`after_start`) enters in registration order once the one before it has; the app is
    :attr:`ready` when the last has. :attr:`error` holds why a start failed."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()  # the broker is open and its ledger caught up
        self._last = self.opened
        self.error: BaseException | None = None

    def next_turn(self) -> tuple[asyncio.Event, asyncio.Event]:
        """(the event to wait for, the event to set when entered) for the next resource."""
        prev, mine = self._last, asyncio.Event()
        self._last = mine
        return prev, mine

    @property
    def ready(self) -> bool:
        return self._last.is_set()

    @property
    def state(self) -> str:
        return "ready" if self.ready else "failed" if self.error is not None else "starting"

    def failed(self, exc: BaseException, app: web.Application) -> None:
        """Note why the start failed; `intake serve` then stops and prints it."""
        if self.error is None:
            self.error = exc
        log.error("start-up failed: %s", exc)
        if not app[WAIT_READY]:
            os.kill(os.getpid(), signal.SIGTERM)


CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def after_start(ctx: CleanupCtx) -> CleanupCtx:
    """``ctx`` (a cleanup context that needs the open broker) entered in the background once the
    broker and every resource registered before it are up, and left at shutdown if it entered."""

    async def deferred(app: web.Application) -> AsyncIterator[None]:
        startup = app[STARTUP]
        prev, mine = startup.next_turn()
        gen = ctx(app)
        entered = False

        async def enter() -> None:
            nonlocal entered
            await prev.wait()
            try:
                await gen.__anext__()
            except Exception as exc:
                startup.failed(exc, app)
                if app[WAIT_READY]:
                    raise
                return
            entered = True
            mine.set()

        task = asyncio.create_task(enter(), name=f"start:{getattr(ctx, '__name__', 'ctx')}")
        if app[WAIT_READY]:
            await task
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if entered:
                with contextlib.suppress(StopAsyncIteration):
                    await gen.__anext__()

    # Keeps the wrapped context's name: logs, tasks and whoever picks a context out by name.
    return functools.update_wrapper(deferred, ctx)


STARTUP = web.AppKey("startup", Startup)
WAIT_READY = web.AppKey("wait_ready", bool)
_ALWAYS_ANSWERED = frozenset({"/healthz", "/readyz"})


@web.middleware
async def _starting_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Until start-up is done, only the health endpoints answer; the rest is a quick 503 (a
    channel's sender retries), never a request served by a half-open broker."""
    if request.path not in _ALWAYS_ANSWERED and not request.app[STARTUP].ready:
        return web.json_response({"status": request.app[STARTUP].state}, status=503,
                                 headers={"Retry-After": "1"})
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: start-up is done, Redis answers and the ledger is not halted by broken history."""
    startup = request.app[STARTUP]
    if not startup.ready:
        return web.json_response({"status": startup.state}, status=503)
    broker = request.app[BROKER]
    if request.app[SETTINGS].edge:  # an edge keeps no ledger: Redis answering is all it needs
        try:
            await asyncio.to_thread(broker.client.ping)
        except redis.RedisError:
            return web.json_response({"status": "unavailable", "redis": "down"}, status=503)
        return web.json_response({"status": "ok", "redis": "up", "ledger": "none (edge)"})
    try:
        await asyncio.to_thread(broker.client.ping)
        halted = (await asyncio.to_thread(broker.ledger.follow, seal=False)).halted
    except redis.RedisError:
        return web.json_response({"status": "unavailable", "redis": "down"}, status=503)
    if halted is not None:
        return web.json_response({"status": "halted", "redis": "up", "ledger": halted}, status=503)
    return web.json_response({"status": "ok", "redis": "up", "ledger": "ok"})


async def _metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    """Serve ``GET /metrics`` (the leading indicators in the Prometheus text format,
    intake.operations.metrics) on its own listener, ``INTAKE_METRICS_HOST:INTAKE_METRICS_PORT``
    (loopback by default), for the app's lifetime: never on the public API port, where anyone
    who reaches the broker would read its counters unauthenticated."""
    settings, registry, outage = app[SETTINGS], app[METRICS], app[OUTAGE]

    async def metrics(request: web.Request) -> web.Response:
        try:
            body = await asyncio.to_thread(render_metrics, registry)
        except OUTAGE_ERRORS as exc:
            outage.failed(exc, "/metrics")
            return web.Response(status=503, text="redis unavailable\n", headers={"Retry-After": "1"})
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    listener = web.Application()
    listener.router.add_get("/metrics", metrics)
    runner = web.AppRunner(listener, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"INTAKE_METRICS_HOST/INTAKE_METRICS_PORT: cannot listen on "
                          f"{settings.metrics_host}:{settings.metrics_port}: {exc.strerror}") from None
    app[METRICS_PORT] = int(runner.addresses[0][1])
    log.info("metrics: GET /metrics on http://%s:%s", settings.metrics_host, app[METRICS_PORT])
    try:
        yield
    finally:
        await runner.cleanup()


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the broker in the background (:class:`Startup`) and close it at the end."""
    startup = app[STARTUP]
    opened = open_broker(app[SETTINGS])
    parts: dict[str, Any] = {}

    async def start() -> None:
        broker = await asyncio.to_thread(opened.__enter__)
        parts["opened"] = True
        app[BROKER] = broker
        app[METRICS] = metrics_registry(broker)
        broker.outage = app[OUTAGE]
        broker.audit.on_fault = broker.outage.failed
        edge = broker.audit.sealed_elsewhere = app[SETTINGS].edge
        if not edge:
            broker.audit.start_sealer()  # one sealer per Redis holds the lease; the others wait on it
            # Catch up from the newest ledger snapshot, then verify what was sealed after it.
            # An edge builds no ledger: it decides nothing that grants power.
            await asyncio.to_thread(broker.ledger.start)
            if broker.ledger.halted:
                log.error("the ledger is halted: %s (dispatch is stopped until an operator acts)",
                          broker.ledger.halted)
        reports = parts["reports"] = ReportProcessor(broker)
        if not edge:
            reports.start()
        capture = CaptureQueue(broker.store, broker.url, ttl_s=broker.policy.clocks.idea_ttl)
        await capture.start()
        app[CAPTURE] = parts["capture"] = capture
        startup.opened.set()

    async def run() -> None:
        try:
            await start()
        except Exception as exc:
            startup.failed(exc, app)

    task = asyncio.create_task(run(), name="startup")
    if app[WAIT_READY]:
        await task
        if startup.error is not None:
            raise startup.error
    try:
        yield
    finally:
        # Not cancelled: a start in a worker thread would go on holding Redis unseen. A stop
        # during start-up waits for it, then closes what it opened.
        with contextlib.suppress(Exception):
            await asyncio.shield(task)
        if "capture" in parts:
            await parts["capture"].stop()
        if "reports" in parts:
            await asyncio.to_thread(parts["reports"].stop)
        if "opened" in parts:
            await asyncio.to_thread(app[BROKER].audit.stop_sealer)
            await asyncio.to_thread(opened.__exit__, None, None, None)


def sweep(broker: Broker) -> None:
    """One pass of the broker's clocks and repairs: expiries, escalations, queued tasks whose
    enqueue was lost, runs whose worker died, sealing stragglers, a cheap check that sealed
    history behind the ledger's cursor still stands (a full walk once a day, off the ledger lock),
a ledger snapshot when one is due, archiving what left the hot window, and indexing for the
console what was written before its indexes existed."""
    broker.ledger.check_anchor()
    broker.ledger.recheck_if_due()  # the daily full walk, in its own thread
    broker.ledger.snapshot_if_due()
    broker.archive_due()
    broker.gatekeeper.expire_due()
    broker.gatekeeper.escalate_due()
    broker.dispatcher.reconcile()
    broker.audit.seal_pending()
    broker.store.backfill_indexes()  # once, a batch a sweep: records from before the indexes


async def _clocks_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run :func:`sweep` every ``INTAKE_SWEEP_INTERVAL`` seconds for the app's lifetime."""
    broker, interval = app[BROKER], app[SETTINGS].sweep_interval

    async def loop() -> None:
        while True:
            try:
                await asyncio.to_thread(sweep, broker)
            except OUTAGE_ERRORS as exc:  # noted once per outage, not once a sweep
                broker.outage.failed(exc, "the clocks")
            except Exception as exc:  # keep the clocks running through a transient fault
                log.warning("sweep failed: %s", type(exc).__name__)
            await asyncio.sleep(interval)

    task = asyncio.create_task(loop(), name="clocks")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _outage_ctx(app: web.Application) -> AsyncIterator[None]:
    """Probe Redis for the app's lifetime (:func:`intake.storage.outage.watch_redis`), restarting
    the embedded server when it died under this process."""
    settings, broker = app[SETTINGS], app[BROKER]
    revive = None
    if settings.redis_url is None:
        revive = EmbeddedRedis(settings.data_dir, prefix=settings.key_prefix,
                               appendfsync=settings.redis_appendfsync).revive
    task = asyncio.create_task(watch_redis(app[OUTAGE], broker.client.ping, revive), name="redis-watch")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _dev_worker_ctx(app: web.Application) -> AsyncIterator[None]:
    """Dev mode: one embedded agent worker (a subprocess on the same data dir and Redis) that
    runs the demo agent against local bare repositories, for the server's lifetime. Its report
    key is issued here on first start (or again when it is not the current one)."""
    from intake.workers.dev import DEV_WORKER_NAME, start_dev_worker, stop_dev_worker

    scope = policy_scope(app[BROKER].policy)  # what the dev worker's config serves
    await asyncio.to_thread(ensure_worker_key, app[BROKER], DEV_WORKER_NAME, scope)
    handle = await asyncio.to_thread(start_dev_worker, app[SETTINGS])
    log.info("dev worker started (demo agent, local bare repos in %s)", app[SETTINGS].data_dir / "repos")
    try:
        yield
    finally:
        await asyncio.to_thread(stop_dev_worker, handle)


def create_app(settings: Settings, *, dev: bool = False, wait_ready: bool = True) -> web.Application:
    """Build the broker's web app (routes and resource lifecycles; nothing runs until started).

    ``wait_ready=False`` (``intake serve``) accepts connections while the broker starts (see the
    module docstring). Cleanup contexts unwind in reverse, so the dev worker stops before Redis
    is released."""
    app = web.Application(client_max_size=settings.slack_max_body)
    app[SETTINGS] = settings
    app[OUTAGE] = RedisOutage()
    app[STARTUP] = Startup()
    app[WAIT_READY] = wait_ready
    app.middlewares.append(_starting_middleware)  # outermost: nothing is served half-started
    app.middlewares.append(outage_middleware(app[OUTAGE]))  # a Redis fault is a 503
    app.cleanup_ctx.append(_broker_ctx)
    app.cleanup_ctx.append(_outage_ctx)
    if settings.metrics_port is not None:
        app.cleanup_ctx.append(_metrics_ctx)
    if not settings.edge:  # the full serves run the clocks for the edges too
        app.cleanup_ctx.append(_clocks_ctx)
    if dev:
        app.cleanup_ctx.append(_dev_worker_ctx)
    first_deferred = 1
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    mount_console(app, settings, BROKER, dev=dev)
    mount_api(app, lambda request: request.app[BROKER])
    app[SLACK_MODE] = mount_slack(app, settings, BROKER, CAPTURE)
    mount_email(app, settings, BROKER, CAPTURE)
    forges = (GitHub.from_settings, GitLab.from_settings, Jira.from_settings)
    mount_webhooks(app, settings, forges, CAPTURE)
    # Replies to tickets and acknowledgement mails, from the outbox (retried through outages).
    mount_replies(app, settings, BROKER, [*webhook_senders(settings, forges), email_sender(settings.smtp_relay)])
    # Everything after the broker needs it open: entered in the background, in this order.
    ctxs = list(app.cleanup_ctx)
    app.cleanup_ctx.clear()
    app.cleanup_ctx.extend(ctxs[:first_deferred] + [after_start(ctx) for ctx in ctxs[first_deferred:]])
    return app
