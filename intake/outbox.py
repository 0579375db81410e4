"""The outbox: slow follow-ups (Slack cards, thread updates) read from the audit stream.

Every state change already appends its audit event in the same MULTI as the change, so the audit
stream *is* a transactional outbox: nothing can change without its follow-up being durably
queued. A Redis consumer group reads it at least once:

- new events arrive with ``XREADGROUP >``;
- an event whose delivery failed, or whose consumer crashed before ``XACK``, stays pending and is
  re-claimed with ``XAUTOCLAIM`` once idle for ``retry_ms`` (by this or any other consumer);
- after ``max_deliveries`` tries it is acknowledged, dropped and audited.

Entries are MAC-checked before use, so an event written straight into Redis is never acted on.
Handlers must be idempotent (they act on the subject's *current* state).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass

import redis

from intake.audit import AuditLog
from intake.models import AuditEvent

log = logging.getLogger("intake.outbox")


@dataclass(frozen=True)
class Delivery:
    id: str
    event: AuditEvent


class Outbox:
    """One consumer of the audit stream in consumer group ``group``."""

    def __init__(
        self,
        audit: AuditLog,
        group: str,
        *,
        consumer: str | None = None,
        retry_ms: int = 5000,
        max_deliveries: int = 20,
    ) -> None:
        self.audit = audit
        self.r = audit.r
        self.group = group
        # Unique per process: two brokers on one host must not share (and double-deliver) a PEL.
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.retry_ms = retry_ms
        self.max_deliveries = max_deliveries

    def ensure_group(self) -> None:
        """Create the group at the start of the stream (handlers skip what is already done)."""
        try:
            self.r.xgroup_create(self.audit.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _parse(self, entries: list[tuple[str, dict[str, str]]]) -> list[Delivery]:
        out = []
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream while pending
                self.r.xack(self.audit.stream, self.group, entry_id)
                continue
            event = self.audit.parse_entry(fields)
            if event is None:
                log.warning("outbox: ignoring event %s with a bad MAC", entry_id)
                self.r.xack(self.audit.stream, self.group, entry_id)
                continue
            out.append(Delivery(entry_id, event.model_copy(update={"id": entry_id})))
        return out

    def attempts(self, delivery: Delivery) -> int:
        """How many times the group has handed this event out (looked up only on failure)."""
        info = self.r.xpending_range(self.audit.stream, self.group, min=delivery.id, max=delivery.id, count=1)
        return int(info[0]["times_delivered"]) if info else 1

    def fetch(self, count: int = 50, block_ms: int = 1000) -> list[Delivery]:
        """Stale pending deliveries first, then new events (blocking up to ``block_ms``)."""
        claimed = self.r.xautoclaim(
            self.audit.stream, self.group, self.consumer, self.retry_ms, start_id="0-0", count=count
        )
        stale = self._parse(claimed[1])
        if stale:
            return stale
        fresh = self.r.xreadgroup(
            self.group, self.consumer, {self.audit.stream: ">"}, count=count, block=block_ms
        )
        return self._parse(fresh[0][1]) if fresh else []

    def ack(self, delivery: Delivery) -> None:
        self.r.xack(self.audit.stream, self.group, delivery.id)

    def failed(self, delivery: Delivery, error: str) -> None:
        """Leave it pending for a retry, or give up after ``max_deliveries`` (audited)."""
        if self.attempts(delivery) < self.max_deliveries:
            return
        self.ack(delivery)
        self.audit.record(
            "system", "outbox.dropped", delivery.event.subject,
            group=self.group, event=delivery.id, event_action=delivery.event.action, error=error,
        )
