"""The tamper-evident audit log: a Redis stream, MAC'd per event and sealed as a hash chain.

Appending is one ``XADD`` inside the same MULTI as the state change it records, so concurrent
writers never contend on a shared key. Each entry carries ``e`` (canonical JSON) and ``m``
(HMAC of ``e``). Sealing happens right after, in stream order:

    seal_n = HMAC(key, "seal|" + seal_{n-1} + "|" + n + "|" + stream id + "|" + m_n)

Seals live in a hash beside the stream and ``head`` names the last sealed event. Sealing is
deterministic, so racing sealers compute identical values; a compare-and-set on ``head`` lets one
of them publish and the others simply read further (no retry storm). The HMAC key lives in a file,
never in Redis: whoever can write Redis cannot forge a seal, and :meth:`AuditLog.verify` names the
first event that was edited, deleted, inserted, reordered or replayed (every event carries a
unique ``eid``).

Agent workers write their own events (a task running, succeeded, …) but never hold the audit
key: they MAC with a *worker-events* key derived from it (:func:`worker_events_key`, its own key
file), mark those entries ``k=w``, and never seal. The broker derives the same key to check them.
A compromised worker can therefore not forge broker events or seals.

Redis could still be rolled back wholesale (head, seals and stream together) to an earlier,
validly sealed state. A checkpoint file beside the keys records the newest head this host
published; ``verify`` fails if Redis is behind it, and the sealer refuses to seal on top of a head
that went backwards (or vanished), instead of re-sealing a shortened history.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from intake.errors import AuditBroken
from intake.models import AuditEvent, canonical_json

log = logging.getLogger("intake.audit")


def worker_events_key(audit_key: bytes) -> bytes:
    """The key workers MAC their events with, derived one-way from the audit key."""
    return hmac.new(audit_key, b"intake-worker-events-v1", hashlib.sha256).digest()

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
        """Parse a stored head; a malformed one is reported as broken history, not a crash."""
        if not raw:
            return None
        try:
            ident, seq, seal = raw.split(" ")
            _id_key(ident)
            return cls(ident, int(seq), seal)
        except ValueError:
            raise AuditBroken("head", "the audit head is malformed; history was tampered with") from None


@dataclass(frozen=True)
class VerifyReport:
    events: int
    unsealed: int


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, n = stream_id.partition("-")
    return int(ms), int(n or 0)


class AuditLog:
    """Append, seal, verify and export the audit stream under ``prefix``."""

    def __init__(
        self, client: redis.Redis, key: bytes, prefix: str, *, checkpoint: Path | None = None, worker: bool = False
    ) -> None:
        """``key`` is the audit key, or for ``worker=True`` the worker-events key: a worker's
        log can append (MAC'd as a worker event) but not seal, verify or MAC records."""
        self.r = client
        self.checkpoint = checkpoint
        self.worker = worker
        self._key = b"" if worker else key
        self._worker_key = key if worker else worker_events_key(key)
        # A separate key for record MACs, derived from the audit key (one secret per purpose).
        self._record_key = b"" if worker else hmac.new(key, b"intake-record-mac-v1", hashlib.sha256).digest()
        self.stream = f"{prefix}:audit"
        self.seals = f"{prefix}:audit:seals"
        self.head = f"{prefix}:audit:head"
        self._cas = client.register_script(_CAS_SEALS)
        self._wake = threading.Event()
        self._sealer: threading.Thread | None = None
        self._stopping = False

    # -- hashing ---------------------------------------------------------------------------
    def record_mac(self, kind: str, fields: dict[str, Any]) -> str:
        """MAC over a record's immutable fields, so a record forged or edited in Redis is
        recognised. ``kind`` separates record types (an approval MAC is never an idea MAC)."""
        if self.worker:
            raise PermissionError("a worker's audit log cannot MAC records")
        msg = kind.encode() + b"|" + canonical_json(fields)
        return hmac.new(self._record_key, msg, hashlib.sha256).hexdigest()

    def record_ok(self, kind: str, fields: dict[str, Any], mac: str) -> bool:
        return bool(mac) and hmac.compare_digest(self.record_mac(kind, fields), mac)

    def _mac(self, body: str, key: bytes | None = None) -> str:
        return hmac.new(self._key if key is None else key, b"event|" + body.encode(), hashlib.sha256).hexdigest()

    def _entry_ok(self, fields: dict[str, str]) -> bool:
        """An entry's MAC holds under the key its kind says (broker events or worker events)."""
        key = self._worker_key if fields.get("k") == "w" else self._key
        return bool(key) and hmac.compare_digest(self._mac(fields.get("e", ""), key), fields.get("m", ""))

    def _seal(self, prev: str, seq: int, stream_id: str, mac: str) -> str:
        msg = f"seal|{prev}|{seq}|{stream_id}|{mac}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    # -- the checkpoint outside Redis ------------------------------------------------------
    def _read_checkpoint(self) -> Head | None:
        if self.checkpoint is None:
            return None
        try:
            return Head.decode(self.checkpoint.read_text().strip())
        except FileNotFoundError:
            return None

    def _write_checkpoint(self, head: Head) -> None:
        """Record ``head`` if it is newer than the checkpoint (under a lock: CLI and server share it)."""
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        with open(self.checkpoint.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self._read_checkpoint()
            if current is not None and current.seq >= head.seq:
                return
            tmp = self.checkpoint.with_name(f".{self.checkpoint.name}.{secrets.token_hex(4)}")
            tmp.write_text(head.encode() + "\n")
            os.replace(tmp, self.checkpoint)

    @staticmethod
    def _check_not_behind(head: Head | None, mark: Head | None, where: Path | None) -> None:
        """``mark`` must have been read *before* ``head``: a checkpoint is written only after its
        head was published, so a head read later can only be equal or newer."""
        if mark is not None and (head is None or head.seq < mark.seq):
            raise AuditBroken(
                mark.id, f"event {mark.id} (#{mark.seq}): sealed history in Redis is behind the "
                f"checkpoint (#{head.seq if head else 0}); it was truncated or rolled back "
                f"(if Redis was reset on purpose, move {where} aside)",
            )

    # -- writing ---------------------------------------------------------------------------
    def seal_fields(self, event: AuditEvent) -> tuple[str, str]:
        """The stream entry's ``e`` (canonical JSON) and ``m`` (its MAC) for a broker event."""
        if self.worker:
            raise PermissionError("a worker's audit log writes worker events only")
        body = canonical_json(event.model_dump(mode="json", exclude={"id", "seq"})).decode()
        return body, self._mac(body)

    def append(self, pipe: redis.client.Pipeline, event: AuditEvent) -> None:
        """Queue the event on ``pipe`` (a MULTI pipeline); it commits with the state change."""
        body = canonical_json(event.model_dump(mode="json", exclude={"id", "seq"})).decode()
        if self.worker:
            pipe.xadd(self.stream, {"e": body, "m": self._mac(body, self._worker_key), "k": "w"})
        else:
            pipe.xadd(self.stream, {"e": body, "m": self._mac(body)})

    def record(self, actor: str, action: str, subject: str, **data: Any) -> None:
        """Append one event on its own (no state change) and seal it."""
        pipe = self.r.pipeline(transaction=True)
        self.append(pipe, event(actor, action, subject, **data))
        pipe.execute()
        self.kick()

    def kick(self) -> None:
        """Seal what was just appended: at once, or by the background sealer when one runs
        (a long-running server, where a burst of appends then costs one sealing batch).
        A worker never seals: the broker's sweep seals its events within seconds."""
        if self.worker:
            return
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
        if self.worker:
            return 0
        published = 0
        for _ in range(max_rounds):
            mark = self._read_checkpoint()
            raw_head = self.r.get(self.head) or ""
            head = Head.decode(raw_head)
            self._check_not_behind(head, mark, self.checkpoint)  # never seal a shortened history
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
                self._write_checkpoint(last)
        return published

    # -- reading ---------------------------------------------------------------------------
    def parse_entry(self, fields: dict[str, str]) -> AuditEvent | None:
        """The event in a stream entry, or None when its MAC does not check out."""
        if not self._entry_ok(fields):
            return None
        return AuditEvent.model_validate_json(fields.get("e", ""))

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
        mark = self._read_checkpoint()
        head = Head.decode(self.r.get(self.head))
        self._check_not_behind(head, mark, self.checkpoint)
        prev, seq, unsealed = GENESIS, 0, 0
        last: Head | None = None
        seen: set[str] = set()
        for stream_id, fields, stored in self._entries():
            body, mac = fields.get("e", ""), fields.get("m", "")
            if not self._entry_ok(fields):
                raise AuditBroken(stream_id, f"event {stream_id}: contents altered (MAC mismatch)")
            eid = json.loads(body).get("eid", "")
            if eid in seen:
                raise AuditBroken(stream_id, f"event {stream_id}: a replayed copy of an earlier event")
            seen.add(eid)
            if stored is None:
                if head is None or _id_key(stream_id) > _id_key(head.id):
                    unsealed += 1
                    continue
                raise AuditBroken(stream_id, f"event {stream_id}: no seal; inserted into sealed history")
            if unsealed:
                raise AuditBroken(stream_id, f"event {stream_id}: sealed after unsealed events")
            try:
                stored_seq, stored_seal = stored.split(" ")
                int(stored_seq)
            except ValueError:
                raise AuditBroken(stream_id, f"event {stream_id}: its seal is malformed") from None
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
            if mark is not None and seq == mark.seq and last != mark:
                raise AuditBroken(stream_id, f"event {stream_id} (#{seq}): differs from the checkpoint")
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
        at=time.time() if at is None else at, actor=actor, action=action, subject=subject, data=data,
        eid=secrets.token_hex(8),
    )
