"""Mounting Slack on the aiohttp app: HTTP Events API and/or Socket Mode, and the notifier.

HTTP: ``POST /slack/events`` carries events, slash commands and interactivity. The verification
middleware checks size, timestamp and signature on the raw bytes first; only then is a bolt
request built from those same bytes (bolt verifies again). One exception, for throughput: an
``/intake`` slash command is answered directly by the same
:meth:`~intake.channels.slack.listeners.SlackIntake.command_reply` the bolt listener uses, since bolt's
per-request dispatch would otherwise cost more than the durable capture itself (see
bench/slack_capture.py). Everything else, and all of Socket Mode, goes through bolt. Socket Mode: bolt's aiohttp
``AsyncSocketModeHandler``, authenticated by the app-level token. Either way the app runs with
``process_before_response`` so an idea is stored before Slack is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import redis
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.web.async_client import AsyncWebClient

from intake.channels.slack.listeners import SlackIntake
from intake.channels.slack.notifier import GROUP, Pacer, SlackNotifier
from intake.channels.slack.parse import SlackBodyError, parse_slack_body
from intake.channels.slack.verify import slack_verification_middleware, verified_body
from intake.core.errors import ConfigError
from intake.core.settings import Settings
from intake.runtime import Broker
from intake.storage.capture_queue import CaptureQueue
from intake.storage.outage import OUTAGE_ERRORS, unavailable
from intake.storage.outbox import Outbox

log = logging.getLogger("intake.channels.slack")

SLACK_PATH = "/slack/events"
BOLT = web.AppKey("bolt", AsyncApp)
LISTENERS = web.AppKey("slack_listeners", SlackIntake)


@dataclass(frozen=True)
class SlackMode:
    http: bool
    socket: bool
    why_off: str = ""

    @property
    def on(self) -> bool:
        return self.http or self.socket

    def describe(self) -> str:
        if not self.on:
            return f"Slack off: {self.why_off}"
        modes = [m for m, on in (("HTTP (POST /slack/events)", self.http), ("Socket Mode", self.socket)) if on]
        return "Slack on: " + " and ".join(modes)


def slack_mode(settings: Settings) -> SlackMode:
    """Which Slack transports the settings turn on, or why none is."""
    bot = settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else ""
    signing = settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else ""
    app = settings.slack_app_token.get_secret_value() if settings.slack_app_token else ""
    if bot and not bot.startswith("xoxb-"):
        raise ConfigError("SLACK_BOT_TOKEN: must be a bot token (xoxb-…)")
    if app and not app.startswith("xapp-"):
        raise ConfigError("SLACK_APP_TOKEN: must be an app-level token (xapp-…)")
    if not bot:
        return SlackMode(False, False, "SLACK_BOT_TOKEN is not set" if (signing or app) else
                         "set SLACK_BOT_TOKEN with SLACK_SIGNING_SECRET (HTTP) or SLACK_APP_TOKEN (Socket Mode)")
    if not signing and not app:
        return SlackMode(False, False, "SLACK_BOT_TOKEN needs SLACK_SIGNING_SECRET or SLACK_APP_TOKEN")
    return SlackMode(http=bool(signing), socket=bool(app))


def outbox_for(settings: Settings, broker: Broker) -> Outbox:
    """This process's consumer of the Slack notifier's outbox group, tuned by the settings."""
    return Outbox(broker.audit, GROUP, retry_ms=settings.outbox_retry_ms, retry_cap_s=settings.outbox_retry_cap,
                  max_age_s=settings.outbox_max_age, lease_s=settings.outbox_lease)


def notifier_client(settings: Settings, session: aiohttp.ClientSession) -> AsyncWebClient:
    """The notifier's own Web API client: no automatic retries (slack_sdk's default retries a
    lost connection, which would post a card a second time; the outbox retries instead)."""
    assert settings.slack_bot_token is not None
    kwargs = {"base_url": settings.slack_api_url} if settings.slack_api_url else {}
    return AsyncWebClient(token=settings.slack_bot_token.get_secret_value(), session=session,
                          retry_handlers=[], **kwargs)


class _ClientGivenNotice(logging.Filter):
    """Drops bolt's "As you gave `client` as well, `token` will be unused." at every start: bolt
    reads SLACK_BOT_TOKEN from the environment itself even when handed a client, which here is
    built from that very token (with SLACK_API_URL and the shared session). Nothing else is
    filtered."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`token` will be unused" not in record.getMessage()


_BOLT_LOG = logging.getLogger("slack_bolt.AsyncApp")
if not any(isinstance(f, _ClientGivenNotice) for f in _BOLT_LOG.filters):
    _BOLT_LOG.addFilter(_ClientGivenNotice())


