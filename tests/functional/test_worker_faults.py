"""Revocation and faults with real ``intake worker`` processes: a running task is stopped soon
after it is revoked, and a SIGKILLed worker's task is retried with a new token or failed as
abandoned, as the risk tier says (never lost, never run twice at once)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from intake.core.models import TaskState
from intake.runtime import EXAMPLE_POLICY
from tests.conftest import FakeClock
from tests.workers.harness import Rig, git_refs, make_rig, pid_gone, pids_with, rig, wait_for  # noqa: F401


def sleeper(marker: str) -> dict[str, object]:
    """A command agent that sleeps for an hour (it never ends by itself within a test's
    bounds: whatever stops it is what the test is about), with ``marker`` in its command line."""
    return {"type": "command", "argv": ["python3", "-c", "import time; time.sleep(3600)", marker]}


#: A failure bound only: the tests wait on the agent's exit, never for this long on a good run.
#: How fast a revoke stops an agent is measured in bench/, not asserted here.
STOP_BOUND_S = 120


def read_pid(marker: str) -> int:
    """The agent's own host pid (it cannot write it anywhere the test could read): the process
    that runs the agent's command, not bubblewrap, whose argv holds the marker too."""
    def agent() -> int | None:
        found = [p for p in pids_with(marker) if not Path(f"/proc/{p}/exe").resolve().name.startswith("bwrap")]
        return found[0] if found else None

    return int(wait_for(agent, 30, "the agent to start"))


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_a_running_task_is_stopped_soon_after_revocation(rig: Rig) -> None:
    task = rig.promote()
    marker = f"agent-{secrets.token_hex(8)}"
    proc = rig.spawn(rig.config(agent=sleeper(marker)), burst=True)
    try:
        pid = read_pid(marker)
        assert rig.task(task.id).state is TaskState.RUNNING
        rig.broker.gatekeeper.revoke(task.id, identity="cli:bob", is_approver=True, reason="wrong repo")
        # The broker answers the next heartbeat with a signed refusal and the worker stops the
        # agent (an hour-long sleeper: nothing else ends it; the reason is checked below).
        wait_for(lambda: pid_gone(pid), STOP_BOUND_S, "the agent to be stopped")
        assert proc.wait(timeout=30) == 0, rig.worker_log()
    finally:
        kill(proc)
    ended = rig.task(task.id)
    assert ended.state is TaskState.REVOKED and ended.reason == "wrong repo"
    assert rig.events("run.stopped")[-1]["data"]["why"] == "revoked"
    assert "task.succeeded" not in [e["action"] for e in rig.events()]
    assert set(git_refs(rig.bare("acme/web"))) == {"refs/heads/main"}


def test_writing_running_back_after_a_revoke_does_not_keep_the_agent_alive(rig: Rig) -> None:
    """Issue 8: someone with Redis write access keeps the record saying ``running`` and keeps
    replaying the last granted lease (hiding the broker's refusal). The worker's lease still
    runs out on its own clock and the agent is stopped, for that reason."""
    task = rig.promote()
    marker = f"agent-{secrets.token_hex(8)}"
    proc = rig.spawn(rig.config(agent=sleeper(marker)), burst=True)
    stop = threading.Event()
    try:
        pid = read_pid(marker)
        granted = wait_for(lambda: rig.r.get(rig.store.keys.lease("test", task.id)), 10, "the first lease")
        key = rig.store.keys.task(task.id)

        def attacker() -> None:
            while not stop.is_set():
                data = json.loads(rig.r.get(key))
                data.update(state="running", reason=None)
                rig.r.set(key, json.dumps(data))
                rig.r.set(rig.store.keys.lease("test", task.id), granted)  # an old, granted lease, replayed
                time.sleep(0.02)

        thread = threading.Thread(target=attacker, daemon=True)
        thread.start()
        rig.broker.gatekeeper.revoke(task.id, identity="cli:bob", is_approver=True, reason="stop it")
        wait_for(lambda: pid_gone(pid), STOP_BOUND_S, "the agent to be stopped")
        stop.set()
        thread.join(timeout=5)
        assert proc.wait(timeout=30) == 0, rig.worker_log()
    finally:
        stop.set()
        kill(proc)
    assert rig.fact(task.id).state is TaskState.REVOKED
    assert rig.events("run.stopped")[-1]["data"]["why"] in {"lease_expired", "revoked"}
    assert set(git_refs(rig.bare("acme/web"))) == {"refs/heads/main"}


@pytest.fixture
def retry_rig(tmp_path: Path, redis_server: str, rclient: redis.Redis, clock: FakeClock) -> Iterator[Rig]:
    text = EXAMPLE_POLICY.read_text().replace('groups = ["platform"]\n', 'groups = ["platform"]\nretries = 1\n', 1)
    made = make_rig(tmp_path, redis_server, rclient, clock, policy_text=text)
    yield made
    made.close()


def _kill_mid_run(rig: Rig, config: Path, marker: str, attempt: int) -> int:
    """Start a worker, wait until it runs ``attempt``, SIGKILL it; return the agent's pid."""
    wait_for(lambda: not pids_with(marker), 30, "no agent (nor its bwrap) of an earlier attempt")
    proc = rig.spawn(config)
    try:
        pid = read_pid(marker)
        running = rig.task(rig.events("task.running")[-1]["subject"])
        assert running.state is TaskState.RUNNING and running.attempts == attempt
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        kill(proc)
    return pid


def test_a_sigkilled_worker_is_retried_then_failed_as_abandoned(retry_rig: Rig) -> None:
    rig = retry_rig
    task = rig.promote()
    marker = f"agent-{secrets.token_hex(8)}"
    config = rig.config(agent=sleeper(marker))
    dispatcher = rig.broker.dispatcher

    first = rig.job_token(task.id)

    def reap() -> bool:
        rig.clock.advance(1)  # the broker's clock moves on; the dead worker's lease lapses
        return bool(dispatcher.reconcile()) or rig.task(task.id).state is not TaskState.RUNNING

    # Attempt 1 dies with its worker: the broker retries it with a new token.
    agent = _kill_mid_run(rig, config, marker, attempt=1)
    wait_for(lambda: pid_gone(agent), 30, "the orphaned agent to die with its worker")
    wait_for(reap, 30, "the broker to notice the dead worker")
    retried = rig.task(task.id)
    assert retried.state is TaskState.QUEUED and retried.attempts == 1
    assert rig.job_token(task.id, 2) != first
    assert (retried.reason or "").startswith("retrying: attempt 1 was abandoned")

    # Attempt 2 dies too: one retry is all the tier allows, so the task fails as abandoned.
    agent = _kill_mid_run(rig, config, marker, attempt=2)
    wait_for(lambda: pid_gone(agent), 30, "the second agent to die")
    wait_for(reap, 30, "the broker to notice the second dead worker")
    ended = rig.task(task.id)
    assert ended.state is TaskState.FAILED and ended.attempts == 2
    assert (ended.reason or "").startswith("abandoned: attempt 2 was abandoned")
    moves = [e["action"] for e in rig.events() if e["subject"] == task.id
             and e["action"] in {"task.queued", "task.running", "task.failed"}]
    assert moves == ["task.queued", "task.running", "task.queued", "task.running", "task.failed"]
    assert set(git_refs(rig.bare("acme/web"))) == {"refs/heads/main"}
