"""The tamper-evident audit log: a Redis stream, MAC'd per event and sealed as a hash chain.

Appending is one ``XADD`` inside the same MULTI as the state change it records, so concurrent
writers never contend on a shared key. Each entry carries ``e`` (canonical JSON) and ``m``
(HMAC of ``e``). Sealing happens right after, in stream order, and records a **verdict** for each
entry (:meth:`AuditLog.judge`):

    seal_n = HMAC(key, "seal|" + seal_{n-1} + "|" + n + "|" + stream id + "|" + m_n + "|" + verdict_n)

The verdict is ``ok`` only for an entry whose MAC holds under the key its kind names *and* whose
actor that key may speak for: the broker key for broker, system and people's actions; a worker's
own report key (entries marked ``k=w``, copied in by the broker as evidence) for that worker's
report actions only. Anything else (an unsigned ``XADD``, garbage, a worker-key
``approval.recorded``) is sealed as ``rejected:<why>``: it stays on the record, in order, but
nothing ever treats it as genuine (the ledger, the outbox and exports all look at the verdict).

Seals live in a hash beside the stream and ``head`` names the last sealed event. Exactly one
process per Redis seals at a time: the holder of the sealer lease (:mod:`intake.audit.sealer`),
whose every seal write is fenced (refused unless its token is still current) and is also a
compare-and-set on ``head``. Every other process that needs its appends sealed waits for the head
to move, or takes the lease when it is free. The HMAC key lives in a file, never in Redis:
whoever can write Redis cannot forge a seal, and :meth:`AuditLog.verify` lists every event that
was edited, deleted, inserted, reordered, replayed or rejected (every event carries a unique
``eid``).

Redis could still be rolled back wholesale (head, seals and stream together) to an earlier,
validly sealed state. A checkpoint file beside the keys records the newest head this host
published; ``verify`` fails if Redis is behind it, and the sealer refuses to seal on top of a head
that went backwards (or vanished), until an operator accepts the loss
(:meth:`AuditLog.accept_rollback`, a sealed marker naming the lost range).
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from intake.audit.archive import Archive, ArchiveBroken, TreeHead
from intake.audit.index import entry_facets, entry_member
from intake.audit.sealer import RENEW_S, LeaseLost, SealerLease
from intake.core.errors import AuditBroken
from intake.core.models import AuditEvent, canonical_json
from intake.protocol.keyspace import Keys
from intake.protocol.reports import REPORT_ACTIONS, report_mac

log = logging.getLogger("intake.audit.log")

GENESIS = "0" * 64
_PAGE = 500
OK = "ok"
#: The verdict for a verbatim copy of an earlier genuine entry (same ``eid``/``rid``): its MAC
#: holds, but it is not a new event. Sealed, kept in order, and never applied: a Redis writer
#: replaying history gets a rejected entry, not a halted broker (issue 19).
REPLAY = "rejected:replay"
#: The verdict for a genuine entry stamped before the archive's boundary (see
#: :meth:`AuditLog.archive_boundary`): the replay index holds the hot window only, so a copy of
#: an archived entry is recognised by its time, not its uid. Sealed, kept, never applied.
STALE = "rejected:stale"

#: What a worker may say, on its own report key; everything else is the broker's to say.
# Publish a batch of seals only while the caller holds the sealer lease with a current fencing
# token (-1 otherwise: a paused old holder cannot seal) and nobody advanced the head meanwhile
# (0). A publish renews the lease, so a long catch-up never outlives it. ARGV[6] is how many
# (stream id, seal) pairs follow and ARGV[7] how many (unique id, stream id) pairs for the index
# of genuine entries the sealer uses to recognise replays; after them come (index key, member)
# pairs: the console's listing indexes of the genuine entries (intake.audit.index).
_FENCED_SEALS = """
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return -1 end
if redis.call('GET', KEYS[4]) ~= ARGV[4] then return -1 end
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[6])
local u = tonumber(ARGV[7])
for i = 8, 7 + n * 2, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
for i = 8 + n * 2, 7 + (n + u) * 2, 2 do redis.call('HSET', KEYS[5], ARGV[i], ARGV[i + 1]) end
for i = 8 + (n + u) * 2, #ARGV, 2 do redis.call('ZADD', ARGV[i], 0, ARGV[i + 1]) end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
return 1
"""


# Store a ledger snapshot only if it is newer than the one stored (several brokers share it).
_STORE_SNAPSHOT = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if cur >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'body', ARGV[2], 'mac', ARGV[3])
return 1
"""


def worker_report_key(audit_key: bytes, worker: str, generation: int) -> bytes:
    """The key worker ``worker`` MACs its reports with, at key generation ``generation``:
    derived one-way from the audit key, so the broker never stores it and a worker holding its
    own key learns nothing about the audit key or any other worker's key."""
    return hmac.new(audit_key, f"intake-worker-report-v1|{worker}|{generation}".encode(), hashlib.sha256).digest()


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
class Anomaly:
    """One thing :meth:`AuditLog.verify` found. ``fatal`` anomalies mean sealed history was
    changed; a ``rejected`` entry is junk that was correctly sealed as not genuine."""

    id: str
    kind: str
    message: str
    seq: int | None = None

    @property
    def fatal(self) -> bool:
        # A replayed copy of a genuine entry is not a break in sealed history: it is skipped
        # (sealed ``rejected:replay``, or, if the sealer's index was tampered with, recognised
        # by its ``eid`` when read). Only an edit, deletion, insertion, reorder or rollback halts.
        return self.kind not in ("rejected", "replayed")

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "seq": self.seq, "kind": self.kind, "fatal": self.fatal, "message": self.message}


