"""The aiohttp application: ``create_app(settings)`` builds it; resources open and close in
``cleanup_ctx`` entries; app state uses typed ``web.AppKey``s. Channels mount their routes here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

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
from intake.tasks.worker_reports import ReportProcessor, ensure_worker_key

log = logging.getLogger("intake.app")

BROKER = web.AppKey("broker", Broker)
SETTINGS = web.AppKey("settings", Settings)
CAPTURE = web.AppKey("capture", CaptureQueue)
SLACK_MODE = web.AppKey("slack_mode", SlackMode)
METRICS = web.AppKey("metrics", CollectorRegistry)
METRICS_PORT = web.AppKey("metrics_port", int)  # where /metrics listens (when INTAKE_METRICS_PORT is set)
OUTAGE = web.AppKey("redis_outage", RedisOutage)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers and the ledger is not halted by broken history."""
    broker = request.app[BROKER]
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
    opened = open_broker(app[SETTINGS])
    broker = await asyncio.to_thread(opened.__enter__)
    app[BROKER] = broker
    app[METRICS] = metrics_registry(broker)
    broker.outage = app[OUTAGE]
    broker.audit.on_fault = broker.outage.failed
    edge = broker.audit.sealed_elsewhere = app[SETTINGS].edge
    if not edge:
        broker.audit.start_sealer()  # one sealer per Redis holds the lease; the others wait on it
    # Verify the chain before serving anything (an edge applies what the full serves sealed).
    await asyncio.to_thread(broker.ledger.follow, seal=not edge)
    if broker.ledger.halted:
        log.error("the ledger is halted: %s (dispatch is stopped until an operator acts)", broker.ledger.halted)
    reports = ReportProcessor(broker)
    if not edge:
        reports.start()
    capture = CaptureQueue(broker.store, broker.url, ttl_s=broker.policy.clocks.idea_ttl)
    await capture.start()
    app[CAPTURE] = capture
    try:
        yield
    finally:
        await capture.stop()
        await asyncio.to_thread(reports.stop)
        await asyncio.to_thread(broker.audit.stop_sealer)
        await asyncio.to_thread(opened.__exit__, None, None, None)


def sweep(broker: Broker) -> None:
    """One pass of the broker's clocks and repairs: expiries, escalations, queued tasks whose
    enqueue was lost, runs whose worker died, sealing stragglers, and now and then a walk of the
    whole sealed chain (history rewritten behind the ledger's cursor halts it too)."""
    broker.ledger.recheck_if_due()
    broker.gatekeeper.expire_due()
    broker.gatekeeper.escalate_due()
    broker.dispatcher.reconcile()
    broker.audit.seal_pending()


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

    await asyncio.to_thread(ensure_worker_key, app[BROKER], DEV_WORKER_NAME)
    handle = await asyncio.to_thread(start_dev_worker, app[SETTINGS])
    log.info("dev worker started (demo agent, local bare repos in %s)", app[SETTINGS].data_dir / "repos")
    try:
        yield
    finally:
        await asyncio.to_thread(stop_dev_worker, handle)


def create_app(settings: Settings, *, dev: bool = False) -> web.Application:
    """Build the broker's web app (routes and resource lifecycles; nothing runs until started).

    Cleanup contexts unwind in reverse, so the dev worker stops before Redis is released."""
    app = web.Application(client_max_size=settings.slack_max_body)
    app[SETTINGS] = settings
    app[OUTAGE] = RedisOutage()
    app.middlewares.append(outage_middleware(app[OUTAGE]))  # outermost: a Redis fault is a 503
    app.cleanup_ctx.append(_broker_ctx)
    app.cleanup_ctx.append(_outage_ctx)
    if settings.metrics_port is not None:
        app.cleanup_ctx.append(_metrics_ctx)
    if not settings.edge:  # the full serves run the clocks for the edges too
        app.cleanup_ctx.append(_clocks_ctx)
    if dev:
        app.cleanup_ctx.append(_dev_worker_ctx)
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
    return app
