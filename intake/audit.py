"""The tamper-evident audit log: a Redis stream, MAC'd per event and sealed as a hash chain.

Appending is one ``XADD`` inside the same MULTI as the state change it records, so concurrent
writers never contend on a shared key. Each entry carries ``e`` (canonical JSON) and ``m``
(HMAC of ``e``). Sealing happens right after, in stream order:

    seal_n = HMAC(key, "seal|" + seal_{n-1} + "|" + n + "|" + stream id + "|" + m_n)

Seals live in a hash beside the stream and ``head`` names the last sealed event. Sealing is
deterministic, so racing sealers compute identical values; a compare-and-set on ``head`` lets one
of them publish and the others simply read further (no retry storm). The HMAC key lives in a file,
never in Redis: whoever can write Redis cannot forge a seal, and :meth:`AuditLog.verify` names the
first event that was edited, deleted, inserted or reordered.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from intake.errors import AuditBroken
from intake.models import AuditEvent, canonical_json

log = logging.getLogger("intake.audit")

GENESIS = "0" * 64
_PAGE = 500

# Publish a batch of seals only if nobody advanced the head meanwhile.
_CAS_SEALS = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Head:
    id: str
    seq: int
    seal: str

    def encode(self) -> str:
        return f"{self.id} {self.seq} {self.seal}"

    @classmethod
    def decode(cls, raw: str | None) -> Head | None:
        if not raw:
            return None
        ident, seq, seal = raw.split(" ")
        return cls(ident, int(seq), seal)


@dataclass(frozen=True)
class VerifyReport:
    events: int
    unsealed: int


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, n = stream_id.partition("-")
    return int(ms), int(n or 0)


class AuditLog:
    """Append, seal, verify and export the audit stream under ``prefix``."""

    def __init__(self, client: redis.Redis, key: bytes, prefix: str) -> None:
        self.r = client
        self._key = key
        self.stream = f"{prefix}:audit"
        self.seals = f"{prefix}:audit:seals"
        self.head = f"{prefix}:audit:head"
        self._cas = client.register_script(_CAS_SEALS)
        self._wake = threading.Event()
        self._sealer: threading.Thread | None = None
        self._stopping = False

    # -- hashing ---------------------------------------------------------------------------
    def _mac(self, body: str) -> str:
        return hmac.new(self._key, b"event|" + body.encode(), hashlib.sha256).hexdigest()

    def _seal(self, prev: str, seq: int, stream_id: str, mac: str) -> str:
        msg = f"seal|{prev}|{seq}|{stream_id}|{mac}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    # -- writing ---------------------------------------------------------------------------
    def seal_fields(self, event: AuditEvent) -> tuple[str, str]:
        """The stream entry's ``e`` (canonical JSON) and ``m`` (its MAC) for ``event``."""
        body = canonical_json(event.model_dump(mode="json", exclude={"id", "seq"})).decode()
        return body, self._mac(body)

    def append(self, pipe: redis.client.Pipeline, event: AuditEvent) -> None:
        """Queue the event on ``pipe`` (a MULTI pipeline); it commits with the state change."""
        body, mac = self.seal_fields(event)
        pipe.xadd(self.stream, {"e": body, "m": mac})

    def record(self, actor: str, action: str, subject: str, **data: Any) -> None:
        """Append one event on its own (no state change) and seal it."""
        pipe = self.r.pipeline(transaction=True)
        self.append(pipe, event(actor, action, subject, **data))
        pipe.execute()
        self.kick()

    def kick(self) -> None:
        """Seal what was just appended: at once, or by the background sealer when one runs
        (a long-running server, where a burst of appends then costs one sealing batch)."""
        if self._sealer is not None:
            self._wake.set()
        else:
            self.seal_pending()

    def start_sealer(self, idle_s: float = 1.0, gather_s: float = 0.05) -> None:
        """Run one sealing thread for this process until :meth:`stop_sealer`. After a kick it
        waits ``gather_s`` so a burst of appends is sealed as one batch."""

        def loop() -> None:
            while not self._stopping:
                if self._wake.wait(idle_s) and not self._stopping:
                    time.sleep(gather_s)
                self._wake.clear()
                try:
                    self.seal_pending()
                except Exception as exc:  # Redis hiccup: the next round picks up where it left
                    log.warning("sealing failed: %s", type(exc).__name__)

        self._stopping = False
        self._sealer = threading.Thread(target=loop, name="audit-sealer", daemon=True)
        self._sealer.start()

    def stop_sealer(self) -> None:
        """Stop the sealing thread, then seal whatever is left."""
        if self._sealer is None:
            return
        self._stopping = True
        self._wake.set()
        self._sealer.join(timeout=10)
        self._sealer = None
        self.seal_pending()

    def seal_pending(self, max_rounds: int = 1000) -> int:
        """Seal every unsealed event in stream order. Returns how many this call published."""
        published = 0
        for _ in range(max_rounds):
            raw_head = self.r.get(self.head) or ""
            head = Head.decode(raw_head)
            start = f"({head.id}" if head else "-"
            entries = self.r.xrange(self.stream, start, "+", count=_PAGE)
            if not entries:
                return published
            prev, seq = (head.seal, head.seq) if head else (GENESIS, 0)
            args: list[str] = []
            last = head
            for stream_id, fields in entries:
                seq += 1
                prev = self._seal(prev, seq, stream_id, fields.get("m", ""))
                args += [stream_id, f"{seq} {prev}"]
                last = Head(stream_id, seq, prev)
            assert last is not None
            if self._cas(keys=[self.head, self.seals], args=[raw_head, last.encode(), *args]):
                published += len(entries)
        return published

    # -- reading ---------------------------------------------------------------------------
    def parse_entry(self, fields: dict[str, str]) -> AuditEvent | None:
        """The event in a stream entry, or None when its MAC does not check out."""
        body, mac = fields.get("e", ""), fields.get("m", "")
        if not hmac.compare_digest(self._mac(body), mac):
            return None
        return AuditEvent.model_validate_json(body)

    def _entries(self) -> Iterator[tuple[str, dict[str, str], str | None]]:
        """Every (stream id, fields, stored seal) in order, a page and one HMGET at a time."""
        start = "-"
        while True:
            batch = self.r.xrange(self.stream, start, "+", count=_PAGE)
            if batch:
                seals = self.r.hmget(self.seals, [stream_id for stream_id, _ in batch])
                for (stream_id, fields), seal in zip(batch, seals, strict=True):
                    yield stream_id, fields, seal
            if len(batch) < _PAGE:
                return
            start = f"({batch[-1][0]}"

    def verify(self) -> VerifyReport:
        """Walk the whole chain; raise :class:`AuditBroken` naming the first bad event."""
        head = Head.decode(self.r.get(self.head))
        prev, seq, unsealed = GENESIS, 0, 0
        last: Head | None = None
        for stream_id, fields, stored in self._entries():
            body, mac = fields.get("e", ""), fields.get("m", "")
            if not hmac.compare_digest(self._mac(body), mac):
                raise AuditBroken(stream_id, f"event {stream_id}: contents altered (MAC mismatch)")
            if stored is None:
                if head is None or _id_key(stream_id) > _id_key(head.id):
                    unsealed += 1
                    continue
                raise AuditBroken(stream_id, f"event {stream_id}: no seal; inserted into sealed history")
            if unsealed:
                raise AuditBroken(stream_id, f"event {stream_id}: sealed after unsealed events")
            stored_seq, stored_seal = stored.split(" ")
            seq += 1
            if int(stored_seq) > seq:
                raise AuditBroken(
                    stream_id, f"event {stream_id}: sealed event #{seq} before it is missing (deleted)"
                )
            if int(stored_seq) < seq or not hmac.compare_digest(
                self._seal(prev, seq, stream_id, mac), stored_seal
            ):
                raise AuditBroken(
                    stream_id, f"event {stream_id} (#{seq}): seal mismatch; history was reordered or altered"
                )
            prev = stored_seal
            last = Head(stream_id, seq, stored_seal)
        if head is not None and head != last:
            raise AuditBroken(
                head.id, f"event {head.id} (#{head.seq}): last sealed event is missing (log truncated)"
            )
        return VerifyReport(events=seq + unsealed, unsealed=unsealed)

    def export(self) -> Iterator[dict[str, Any]]:
        """Every event as a dict (JSON Lines material), with its stream id, seq and seal."""
        for stream_id, fields, stored in self._entries():
            record = json.loads(fields.get("e", "{}"))
            seq, seal = stored.split(" ") if stored else (None, None)
            yield {"id": stream_id, "seq": int(seq) if seq else None, "seal": seal, **record}


def event(actor: str, action: str, subject: str, *, at: float | None = None, **data: Any) -> AuditEvent:
    """Build an audit event (stamped now unless ``at``). ``data`` holds ids and outcomes, never secrets."""
    return AuditEvent(
        at=time.time() if at is None else at, actor=actor, action=action, subject=subject, data=data
    )
