"""A scripted scenario through the real broker and a real worker (tests/workers/harness.py Rig):
ideas captured, promoted, delivered, blocked by a gate, revoked mid-run, a refused step-up. It
records what it did, so the report's figures are checked against the scenario, not against
numbers read back from the report."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest

from intake.core.errors import Refused
from intake.core.models import TaskState
from tests.factories import draft
from tests.workers.harness import Rig, in_a_work_tree, wait_for

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> fix the docs'


def sh(script: str) -> dict[str, object]:
    return {"type": "command", "argv": ["/bin/sh", "-c", script]}


@dataclass
class Scenario:
    """What was done, by task id; ``segments`` maps (tier, change type) to outcome counts."""

    ideas: list[str] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    mfa_refusals: dict[str, int] = field(default_factory=dict)
    segments: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    hostile_task: str = ""

    @property
    def promoted(self) -> list[str]:
        return self.delivered + self.blocked + self.revoked

    def count(self, tier: str, change_type: str, outcome: str) -> None:
        seg = self.segments.setdefault((tier, change_type), {})
        seg[outcome] = seg.get(outcome, 0) + 1


def run_scenario(rig: Rig, *, delivered: int = 2, blocked: int = 2, unpromoted: int = 2) -> Scenario:
    """``delivered`` docs changes delivered, ``blocked`` docs changes blocked by the paths gate
    (the first with hostile HTML in its idea), one privileged bugfix revoked while it runs,
    ``unpromoted`` ideas left waiting (one of them with a refused step-up)."""
    s = Scenario()

    def promote(text: str, repo: str = "acme/web", change_type: str = "docs") -> str:
        task = rig.promote(repo=repo, change_type=change_type, text=text)
        s.ideas.append(task.idea_id)
        s.count(task.risk_tier, change_type, "created")
        return task.id

    ok = [promote(f"Document step {i}") for i in range(delivered)]
    rig.work(rig.config(agent=sh("echo 'how to deploy' > docs/deploy.md")))
    for task_id in ok:
        assert rig.task(task_id).state is TaskState.SUCCEEDED, rig.task(task_id).reason
        s.delivered.append(task_id)
        s.count(rig.task(task_id).risk_tier, "docs", "succeeded")

    bad = [promote(HOSTILE if i == 0 else f"Tidy the docs {i}") for i in range(blocked)]
    s.hostile_task = bad[0] if bad else ""
    rig.work(rig.config(agent=sh("mkdir -p tests && echo 'import os' > tests/conftest.py && echo ok > docs/a.md")))
    for task_id in bad:
        assert rig.task(task_id).state is TaskState.BLOCKED, rig.task(task_id).reason
        s.blocked.append(task_id)
        s.count(rig.task(task_id).risk_tier, "docs", "blocked")

    doomed = promote("Fix the rounding bug", repo="acme/payments", change_type="bugfix")

    def revoke_when_running() -> None:
        wait_for(lambda: in_a_work_tree("running.md"), 30, "the agent to start")
        rig.broker.gatekeeper.revoke(doomed, identity="cli:bob", is_approver=True, reason="wrong repo")

    helper = threading.Thread(target=revoke_when_running)
    helper.start()
    rig.work(rig.config(agent=sh("echo up > running.md; exec sleep 60")))
    helper.join(timeout=60)
    assert rig.task(doomed).state is TaskState.REVOKED
    s.revoked.append(doomed)
    s.count(rig.task(doomed).risk_tier, "bugfix", "revoked")

    for i in range(unpromoted):
        idea = rig.store.capture(draft(text=f"Maybe later {i}"))[0]
        s.ideas.append(idea.id)
        if i == 0:
            with pytest.raises(Refused) as refused:
                rig.broker.gatekeeper.promote(idea.id, repo="acme/web", change_type="docs", approver_id="alice",
                                              code="000000")
            s.mfa_refusals[refused.value.reason] = 1
    return s
