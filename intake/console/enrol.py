"""One-time approver enrolment links.

An admin enrols a person (an unconfirmed approver, whose secret nobody has seen) and gets a link
``/console/enrol/<token>``. Only the SHA-256 of the token is stored, with a TTL. Opening the link
shows a confirm page (link previewers that fetch it do nothing); pressing *Show my code* reveals
a fresh secret once, as a QR code, and the person confirms it with one valid code, after which
the link is gone. A second reveal is refused: whoever saw the secret first is the only one who
could confirm it, and the admin can issue a new link.

When the person has a Slack user id and Slack is configured, the link goes to them by Slack DM
(:func:`send_by_dm`) and the admin never sees it; otherwise the admin is shown it once to pass
on privately. The token is never written to the audit log or any log line.
"""

from __future__ import annotations

import json
import logging
import secrets

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from intake.core.errors import NotFound, Refused
from intake.core.models import sha256_hex
from intake.core.settings import Settings
from intake.storage.store import Pipe, Store

log = logging.getLogger("intake.console")

LINK_TTL_S = 24 * 3600


class EnrolLinks:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _key(self, token: str) -> str:
        return self.store.keys.enrol_link(sha256_hex(token.encode()))

    def create(self, approver_id: str, *, actor: str) -> str:
        """A fresh link token for ``approver_id`` (returned once; only its hash is kept)."""
        token = secrets.token_urlsafe(32)
        key = self._key(token)

        def build(pipe: Pipe) -> None:
            pipe.multi()
            pipe.set(key, json.dumps({"approver": approver_id, "revealed": False}), ex=LINK_TTL_S)
            self.store.emit(pipe, actor, "approver.enrolment_link", approver_id, ttl_s=LINK_TTL_S)

        self.store.transact([key], build)
        return token

    def peek(self, token: str) -> dict[str, object]:
        raw = self.store.r.get(self._key(token)) if 10 <= len(token) <= 100 else None
        if raw is None:
            raise NotFound("this enrolment link is unknown, used or expired; ask an admin for a new one")
        return dict(json.loads(raw))

    def reveal(self, token: str) -> str:
        """Mark the link revealed (once) and return its approver id."""
        key = self._key(token)

        def build(pipe: Pipe) -> str:
            raw = pipe.get(key)
            if raw is None:
                raise NotFound("this enrolment link is unknown, used or expired; ask an admin for a new one")
            record = json.loads(raw)
            if record.get("revealed"):
                raise Refused("link_used", "this link's code was already shown; ask an admin for a new link")
            pipe.multi()
            pipe.set(key, json.dumps({**record, "revealed": True}), keepttl=True)
            return str(record["approver"])

        return self.store.transact([key], build)

    def finish(self, token: str) -> None:
        self.store.r.delete(self._key(token))


async def send_by_dm(settings: Settings, store: Store, slack_user: str, approver_id: str, link: str, *,
                     actor: str) -> bool:
    """DM ``link`` to ``slack_user`` through the Slack Web API (SLACK_API_URL honoured). True when
    Slack took it; False (nothing sent) when Slack is not configured or refused, so the caller
    falls back to showing the link. Audited without the link."""
    if settings.slack_bot_token is None:
        return False
    kwargs = {"base_url": settings.slack_api_url} if settings.slack_api_url else {}
    try:
        async with aiohttp.ClientSession() as session:
            client = AsyncWebClient(token=settings.slack_bot_token.get_secret_value(), session=session, **kwargs)
            await client.chat_postMessage(
                channel=slack_user,
                text=(f"You have been enrolled as an intake approver ({approver_id}). Open this one-time "
                      f"link to set up your authenticator; it works once, for 24 hours: {link}"),
                unfurl_links=False, unfurl_media=False,
            )
    except (SlackApiError, aiohttp.ClientError, OSError) as exc:
        log.warning("enrolment link for %s: Slack DM failed (%s); showing it to the admin", approver_id,
                    type(exc).__name__)
        return False
    store.audit.record(actor, "approver.enrolment_link_sent", approver_id, via="slack_dm", slack_user=slack_user)
    return True
