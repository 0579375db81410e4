"""Workers report; the broker writes (DESIGN.md, *Authority*).

An agent worker never writes a broker record. It appends **reports** to its own stream
``{prefix}:reports:<worker>``, each MAC'd with its own report key (issued by the broker with
``intake worker-key issue NAME``, one generation at a time, revocable): ``report.claimed`` (with
the dispatch token's nonce and a fresh run id), ``report.heartbeat``, ``report.result``,
``report.refused`` and ``report.stopped``. Nothing else is a report.

The broker's :class:`ReportProcessor` reads every registered worker's stream through one consumer
group (shared by every broker process, so each report is handled once, and re-claimed from a dead
consumer), checks each report (shape, MAC under that worker's *current* key generation per the
ledger) and applies it through the same state machine as everything else, deciding from the
ledger: a claim starts the attempt only if the ledger says the task is queued, the nonce is one
the broker minted for this attempt and never used, and intake is not frozen; a heartbeat renews
the attempt's lease only while the ledger says that very run is live. Every answer to a worker is
a broker-signed lease (``granted``, or a refusal saying why), so a worker can act on nothing
Redis says on its own. A report that fails its checks is quarantined: acknowledged, audited
(``report.rejected``) and skipped, so it never stalls the reports behind it.

Accepted reports are copied onto the audit log verbatim (``k=w`` entries the sealer checks against
the worker's key) in the same MULTI as the broker's own event, as evidence of who said what.

Workers are separate principals (issue 19):

* **Registered scope.** ``intake worker-key issue NAME --queue … --repo … --change-type …``
  seals ``worker.registered``; a claim is granted only to a worker registered for the task's
  queue, repo and change type (else refused as ``not_registered``). A ``report.refused`` that
  would end a task counts only from a worker registered for the task's queue.
* **Only the claimer reports on its run.** Every heartbeat and result of a run is accepted only
  from the worker the ledger says claimed it; anyone else's is rejected (``not_your_run``) and
  changes nothing. Leases are written under the claiming worker's name
  (``{prefix}:lease:<worker>:<task>``), so a refusal sent to one worker never touches another's.
* **Heartbeats are not history.** A heartbeat carries a per-run sequence number inside its MAC'd
  body; the broker keeps the highest one accepted (memory and ``{prefix}:beats:<task>``) and
  refuses a replayed or out-of-order beat, so a copy never renews a dead run's lease. Beats only
  renew the lease; they are never sealed (a run's claim, result or stop and an abandonment are).
* **Junk is rejected in bulk.** Entries that fail their checks are acknowledged in one XACK per
  batch and audited at most once per stream per :data:`REJECT_AUDIT_INTERVAL_S` (the record
  carries how many were suppressed since the last one); authenticated but refused reports, and
  the records a worker's own reports cause without changing state (a refused claim, a discarded
  result, a stop), share a small allowance per interval (:data:`REJECT_AUDIT_BURST`) before
  they are summarised too.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from intake.audit.ledger import WorkerScope
from intake.core.errors import IllegalTransition, IntakeError, InvalidInput, NotFound
from intake.core.models import Task, TaskState, is_id
from intake.protocol.reports import (
    MAX_REPORT_BYTES,
    REPORT_ACTIONS,
    WORKER_NAME,
    report_mac,
)
from intake.storage.outage import OUTAGE_ERRORS
from intake.tasks.dispatch import JOB_TIMEOUT_MARGIN_S
from intake.tasks.handle import BrokerHandle

log = logging.getLogger("intake.tasks.worker_reports")

GROUP = "broker"
#: What a run may end as, by the worker's word (the broker still checks it is that run's). A
#: run's ``succeeded`` means: gates and checks passed, the commit is quarantined; the broker
#: then decides between awaiting result approval and delivery.
RESULT_STATES = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.BLOCKED})
#: Refusals that are the task's own fault: the broker ends the task with them.
TASK_FAULTS = {"stale_policy": TaskState.FAILED, "misrouted": TaskState.FAILED,
               "token_spec_mismatch": TaskState.FAILED}
#: Rejected reports are audited at most this often per stream (the rest are counted into the
#: next record), so junk XADDs cannot flood the sealed log.
REJECT_AUDIT_INTERVAL_S = 60.0
#: How many rejections of *authenticated* reports (a valid MAC under the worker's current key)
#: are audited one by one per stream and interval before they are summarised too; junk (no
#: valid MAC) gets one record per interval.
REJECT_AUDIT_BURST = 10
#: Reasons that mean "not from this worker's current key": junk anyone who can XADD can send.
JUNK_REASONS = frozenset({"malformed", "too_large", "bad_mac", "no_current_key"})
#: Accept a heartbeat only when its sequence number is above the highest accepted for that run
#: (compare-and-set in one step, so two broker processes agree); 0: replayed or out of order.
_BEAT_CAS = """
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) <= cur then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


