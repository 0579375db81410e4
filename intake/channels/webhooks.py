"""The ticket webhooks' shared edge: ``POST /webhooks/github|gitlab|jira`` on the aiohttp app.

Every request goes through the same steps, in this order, and the first failure answers a 4xx
with nothing written (``{"error": <reason tag>}``; only the tag and the channel are logged,
never the body, a signature or a secret):

1. content type ``application/json`` (415), a declared or streamed body over the cap (413), a
   client hanging up mid-body (400, quietly);
2. the channel's signature or token over the *raw bytes*, before anything parses them (401);
3. the body is one JSON object (400), then the channel's pure parser turns it into an
   :class:`~intake.core.models.IdeaDraft` or says why the event is ignored (400 if malformed);
4. the one capture (idempotent on the namespaced delivery id). A first capture queues the reply
   with the idea id back to the ticket in the same transaction (its ``idea.captured`` event):
   the reply outbox (:mod:`intake.channels.replies`) posts it, retrying through a forge
   outage, so a slow or failing forge never holds up the acknowledgement nor loses the reply.

Forges sign no timestamp (GitLab's signing token aside) and no delivery header, so a replayed
delivery is bounded by the dedupe on what the signed body names (the issue, comment or note):
the same body again, under whatever delivery header, is the same idea, and writes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import redis
from aiohttp import web

from intake.channels.replies import Reply, Send, SenderFactory, post_reply
from intake.core.errors import IntakeError, InvalidInput
from intake.core.models import Idea, IdeaDraft
from intake.core.settings import Settings
from intake.people.registry import parse_identity
from intake.storage.capture_queue import CaptureQueue

log = logging.getLogger("intake.channels.webhooks")

JSON = "application/json"
# Ids that go into delivery ids and provenance: plain, short, checked with fullmatch.
_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,100}")


class WebhookRefused(IntakeError):
    """A webhook request refused at the edge; ``reason`` is a stable tag, ``status`` the 4xx."""

    def __init__(self, reason: str, status: int = 400) -> None:
        self.reason, self.status = reason, status
        super().__init__(f"webhook refused: {reason}")


@dataclass(frozen=True)
class Outcome:
    """What a channel's parser made of a verified payload: a draft to capture, or ``ignored``
    naming why not (an event intake does not take, a ping, …)."""

    draft: IdeaDraft | None = None
    ignored: str = ""


class WebhookChannel(Protocol):
    """One ticket channel: verifies its transport and parses its payloads (both pure)."""

    name: str

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raise :class:`WebhookRefused` (401) unless ``body`` is signed by the sender."""

    def parse(self, headers: Mapping[str, str], payload: dict[str, Any], body: bytes) -> Outcome:
        """The draft for this event, or why it is ignored; raise :class:`WebhookRefused`."""

    def reply_for(self, idea: Idea) -> Reply | None:
        """The reply to post on the ticket ``idea`` came from (built from its stored
        provenance), or None (no API token configured, a provenance it cannot answer)."""


