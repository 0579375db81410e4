"""Handing queued tasks to RQ, and the broker's side of keeping runs alive and accounted for.

Security notes (DESIGN.md boundaries 5, 6 and 8, and *Authority*):

* Jobs are written with RQ's JSON serializer, never pickle, and carry nothing but
  ``{"task_id", "token"}`` for the one entry point :data:`ENTRY_POINT`. Workers refuse anything
  else before it is imported or called (``workers.jobs``).
* Every decision here is taken on the broker's verified ledger, not on Redis: a task is
  dispatched only while the ledger says it is queued, its approvals still meet the policy and
  intake is not frozen; a run is reaped (retried or failed) only when the ledger says it is
  running and its broker-signed lease has lapsed. A Redis record that disagrees with the ledger
  is refused and reported (``tamper.detected``).
* Dispatch tokens are minted per attempt here (:func:`intake.protocol.tokens.mint_dispatch`), live
  ``INTAKE_DISPATCH_TTL`` seconds, and bind task, attempt, job id, queue, nonce and the spec. The
  minting is audited (``task.dispatched``, with the nonce) before the job is enqueued, so the
  ledger knows every nonce that may claim the attempt. Job ids are ``<task id>_<attempt>``.

:class:`Dispatcher` is the broker's handle. ``on_queued`` is the gatekeeper's hook (enqueue right
after the commit); :meth:`Dispatcher.reconcile` runs every few seconds and repairs both ways a
task could be lost: queued without a live job (a crash between commit and enqueue, a token that
expired in the queue), and running without a live lease (a SIGKILLed worker).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from rq import Queue
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from intake.audit.ledger import TaskFact
from intake.core.errors import (
    IllegalTransition,
    IntakeError,
    InvalidInput,
    LedgerHalted,
    NotFound,
    TokenInvalid,
)
from intake.core.models import Task, TaskState
from intake.core.redis_conn import make_client
from intake.protocol.envelope import ProvenanceInvalid
from intake.protocol.jobs import ENTRY_POINT, FAILURE_TTL_S
from intake.protocol.tokens import mint_dispatch, mint_lease, verify_lease
from intake.tasks import provenance
from intake.tasks.handle import BrokerHandle

log = logging.getLogger("intake.tasks.dispatch")


#: Clone, gates, push and the forge call come on top of the agent's own time limit.
JOB_TIMEOUT_MARGIN_S = 900
#: A finished job holds only a one-line outcome; keep it an hour for operators, then drop it.
RESULT_TTL_S = 3600
#: A retry needs at least this much of the approval window left, or the run fails instead.
MIN_RETRY_WINDOW_S = 60
#: A lease counts as lapsed this long after its expiry (the worker stops at the expiry).
LEASE_GRACE_S = 5

_LIVE = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.STARTED}


def job_id_for(queue: str, task_id: str, attempt: int | str) -> str:
    """The deterministic RQ job id of a task's ``attempt`` (1-based; ``d<n>`` for a delivery) on
    ``queue``. RQ allows ``[A-Za-z0-9_-]``. The queue comes first so that a named worker's Redis
    user can be granted only its queues' job keys (``rq:job:<queue>_T-*``, see
    ``intake.core.redis_acl``): queue names are lower case, task ids start ``T-``."""
    return f"{queue}_{task_id}_{attempt}"


def job_timeout_for(task: Task) -> int:
    """RQ's hard limit for the whole job: the agent's time limit plus the worker's own steps."""
    return task.spec.limits.run_timeout_s + JOB_TIMEOUT_MARGIN_S


