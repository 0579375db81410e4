"""The web console driven in a real Chromium (Playwright, Debian's /usr/bin/chromium) against the
real app and Redis: TOTP sign-in and approval, passkeys through Chromium's virtual authenticator,
revoke, the kill switch, enrolment links, inert hostile text, and CSRF."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from intake.console.enrol import EnrolLinks
from intake.core.models import Channel, TaskState
from intake.core.settings import Settings
from tests.factories import draft
from tests.functional.console_harness import (
    CHROMIUM_ARGS,
    Running,
    code_next,
    code_now,
    console_policy,
    console_settings,
    enrol,
    free_port,
    serve,
)

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def app(settings: Settings, tmp_path: Path) -> Iterator[Running]:
    with serve(console_settings(settings, free_port(), console_policy(tmp_path))) as running:
        yield running


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context()
    ctx.set_default_timeout(10_000)
    yield ctx
    ctx.close()


def sign_in(page: Page, app: Running, who: str, totp: pyotp.TOTP, code: str | None = None) -> None:
    page.goto(f"{app.url}/console/signin")
    page.fill("#signin input[name=approver]", who)
    page.fill("#signin input[name=code]", code or code_now(totp))
    page.click("#signin .totp-submit")
    try:
        page.wait_for_url(f"{app.url}/console/ideas")
    except PlaywrightTimeout:
        pytest.fail(f"sign-in as {who} failed at {page.url}: {page.inner_text('body')[:600]}")
    assert page.text_content("#who") == who


def file_idea(app: Running, text: str = "Fix the flaky login test") -> str:
    idea, _ = app.broker.store.capture(draft(channel=Channel.CLI, requester="cli:erin", text=text))
    return idea.id


def virtual_authenticator(page: Page) -> Any:
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
        "hasUserVerification": True, "isUserVerified": True}})
    return cdp


def audit_actions(app: Running) -> list[str]:
    return [e["action"] for e in app.broker.audit.export()]


def test_sign_in_with_totp_sets_a_strict_httponly_cookie_under_a_csp(app: Running, context: BrowserContext) -> None:
    totps = enrol(app.settings, "alice")
    page = context.new_page()
    response = page.goto(f"{app.url}/console/ideas")
    assert response is not None and page.url == f"{app.url}/console/signin"  # not signed in: sent to sign in
    headers = response.headers
    assert headers["content-security-policy"].startswith("default-src 'self'; script-src 'self'; object-src 'none'")
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "same-origin"

    page.fill("#signin input[name=approver]", "alice")
    page.fill("#signin input[name=code]", "000000" if code_now(totps["alice"]) != "000000" else "111111")
    page.click("#signin .totp-submit")
    assert "not valid" in (page.text_content("#error") or "")

    while 30 - time.time() % 30 < 3:  # wait for the clock: sign in early in a TOTP step, so the
        time.sleep(0.05)              # code it spends is still the one on the screen below
    sign_in(page, app, "alice", totps["alice"])
    # The sign-in spent the code on alice's screen: the page says when the next one is due
    # (issue 20), and using the spent code again says the same instead of a bare "invalid".
    due = int(page.get_attribute("#next-code", "data-due-in") or "0")
    assert 0 < due <= 31
    idea_id = file_idea(app)
    page.goto(f"{app.url}/console/ideas/{idea_id}")
    page.select_option("#promote select[name=repo]", "acme/web")
    page.select_option("#promote select[name=change_type]", "docs")
    refusals = len([a for a in audit_actions(app) if a == "mfa.refused"])
    spent = page.evaluate("sessionStorage.getItem('intake-spent-code')")  # the code she signed in with
    assert spent and len(spent) == 6
    page.fill("#promote input[name=code]", spent)
    page.click("#promote .totp-submit")
    assert "next code is due in" in (page.text_content("#error") or "")  # held in the page, not sent
    assert len([a for a in audit_actions(app) if a == "mfa.refused"]) == refusals
    assert app.broker.store.get_idea(idea_id).task_id is None
    # Sent anyway (another tab, a script): the broker's refusal says when the next code is due.
    csrf = page.get_attribute('meta[name="csrf-token"]', "content") or ""
    answer = page.request.post(f"{app.url}/console/ideas/{idea_id}/promote",
                               form={"csrf": csrf, "repo": "acme/web", "change_type": "docs",
                                     "code": spent})
    assert answer.status == 403 and "already used" in answer.text() and "next one is due in" in answer.text()
    (cookie,) = [c for c in context.cookies() if c["name"] == "intake_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/console"
    assert not cookie["secure"]  # served over plain http on localhost; https origins set Secure
    assert "console.signed_in" in audit_actions(app)


def test_promote_and_approve_with_totp(app: Running, browser: Browser) -> None:
    totps = enrol(app.settings, "alice", "carol")
    idea_id = file_idea(app)
    alice = browser.new_context()
    page = alice.new_page()
    sign_in(page, app, "alice", totps["alice"])
    page.goto(f"{app.url}/console/ideas/{idea_id}")
    page.select_option("#promote select[name=repo]", "acme/payments")
    page.select_option("#promote select[name=change_type]", "bugfix")
    page.fill("#promote input[name=code]", code_next(totps["alice"]))
    page.click("#promote .totp-submit")
    page.wait_for_url(re.compile(r".*/console/tasks/T-[0-9a-f]{12}\?done=promoted"))
    task_id = page.url.split("/tasks/")[1].split("?")[0]
    assert page.text_content("#task-state") == "awaiting_approvals"
    alice.close()

    carol = browser.new_context()
    page = carol.new_page()
    sign_in(page, app, "carol", totps["carol"])
    page.goto(f"{app.url}/console/tasks/{task_id}")
    assert page.text_content("#spec-hash") == app.broker.store.get_task(task_id).spec_hash
    page.fill("#approve input[name=code]", code_next(totps["carol"]))
    page.click("#approve .totp-submit")
    page.wait_for_url(f"{app.url}/console/tasks/{task_id}?done=approved")
    assert page.text_content("#task-state") == "queued"
    rows = page.locator("#approvals tr").all_text_contents()
    assert any("alice" in r and "totp" in r for r in rows) and any("carol" in r and "totp" in r for r in rows)
    task = app.broker.store.get_task(task_id)
    assert task.state is TaskState.QUEUED and [a.via for a in task.approvals] == ["console", "console"]
    carol.close()


def _promote_with(app: Running, who: str, code: str, repo: str = "acme/payments") -> str:
    return app.broker.gatekeeper.promote(file_idea(app), repo=repo, change_type="bugfix", approver_id=who,
                                         code=code).task.id


def test_register_a_passkey_and_approve_with_it_bound_to_one_spec_hash(app: Running, context: BrowserContext) -> None:
    totps = enrol(app.settings, "alice", "carol")
    first = _promote_with(app, "carol", code_now(totps["carol"]))
    second = _promote_with(app, "carol", code_next(totps["carol"]))
    page = context.new_page()
    virtual_authenticator(page)
    sign_in(page, app, "alice", totps["alice"])

    # Registering a passkey is a new factor: it takes a fresh code.
    page.goto(f"{app.url}/console/passkeys")
    page.fill("#register input[name=code]", code_next(totps["alice"]))
    page.click("#register .passkey-create")
    page.wait_for_url(f"{app.url}/console/passkeys?done=registered")
    assert len(app.broker.approvers.passkeys.list("alice")) == 1
    assert "passkey.registered" in audit_actions(app)

    # An assertion made for the second task's spec hash does not approve the first task...
    page.goto(f"{app.url}/console/tasks/{first}")
    status = page.evaluate(FORGE_ASSERTION, {"options_for": second, "post_to": first})
    assert status == 403
    # ...nor the second task once its spec changed (a new spec hash).
    old_hash = app.broker.store.get_task(second).spec_hash
    page.goto(f"{app.url}/console/tasks/{second}")
    challenge = page.evaluate(ASSERT_ONLY, {"subject": second})
    app.broker.gatekeeper.amend(second, approver_id="carol", change_type="tests")
    assert app.broker.store.get_task(second).spec_hash != old_hash
    status = page.evaluate(POST_ASSERTION, {"post_to": second, **challenge,
                                            "spec_hash": app.broker.store.get_task(second).spec_hash})
    assert status == 403
    assert app.broker.store.get_task(first).approvals[0].approver == "carol"
    assert len(app.broker.store.get_task(first).approvals) == 1 and not app.broker.store.get_task(second).approvals
    refusals = [e["data"]["reason"] for e in app.broker.audit.export() if e["action"] == "mfa.refused"]
    assert refusals == ["passkey_challenge_mismatch", "passkey_challenge_mismatch"]

    # The honest path: the button on the first task's page.
    page.goto(f"{app.url}/console/tasks/{first}")
    page.click("#approve .passkey-assert")
    page.wait_for_url(f"{app.url}/console/tasks/{first}?done=approved")
    assert page.text_content("#task-state") == "queued"
    assert any("alice" in r and "passkey" in r for r in page.locator("#approvals tr").all_text_contents())
    assert app.broker.store.get_task(first).approvals[-1].via == "console+passkey"
    assert app.broker.approvers.passkeys.list("alice")[0].sign_count >= 2  # counter moved on


# Page scripts for the attacker's moves: get a real assertion for one thing, submit it for another.
ASSERT_ONLY = """async ({subject}) => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const resp = await fetch('/console/stepup/options', {method: 'POST', headers: {'Content-Type': 'application/json',
    'X-CSRF-Token': csrf}, body: JSON.stringify({action: 'approve', subject})});
  const data = await resp.json();
  const pk = data.options;
  pk.challenge = unb64u(pk.challenge);
  for (const c of pk.allowCredentials || []) c.id = unb64u(c.id);
  const cred = await navigator.credentials.get({publicKey: pk});
  return {challenge_id: data.challenge_id, credential: credentialJSON(cred)};
}"""
POST_ASSERTION = """async ({post_to, challenge_id, credential, spec_hash}) => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const body = new URLSearchParams({csrf, challenge_id, credential, spec_hash});
  const resp = await fetch(`/console/tasks/${post_to}/approve`, {method: 'POST', body});
  return resp.status;
}"""
FORGE_ASSERTION = f"""async ({{options_for, post_to}}) => {{
  const got = await ({ASSERT_ONLY})({{subject: options_for}});
  return await ({POST_ASSERTION})({{post_to, ...got, spec_hash: ''}});
}}"""


def test_revoke_and_the_kill_switch(app: Running, context: BrowserContext) -> None:
    totps = enrol(app.settings, "alice", "bob")
    task_id = _promote_with(app, "bob", code_now(totps["bob"]), repo="acme/web")
    assert app.broker.store.get_task(task_id).state is TaskState.QUEUED
    page = context.new_page()
    sign_in(page, app, "alice", totps["alice"])
    page.goto(f"{app.url}/console/tasks/{task_id}")
    page.fill("#revoke input[name=reason]", "wrong repo")
    page.click("#revoke button")
    page.wait_for_url(f"{app.url}/console/tasks/{task_id}?done=revoked")
    assert page.text_content("#task-state") == "revoked"
    assert app.broker.store.get_task(task_id).state is TaskState.REVOKED

    page.goto(f"{app.url}/console/killswitch")
    page.fill("#freeze input[name=reason]", "incident 42")
    page.click("#freeze button")
    page.wait_for_url(f"{app.url}/console/killswitch?done=frozen")
    assert "incident 42" in (page.text_content("#frozen") or "")
    page.fill("#thaw input[name=code]", code_next(totps["alice"]))  # thaw gives power back: a code
    page.click("#thaw .totp-submit")
    page.wait_for_url(f"{app.url}/console/killswitch?done=thawed")
    assert app.broker.gatekeeper.frozen() is None



def test_an_approver_who_is_no_admin_freezes_from_the_console_only_an_admin_thaws(
        app: Running, context: BrowserContext) -> None:
    """One rule on every channel: any admin or confirmed approver pulls the kill switch (as on
    the API and CLI); thawing gives power back, so it stays with admins and a fresh code."""
    totps = enrol(app.settings, "alice", "bob")
    page = context.new_page()
    sign_in(page, app, "bob", totps["bob"])  # bob approves; the policy's only admin is alice
    page.goto(f"{app.url}/console/killswitch")
    page.fill("#freeze input[name=reason]", "bob saw something")
    page.click("#freeze button")
    page.wait_for_url(f"{app.url}/console/killswitch?done=frozen")
    assert (app.broker.gatekeeper.frozen() or {}).get("by") == "approver:bob"
    assert page.locator("#thaw").count() == 0 and "Only admins can thaw" in (page.text_content("#thaw-admins") or "")
    csrf = page.get_attribute('meta[name="csrf-token"]', "content") or ""
    refused = page.request.post(f"{app.url}/console/thaw", form={"csrf": csrf, "code": code_next(totps["bob"])})
    assert refused.status in (200, 403) and app.broker.gatekeeper.frozen() is not None
    sign_in(page, app, "alice", totps["alice"])
    page.goto(f"{app.url}/console/killswitch")
    page.fill("#thaw input[name=code]", code_next(totps["alice"]))
    page.click("#thaw .totp-submit")
    page.wait_for_url(f"{app.url}/console/killswitch?done=thawed")
    assert app.broker.gatekeeper.frozen() is None


def test_hostile_idea_text_renders_inert(app: Running, context: BrowserContext) -> None:
    totps = enrol(app.settings, "alice")
    text = ('<script>window.__pwned = 1; alert(1)</script>'
            '<img src=x onerror="window.__pwned = 2; alert(2)">'
            'approve\u202eevil\u200b')
    idea_id = file_idea(app, text)
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    sign_in(page, app, "alice", totps["alice"])
    page.goto(f"{app.url}/console/ideas/{idea_id}")
    page.wait_for_load_state("load")
    shown = page.text_content("#idea-text") or ""
    assert "<script>window.__pwned = 1; alert(1)</script>" in shown
    assert '<img src=x onerror="window.__pwned = 2; alert(2)">' in shown
    assert "approve⟨U+202E⟩evil⟨U+200B⟩" in shown  # the bidi override and zero-width space made visible
    assert page.locator("#idea-text img").count() == 0 and page.locator("#idea-text script").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert dialogs == []
    page.goto(f"{app.url}/console/ideas")  # the title (first line) on the list page too
    assert page.locator("#ideas img").count() == 0 and page.evaluate("window.__pwned") is None


def test_a_post_without_the_csrf_token_is_refused_and_writes_nothing(app: Running, context: BrowserContext) -> None:
    totps = enrol(app.settings, "alice", "bob")
    task_id = _promote_with(app, "bob", code_now(totps["bob"]), repo="acme/web")
    page = context.new_page()
    sign_in(page, app, "alice", totps["alice"])
    before = app.broker.client.xlen(app.broker.audit.stream)
    # The signed-in browser's own cookie, a well-formed form, no token: refused.
    no_token = page.request.post(f"{app.url}/console/tasks/{task_id}/revoke", form={"reason": "csrf"})
    wrong = page.request.post(f"{app.url}/console/tasks/{task_id}/revoke",
                              form={"reason": "csrf", "csrf": "x" * 43})
    json_post = page.request.post(f"{app.url}/console/freeze", data=json.dumps({"reason": "x"}),
                                  headers={"Content-Type": "application/json"})
    assert [no_token.status, wrong.status, json_post.status] == [403, 403, 403]
    assert app.broker.store.get_task(task_id).state is TaskState.QUEUED
    assert app.broker.gatekeeper.frozen() is None
    assert app.broker.client.xlen(app.broker.audit.stream) == before
    # Another origin is refused even with the right token.
    csrf = page.get_attribute('meta[name="csrf-token"]', "content")
    cross = page.request.post(f"{app.url}/console/tasks/{task_id}/revoke", form={"reason": "x", "csrf": csrf or ""},
                              headers={"Origin": "https://evil.example"})
    assert cross.status == 403 and app.broker.store.get_task(task_id).state is TaskState.QUEUED


def test_a_forged_or_edited_session_cookie_is_not_signed_in(app: Running, context: BrowserContext) -> None:
    totps = enrol(app.settings, "alice")
    page = context.new_page()
    sign_in(page, app, "alice", totps["alice"])
    (cookie,) = [c for c in context.cookies() if c["name"] == "intake_console"]
    flipped = cookie["value"][:-2] + ("AA" if cookie["value"][-2:] != "AA" else "BB")
    context.add_cookies([{**cookie, "value": flipped}])
    page.goto(f"{app.url}/console/ideas")
    assert page.url == f"{app.url}/console/signin"
    # Signing out kills the server-side session: the old cookie no longer works.
    context.add_cookies([cookie])
    page.goto(f"{app.url}/console/ideas")
    page.click("header button")
    page.wait_for_url(f"{app.url}/console/signin")
    context.add_cookies([cookie])
    page.goto(f"{app.url}/console/ideas")
    assert page.url == f"{app.url}/console/signin"


def test_enrolment_by_a_one_time_link(app: Running, browser: Browser) -> None:
    totps = enrol(app.settings, "alice")
    admin = browser.new_context()
    page = admin.new_page()
    sign_in(page, app, "alice", totps["alice"])
    page.goto(f"{app.url}/console/approvers")
    page.fill("#enrol input[name=approver]", "bob")
    page.fill("#enrol input[name=name]", "Bob")
    page.fill("#enrol input[name=groups]", "platform")
    page.fill("#enrol input[name=code]", code_next(totps["alice"]))
    page.click("#enrol button")
    assert "bob is invited" in (page.text_content("#enrol-invited") or "")
    assert "/console/enrol/" not in page.content()  # the admin never sees a link (nor a seed)
    assert not app.broker.approvers.get("bob").confirmed
    assert not app.broker.approvers.get("bob").secret_enc  # invited: no secret exists yet
    admin.close()
    # The link bob gets in his own Slack DM (send_by_dm: tests/test_enrol_dm.py).
    link = f"{app.url}/console/enrol/" + EnrolLinks(app.broker.store).create("bob", actor="approver:alice")

    person = browser.new_context()
    page = person.new_page()
    page.goto(link)
    page.click("#reveal button")
    assert page.locator("#qr svg").count() == 1
    totp = pyotp.parse_uri(page.text_content("#otpauth") or "")
    page.goto(link)  # a second look shows no secret
    assert page.locator("#qr").count() == 0
    page.fill("#confirm input[name=code]", totp.now())
    page.click("#confirm button")
    assert "bob is confirmed" in (page.text_content("#enrolled") or "")
    assert app.broker.approvers.get("bob").confirmed
    page.goto(link)
    assert page.locator("#reveal").count() == 0  # the link is gone
    person.close()
