"""Handing queued tasks to RQ, and the broker's side of keeping runs alive and accounted for.

Security notes (DESIGN.md boundaries 5, 6 and 8):

* Jobs are written with RQ's JSON serializer, never pickle, and carry nothing but
  ``{"task_id", "token"}`` for the one entry point :data:`ENTRY_POINT`. Workers refuse anything
  else before it is imported or called (``workers.jobs``).
* Job ids are ``<task id>_<attempt>``: enqueueing the same attempt twice is a no-op, and a
  duplicate that slips through anyway is stopped by the worker's atomic nonce burn.
* The broker is the only minter: when a run is abandoned and the risk tier allows a retry, the
  task goes back to ``queued`` with a *new* token signed here (workers hold no private key).

:class:`Dispatcher` is the broker's handle. ``on_queued`` is the gatekeeper's hook (enqueue right
after the commit); :meth:`Dispatcher.reconcile` is run periodically and repairs both ways a task
could be lost: queued without a live job (a crash between commit and enqueue, a refused job), and
running without a live worker (a SIGKILLed worker whose heartbeat key expired).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import redis
from rq import Queue
from rq.exceptions import DuplicateJobError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from intake.errors import IllegalTransition, IntakeError, InvalidInput, NotFound, TokenInvalid
from intake.models import Task, TaskState
from intake.redis_conn import make_client
from intake.tokens import mint, verify_signature

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from intake.runtime import Broker

log = logging.getLogger("intake.queueing")

#: The one function a worker will run. Kept as a string: the broker never imports worker code.
ENTRY_POINT = "workers.entry.run_task"
#: Exactly these keyword arguments, and no positional ones.
JOB_KWARGS = frozenset({"task_id", "token"})

#: Clone, gates, push and the forge call come on top of the agent's own time limit.
JOB_TIMEOUT_MARGIN_S = 900
#: A finished job holds only a one-line outcome; keep it an hour for operators, then drop it
#: (its data still holds the now-burned token).
RESULT_TTL_S = 3600
#: Failed and refused jobs are evidence: a week, not RQ's default year.
FAILURE_TTL_S = 7 * 86400
#: A retry needs at least this much of the approval window left, or the run fails instead.
MIN_RETRY_WINDOW_S = 60

_LIVE = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.STARTED}


def job_id_for(task_id: str, attempt: int) -> str:
    """The deterministic RQ job id of a task's ``attempt`` (1-based). RQ allows ``[A-Za-z0-9_-]``."""
    return f"{task_id}_{attempt}"


def job_timeout_for(task: Task) -> int:
    """RQ's hard limit for the whole job: the agent's time limit plus the worker's own steps."""
    return task.spec.limits.run_timeout_s + JOB_TIMEOUT_MARGIN_S


