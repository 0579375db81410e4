"""What a worker checks before it takes a job, so a broken set-up fails at start, not mid-task.

:func:`worker_problems` lists, one line each: an agent program that is missing or not
executable, a sandbox helper that is missing (``setpriv``, ``prlimit``, ``socat``), a credential that does not resolve (an unset variable, a missing or group-readable
file), and a report key that is missing, unreadable or another worker's. ``intake worker``
stops on the first (:func:`preflight`); ``intake doctor --worker-config`` prints them all.
Reaching Redis as the worker's user is checked where the worker opens it
(:func:`intake.core.redis_conn.open_redis`), still before any job. No secret value is ever in a line.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from intake.core.errors import ConfigError
from intake.core.settings import Settings
from intake.protocol.keyfiles import load_worker_key

from .config import CommandAgentConfig, WorkerConfig
from .sandbox import PRLIMIT, SETPRIV, SOCAT, safe_path


def agent_problem(config: WorkerConfig) -> str | None:
    """Why the configured agent program cannot run, or None (the demo agent always can).

    A bare name is looked up on the PATH runs get (the worker's, without relative entries,
    plus the agent's ``ro_paths``); an absolute path must be an executable file."""
    if not isinstance(config.agent, CommandAgentConfig):
        return None
    program = config.agent.argv[0]
    if os.path.isabs(program):
        path = Path(program)
        if not path.is_file():
            return f"agent.argv[0]: no program at {program}"
        if not os.access(path, os.X_OK):
            return f"agent.argv[0]: {program} is not executable"
        return None
    search = os.pathsep.join([safe_path(os.environ.get("PATH")), *map(str, config.agent.ro_paths)])
    if shutil.which(program, path=search) is None:
        return f"agent.argv[0]: {program!r} is not on PATH ({search})"
    return None


def sandbox_problems(config: WorkerConfig) -> list[str]:
    """What the bwrap sandbox needs besides bubblewrap and the agent user (checked when it
    starts): ``setpriv`` to start it without the worker's capabilities and to kill it as the
    agent user, and ``socat`` to bridge a spec's egress allowlist into it."""
    if config.sandbox != "bwrap":
        return []
    needs = [(SETPRIV, "util-linux"), (PRLIMIT, "util-linux"), (SOCAT, "socat")]
    return [f"sandbox: {path} is missing (apt-get install {package})" for path, package in needs
            if not os.access(path, os.X_OK)]


def credential_problems(config: WorkerConfig) -> list[str]:
    """One line per credential source that does not resolve now (names the field and the
    variable or file, never a value)."""
    problems = []
    for where, source in config.credential_sources():
        try:
            source.read()
        except ConfigError as exc:
            problems.append(f"{where}: {str(exc).removeprefix('credential: ')}")
    return problems


def report_key_problem(settings: Settings, config: WorkerConfig) -> str | None:
    """Why this worker's report key (INTAKE_WORKER_KEY) is unusable, or None."""
    path = settings.worker_key_path(config.name)
    try:
        name, _, _ = load_worker_key(path)
    except ConfigError as exc:
        return str(exc)
    if name != config.name:
        return f"INTAKE_WORKER_KEY: {path} is worker {name}'s key, not {config.name}'s"
    return None


def worker_problems(settings: Settings, config: WorkerConfig) -> list[str]:
    """Everything :mod:`preflight` checks, one line per problem (empty when ready)."""
    problems = [p for p in (agent_problem(config),) if p]
    problems += sandbox_problems(config) + credential_problems(config)
    key = report_key_problem(settings, config)
    return problems + ([key] if key else [])


def preflight(settings: Settings, config: WorkerConfig) -> None:
    """Raise :class:`ConfigError` with the first problem (and how many more there are)."""
    problems = worker_problems(settings, config)
    if problems:
        more = f" (and {len(problems) - 1} more: see `intake doctor --worker-config`)" if len(problems) > 1 else ""
        raise ConfigError(f"worker {config.name}: {problems[0]}{more}")