# -- shared checks -------------------------------------------------------------------------
async def read_capped(request: web.Request, max_body: int) -> bytes:
    """The body, buffering at most ``max_body + 1`` bytes whatever the client sends.

    Raises:
        WebhookRefused: ``body_too_large`` (413), or ``incomplete_body`` (400) when the
            client hangs up or breaks the chunked framing mid-body.
    """
    declared = request.content_length
    if declared is not None and declared > max_body:
        raise WebhookRefused("body_too_large", 413)
    chunks: list[bytes] = []
    total = 0
    try:
        while total <= max_body:
            chunk = await request.content.read(max_body + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except (aiohttp.ClientPayloadError, ConnectionError, asyncio.IncompleteReadError):
        raise WebhookRefused("incomplete_body") from None
    if total > max_body:
        raise WebhookRefused("body_too_large", 413)
    if declared is not None and total != declared:
        raise WebhookRefused("incomplete_body")
    return b"".join(chunks)


def single_header(headers: Mapping[str, str], name: str) -> str | None:
    """The one value of ``name``; two copies are ambiguous (which did a proxy check?) and are
    refused as ``duplicate_header``."""
    getall = getattr(headers, "getall", None)
    values = getall(name, []) if getall else ([headers[name]] if name in headers else [])
    if len(values) > 1:
        raise WebhookRefused("duplicate_header", 401)
    return values[0] if values else None


def check_hmac_sha256(secret: str, body: bytes, signature: str | None) -> None:
    """``signature`` must be ``sha256=<64 lower hex>`` = HMAC-SHA256(secret, body), compared in
    constant time. Raises :class:`WebhookRefused` (401)."""
    if signature is None:
        raise WebhookRefused("missing_signature", 401)
    if re.fullmatch(r"sha256=[0-9a-f]{64}", signature) is None:
        raise WebhookRefused("bad_signature_format", 401)
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise WebhookRefused("signature_mismatch", 401)


def sign_hmac_sha256(secret: str, body: bytes) -> str:
    """The ``sha256=…`` header value a sender computes (for tests and operators' checks)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("duplicate key")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_object(body: bytes) -> dict[str, Any]:
    """The body as one JSON object, or ``WebhookRefused('malformed_json')``.

    Strict RFC 8259: a duplicate key or ``NaN``/``Infinity`` is refused, not read one way here
    and another by whatever else reads the signed body (a proxy, a log, the forge's own view).
    """
    try:
        data = json.loads(body.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise WebhookRefused("malformed_json") from None
    if not isinstance(data, dict):
        raise WebhookRefused("malformed_json")
    return data


def field(data: Any, *path: str, kind: type | tuple[type, ...] = str, required: bool = True) -> Any:
    """``data[path0][path1]…`` of type ``kind``; absent or null is None unless ``required``.
    Any other shape is ``WebhookRefused('malformed_<path>')``: parsers never index blindly."""
    node = data
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            break
    if node is None:
        if required:
            raise WebhookRefused(f"malformed_{'.'.join(path)}")
        return None
    if (isinstance(node, bool) and kind is not bool) or not isinstance(node, kind):  # bool is an int
        raise WebhookRefused(f"malformed_{'.'.join(path)}")
    return node


def token(value: Any, what: str) -> str:
    """An id that goes into a delivery id or provenance: plain and short, else refused."""
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if _TOKEN.fullmatch(text) is None:
        raise WebhookRefused(f"malformed_{what}")
    return text


def forge_identity(kind: str, login: str) -> str:
    """The requester ``<kind>:<login>`` checked (and case-folded) by the identity rules of
    intake.people.registry; anything else is ``WebhookRefused('malformed_login')``."""
    try:
        return parse_identity(f"{kind}:{login}")
    except InvalidInput:
        raise WebhookRefused("malformed_login") from None


def slash_intake(text: str) -> str | None:
    """The request in a ``/intake <words>`` comment (first line starts with it), else None."""
    stripped = text.lstrip()
    if not stripped.startswith("/intake"):
        return None
    rest = stripped[len("/intake"):]
    if rest and not rest[0].isspace():
        return None  # "/intakefoo" is not the command
    return rest.strip() or None


# -- the aiohttp side ----------------------------------------------------------------------
Capture = Callable[[IdeaDraft], Awaitable[Any]]


class WebhookEdge:
    """The routes for the configured channels."""

    def __init__(self, channels: list[WebhookChannel], capture: Callable[[], Capture], max_body: int) -> None:
        self.channels = channels
        self.capture = capture
        self.max_body = max_body

    def handler(self, channel: WebhookChannel) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            try:
                if request.content_type != JSON:
                    raise WebhookRefused("content_type", 415)
                body = await read_capped(request, self.max_body)
                channel.verify(request.headers, body)
                try:
                    outcome = channel.parse(request.headers, parse_object(body), body)
                except ValueError:  # a draft field out of bounds (pydantic's ValidationError)
                    raise WebhookRefused("malformed_payload") from None
            except WebhookRefused as exc:
                log.warning("%s webhook refused reason=%s", channel.name, exc.reason)
                return web.json_response({"error": exc.reason}, status=exc.status)
            if outcome.draft is None:
                return web.json_response({"ignored": outcome.ignored})
            try:
                idea, created = await self.capture()(outcome.draft)
            except InvalidInput as exc:  # refused by capture (nothing visible, too long, …)
                log.info("%s webhook not captured: %s", channel.name, type(exc).__name__)
                return web.json_response({"error": str(exc)}, status=422)
            except (IntakeError, redis.RedisError) as exc:  # storage down or shutting down
                log.warning("%s webhook not stored: %s", channel.name, type(exc).__name__)
                return web.json_response({"error": "unavailable, try again"}, status=503)
            log.info("%s webhook captured idea=%s created=%s", channel.name, idea.id, created)
            return web.json_response({"idea": idea.id, "created": created}, status=202)

        return handle


#: Builds a ticket channel from settings, or None when its webhook secret is not set.
ChannelFactory = Callable[[Settings], "WebhookChannel | None"]


def configured_channels(settings: Settings, factories: Iterable[ChannelFactory]) -> list[WebhookChannel]:
    """The ticket channels whose webhook secret is set. The factories are data the app passes
    in, so this shared edge imports none of the channels it serves."""
    return [channel for factory in factories if (channel := factory(settings)) is not None]


def mount_webhooks(app: web.Application, settings: Settings, factories: Iterable[ChannelFactory],
                   capture_key: web.AppKey[CaptureQueue]) -> list[str]:
    """Add ``POST /webhooks/<name>`` for each configured ticket channel; returns their names."""
    channels = configured_channels(settings, factories)
    if not channels:
        return []
    edge = WebhookEdge(channels, lambda: app[capture_key].capture, settings.webhook_max_body)
    for channel in channels:
        app.router.add_post(f"/webhooks/{channel.name}", edge.handler(channel))
    return [c.name for c in channels]


def webhook_senders(settings: Settings, factories: Iterable[ChannelFactory]) -> list[SenderFactory]:
    """The reply outbox's senders for the configured ticket channels (see
    :mod:`intake.channels.replies`)."""

    def sender(channel: WebhookChannel) -> SenderFactory:
        def make(session: aiohttp.ClientSession) -> tuple[str, Send]:
            async def send(idea: Idea) -> bool:
                reply = channel.reply_for(idea)
                if reply is None:
                    return False
                await post_reply(session, reply, channel=channel.name)
                return True

            return channel.name, send

        return make

    return [sender(c) for c in configured_channels(settings, factories)]
