"""Every Redis key intake uses, built in one place: the broker and its workers name keys alike.

Workers reach only the keys their Redis user may touch (:mod:`intake.core.redis_acl`); the
names here are the contract both sides and the ACL patterns share.
"""

from __future__ import annotations

from intake.core.models import sha256_hex


class Keys:
    """Every Redis key intake uses, built in one place."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix

    def idea(self, idea_id: str) -> str:
        return f"{self.p}:idea:{idea_id}"

    def task(self, task_id: str) -> str:
        return f"{self.p}:task:{task_id}"

    def delivery(self, channel: str, delivery_id: str) -> str:
        # Hashed: delivery ids come from outside and may hold anything.
        return f"{self.p}:delivery:{channel}:{sha256_hex(delivery_id.encode())[:40]}"

    @property
    def ideas(self) -> str:
        return f"{self.p}:ideas"

    @property
    def ideas_pending(self) -> str:
        return f"{self.p}:ideas:pending"

    @property
    def ideas_expiry(self) -> str:
        """Pending ideas by expiry time, so the clock sweep costs O(due)."""
        return f"{self.p}:ideas:expiry"

    @property
    def ideas_unescalated(self) -> str:
        """Pending, not yet escalated ideas by creation time."""
        return f"{self.p}:ideas:unescalated"

    @property
    def tasks(self) -> str:
        return f"{self.p}:tasks"

    @property
    def tasks_open(self) -> str:
        return f"{self.p}:tasks:open"

    @property
    def freeze(self) -> str:
        return f"{self.p}:freeze"

    def lease(self, worker: str, task_id: str) -> str:
        """The broker-signed lease of ``worker``'s run of a task. Under the worker's name, so
        its Redis user can be allowed to read its own leases only (issue 19)."""
        return f"{self.p}:lease:{worker}:{task_id}"

    def beats(self, task_id: str) -> str:
        """The highest heartbeat sequence number the broker accepted, per run of a task (broker
        only): a replayed or out-of-order heartbeat is refused (issue 19)."""
        return f"{self.p}:beats:{task_id}"

    def reports(self, worker: str) -> str:
        """Worker ``worker``'s report stream (the only key it may append to)."""
        return f"{self.p}:reports:{worker}"

    def approver(self, approver_id: str) -> str:
        return f"{self.p}:approver:{approver_id}"

    @property
    def approvers(self) -> str:
        return f"{self.p}:approvers"

    def totp_last_step(self, approver_id: str) -> str:
        return f"{self.p}:totp:last:{approver_id}"

    def totp_failures(self, approver_id: str) -> str:
        return f"{self.p}:totp:fail:{approver_id}"

    def totp_lock(self, approver_id: str) -> str:
        return f"{self.p}:totp:lock:{approver_id}"

    def passkeys(self, approver_id: str) -> str:
        """An approver's registered passkeys: credential id -> MAC'd record."""
        return f"{self.p}:passkeys:{approver_id}"

    def passkey_challenge(self, challenge_id: str) -> str:
        """One outstanding WebAuthn challenge (single use, short TTL)."""
        return f"{self.p}:passkey:challenge:{challenge_id}"

    def console_session(self, session_id: str) -> str:
        """A live console session (its cookie is only valid while this key exists)."""
        return f"{self.p}:console:session:{session_id}"

    def enrol_link(self, token_hash: str) -> str:
        """A one-time approver enrolment link, by the SHA-256 of its token."""
        return f"{self.p}:console:enrol:{token_hash}"

    # -- listing indexes (issue 23) ------------------------------------------------------------
    def index(self, kind: str, facet: str, value: str | None = None) -> str:
        """One listing index: every ``kind`` record (``idea``, ``task``, ``audit``) whose
        ``facet`` is ``value`` (``all`` with no value: every record of the kind). A sorted set
        with every score 0 and members :func:`index_member`, so it is read newest first by
        ``ZREVRANGEBYLEX`` with the last member seen as the cursor. The value is hashed: it may
        come from outside (a requester, an audit subject) and never shapes a key. Written by the
        broker only; readers re-read each record and never take membership as proof."""
        if value is None:
            return f"{self.p}:ix:{kind}:{facet}"
        return f"{self.p}:ix:{kind}:{facet}:{sha256_hex(value.encode())[:32]}"

    @property
    def index_backfill(self) -> str:
        """How far the one-off indexing of records written before the indexes has got."""
        return f"{self.p}:ix:backfill"


#: Digits of an index member's time (microseconds since the epoch; up to the year 2286).
TIME_DIGITS = 16


def index_time(ts: float) -> str:
    """``ts`` (seconds) as an index member's sortable time part."""
    return f"{min(max(int(ts * 1_000_000), 0), 10**TIME_DIGITS - 1):0{TIME_DIGITS}d}"


def index_member(ts: float, ident: str) -> str:
    """An index member: ``<time>|<id>``. Members sort by time, then id, so a member is an exact
    keyset cursor (no two records share one)."""
    return f"{index_time(ts)}|{ident}"


def member_id(member: str) -> str:
    """The record id an index member names ('' when it is not a member of our shape)."""
    when, sep, ident = member.partition("|")
    return ident if sep and len(when) == TIME_DIGITS and when.isdigit() else ""
