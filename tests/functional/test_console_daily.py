"""The console for daily use, in a real Chromium: search, filter and pages; a live update that
arrives without a reload (Server-Sent Events); the task page of a task a real worker delivered
(spec, approvals with their factor, checks and gates as rows, the SBOM table, the provenance
statement verified); and a phone-width layout that never scrolls sideways.

Screenshots go to ``$CONSOLE_SCREENSHOTS`` when set (the ones in docs/screenshots/ were made so).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from intake.core.models import Channel, TaskState
from tests.factories import draft
from tests.functional.console_harness import Running, code_next, console_settings, enrol, free_port, serve
from tests.functional.test_console import CHROMIUM, app, browser, sign_in  # noqa: F401
from tests.workers.harness import Rig, rig  # noqa: F401

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


def shot(page: Page, name: str) -> None:
    where = os.environ.get("CONSOLE_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(where) / f"{name}.png"), full_page=True)


def _context(browser: Browser, viewport: dict[str, int]) -> BrowserContext:  # noqa: F811
    ctx = browser.new_context(viewport=viewport)
    ctx.set_default_timeout(15_000)
    return ctx


def _capture(app: Running, text: str) -> str:
    idea, _ = app.broker.store.capture(draft(channel=Channel.CLI, requester="cli:erin", text=text))
    return idea.id


def _no_sideways_scroll(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


def _wider(page: Page) -> list[str]:
    """What sticks out past the viewport (for the failure message)."""
    return page.evaluate("""Array.from(document.querySelectorAll('body *'))
        .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1
                     && !e.closest('.scroll, [style*=overflow], table, pre, details'))
        .slice(0, 8).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))""")


def test_search_filter_and_paginate_ideas_and_audit(app: Running, browser: Browser) -> None:  # noqa: F811
    totps = enrol(app.settings, "alice")
    ids = [_capture(app, f"{'Beta' if n % 3 == 0 else 'Alpha'} request number {n}") for n in range(30)]
    ctx = _context(browser, DESKTOP)
    page = ctx.new_page()
    sign_in(page, app, "alice", totps["alice"])
    assert page.locator("#ideas tr").count() == 1 + 25  # header + one page
    assert page.text_content("#page-of") == "25 shown of 30 ideas"
    shot(page, "console-ideas-desktop")
    page.click("#pager a[rel=next]")
    page.wait_for_url(re.compile(r".*/console/ideas\?.*after=.*"))
    assert page.locator("#ideas tr").count() == 1 + 5
    page.click("#pager a[rel=prev]")
    page.wait_for_url(re.compile(r".*before=.*"))
    assert page.locator("#ideas tr").count() == 1 + 25

    page.fill("#filters input[name=q]", "beta")  # search is case-insensitive, over id, title and text
    page.click("#filters button[type=submit]")
    page.wait_for_url(re.compile(r".*q=beta.*"))
    rows = page.locator("#ideas tr td:first-child a").all_text_contents()
    assert sorted(rows) == sorted(i for n, i in enumerate(ids) if n % 3 == 0)
    assert (page.text_content("#page-of") or "").startswith("10 shown; looked at 30 of 30 ideas")

    page.select_option("#filters select[name=state]", "denied")  # a filter that matches nothing
    page.click("#filters button[type=submit]")
    page.wait_for_url(re.compile(r".*state=denied.*"))
    assert page.text_content("#ideas") and "Nothing waiting." in (page.text_content("#ideas") or "")

    # A malformed filter is ignored, never echoed into the page.
    page.goto(f"{app.url}/console/ideas?q=%00%3Cscript%3E&since=forever&after=-3&until=2026-13-45")
    assert page.text_content("#page-of") == "25 shown of 30 ideas"

    page.goto(f"{app.url}/console/audit?action=idea.&q={ids[0]}")
    actions = page.locator("#events tr td:nth-child(4)").all_text_contents()
    assert actions and all(a.startswith("idea.") for a in actions)
    assert all(ids[0] in s for s in page.locator("#events tr td:nth-child(5)").all_text_contents())
    ctx.close()


def test_a_new_idea_appears_without_a_reload(app: Running, browser: Browser) -> None:  # noqa: F811
    totps = enrol(app.settings, "alice")
    ctx = _context(browser, DESKTOP)
    page = ctx.new_page()
    sign_in(page, app, "alice", totps["alice"])
    page.wait_for_selector("body[data-live-connected='1']", state="attached")
    page.evaluate("window.__sameDocument = 'yes'")
    idea_id = _capture(app, "Arrives while you watch")
    page.wait_for_selector(f"#ideas a[href='/console/ideas/{idea_id}']")
    assert page.evaluate("window.__sameDocument") == "yes", "the page reloaded instead of updating in place"
    assert (page.text_content("#live-status") or "").startswith("Updated ")
    ctx.close()


def console_for(rig: Rig) -> AbstractContextManager[Running]:  # noqa: F811
    assert rig.settings.policy_path is not None
    return serve(console_settings(rig.settings, free_port(), Path(rig.settings.policy_path)))


@pytest.fixture
def delivered(rig: Rig) -> Iterator[str]:  # noqa: F811
    task = rig.promote()
    rig.work(rig.config())
    assert rig.task(task.id).state is TaskState.SUCCEEDED, rig.task(task.id).reason
    yield task.id


def test_the_task_page_shows_checks_sbom_and_verified_provenance_at_desktop_and_phone_width(
        rig: Rig, delivered: str, browser: Browser) -> None:  # noqa: F811
    task = rig.task(delivered)
    result = task.result or {}
    with console_for(rig) as app:
        ctx = _context(browser, DESKTOP)
        page = ctx.new_page()
        # The rig confirmed dave's authenticator with the current step's code: sign in with the next.
        sign_in(page, app, "dave", rig.totps["dave"], code_next(rig.totps["dave"]))
        for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(viewport)
            page.goto(f"{app.url}/console/tasks/{delivered}")
            assert page.text_content("#task-state") == "succeeded"
            assert page.locator("#approvals tr td.factor").all_text_contents() == ["totp"] * len(task.approvals)
            checks = page.locator("#result-checks li").all_text_contents()
            assert checks and all(c.endswith(": passed") for c in checks)
            assert page.text_content("#result-gates") == "passed"
            spec_checks = page.locator("#spec-checks li").all_text_contents()  # rows, never a Python repr
            assert [c.split(":")[0] for c in spec_checks] == [c.name for c in task.spec.required_checks]
            assert not any("argv=" in c or "timeout_s=" in c for c in spec_checks)
            assert page.is_visible("#sbom-heading")
            digest = result["dependencies"]["sbom_sha256"]
            assert digest[:16] in (page.text_content("#dependencies-summary") or "")
            status = page.text_content("#provenance-status") or ""
            assert status.startswith("verified:"), status
            assert result["commit"] in (page.text_content("#provenance-statement") or "")
            assert _no_sideways_scroll(page), f"{name}: the task page scrolls sideways: {_wider(page)}"
            shot(page, f"console-task-{name}")
        for path in ("/console/ideas", "/console/tasks", "/console/audit"):  # still at phone width
            page.goto(app.url + path)
            assert _no_sideways_scroll(page), f"{path} scrolls sideways at phone width: {_wider(page)}"
            shot(page, "console-" + path.rsplit("/", 1)[1] + "-phone")
        ctx.close()


def test_a_tampered_provenance_envelope_is_shown_as_not_verified(rig: Rig, delivered: str,
                                                                 browser: Browser) -> None:  # noqa: F811
    from intake.tasks.provenance import envelope_key

    commit = (rig.task(delivered).result or {})["commit"]
    key = envelope_key(rig.store.keys.p, commit)
    stored = rig.store.r.get(key)
    assert isinstance(stored, str)
    rig.store.r.set(key, stored.replace('"', "'", 1) if stored.startswith("{") else stored[:-4] + "AAAA")
    with console_for(rig) as app:
        ctx = _context(browser, DESKTOP)
        page = ctx.new_page()
        sign_in(page, app, "dave", rig.totps["dave"], code_next(rig.totps["dave"]))
        page.goto(f"{app.url}/console/tasks/{delivered}")
        assert (page.text_content("#provenance-status") or "").startswith("NOT verified")
        ctx.close()
