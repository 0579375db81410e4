"""``intake worker``: an RQ worker that runs nothing but intake tasks.

:class:`IntakeWorker` is RQ's :class:`~rq.worker.SimpleWorker` (the job runs in the worker process
itself, so a SIGKILL takes the run down with it and the broker's reaper sees the heartbeat stop)
with three changes:

* it reads jobs only with the JSON serializer and through :class:`~workers.jobs.IntakeJob`;
* :meth:`IntakeWorker.execute_job` runs :func:`~workers.jobs.inspect_job` on the stored job
  before RQ touches it: a job naming any other function, carrying other arguments, callbacks,
  webhooks, dependencies, retries or meta is refused (audited as ``job.refused`` with the
  function name, never its arguments) and failed without being called;
* it never logs job descriptions or arguments (they would hold the token).

A worker holds the broker's public keyring and its own report key, nothing else of the broker's:
it cannot mint, seal, or write a broker record (DESIGN.md, *Authority*).
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import logging
import os
import pwd
import secrets
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from rq.job import Job
from rq.queue import Queue
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from intake.core.errors import ConfigError
from intake.core.logs import configure_logging
from intake.core.redis_acl import RQ_NAME_SEP
from intake.core.redis_conn import make_client, open_redis
from intake.core.settings import Settings
from intake.protocol.keyfiles import load_public_keys, load_worker_key
from intake.protocol.keyspace import Keys
from intake.protocol.reports import Reporter

from . import entry
from .claim import Claimer
from .config import WorkerConfig, load_worker_config
from .jobs import (
    IntakeJob,
    fail_refused_job,
    inspect_job,
    printable,
    stored_func_name,
)
from .preflight import preflight
from .run import TaskRunner

log = logging.getLogger("intake.worker")
#: How long the command channel's thread waits for a message in one round (see subscribe).
PUBSUB_POLL_S = 0.5


class IntakeWorker(SimpleWorker):
    """An RQ worker for intake task jobs only (see the module docstring)."""

    def __init__(self, queues: list[str], *, runner: TaskRunner, reporter: Reporter, **kwargs: Any) -> None:
        kwargs.update(serializer=JSONSerializer, job_class=IntakeJob, log_job_description=False)
        super().__init__(queues, **kwargs)
        self.runner = runner
        self.reporter = reporter

    def subscribe(self) -> None:
        """RQ's command channel, with a short poll. RQ's own thread waits up to 60 s a round;
        when its stop races the unsubscribe (redis-py then waits for a subscription that never
        comes), a worker's exit hung for that whole minute (every burst run, one in a few)."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=PUBSUB_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def run_maintenance_tasks(self) -> None:
        """RQ's maintenance without its job groups: intake never enqueues a grouped job (the job
        guard refuses one), and a named worker's Redis user holds no ``rq:groups`` or
        ``rq:group:*`` key (RQ's scheduler is not started: no ``with_scheduler``)."""
        self.clean_registries()

    def execute_job(self, job: Job, queue: Queue) -> None:
        reason = inspect_job(job, queue)
        if reason is not None:
            self.refuse_job(job, queue, reason)
            return
        entry.bind(self.runner)
        try:
            super().execute_job(job, queue)
        finally:
            entry.bind(None)

    def refuse_job(self, job: Job, queue: Queue, reason: str) -> None:
        """Record the refusal (function name only), then fail the job without calling anything."""
        func = stored_func_name(job)
        log.warning("refused job %s from %s: %s (function %s)", printable(job.id, 100), queue.name, reason, func)
        self.reporter.send("report.refused", "", job=printable(job.id, 100), queue=queue.name, func=func,
                           reason=reason)
        fail_refused_job(self.connection, job, queue, reason)

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        # RQ's own handler logs the job's arguments (the token) as log-record extras.
        exc = exc_info[1] if len(exc_info) > 1 else None
        log.warning("job %s failed: %s", job.id, printable(f"{type(exc).__name__}: {exc}", 300))
        for handler in self._exc_handlers:
            if handler(job, *exc_info) is False:
                break