class Dispatcher:
    """Dispatch queued tasks, re-dispatch lost ones, and reap runs whose lease lapsed.

    Safe to run in several processes at once: every state change is a WATCHed transaction, every
    enqueue is idempotent on the job id, and every dispatch token minted is on the record.
    """

    def __init__(self, broker: BrokerHandle) -> None:
        self.broker = broker
        self.store = broker.store
        self.keys = broker.store.keys
        self.ledger = broker.ledger
        self._rq: redis.Redis | None = None

    # -- connections -----------------------------------------------------------------------
    @property
    def rq(self) -> redis.Redis:
        """A bytes connection for RQ (RQ cannot use a decoding client)."""
        if self._rq is None:
            self._rq = make_client(self.broker.url, decode=False)
        return self._rq

    def close(self) -> None:
        if self._rq is not None:
            self._rq.close()
            self._rq = None

    def queue(self, name: str) -> Queue:
        return Queue(name, connection=self.rq, serializer=JSONSerializer)

    def tamper(self, task_id: str, why: str, **data: Any) -> None:
        """Report a record that disagrees with the ledger (once per process and kind)."""
        if self.ledger.first_report((task_id, why)):
            log.error("tampering: task %s: %s", task_id, why)
            self.store.audit.record("system", "tamper.detected", task_id, why=why, **data)

    # -- enqueueing ------------------------------------------------------------------------
    def job_is_live(self, job_id: str) -> bool:
        """Whether RQ still holds a job that some worker will run (or is running)."""
        try:
            job = Job.fetch(job_id, connection=self.rq, serializer=JSONSerializer)
            status = job.get_status(refresh=False)
        except NoSuchJobError:
            return False
        except Exception:  # a malformed hash is no live job; it is replaced below
            return False
        if status not in _LIVE:
            return False
        if status == JobStatus.QUEUED:
            # "queued" only counts while the id is on its queue (or just popped by a worker).
            queue = self.queue(job.origin)
            if self.rq.lpos(queue.key, job_id) is not None:
                return True
            if self.rq.lpos(queue.intermediate_queue_key, job_id) is not None:
                return True
            try:
                return job.get_status(refresh=True) == JobStatus.STARTED  # a worker took it meanwhile
            except Exception:
                return False
        if status == JobStatus.STARTED:
            beat = job.last_heartbeat or job.started_at
            limit = (job.timeout or 0) + 120
            if beat is None or datetime.now(UTC) - _aware(beat) > timedelta(seconds=limit):
                return False
        return True

    def _dispatchable(self, task_id: str) -> tuple[Task, TaskFact] | None:
        """The task and its ledger fact when the ledger says it may be dispatched now: queued
        (a run), or delivering with no live delivery attempt (a delivery of its result commit)."""
        self.ledger.follow().require_live()
        fact = self.ledger.task(task_id)
        if fact is None or self.ledger.frozen is not None:
            return None
        if fact.state is TaskState.QUEUED:
            if (fact.window_ends_at or 0) <= self.store.clock():
                return None  # expire_due ends it
        elif fact.state is TaskState.DELIVERING:
            if fact.result_commit is None or (fact.run is not None and not self._run_lapsed(fact)):
                return None
        else:
            return None
        try:
            task = self.store.get_task(task_id)
        except (NotFound, InvalidInput):
            self.tamper(task_id, f"the ledger's {fact.state.value} task has no record")
            return None
        if (why := self.ledger.tampered(task)) is not None:
            self.tamper(task_id, why)
            return None
        if fact.state is TaskState.QUEUED:
            gate = self.broker.gatekeeper
            _, tier = gate._tier(task.spec)
            if not gate.satisfied(tier, gate.valid_approvals(task, self.store.clock())):
                return None  # requeue_unsatisfied moves it back to awaiting approvals
        return task, fact

    def _run_lapsed(self, fact: TaskFact) -> bool:
        return (fact.started_at or 0) + LEASE_GRACE_S * 2 <= self.store.clock() and not self.lease_ok(fact)

    @staticmethod
    def next_job(fact: TaskFact) -> tuple[int, str]:
        """(attempt, RQ job id) of the task's next dispatch on its queue: a run
        ``<queue>_<id>_<n>`` while queued, a delivery ``<queue>_<id>_d<n>`` while delivering."""
        queue = fact.queue or ""
        if fact.state is TaskState.DELIVERING:
            return fact.deliveries + 1, job_id_for(queue, fact.id, f"d{fact.deliveries + 1}")
        return fact.attempts + 1, job_id_for(queue, fact.id, fact.attempts + 1)

    def enqueue(self, task_id: str) -> str | None:
        """Dispatch a task's next attempt to RQ; returns the job id, or None if skipped.

        Skipped unless the ledger says it may go now (see :meth:`_dispatchable`). A live job
        holding an unexpired token for the attempt is left alone; otherwise a fresh token is
        minted, recorded (``task.dispatched``) and enqueued, replacing a dead job. A delivery
        token is bound to the result commit the sealed history names, never to a record's.
        """
        found = self._dispatchable(task_id)
        if found is None:
            return None
        task, fact = found
        now = self.store.clock()
        attempt, job_id = self.next_job(fact)
        fresh = [d for d in fact.dispatches.values() if d.attempt == attempt and d.exp > now + 5]
        if fresh and self.job_is_live(job_id):
            return job_id
        queue_name = fact.queue  # the sealed history's, not the record's: Redis cannot reroute work
        if not queue_name:
            return None
        delivering = fact.state is TaskState.DELIVERING
        sha = fact.result_commit if delivering else None
        limit = float(self.broker.settings.dispatch_ttl) if delivering else (fact.window_ends_at or now) - now
        ttl = int(min(self.broker.settings.dispatch_ttl, limit))
        if ttl <= 5:
            return None
        issued = None
        if sha is not None:  # every delivered change carries the broker's signed provenance
            try:
                issued = provenance.issue(self.broker, task, sha)
            except ProvenanceInvalid as exc:
                log.error("not delivering %s: no provenance (%s)", task.id, exc)
                return None
        token, claims = mint_dispatch(self.broker.signer, task_id=task.id, attempt=attempt, job_id=job_id,
                                      queue=queue_name, spec=task.spec, now=now, ttl_s=ttl,
                                      deliver_sha=sha, draft=delivering and fact.result_rule is not None,
                                      provenance=issued.envelope if issued else None,
                                      reviewed=(fact.result_base, fact.result_diff)
                                      if delivering and fact.result_base and fact.result_diff else None)
        expected = fact.state

        def build(pipe: Any) -> bool:
            current = self.store.read_task(pipe, task.id)
            if current.state is not expected or current.spec_hash != task.spec_hash:
                return False
            pipe.multi()
            self.store.write_task(pipe, current.model_copy(update={"updated_at": now}))
            self.store.emit(pipe, "system", "task.dispatched", task.id, attempt=attempt, job=job_id,
                            nonce=claims.nonce, exp=float(claims.exp), queue=queue_name, kid=claims.kid,
                            kind=claims.kind, **({"sha": sha} if sha else {}))
            if issued is not None:
                provenance.record_issued(self.broker, pipe, issued)
            return True

        if not self.store.transact([self.keys.task(task.id)], build):
            return None
        self.store.audit.seal_pending()  # the ledger must know the nonce before a worker claims it
        queue = self.queue(queue_name)
        try:
            Job.fetch(job_id, connection=self.rq, serializer=JSONSerializer).delete(
                remove_from_queue=True, delete_dependents=False
            )
        except Exception:  # no such job, or a hash too broken to load: delete it raw
            self.rq.delete(Job.key_for(job_id))
        try:
            queue.enqueue_call(
                ENTRY_POINT,
                kwargs={"task_id": task.id, "token": token},
                job_id=job_id,
                timeout=job_timeout_for(task),
                result_ttl=RESULT_TTL_S,
                failure_ttl=FAILURE_TTL_S,
                ttl=ttl,  # a job that waits longer than its token lives is useless
                # RQ logs the description; the default one would hold the token.
                description=f"intake task {task.id} {'delivery' if delivering else 'attempt'} {attempt}",
                unique=True,
            )
        except DuplicateJobError:
            pass  # another process enqueued the same attempt first
        log.info("dispatched %s on %s", job_id, queue_name)
        return job_id

    def write_lease(self, worker: str, task_id: str, attempt: int, run: str, status: str = "granted",
                    reason: str = "") -> None:
        """Put a broker-signed lease (a grant, or a refusal saying why) on the run's lease key,
        under the claiming worker's name, which that worker polls every 0.25 s (:mod:`workers.lease`)."""
        ttl = self.broker.settings.lease_ttl
        token, _ = mint_lease(self.broker.signer, task_id=task_id, attempt=attempt, run_id=run,
                              now=self.store.clock(), status=status, reason=reason, ttl_s=ttl)
        self.store.r.set(self.keys.lease(worker, task_id), token, ex=ttl + LEASE_GRACE_S * 2)
        if status == "granted":
            # A grant decided just before a revoke was sealed may land after the revoke's pushed
            # refusal: look again now, and put the refusal back if the run is no longer live.
            fact = self.ledger.follow(seal=False).task(task_id)
            if fact is not None and fact.state is TaskState.REVOKED:
                self.write_lease(worker, task_id, attempt, run, status="revoked", reason="the task was revoked")

    def on_revoked(self, task_id: str, worker: str, attempt: int, run: str) -> None:
        """The gatekeeper's hook after a revoke is sealed: tell the live run to stop now (a
        signed refusal on its lease key) instead of at its next heartbeat. Someone who can
        write Redis can delete the refusal, but not forge a grant: the run then stops when its
        last lease runs out. A failure here is logged: the next heartbeat is refused anyway."""
        try:
            self.write_lease(worker, task_id, attempt, run, status="revoked", reason="the task was revoked")
        except (redis.RedisError, OSError) as exc:
            log.warning("could not tell %s's run to stop now (%s); its next heartbeat is refused",
                        task_id, type(exc).__name__)

    def on_queued(self, task: Task) -> None:
        """The gatekeeper's hook, called after the commit. A failure here is logged, not
        raised: the task is safely queued and :meth:`reconcile` dispatches it later."""
        try:
            self.enqueue(task.id)
        except (redis.RedisError, IntakeError, OSError) as exc:
            log.warning("could not dispatch %s now (%s); reconcile will retry", task.id, type(exc).__name__)

    # -- reconciling -----------------------------------------------------------------------
    def enqueue_missing(self) -> int:
        """(Re)dispatch every task the ledger says is queued (or delivering, with no live
        delivery attempt) and that has no live job holding an unexpired token. Returns how
        many were dispatched."""
        count = 0
        now = self.store.clock()
        self.ledger.follow()
        for fact in [f for f in list(self.ledger.tasks.values())
                     if f.state in (TaskState.QUEUED, TaskState.DELIVERING)]:
            attempt, job_id = self.next_job(fact)
            fresh = [d for d in fact.dispatches.values() if d.attempt == attempt and d.exp > now + 5]
            if fresh and self.job_is_live(job_id):
                continue
            if self.enqueue(fact.id) is not None:
                count += 1
        return count

    def lease_ok(self, fact: TaskFact) -> bool:
        """Whether the running attempt holds a broker-signed, granted, unexpired lease."""
        if fact.worker is None:
            return False
        raw = self.store.r.get(self.keys.lease(fact.worker, fact.id))  # the claimer's own lease key
        if not raw:
            return False
        try:
            lease = verify_lease(raw, self.broker.keyring)
        except TokenInvalid:
            return False
        attempt = fact.deliveries if fact.state is TaskState.DELIVERING else fact.attempts
        return (lease.granted and lease.task == fact.id and lease.attempt == attempt
                and lease.run == fact.run and lease.exp + LEASE_GRACE_S > self.store.clock())

    def reap_abandoned(self) -> int:
        """Settle every run the ledger says is running whose lease lapsed (its worker died,
        hung, or was told to stop). Per the risk tier's ``retries``: back to ``queued`` (then
        dispatched with a new token), or ``failed`` as abandoned."""
        count = 0
        now = self.store.clock()
        for fact in [f for f in list(self.ledger.tasks.values()) if f.state is TaskState.RUNNING]:
            if (fact.started_at or now) + LEASE_GRACE_S * 2 > now or self.lease_ok(fact):
                continue
            try:
                settled = self._settle_abandoned(fact)
            except (IllegalTransition, InvalidInput, NotFound):
                continue  # it finished meanwhile
            if settled is not None:
                count += 1
                if settled.state is TaskState.QUEUED:
                    self.on_queued(settled)
        return count

    def reconcile(self) -> int:
        """One pass of the repairs; call it every few seconds from the broker's loop.

        Returns the number of tasks acted on (0 when everything is in order). Does nothing but
        report while the ledger is halted."""
        records = self.store.open_tasks()  # read before following: every record read has its events sealed
        try:
            self.ledger.follow().require_live()
        except LedgerHalted as exc:
            log.error("%s", exc)
            return 0
        self.check_records(records)
        return self.broker.gatekeeper.requeue_unsatisfied() + self.reap_abandoned() + self.enqueue_missing()

    def check_records(self, records: list[Task]) -> None:
        """Report every open task record that disagrees with the ledger (a revived, forged or
        edited record); nothing is ever done on the strength of one."""
        for record in records:
            if (why := self.ledger.tampered(record)) is not None:
                self.tamper(record.id, why)

    # -- abandoned runs --------------------------------------------------------------------
    def _retry_plan(self, task: Task, fact: TaskFact) -> str | None:
        """None when a retry is allowed, else why not (all from the ledger and the policy)."""
        policy = self.broker.policy
        tier = policy.risk_tiers.get(fact.tier)
        retries = tier.retries if tier is not None else 0
        if fact.attempts > retries:
            allowed = "no retries" if retries == 0 else f"{retries} retr{'y' if retries == 1 else 'ies'}"
            return f"the {fact.tier} tier allows {allowed}"
        if task.spec.policy_version != policy.version_hash:
            return "the policy changed since the task was approved"
        gate = self.broker.gatekeeper
        _, tier_obj = gate._tier(task.spec)
        valid = gate.valid_approvals(task, self.store.clock())
        if not gate.satisfied(tier_obj, valid):
            return "its approvals no longer meet the policy"
        if min(a.at for a in valid) + policy.clocks.approval_validity - self.store.clock() < MIN_RETRY_WINDOW_S:
            return "the approval window has closed"
        return None

    def _settle_abandoned(self, fact: TaskFact) -> Task | None:
        task = self.store.get_task(fact.id)
        if (why := self.ledger.tampered(task)) is not None:
            self.tamper(fact.id, why)
            return None
        attempt, run = fact.attempts, fact.run

        def still_abandoned(current: Task) -> None:
            now_fact = self.ledger.follow().task(fact.id)
            if (now_fact is None or now_fact.state is not TaskState.RUNNING or now_fact.attempts != attempt
                    or now_fact.run != run or self.lease_ok(now_fact)):
                raise InvalidInput("alive again or settled")

        why_not = self._retry_plan(task, fact)
        lost = f"attempt {attempt} was abandoned (its lease lapsed: the worker stopped or was stopped)"
        if why_not is None:
            gate = self.broker.gatekeeper
            valid = gate.valid_approvals(task, self.store.clock())
            window = min(a.at for a in valid) + self.broker.policy.clocks.approval_validity
            return self.store.move_task(
                fact.id, TaskState.QUEUED, actor="system", reason=f"retrying: {lost}",
                update={"window_ends_at": float(window)}, check=still_abandoned, retry=True, attempt=attempt,
                spec_hash=task.spec_hash, window_ends_at=float(window), queue=fact.queue,
            )
        return self.store.move_task(
            fact.id, TaskState.FAILED, actor="system", reason=f"abandoned: {lost}; not retried: {why_not}",
            check=still_abandoned, abandoned=True, attempt=attempt,
        )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