def build_bolt(
    settings: Settings, broker: Broker, capture: CaptureQueue, session: aiohttp.ClientSession
) -> tuple[AsyncApp, SlackIntake]:
    """The bolt app with intake's listeners; its Web API client honours SLACK_API_URL and
    reuses ``session`` (one connection pool, not a new session per API call)."""
    assert settings.slack_bot_token is not None
    kwargs = {"base_url": settings.slack_api_url} if settings.slack_api_url else {}
    client = AsyncWebClient(token=settings.slack_bot_token.get_secret_value(), session=session, **kwargs)
    signing = settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None
    app = AsyncApp(
        client=client,
        # Socket Mode alone needs no signing secret; a random one keeps bolt's HTTP check armed
        # (no HTTP route is mounted then anyway).
        signing_secret=signing or secrets.token_hex(32),
        process_before_response=True,
    )
    listeners = SlackIntake(broker, capture.capture)
    listeners.register(app)

    async def on_error(error: Exception, response: BoltResponse | None) -> BoltResponse:
        # A Redis outage is noted once (the outage tracker logs it, not every request).
        if isinstance(error, OUTAGE_ERRORS):
            broker.outage.failed(error, "a Slack listener")
            return BoltResponse(status=503, body='{"error": "redis_unavailable"}',
                                headers={"content-type": ["application/json"]})
        return await on_bolt_error(error, response)

    app.error(on_error)
    return app, listeners


async def slack_events(request: web.Request) -> web.StreamResponse:
    """The one HTTP endpoint: bolt sees only bytes the middleware already verified, and only
    once their shape is one bolt and the listeners can handle (intake.channels.slack.parse)."""
    try:
        parsed = parse_slack_body(request.content_type, verified_body(request))
    except SlackBodyError as exc:
        log.info("slack request refused reason=%s", exc.reason)
        return web.json_response({"error": "invalid request"}, status=exc.status)
    command = parsed.command
    if command is not None and command.get("command") == "/intake":
        reply = await request.app[LISTENERS].command_reply(command, parsed.text)
        return web.json_response({"text": reply})
    bolt_request = AsyncBoltRequest(body=parsed.text, query=request.query_string, headers=request.headers)  # type: ignore[arg-type]
    response = await request.app[BOLT].async_dispatch(bolt_request)
    if response.status >= 500 and request.app[LISTENERS].broker.outage.down:
        return unavailable()  # Slack retries; the retry is deduplicated by its delivery id
    return await to_aiohttp_response(response)


async def on_bolt_error(error: Exception, response: BoltResponse | None) -> BoltResponse:
    """Bolt's error handler: a failure inside a listener is logged as one line (no body, no
    traceback of attacker-shaped data) and answered 503 when storage is down (Slack retries),
    else 400."""
    storage = isinstance(error, redis.RedisError)
    log.warning("slack request failed: %s", type(error).__name__)
    return BoltResponse(status=503 if storage else 400, body='{"error": "invalid request"}',
                        headers={"content-type": ["application/json"]})


def mount_slack(
    app: web.Application, settings: Settings, broker_key: web.AppKey[Broker], capture_key: web.AppKey[CaptureQueue]
) -> SlackMode:
    """Add Slack's route, middleware and lifecycle to ``app`` as the settings say."""
    mode = slack_mode(settings)
    if mode.http:
        assert settings.slack_signing_secret is not None
        app.middlewares.append(slack_verification_middleware(
            settings.slack_signing_secret.get_secret_value(), path=SLACK_PATH, max_body=settings.slack_max_body,
        ))
        app.router.add_post(SLACK_PATH, slack_events)
    if mode.on:

        async def slack_ctx(app: web.Application) -> AsyncIterator[None]:
            broker = app[broker_key]
            session = aiohttp.ClientSession()
            bolt, listeners = build_bolt(settings, broker, app[capture_key], session)
            app[BOLT], app[LISTENERS] = bolt, listeners
            stop = asyncio.Event()
            task = None
            if not settings.edge:  # an edge leaves the cards to the full serves' outbox
                notifier = SlackNotifier(broker, notifier_client(settings, session), outbox_for(settings, broker),
                                         pacer=Pacer(settings.slack_rate))
                task = asyncio.create_task(notifier.run(stop), name="slack-notifier")
            handler = None
            if mode.socket:
                assert settings.slack_app_token is not None
                handler = AsyncSocketModeHandler(bolt, settings.slack_app_token.get_secret_value())
                await handler.connect_async()
            try:
                yield
            finally:
                stop.set()
                if handler is not None:
                    await handler.close_async()
                if task is not None:
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await asyncio.wait_for(task, timeout=5)
                await session.close()

        app.cleanup_ctx.append(slack_ctx)
    return mode
