"""Claiming a task for a run, and settling it afterwards: the worker's only state changes.

:meth:`Claimer.claim` is what the entry point does before anything else (DESIGN.md boundaries
5, 6 and 8). In order:

1. the job's token must be the task's current token (otherwise the job is stale or planted, and
   the task is left alone: its real job is elsewhere);
2. the task must be ``queued`` (a revoked, denied, expired or finished task is never started, and
   a running one is not started twice) and intake must not be frozen;
3. :func:`~intake.tokens.verify_capability` with the broker's *public* key only: signature,
   expiry, the spec hash recomputed from the stored spec, task id, scope, the nonce not burned;
4. the policy file must be the version the spec was approved under (the worker reads the
   dependency allowlist from it, so this pins the allowlist to what the approvers saw); on a
   mismatch the file is read again first, so a long-running worker follows policy updates;
5. the task's repo and change type must be inside this worker's scope.

Then one WATCHed transaction burns the nonce, moves the task ``queued -> running`` with its
audit event and sets the run's heartbeat key. A second worker, a replayed job or a revocation
racing with it makes the transaction fail or re-check, so a token starts at most one run.

A refusal is audited (``job.refused``) and raises :class:`~workers.jobs.JobRefused`. When the
fault is the task's own (its token is bad or expired, the policy moved on, nobody serves it
here), the task ends ``failed`` or ``expired`` with the reason and its nonce burned, in the
same transaction as the refusal; otherwise the task is left as it is.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from intake.errors import IllegalTransition, IntakeError, InvalidInput, NotFound, PolicyError, TokenInvalid
from intake.models import Task, TaskState
from intake.policy import Policy, load_policy
from intake.store import NONCE_GRACE_S, Pipe, Store
from intake.tokens import Claims, verify_capability
from workers.config import WorkerConfig
from workers.jobs import JobRefused

log = logging.getLogger("intake.worker")



@dataclass(frozen=True)
class Claim:
    """A task this worker now runs: the task as moved to ``running``, the run's id (the value
    of its heartbeat key) and the attempt number."""

    task: Task
    run_id: str
    attempt: int
    job_id: str
    claims: Claims
    policy: Policy


class Claimer:
    """Verify, claim and settle tasks for one worker."""

    def __init__(
        self,
        store: Store,
        *,
        public_key: Ed25519PublicKey,
        policy: Policy,
        policy_path: Path | None = None,
        config: WorkerConfig,
        actor: str,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.keys = store.keys
        self.public_key = public_key
        self.policy = policy
        self.policy_path = policy_path
        self.config = config
        self.actor = actor
        self.clock = clock

    # -- refusing --------------------------------------------------------------------------
    def _refused(self, subject: str, reason: str, message: str, **data: Any) -> JobRefused:
        self.store.audit.record(self.actor, "job.refused", subject, reason=reason, **data)
        return JobRefused(reason, message)

    def _end(self, task: Task, to: TaskState, reason: str, message: str, **data: Any) -> JobRefused:
        """End a queued task because of a refusal: state, burned nonce and both events at once."""

        def still_queued(current: Task) -> None:
            if current.state is not TaskState.QUEUED or current.token != task.token:
                raise InvalidInput("changed meanwhile")

        def also(pipe: Pipe, ended: Task) -> None:
            self.store.burn_token(pipe, task.token)
            self.store.emit(pipe, self.actor, "job.refused", task.id, reason=reason, **data)

        try:
            self.store.move_task(task.id, to, actor=self.actor, reason=message, check=still_queued,
                                 also=also, refused=reason)
        except (IllegalTransition, InvalidInput, NotFound):
            # Someone else settled it first; the refusal still goes on the record.
            return self._refused(task.id, reason, message, **data)
        return JobRefused(reason, message)

    def claim(self, task_id: str, token: str, *, job_id: str, queue: str, heartbeat_ttl_s: int) -> Claim:
        """Check everything and move the task to ``running``; raise :class:`JobRefused` if not."""
        data = {"job": job_id, "queue": queue}
        try:
            task = self.store.get_task(task_id)
        except (NotFound, InvalidInput):
            raise self._refused(job_id, "no_such_task", f"no task {task_id}", **data) from None
        if not hmac.compare_digest((task.token or "").encode(), token.encode()):
            raise self._refused(task.id, "stale_token",
                                "the job's token is not the task's current token", **data)
        if task.state is not TaskState.QUEUED:
            raise self._refused(task.id, f"task_{task.state.value}",
                                f"task {task.id} is {task.state.value}; it is not started", **data)
        if self.store.r.exists(self.keys.freeze):
            raise self._refused(task.id, "frozen", "intake is frozen; no task starts", **data)
        if queue != task.queue:
            raise self._refused(task.id, "wrong_queue",
                                f"the job came from queue {queue}, the task belongs on {task.queue}", **data)
        try:
            claims = verify_capability(
                token, self.public_key, task_id=task.id, spec=task.spec, now=self.clock(),
                nonce_burned=lambda nonce: bool(self.store.r.exists(self.keys.nonce(nonce))),
            )
        except TokenInvalid as exc:
            if exc.reason == "expired":
                raise self._end(task, TaskState.EXPIRED, "token_expired",
                                "token expired before the task started", **data) from None
            raise self._end(task, TaskState.FAILED, f"token_{exc.reason}",
                            f"capability token refused ({exc.reason}): {exc}", **data) from None
        policy = self.policy_for(task.spec.policy_version)
        if policy is None:
            raise self._end(task, TaskState.FAILED, "stale_policy",
                            "the policy changed since this task was approved; amend it and approve again",
                            **data)
        if not self.config.serves(task.spec.repo, task.spec.change_type):
            raise self._end(
                task, TaskState.FAILED, "misrouted",
                f"misrouted: worker {self.actor.removeprefix('worker:')} does not serve "
                f"{task.spec.change_type} work on {task.spec.repo}",
                repo=task.spec.repo, change_type=task.spec.change_type, **data,
            )
        return self._start(task, token, claims, policy, job_id=job_id, queue=queue, ttl_s=heartbeat_ttl_s)

    def policy_for(self, version: str) -> Policy | None:
        """The policy with ``version`` (its hash): the loaded one, else the file read again."""
        if self.policy.version_hash != version and self.policy_path is not None:
            try:
                self.policy = load_policy(self.policy_path)
            except PolicyError as exc:
                log.warning("cannot reload the policy: %s", exc)
        return self.policy if self.policy.version_hash == version else None

    def _start(self, task: Task, token: str, claims: Claims, policy: Policy, *, job_id: str, queue: str,
               ttl_s: int) -> Claim:
        run_id = secrets.token_hex(16)
        nonce_key = self.keys.nonce(claims.nonce)

        def build(pipe: Pipe) -> Task | str:
            current = self.store.read_task(pipe, task.id)
            # Everything may have changed since the checks above; what matters is re-read here.
            if current.state is not TaskState.QUEUED:
                return f"task_{current.state.value}"
            if current.token != token:
                return "stale_token"
            if current.spec.spec_hash() != claims.spec_hash:
                return "spec_changed"  # edited after the token was verified: not what was signed
            if pipe.exists(self.keys.freeze):
                return "frozen"
            if pipe.exists(nonce_key):
                return "token_burned"
            now = self.clock()
            running = current.model_copy(update={
                "state": TaskState.RUNNING, "attempts": current.attempts + 1,
                "updated_at": now, "reason": None,
            })
            self.store.check_task_move(current, TaskState.RUNNING)
            pipe.multi()
            self.store.write_task(pipe, running)
            pipe.set(nonce_key, "burned", ex=max(int(claims.exp - now), 0) + NONCE_GRACE_S)
            pipe.set(self.keys.heartbeat(task.id), run_id, ex=ttl_s)
            self.store.emit(pipe, self.actor, "task.running", task.id, attempt=running.attempts,
                            job=job_id, queue=queue, worker=self.actor.removeprefix("worker:"))
            return running

        outcome = self.store.transact(
            [self.keys.task(task.id), nonce_key, self.keys.freeze], build
        )
        if isinstance(outcome, str):
            raise self._refused(task.id, outcome, f"task {task.id} could not be started ({outcome})",
                                job=job_id, queue=queue)
        return Claim(task=outcome, run_id=run_id, attempt=outcome.attempts, job_id=job_id, claims=claims,
                     policy=policy)

    # -- settling --------------------------------------------------------------------------
    def owns(self, claim: Claim) -> bool:
        """Whether the run still holds its task: running, same attempt, its heartbeat key."""
        with self.store.r.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.task(claim.task.id))
            pipe.get(self.keys.heartbeat(claim.task.id))
            raw, holder = pipe.execute()
        if raw is None or holder != claim.run_id:
            return False
        current = Task.model_validate_json(raw)
        return current.state is TaskState.RUNNING and current.attempts == claim.attempt

    def current_state(self, task_id: str) -> TaskState | None:
        try:
            return self.store.get_task(task_id).state
        except IntakeError:
            return None

    def finish(
        self, claim: Claim, to: TaskState, *, reason: str | None, result: dict[str, Any] | None, **data: Any
    ) -> bool:
        """Settle the run's task (``succeeded``/``failed``/``blocked``), audited, and drop the
        heartbeat key, all at once. False (and nothing written) when the run no longer holds the
        task: it was revoked, or abandoned and handed on meanwhile."""
        hb_key = self.keys.heartbeat(claim.task.id)

        def build(pipe: Pipe) -> bool:
            current = self.store.read_task(pipe, claim.task.id)
            if (current.state is not TaskState.RUNNING or current.attempts != claim.attempt
                    or pipe.get(hb_key) != claim.run_id):
                return False
            self.store.check_task_move(current, to)
            done = current.model_copy(update={
                "state": to, "updated_at": self.clock(), "reason": reason, "result": result,
            })
            pipe.multi()
            self.store.write_task(pipe, done)
            pipe.delete(hb_key)
            extra = {"reason": reason} if reason else {}
            self.store.emit(pipe, self.actor, f"task.{to.value}", claim.task.id,
                            attempt=claim.attempt, **extra, **data)
            return True

        return self.store.transact([self.keys.task(claim.task.id), hb_key], build)

    def record(self, claim: Claim, action: str, **data: Any) -> None:
        """An audit event about the run that changes no state (``run.stopped``, ``run.discarded``).

        Named ``run.*``, not ``task.*``: the task did not change state."""
        self.store.audit.record(self.actor, action, claim.task.id, attempt=claim.attempt, **data)
