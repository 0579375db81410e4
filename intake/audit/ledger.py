"""The broker's verified ledger: the facts that grant power, derived from sealed history only.

Redis records (tasks, approvers, the freeze key) are a read cache that anyone who can write Redis
can change. The ledger is what the broker believes instead: it follows the sealed audit chain
incrementally (:meth:`AuditLog.follow` checks every seal against the previous one and every
verdict against its entry), applies each genuine broker event to a small in-memory state, and
keeps its cursor. Before any decision that grants power (minting a dispatch token, granting or
renewing a lease, retrying an abandoned run, counting approvals, starting while frozen) the
broker calls :meth:`Ledger.follow` and decides from here; a Redis record that disagrees is refused
and reported as tampering (:meth:`Ledger.tampered`).

Terminal task states are final here whatever any later record says. A replayed copy of a genuine
entry is skipped (see :meth:`Ledger._entry`), never a halt. A break in the chain (an
edited, deleted, inserted or reordered sealed entry; sealed history behind the checkpoint) halts
the ledger: :meth:`Ledger.require_live` refuses every power decision until an operator accepts the
loss (``intake audit accept-rollback``), which is itself a sealed event the ledger reads.

Several broker processes on one Redis each keep their own ledger over the same chain; every state
change they make is a WATCHed transaction on the record it changes, so a decision taken on a
ledger that is a moment behind still cannot overwrite a newer honest change.

**Checkpoints.** Replaying a long log costs about 20 µs an entry, so the ledger's state is
snapshotted now and then (:meth:`Ledger.snapshot_if_due`, every :data:`SNAPSHOT_EVERY` sealed
entries) at its cursor, a sealed position: the snapshot is canonical JSON MAC'd with a key derived
from the audit key (:meth:`AuditLog.snapshot_mac`: whoever writes Redis cannot forge one), and its
SHA-256 is put on the sealed chain itself (a ``ledger.snapshot`` event). A start
(:meth:`Ledger.follow` with no cursor) loads the newest snapshot whose MAC holds and whose anchor
(the sealed entry at its cursor) is still on the chain with the same seal, then replays only what
was sealed after it; unless that replay meets the ``ledger.snapshot`` event naming exactly this
snapshot's hash, the snapshot is dropped and the whole log is replayed. Each entry is verified
once, as it is followed; instead of walking the whole chain again now and then (which grew with
the log and held the ledger lock), the sweep runs :meth:`Ledger.check_anchor`: the head is not
behind the cursor and the entries at the cursor and at the snapshot still carry the seals the
ledger saw. A full walk is ``intake audit verify``, which never takes the ledger lock.

What a snapshot does *not* keep: the ids of events that change nothing here (captured ideas and
the like), so a verbatim replay of such an event after the snapshot is found by ``intake audit
verify``, not by the ledger; a replay of any event the ledger applies is still refused and halts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from intake.audit.log import Anomaly, AuditLog, Head, SealedEntry, event
from intake.core.errors import AuditBroken, LedgerHalted
from intake.core.models import TASK_OPEN, AuditEvent, Task, TaskState, canonical_json

log = logging.getLogger("intake.audit.ledger")

_TERMINAL = frozenset(TaskState) - TASK_OPEN

#: A snapshot is due after this many sealed entries since the last one.
SNAPSHOT_EVERY = 10_000
SNAPSHOT_VERSION = 1
#: How often the clocks walk the whole chain again (in a thread, outside the ledger lock).
FULL_CHECK_EVERY_S = 24 * 3600.0
#: The actions whose events change the ledger: only their unique ids are kept for replay checks.
_APPLIED_KINDS = ("task.", "approval.", "result.", "broker.", "approver.", "worker.", "audit.rollback")


@dataclass(frozen=True)
class ApprovalFact:
    approver: str
    generation: int
    spec_hash: str
    at: float
    via: str = "cli"


@dataclass(frozen=True)
class DispatchFact:
    attempt: int
    job: str
    nonce: str
    exp: float
    queue: str
    kind: str = "run"  # or "deliver": push the quarantined ``sha`` to the task branch
    sha: str | None = None


@dataclass
class TaskFact:
    id: str
    state: TaskState
    spec_hash: str
    tier: str
    requester: str = ""
    approvals: list[ApprovalFact] = field(default_factory=list)
    # Issue 23 (the console's filters): the idea it was promoted from, by whom, and when (None:
    # from a snapshot taken before these were kept).
    idea: str = ""
    repo: str = ""
    promoted_by: str = ""
    created_at: float | None = None
    attempts: int = 0  # attempts started
    # Dispatch tokens minted while the task waits in its current queued spell, by nonce.
    dispatches: dict[str, DispatchFact] = field(default_factory=dict)
    run: str | None = None  # the run id of the live attempt
    started_at: float | None = None
    used_nonces: set[str] = field(default_factory=set)
    window_ends_at: float | None = None
    queue: str | None = None
    # The commit a run produced and quarantined (from task.awaiting_result_approval or
    # task.delivering), the approvals of exactly that commit, and delivery attempts started.
    result_commit: str | None = None
    result_diff: str | None = None  # SHA-256 of the reviewed diff of result_commit
    result_base: str | None = None  # the commit that diff is taken from (the run's base)
    result_approvals: list[ApprovalFact] = field(default_factory=list)
    result_rule: dict[str, object] | None = None  # the ApprovalRule it waits for, None: none
    deliveries: int = 0
    # Issue 19: the worker that claimed the live run (only it may report on it), and the
    # worker whose run produced ``result_commit`` (a result approval binds to it too).
    worker: str | None = None
    result_worker: str | None = None


@dataclass(frozen=True)
class WorkerScope:
    """What a registered worker may serve (sealed ``worker.registered``): a claim is accepted
    only for a task whose queue, repo and change type are all in here (issue 19)."""

    queues: frozenset[str]
    repos: frozenset[str]
    change_types: frozenset[str]

    def serves(self, *, queue: str | None, repo: str, change_type: str) -> bool:
        return queue in self.queues and repo in self.repos and change_type in self.change_types

    def as_data(self) -> dict[str, list[str]]:
        return {"queues": sorted(self.queues), "repos": sorted(self.repos), "change_types": sorted(self.change_types)}

    @classmethod
    def from_data(cls, data: dict[str, object]) -> WorkerScope:
        def names(key: str) -> frozenset[str]:
            value = data.get(key)
            return frozenset(str(v) for v in value) if isinstance(value, list) else frozenset()
        return cls(names("queues"), names("repos"), names("change_types"))


@dataclass
class ApproverFact:
    generation: int
    confirmed: bool = False
    removed: bool = False


class Ledger:
    """Facts from the sealed chain; see the module docstring. Thread-safe."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self._lock = threading.RLock()
        self._reset()

    def _reset(self) -> None:
        self.cursor: Head | None = None
        self.tasks: dict[str, TaskFact] = {}
        self.approvers: dict[str, ApproverFact] = {}
        self.workers: dict[str, int | None] = {}  # current report-key generation, None if revoked
        self.worker_generations: dict[str, int] = {}  # the highest generation ever issued
        self.worker_scopes: dict[str, WorkerScope] = {}  # what each registered worker may serve
        self.frozen: dict[str, object] | None = None
        self.anomalies: list[Anomaly] = []
        self._accepted = 0  # anomalies[:_accepted] were accepted by an operator
        self._reported: set[tuple[str, str]] = set()
        self._eids: set[str] = set()  # every applied event's unique id: a copy is a replay
        self.snapshot_at: Head | None = None  # the sealed position of the snapshot loaded or written
        self._snapshot_sha: str | None = None  # the loaded snapshot's hash, until the chain names it
        self._loaded = False  # a snapshot was looked for (once per reset)
        self._rechecked = time.monotonic()
        self._rechecking: threading.Thread | None = None

    # -- following -------------------------------------------------------------------------
    def follow(self, *, seal: bool = True) -> Ledger:
        """Seal what is pending, then apply every newly sealed entry. Cheap when nothing is new.
        The first call starts from the newest valid snapshot (see the module docstring).

        ``seal=False`` applies only what is sealed already, without waiting for the sealer
        (which, after its holder died, can take until the lease runs out): for readiness."""
        with self._lock:
            if seal:
                with contextlib.suppress(AuditBroken):  # follow() below reports the same break
                    self.audit.seal_pending()
            head = Head.decode(self.audit.r.get(self.audit.head))
            first = len(self.anomalies)
            if self.cursor is not None and (head is None or head.seq < self.cursor.seq):
                # History shrank under us. Keep the anomaly; rebuild from what Redis holds once
                # an operator accepted the loss (a sealed marker), which a full replay then reads.
                self._anomaly(Anomaly(self.cursor.id, "rollback",
                                      f"sealed history went back from #{self.cursor.seq} to "
                                      f"#{head.seq if head else 0}", self.cursor.seq))
                if head is None or not self._head_accepts_rollback(head):
                    self._mark(self.anomalies[first:])
                    return self
                self._reset()
                self._loaded = True  # after an accepted rollback: a full replay, no snapshot
            if not self._loaded:
                self._loaded = True
                self._load_snapshot(head)
            self.cursor = self.audit.follow(self.cursor, self._entry, self._anomaly)
            if self._snapshot_sha is not None and self.cursor == head:
                # The chain never named the snapshot we started from: start again without it.
                log.warning("ledger: the snapshot at #%s is not named on the sealed chain; replaying the whole log",
                            self.snapshot_at.seq if self.snapshot_at else "?")
                self._reset()
                self._loaded = True
                self.cursor = self.audit.follow(None, self._entry, self._anomaly)
            self._mark(self.anomalies[first:])
            return self

    def start(self) -> Ledger:
        """Catch up at start-up (from the newest snapshot), then snapshot at once when the log
        has grown by :data:`SNAPSHOT_EVERY` since: the next start replays little."""
        self.follow()
        self.snapshot_if_due()
        return self

    def check_anchor(self) -> Ledger:
        """The cheap periodic check that replaced the full walk: sealed history did not go behind
        the cursor, and the sealed entries at the cursor and at the snapshot still carry the seals
        this ledger followed (history rewritten at them halts it). Entries rewritten between
        them are found by ``intake audit verify`` (a full walk, outside the ledger lock)."""
        with self._lock:
            first = len(self.anomalies)
            archived = self.audit.archived_through()  # another broker may have archived an old anchor
            for mark in (self.snapshot_at, self.cursor):
                if mark is not None and mark.seq > archived and not self.audit.sealed_at(mark):
                    self._anomaly(Anomaly(mark.id, "altered", f"event {mark.id} (#{mark.seq}): the sealed entry "
                                          "the ledger followed was changed or removed", mark.seq))
            self._mark(self.anomalies[first:])
        return self.follow(seal=False)

    def recheck_if_due(self, every_s: float = FULL_CHECK_EVERY_S) -> None:
        """Start the scheduled full walk (:meth:`recheck`) in a thread of its own when due."""
        now = time.monotonic()
        if now - self._rechecked < every_s or (self._rechecking is not None and self._rechecking.is_alive()):
            return
        self._rechecked = now
        self._rechecking = threading.Thread(target=self.recheck, name="ledger-recheck", daemon=True)
        self._rechecking.start()

    def recheck(self) -> Ledger:
        """Walk the whole sealed chain again (without re-applying it) *outside* the ledger lock,
        so dispatch, leases and approvals never wait on it; any break found (history rewritten
        behind the cursor) then halts this ledger. The clocks run it once a day."""
        found: list[Anomaly] = []
        try:
            self.audit.follow(None, lambda _entry: None, found.append)
        except redis.RedisError as exc:
            log.warning("ledger: the full re-check stopped (%s)", type(exc).__name__)
            return self
        with self._lock:
            before = len(self.anomalies)
            for anomaly in found:
                self._anomaly(anomaly)
            self._mark(self.anomalies[before:])
        return self

    # -- snapshots -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """The ledger's state as plain JSON data (sets sorted, so equal states hash equally)."""
        tasks = []
        for fact in self.tasks.values():
            raw = asdict(fact)
            raw["state"] = fact.state.value
            raw["used_nonces"] = sorted(fact.used_nonces)
            tasks.append(raw)
        return {"tasks": tasks, "approvers": {k: asdict(v) for k, v in self.approvers.items()},
                "workers": self.workers, "worker_generations": self.worker_generations,
                "worker_scopes": {k: v.as_data() for k, v in self.worker_scopes.items()},
                "frozen": self.frozen, "eids": sorted(self._eids)}

    def _restore(self, state: dict[str, Any]) -> None:
        for raw in state["tasks"]:
            raw = dict(raw)
            raw["state"] = TaskState(raw["state"])
            raw["approvals"] = [ApprovalFact(**a) for a in raw["approvals"]]
            raw["result_approvals"] = [ApprovalFact(**a) for a in raw["result_approvals"]]
            raw["dispatches"] = {k: DispatchFact(**d) for k, d in raw["dispatches"].items()}
            raw["used_nonces"] = set(raw["used_nonces"])
            self.tasks[raw["id"]] = TaskFact(**raw)
        self.approvers = {k: ApproverFact(**v) for k, v in state["approvers"].items()}
        self.workers = dict(state["workers"])
        self.worker_generations = {k: int(v) for k, v in state["worker_generations"].items()}
        self.worker_scopes = {k: WorkerScope.from_data(v) for k, v in state["worker_scopes"].items()}
        self.frozen = state["frozen"]
        self._eids = set(state["eids"])

    def snapshot_if_due(self, every: int = SNAPSHOT_EVERY) -> bool:
        """Snapshot the state at the cursor when ``every`` entries were sealed since the last
        snapshot (and the ledger is not halted: a snapshot only ever holds verified history).
        The blob goes to Redis beside the log; its hash goes on the sealed chain."""
        with self._lock:
            cursor = self.cursor
            done = self.snapshot_at.seq if self.snapshot_at else 0
            if cursor is None or cursor.seq - done < every or self.halted is not None:
                return False
            body = canonical_json({"v": SNAPSHOT_VERSION, "cursor": cursor.encode(), "state": self._state()})
        sha = hashlib.sha256(body).hexdigest()
        try:
            if not self.audit.store_snapshot(cursor, body):
                return False  # another broker stored a newer one
            self.audit.record("system", "ledger.snapshot", "audit", seq=cursor.seq, entry=cursor.id, sha256=sha,
                              bytes=len(body))
        except redis.RedisError as exc:
            log.warning("ledger: snapshot at #%s not stored (%s)", cursor.seq, type(exc).__name__)
            return False
        with self._lock:
            if self.snapshot_at is None or self.snapshot_at.seq < cursor.seq:
                self.snapshot_at = cursor
        log.info("ledger: snapshot at #%s (%d bytes)", cursor.seq, len(body))
        return True

    def _load_snapshot(self, head: Head | None) -> None:
        """Start from the stored snapshot when its MAC holds, it is not past the head and its
        anchor entry still carries the seal it names; otherwise from the beginning."""
        body = self.audit.load_snapshot()
        if body is None or head is None:
            return
        try:
            data = json.loads(body)
            cursor = Head.decode(data["cursor"])
            if data.get("v") != SNAPSHOT_VERSION or cursor is None:
                raise ValueError("unknown snapshot version")
            if cursor.seq > head.seq or not self.audit.sealed_at(cursor):
                log.warning("ledger: the snapshot at #%s does not match the sealed chain; replaying the whole log",
                            cursor.seq)
                return
            self._restore(data["state"])
        except (ValueError, KeyError, TypeError, AuditBroken) as exc:
            log.warning("ledger: unusable snapshot (%s); replaying the whole log", type(exc).__name__)
            self._reset()
            self._loaded = True
            return
        self.cursor = self.snapshot_at = cursor
        self._snapshot_sha = hashlib.sha256(body).hexdigest()

    def _mark(self, found: list[Anomaly]) -> None:
        """Put a marker on the log for each break this process found (once each): the log
        itself then says when dispatch stopped and why."""
        for anomaly in found:
            pipe = self.audit.r.pipeline(transaction=True)
            self.audit.append(pipe, event("system", "ledger.halted", "audit", kind=anomaly.kind,
                                          entry=anomaly.id, why=anomaly.message[:300]))
            pipe.execute()

    def _head_accepts_rollback(self, head: Head) -> bool:
        entries = self.audit.r.xrange(self.audit.stream, head.id, head.id)
        event = self.audit.parse_entry(entries[0][1]) if entries else None
        return event is not None and event.action == "audit.rollback_accepted"

    def _anomaly(self, anomaly: Anomaly) -> None:
        if not anomaly.fatal:
            return
        if any(a.id == anomaly.id and a.kind == anomaly.kind for a in self.anomalies):
            return
        self.anomalies.append(anomaly)
        log.error("ledger halted: %s", anomaly.message)

    def _entry(self, sealed: SealedEntry) -> None:
        """Apply one sealed broker event, once. A verbatim copy of a genuine event carries a
        valid MAC, so anyone who can XADD could replay an old thaw, key issue or enrolment. The
        sealer seals such a copy ``rejected:replay`` (never applied: it has no event here); and
        should its replay index have been tampered with, the event's unique ``eid`` still tells
        the copy here, which is skipped. Neither halts the ledger: a replay changes no sealed
        history, and halting on one would let any Redis writer stop the broker (issue 19)."""
        ev = sealed.event
        if ev is None:
            return
        if ev.action == "ledger.snapshot":
            if (self._snapshot_sha is not None and self.snapshot_at is not None
                    and ev.data.get("seq") == self.snapshot_at.seq and ev.data.get("sha256") == self._snapshot_sha):
                self._snapshot_sha = None  # the chain vouches for the snapshot this ledger started from
            return
        if not ev.action.startswith(_APPLIED_KINDS):
            return  # changes nothing here (see the module docstring)
        if ev.eid in self._eids:
            if self.first_report((sealed.id, "replayed")):
                log.warning("audit entry %s (#%d) is a replayed copy of an earlier event; skipped",
                            sealed.id, sealed.seq)
            return
        self._eids.add(ev.eid)
        self._apply(ev)

    @property
    def halted(self) -> str | None:
        """Why the ledger refuses to grant power now (an unaccepted break), or None."""
        with self._lock:
            open_ = self.anomalies[self._accepted:]
            return open_[0].message if open_ else None

    def require_live(self) -> None:
        why = self.halted
        if why is not None:
            raise LedgerHalted(f"dispatch is stopped: the audit chain is broken ({why}); "
                               "run `intake audit verify`")

    # -- applying --------------------------------------------------------------------------
    def _apply(self, ev: AuditEvent) -> None:
        action, subject, data = ev.action, ev.subject, ev.data
        kind, _, what = action.partition(".")
        if kind == "task":
            self._apply_task(ev, what, subject, data)
        elif action == "approval.recorded":
            fact = self.tasks.get(subject)
            if fact is not None and fact.state not in _TERMINAL:
                fact.approvals.append(ApprovalFact(
                    approver=ev.actor.removeprefix("approver:"), generation=int(data.get("generation", 0)),
                    spec_hash=str(data.get("spec_hash", "")), at=ev.at, via=str(data.get("via", "cli")),
                ))
        elif action == "result.approved":
            fact = self.tasks.get(subject)
            # Bound to the commit and to the worker whose run produced it (issue 19).
            if (fact is not None and fact.state is TaskState.AWAITING_RESULT_APPROVAL
                    and fact.result_commit is not None and data.get("sha") == fact.result_commit
                    and data.get("worker", fact.result_worker) == fact.result_worker):
                fact.result_approvals.append(ApprovalFact(
                    approver=ev.actor.removeprefix("approver:"), generation=int(data.get("generation", 0)),
                    spec_hash=str(data.get("spec_hash", "")), at=ev.at, via=str(data.get("via", "cli")),
                ))
        elif action == "broker.frozen":
            self.frozen = {"by": ev.actor, "reason": data.get("reason", ""), "at": ev.at}
        elif action == "broker.thawed":
            self.frozen = None
        elif kind == "approver":
            self._apply_approver(what, subject, data)
        elif action == "worker.key_issued":
            self.workers[subject] = self.worker_generations[subject] = int(data["generation"])  # type: ignore[call-overload]
        elif action == "worker.key_revoked":
            self.workers[subject] = None
        elif action == "worker.registered":
            self.worker_scopes[subject] = WorkerScope.from_data(data)
        elif action == "audit.rollback_accepted":
            self._accepted = len(self.anomalies)

    def _apply_task(self, ev: AuditEvent, what: str, subject: str, data: dict[str, object]) -> None:
        if what == "created":
            self.tasks[subject] = TaskFact(
                id=subject, state=TaskState.AWAITING_APPROVALS, spec_hash=str(data.get("spec_hash", "")),
                tier=str(data.get("tier", "")), requester=str(data.get("requester", "")),
                idea=str(data.get("idea", "")), repo=str(data.get("repo", "")), promoted_by=ev.actor.removeprefix("approver:"), created_at=ev.at,
            )
            return
        fact = self.tasks.get(subject)
        if fact is None or fact.state in _TERMINAL:
            return  # final, whatever comes after
        if what == "dispatched":
            kind = str(data.get("kind", "run"))
            if (fact.state, kind) in ((TaskState.QUEUED, "run"), (TaskState.DELIVERING, "deliver")):
                dispatch = DispatchFact(attempt=int(data["attempt"]), job=str(data["job"]),  # type: ignore[call-overload]
                                        nonce=str(data["nonce"]), exp=float(data["exp"]),  # type: ignore[arg-type]
                                        queue=str(data["queue"]), kind=kind,
                                        sha=str(data["sha"]) if data.get("sha") else None)
                if kind == "run" or dispatch.sha == fact.result_commit:
                    fact.dispatches[dispatch.nonce] = dispatch
            return
        if what == "delivery_started":
            nonce = str(data.get("nonce", ""))
            if fact.state is TaskState.DELIVERING and nonce in fact.dispatches:
                fact.deliveries = int(data.get("attempt", fact.deliveries + 1))  # type: ignore[call-overload]
                fact.run = str(data.get("run", "")) or None
                fact.worker = str(data.get("worker", "")) or None
                fact.started_at = ev.at
                fact.used_nonces.add(nonce)
                fact.dispatches = {}
            return
        if what == "amended":
            fact.spec_hash = str(data.get("spec_hash", ""))
            fact.tier = str(data.get("tier", fact.tier))
            fact.repo = str(data.get("repo", fact.repo))
            fact.approvals = []
        try:
            state = TaskState("awaiting_approvals" if what == "amended" else what)
        except ValueError:
            return  # task.<something> that is not a state change
        previous = fact.state
        fact.state = state
        fact.dispatches = {}  # a new state: earlier dispatch tokens are dead
        if previous is TaskState.RUNNING and state in (TaskState.AWAITING_RESULT_APPROVAL, TaskState.DELIVERING):
            # A new commit: a new quarantined result, and approvals of any earlier one are void.
            fact.result_commit = str(data.get("commit", "")) or None
            # issue 20: the SHA-256 of the diff the result is reviewed by (approvals bind to it)
            fact.result_diff = str(data.get("diff_sha256", "")) or None
            fact.result_base = str(data.get("base", "")) or None
            fact.result_approvals = []
            fact.result_worker = fact.worker
            rule = data.get("rule")
            fact.result_rule = rule if isinstance(rule, dict) else None
        if state is TaskState.RUNNING:
            fact.attempts = int(data.get("attempt", fact.attempts + 1))  # type: ignore[call-overload]
            fact.run = str(data.get("run", "")) or None
            fact.worker = str(data.get("worker", "")) or None
            fact.started_at = ev.at
            if data.get("nonce"):
                fact.used_nonces.add(str(data["nonce"]))
        else:
            fact.run = None
            fact.worker = None
        if state is TaskState.QUEUED:
            if data.get("window_ends_at") is not None:
                fact.window_ends_at = float(data["window_ends_at"])  # type: ignore[arg-type]
            if data.get("queue"):
                fact.queue = str(data["queue"])

    def _apply_approver(self, what: str, subject: str, data: dict[str, object]) -> None:
        gen = int(data.get("generation", 0))  # type: ignore[call-overload]
        if what == "added":
            self.approvers[subject] = ApproverFact(generation=gen)
            return
        fact = self.approvers.get(subject)
        if fact is None:
            return
        if what == "confirmed":
            fact.confirmed = True
        elif what == "reset":
            fact.generation, fact.confirmed = gen, False
        elif what == "removed":
            fact.generation, fact.removed, fact.confirmed = gen, True, False

    # -- asking ----------------------------------------------------------------------------
    def task(self, task_id: str) -> TaskFact | None:
        with self._lock:
            return self.tasks.get(task_id)

    def next_generation(self, approver_id: str) -> int:
        """The enrolment generation a new add or reset of ``approver_id`` gets: never one that
        was used before, so an old record or seed can never match again."""
        with self._lock:
            fact = self.approvers.get(approver_id)
            return 1 if fact is None else fact.generation + 1

    def approver_current(self, approver_id: str, generation: int) -> bool:
        """Whether ``approver_id`` is enrolled, confirmed and at ``generation`` now."""
        with self._lock:
            fact = self.approvers.get(approver_id)
            return fact is not None and not fact.removed and fact.confirmed and fact.generation == generation

    def counted_approvals(self, task_id: str, *, now: float, validity: float) -> list[ApprovalFact]:
        """The approvals that count for the task's current spec: for that spec hash, within
        their validity, by an approver whose enrolment is still the one that approved."""
        with self._lock:
            fact = self.tasks.get(task_id)
            return [] if fact is None else self._current(fact.approvals, fact.spec_hash,
                                                         lambda a: a.at > now - validity)

    def counted_result_approvals(self, task_id: str, *, now: float, validity: float) -> list[ApprovalFact]:
        """The approvals that count for the task's quarantined commit: of that very SHA and the
        worker that produced it (a new commit starts over), within their validity (issue 19:
        an old result approval does not count), one per approver, by an approver whose
        enrolment is still current."""
        with self._lock:
            fact = self.tasks.get(task_id)
            return [] if fact is None else self._current(fact.result_approvals, fact.spec_hash,
                                                         lambda a: a.at > now - validity)

    def _current(self, approvals: list[ApprovalFact], spec_hash: str,
                 keep: Callable[[ApprovalFact], bool]) -> list[ApprovalFact]:
        """One approval per approver, for ``spec_hash``, by their current enrolment, as ``keep`` says."""
        seen: set[str] = set()
        counted = []
        for a in approvals:
            if (a.spec_hash == spec_hash and a.approver not in seen and keep(a)
                    and self.approver_current(a.approver, a.generation)):
                seen.add(a.approver)
                counted.append(a)
        return counted

    def tampered(self, record: Task) -> str | None:
        """How a task record in Redis disagrees with the ledger, or None when it agrees."""
        fact = self.task(record.id)
        if fact is None:
            return "no such task in the sealed history"
        if record.state is not fact.state:
            return f"the record says {record.state.value}, the sealed history says {fact.state.value}"
        if record.spec_hash != fact.spec_hash or record.spec.spec_hash() != fact.spec_hash:
            return "the record's spec is not the one the sealed history names"
        return None

    def worker_scope(self, worker: str) -> WorkerScope | None:
        """What ``worker`` is registered to serve (None: not registered, so it serves nothing)."""
        with self._lock:
            return self.worker_scopes.get(worker)

    def first_report(self, key: tuple[str, str]) -> bool:
        """True the first time ``key`` is reported by this process (tamper reports stay few)."""
        with self._lock:
            if key in self._reported:
                return False
            self._reported.add(key)
            return True
