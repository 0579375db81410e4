"""The console's Accept action in a real Chromium: a privileged task's result, produced by a real
worker and waiting on ``refs/intake/<task id>``, is accepted with a fresh step-up bound to its
commit; the requester cannot, another SHA is refused, and a passkey made for one result does
not accept another."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext

from intake.core.models import TaskState
from tests.conftest import FakeClock
from tests.factories import draft
from tests.functional.console_harness import (
    Running,
    code_next,
    console_settings,
    free_port,
    serve,
)
from tests.functional.test_console import CHROMIUM, browser, sign_in, virtual_authenticator  # noqa: F401
from tests.workers.harness import Rig, git_refs, rig  # noqa: F401

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture
def clock() -> FakeClock:
    """The rig's clock runs ten TOTP steps behind the console's real one, so the codes the rig
    spends (enrolment, promote, approve) are all older than the ones carol types in the browser."""
    behind = FakeClock()
    behind.advance(-300)
    return behind


def waiting_results(rig: Rig, *requesters: str, agent: dict[str, object] | None = None) -> list[str]:
    """Privileged (payments) tasks, one per requester, promoted by alice, approved by dave and
    run by one real burst worker (the demo agent, or ``agent``) until each result waits for
    approval."""
    gate = rig.broker.gatekeeper
    ids = []
    for requester in requesters:
        idea = rig.store.capture(draft(text="Document the settlement job", requester=requester),
                                 ttl_s=rig.broker.policy.clocks.idea_ttl)[0]
        task = gate.promote(idea.id, repo="acme/payments", change_type="docs", approver_id="alice",
                            code=rig.code("alice")).task
        assert gate.approve(task.id, approver_id="dave", code=rig.code("dave")).task.state is TaskState.QUEUED
        rig.clock.advance(30)
        ids.append(task.id)
    rig.work(rig.config(agent=agent))
    for task_id in ids:
        assert rig.task(task_id).state is TaskState.AWAITING_RESULT_APPROVAL, rig.task(task_id).reason
    return ids


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:  # noqa: F811
    ctx = browser.new_context()
    ctx.set_default_timeout(10_000)
    yield ctx
    ctx.close()


def console_for(rig: Rig) -> AbstractContextManager[Running]:
    """The console on the rig's data dir, keys, policy and Redis (its broker has the real clock)."""
    assert rig.settings.policy_path is not None
    return serve(console_settings(rig.settings, free_port(), Path(rig.settings.policy_path)))


def test_security_accepts_the_result_with_totp_the_requester_and_another_sha_are_refused(
        rig: Rig, context: BrowserContext) -> None:  # noqa: F811
    mine, theirs = waiting_results(rig, "slack:UCAROL0000", "slack:U0REQUEST1")  # carol filed `mine`
    sha = rig.fact(theirs).result_commit
    with console_for(rig) as app:
        page = context.new_page()
        sign_in(page, app, "carol", rig.totps["carol"])

        page.goto(f"{app.url}/console/tasks/{theirs}")
        assert page.text_content("#accept-sha") == sha
        assert page.get_attribute("#accept-form input[name=sha]", "value") == sha
        assert "docs/intake/" in (page.text_content("#result") or "")
        result = rig.task(theirs).result or {}
        assert page.text_content("#result-lines") == f"1 file(s), +{result['additions']} −0"
        assert page.text_content("#result-gates") == "passed"
        digest = result["dependencies"]["sbom_sha256"]
        assert page.text_content("#dependencies-summary") == \
            f"no dependency changes; SBOM: 0 component(s), sha256 {digest[:16]}…"
        checks = page.locator("#result-checks li").all_text_contents()
        assert len(checks) == 2 and all(c.endswith(": passed") for c in checks)

        # A form naming another commit is refused, and writes nothing but the refusal.
        before = len(list(app.broker.audit.export()))
        csrf = page.get_attribute('meta[name="csrf-token"]', "content") or ""
        main = git_refs(rig.bare("acme/payments"))["refs/heads/main"]
        forged = page.request.post(f"{app.url}/console/tasks/{theirs}/accept",
                                   form={"csrf": csrf, "sha": main, "code": code_next(rig.totps["carol"])})
        assert forged.status == 403 and f"not {main[:12]}" in forged.text()
        events = list(app.broker.audit.export())[before:]
        assert [(e["action"], e["data"].get("reason")) for e in events] == [("approval.refused", "wrong_sha")]
        assert rig.task(theirs).state is TaskState.AWAITING_RESULT_APPROVAL and not rig.task(theirs).result_approvals

        # The requester cannot accept the result of her own idea (the Gatekeeper says so).
        page.goto(f"{app.url}/console/tasks/{mine}")
        page.fill("#accept-form input[name=code]", code_next(rig.totps["carol"]))
        page.click("#accept-form .totp-submit")
        assert "your own request" in (page.text_content("#error") or "")
        assert rig.task(mine).state is TaskState.AWAITING_RESULT_APPROVAL

        # The honest path: the code was not spent by the refusals above.
        page.goto(f"{app.url}/console/tasks/{theirs}")
        page.fill("#accept-form input[name=code]", code_next(rig.totps["carol"]))
        page.click("#accept-form .totp-submit")
        page.wait_for_url(f"{app.url}/console/tasks/{theirs}?done=accepted")
        assert page.text_content("#task-state") == "delivering"
        assert page.locator("#accept-form").count() == 0
        assert "carol" in (page.text_content("#result-approvals") or "")
        [approval] = rig.task(theirs).result_approvals
        assert approval.approver == "carol" and approval.sha == sha and approval.via == "console"

        # The delivery job the acceptance dispatched makes the branch from exactly that commit.
        rig.clock.now = float(int(time.time()))
        rig.work(rig.config())
        page.reload()
        assert page.text_content("#task-state") == "succeeded"
        assert git_refs(rig.bare("acme/payments"))[f"refs/heads/intake/{theirs}"] == sha
        assert f"refs/heads/intake/{mine}" not in git_refs(rig.bare("acme/payments"))


