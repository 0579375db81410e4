"""What a worker accepts from RQ: exactly one function, with exactly two arguments, and nothing
RQ could otherwise import, call or contact on a job's behalf.

Writing to Redis must not run code (DESIGN.md boundary 6). A job hash names its function by a
dotted path that RQ resolves with ``import_attribute``, and it can name more callables RQ would
resolve the same way: success, failure and stopped callbacks (run on completion, and by registry
maintenance for abandoned jobs). It can also carry webhooks (URLs RQ would POST to), dependencies,
retries and repeats (RQ would re-enqueue things), an instance and free-form ``meta``.

Two layers stop all of that:

* :func:`inspect_job` checks the *stored* job before anything of it is imported or called: the
  function name must be :data:`~intake.protocol.jobs.ENTRY_POINT` and the data exactly
  ``kwargs={"task_id": <task id>, "token": <token>}``; every other feature must be absent. The
  worker refuses a job that fails (audited with the function name, never the arguments) and
  marks it failed with :func:`fail_refused_job`, which writes the registry keys directly rather
  than through RQ code paths that would consult the job's callbacks or webhooks.
* :class:`IntakeJob`, the job class every worker queue uses, never resolves a callable by name:
  its ``func`` returns the entry point or raises, its callbacks are always ``None`` and its
  webhooks always empty, whatever the hash says. Loading a hash never raises either (a broken
  one is flagged and then refused), so a planted job cannot crash the worker loop.
"""

from __future__ import annotations

import re
import time
import zlib
from typing import Any

import redis
from rq.job import JOB_ID_PATTERN, Job, parse_job_id
from rq.queue import Queue
from rq.registry import FailedJobRegistry
from rq.utils import now, utcformat

from intake.core.models import is_id
from intake.protocol.jobs import ENTRY_POINT, FAILURE_TTL_S, JOB_KWARGS
from intake.protocol.tokens import MAX_TOKEN_LEN

from .refusal import JobRefused

#: A stored job's compressed data carries the dispatch token (and in it the spec); anything
#: near this is not ours.
MAX_JOB_DATA_BYTES = 600 * 1024

#: Every field RQ 2.12 itself writes to a job hash. A hash with any other field is refused
#: before RQ parses it: it was not written by RQ on the broker's behalf.
JOB_HASH_FIELDS = frozenset({
    "data", "created_at", "origin", "description", "enqueued_at", "started_at", "ended_at",
    "last_heartbeat", "result", "exc_info", "timeout", "result_ttl", "failure_ttl", "ttl", "status",
    "worker_name", "meta", "dependency_id", "dependency_ids", "allow_dependency_failures",
    "enqueue_at_front", "enqueue_at_front_on_retry", "retries_left", "retry_intervals",
    "number_of_retries", "repeats_left", "repeat_intervals", "group_id", "webhooks",
    "success_callback_name", "success_callback_timeout", "failure_callback_name",
    "failure_callback_timeout", "stopped_callback_name", "stopped_callback_timeout",
})

_TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")
# A run attempt is <queue>_<task id>_<n>, a delivery attempt <queue>_<task id>_d<n>.
_JOB_ID = re.compile(r"([a-z][a-z0-9_-]{0,63})_(T-[0-9a-f]{12})_(d?[1-9][0-9]{0,3})")