class Dispatcher:
    """Enqueue queued tasks, re-enqueue lost ones, and reap runs whose worker died.

    Safe to run in several processes at once: every state change is a WATCHed transaction and
    every enqueue is idempotent on the job id.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.store = broker.store
        self.keys = broker.store.keys
        self._rq: redis.Redis | None = None
        self._signing_key: Ed25519PrivateKey | None = None

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

    def frozen(self) -> bool:
        return bool(self.store.r.exists(self.keys.freeze))

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
            # A worker that died between dequeue and claiming the task leaves a "started" job
            # behind; RQ itself gives up on it after its timeout plus a minute.
            beat = job.last_heartbeat or job.started_at
            limit = (job.timeout or 0) + 120
            if beat is None or datetime.now(timezone.utc) - _aware(beat) > timedelta(seconds=limit):
                return False
        return True

    def enqueue(self, task: Task) -> str | None:
        """Put a queued task's job on ``task.queue``; returns the job id, or None if skipped.

        Skipped when the task is not queued, has no token or queue, its token has expired, or
        intake is frozen (reconcile enqueues it after the thaw). Idempotent: a live job for the
        same attempt is left alone; a dead one (refused, expired) is replaced.
        """
        if task.state is not TaskState.QUEUED or not task.token or not task.queue:
            return None
        if self.frozen():
            return None
        now = self.store.clock()
        ttl = int((task.token_expires_at or 0) - now)
        if ttl <= 0:
            return None  # expire_due moves it to expired
        job_id = job_id_for(task.id, task.attempts + 1)
        if self.job_is_live(job_id):
            return job_id
        queue = self.queue(task.queue)
        try:
            Job.fetch(job_id, connection=self.rq, serializer=JSONSerializer).delete(
                remove_from_queue=True, delete_dependents=False
            )
        except Exception:  # no such job, or a hash too broken to load: delete it raw
            self.rq.delete(Job.key_for(job_id))
        try:
            queue.enqueue_call(
                ENTRY_POINT,
                kwargs={"task_id": task.id, "token": task.token},
                job_id=job_id,
                timeout=job_timeout_for(task),
                result_ttl=RESULT_TTL_S,
                failure_ttl=FAILURE_TTL_S,
                ttl=ttl,  # a job that waits longer than its token lives is useless
                # RQ logs the description; the default one would hold the token.
                description=f"intake task {task.id} attempt {task.attempts + 1}",
                unique=True,
            )
        except DuplicateJobError:
            pass  # another process enqueued the same attempt first
        log.info("enqueued %s on %s", job_id, task.queue)
        return job_id

    def on_queued(self, task: Task) -> None:
        """The gatekeeper's hook, called after the commit. A failure here is logged, not
        raised: the task is safely queued and :meth:`reconcile` enqueues it later."""
        try:
            self.enqueue(task)
        except (redis.RedisError, IntakeError, OSError) as exc:
            log.warning("could not enqueue %s now (%s); reconcile will retry", task.id, type(exc).__name__)

    # -- reconciling -----------------------------------------------------------------------
    def enqueue_missing(self) -> int:
        """(Re)enqueue every queued task without a live job. Returns how many were enqueued."""
        if self.frozen():
            return 0
        count = 0
        now = self.store.clock()
        for task in self.store.open_tasks():
            if task.state is not TaskState.QUEUED or (task.token_expires_at or 0) <= now:
                continue
            if task.queue is None or self.job_is_live(job_id_for(task.id, task.attempts + 1)):
                continue
            if self.enqueue(task) is not None:
                log.info("re-enqueued %s (no live job)", task.id)
                count += 1
        return count

    def reap_abandoned(self) -> int:
        """Settle every running task whose heartbeat key is gone (its worker died or hung).

        Per the risk tier's ``retries``: back to ``queued`` with a new token (then enqueued), or
        ``failed`` as abandoned. Returns how many tasks were settled.
        """
        count = 0
        for task in self.store.open_tasks():
            if task.state is not TaskState.RUNNING or self.store.r.exists(self.keys.heartbeat(task.id)):
                continue
            try:
                settled = self._settle_abandoned(task.id)
            except (IllegalTransition, InvalidInput, NotFound):
                continue  # it finished, or a worker claimed it, meanwhile
            count += 1
            if settled.state is TaskState.QUEUED:
                self.on_queued(settled)
        return count

    def reconcile(self) -> int:
        """One pass of both repairs; call it every few seconds from the broker's loop.

        Returns the number of tasks acted on (0 when everything is in order).
        """
        return self.reap_abandoned() + self.enqueue_missing()

    # -- abandoned runs --------------------------------------------------------------------
    def _key(self) -> Ed25519PrivateKey:
        if self._signing_key is None:
            from intake.keys import load_signing_key

            self._signing_key = load_signing_key(self.broker.settings)
        return self._signing_key

    def _abandoned(self, task: Task) -> None:
        """The check under WATCH: still running, still without a heartbeat."""
        if task.state is not TaskState.RUNNING:
            raise InvalidInput("no longer running")
        if self.store.r.exists(self.keys.heartbeat(task.id)):
            raise InvalidInput("alive again")

    def _retry_plan(self, task: Task) -> tuple[int, str | None]:
        """(token ttl, None) when a retry is allowed, else (0, why not)."""
        policy = self.broker.policy
        tier = policy.risk_tiers.get(task.risk_tier)
        retries = tier.retries if tier is not None else 0
        if task.attempts > retries:
            allowed = "no retries" if retries == 0 else f"{retries} retr{'y' if retries == 1 else 'ies'}"
            return 0, f"the {task.risk_tier} tier allows {allowed}"
        if task.spec.policy_version != policy.version_hash:
            return 0, "the policy changed since the task was approved"
        # Redis is storage, not authority: re-mint only on the strength of the token the broker
        # itself signed for this task and this spec, and keep its signed expiry (a retry is a new
        # start inside the original approval window). A task record written straight into Redis
        # has no such token, so it never gets one minted.
        try:
            claims = verify_signature(task.token or "", self._key().public_key(), now=self.store.clock())
        except TokenInvalid as exc:
            return 0, f"its token does not verify ({exc.reason})"
        if task.attempts < 1 or claims.task != task.id or not (
            claims.spec_hash == task.spec_hash == task.spec.spec_hash()
        ):
            return 0, "its token does not match the stored task"
        ttl = int(claims.exp - self.store.clock())
        if ttl < MIN_RETRY_WINDOW_S:
            return 0, "the approval window has closed"
        return ttl, None

    def _settle_abandoned(self, task_id: str) -> Task:
        task = self.store.get_task(task_id)
        self._abandoned(task)
        attempt = task.attempts
        ttl, why_not = self._retry_plan(task)
        lost = f"attempt {attempt} was abandoned (its worker stopped sending heartbeats)"
        if why_not is None:
            token, claims = mint(self._key(), task_id=task.id, spec=task.spec, now=self.store.clock(), ttl_s=ttl)
            repo = self.broker.policy.find_repo(task.spec.repo)
            update: dict[str, Any] = {"token": token, "token_expires_at": float(claims.exp)}
            if repo is not None:
                update["queue"] = self.broker.policy.queue_for(repo)
            return self.store.move_task(
                task_id, TaskState.QUEUED, actor="system", reason=f"retrying: {lost}",
                update=update, check=self._abandoned, retry=True, attempt=attempt,
                spec_hash=task.spec_hash, token_expires_at=float(claims.exp),
            )
        return self.store.move_task(
            task_id, TaskState.FAILED, actor="system", reason=f"abandoned: {lost}; not retried: {why_not}",
            check=self._abandoned, abandoned=True, attempt=attempt,
        )


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
