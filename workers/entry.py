"""The one job function a worker runs: :func:`run_task`.

Its dotted path is :data:`intake.protocol.jobs.ENTRY_POINT`. RQ calls it (through
:class:`workers.jobs.IntakeJob`, never by importing a name from Redis) with exactly the task id
and its dispatch token. It needs the worker's runner, which the worker binds with :func:`bind`
before it takes any job; called anywhere else, it refuses.
"""

from __future__ import annotations

from typing import Any, Protocol

from rq import get_current_job

from .refusal import JobRefused


class Runner(Protocol):
    """What :func:`run_task` hands work to (:class:`intake.workers.run.TaskRunner`)."""

    def run_task(self, task_id: str, token: str, *, job_id: str, queue: str) -> dict[str, Any]: ...


_runner: Runner | None = None


def bind(runner: Runner | None) -> None:
    """Make ``runner`` the one that :func:`run_task` hands work to (None unbinds)."""
    global _runner
    _runner = runner


def run_task(task_id: str, token: str) -> dict[str, Any]:
    """Claim, run and settle one task; see :class:`workers.run.TaskRunner`.

    Raises :class:`~workers.refusal.JobRefused` (so RQ files the job as failed) when the task may
    not run; the refusal is already audited and the task, where it was at fault, settled.
    """
    if _runner is None:
        raise JobRefused("no_worker", "run_task only runs inside an intake worker")
    job = get_current_job()
    if job is None:
        raise JobRefused("no_job", "run_task only runs as an RQ job")
    return _runner.run_task(task_id, token, job_id=job.id, queue=job.origin)
