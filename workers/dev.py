"""The embedded worker of ``intake serve --dev``: local bare repositories and one worker process.

:func:`prepare_dev_worker` maps every repo of the policy to a bare repository in the data dir
(``<data dir>/repos/<owner>/<name>.git``, created once with an initial commit on the repo's base
ref: a README and ``docs/``) and writes ``<data dir>/worker.dev.toml`` that serves all of them,
on every queue the policy uses, with the demo agent. Agents and checks run under bubblewrap when
this machine can (bwrap installed, the ``intake-agent`` user exists, the server runs as root);
otherwise the config says ``sandbox = "none"`` explicitly and the worker warns at start.

:func:`start_dev_worker` runs ``python -m intake worker --config … --exit-with-parent`` as a
subprocess with the server's settings (the same data dir, so the same embedded Redis: it joins
the server's redis-server through the data dir's lock files) and without the keys a worker must
not hold (signing, secrets) or any Slack token. :func:`stop_dev_worker` stops it: SIGTERM (RQ's
warm shutdown), again after a grace period (cold: the run is cut short and handed back to the
broker), then SIGKILL. If the server dies without calling it, the worker notices its parent is
gone and stops itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from intake.core.policy import load_policy
from intake.core.settings import Settings

from .sandbox import Sandbox, SandboxError
from .workspace import run_git

DEV_CONFIG_NAME = "worker.dev.toml"
DEV_WORKER_NAME = "dev"
_README = """# {name}

A local repository made by `intake serve --dev`. The embedded worker clones it, runs the demo
agent and pushes a branch `<prefix>/<task id>` back here.

    git --git-dir {path} branch --list
"""


def create_bare_repo(path: Path, branch: str, files: dict[str, str]) -> Path:
    """A bare repository at ``path`` whose ``branch`` holds one commit of ``files``.

    Does nothing if ``path`` already exists. Git runs through the hardened :func:`run_git`.
    """
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="intake-seed-") as scratch:
        work = Path(scratch) / "work"
        work.mkdir()
        tmp_bare = path.with_name(path.name + ".tmp")
        run_git(["init", "--quiet", "--bare", str(tmp_bare)], cwd=Path(scratch), env={})
        run_git(["symbolic-ref", "HEAD", f"refs/heads/{branch}"], cwd=tmp_bare, env={"GIT_DIR": str(tmp_bare)})
        for rel, text in files.items():
            target = work / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        env = {"GIT_DIR": str(Path(scratch) / "seed.git"), "GIT_WORK_TREE": str(work)}
        run_git(["init", "--quiet"], cwd=work, env=env)
        run_git(["add", "--all", "--", "."], cwd=work, env=env)
        run_git(["commit", "--quiet", "-m", "Initial commit"], cwd=work, env=env)
        run_git(["push", "--quiet", "--", str(tmp_bare), f"HEAD:refs/heads/{branch}"], cwd=work, env=env)
        os.replace(tmp_bare, path)  # appears complete or not at all
    return path


def _toml(value: object) -> str:
    # JSON strings and arrays of strings are valid TOML basic strings and arrays.
    return json.dumps(value, ensure_ascii=False)


def prepare_dev_worker(settings: Settings) -> Path:
    """Create the dev bare repos (once) and (re)write the dev worker config; return its path."""
    policy = load_policy(settings.policy_path)
    root = settings.data_dir / "repos"
    try:
        Sandbox().check()
        sandbox = "bwrap"
    except SandboxError:
        sandbox = "none"
    lines = [
        "# Written by `intake serve --dev` on every start; edit the policy, not this file.",
        f"name = {_toml(DEV_WORKER_NAME)}",
        f"queues = {_toml(sorted({policy.queue_for(r) for r in policy.repos}))}",
        "# bwrap when this machine can run it (bubblewrap, the intake-agent user, root); else none.",
        f"sandbox = {_toml(sandbox)}",
        "",
        "[agent]",
        'type = "demo"',
    ]
    for repo in policy.repos:
        owner, name = repo.name.split("/", 1)
        bare = root / owner / f"{name}.git"
        create_bare_repo(bare, repo.base_ref, {
            "README.md": _README.format(name=repo.name, path=bare),
            "docs/README.md": f"# {repo.name} docs\n",
        })
        lines += [
            "",
            "[[repos]]",
            f"name = {_toml(repo.name)}",
            f"url = {_toml(str(bare))}",
            f"change_types = {_toml(list(repo.change_types))}",
        ]
    path = settings.data_dir / DEV_CONFIG_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o600)  # worker files are not for the agent user
    os.replace(tmp, path)
    return path


def worker_env(settings: Settings) -> dict[str, str]:
    """The dev worker's environment: the server's, minus secrets a worker must not hold, plus
    every setting it needs spelled out (so it opens the same data dir and Redis)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    keys = settings.keys
    env.update({
        "INTAKE_DATA_DIR": str(settings.data_dir),
        "INTAKE_POLICY": str(settings.policy_path),
        "INTAKE_KEY_PREFIX": settings.key_prefix,
        "INTAKE_REDIS_APPENDFSYNC": settings.redis_appendfsync,
        "INTAKE_PUBLIC_KEY": str(keys["public"]),
        "INTAKE_WORKER_KEY": str(settings.worker_key_path(DEV_WORKER_NAME)),
        # Not loaded by a worker; pointed at nothing so a stray .env cannot hand them over.
        "INTAKE_AUDIT_KEY": os.devnull,
        "INTAKE_SIGNING_KEY": os.devnull,
        "INTAKE_SECRETS_KEY": os.devnull,
    })
    if settings.redis_url is not None:
        env["INTAKE_REDIS_URL"] = settings.redis_url.get_secret_value()
    return env


@dataclass
class DevWorker:
    """A running embedded worker."""

    process: subprocess.Popen[bytes]
    config: Path
    log_path: Path
    _log: IO[bytes]


def start_dev_worker(settings: Settings, *, burst: bool = False) -> DevWorker:
    """Prepare the dev repos and config, then start one worker subprocess; see the module doc.

    Call it from the thread that will also call :func:`stop_dev_worker`. Its output goes to
    ``<data dir>/worker.log``.
    """
    config = prepare_dev_worker(settings)
    log_path = settings.data_dir / "worker.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed by stop_dev_worker
    argv = [sys.executable, "-m", "intake", "worker", "--config", str(config), "--exit-with-parent"]
    if burst:
        argv.append("--burst")
    try:
        process = subprocess.Popen(
            argv, env=worker_env(settings), cwd=settings.data_dir,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    except BaseException:
        log.close()
        raise
    return DevWorker(process, config, log_path, log)


def stop_dev_worker(handle: DevWorker, *, grace_s: float = 5.0) -> int | None:
    """Stop the worker (warm, then cold, then SIGKILL) and wait for it; returns its exit code."""
    proc = handle.process
    try:
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                # RQ ignores a second signal within a second of the first.
                proc.wait(timeout=max(grace_s, 1.5))
        return proc.wait(timeout=10)
    finally:
        handle._log.close()
