"""The aiohttp application: ``create_app(settings)`` builds it; resources open and close in
``cleanup_ctx`` entries; app state uses typed ``web.AppKey``s. Channels mount their routes here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import redis
from aiohttp import web

from intake.runtime import Broker, open_broker
from intake.settings import Settings

log = logging.getLogger("intake.app")

BROKER = web.AppKey("broker", Broker)
SETTINGS = web.AppKey("settings", Settings)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers."""
    broker = request.app[BROKER]
    try:
        await asyncio.to_thread(broker.client.ping)
    except redis.RedisError:
        return web.json_response({"status": "unavailable", "redis": "down"}, status=503)
    return web.json_response({"status": "ok", "redis": "up"})


async def _broker_ctx(app: web.Application) -> AsyncIterator[None]:
    opened = open_broker(app[SETTINGS])
    app[BROKER] = await asyncio.to_thread(opened.__enter__)
    try:
        yield
    finally:
        await asyncio.to_thread(opened.__exit__, None, None, None)


def create_app(settings: Settings, *, dev: bool = False) -> web.Application:
    """Build the broker's web app (routes and resource lifecycles; nothing runs until started)."""
    app = web.Application(client_max_size=settings.slack_max_body)
    app[SETTINGS] = settings
    app.cleanup_ctx.append(_broker_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
