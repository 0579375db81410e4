"""Verify Slack HTTP requests before bolt (or anything else) sees them.

Slack signs each request with ``X-Slack-Signature: v0=<hex HMAC-SHA256>`` over
``v0:<X-Slack-Request-Timestamp>:<raw body>``. Bolt checks this too, but a malformed header
makes it raise inside ``int()`` or ``hmac.compare_digest`` and answer 500, and it reads the
whole body first. This module checks the headers' shape, the replay window and the HMAC on the
exact bytes received, with a hard cap on how many bytes it will buffer, and answers every
failure with the same 401 so a caller learns nothing about which check failed.

Only the stable reason tag and a request id are logged: never the body, the signature or the
secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from intake.channels.webhooks import WebhookRefused, read_capped
from intake.core.errors import IntakeError

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 300
DEFAULT_MAX_BODY = 65536

#: Where the middleware leaves the verified raw body. Downstream handlers must build the bolt
#: request from this (``AsyncBoltRequest(body=raw.decode("utf-8"), ...)``): the middleware has
#: consumed ``request.content``, so ``await request.read()`` / ``request.text()`` would return
#: an empty body (which bolt's own check then refuses, so the mistake fails closed).
SLACK_RAW_BODY: web.RequestKey[bytes] = web.RequestKey("slack_raw_body", bytes)

# Explicit ASCII classes with fullmatch: ``\d`` also matches non-ASCII digits (which ``int()``
# accepts), and ``$`` would let a trailing newline through. Twelve digits bound the integer
# conversion long before Python's 4300-digit limit.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"v0=[0-9a-f]{64}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

_INVALID = b'{"error": "invalid request"}'
# Methods that carry no body to verify; every other method to the Slack path is checked, so a
# route registered for ``*`` cannot be reached with e.g. PUT and an unverified body.
_UNCHECKED_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class SlackAuthError(IntakeError):
    """A Slack request failed verification; ``reason`` is a stable tag for logs and metrics.

    Tags: ``missing_timestamp``, ``bad_timestamp``, ``stale_timestamp``, ``missing_signature``,
    ``bad_signature_format``, ``signature_mismatch``, ``body_too_large``, ``incomplete_body``.
    """

    exit_code = 1

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"Slack request refused: {reason}")


def _check_secret(signing_secret: str) -> None:
    # An empty secret would make every forged request "verify"; refuse it as configuration.
    if not isinstance(signing_secret, str) or not signing_secret.strip():
        raise ValueError("Slack signing secret must be a non-empty string")


def compute_signature(*, body: bytes, timestamp: str, signing_secret: str) -> str:
    """Return ``v0=`` + hex HMAC-SHA256(secret, ``b"v0:" + ts + b":" + body``).

    Used by verification and by tests that need to sign requests the way Slack does.
    """
    _check_secret(signing_secret)
    base = b"v0:" + timestamp.encode("ascii") + b":" + body
    digest = hmac.new(signing_secret.encode("utf-8"), base, hashlib.sha256).hexdigest()
    return "v0=" + digest


def verify_slack_signature(
    *,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    signing_secret: str,
    now: float,
    window: int = DEFAULT_WINDOW,
) -> None:
    """Verify one Slack request; return None if genuine, raise :class:`SlackAuthError` if not.

    Checks, in order: timestamp present and ``^[0-9]{1,12}$``; ``abs(now - ts) <= window``
    (inclusive, both directions, so a clock ahead of Slack's is tolerated the same as one
    behind); signature present and ``^v0=[0-9a-f]{64}$``; then the HMAC over the raw ``body``
    compared in constant time. Header shapes are checked before any conversion so hostile
    values (``1e9``, 5000 digits, non-ASCII) are refusals, never exceptions.

    Raises:
        SlackAuthError: with the reason tag of the first failed check.
        ValueError: ``signing_secret`` is empty (a configuration error, not a request error).
    """
    _check_secret(signing_secret)
    if timestamp is None:
        raise SlackAuthError("missing_timestamp")
    if not isinstance(timestamp, str) or _TIMESTAMP.fullmatch(timestamp) is None:
        raise SlackAuthError("bad_timestamp")
    if abs(now - int(timestamp)) > window:
        raise SlackAuthError("stale_timestamp")
    if signature is None:
        raise SlackAuthError("missing_signature")
    if not isinstance(signature, str) or _SIGNATURE.fullmatch(signature) is None:
        raise SlackAuthError("bad_signature_format")
    expected = compute_signature(body=body, timestamp=timestamp, signing_secret=signing_secret)
    # Both sides are ASCII by now, so compare_digest cannot raise TypeError.
    if not hmac.compare_digest(expected, signature):
        raise SlackAuthError("signature_mismatch")


def _single_header(request: web.Request, name: str, duplicate_reason: str) -> str | None:
    # Two copies of a header are ambiguous (which one did bolt or a proxy use?): refuse them.
    values = request.headers.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        raise SlackAuthError(duplicate_reason)
    return values[0]


async def _read_capped(request: web.Request, max_body: int) -> bytes:
    """The body, at most ``max_body`` bytes (the webhooks' one capped reader); too large is
    ``body_too_large``, a client hanging up mid-body ``incomplete_body``."""
    try:
        return await read_capped(request, max_body)
    except WebhookRefused as exc:
        raise SlackAuthError(exc.reason) from None


def _request_id(request: web.Request) -> str:
    # A caller-supplied id is logged only if it is short and plain (no log injection);
    # otherwise we mint one.
    supplied = request.headers.get("X-Request-Id", "")
    if _REQUEST_ID.fullmatch(supplied):
        return supplied
    return uuid.uuid4().hex[:16]


def _is_slack_path(request: web.Request, path: str) -> bool:
    if request.path == path:
        return True
    # Also match on the resolved route, so an alternative spelling of the URL that aiohttp
    # routes to the same handler cannot skip verification.
    route = request.match_info.route
    resource = getattr(route, "resource", None)
    return resource is not None and resource.canonical == path


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def slack_verification_middleware(
    signing_secret: str,
    *,
    path: str = "/slack/events",
    max_body: int = DEFAULT_MAX_BODY,
    clock: Callable[[], float] = time.time,
    window: int = DEFAULT_WINDOW,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Build an aiohttp middleware that verifies Slack requests to ``path``.

    For every request to ``path`` except GET/HEAD/OPTIONS it refuses, with 401
    ``{"error": "invalid request"}`` and without calling the handler: a declared
    Content-Length over ``max_body``, a body (chunked or not) that grows past ``max_body``,
    and any signature/timestamp failure. On success the exact bytes received are stored at
    ``request[SLACK_RAW_BODY]`` (see :data:`SLACK_RAW_BODY`). Other paths pass through
    untouched.

    Raises:
        ValueError: ``signing_secret`` is empty or ``max_body`` is not positive.
    """
    _check_secret(signing_secret)
    if max_body <= 0:
        raise ValueError("max_body must be positive")

    @web.middleware
    async def verify_slack(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in _UNCHECKED_METHODS or not _is_slack_path(request, path):
            return await handler(request)
        try:
            body = await _read_capped(request, max_body)
            verify_slack_signature(
                body=body,
                timestamp=_single_header(request, "X-Slack-Request-Timestamp", "bad_timestamp"),
                signature=_single_header(request, "X-Slack-Signature", "bad_signature_format"),
                signing_secret=signing_secret,
                now=clock(),
                window=window,
            )
        except SlackAuthError as err:
            if log.isEnabledFor(logging.WARNING):
                log.warning(
                    "slack request refused reason=%s request_id=%s", err.reason, _request_id(request)
                )
            # A body cut short is a bad request (nobody is left to read the answer anyway).
            status = 400 if err.reason == "incomplete_body" else 401
            return web.Response(body=_INVALID, status=status, content_type="application/json")
        request[SLACK_RAW_BODY] = body
        return await handler(request)

    return verify_slack


def verified_body(request: web.Request) -> bytes:
    """Return the raw body the middleware verified for this request.

    Raises:
        SlackAuthError: ``missing_verification`` if the middleware did not run for this
            request (a wiring mistake; failing closed beats handling an unverified body).
    """
    try:
        return request[SLACK_RAW_BODY]
    except KeyError:
        raise SlackAuthError("missing_verification") from None
