"""Jira issues as a channel: ``POST /webhooks/jira``.

Transport: a Jira webhook with a secret sends ``X-Hub-Signature: sha256=<hex
HMAC-SHA256(secret, raw body)>``, checked in constant time before parsing.
The signature does not cover ``X-Atlassian-Webhook-Identifier``, so the delivery id is what
the signed body names (the issue, or the comment), namespaced by the issue id: a genuine body
replayed under a new identifier is the first idea again. The identifier is provenance.

Events (``webhookEvent`` in the body): ``jira:issue_created`` captures summary and
description; ``comment_created`` whose body starts with ``/intake`` captures the words after
it. The requester is ``jira:<accountId>`` of whoever wrote the words (Jira Cloud account ids
are stable; display names and e-mail addresses are not identities).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from intake.channels.replies import Reply, reply_text
from intake.channels.webhooks import (
    Outcome,
    check_hmac_sha256,
    field,
    forge_identity,
    single_header,
    slash_intake,
    token,
)
from intake.core.models import Channel, Idea, IdeaDraft, sha256_hex
from intake.core.settings import Settings


@dataclass(frozen=True)
class Jira:
    """The Jira webhook channel, configured from settings."""

    secret: str
    api_url: str = ""
    user: str = ""
    token: str = ""
    name: str = "jira"

    @classmethod
    def from_settings(cls, settings: Settings) -> Jira | None:
        if settings.jira_webhook_secret is None:
            return None
        return cls(secret=settings.jira_webhook_secret.get_secret_value(), api_url=settings.jira_api_url or "",
                   user=settings.jira_user or "",
                   token=settings.jira_token.get_secret_value() if settings.jira_token else "")

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        check_hmac_sha256(self.secret, body, single_header(headers, "X-Hub-Signature"))

    def parse(self, headers: Mapping[str, str], payload: dict[str, Any], body: bytes) -> Outcome:
        event = field(payload, "webhookEvent")
        if event not in ("jira:issue_created", "comment_created"):
            return Outcome(ignored="event")
        delivery = token(single_header(headers, "X-Atlassian-Webhook-Identifier"), "delivery")
        issue_id = token(field(payload, "issue", "id", kind=(str, int)), "issue.id")
        key = token(field(payload, "issue", "key"), "issue.key")
        summary = field(payload, "issue", "fields", "summary", required=False) or ""
        if event == "jira:issue_created":
            author = field(payload, "user", "accountId")
            description = field(payload, "issue", "fields", "description", required=False) or ""
            text, via, thing = f"{summary}\n\n{description}".strip(), "issue_created", "issue"
        else:
            author = field(payload, "comment", "author", "accountId")
            words = slash_intake(field(payload, "comment", "body", required=False) or "")
            if words is None:
                return Outcome(ignored="no /intake command")
            text, via = words, "comment_created"
            thing = f"comment:{token(field(payload, 'comment', 'id', kind=(str, int)), 'comment.id')}"
        draft = IdeaDraft(
            channel=Channel.JIRA, requester=forge_identity("jira", author), delivery_id=f"{issue_id}:{thing}",
            text=text, title=summary[:200],
            provenance={"via": via, "issue": key, "account_id": author, "delivery": delivery},
            raw_sha256=sha256_hex(body),
        )
        return Outcome(draft=draft)

    def reply_for(self, idea: Idea) -> Reply | None:
        """A comment on the issue the idea came from (its provenance's issue key)."""
        key = idea.provenance.get("issue", "")
        if not (self.api_url and self.token) or not re.fullmatch(r"[A-Za-z0-9._:-]{1,100}", key):
            return None
        url = f"{self.api_url.rstrip('/')}/rest/api/2/issue/{quote(key, safe='')}/comment"
        if self.user:  # Jira Cloud: e-mail and API token
            auth = "Basic " + base64.b64encode(f"{self.user}:{self.token}".encode()).decode()
        else:  # Data Center: a personal access token
            auth = f"Bearer {self.token}"
        headers = {"Authorization": auth, "User-Agent": "intake"}
        return Reply(url=url, json={"body": reply_text(idea.id)}, headers=headers)
