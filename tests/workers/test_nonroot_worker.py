"""A real ``intake worker`` run as the README's systemd unit runs it: a non-root user with exactly
the ambient capabilities CAP_SETUID CAP_SETGID CAP_CHOWN CAP_FOWNER (``setpriv``), sandboxing a
command agent under bubblewrap. It runs a task to success, and stops a timed-out and a revoked
sandbox with no process of it left.

The worker needs a Python the non-root user can run: a venv made with the system Python under
/var/tmp/intake-tests (dependencies installed once per pyproject.toml; the checkout itself is
installed into it at every session)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from intake.core.models import TaskState
from intake.core.redis_conn import make_client, redis_server_binary
from intake.core.resources import EXAMPLE_POLICY
from tests.conftest import FakeClock
from tests.workers.harness import Rig, make_rig, pids_with, wait_for

WORKER_USER = "intake-worker"
CAPS = "+setuid,+setgid,+chown,+fowner"  # exactly deploy/systemd/intake-worker.service's
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="bubblewrap is not installed")


@pytest.fixture(scope="session")
def worker_python() -> Path:
    """A Python the worker user can run, with this checkout installed."""
    try:
        pwd.getpwnam(WORKER_USER)
    except KeyError:
        pytest.fail(f"user {WORKER_USER} is missing (.ci/run creates it: useradd --system {WORKER_USER})")
    base = Path("/var/tmp/intake-tests")
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    deps = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = base / f"worker-venv-{deps}"
    with open(base / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".installed").exists():
            started = time.monotonic()
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(REPO)], check=True)
            (venv / ".installed").touch()
            print(f"\nworker venv installed in {time.monotonic() - started:.0f} s")
        else:  # this checkout as it is now
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--force-reinstall",
                            str(REPO)], check=True)
    return venv / "bin" / "python"


@pytest.fixture
def world(clock: FakeClock) -> Iterator[tuple[Rig, Path]]:
    """A rig whose files, Redis socket and run root the worker user can reach (its own)."""
    root = Path(tempfile.mkdtemp(prefix="nr-"))
    os.chmod(root, 0o711)
    sock_dir = root / "redis"
    sock_dir.mkdir(mode=0o711)
    sock = sock_dir / "r.sock"
    server = subprocess.Popen([redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm",
                               "777", "--save", "", "--appendonly", "no", "--dir", str(sock_dir)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"unix://{sock}"
    client = make_client(url)
    wait_for(lambda: _pings(client), 10, "redis")
    text = EXAMPLE_POLICY.read_text().replace('run_timeout = "30m"', 'run_timeout = "8s"')
    rig = make_rig(root, url, client, clock, policy_text=text)
    try:
        yield rig, root
    finally:
        rig.close()
        client.close()
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _own(path: Path, user: pwd.struct_passwd) -> None:
    for top, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(top, name), user.pw_uid, user.pw_gid, follow_symlinks=False)
    os.chown(path, user.pw_uid, user.pw_gid)


AGENT = ('if grep -q SLEEPY "$INTAKE_PROMPT_FILE"; then setsid sleep 600 {marker} >/dev/null 2>&1 </dev/null & '
         'exec sleep 600; fi; echo "done by a sandboxed agent" > docs/nonroot.md')


def test_a_non_root_worker_with_the_units_capabilities_runs_times_out_and_revokes(
        world: tuple[Rig, Path], worker_python: Path) -> None:
    rig, root = world
    user = pwd.getpwnam(WORKER_USER)
    marker = f"nr-{secrets.token_hex(6)}"
    config = rig.config(agent={"type": "command", "argv": ["/bin/sh", "-c", AGENT.format(marker=marker)]})
    rig.bare("acme/payments")
    tmp = root / "worker-tmp"
    tmp.mkdir()
    _own(root / "remotes", user)
    _own(rig.settings.data_dir, user)
    _own(tmp, user)
    os.chown(config, user.pw_uid, user.pw_gid)
    os.chown(root, user.pw_uid, user.pw_gid)
    rig.serve_reports()
    env = {k: v for k, v in rig.env(TMPDIR=str(tmp)).items() if k != "PYTHONPATH"}
    env["HOME"] = str(tmp)
    argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            f"--inh-caps={CAPS}", f"--ambient-caps={CAPS}", "--",
            str(worker_python), "-m", "intake", "worker", "--config", str(config)]
    log = root / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(argv, env=env, cwd=str(tmp), stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        # 1. Success, delivered.
        ok = rig.promote(text="Please document the deploy steps")
        wait_for(lambda: rig.task(ok.id).state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.BLOCKED),
                 60, f"the first task to settle ({log.read_text()[-2000:] if log.exists() else ''})")
        done = rig.task(ok.id)
        assert done.state is TaskState.SUCCEEDED, (done.reason, log.read_text()[-3000:])
        assert done.result is not None and done.result["sandbox"] == "bwrap"
        # 2. Timed out: the sandbox (and its setsid grandchild) is gone.
        slow = rig.promote(text="SLEEPY: take your time")
        wait_for(lambda: pids_with(marker), 60, "the grandchild")
        wait_for(lambda: rig.task(slow.id).state is TaskState.FAILED, 60, "the timeout")
        assert rig.task(slow.id).reason == "the agent timed out after 8s"
        assert pids_with(marker) == []
        # 3. Revoked while running: the same.
        revoked = rig.promote(text="SLEEPY: and again")
        wait_for(lambda: pids_with(marker), 60, "the grandchild")
        rig.broker.gatekeeper.revoke(revoked.id, identity="cli:bob", is_approver=True, reason="stop")
        wait_for(lambda: not pids_with(marker), 30, "the revoked sandbox to go")
        assert rig.task(revoked.id).state is TaskState.REVOKED
        text = log.read_text()
        assert "Traceback" not in text and "PermissionError" not in text, text[-3000:]
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    assert pids_with(marker) == []
