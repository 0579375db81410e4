"""Quarantine, result approval and delivery on real git, a real worker and the forge fake.

A run that passes its gates and checks leaves its commit on ``refs/intake/<task id>`` (no
branch). Privileged work then waits for a result approval bound to that very SHA; other work is
delivered at once. Only a delivery job, whose token names the SHA, makes the branch and the PR.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from intake.core.errors import Refused
from intake.core.models import Task, TaskState
from intake.protocol.jobs import ENTRY_POINT
from intake.runtime import EXAMPLE_POLICY
from tests.conftest import FakeClock
from tests.factories import draft
from tests.workers.fake_forge import FakeForge, fake_forge  # noqa: F401
from tests.workers.harness import Rig, git_refs, make_rig, rig  # noqa: F401

FORGE_TOKEN = "forge-token-abc123"


def sh(script: str) -> dict[str, object]:
    return {"type": "command", "argv": ["/bin/sh", "-c", script]}


def heads(rig: Rig, repo: str) -> set[str]:
    return {ref for ref in git_refs(rig.bare(repo)) if ref.startswith("refs/heads/") and ref != "refs/heads/main"}


def forge_config(rig: Rig, forge: FakeForge, repo: str = "acme/payments", **extra: object) -> Path:
    entry = {"forge": {"api_url": forge.url, "repository": repo, "token": {"env": "PAY_FORGE_TOKEN"}}, **extra}
    return rig.config(repos={repo: entry})


def privileged_result(rig: Rig, config: Path, requester: str = "slack:U0REQUEST1") -> Task:
    """A payments (privileged) task run to the point where its result waits for approval."""
    idea = rig.store.capture(draft(text="Document the settlement job", requester=requester),
                             ttl_s=rig.broker.policy.clocks.idea_ttl)[0]
    gate = rig.broker.gatekeeper
    second = "dave" if requester.endswith("CAROL0000") else "carol"
    task = gate.promote(idea.id, repo="acme/payments", change_type="docs", approver_id="alice",
                        code=rig.code("alice")).task
    task = gate.approve(task.id, approver_id=second, code=rig.code(second)).task
    assert task.state is TaskState.QUEUED
    rig.clock.advance(30)
    rig.work(config)
    waiting = rig.task(task.id)
    assert waiting.state is TaskState.AWAITING_RESULT_APPROVAL, waiting.reason
    return waiting


@pytest.fixture(autouse=True)
def _forge_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAY_FORGE_TOKEN", FORGE_TOKEN)


def test_privileged_work_waits_on_the_quarantine_ref_until_its_result_is_accepted(
        rig: Rig, fake_forge: FakeForge) -> None:  # noqa: F811
    config = forge_config(rig, fake_forge)
    task = privileged_result(rig, config)
    result = task.result or {}
    sha = result["commit"]
    refs = git_refs(rig.bare("acme/payments"))
    # Quarantined: the commit is on a non-branch ref, nothing under refs/heads/, no PR.
    assert refs[f"refs/intake/{task.id}"] == sha and heads(rig, "acme/payments") == set()
    assert fake_forge.calls == []
    # The facts the result card shows, from the worker's own copy.
    assert result["files"] == [f"docs/intake/{task.id}.md"] and result["files_changed"] == 1
    assert result["additions"] >= 1 and result["deletions"] == 0 and result["gates"] == "passed"
    assert [c["ok"] for c in result["checks"]] == [True, True] and len(result["tree"]) == 40
    fact = rig.fact(task.id)
    assert fact.result_commit == sha and fact.result_rule["groups"] == ["security"]
    # Reconcile dispatches nothing for a result waiting on people.
    assert rig.reconcile() == 0 and rig.queue("tier-privileged").count == 0

    gate = rig.broker.gatekeeper
    other = refs["refs/heads/main"]
    with pytest.raises(Refused) as wrong_sha:
        gate.accept(task.id, approver_id="carol", code=rig.code("carol"), sha=other)
    assert wrong_sha.value.reason == "wrong_sha"
    with pytest.raises(Refused) as wrong_group:
        gate.accept(task.id, approver_id="alice", code=rig.code("alice"), sha=sha, diff_sha256=fact.result_diff)
    assert wrong_group.value.reason == "wrong_group"  # the result needs security
    with pytest.raises(Refused) as bad_code:
        gate.accept(task.id, approver_id="carol", code="000000", sha=sha, diff_sha256=fact.result_diff)
    assert rig.task(task.id).state is TaskState.AWAITING_RESULT_APPROVAL and bad_code.value.reason
    assert heads(rig, "acme/payments") == set()

    accepted = rig.accept(task.id, "carol", sha)
    assert accepted.state is TaskState.DELIVERING
    [approved] = rig.events("result.approved")
    assert approved["actor"] == "approver:carol" and approved["data"]["sha"] == sha
    assert approved["data"]["spec_hash"] == task.spec_hash
    rig.work(config)
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED
    branch = f"intake/{task.id}"
    assert git_refs(rig.bare("acme/payments"))[f"refs/heads/{branch}"] == sha
    assert (done.result or {})["branch"] == branch and (done.result or {})["commit"] == sha
    assert (done.result or {})["pr_url"] == "https://forge.test/acme/payments/pull/1"
    [call] = fake_forge.calls
    assert call["json"]["draft"] is True and call["json"]["head"] == branch
    assert task.id in call["json"]["body"] and task.spec_hash in call["json"]["body"]
    assert "settlement" not in call["json"]["body"]  # idea text stays out of the PR
    succeeded = rig.events("task.succeeded")[-1]["data"]
    assert succeeded["commit"] == sha and succeeded["pr_url"] == (done.result or {})["pr_url"]


def test_the_requester_cannot_accept_their_own_result(rig: Rig, fake_forge: FakeForge) -> None:  # noqa: F811
    task = privileged_result(rig, forge_config(rig, fake_forge), requester="slack:UCAROL0000")
    with pytest.raises(Refused) as refused:
        rig.accept(task.id, "carol")
    assert refused.value.reason == "self_approval"
    assert rig.task(task.id).state is TaskState.AWAITING_RESULT_APPROVAL
    rig.accept(task.id, "dave")  # another security approver may
    assert rig.task(task.id).state is TaskState.DELIVERING


def test_revoke_and_deny_win_over_a_waiting_result(rig: Rig, fake_forge: FakeForge) -> None:  # noqa: F811
    config = forge_config(rig, fake_forge)
    revoked = privileged_result(rig, config)
    denied = privileged_result(rig, config)
    gate = rig.broker.gatekeeper
    gate.revoke(revoked.id, identity="cli:bob", is_approver=True, reason="not now")
    gate.deny(denied.id, approver_id="dave", reason="wrong approach")
    for task, reason in ((revoked, "not_awaiting_result"), (denied, "already_denied")):
        with pytest.raises(Refused) as refused:
            rig.accept(task.id, "carol")
        assert refused.value.reason == reason
    assert rig.reconcile() == 0
    rig.work(config)
    assert heads(rig, "acme/payments") == set() and fake_forge.calls == []
    assert rig.task(revoked.id).state is TaskState.REVOKED and rig.task(denied.id).state is TaskState.DENIED


def test_a_record_rewritten_by_a_plain_redis_client_delivers_nothing(
        rig: Rig, fake_forge: FakeForge) -> None:  # noqa: F811
    """The ledger decides: a waiting result set to delivering or succeeded in Redis gets no
    delivery token, and a blocked task set to awaiting_result_approval cannot be accepted."""
    config = forge_config(rig, fake_forge)
    waiting = privileged_result(rig, config)
    blocked = rig.promote(repo="acme/payments", change_type="docs")
    rig.work(rig.config(agent=sh("echo x > payments/code.py"), repos={"acme/payments": {}}))
    assert rig.task(blocked.id).state is TaskState.BLOCKED
    attacker = redis.Redis.from_url(rig.broker.url, decode_responses=True)
    for task_id, state in ((waiting.id, "delivering"), (blocked.id, "awaiting_result_approval")):
        key = rig.store.keys.task(task_id)
        record = json.loads(attacker.get(key))
        record["state"] = state
        attacker.set(key, json.dumps(record))
    attacker.close()
    assert rig.reconcile() == 0
    assert not [e for e in rig.events("task.dispatched") if e["data"].get("kind") == "deliver"]
    whys = {e["subject"]: e["data"]["why"] for e in rig.events("tamper.detected")}
    assert "the sealed history says awaiting_result_approval" in whys[waiting.id]
    with pytest.raises(Refused) as refused:
        rig.accept(blocked.id, "carol", sha="0" * 40)
    assert refused.value.reason == "tampered"
    rig.work(config)
    assert heads(rig, "acme/payments") == set() and fake_forge.calls == []


def test_a_replayed_delivery_job_does_nothing(rig: Rig, fake_forge: FakeForge) -> None:  # noqa: F811
    config = forge_config(rig, fake_forge, repo="acme/web")
    task = rig.promote()  # standard tier: delivered once its gates and checks passed
    rig.work(config)
    assert rig.task(task.id).state is TaskState.SUCCEEDED
    [call] = fake_forge.calls
    assert call["json"]["draft"] is False
    raw = rig.rq().hget(f"rq:job:tier-standard_{task.id}_d1", "data")
    token = json.loads(__import__("zlib").decompress(raw))[3]["token"]
    rig.queue().enqueue_call(ENTRY_POINT, kwargs={"task_id": task.id, "token": token}, job_id=f"tier-standard_{task.id}_d1")
    rig.work(config)
    assert [e["data"]["reason"] for e in rig.events("job.refused")] == ["task_succeeded"]
    assert len(fake_forge.calls) == 1 and len(rig.events("task.delivery_started")) == 1


def test_delivery_pushes_only_the_accepted_sha(rig: Rig, fake_forge: FakeForge) -> None:  # noqa: F811
    """Someone who can push to the remote moves the quarantine ref after the acceptance: the
    delivery refuses, nothing becomes a branch."""
    config = forge_config(rig, fake_forge)
    task = privileged_result(rig, config)
    bare = rig.bare("acme/payments")
    subprocess.run(["git", "--git-dir", str(bare), "update-ref", f"refs/intake/{task.id}", "refs/heads/main"],
                   check=True)
    rig.accept(task.id, "carol")
    rig.work(config)
    ended = rig.task(task.id)
    assert ended.state is TaskState.FAILED and "not the accepted" in (ended.reason or "")
    assert heads(rig, "acme/payments") == set() and fake_forge.calls == []


@pytest.fixture
def paths_rig(tmp_path: Path, redis_server: str, rclient: redis.Redis, clock: FakeClock) -> Iterator[Rig]:
    text = EXAMPLE_POLICY.read_text().replace(
        'privileged_paths = ["auth/**", "**/conftest.py"]', 'privileged_paths = ["docs/auth/**"]')
    assert 'privileged_paths = ["docs/auth/**"]' in text
    made = make_rig(tmp_path, redis_server, rclient, clock, policy_text=text)
    yield made
    made.close()


def test_privileged_paths_need_a_result_approval_whatever_the_tier(paths_rig: Rig) -> None:
    rig = paths_rig
    touching, plain = rig.promote(), rig.promote()
    agent = sh('case "$INTAKE_TASK_ID" in ' + touching.id + ') mkdir -p docs/auth && echo a > docs/auth/x.md;; '
               '*) echo b > docs/plain.md;; esac')
    rig.work(rig.config(agent=agent))
    assert rig.task(plain.id).state is TaskState.SUCCEEDED  # standard tier, nothing privileged
    waiting = rig.task(touching.id)
    assert waiting.state is TaskState.AWAITING_RESULT_APPROVAL
    assert rig.fact(touching.id).result_rule["groups"] == ["platform"]  # the tier's own groups
    assert f"refs/heads/intake/{touching.id}" not in git_refs(rig.bare("acme/web"))
    rig.accept(touching.id, "bob")
    rig.work(rig.config(agent=agent))
    assert rig.task(touching.id).state is TaskState.SUCCEEDED
    assert f"refs/heads/intake/{touching.id}" in git_refs(rig.bare("acme/web"))


def test_intake_accept_on_the_cli_refuses_another_sha(rig: Rig, fake_forge: FakeForge) -> None:  # noqa: F811
    """The CLI as the API's client, carol calling with her own API token: another SHA is refused."""
    import sys

    from intake.api.callers import ApiTokens
    from intake.people.registry import People
    from tests.api_harness import running_broker

    task = privileged_result(rig, forge_config(rig, fake_forge))
    wrong = "f" * 40
    _, token = ApiTokens(rig.store, People(rig.store)).create("carol", actor="cli:root", scope="power")
    with running_broker(rig.settings) as api:
        out = subprocess.run([sys.executable, "-m", "intake", "accept", task.id, "--sha", wrong,
                              "--code", rig.code("carol")], env=rig.env(INTAKE_URL=api.tcp_url, INTAKE_TOKEN=token),
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"not {wrong[:12]}" in out.stderr and wrong not in out.stdout, out.stderr
    assert rig.task(task.id).state is TaskState.AWAITING_RESULT_APPROVAL
    assert rig.events("approval.refused")[-1]["data"]["reason"] == "wrong_sha"