@dataclass(frozen=True)
class VerifyReport:
    events: int
    unsealed: int
    anomalies: tuple[Anomaly, ...] = ()

    @property
    def rejected(self) -> int:
        return sum(1 for a in self.anomalies if a.kind == "rejected")


@dataclass(frozen=True)
class SealedEntry:
    """One sealed stream entry as the chain vouches for it (see :meth:`AuditLog.follow`)."""

    id: str
    seq: int
    verdict: str
    event: AuditEvent | None  # set when the verdict is ok and the entry is a broker event
    fields: dict[str, str] = field(repr=False, default_factory=dict)
    seal: str = ""  # its seal on the chain (the Merkle leaf names it: intake.audit.archive.entry_line)


def entry_uid(fields: dict[str, str]) -> str:
    """The unique id an entry carries (a broker event's ``eid``, a worker report's ``rid``), or
    ``""``. Two entries with one uid are one event twice: the later is a replay."""
    try:
        data = json.loads(fields.get("e", ""))
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    uid = data.get("rid" if fields.get("k") == "w" else "eid")
    return uid if isinstance(uid, str) else ""


def _stamped(fields: dict[str, str]) -> float:
    """The ``at`` inside an entry's MAC'd body (a broker event's or a worker report's)."""
    try:
        at = json.loads(fields.get("e", "")).get("at")
    except (ValueError, AttributeError):
        return float("inf")
    return float(at) if isinstance(at, int | float) and not isinstance(at, bool) else float("inf")


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, n = stream_id.partition("-")
    return int(ms), int(n or 0)


def _split_seal(stored: str) -> tuple[int, str, str]:
    """``"seq seal verdict"`` → parts; ValueError when malformed."""
    seq, seal, verdict = stored.split(" ")
    if not verdict:
        raise ValueError("no verdict")
    return int(seq), seal, verdict


