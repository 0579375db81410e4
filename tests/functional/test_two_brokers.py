"""Two real ``intake serve`` processes on one Redis (issue 8): every refusal still holds when
the processes share the work (reports, reconcile, sealing), and every event is sealed once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from intake.core.models import TaskState
from intake.protocol.jobs import ENTRY_POINT
from intake.tasks.dispatch import job_id_for
from tests.functional.test_serve import free_port, wait_http
from tests.workers.harness import Rig, git_refs, rig, wait_for  # noqa: F401


@pytest.fixture
def serves(rig: Rig, tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Two brokers with their own data dirs and ports, the rig's keys, policy and Redis."""
    keys = rig.settings.keys
    procs = []
    for n in (1, 2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
        env.update(
            INTAKE_DATA_DIR=str(tmp_path / f"serve{n}"), INTAKE_PORT=str(free_port()),
            INTAKE_REDIS_URL=rig.settings.redis_url.get_secret_value(),  # type: ignore[union-attr]
            INTAKE_POLICY=str(rig.settings.policy_path), INTAKE_SWEEP_INTERVAL="1",
            INTAKE_SIGNING_KEY=str(keys["signing"]), INTAKE_PUBLIC_KEY=str(keys["public"]),
            INTAKE_AUDIT_KEY=str(keys["audit"]), INTAKE_SECRETS_KEY=str(keys["secrets"]),
            INTAKE_CONSOLE_KEY=str(keys["console"]),
        )
        proc = subprocess.Popen([sys.executable, "-m", "intake", "serve"], env=env, cwd=tmp_path,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        assert wait_http(f"http://127.0.0.1:{env['INTAKE_PORT']}/readyz", proc)["ledger"] == "ok"
    yield procs
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        proc.communicate(timeout=30)


def test_refusals_hold_and_each_event_is_sealed_once_with_two_brokers(rig: Rig, serves: list) -> None:  # type: ignore[type-arg]
    config = rig.config()
    done = rig.promote(text="run me")
    revoked = rig.promote(text="revoke me")
    revoked_token = rig.job_token(revoked.id)
    rig.rq().lrem("rq:queue:tier-standard", 0, job_id_for("tier-standard", revoked.id, 1))
    rig.broker.gatekeeper.revoke(revoked.id, identity="cli:bob", is_approver=True, reason="no")
    for _ in range(3):  # the run, then its delivery (dispatched by a serve once the result is in)
        worker = rig.spawn(config, burst=True, reports=False)  # the two serves answer its reports
        assert worker.wait(timeout=120) == 0, rig.worker_log()
        if wait_for(lambda: rig.task(done.id).state in (TaskState.DELIVERING, TaskState.SUCCEEDED)
                    and rig.task(done.id), 30, "a serve to apply the result").state is TaskState.SUCCEEDED:
            break
    done_token = rig.job_token(done.id)

    # Before the revoke a serve may legitimately re-dispatch the revoked task (its job was taken
    # off the queue: a lost job is re-sent); what matters is that nothing is minted from here on.
    rig.broker.audit.seal_pending()
    minted = len(rig.events("task.dispatched"))
    assert minted >= 3
    order = [(e["action"], e["subject"]) for e in rig.events()]
    revoked_at = order.index(("task.revoked", revoked.id))
    assert ("task.dispatched", revoked.id) not in order[revoked_at:], "nothing is dispatched once revoked"
    # The attacker revives both: records back to queued, the old jobs planted again.
    for task, token in ((done, done_token), (revoked, revoked_token)):
        key = rig.store.keys.task(task.id)
        data = json.loads(rig.r.get(key))
        data.update(state="queued", attempts=0, reason=None)
        rig.r.set(key, json.dumps(data))
        rig.r.zadd(rig.store.keys.tasks_open, {task.id: 1})
        rig.queue().enqueue_call(ENTRY_POINT, kwargs={"task_id": task.id, "token": token},
                                 job_id=job_id_for("tier-standard", task.id, 1))
    rig.r.delete(rig.store.keys.freeze)
    worker = rig.spawn(config, burst=True, reports=False)
    assert worker.wait(timeout=120) == 0, rig.worker_log()
    wait_for(lambda: len(rig.events("job.refused")) >= 2, 30, "both claims to be refused")
    wait_for(lambda: {e["subject"] for e in rig.events("tamper.detected")} >= {done.id, revoked.id}, 30,
             "the serves to report the revived records")
    running = [e["subject"] for e in rig.events("task.running")]
    assert running == [done.id]  # one run, ever; the revoked task never ran
    # no serve minted anything for the revived records
    assert len(rig.events("task.dispatched")) == minted
    assert set(git_refs(rig.bare("acme/web"))) == {"refs/heads/main", f"refs/heads/intake/{done.id}",
                                                   f"refs/intake/{done.id}", "refs/notes/intake"}

    # Each event sealed once, in one chain, by whichever process got there first.
    rig.broker.audit.seal_pending()
    report = rig.broker.audit.verify()
    assert report.unsealed == 0 and report.anomalies == ()
    assert rig.r.hlen(rig.broker.audit.seals) == rig.r.xlen(rig.broker.audit.stream)
    tamper_kinds = [(e["subject"], e["data"]["why"]) for e in rig.events("tamper.detected")]
    assert len(tamper_kinds) <= 2 * 3  # reported once per process (and the rig), not once a sweep