ACCEPT_ASSERTION = """async ({subject}) => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const resp = await fetch('/console/stepup/options', {method: 'POST', headers: {'Content-Type': 'application/json',
    'X-CSRF-Token': csrf}, body: JSON.stringify({action: 'accept', subject})});
  const data = await resp.json();
  const pk = data.options;
  pk.challenge = unb64u(pk.challenge);
  for (const c of pk.allowCredentials || []) c.id = unb64u(c.id);
  const cred = await navigator.credentials.get({publicKey: pk});
  return {challenge_id: data.challenge_id, credential: credentialJSON(cred), bound: data.bound};
}"""
POST_ACCEPT = """async ({post_to, challenge_id, credential, sha, diff_sha256}) => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const body = new URLSearchParams({csrf, challenge_id, credential, sha, diff_sha256});
  const resp = await fetch(`/console/tasks/${post_to}/accept`, {method: 'POST', body});
  return resp.status;
}"""


def test_a_passkey_assertion_for_one_result_does_not_accept_another(
        rig: Rig, context: BrowserContext) -> None:  # noqa: F811
    # The agent names its file with markup: the console shows it as text.
    hostile = {"type": "command", "argv": ["/bin/sh", "-c", 'echo hi > "docs/<b>$INTAKE_TASK_ID.md"']}
    first, second = waiting_results(rig, "slack:U0REQUEST1", "slack:U0REQUEST1", agent=hostile)
    first_sha, second_sha = rig.fact(first).result_commit, rig.fact(second).result_commit
    assert first_sha != second_sha
    with console_for(rig) as app:
        page = context.new_page()
        virtual_authenticator(page)
        sign_in(page, app, "carol", rig.totps["carol"])
        page.goto(f"{app.url}/console/passkeys")
        page.fill("#register input[name=code]", code_next(rig.totps["carol"]))
        page.click("#register .passkey-create")
        page.wait_for_url(f"{app.url}/console/passkeys?done=registered")

        # A real assertion whose challenge names the second result, submitted for the first.
        page.goto(f"{app.url}/console/tasks/{first}")
        assert f"docs/<b>{first}.md" in (page.text_content("#result") or "")
        assert page.locator("#result b").count() == 0
        got = page.evaluate(ACCEPT_ASSERTION, {"subject": second})
        assert got["bound"] == f"{second_sha}:{rig.fact(second).result_diff}"  # commit and reviewed diff
        status = page.evaluate(POST_ACCEPT, {"post_to": first, "challenge_id": got["challenge_id"],
                                             "credential": got["credential"], "sha": first_sha,
                                             "diff_sha256": rig.fact(first).result_diff})
        assert status == 403
        refusals = [e["data"]["reason"] for e in app.broker.audit.export() if e["action"] == "mfa.refused"]
        assert refusals == ["passkey_challenge_mismatch"]
        assert not rig.task(first).result_approvals and not rig.task(second).result_approvals

        # The button on the first result's page: its own challenge, bound to its own SHA.
        page.click("#accept-form .passkey-assert")
        page.wait_for_url(f"{app.url}/console/tasks/{first}?done=accepted")
        assert page.text_content("#task-state") == "delivering"
        [approval] = rig.task(first).result_approvals
        assert approval.sha == first_sha and approval.via == "console+passkey"
        assert rig.task(second).state is TaskState.AWAITING_RESULT_APPROVAL


