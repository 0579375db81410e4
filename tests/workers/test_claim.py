"""The entry point's checks before a run: token, state, freeze, policy version, scope; and the
atomic claim that burns the nonce. Refused tasks never run (nothing is pushed)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from intake.models import Task, TaskState
from intake.policy import load_policy
from intake.queueing import ENTRY_POINT, job_id_for
from intake.runtime import EXAMPLE_POLICY, Broker
from intake.tokens import mint, read_claims
from tests.workers.harness import Rig, git_refs, rig  # noqa: F401


def pushed(rig: Rig, repo: str = "acme/web") -> set[str]:
    return set(git_refs(rig.bare(repo))) - {"refs/heads/main"}


def refusal_reasons(rig: Rig) -> list[str]:
    return [e["data"]["reason"] for e in rig.events("job.refused")]


def test_forged_token_job_is_refused_and_the_real_job_still_runs(rig: Rig) -> None:
    task = rig.promote()
    forged, _ = mint(Ed25519PrivateKey.generate(), task_id=task.id, spec=task.spec, now=rig.clock.now, ttl_s=3600)
    rig.queue().enqueue_call(ENTRY_POINT, kwargs={"task_id": task.id, "token": forged},
                             job_id=job_id_for(task.id, 9), at_front=True)
    rig.work(rig.config())
    assert refusal_reasons(rig) == ["stale_token"]
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED and done.attempts == 1
    assert pushed(rig) == {f"refs/heads/intake/{task.id}"}


def test_forged_token_written_into_the_task_fails_it_without_running(rig: Rig) -> None:
    task = rig.promote()
    forged, _ = mint(Ed25519PrivateKey.generate(), task_id=task.id, spec=task.spec, now=rig.clock.now, ttl_s=3600)
    tampered = task.model_copy(update={"token": forged})
    rig.r.set(rig.store.keys.task(task.id), tampered.model_dump_json())
    rig.rq().delete("rq:queue:tier-standard", f"rq:job:{job_id_for(task.id, 1)}")
    rig.broker.dispatcher.enqueue(tampered)
    rig.work(rig.config())
    ended = rig.task(task.id)
    assert ended.state is TaskState.FAILED and ended.reason is not None and "bad_signature" in ended.reason
    assert ended.attempts == 0 and not pushed(rig)
    assert refusal_reasons(rig) == ["token_bad_signature"]
    assert rig.r.exists(rig.store.keys.nonce(read_claims(forged).nonce))


def test_spec_edited_in_redis_no_longer_matches_the_token(rig: Rig) -> None:
    task = rig.promote()
    evil = task.spec.model_copy(update={"blocked_paths": ()})
    rig.r.set(rig.store.keys.task(task.id), task.model_copy(update={"spec": evil}).model_dump_json())
    rig.work(rig.config())
    ended = rig.task(task.id)
    assert ended.state is TaskState.FAILED and "spec_mismatch" in (ended.reason or "")
    assert not pushed(rig)


def test_expired_token_is_refused_and_the_task_expires(rig: Rig) -> None:
    task = rig.promote()
    rig.clock.advance(rig.broker.policy.clocks.approval_validity + 1)
    rig.work(rig.config())
    ended = rig.task(task.id)
    assert ended.state is TaskState.EXPIRED and ended.reason == "token expired before the task started"
    assert refusal_reasons(rig) == ["token_expired"] and not pushed(rig)


def test_revoked_queued_task_never_runs(rig: Rig) -> None:
    task = rig.promote()
    rig.broker.gatekeeper.revoke(task.id, identity="cli:bob", is_approver=True, reason="not now")
    rig.work(rig.config())
    ended = rig.task(task.id)
    assert ended.state is TaskState.REVOKED and ended.attempts == 0
    assert refusal_reasons(rig) == ["task_revoked"] and not pushed(rig)
    assert "task.running" not in [e["action"] for e in rig.events()]


def test_misrouted_task_is_refused_and_fails(rig: Rig) -> None:
    task = rig.promote()  # acme/web docs, on tier-standard
    config = rig.config(repos={"acme/payments": {}}, queues=("tier-standard",))
    rig.work(config)
    ended = rig.task(task.id)
    assert ended.state is TaskState.FAILED and (ended.reason or "").startswith("misrouted:")
    assert refusal_reasons(rig) == ["misrouted"] and not pushed(rig)
    events = {e["action"]: e for e in rig.events()}
    assert events["job.refused"]["data"]["repo"] == "acme/web"


def test_change_type_outside_the_scope_is_misrouted(rig: Rig) -> None:
    task = rig.promote(change_type="bugfix")
    config = rig.config(repos={"acme/web": {"change_types": ["docs"]}})
    rig.work(config)
    assert rig.task(task.id).state is TaskState.FAILED
    assert refusal_reasons(rig) == ["misrouted"]


def test_frozen_intake_starts_nothing_and_the_task_runs_after_thaw(rig: Rig) -> None:
    task = rig.promote()
    gate = rig.broker.gatekeeper
    gate.freeze(actor="cli:bob", reason="incident")
    config = rig.config()
    rig.work(config)
    assert rig.task(task.id).state is TaskState.QUEUED and refusal_reasons(rig) == ["frozen"]
    assert rig.broker.dispatcher.reconcile() == 0  # nothing is re-enqueued while frozen
    gate.thaw(actor="cli:bob")
    assert rig.broker.dispatcher.reconcile() == 1  # the refused job is replaced
    rig.work(config)
    assert rig.task(task.id).state is TaskState.SUCCEEDED


def test_a_replayed_job_cannot_run_the_task_again(rig: Rig) -> None:
    task = rig.promote()
    config = rig.config()
    rig.work(config)
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED
    # Replay: the same job (same token) written again, as if by someone with Redis access.
    rig.queue().enqueue_call(ENTRY_POINT, kwargs={"task_id": task.id, "token": task.token},
                             job_id=job_id_for(task.id, 1))
    rig.work(config)
    assert refusal_reasons(rig) == ["task_succeeded"]
    assert rig.task(task.id) == done


def test_a_burned_nonce_stops_a_queued_task(rig: Rig) -> None:
    task = rig.promote()
    rig.r.set(rig.store.keys.nonce(read_claims(task.token or "").nonce), "used")
    rig.work(rig.config())
    ended = rig.task(task.id)
    assert ended.state is TaskState.FAILED and "burned" in (ended.reason or "")
    assert not pushed(rig)


def test_a_job_on_the_wrong_queue_is_refused(rig: Rig) -> None:
    task = rig.promote()
    rig.rq().delete("rq:queue:tier-standard")
    rig.queue("tier-privileged").enqueue_call(ENTRY_POINT, kwargs={"task_id": task.id, "token": task.token},
                                              job_id=job_id_for(task.id, 1))
    rig.work(rig.config())
    assert refusal_reasons(rig) == ["wrong_queue"]
    assert rig.task(task.id).state is TaskState.QUEUED


def test_a_policy_change_after_approval_fails_the_task(rig: Rig) -> None:
    task = rig.promote()
    changed = rig.tmp / "policy-v2.toml"
    changed.write_text(EXAMPLE_POLICY.read_text().replace('version = "example-1"', 'version = "example-2"'))
    # The worker reads the policy file in force now, which is no longer the approved one.
    settings = rig.settings.model_copy(update={"policy": changed})
    rig.broker.dispatcher.close()
    rig.broker = Broker(settings, rig.broker.url, rig.r, rig.broker.audit, rig.store)
    rig.work(rig.config())
    ended = rig.task(task.id)
    assert ended.state is TaskState.FAILED and "policy changed" in (ended.reason or "")
    assert refusal_reasons(rig) == ["stale_policy"]


def test_claim_burns_the_nonce_and_counts_the_attempt(rig: Rig) -> None:
    task = rig.promote()
    rig.work(rig.config())
    done: Task = rig.task(task.id)
    assert done.attempts == 1
    assert rig.r.get(rig.store.keys.nonce(read_claims(task.token or "").nonce)) == "burned"
    assert not rig.r.exists(rig.store.keys.heartbeat(task.id))
    running = [e for e in rig.events("task.running")]
    assert running[0]["data"]["attempt"] == 1 and running[0]["data"]["job"] == job_id_for(task.id, 1)
    assert rig.broker.audit.verify().unsealed == 0


def test_a_long_running_worker_follows_a_policy_update(rig: Rig) -> None:
    """A worker loaded with an older policy reads the file again when a task's version differs."""
    old = rig.tmp / "policy-v0.toml"
    old.write_text(EXAMPLE_POLICY.read_text().replace('version = "example-1"', 'version = "example-0"'))
    task = rig.promote()  # approved under the file in force (example-1)
    rig.broker.dispatcher.close()
    rig.broker = Broker(rig.settings, rig.broker.url, rig.r, rig.broker.audit, rig.store,
                        _policy=load_policy(old))
    rig.work(rig.config())
    assert rig.task(task.id).state is TaskState.SUCCEEDED
