"""GitLab issues as a channel: ``POST /webhooks/gitlab``.

Transport: ``X-Gitlab-Token`` (the webhook's secret token, sent as is) compared in constant
time. When a signing token is configured (``INTAKE_GITLAB_SIGNING_TOKEN``), GitLab's
Standard-Webhooks signature is required as well: ``webhook-signature: v1,<base64
HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")>`` with ``webhook-timestamp``
within five minutes (a ``whsec_`` token's key is its base64 part, any other token's its bytes).
The delivery id is what the body names, the issue or the note (``object_attributes.id``),
namespaced by the project id: neither ``Idempotency-Key`` nor ``X-Gitlab-Event-UUID`` is
covered by the signing token's signature, so a signed body replayed inside the window under a
fresh key is the first idea again. The key (else the event UUID) is provenance.

Events: ``Issue Hook`` with action ``open``, and ``Note Hook`` on an issue whose note starts
with ``/intake``. Confidential issues and notes are ignored (their text must not reach an
approvals channel). The requester is ``gitlab:id:<user id>`` (the immutable numeric id; the username is provenance).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from intake.channels.replies import Reply, reply_text
from intake.channels.webhooks import Outcome, WebhookRefused, field, forge_identity, single_header, slash_intake, token
from intake.core.models import Channel, Idea, IdeaDraft, sha256_hex
from intake.core.settings import Settings

SIGNATURE_WINDOW = 300
_SIGNATURE = re.compile(r"v1,[A-Za-z0-9+/]{43}=")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def signing_key(signing_token: str) -> bytes:
    if signing_token.startswith("whsec_"):
        try:
            return base64.b64decode(signing_token[len("whsec_"):], validate=True)
        except (binascii.Error, ValueError):
            pass
    return signing_token.encode()


def sign_standard_webhook(signing_token: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    """The ``webhook-signature`` value for one delivery (for tests and operators' checks)."""
    mac = hmac.new(signing_key(signing_token), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


@dataclass(frozen=True)
class GitLab:
    """The GitLab webhook channel, configured from settings."""

    secret: str
    signing_token: str = ""
    api_url: str = "https://gitlab.com"
    token: str = ""
    clock: Callable[[], float] = dc_field(default=time.time, repr=False)
    name: str = "gitlab"

    @classmethod
    def from_settings(cls, settings: Settings) -> GitLab | None:
        if settings.gitlab_webhook_token is None:
            return None
        signing = settings.gitlab_signing_token.get_secret_value() if settings.gitlab_signing_token else ""
        return cls(secret=settings.gitlab_webhook_token.get_secret_value(), signing_token=signing,
                   api_url=settings.gitlab_api_url,
                   token=settings.gitlab_token.get_secret_value() if settings.gitlab_token else "")

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        supplied = single_header(headers, "X-Gitlab-Token")
        if supplied is None:
            raise WebhookRefused("missing_token", 401)
        if not hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"), self.secret.encode()):
            raise WebhookRefused("token_mismatch", 401)
        if self.signing_token:
            self._verify_signature(headers, body)

    def _verify_signature(self, headers: Mapping[str, str], body: bytes) -> None:
        webhook_id = single_header(headers, "webhook-id")
        stamp = single_header(headers, "webhook-timestamp")
        signatures = single_header(headers, "webhook-signature")
        if webhook_id is None or stamp is None or signatures is None:
            raise WebhookRefused("missing_signature", 401)
        token(webhook_id, "webhook_id")
        if _TIMESTAMP.fullmatch(stamp) is None:
            raise WebhookRefused("bad_timestamp", 401)
        if abs(self.clock() - int(stamp)) > SIGNATURE_WINDOW:
            raise WebhookRefused("stale_timestamp", 401)
        expected = sign_standard_webhook(self.signing_token, webhook_id, stamp, body)
        # The header may list several signatures (key rotation): any valid one will do.
        offered = [s for s in signatures.split(" ") if _SIGNATURE.fullmatch(s)]
        if not any(hmac.compare_digest(expected, s) for s in offered):
            raise WebhookRefused("signature_mismatch", 401)

    def parse(self, headers: Mapping[str, str], payload: dict[str, Any], body: bytes) -> Outcome:
        event = single_header(headers, "X-Gitlab-Event") or ""
        if event not in ("Issue Hook", "Note Hook"):
            return Outcome(ignored="event")
        key = single_header(headers, "Idempotency-Key") or single_header(headers, "X-Gitlab-Event-UUID")
        delivery = token(key, "delivery")
        project_id = field(payload, "project", "id", kind=int)
        project = field(payload, "project", "path_with_namespace")
        username = field(payload, "user", "username")
        user_id = field(payload, "user", "id", kind=int)
        forge_identity("gitlab", username)  # the username is shown beside the id: it must be a well-formed one
        issue = payload.get("issue") if event == "Note Hook" else payload.get("object_attributes")
        if not isinstance(issue, dict):
            raise WebhookRefused("malformed_issue")
        iid = field(issue, "iid", kind=int)
        title = field(issue, "title")
        if field(issue, "confidential", kind=bool, required=False) or "confidential" in str(payload.get("event_type")):
            return Outcome(ignored="confidential")
        if event == "Issue Hook":
            if field(payload, "object_attributes", "action", required=False) != "open":
                return Outcome(ignored="issue action")
            text = f"{title}\n\n{field(issue, 'description', required=False) or ''}".strip()
            via, url = "issue", field(issue, "url", required=False) or ""
        else:
            if field(payload, "object_attributes", "noteable_type") != "Issue":
                return Outcome(ignored="not an issue note")
            if field(payload, "object_attributes", "system", kind=bool, required=False):
                return Outcome(ignored="system note")
            words = slash_intake(field(payload, "object_attributes", "note", required=False) or "")
            if words is None:
                return Outcome(ignored="no /intake command")
            text, via = words, "note"
            url = field(payload, "object_attributes", "url", required=False) or ""
        thing = token(field(payload, "object_attributes", "id", kind=int), "object_attributes.id")
        draft = IdeaDraft(
            channel=Channel.GITLAB, requester=forge_identity("gitlab", f"id:{user_id}"),
            delivery_id=f"{project_id}:{via}:{thing}", text=text, title=title[:200],
            provenance={"via": via, "project": project[:200], "project_id": str(project_id), "issue": str(iid),
                        "username": username[:100],
                        "delivery": delivery, "url": url[:500]},
            raw_sha256=sha256_hex(body),
        )
        return Outcome(draft=draft)

    def reply_for(self, idea: Idea) -> Reply | None:
        """A note on the issue the idea came from (its provenance's project id and issue iid)."""
        project_id, iid = idea.provenance.get("project_id", ""), idea.provenance.get("issue", "")
        if not self.token or not re.fullmatch(r"[0-9]{1,12}", project_id) or not re.fullmatch(r"[0-9]{1,12}", iid):
            return None
        url = f"{self.api_url.rstrip('/')}/api/v4/projects/{project_id}/issues/{iid}/notes"
        headers = {"PRIVATE-TOKEN": self.token, "User-Agent": "intake"}
        return Reply(url=url, json={"body": reply_text(idea.id)}, headers=headers)