def test_a_privileged_result_is_accepted_only_by_the_diff_its_page_rendered(
        rig: Rig, context: BrowserContext) -> None:  # noqa: F811
    """Issue 20: the agent changes a privileged path with markup and bidi characters in the
    changed lines. The accept page shows the diff escaped (as text, bidi as markers), the
    privileged file highlighted; the form carries the digest it rendered; an approval for another
    digest, or none, is refused; the approval records the digest."""
    task = rig.promote(repo="acme/web", change_type="docs")
    hostile = {"type": "command", "argv": ["/bin/sh", "-c",
               "mkdir -p auth && printf '<script>alert(1)</script>\\nlet ok = \\342\\200\\256true\\n' > auth/notes.md"]}
    rig.work(rig.config(agent=hostile))
    assert rig.task(task.id).state is TaskState.AWAITING_RESULT_APPROVAL, rig.task(task.id).reason
    fact = rig.fact(task.id)
    assert fact.result_diff and len(fact.result_diff) == 64
    dialogs: list[str] = []
    with console_for(rig) as app:
        page = context.new_page()
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        sign_in(page, app, "bob", rig.totps["bob"])
        page.goto(f"{app.url}/console/tasks/{task.id}")
        assert page.text_content("#review-sha") == fact.result_diff
        shown = page.locator("pre.diff").all_text_contents()
        assert any("+<script>alert(1)</script>" in t for t in shown), shown
        assert any("+let ok = \u27e8U+202E\u27e9true" in t for t in shown), shown  # the bidi mark, made visible
        assert page.locator("pre.diff script").count() == 0 and dialogs == []
        assert "\u202e" not in page.content()  # the raw bidi character never reaches the page
        assert "auth/notes.md" in (page.text_content(".privileged-note") or "")
        assert page.locator(".diff-file.privileged").count() == 1
        assert page.get_attribute("#accept-form input[name=diff_sha256]", "value") == fact.result_diff

        csrf = page.get_attribute('meta[name="csrf-token"]', "content") or ""
        for forged_diff, reason in (("0" * 64, "wrong_diff"), ("", "review_required")):
            before = len(list(app.broker.audit.export()))
            answer = page.request.post(f"{app.url}/console/tasks/{task.id}/accept",
                                       form={"csrf": csrf, "sha": fact.result_commit, "diff_sha256": forged_diff,
                                             "code": code_next(rig.totps["bob"])})
            assert answer.status == 403
            events = list(app.broker.audit.export())[before:]
            assert [(e["action"], e["data"].get("reason")) for e in events] == [("approval.refused", reason)]
        assert not rig.task(task.id).result_approvals

        # The stored diff altered in Redis: the page refuses to offer an accept at all.
        key = f"intake:review:{task.id}:{fact.result_diff}"
        original = rig.r.get(key)
        rig.r.set(key, original.replace("<script>", "<em>"))
        page.goto(f"{app.url}/console/tasks/{task.id}")
        assert page.locator("#review-missing").count() == 1 and page.locator("#accept-form").count() == 0
        rig.r.set(key, original)

        page.goto(f"{app.url}/console/tasks/{task.id}")
        page.fill("#accept-form input[name=code]", code_next(rig.totps["bob"]))
        page.click("#accept-form .totp-submit")
        page.wait_for_url(f"{app.url}/console/tasks/{task.id}?done=accepted")
        [approval] = rig.task(task.id).result_approvals
        assert approval.approver == "bob" and approval.diff_sha256 == fact.result_diff
        [approved] = [e for e in app.broker.audit.export() if e["action"] == "result.approved"]
        assert approved["data"]["diff_sha256"] == fact.result_diff and approved["data"]["sha"] == fact.result_commit
