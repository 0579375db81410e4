"""GitHub issues as a channel: ``POST /webhooks/github``.

Transport: ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, raw body)>``, checked in
constant time before the body is parsed. The signature does not cover ``X-GitHub-Delivery``,
so the delivery id is what the signed body names: the issue (one issue is one idea, however
often it is opened or labelled) or the comment, namespaced by the repository id; anyone
replaying a genuine body under a fresh GUID gets the first idea back. The GUID is provenance.

Events: ``ping`` is answered; ``issues`` ``opened`` is captured (or, when
``INTAKE_GITHUB_LABEL`` is set, only ``labeled`` with that label: GitHub sends ``opened`` and
``labeled`` for an issue created with labels, and one issue must be one idea);
``issue_comment`` ``created`` whose body starts with ``/intake`` captures the words after it.
Bots' events are ignored (our own reply must never file an idea). The requester is
``github:id:<user id>`` of whoever wrote the words (the immutable numeric id; the login, which
can be renamed, is provenance for display only); their ``author_association`` is provenance only:
it grants nothing, and a forge identity can never approve (approvals happen only through the
broker's API with a step-up).
"""

from __future__ import annotations

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

_ASSOCIATIONS = {"COLLABORATOR", "CONTRIBUTOR", "FIRST_TIMER", "FIRST_TIME_CONTRIBUTOR", "MANNEQUIN",
                 "MEMBER", "NONE", "OWNER"}


@dataclass(frozen=True)
class GitHub:
    """The GitHub webhook channel, configured from settings."""

    secret: str
    label: str = ""
    api_url: str = "https://api.github.com"
    token: str = ""
    name: str = "github"

    @classmethod
    def from_settings(cls, settings: Settings) -> GitHub | None:
        if settings.github_webhook_secret is None:
            return None
        return cls(secret=settings.github_webhook_secret.get_secret_value(), label=settings.github_label,
                   api_url=settings.github_api_url,
                   token=settings.github_token.get_secret_value() if settings.github_token else "")

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        check_hmac_sha256(self.secret, body, single_header(headers, "X-Hub-Signature-256"))

    def parse(self, headers: Mapping[str, str], payload: dict[str, Any], body: bytes) -> Outcome:
        event = token(single_header(headers, "X-GitHub-Event"), "event")
        delivery = token(single_header(headers, "X-GitHub-Delivery"), "delivery")
        if event == "ping":
            return Outcome(ignored="pong")
        if event not in ("issues", "issue_comment"):
            return Outcome(ignored=f"event {event}")
        action = field(payload, "action")
        if field(payload, "sender", "type", required=False) == "Bot":
            return Outcome(ignored="bot")
        repo = field(payload, "repository", "full_name")
        repo_id = token(field(payload, "repository", "id", kind=int), "repository.id")
        number = field(payload, "issue", "number", kind=int)
        issue_title = field(payload, "issue", "title")
        if event == "issues":
            if not self._takes(action, payload):
                return Outcome(ignored=f"issues.{token(action, 'action')}")
            author = field(payload, "issue", "user", kind=dict)
            text = f"{issue_title}\n\n{field(payload, 'issue', 'body', required=False) or ''}".strip()
            via, url = "issue", field(payload, "issue", "html_url", required=False) or ""
            thing = f"issue:{token(field(payload, 'issue', 'id', kind=int), 'issue.id')}"
        else:
            if action != "created":
                return Outcome(ignored=f"issue_comment.{token(action, 'action')}")
            author = field(payload, "comment", "user", kind=dict)
            words = slash_intake(field(payload, "comment", "body", required=False) or "")
            if words is None:
                return Outcome(ignored="no /intake command")
            text, via = words, "issue_comment"
            url = field(payload, "comment", "html_url", required=False) or ""
            thing = f"comment:{token(field(payload, 'comment', 'id', kind=int), 'comment.id')}"
        if field(author, "type", required=False) == "Bot":
            return Outcome(ignored="bot")
        login = field(author, "login")
        user_id = field(author, "id", kind=int)
        forge_identity("github", login)  # the login is shown beside the id: it must be a well-formed one
        association = field(payload, via if via == "issue" else "comment", "author_association", required=False)
        draft = IdeaDraft(
            channel=Channel.GITHUB, requester=forge_identity("github", f"id:{user_id}"), delivery_id=f"{repo_id}:{thing}",
            text=text, title=issue_title[:200],
            provenance={"via": via, "repo": repo[:200], "issue": str(number), "login": login,
                        "author_association": association if association in _ASSOCIATIONS else "unknown",
                        "delivery": delivery, "url": url[:500]},
            raw_sha256=sha256_hex(body),
        )
        return Outcome(draft=draft)

    def _takes(self, action: Any, payload: dict[str, Any]) -> bool:
        if not self.label:
            return action == "opened"
        return action == "labeled" and field(payload, "label", "name", required=False) == self.label

    def reply_for(self, idea: Idea) -> Reply | None:
        """A comment on the issue the idea came from (its provenance's repo and issue)."""
        repo, number = idea.provenance.get("repo", ""), idea.provenance.get("issue", "")
        if not self.token or not re.fullmatch(r"[^/\s]{1,100}/[^/\s]{1,100}", repo) \
                or not re.fullmatch(r"[0-9]{1,12}", number):
            return None
        owner, _, name = repo.partition("/")
        url = (f"{self.api_url.rstrip('/')}/repos/{quote(owner, safe='')}/{quote(name, safe='')}"
               f"/issues/{number}/comments")
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/vnd.github+json",
                   "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "intake"}
        return Reply(url=url, json={"body": reply_text(idea.id)}, headers=headers)