# -- issuing keys ----------------------------------------------------------------------------
_QUEUE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_REPO_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}/[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
_CHANGE_TYPE = r"[a-z][a-z0-9-]{0,39}"


def worker_scope(queues: tuple[str, ...] | list[str], repos: tuple[str, ...] | list[str],
                 change_types: tuple[str, ...] | list[str]) -> WorkerScope:
    """A registration scope from names given on the command line, checked (one line on bad input)."""
    for what, names, pattern in (("--queue", queues, _QUEUE_NAME), ("--repo", repos, _REPO_NAME),
                                 ("--change-type", change_types, _CHANGE_TYPE)):
        if not names:
            raise InvalidInput(f"{what}: give at least one")
        for name in names:
            if not re.fullmatch(pattern, name):
                raise InvalidInput(f"{what} {name!r}: not a valid name")
    return WorkerScope(frozenset(queues), frozenset(repos), frozenset(change_types))


def policy_scope(policy: Any) -> WorkerScope:
    """Everything ``policy`` routes: every repo's queue, every repo, every change type (what dev
    mode's embedded worker serves)."""
    return WorkerScope(frozenset(policy.queue_for(r) for r in policy.repos), frozenset(r.name for r in policy.repos),
                       frozenset(c for r in policy.repos for c in r.change_types))


def register_worker(broker: BrokerHandle, worker: str, scope: WorkerScope, *, actor: str) -> None:
    """Seal ``worker.registered``: what ``worker`` may serve from now on (replacing any earlier
    registration). Claims outside it are refused."""
    if not re.fullmatch(WORKER_NAME, worker):
        raise InvalidInput(f"worker name {worker!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    broker.audit.record(actor, "worker.registered", worker, **scope.as_data())
    broker.audit.seal_pending()


def issue_worker_key(broker: BrokerHandle, worker: str, *, actor: str,
                     scope: WorkerScope | None = None) -> tuple[int, bytes]:
    """A new report key generation for ``worker`` (the previous one stops working at once),
    registering ``scope`` first when given (a worker never registered serves nothing).
    Returns (generation, key); the caller writes the key file."""
    if not re.fullmatch(WORKER_NAME, worker):
        raise InvalidInput(f"worker name {worker!r}: use letters, digits, '.', '_' or '-' (at most 63)")
    if scope is not None:
        register_worker(broker, worker, scope, actor=actor)
    ledger = broker.ledger.follow()
    generation = ledger.worker_generations.get(worker, 0) + 1
    broker.audit.record(actor, "worker.key_issued", worker, generation=generation)
    broker.audit.seal_pending()
    return generation, broker.audit.worker_key(worker, generation)


def ensure_worker_key(broker: BrokerHandle, worker: str, scope: WorkerScope | None = None) -> None:
    """Issue ``worker`` a key file unless it holds the current one, and register ``scope`` unless
    that is the registration already (dev mode's embedded worker)."""
    from intake.core.errors import ConfigError
    from intake.protocol.keyfiles import load_worker_key, write_worker_key

    if scope is not None and broker.ledger.follow().worker_scope(worker) != scope:
        register_worker(broker, worker, scope, actor="system")
    path = broker.settings.worker_key_path(worker)
    try:
        name, generation, _ = load_worker_key(path)
        if name == worker and broker.ledger.follow().workers.get(worker) == generation:
            return
    except ConfigError:
        pass  # missing or unreadable: issue a new one
    generation, key = issue_worker_key(broker, worker, actor="system")
    write_worker_key(path, worker, generation, key)


def revoke_worker_key(broker: BrokerHandle, worker: str, *, actor: str) -> None:
    ledger = broker.ledger.follow()
    if ledger.workers.get(worker) is None:
        raise InvalidInput(f"worker {worker} has no key to revoke")
    broker.audit.record(actor, "worker.key_revoked", worker)
    broker.audit.seal_pending()


# -- the broker's side ------------------------------------------------------------------------
@dataclass(frozen=True)
class Report:
    entry: str
    stream: str
    worker: str
    action: str
    task: str
    data: dict[str, Any]
    fields: dict[str, str]


class ReportRejected(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ReportProcessor:
    """Read, check and apply every registered worker's reports (see the module docstring)."""

    def __init__(self, broker: BrokerHandle, *, consumer: str | None = None, claim_idle_ms: int = 5000) -> None:
        self.broker = broker
        self.store = broker.store
        self.keys = broker.store.keys
        self.ledger = broker.ledger
        self.r = broker.client
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.claim_idle_ms = claim_idle_ms
        self._groups: set[str] = set()
        self._beats: dict[tuple[str, str], int] = {}  # (task, run) -> highest heartbeat seq seen
        self._beat_cas = self.r.register_script(_BEAT_CAS)
        self._rejects: dict[str, _RejectBucket] = {}  # per stream: what was audited, what suppressed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- running ---------------------------------------------------------------------------
    def streams(self) -> list[str]:
        self.ledger.follow()
        found = [self.keys.reports(w) for w, gen in sorted(self.ledger.workers.items()) if gen is not None]
        for stream in found:
            if stream not in self._groups:
                try:
                    self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                self._groups.add(stream)
        return found

    def poll(self, block_ms: int = 200) -> int:
        """Handle what is waiting (stale pending reports first). Returns how many."""
        streams = self.streams()
        if not streams:
            time.sleep(block_ms / 1000)
            return 0
        handled = 0
        for stream in streams:
            _, claimed, *_ = self.r.xautoclaim(stream, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=50)
            handled += self._handle_batch(stream, claimed)
        fresh = self.r.xreadgroup(GROUP, self.consumer, {s: ">" for s in streams}, count=100, block=block_ms)
        for stream, entries in fresh or []:
            handled += self._handle_batch(stream, entries)
        self._flush_rejects()
        return handled

    def _handle_batch(self, stream: str, entries: list[tuple[str, dict[str, str] | None]]) -> int:
        """Handle a batch of one stream's entries, then acknowledge them all in one XACK (junk
        costs one round trip per batch, not one per entry)."""
        done: list[str] = []
        handled = 0
        try:
            for entry, fields in entries:
                handled += self._handle_one(stream, entry, fields)
                done.append(entry)
        finally:
            if done:
                self.r.xack(stream, GROUP, *done)
        return handled

    def drained(self) -> bool:
        """Whether every report appended so far has been handled (read and acknowledged)."""
        for stream in self.streams():
            info = self.r.xinfo_stream(stream)
            groups = {g["name"]: g for g in self.r.xinfo_groups(stream)}
            group = groups.get(GROUP)
            if group is None or group["pending"] or (info["length"] and group["last-delivered-id"] != info["last-generated-id"]):
                return False
        return True

    def start(self) -> None:
        """Run :meth:`poll` on a daemon thread until :meth:`stop`."""

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.poll()
                except OUTAGE_ERRORS as exc:  # the reports wait in the stream; noted once
                    self.broker.outage.failed(exc, "report processing")
                    self._stop.wait(0.5)
                except Exception as exc:
                    log.warning("report processing failed: %s", type(exc).__name__)
                    self._stop.wait(0.5)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="reports", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- one report ------------------------------------------------------------------------
    def handle(self, stream: str, entry: str, fields: dict[str, str] | None) -> int:
        """Check and apply one entry, then acknowledge it (see :meth:`_handle_one`)."""
        return self._handle_batch(stream, [(entry, fields)])

    def _handle_one(self, stream: str, entry: str, fields: dict[str, str] | None) -> int:
        """Check and apply one entry (the caller acknowledges it): a bad one is quarantined
        (audited, rate-limited, and skipped), so it never stalls the reports behind it. Only a
        Redis failure leaves it pending, to be handled again once Redis answers."""
        worker = stream.rsplit(":", 1)[-1]
        try:
            if fields:
                self.apply(self.parse(stream, entry, fields))
        except redis.RedisError:
            raise
        except ReportRejected as exc:
            self._rejected(stream, worker, entry, exc.reason)
        except IntakeError as exc:
            log.warning("report %s not applied: %s", entry, type(exc).__name__)
        except Exception as exc:  # a report that trips a bug: on the record, never a stalled stream
            log.error("report %s from %s could not be applied: %s", entry, worker, type(exc).__name__)
            self._rejected(stream, worker, entry, f"unhandled:{type(exc).__name__}")
        return 1 if fields else 0

    # -- rejections, rate-limited ------------------------------------------------------------
    def _rejected(self, stream: str, worker: str, entry: str, reason: str) -> None:
        """Audit a rejected report unless this stream's allowance for the interval is spent;
        then it is only counted, into the next record (:meth:`_flush_rejects`)."""
        now = time.monotonic()
        bucket = self._rejects.get(stream)
        if bucket is None or now - bucket.since >= REJECT_AUDIT_INTERVAL_S:
            if bucket is not None and bucket.suppressed:
                self._record_suppressed(worker, bucket)
            bucket = self._rejects[stream] = _RejectBucket(since=now)
        junk = reason in JUNK_REASONS
        allowed = bucket.junk < 1 if junk else bucket.authenticated < REJECT_AUDIT_BURST
        if not allowed:
            bucket.suppressed += 1
            bucket.reasons[reason] = bucket.reasons.get(reason, 0) + 1
            return
        if junk:
            bucket.junk += 1
        else:
            bucket.authenticated += 1
        log.warning("report %s from %s rejected: %s", entry, worker, reason)
        self.store.audit.record("system", "report.rejected", worker, entry=entry, reason=reason)

    def _audit_for(self, report: Report, action: str, subject: str, **data: Any) -> None:
        """Record what a worker's own report caused but that changes no state (a refused claim,
        a discarded result, a stop): within the stream's allowance for authenticated reports
        (:data:`REJECT_AUDIT_BURST` per interval), beyond it only counted into the summary, so a
        worker key cannot flood the sealed log either (issue 19: every amplification)."""
        now = time.monotonic()
        bucket = self._rejects.get(report.stream)
        if bucket is None or now - bucket.since >= REJECT_AUDIT_INTERVAL_S:
            if bucket is not None and bucket.suppressed:
                self._record_suppressed(report.worker, bucket)
            bucket = self._rejects[report.stream] = _RejectBucket(since=now)
        if bucket.authenticated >= REJECT_AUDIT_BURST:
            bucket.suppressed += 1
            bucket.reasons[action] = bucket.reasons.get(action, 0) + 1
            return
        bucket.authenticated += 1
        self.store.audit.record("system", action, subject, **data)

    def _flush_rejects(self) -> None:
        """Record, once its interval is over, how many rejections each stream had suppressed."""
        now = time.monotonic()
        for stream, bucket in list(self._rejects.items()):
            if now - bucket.since >= REJECT_AUDIT_INTERVAL_S:
                if bucket.suppressed:
                    self._record_suppressed(stream.rsplit(":", 1)[-1], bucket)
                del self._rejects[stream]

    def _record_suppressed(self, worker: str, bucket: _RejectBucket) -> None:
        top = dict(sorted(bucket.reasons.items(), key=lambda kv: -kv[1])[:5])
        log.warning("%d more reports from %s rejected (%s)", bucket.suppressed, worker, top)
        self.store.audit.record("system", "report.rejected", worker, reason="suppressed",
                                suppressed=bucket.suppressed, reasons=top)
        bucket.suppressed, bucket.reasons = 0, {}

    def parse(self, stream: str, entry: str, fields: dict[str, str]) -> Report:
        """Verify before parsing: exact fields, size, then the MAC under the worker's current key."""
        if set(fields) != {"r", "m"}:
            raise ReportRejected("malformed")
        body, mac = fields["r"], fields["m"]
        if len(body) > MAX_REPORT_BYTES:
            raise ReportRejected("too_large")
        worker = stream.rsplit(":", 1)[-1]
        generation = self.ledger.workers.get(worker)
        if generation is None:
            raise ReportRejected("no_current_key")
        if not hmac.compare_digest(report_mac(self.broker.audit.worker_key(worker, generation), body), mac):
            raise ReportRejected("bad_mac")
        try:
            data = json.loads(body)
        except ValueError:
            raise ReportRejected("malformed") from None
        if (not isinstance(data, dict) or data.get("w") != worker or data.get("g") != generation
                or data.get("action") not in REPORT_ACTIONS or not isinstance(data.get("data"), dict)
                or not isinstance(data.get("task"), str)
                or not (is_id(data["task"], "T") or (data["task"] == "" and data["action"] == "report.refused"))):
            raise ReportRejected("malformed")
        return Report(entry, stream, worker, data["action"], data["task"], data["data"], {"r": body, "m": mac})

    def apply(self, report: Report) -> None:
        handler: Callable[[Report], None] = {
            "report.claimed": self._claimed, "report.heartbeat": self._heartbeat,
            "report.result": self._result, "report.refused": self._refused, "report.stopped": self._stopped,
        }[report.action]
        handler(report)

    def _actor(self, report: Report) -> str:
        return f"worker:{report.worker}"

    def _lease(self, worker: str, task_id: str, attempt: int, run: str, status: str = "granted",
               reason: str = "") -> None:
        """Answer ``worker`` with a signed lease (granted or a refusal) under its own name."""
        self.broker.dispatcher.write_lease(worker, task_id, attempt, run, status, reason)

    def _evidence(self, report: Report) -> Callable[[Any, Task], None]:
        return lambda pipe, _task: self.store.audit.append_report(pipe, report.fields)

    def _claimed(self, report: Report) -> None:
        d = report.data
        run, nonce = str(d.get("run", "")), str(d.get("nonce", ""))
        attempt = d.get("attempt")
        if not (16 <= len(run) <= 64) or not isinstance(attempt, int):
            raise ReportRejected("malformed")
        why = self._claim_refusal(report, attempt, nonce)
        if why is not None:
            self._lease(report.worker, report.task, attempt, run, status="refused", reason=why)
            self._audit_for(report, "job.refused", report.task, reason=why, worker=report.worker,
                                    job=str(d.get("job", "")), attempt=attempt)
            return
        fact = self.ledger.task(report.task)
        assert fact is not None
        if fact.state is TaskState.DELIVERING:
            self._delivery_started(report, attempt, run, nonce)
            return

        def check(current: Task) -> None:
            if (why := self.ledger.follow().tampered(current)) is not None:
                raise InvalidInput(why)
            now_fact = self.ledger.task(report.task)
            if now_fact is None or nonce not in now_fact.dispatches or now_fact.state is not TaskState.QUEUED:
                raise InvalidInput("changed meanwhile")

        try:
            self.store.move_task(
                report.task, TaskState.RUNNING, actor="system", check=check, also=self._evidence(report),
                update={"attempts": attempt, "reason": None}, attempt=attempt, run=run, nonce=nonce,
                job=str(d.get("job", "")), queue=fact.queue, worker=report.worker,
                sandbox=str(d.get("sandbox", "")),
            )
        except (IllegalTransition, InvalidInput, NotFound) as exc:
            self._lease(report.worker, report.task, attempt, run, status="refused", reason=str(exc)[:200])
            self.store.audit.record("system", "job.refused", report.task, reason="changed_meanwhile",
                                    worker=report.worker, attempt=attempt)
            return
        self.store.audit.seal_pending()
        self._lease(report.worker, report.task, attempt, run)

    def _delivery_started(self, report: Report, attempt: int, run: str, nonce: str) -> None:
        """A delivery claim the ledger allows: the attempt starts (``task.delivery_started``,
        which spends the nonce) and the worker gets its lease."""

        def build(pipe: Any) -> bool:
            current = self.store.read_task(pipe, report.task)
            now_fact = self.ledger.follow().task(report.task)
            if (self.ledger.tampered(current) is not None or now_fact is None
                    or now_fact.state is not TaskState.DELIVERING or nonce not in now_fact.dispatches):
                return False
            pipe.multi()
            self.store.write_task(pipe, current.model_copy(update={"updated_at": self.store.clock()}))
            self.store.audit.append_report(pipe, report.fields)
            self.store.emit(pipe, "system", "task.delivery_started", report.task, attempt=attempt, run=run,
                            nonce=nonce, job=str(report.data.get("job", "")), worker=report.worker,
                            sha=now_fact.result_commit)
            return True

        if not self.store.transact([self.keys.task(report.task)], build):
            self._lease(report.worker, report.task, attempt, run, status="refused", reason="changed meanwhile")
            self.store.audit.record("system", "job.refused", report.task, reason="changed_meanwhile",
                                    worker=report.worker, attempt=attempt)
            return
        self.store.audit.seal_pending()
        self._lease(report.worker, report.task, attempt, run)

    def _claim_refusal(self, report: Report, attempt: int, nonce: str) -> str | None:
        """Why this claim may not start the attempt (from the ledger), or None."""
        self.ledger.follow()
        if (why := self.ledger.halted) is not None:
            return "ledger_halted"
        fact = self.ledger.task(report.task)
        if fact is None:
            return "no_such_task"
        if fact.state not in (TaskState.QUEUED, TaskState.DELIVERING):
            with contextlib.suppress(NotFound, InvalidInput):
                if (why := self.ledger.tampered(self.store.get_task(report.task))) is not None:
                    self.broker.dispatcher.tamper(report.task, why)
            return f"task_{fact.state.value}"
        if self.ledger.frozen is not None:
            return "frozen"
        if nonce in fact.used_nonces:
            return "token_used"
        dispatch = fact.dispatches.get(nonce)
        if dispatch is None:
            return "token_unknown"  # not a token the broker minted for this queued spell
        if fact.state is TaskState.DELIVERING and fact.run is not None and self.broker.dispatcher.lease_ok(fact):
            return "delivery_running"
        expected = fact.attempts + 1 if dispatch.kind == "run" else fact.deliveries + 1
        if dispatch.attempt != attempt or attempt != expected:
            return "wrong_attempt"
        if dispatch.exp <= self.store.clock():
            return "token_expired"
        if report.data.get("job") != dispatch.job:
            return "wrong_job"
        try:
            record = self.store.get_task(report.task)
        except (NotFound, InvalidInput):
            return "no_record"
        if (why := self.ledger.tampered(record)) is not None:
            self.broker.dispatcher.tamper(report.task, why)
            return "tampered"
        scope = self.ledger.worker_scope(report.worker)
        if scope is None or not scope.serves(queue=dispatch.queue, repo=record.spec.repo,
                                             change_type=record.spec.change_type):
            return "not_registered"  # issue 19: only a worker registered for this queue and repo
        return None

    def _live_run(self, report: Report) -> tuple[int, str, str | None]:
        """(attempt, run, why not live) for a report about a run."""
        attempt, run = report.data.get("attempt"), str(report.data.get("run", ""))
        if not isinstance(attempt, int) or not run:
            raise ReportRejected("malformed")
        self.ledger.follow()
        fact = self.ledger.task(report.task)
        if self.ledger.halted is not None:
            return attempt, run, "halted"
        if fact is not None and fact.worker is not None and fact.worker != report.worker:
            # Issue 19: only the worker that claimed the live run may report on the task's run;
            # anyone else's report is rejected (audited) and changes nothing.
            raise ReportRejected("not_your_run")
        live = fact is not None and fact.run == run and (
            (fact.state is TaskState.RUNNING and fact.attempts == attempt)
            or (fact.state is TaskState.DELIVERING and fact.deliveries == attempt))
        if not live:
            state = fact.state if fact is not None else None
            return attempt, run, "revoked" if state is TaskState.REVOKED else "superseded"
        if self.ledger.frozen is not None:
            return attempt, run, "frozen"
        record = self.store.get_task(report.task)
        limit = record.spec.limits.run_timeout_s + JOB_TIMEOUT_MARGIN_S
        if fact is None or (fact.started_at or 0) + limit < self.store.clock():
            return attempt, run, "superseded"  # past any run's time: no more renewals
        return attempt, run, None

    def _heartbeat(self, report: Report) -> None:
        attempt, run, why = self._live_run(report)
        seq = report.data.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ReportRejected("malformed")
        if not self._beat_is_new(report.task, run, seq):
            raise ReportRejected("stale_heartbeat")  # a replayed or out-of-order copy renews nothing
        if why is None:
            self._lease(report.worker, report.task, attempt, run)
        else:
            self._lease(report.worker, report.task, attempt, run, status=why, reason=f"the run is no longer live ({why})")

    def _beat_is_new(self, task_id: str, run: str, seq: int) -> bool:
        """Whether ``seq`` is above every heartbeat seq accepted for this run (here and, through
        Redis, in every other broker process); records it if so."""
        if seq <= self._beats.get((task_id, run), 0):
            return False
        ttl = self.broker.settings.lease_ttl * 4 + JOB_TIMEOUT_MARGIN_S * 4
        if not int(self._beat_cas(keys=[self.keys.beats(task_id)], args=[run, seq, ttl])):
            return False
        if len(self._beats) > 10_000:
            self._beats.clear()  # bounded; Redis still holds the highest seq per run
        self._beats[(task_id, run)] = seq
        return True

    def _result(self, report: Report) -> None:
        attempt, run, why = self._live_run(report)
        d = report.data
        try:
            to = TaskState(str(d.get("state")))
        except ValueError:
            raise ReportRejected("malformed") from None
        if to not in RESULT_STATES:
            raise ReportRejected("malformed")
        result = d.get("result") if isinstance(d.get("result"), dict) else None
        reason = d.get("reason") if isinstance(d.get("reason"), str) else None
        extra = d.get("summary") if isinstance(d.get("summary"), dict) else {}
        if why in (None, "frozen", "halted"):  # a finished run's result is recorded even then
            fact = self.ledger.task(report.task)
            phase = fact.state if fact is not None else None
            if phase is TaskState.RUNNING or phase is TaskState.DELIVERING:
                target, data, result = self._settling(report, phase, to, result)

                def check(current: Task) -> None:
                    now_fact = self.ledger.follow().task(report.task)
                    if now_fact is None or now_fact.run != run or now_fact.state is not phase:
                        raise InvalidInput("changed meanwhile")
                # Settled or superseded meanwhile: then it is recorded as discarded, below.
                with contextlib.suppress(IllegalTransition, InvalidInput, NotFound):
                    moved = self.store.move_task(report.task, target, actor="system", reason=reason, check=check,
                                                 also=self._evidence(report), update={"result": result},
                                                 **{**_flat(extra), **data, "attempt": attempt, "run": run,
                                                    "worker": report.worker})
                    self.r.delete(self.keys.lease(report.worker, report.task))
                    if target is TaskState.DELIVERING:
                        self.store.audit.seal_pending()
                        self.broker.dispatcher.on_queued(moved)
                    return
        state = self.ledger.task(report.task)
        self._audit_for(report, "run.discarded", report.task, attempt=attempt, worker=report.worker,
                                outcome=to.value, state=state.state.value if state else None, **_flat(extra))

    def _settling(self, report: Report, phase: TaskState, to: TaskState,
                  result: dict[str, Any] | None) -> tuple[TaskState, dict[str, Any], dict[str, Any] | None]:
        """(state, event data, result) for a result report of a live run or delivery.

        A run that passed its gates and checks reports ``succeeded`` with its quarantined
        commit: the broker decides from the policy whether that result waits for approval
        (the rule goes on the record, for :meth:`Gatekeeper.accept`) or is delivered now. A
        delivery may only succeed with exactly the commit the sealed history names."""
        fact = self.ledger.task(report.task)
        assert fact is not None
        commit = str((result or {}).get("commit", ""))
        if phase is TaskState.DELIVERING:
            if to is TaskState.BLOCKED:
                raise ReportRejected("malformed")
            if to is TaskState.SUCCEEDED and commit != fact.result_commit:
                raise ReportRejected("wrong_commit")
            earlier = self.store.get_task(report.task).result or {}
            return to, {"commit": fact.result_commit}, {**earlier, **(result or {})}
        if to is not TaskState.SUCCEEDED:
            return to, {}, result
        base = str((result or {}).get("base", ""))
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit) or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", base):
            raise ReportRejected("malformed")
        paths = report.data.get("paths")
        complete = report.data.get("paths_complete") is True and isinstance(paths, list)
        listed = [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []
        # The paths that decide result approval are the gates' own list (the same ``changed``
        # the worker's gates ran on): they must cover every file the result names and its
        # count, or the list is treated as incomplete (which needs a result approval).
        files = (result or {}).get("files")
        count = (result or {}).get("files_changed")
        if (not isinstance(files, list) or not set(map(str, files)) <= set(listed)
                or not isinstance(count, int) or count > len(listed)):
            complete = False
        rule = self.broker.gatekeeper.result_rule(self.store.get_task(report.task), listed, complete)
        # issue 20: the review an approver is shown. The worker's diff must hash to the SHA-256
        # it reported; the text is stored beside the task (only its digest goes on the record
        # and into the sealed event, which the result approval then binds to).
        result, diff_sha = self._review(report.task, result or {})
        # The base goes on the sealed event with the diff: the delivery worker recomputes the
        # diff from that base to the commit and delivers only if it is the one reviewed.
        reviewed = {"commit": commit, "base": base, "diff_sha256": diff_sha}
        if rule is None:
            return TaskState.DELIVERING, reviewed, result
        return TaskState.AWAITING_RESULT_APPROVAL, {**reviewed, "rule": rule.model_dump(mode="json")}, result

    def _review(self, task_id: str, result: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """(the result without the diff text, the diff's SHA-256) for a succeeded run's report;
        a missing or mismatched review is a malformed report (issue 20)."""
        review = result.get("review")
        if not isinstance(review, dict) or not isinstance(review.get("diff"), str):
            raise ReportRejected("malformed")
        diff, claimed = review["diff"], review.get("sha256")
        if not isinstance(claimed, str) or not hmac.compare_digest(hashlib.sha256(diff.encode()).hexdigest(), claimed):
            raise ReportRejected("malformed")
        digest = self.store.put_review(task_id, diff)
        summary = {"sha256": digest, "truncated": review.get("truncated") is True,
                   "bytes": review.get("bytes") if isinstance(review.get("bytes"), int) else len(diff.encode()),
                   "stat": str(review.get("stat", ""))[-8000:],
                   "binary": [str(b)[:300] for b in review.get("binary", [])][:200]
                   if isinstance(review.get("binary"), list) else []}
        return {**result, "review": summary}, digest

    def _refused(self, report: Report) -> None:
        d = report.data
        reason = str(d.get("reason", "refused"))[:100]
        job = str(d.get("job", ""))[:100]
        extra = {k: str(d[k])[:200] for k in ("func", "queue", "message") if k in d}
        self._audit_for(report, "job.refused", report.task or job, reason=reason, worker=report.worker,
                                job=job, **extra)
        if not report.task:
            return
        to = TASK_FAULTS.get(reason)
        nonce = str(d.get("nonce", ""))
        fact = self.ledger.follow().task(report.task)
        if to is None or fact is None or fact.state is not TaskState.QUEUED or nonce not in fact.dispatches:
            return  # not this worker's to end: it held no current token for the task
        scope = self.ledger.worker_scope(report.worker)
        if scope is None or fact.dispatches[nonce].queue not in scope.queues:
            return  # issue 19: a worker that does not serve the task's queue cannot end it

        def check(current: Task) -> None:
            if current.state is not TaskState.QUEUED:
                raise InvalidInput("changed meanwhile")

        try:
            self.store.move_task(report.task, to, actor="system", reason=str(d.get("message", reason))[:300],
                                 check=check, also=self._evidence(report), refused=reason, worker=report.worker)
        except (IllegalTransition, InvalidInput, NotFound):
            return

    def _stopped(self, report: Report) -> None:
        d = report.data
        fact = self.ledger.follow().task(report.task) if report.task else None
        if fact is not None and fact.worker is not None and fact.worker != report.worker:
            raise ReportRejected("not_your_run")  # issue 19: only the claimer speaks for its run
        self._audit_for(report, "run.stopped", report.task, worker=report.worker,
                                attempt=d.get("attempt") if isinstance(d.get("attempt"), int) else None,
                                why=str(d.get("why", ""))[:100])


@dataclass
class _RejectBucket:
    """One stream's rejected-report audit allowance for the current interval."""

    since: float
    junk: int = 0
    authenticated: int = 0
    suppressed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    """Summary fields a worker sent, kept to scalars (they go into an audit event's data)."""
    return {str(k)[:40]: v for k, v in list(data.items())[:20]
            if (isinstance(v, str | int | float | bool) or v is None) and str(k) not in _RESERVED}


# Parameter names of the calls summary fields are passed to: a worker cannot set them.
_RESERVED = frozenset({"actor", "action", "subject", "reason", "update", "check", "also", "task_id", "to",
                       "rule", "commit", "pipe", "at"})