def printable(value: Any, limit: int = 200) -> str:
    """A value from a job hash, fit for an audit record or a log line: one printable line."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class IntakeJob(Job):
    """An RQ job that can only ever resolve to the intake entry point.

    ``restore`` records which RQ features the stored hash asked for (callbacks, webhooks) so
    :func:`inspect_job` can refuse them, then disarms them; a hash that does not load is flagged
    in :attr:`malformed` instead of raising.
    """

    malformed: str | None = None
    asked_for: tuple[str, ...] = ()

    @classmethod
    def fetch(cls, id: str, connection: redis.Redis | None = None, serializer: Any = None) -> IntakeJob:
        # RQ validates ids in the constructor and the worker loop dies on that ValueError; a
        # planted id is turned into a flagged job instead, so it can be refused and recorded.
        job_id = parse_job_id(id) if isinstance(id, str) else id
        if isinstance(job_id, str) and JOB_ID_PATTERN.fullmatch(job_id):
            return super().fetch(job_id, connection=connection, serializer=serializer)  # type: ignore[return-value]
        job = cls(None, connection=connection, serializer=serializer)
        job._id = str(job_id)
        job.malformed = "job id is not a valid RQ job id"
        return job

    def restore(self, raw_data: Any) -> Any:
        self.malformed = None
        fields = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in dict(raw_data).items()}
        asked = [name for name in ("success_callback_name", "failure_callback_name",
                                   "stopped_callback_name", "webhooks") if fields.get(name)]
        self.asked_for = tuple(asked)
        unknown = sorted(set(fields) - JOB_HASH_FIELDS)
        if unknown:
            self._flag_malformed(fields, f"job hash has fields RQ never writes ({printable(', '.join(unknown), 80)})")
            return None
        data = fields.get("data") or b""
        if len(data) > MAX_JOB_DATA_BYTES:
            self._flag_malformed(fields, f"job data is larger than {MAX_JOB_DATA_BYTES} bytes")
            return None
        try:
            result = super().restore(raw_data)
        except Exception as exc:  # anything a planted hash can make RQ's parser raise
            self._flag_malformed(fields, f"job hash does not load ({type(exc).__name__})")
            return None
        # Disarm, whatever inspect_job later decides: none of these is ever used by intake.
        self._success_callback_name = None
        self._failure_callback_name = None
        self._stopped_callback_name = None
        self.webhooks = []
        return result

    def _flag_malformed(self, fields: dict[str, Any], why: str) -> None:
        self.malformed = why
        origin = fields.get("origin")
        self.origin = origin.decode("utf-8", "replace") if isinstance(origin, bytes) else str(origin or "")
        self.webhooks = []
        self._success_callback_name = self._failure_callback_name = self._stopped_callback_name = None

    # -- nothing here resolves a name -------------------------------------------------------
    @property
    def func(self) -> Any:
        if self.malformed is None and self.func_name == ENTRY_POINT and self.instance is None:
            from .entry import run_task

            return run_task
        raise JobRefused("function_not_allowed", "this worker runs only the intake entry point")

    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None


def inspect_job(job: Job, queue: Queue) -> str | None:
    """Why ``job`` (as stored, from ``queue``) must not run, or None when it is one of ours.

    Reads only data: nothing is imported or called. The checks are strict equality with what
    :class:`intake.tasks.dispatch.Dispatcher` writes, so anything else is refused.
    """
    if getattr(job, "malformed", None):
        return str(job.malformed)
    if getattr(job, "asked_for", ()):
        return "job asks for " + ", ".join(n.replace("_name", "") for n in job.asked_for)
    try:
        func_name, instance = job.func_name, job.instance
        args, kwargs = job.args, job.kwargs
    except Exception:
        return "job data is not the JSON of a call"
    if func_name != ENTRY_POINT:
        return "function not allowed"
    if instance is not None:
        return "job names an instance"
    if args not in ([], ()):
        return "job has positional arguments"
    if not isinstance(kwargs, dict) or set(kwargs) != JOB_KWARGS:
        return "job arguments are not exactly task_id and token"
    task_id, token = kwargs["task_id"], kwargs["token"]
    if not isinstance(task_id, str) or not is_id(task_id, "T"):
        return "task_id is not a task id"
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN or not _TOKEN_SHAPE.match(token):
        return "token is not shaped like a dispatch token"
    match = _JOB_ID.fullmatch(job.id)
    if match is None or match.group(2) != task_id:
        return "job id does not name the task"
    if job.origin != queue.name or match.group(1) != queue.name:
        return "job belongs to another queue"
    if job._dependency_ids:
        return "job has dependencies"
    if job.retries_left or job.retry_intervals or job.repeats_left or job.repeat_intervals:
        return "job asks for retries or repeats"
    if job.meta:
        return "job carries meta data"
    if job.group_id:
        return "job belongs to a group"
    return None


def stored_func_name(job: Job) -> str:
    """The function name a job hash names, for the record (never its arguments)."""
    if getattr(job, "malformed", None):
        return "<unreadable>"
    try:
        return printable(job.func_name)
    except Exception:
        return "<unreadable>"


def fail_refused_job(connection: redis.Redis, job: Job, queue: Queue, reason: str) -> None:
    """Mark a refused job failed and file it in the queue's FailedJobRegistry.

    Plain Redis writes on purpose: RQ's own failure path would save the job through its model
    and enqueue its dependents, and this job has already been found untrustworthy.
    """
    message = f"refused by the intake worker: {reason}"
    registry = FailedJobRegistry(queue.name, connection=connection)
    with connection.pipeline(transaction=True) as pipe:
        if JOB_ID_PATTERN.fullmatch(job.id) and connection.exists(job.key):
            pipe.hset(job.key, mapping={
                "status": "failed",
                "ended_at": utcformat(now()),
                "exc_info": zlib.compress(message.encode()),
            })
            pipe.expire(job.key, FAILURE_TTL_S)
            pipe.zadd(registry.key, {job.id: time.time() + FAILURE_TTL_S})
        pipe.lrem(queue.intermediate_queue_key, 0, job.id)
        pipe.execute()
