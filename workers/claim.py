"""Claiming a task for a run: the worker's side of the broker's authority (DESIGN.md, *Authority*).

A worker writes no broker record. :meth:`Claimer.claim` is what the entry point does before
anything else, with the broker's *public* keys only:

1. :func:`~intake.protocol.tokens.verify_dispatch`: signature (by key id, from the keyring), kind, expiry,
   and the spec hash recomputed from the spec the token carries. The job's task id, job id and
   queue must be the token's. The worker needs no task record: the spec it runs is the signed one;
2. the policy file must be the version the spec was approved under (the worker reads the
   dependency allowlist from it); on a mismatch the file is read again first;
3. the task's repo and change type must be inside this worker's scope;
4. it reports ``report.claimed`` (the token's nonce, attempt and job, and a fresh run id) and
   waits for the broker's answer: a broker-signed lease for exactly this task, attempt and run.
   The broker grants it only if its ledger says the task is queued, the nonce is one it minted
   for this attempt and never used, and intake is not frozen. A refusal (or no answer in time)
   raises :class:`~workers.refusal.JobRefused` and nothing runs.

A refusal at steps 1-3 is reported (``report.refused``); the broker records it and, where the
fault is the task's own (stale policy, misrouted), ends the task.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from intake.core.errors import PolicyError, TokenInvalid
from intake.core.models import TaskSpec
from intake.core.policy import Policy, load_policy
from intake.protocol.reports import Reporter
from intake.protocol.tokens import (
    DispatchClaims,
    Keyring,
    LeaseClaims,
    verify_dispatch,
    verify_lease,
)

from .config import WorkerConfig
from .refusal import JobRefused

log = logging.getLogger("intake.worker")

#: How long a worker waits for the broker to answer its claim.
CLAIM_WAIT_S = 15.0
#: The first and the longest pause between looks for that answer.
CLAIM_POLL_MIN_S = 0.005
CLAIM_POLL_MAX_S = 0.05


@dataclass(frozen=True)
class RunTask:
    """What a worker knows of the task it runs: all of it from the signed dispatch token."""

    id: str
    spec: TaskSpec
    spec_hash: str

    @property
    def idea_id(self) -> str:
        return self.spec.idea_id


@dataclass(frozen=True)
class Claim:
    """A task this worker now runs, with the broker's first lease for it."""

    task: RunTask
    run_id: str
    attempt: int
    job_id: str
    claims: DispatchClaims
    policy: Policy
    lease: LeaseClaims
    lease_token: str


class Claimer:
    """Verify a job's token and obtain the broker's lease for one run."""

    def __init__(
        self,
        *,
        client: redis.Redis,
        lease_key: Callable[[str], str],
        reporter: Reporter,
        keyring: Callable[[], Keyring],
        policy: Policy,
        policy_path: Path | None = None,
        config: WorkerConfig,
        clock: Callable[[], float],
        claim_wait_s: float = CLAIM_WAIT_S,
    ) -> None:
        self.r = client
        self.lease_key = lease_key
        self.reporter = reporter
        self.keyring = keyring
        self.policy = policy
        self.policy_path = policy_path
        self.config = config
        self.clock = clock
        self.claim_wait_s = claim_wait_s

    @property
    def name(self) -> str:
        return self.reporter.worker

    def _refused(self, task_id: str, reason: str, message: str, **data: object) -> JobRefused:
        self.reporter.send("report.refused", task_id, reason=reason, message=message[:300], **data)
        return JobRefused(reason, message)

    def claim(self, task_id: str, token: str, *, job_id: str, queue: str) -> Claim:
        """Check everything, ask the broker, and return the claim; raise :class:`JobRefused` if not."""
        try:
            claims = verify_dispatch(token, self.keyring(), now=self.clock())
        except TokenInvalid as exc:
            raise self._refused(task_id, f"token_{exc.reason}", f"dispatch token refused ({exc.reason}): {exc}",
                                job=job_id) from None
        data = {"job": job_id, "nonce": claims.nonce}
        if claims.task != task_id or claims.job != job_id or claims.queue != queue:
            raise self._refused(task_id, "token_mismatch",
                                "the job's task, job id or queue is not the one its token names", **data)
        spec = claims.spec
        policy = self.policy_for(spec.policy_version)
        if policy is None:
            raise self._refused(task_id, "stale_policy",
                                "the policy changed since this task was approved; amend it and approve again", **data)
        if not self.config.serves(spec.repo, spec.change_type):
            raise self._refused(task_id, "misrouted",
                                f"misrouted: worker {self.name} does not serve {spec.change_type} work on {spec.repo}",
                                **data)
        run_id = secrets.token_hex(16)
        self.reporter.send("report.claimed", task_id, attempt=claims.attempt, run=run_id, **data,
                           sandbox=self.config.sandbox)
        lease, raw = self.wait_lease(task_id, claims.attempt, run_id)
        if not lease.granted:
            raise JobRefused(lease.status, f"the broker refused the claim: {lease.reason or lease.status}")
        return Claim(task=RunTask(task_id, spec, claims.spec_hash), run_id=run_id, attempt=claims.attempt,
                     job_id=job_id, claims=claims, policy=policy, lease=lease, lease_token=raw)

    def read_lease(self, task_id: str, attempt: int, run_id: str) -> tuple[LeaseClaims, str] | None:
        """The broker's current lease for this run, if one is there and verifies."""
        raw = self.r.get(self.lease_key(task_id))
        if not raw:
            return None
        try:
            lease = verify_lease(raw, self.keyring())
        except TokenInvalid:
            log.warning("task %s: the lease in Redis does not verify; ignoring it", task_id)
            return None
        if lease.task != task_id or lease.attempt != attempt or lease.run != run_id:
            return None
        return lease, raw

    def wait_lease(self, task_id: str, attempt: int, run_id: str) -> tuple[LeaseClaims, str]:
        """The broker's answer to this claim. It usually comes within milliseconds (the broker
        answers in the pass that reads the claim), so the first looks come soon and then back
        off to :data:`CLAIM_POLL_MAX_S`: a worker's Redis user may only GET its leases, so there
        is nothing it could block on instead."""
        deadline = time.monotonic() + self.claim_wait_s
        pause = CLAIM_POLL_MIN_S
        while time.monotonic() < deadline:
            found = self.read_lease(task_id, attempt, run_id)
            if found is not None:
                return found
            time.sleep(pause)
            pause = min(pause * 2, CLAIM_POLL_MAX_S)
        self.reporter.send("report.stopped", task_id, attempt=attempt, run=run_id, why="no_lease")
        raise JobRefused("no_lease", "the broker did not answer the claim in time")

    def policy_for(self, version: str) -> Policy | None:
        """The policy with ``version`` (its hash): the loaded one, else the file read again."""
        if self.policy.version_hash != version and self.policy_path is not None:
            try:
                self.policy = load_policy(self.policy_path)
            except PolicyError as exc:
                log.warning("cannot reload the policy: %s", exc)
        return self.policy if self.policy.version_hash == version else None
