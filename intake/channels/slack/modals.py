"""Modal references: what a Slack modal's submission acts on, as the broker wrote it.

When an approver presses Promote, Approve, Accept or Deny on a card, the broker opens a modal
whose ``private_metadata`` is a *reference*: the kind of action, its subject (and the spec hash or
commit it names), the Slack user who opened it, the card it was opened from and when, MAC'd with
the broker's record key (:meth:`intake.audit.log.AuditLog.record_mac`, a key Redis and Slack never
hold). A submission acts only on a reference that verifies, for the same kind of action, from the
user who opened it, and not older than :data:`MAX_AGE_S`: ``private_metadata`` as sent is never
trusted on its own (another app, a replayed or hand-made payload, another user's modal).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

#: A modal's reference is good for this long (a step-up code is still needed to act).
MAX_AGE_S = 24 * 3600
KINDS = frozenset({"promote", "approve", "accept", "deny"})
_MAC_KIND = "slack_modal"


class RecordMac(Protocol):
    def record_mac(self, kind: str, fields: dict[str, Any]) -> str: ...

    def record_ok(self, kind: str, fields: dict[str, Any], mac: str) -> bool: ...


class ModalRefused(Exception):
    """A submission whose reference the broker did not write for this user; ``reason`` is the
    audit tag (``forged_modal``, ``wrong_opener``, ``expired_modal``)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def seal_reference(macs: RecordMac, *, kind: str, opener: str, card: str, now: float, **ref: str) -> str:
    """The ``private_metadata`` for a modal of ``kind`` opened by Slack user ``opener`` from
    ``card`` (``channel/ts`` of the card's message); ``ref`` holds the subject and what it names."""
    assert kind in KINDS
    fields = {"kind": kind, "opener": opener, "card": card, "at": int(now), "ref": dict(ref)}
    return json.dumps({"r": fields, "mac": macs.record_mac(_MAC_KIND, fields)}, separators=(",", ":"))


def open_reference(macs: RecordMac, private_metadata: Any, *, kind: str, submitter: str,
                   now: float) -> dict[str, str]:
    """The verified reference of a submission (``subject`` and the rest of ``ref``), or
    :class:`ModalRefused`. Verifies the MAC before reading any field."""
    try:
        outer = json.loads(private_metadata) if isinstance(private_metadata, str) and len(private_metadata) <= 3000 \
            else None
    except (ValueError, RecursionError):
        outer = None
    fields = outer.get("r") if isinstance(outer, dict) else None
    mac = outer.get("mac") if isinstance(outer, dict) else None
    if not isinstance(fields, dict) or not isinstance(mac, str) or not macs.record_ok(_MAC_KIND, fields, mac):
        raise ModalRefused("forged_modal", "this form was not opened by intake; press the card's button again")
    ref = fields.get("ref")
    if fields.get("kind") != kind or not isinstance(ref, dict) or not isinstance(ref.get("subject"), str):
        raise ModalRefused("forged_modal", "this form was not opened by intake; press the card's button again")
    if fields.get("opener") != submitter:
        raise ModalRefused("wrong_opener", "this form was opened by someone else; press the card's button yourself")
    at = fields.get("at")
    if not isinstance(at, int) or not now - MAX_AGE_S <= at <= now + 300:
        raise ModalRefused("expired_modal", "this form is too old; press the card's button again")
    return {str(k): str(v) for k, v in ref.items()}