class AuditLog:
    """Append, seal, verify, follow and export the audit stream under ``prefix``. Broker only:
    it holds the audit key (workers report through :mod:`intake.tasks.worker_reports` instead)."""

    def __init__(self, client: redis.Redis, key: bytes, prefix: str, *, checkpoint: Path | None = None,
                 archive: Archive | None = None, hot_s: float | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.r = client
        #: Sealed history moved out of Redis (:mod:`intake.audit.archive`); the chain walks it first.
        self.archive = archive
        #: The hot window (``INTAKE_AUDIT_HOT``): half of it is the clock skew the stale rule
        #: tolerates (:meth:`archive_boundary`); None: no tolerance.
        self.hot_s = hot_s
        self._boundary: tuple[float, float | None] = (-1e18, None)  # (checked at, monotonic; boundary)
        self.checkpoint = checkpoint
        self.clock = clock  # stamps :meth:`record`'s events (a test's clock); None: the time
        self._key = key
        # A separate key for record MACs, derived from the audit key (one secret per purpose).
        self._record_key = hmac.new(key, b"intake-record-mac-v1", hashlib.sha256).digest()
        self.stream = f"{prefix}:audit"
        self.keys = Keys(prefix)
        self.seals = f"{prefix}:audit:seals"
        self.head = f"{prefix}:audit:head"
        # uid -> stream id of the first genuine entry with it: the sealer's replay index. Only a
        # hint: a hit counts only when that earlier entry is there and judges ok with the same
        # uid (so a planted uid cannot get a fresh genuine event sealed as a replay), and a
        # deleted hint only lets a replay be sealed ok, which every reader skips by its uid.
        # It holds the hot window only: archiving an entry drops its uid with it, and a copy of
        # an archived entry is sealed STALE by its time instead (see archive_boundary).
        self.uids = f"{prefix}:audit:uids"
        self.snapshot = f"{prefix}:audit:snapshot"
        self._cas = client.register_script(_FENCED_SEALS)
        self._store_snapshot = client.register_script(_STORE_SNAPSHOT)
        # One secret per purpose: ledger snapshots are MAC'd with their own derived key.
        self._snapshot_key = hmac.new(key, b"intake-ledger-snapshot-v1", hashlib.sha256).digest()
        self.lease = SealerLease(client, prefix)
        self._wake = threading.Event()
        self._sealer: threading.Thread | None = None
        # An edge serve appends but never seals on its own appends: the full serves do.
        self.sealed_elsewhere = False
        self._stopping = False
        self._worker_keys: dict[tuple[str, int], bytes] = {}
        #: Told about each Redis fault the sealer thread meets (a server's outage tracker), so
        #: an outage is logged once per process; None: the sealer logs it once itself.
        self.on_fault: Callable[[BaseException, str], None] | None = None

    # -- hashing ---------------------------------------------------------------------------
    def record_mac(self, kind: str, fields: dict[str, Any]) -> str:
        """MAC over a record's immutable fields, so a record forged or edited in Redis is
        recognised. ``kind`` separates record types (an approval MAC is never an idea MAC)."""
        msg = kind.encode() + b"|" + canonical_json(fields)
        return hmac.new(self._record_key, msg, hashlib.sha256).hexdigest()

    def record_ok(self, kind: str, fields: dict[str, Any], mac: str) -> bool:
        return bool(mac) and hmac.compare_digest(self.record_mac(kind, fields), mac)

    def worker_key(self, worker: str, generation: int) -> bytes:
        found = self._worker_keys.get((worker, generation))
        if found is None:
            found = self._worker_keys[(worker, generation)] = worker_report_key(self._key, worker, generation)
        return found

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, b"event|" + body.encode(), hashlib.sha256).hexdigest()

    def _seal(self, prev: str, seq: int, stream_id: str, mac: str, verdict: str) -> str:
        msg = f"seal|{prev}|{seq}|{stream_id}|{mac}|{verdict}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def judge(self, fields: dict[str, str]) -> str:
        """The verdict for a stream entry: ``ok``, or ``rejected:<why>`` (see the module doc).

        Pure over the entry's fields and the keys, so the sealer, the verifier, the ledger and
        the outbox always agree."""
        body, mac = fields.get("e"), fields.get("m")
        if not isinstance(body, str) or not isinstance(mac, str) or not mac:
            return "rejected:malformed"
        kind = fields.get("k")
        if set(fields) - {"e", "m", "k"} or kind not in (None, "w"):
            return "rejected:malformed"
        try:
            data = json.loads(body)
        except ValueError:
            return "rejected:malformed"
        if not isinstance(data, dict):
            return "rejected:malformed"
        if kind == "w":
            worker, gen = data.get("w"), data.get("g")
            if not isinstance(worker, str) or not isinstance(gen, int) or isinstance(gen, bool):
                return "rejected:malformed"
            if not hmac.compare_digest(report_mac(self.worker_key(worker, gen), body), mac):
                return "rejected:bad_mac"
            if data.get("action") not in REPORT_ACTIONS:
                return "rejected:not_a_report_action"
            return OK
        if not hmac.compare_digest(self._mac(body), mac):
            return "rejected:bad_mac"
        try:
            event = AuditEvent.model_validate(data)
        except ValidationError:
            return "rejected:malformed"
        if event.actor.startswith("worker:") or event.action in REPORT_ACTIONS:
            return "rejected:broker_key_for_worker"  # the broker never speaks as a worker
        return OK

    # -- ledger snapshots (see intake.audit.ledger) -----------------------------------------
    def snapshot_mac(self, body: bytes) -> str:
        """The MAC of a ledger snapshot: nobody without the audit key can make one that loads."""
        return hmac.new(self._snapshot_key, b"snapshot|" + body, hashlib.sha256).hexdigest()

    def store_snapshot(self, cursor: Head, body: bytes) -> bool:
        """Store ``body`` (taken at ``cursor``) unless a newer snapshot is stored already."""
        return bool(self._store_snapshot(keys=[self.snapshot], args=[cursor.seq, body, self.snapshot_mac(body)]))

    def load_snapshot(self) -> bytes | None:
        """The stored snapshot when its MAC holds (checked before it is parsed), else None."""
        raw = self.r.hmget(self.snapshot, ["body", "mac"])
        body, mac = raw[0], raw[1]
        if not body or not mac:
            return None
        data = body.encode() if isinstance(body, str) else body
        if not hmac.compare_digest(self.snapshot_mac(data), str(mac)):
            log.warning("ledger snapshot in Redis has a bad MAC; ignored (tampering?)")
            return None
        return data

    def sealed_at(self, mark: Head) -> bool:
        """Whether the sealed entry ``mark`` names is still on the stream with that very seal
        (two reads: the cheap check that history at a known position was not rewritten)."""
        stored = self.r.hget(self.seals, mark.id)
        if not self.r.xrange(self.stream, mark.id, mark.id) or stored is None:
            return False
        try:
            seq, seal, _ = _split_seal(stored)
        except ValueError:
            return False
        return seq == mark.seq and hmac.compare_digest(seal, mark.seal)

    # -- the checkpoint outside Redis ------------------------------------------------------
    def read_checkpoint(self) -> Head | None:
        if self.checkpoint is None:
            return None
        try:
            return Head.decode(self.checkpoint.read_text().strip())
        except FileNotFoundError:
            return None

    def _write_checkpoint(self, head: Head, *, force: bool = False) -> None:
        """Record ``head`` if it is newer than the checkpoint (under a lock: CLI and server share
        it); ``force`` moves it back (an accepted rollback)."""
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        with open(self.checkpoint.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read_checkpoint()
            if current is not None and current.seq >= head.seq and not force:
                return
            tmp = self.checkpoint.with_name(f".{self.checkpoint.name}.{secrets.token_hex(4)}")
            tmp.write_text(head.encode() + "\n")
            os.replace(tmp, self.checkpoint)

    def behind_checkpoint(self) -> str | None:
        """Why sealed history in Redis is behind this host's checkpoint, or None."""
        mark = self.read_checkpoint()
        head = Head.decode(self.r.get(self.head))
        if mark is not None and (head is None or head.seq < mark.seq):
            return (f"sealed history in Redis is behind the checkpoint: it ends at #{head.seq if head else 0}, "
                    f"but this host sealed up to #{mark.seq} (event {mark.id}): events "
                    f"#{(head.seq if head else 0) + 1}..#{mark.seq} were lost (a failover to a lagging "
                    "replica, a restore, or tampering)")
        return None

    def _check_not_behind(self, head: Head | None, mark: Head | None) -> None:
        """``mark`` must have been read *before* ``head``: a checkpoint is written only after its
        head was published, so a head read later can only be equal or newer."""
        if mark is not None and (head is None or head.seq < mark.seq):
            raise AuditBroken(
                mark.id, f"event {mark.id} (#{mark.seq}): sealed history in Redis is behind the "
                f"checkpoint (#{head.seq if head else 0}); it was truncated or rolled back "
                "(if that loss is understood, run `intake audit accept-rollback --reason …`)",
            )

    # -- writing ---------------------------------------------------------------------------
    def seal_fields(self, event: AuditEvent) -> tuple[str, str]:
        """The stream entry's ``e`` (canonical JSON) and ``m`` (its MAC) for a broker event."""
        body = canonical_json(event.model_dump(mode="json", exclude={"id", "seq"})).decode()
        return body, self._mac(body)

    def append(self, pipe: redis.client.Pipeline, event: AuditEvent) -> None:
        """Queue the event on ``pipe`` (a MULTI pipeline); it commits with the state change."""
        body, mac = self.seal_fields(event)
        pipe.xadd(self.stream, {"e": body, "m": mac})

    def append_report(self, pipe: redis.client.Pipeline, fields: dict[str, str]) -> None:
        """Copy a worker's report entry (already checked) onto the log as evidence, verbatim."""
        pipe.xadd(self.stream, {"e": fields["r"], "m": fields["m"], "k": "w"})

    def record(self, actor: str, action: str, subject: str, *, at: float | None = None, **data: Any) -> None:
        """Append one event on its own (no state change) and seal it; stamped ``at``, else by
        the log's clock, else now."""
        if at is None and self.clock is not None:
            at = self.clock()
        pipe = self.r.pipeline(transaction=True)
        self.append(pipe, event(actor, action, subject, at=at, **data))
        pipe.execute()
        self.kick()

    def kick(self) -> None:
        """Seal what was just appended: at once, or by the background sealer when one runs
        (a long-running server, where a burst of appends then costs one sealing batch; the
        lease holder's sealer wakes on the append itself, whichever process made it). An edge
        serve (:attr:`sealed_elsewhere`) leaves it to that holder and never waits for it here."""
        if self._sealer is not None or self.sealed_elsewhere:
            self._wake.set()
            return
        try:
            self.seal_pending()
        except AuditBroken as exc:
            # The change is committed (its event is on the stream); a sealer that refuses to
            # seal on top of broken history is the ledger's and the operator's business, not a
            # reason to report the committed change as failed.
            log.error("sealing stopped: %s", exc)

    def start_sealer(self, idle_s: float = RENEW_S, gather_s: float = 0.05) -> None:
        """Run this process's sealing thread until :meth:`stop_sealer`.

        The thread takes the sealer lease when it is free and renews it while it holds it; the
        holder blocks on the stream (``XREAD`` after the head, at most ``idle_s``), so an append
        by any replica wakes it, then waits ``gather_s`` so a burst is sealed as one batch.
        A non-holder only asks for the lease again every ``idle_s``: when the holder dies, the
        lease expires and one of the others takes over within seconds."""

        def loop() -> None:
            faulty = False
            while not self._stopping:
                try:
                    self._sealer_round(idle_s, gather_s)
                    if faulty and self.on_fault is None:
                        log.info("sealer: Redis answers again")
                    faulty = False
                except AuditBroken as exc:
                    log.error("sealing stopped: %s", exc)
                    self._wake.wait(idle_s)
                except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:  # an outage: noted once
                    if self.on_fault is not None:
                        self.on_fault(exc, "the sealer")
                    elif not faulty:
                        log.warning("sealer: Redis unavailable (%s); retrying", type(exc).__name__)
                    faulty = True
                    self.lease.lost()
                    self._wake.wait(idle_s)

        self._stopping = False
        self._sealer = threading.Thread(target=loop, name="audit-sealer", daemon=True)
        self._sealer.start()

    def _sealer_round(self, idle_s: float, gather_s: float) -> None:
        had = self.lease.token
        if self.lease.acquire() is None:
            if had is not None:
                log.warning("sealer: lease lost to %s; another process seals", self.lease.holder() or "nobody")
            self._wake.wait(idle_s)
            self._wake.clear()
            return
        if had is None:
            log.info("sealer: took the sealer lease (fencing token %s)", self.lease.token)
        head = Head.decode(self.r.get(self.head))
        if not self.r.xread({self.stream: head.id if head else "0-0"}, count=1, block=max(1, int(idle_s * 1000))):
            return
        time.sleep(gather_s)
        self._wake.clear()
        try:
            self._seal_held()
        except LeaseLost:  # fenced off mid-batch (this process was paused): nothing was written
            log.warning("sealer: lease lost to %s; another process seals", self.lease.holder() or "nobody")

    def stop_sealer(self) -> None:
        """Stop the sealing thread and hand the lease back (another replica takes over at once),
        then make sure whatever this process appended is sealed."""
        if self._sealer is None:
            return
        self._stopping = True
        self._wake.set()
        self._sealer.join(timeout=10)
        self._sealer = None
        try:
            self.lease.release()
            self.seal_pending()
        except AuditBroken as exc:
            log.error("sealing stopped: %s", exc)
        except redis.RedisError as exc:
            log.warning("sealer: could not hand back the lease (%s)", type(exc).__name__)

    def seal_pending(self, max_rounds: int = 1000, wait_s: float = 10.0) -> int:
        """Make sure every entry appended before this call is sealed, in stream order, each with
        its verdict. As the lease holder (or when the lease is free: taken for this call) this
        process seals; otherwise it waits until the holder's head passes what is there now,
        taking the lease over if the holder goes away. Returns how many this call published."""
        if self.lease.token is not None:
            try:
                return self._seal_held(max_rounds)
            except LeaseLost:
                pass  # taken over meanwhile: wait for the new holder like anyone else
        last = self.r.xrevrange(self.stream, "+", "-", count=1)
        if not last:
            return 0
        target = _id_key(last[0][0])
        deadline = time.monotonic() + wait_s
        while True:
            mark = self.read_checkpoint()
            head = Head.decode(self.r.get(self.head))
            self._check_not_behind(head, mark)
            if head is not None and _id_key(head.id) >= target:
                return 0
            if self.lease.acquire() is not None:  # free (or ours): seal it ourselves
                try:
                    return self._seal_held(max_rounds)
                except LeaseLost:
                    continue
                finally:
                    if self._sealer is None:
                        self.lease.release()  # a CLI command seals once and leaves the lease free
            if time.monotonic() > deadline:
                raise AuditBroken(last[0][0], f"the sealer ({self.lease.holder() or 'nobody'}) did not seal "
                                  f"event {last[0][0]} within {wait_s:.0f} s")
            self._wake.wait(0.01)

    def _seal_held(self, max_rounds: int = 1000) -> int:
        """Seal every unsealed entry under the lease this process holds; raises
        :class:`LeaseLost` when a fenced write is refused."""
        published = 0
        for _ in range(max_rounds):
            token = self.lease.token
            if token is None:
                raise LeaseLost()
            lease_value = self.lease.value
            mark = self.read_checkpoint()
            raw_head = self.r.get(self.head) or ""
            head = Head.decode(raw_head)
            self._check_not_behind(head, mark)  # never seal a shortened history
            start = f"({head.id}" if head else "-"
            entries = self.r.xrange(self.stream, start, "+", count=_PAGE)
            if not entries:
                return published
            prev, seq = (head.seal, head.seq) if head else (GENESIS, 0)
            args: list[str] = []
            verdicts = self._verdicts(entries)
            uid_args: list[str] = []
            index_args: list[str] = []
            last = head
            for stream_id, fields in entries:
                seq += 1
                verdict, uid = verdicts[stream_id]
                if verdict == OK and uid:
                    uid_args += [uid, stream_id]
                if verdict == OK:
                    member = entry_member(stream_id)
                    for key in sorted(entry_facets(self.keys, fields)):
                        index_args += [key, member]
                if verdict != OK:
                    log.warning("audit entry %s sealed as %s", stream_id, verdict)
                prev = self._seal(prev, seq, stream_id, fields.get("m", ""), verdict)
                args += [stream_id, f"{seq} {prev} {verdict}"]
                last = Head(stream_id, seq, prev)
            assert last is not None
            done = int(self._cas(keys=[self.head, self.seals, self.lease.key, self.lease.fence, self.uids],
                                 args=[raw_head, last.encode(), lease_value, token, self.lease.ttl_ms,
                                       len(args) // 2, len(uid_args) // 2, *args, *uid_args, *index_args]))
            if done < 0:
                self.lease.lost()
                raise LeaseLost()
            if done:
                published += len(entries)
                self._write_checkpoint(last)
        return published

    def _verdicts(self, entries: list[tuple[str, dict[str, str]]]) -> dict[str, tuple[str, str]]:
        """Each entry's verdict and uid for sealing: :meth:`judge`'s, except that a genuine entry
        stamped before :meth:`archive_boundary` is sealed :data:`STALE`, and one whose uid an
        earlier genuine entry carries (in this batch, or per the index, checked against the
        entry it names) is sealed :data:`REPLAY`."""
        judged = {sid: (self.judge(f), entry_uid(f)) for sid, f in entries}
        boundary = self.archive_boundary() if any(v == OK and u for v, u in judged.values()) else None
        if boundary is not None:
            for sid, fields in entries:
                verdict, uid = judged[sid]
                if verdict == OK and uid and _stamped(fields) < boundary:
                    log.warning("audit entry %s is stamped before the archived history; sealed stale", sid)
                    judged[sid] = (STALE, uid)
        uids = [uid for verdict, uid in judged.values() if verdict == OK and uid]
        hints = dict(zip(uids, self.r.hmget(self.uids, uids), strict=True)) if uids else {}
        first: dict[str, str] = {}
        out: dict[str, tuple[str, str]] = {}
        for sid, (verdict, uid) in judged.items():
            if verdict == OK and uid:
                earlier = first.get(uid) or self._genuine_earlier(hints.get(uid), uid, sid)
                if earlier is not None:
                    log.warning("audit entry %s is a replay of %s", sid, earlier)
                    verdict = REPLAY
                else:
                    first[uid] = sid
            out[sid] = (verdict, uid)
        return out

    def archive_boundary(self) -> float | None:
        """The time (seconds) before which a new genuine entry is sealed :data:`STALE`, or None
        while nothing is archived.

        Archived entries' uids leave the replay index, so the sealer cannot recognise a copy of
        one by its uid. It recognises it by its time instead: an entry's ``at`` is inside its
        MAC'd body, so a copy carries the original's, and every archived entry was appended
        before the newest archived entry's stream id (Redis's clock, which no writer sets). The
        boundary is that time plus half the hot window (the skew tolerated between the clock
        that stamped an entry and Redis's): a copy of an archived entry is refused unless its
        original was stamped more than that ahead of Redis. A genuine new entry is refused only
        if it was stamped more than half the hot window before it reached the stream (the
        archive holds entries at least a hot window old). Bounded by the first entry still in
        Redis too, so neither a forged tree head in the archive directory nor a Redis writer
        alone can move it later. Cached for 10 s (:meth:`drop_archived` updates it at once)."""
        if self.archive is None:
            return None
        checked, boundary = self._boundary
        if time.monotonic() - checked < 10:
            return boundary
        boundary = None
        names = self.archive.tree_heads()
        if names:
            try:
                last = TreeHead.decode(self.archive.store.read(names[-1])).last.split(" ")[0]
                boundary = _id_key(last)[0] / 1000
            except (ValueError, KeyError, TypeError, IndexError, OSError):
                log.warning("audit archive: the newest tree head %s is unreadable", names[-1])
        if boundary is not None:
            first = self.r.xrange(self.stream, "-", "+", count=1)
            if first:
                boundary = min(boundary, _id_key(first[0][0])[0] / 1000)
            boundary += (self.hot_s or 0) / 2
        self._boundary = (time.monotonic(), boundary)
        return boundary

    def _genuine_earlier(self, hint: str | None, uid: str, stream_id: str) -> str | None:
        """``hint`` when it names an earlier entry that judges ok and carries ``uid``."""
        if not hint:
            return None
        try:
            if _id_key(hint) >= _id_key(stream_id):
                return None
        except ValueError:
            return None
        found = self.r.xrange(self.stream, hint, hint)
        if not found or self.judge(found[0][1]) != OK or entry_uid(found[0][1]) != uid:
            return None
        return hint

    def accept_rollback(self, *, actor: str, reason: str) -> str | None:
        """The operator accepts that sealed history behind the checkpoint is gone: record a
        sealed marker naming the lost range, move the checkpoint to what Redis holds, seal on.
        Returns the description of what was lost, or None when nothing was behind."""
        lost = self.behind_checkpoint()
        if lost is None:
            return None
        mark = self.read_checkpoint()
        head = Head.decode(self.r.get(self.head))
        assert mark is not None
        if head is None:
            self.checkpoint.unlink(missing_ok=True)  # type: ignore[union-attr]
        else:
            self._write_checkpoint(head, force=True)
        self.record(actor, "audit.rollback_accepted", "audit", reason=reason, lost=lost,
                    lost_from_seq=(head.seq if head else 0) + 1, lost_to_seq=mark.seq, last_lost_id=mark.id)
        return lost

    # -- reading ---------------------------------------------------------------------------
    def parse_entry(self, fields: dict[str, str]) -> AuditEvent | None:
        """The broker event in a stream entry, or None unless it is genuine (verdict ok and
        not a worker report)."""
        if fields.get("k") is not None or self.judge(fields) != OK:
            return None
        return AuditEvent.model_validate_json(fields["e"])

    def _entries(self, start: str = "-") -> Iterator[tuple[str, dict[str, str], str | None]]:
        """Every (stream id, fields, stored seal) in order from ``start`` (exclusive when it
        is ``(id``), a page and one HMGET at a time."""
        while True:
            batch = self.r.xrange(self.stream, start, "+", count=_PAGE)
            if batch:
                seals = self.r.hmget(self.seals, [stream_id for stream_id, _ in batch])
                for (stream_id, fields), seal in zip(batch, seals, strict=True):
                    yield stream_id, fields, seal
            if len(batch) < _PAGE:
                return
            start = f"({batch[-1][0]}"

    def redis_entries(self, start: str = "-") -> Iterator[tuple[str, dict[str, str], str | None]]:
        """The entries still in Redis from ``start``: (stream id, fields, stored seal)."""
        return self._entries(start)

    def check_sealed(self, prev: str, seq: int, stream_id: str, fields: dict[str, str],
                     stored: str | None) -> str | Anomaly:
        """The entry's verdict when its seal chains from ``prev`` at ``seq``, else the anomaly."""
        return self._check_sealed(prev, seq, stream_id, fields, stored)

    def index_entries(self, after: str, batch: int) -> str | None:
        """Add up to ``batch`` sealed genuine entries after stream id ``after`` ('' : from the
        start) to the console's indexes (for entries sealed before the indexes existed; the
        sealer indexes new ones). Idempotent. Returns where to go on, or None at the head."""
        entries = self.r.xrange(self.stream, f"({after}" if after else "-", "+", count=batch)
        if not entries:
            return None
        seals = self.r.hmget(self.seals, [stream_id for stream_id, _ in entries])
        pipe = self.r.pipeline(transaction=True)
        for (stream_id, fields), stored in zip(entries, seals, strict=True):
            if stored is not None and stored.endswith(f" {OK}") and self.judge(fields) == OK:
                for key in entry_facets(self.keys, fields):
                    pipe.zadd(key, {entry_member(stream_id): 0})
        pipe.execute()
        return entries[-1][0] if len(entries) == batch else None

    def archived_through(self) -> int:
        """The last sealed position moved to the archive (0: none)."""
        if self.archive is None:
            return 0
        segments = self.archive.segments()
        return segments[-1][1] if segments else 0

    def drop_archived(self, tail: Head) -> int:
        """Remove archived entries (up to and including ``tail``), their seals and their uids in
        the replay index from Redis: Redis holds the hot window only."""
        dropped = 0
        self._boundary = (-1e18, None)  # the boundary moves: read it afresh
        while True:
            found = self.r.xrange(self.stream, "-", tail.id, count=_PAGE)
            if not found:
                return dropped
            batch = [stream_id for stream_id, _ in found]
            ids = set(batch)
            uids = sorted({uid for _, fields in found if (uid := entry_uid(fields))})
            # Only the hints that name an archived entry (a later entry's is not this one's).
            hinted = [u for u, at in zip(uids, self.r.hmget(self.uids, uids) if uids else [], strict=True)
                      if at in ids]
            pipe = self.r.pipeline(transaction=True)
            pipe.hdel(self.seals, *batch)
            if hinted:
                pipe.hdel(self.uids, *hinted)
            pipe.xdel(self.stream, *batch)
            for stream_id, fields in found:  # the console's indexes hold the hot window only
                for key in entry_facets(self.keys, fields):
                    pipe.zrem(key, entry_member(stream_id))
            pipe.execute()
            dropped += len(batch)

    def _chain(self, cursor: Head | None, on_anomaly: Callable[[Anomaly], None]
               ) -> Iterator[tuple[str, dict[str, str], str | None]]:
        """The sealed chain after ``cursor``: archived entries first (when the cursor is before
        the archive's end), then the stream in Redis after the last of them."""
        start = f"({cursor.id}" if cursor else "-"
        if self.archive is not None and self.archive.segments():
            last_seg = self.archive.segments()[-1][1]
            if cursor is None or cursor.seq < last_seg:
                last_id = None
                try:
                    for seq, stream_id, fields, verdict, seal in self.archive.entries():
                        last_id = stream_id
                        if cursor is None or seq > cursor.seq:
                            yield stream_id, fields, f"{seq} {seal} {verdict}"
                except ArchiveBroken as exc:
                    on_anomaly(Anomaly("archive", "archive", f"the audit archive: {exc}", None))
                    return
                if last_id is not None:
                    start = f"({last_id}"
        yield from self._entries(start)

    def follow(self, cursor: Head | None, on_entry: Callable[[SealedEntry], None],
               on_anomaly: Callable[[Anomaly], None]) -> Head | None:
        """Walk the sealed chain after ``cursor`` up to the head, checking every seal against the
        previous one and every verdict against the entry; hand each sealed entry to
        ``on_entry`` and each break to ``on_anomaly``. Returns the new cursor. Incremental: the
        ledger calls it with the cursor it got last time."""
        mark = self.read_checkpoint()
        head = Head.decode(self.r.get(self.head))
        if mark is not None and (head is None or head.seq < mark.seq):
            on_anomaly(Anomaly(mark.id, "rollback", self.behind_checkpoint() or "behind the checkpoint", mark.seq))
        if head is None or (cursor is not None and head.seq <= cursor.seq):
            if cursor is not None and head is not None and head.seq == cursor.seq and head != cursor:
                on_anomaly(Anomaly(head.id, "head", f"event {head.id} (#{head.seq}): the head was rewritten", head.seq))
            return cursor
        prev, seq = (cursor.seal, cursor.seq) if cursor else (GENESIS, 0)
        last = cursor
        for stream_id, fields, stored in self._chain(cursor, on_anomaly):
            if _id_key(stream_id) > _id_key(head.id):
                break
            seq += 1
            found = self._check_sealed(prev, seq, stream_id, fields, stored)
            if isinstance(found, Anomaly):
                on_anomaly(found)
                try:
                    stored_seq, stored_seal, _ = _split_seal(stored or "")
                    prev, seq = stored_seal, stored_seq
                except ValueError:
                    pass  # keep counting; the next seal will not chain either
                last = Head(stream_id, seq, prev)
                continue
            verdict = found
            prev = (stored or "").split(" ")[1]
            last = Head(stream_id, seq, prev)
            ev = None
            if verdict == OK and fields.get("k") is None:
                ev = AuditEvent.model_validate_json(fields["e"]).model_copy(update={"id": stream_id, "seq": seq})
            on_entry(SealedEntry(stream_id, seq, verdict, ev, fields, prev))
        if last is None or last.id != head.id or last.seq != head.seq:
            on_anomaly(Anomaly(head.id, "truncated",
                               f"event {head.id} (#{head.seq}): last sealed event is missing (log truncated)", head.seq))
        return last

    def _check_sealed(self, prev: str, seq: int, stream_id: str, fields: dict[str, str],
                      stored: str | None) -> str | Anomaly:
        """The entry's verdict when its seal chains from ``prev`` at ``seq``, else the anomaly."""
        if stored is None:
            return Anomaly(stream_id, "inserted", f"event {stream_id}: no seal; inserted into sealed history", seq)
        try:
            stored_seq, stored_seal, stored_verdict = _split_seal(stored)
        except ValueError:
            return Anomaly(stream_id, "malformed_seal", f"event {stream_id}: its seal is malformed", seq)
        if stored_seq > seq:
            return Anomaly(stream_id, "deleted", f"event {stream_id}: sealed event #{seq} before it is missing (deleted)", seq)
        mac = fields.get("m", "")
        if stored_seq < seq or not hmac.compare_digest(self._seal(prev, seq, stream_id, mac, stored_verdict), stored_seal):
            return Anomaly(stream_id, "reordered",
                           f"event {stream_id} (#{seq}): seal mismatch; history was reordered or altered", seq)
        verdict = self.judge(fields)
        if verdict == OK and stored_verdict in (REPLAY, STALE):
            return stored_verdict  # the sealer recognised a copy (the seal's MAC vouches for the verdict)
        if verdict != stored_verdict:
            return Anomaly(stream_id, "altered", f"event {stream_id} (#{seq}): contents altered (MAC mismatch)", seq)
        return verdict

    def verify(self, public_keys: dict[str, Any] | None = None) -> VerifyReport:
        """Walk the whole chain (archived segments, then Redis) and list every anomaly; with
        ``public_keys``, also check the archive's signed tree heads against its entries. Raises
        :class:`AuditBroken` (carrying the report) when sealed history was changed; rejected
        entries alone do not raise."""
        anomalies: list[Anomaly] = []
        if self.archive is not None and public_keys is not None:
            from intake.audit.archive import verify_offline

            for problem in verify_offline(self.archive.store, public_keys).problems:
                anomalies.append(Anomaly("archive", "archive", f"the audit archive: {problem}", None))
        seen: dict[str, str] = {}
        count = 0

        def entry(sealed: SealedEntry) -> None:
            nonlocal count
            count += 1
            if sealed.verdict != OK:
                anomalies.append(Anomaly(sealed.id, "rejected",
                                         f"event {sealed.id} (#{sealed.seq}): sealed as {sealed.verdict}", sealed.seq))
                return
            eid = entry_uid(sealed.fields)
            if eid and eid in seen:
                anomalies.append(Anomaly(sealed.id, "replayed", f"event {sealed.id}: a replayed copy of an earlier event",
                                         sealed.seq))
            seen[eid] = sealed.id

        head = self.follow(None, entry, anomalies.append)
        unsealed = 0
        after = f"({head.id}" if head else "-"
        for _stream_id, _fields, stored in self._entries(after):
            if stored is not None:
                continue
            unsealed += 1
        sealed_after = [stream_id for stream_id, _fields, stored in self._entries(after) if stored is not None]
        # A live sealer may have published meanwhile (seals and head move in one script): a seal
        # is planted only if it is past the head as it is *after* the seals were read.
        latest = Head.decode(self.r.get(self.head))
        for stream_id in sealed_after:
            if latest is None or _id_key(stream_id) > _id_key(latest.id):
                anomalies.append(Anomaly(stream_id, "reordered", f"event {stream_id}: sealed past the head", None))
        report = VerifyReport(events=count + unsealed, unsealed=unsealed, anomalies=tuple(anomalies))
        fatal = [a for a in anomalies if a.fatal]
        if fatal:
            raise AuditBroken(fatal[0].id, fatal[0].message, report=report)
        return report

    def export(self) -> Iterator[dict[str, Any]]:
        """Every entry as a dict (JSON Lines material), the whole chain in order: the archived
        segments, then the stream in Redis (sealed or not). Each: stream id, seq, seal, verdict,
        which key MAC'd it, and whether it is verified genuine (sealed with verdict ok). Raises
        :class:`AuditBroken` when the archive cannot be read whole (an export never silently
        leaves out history)."""

        def broken(anomaly: Anomaly) -> None:
            raise AuditBroken(anomaly.id, anomaly.message)

        for stream_id, fields, stored in self._chain(None, broken):
            try:
                record = json.loads(fields.get("e", "{}"))
                if not isinstance(record, dict):
                    record = {}
            except ValueError:
                record = {}
            try:
                seq, seal, verdict = _split_seal(stored) if stored else (None, None, None)
            except ValueError:
                seq, seal, verdict = None, None, "malformed_seal"
            kind = "worker" if fields.get("k") == "w" else "broker"
            if kind == "worker":  # a worker's report, copied in as evidence: shown like an event
                record = {"at": record.get("at"), "actor": f"worker:{record.get('w')}",
                          "action": record.get("action"), "subject": record.get("task"),
                          "data": record.get("data"), "eid": record.get("rid")}
            judged = self.judge(fields)
            yield {**record, "id": stream_id, "seq": seq, "seal": seal, "verdict": verdict or judged,
                   "mac_kind": kind, "verified": verdict == OK and judged == OK}


def event(actor: str, action: str, subject: str, *, at: float | None = None, **data: Any) -> AuditEvent:
    """Build an audit event (stamped now unless ``at``). ``data`` holds ids and outcomes, never secrets."""
    return AuditEvent(
        at=time.time() if at is None else at, actor=actor, action=action, subject=subject, data=data,
        eid=secrets.token_hex(8),
    )
