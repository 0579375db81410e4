"""Logging for ``intake serve`` and ``intake worker``: stdlib logging, text or JSON lines.

``INTAKE_LOG_FORMAT=json`` writes one JSON object a line (``ts``, ``level``, ``logger``, ``msg``,
and ``exc`` for an exception); ``text`` (the default) writes ``time level logger: message``.
``INTAKE_LOG_LEVEL`` sets the level of every logger, ours and the libraries'.

Log lines carry ids and outcomes, never request bodies, codes, tokens or secrets. Two guards
back that habit up:

- :class:`Redactor` replaces every secret the settings hold (Slack tokens and signing secret,
  the API token, forge and tracker tokens and webhook secrets, the Redis password) and anything
  shaped like a Slack token, a bearer header or a URL password with ``[redacted]``, in the message, its arguments and any traceback;
- :class:`AccessLogger` logs a request as method, matched route (never the path's values or the
  query string), status, size and time: never headers or bodies.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from typing import IO, Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from pydantic import SecretStr

from intake.core.settings import Settings

REDACTED = "[redacted]"
# Shapes of secrets that may reach a message from a library: Slack tokens (xoxb-, xapp-, …),
# Authorization headers, passwords inside URLs.
_SHAPES = re.compile(
    r"xox[abposre]-[A-Za-z0-9-]+|xapp-[A-Za-z0-9-]+|(?i:bearer)\s+[A-Za-z0-9._~+/=-]+|(?<=://)[^/\s:@]*:[^/\s@]+(?=@)"
)
_OURS = "intake"  # marks the handler configure_logging installed, so a second call replaces it


def settings_secrets(settings: Settings) -> list[str]:
    """Every secret value the settings hold: each ``SecretStr`` field (a Redis URL contributes
    its password)."""
    found = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name != "redis_url" and isinstance(value, SecretStr) and value.get_secret_value():
            found.append(value.get_secret_value())
    if settings.redis_url is not None:
        password = urlsplit(settings.redis_url.get_secret_value()).password
        if password:
            found.append(password)
    return found


class Redactor(logging.Filter):
    """Rewrites each record so no known secret, and nothing shaped like one, reaches a handler."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return _SHAPES.sub(REDACTED, text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not raise out of a log call
            message = f"{record.msg} (unformattable arguments)"
        record.msg = self.scrub(message)
        record.args = None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, ensure_ascii=True)


def configure_logging(settings: Settings, *, stream: IO[str] | None = None) -> logging.Handler:
    """Send every logger's records through one redacting handler on ``stream`` (stderr), in
    ``settings.log_format`` at ``settings.log_level``. Calling it again replaces the handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "name", None) == _OURS]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_OURS)
    handler.addFilter(Redactor(settings_secrets(settings)))
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    return handler


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log without the path's values, query string, headers or body (they carry
    secrets: an enrolment link is ``/console/enrol/<token>``). A request is named by the route it
    matched (``/console/enrol/{token}``), or ``(no route)``."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        match_info = getattr(request, "match_info", None)
        resource = getattr(getattr(match_info, "route", None), "resource", None)
        route = resource.canonical if resource is not None else "(no route)"
        self.logger.info("%s %s %s %s %.1fms", request.method, route, response.status,
                         response.body_length, time * 1000)