def build_worker(settings: Settings, url: str, client: redis.Redis, config: WorkerConfig, *,
                 name: str | None = None, clock: Callable[[], float] = time.time) -> IntakeWorker:
    """A worker for ``config`` on the Redis at ``url``: the broker's public keyring, the policy
    file, and this worker's own report key (``INTAKE_WORKER_KEY``, default
    ``keys/workers/<config name>.key``). Never the audit, signing or secrets keys."""
    from intake.core.policy import load_policy

    key_path = settings.worker_key_path(config.name)
    key_name, generation, key = load_worker_key(key_path)
    if key_name != config.name:
        raise ConfigError(f"INTAKE_WORKER_KEY: {key_path} is worker {key_name}'s key, not {config.name}'s")
    public = settings.keys["public"]
    keyring = load_public_keys(public)
    keys = Keys(settings.key_prefix)
    reporter = Reporter(client, settings.key_prefix, config.name, generation, key)
    # The RQ worker name starts with ``<worker>@``: a named worker's Redis user may only write
    # RQ worker hashes and command channels under its own name (see intake.core.redis_acl).
    worker_name = f"{config.name}{RQ_NAME_SEP}{name or f'{os.getpid()}-{secrets.token_hex(2)}'}"

    def current_keyring() -> Any:
        nonlocal keyring
        with contextlib.suppress(ConfigError):  # keep the last good keyring if the file is mid-rotation
            keyring = load_public_keys(public)
        return keyring

    claimer = Claimer(client=client, lease_key=lambda task_id: keys.lease(config.name, task_id), reporter=reporter, keyring=current_keyring,
                      policy=load_policy(settings.policy_path), policy_path=settings.policy_path,
                      config=config, clock=clock)
    runner = TaskRunner(claimer, config)
    # Whatever runs killed with SIGKILL left behind (work trees, homes, git dirs) goes now.
    runner.runs.sweep(runner.sandbox.user() if runner.sandbox.mode == "bwrap" else None)
    return IntakeWorker(
        list(config.queues), runner=runner, reporter=reporter, name=worker_name,
        connection=make_client(url, decode=False),
    )


def _watch_parent(parent: int) -> None:
    """Stop this worker when the process that started it goes away (``--exit-with-parent``)."""

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("parent process %d is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)  # warm: finish or stop the current run
        time.sleep(10)
        os.kill(os.getpid(), signal.SIGTERM)  # cold, if a run is still going

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def _not_dumpable() -> None:
    """With ``sandbox = "none"`` agents run as the worker's user: without this they could read
    the worker's environment and memory (Redis URL, repo credentials) through /proc/<worker
    pid>. Sandboxed agents see no host /proc at all. Linux; a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4, value 0
    except (OSError, AttributeError):
        return  # not Linux: nothing to switch off


def check_private(paths: list[Path], agent: pwd.struct_passwd) -> None:
    """Refuse to start when a worker file (its config, a credential file, the report key) is
    readable by the agent user: the sandbox does not mount them, and their modes say the same."""
    groups = {agent.pw_gid, *(g.gr_gid for g in grp.getgrall() if agent.pw_name in g.gr_mem)}
    for path in paths:
        try:
            info = path.stat()
        except OSError:
            continue  # a missing file fails where it is read, with its own message
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid == agent.pw_uid or mode & 0o004 or (mode & 0o040 and info.st_gid in groups):
            raise ConfigError(f"{path} is readable by the agent user {agent.pw_name} (chmod 600 it)")


def run_worker(settings: Settings, config_path: Path, *, burst: bool = False, exit_with_parent: bool = False) -> bool:
    """``intake worker``: validate the config, open the broker's Redis, work until stopped
    (or, with ``burst``, until the queues are empty). Returns whether any job was handled."""
    config = load_worker_config(config_path)
    preflight(settings, config)  # agent program, credentials, report key: or one line and exit
    sandbox = config.build_sandbox()
    sandbox.check()  # bwrap present, agent user usable, we may switch to it: or one line and exit
    if sandbox.mode == "bwrap":
        check_private([config_path, settings.worker_key_path(config.name), *config.secret_files()],
                      sandbox.user())
    _not_dumpable()
    if exit_with_parent:
        _watch_parent(os.getppid())
    configure_logging(settings)
    if sandbox.mode == "none":
        log.warning('sandbox = "none": agents and checks run as this worker\'s own user, '
                    "unsandboxed, with its network and files in reach")
    for repo in config.repos:
        if repo.network == "host":
            log.warning('repo %s: network = "host": its agents reach everything this host can (cloud '
                        "metadata, internal services, Redis); the egress allowlist is not applied", repo.name)
    from intake.core.policy import load_policy

    config.check_covers(load_policy(settings.policy_path))
    with open_redis(settings, role="worker", worker=config.name, queues=tuple(config.queues)) as (url, client):
        worker = build_worker(settings, url, client, config)
        log.info("worker %s listening on %s for %s", worker.name, ", ".join(config.queues),
                 ", ".join(r.name for r in config.repos))
        try:
            return bool(worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=False))
        finally:
            worker.connection.close()
