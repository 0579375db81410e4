"""The console's search, filters and pages over the whole history, in a real Chromium (issue 23):
an idea and tasks more than 1,000 records back are found by every filter of ideas, tasks and the
audit log, a free-text search says how far it looked and goes on, and the pager walks by keyset."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from playwright.sync_api import Browser, Page

from tests.conftest import FakeClock
from tests.console_history import History, build
from tests.functional.console_harness import Running
from tests.functional.test_console import CHROMIUM, app, browser, sign_in  # noqa: F401
from tests.functional.test_console_daily import DESKTOP, _context, shot

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")


def apply(page: Page, path: str, **fields: str) -> None:
    """Fill the filter form of ``path`` as a person would, then submit it."""
    page.goto(path)
    for name, value in fields.items():
        sel = f"#filters [name={name}]"
        if page.locator(f"#filters select[name={name}]").count():
            page.select_option(sel, value)
        else:
            page.fill(sel, value)
    page.click("#filters button[type=submit]")
    page.wait_for_load_state("domcontentloaded")


def ids(page: Page, table: str) -> list[str]:
    return page.locator(f"#{table} tr td:first-child a").all_text_contents()


def test_every_filter_finds_records_behind_a_thousand_newer_ones(app: Running, browser: Browser) -> None:  # noqa: F811
    h: History = build(app.broker, FakeClock())
    old_day = dt.datetime.fromtimestamp(h.start, dt.UTC).strftime("%Y-%m-%d")
    web_idea, pay_idea = (app.broker.store.get_task(t).idea_id for t in (h.web_task, h.pay_task))
    ctx = _context(browser, DESKTOP)
    page = ctx.new_page()
    sign_in(page, app, "dave", h.totps["dave"])
    ideas, tasks, audit = (f"{app.url}/console/{p}" for p in ("ideas", "tasks", "audit"))

    # Ideas: each filter reaches the old one, found directly from its index.
    apply(page, ideas, state="any", requester="email:zed@example.com")
    assert ids(page, "ideas") == [h.old_idea]
    shot(page, "console-ideas-filtered")
    apply(page, ideas, state="any", channel="email")
    assert ids(page, "ideas") == [h.old_idea]
    apply(page, ideas, state="promoted", approver="alice")
    assert ids(page, "ideas") == [h.old_idea]
    apply(page, ideas, state="any", tier="privileged")
    assert ids(page, "ideas") == [pay_idea]
    apply(page, ideas, state="any", repo="acme/web")
    assert ids(page, "ideas") == [web_idea, h.old_idea]
    apply(page, ideas, state="any", until=old_day)
    assert ids(page, "ideas") == [h.old_idea]
    assert page.text_content("#page-of") == "1 shown of 1 ideas"

    # Free text has no index: a bounded scan that says so, and goes on when asked.
    apply(page, ideas, state="any", q="zebra-needle")
    assert ids(page, "ideas") == []
    assert "Searched 1000 ideas" in (page.text_content("#search-cut") or "")
    page.click("#continue")
    page.wait_for_url(re.compile(r".*after=.*"))
    assert ids(page, "ideas") == [h.old_idea], (page.url, page.inner_text("body")[-800:])

    # Pages: Older walks back by keyset, Newest returns.
    apply(page, ideas, state="any")
    assert page.text_content("#page-of") == f"25 shown of {len(h.newer) + 3} ideas"
    first = ids(page, "ideas")
    page.click("#pager a[rel=next]")
    page.wait_for_url(re.compile(r".*after=.*"))
    second = ids(page, "ideas")
    assert len(second) == 25 and not set(first) & set(second)
    page.click("#pager a[rel=prev]")
    page.wait_for_url(re.compile(r".*before=.*"))
    assert ids(page, "ideas") == first

    # Tasks: all six filters.
    for fields, expected in (
        ({"state": "revoked"}, [h.web_task]),
        ({"repo": "acme/payments"}, [h.pay_task]),
        ({"requester": "cli:erin"}, [h.web_task]),
        ({"approver": "alice"}, [h.old_task]),
        ({"tier": "privileged"}, [h.pay_task]),
        ({"until": old_day}, [h.old_task]),
        ({"approver": "bob", "repo": "acme/web"}, [h.web_task]),
    ):
        apply(page, tasks, **fields)
        assert ids(page, "tasks") == expected, fields
    shot(page, "console-tasks-filtered")

    # Audit: actor, kind or action, task or idea, time; and which range the list covers.
    apply(page, audit, subject=h.web_task)
    actions = page.locator("#events tr td:nth-child(4)").all_text_contents()
    assert {"idea.promoted", "task.created", "task.revoked"} <= set(actions)
    apply(page, audit, actor="approver:bob", action="task")
    actions = page.locator("#events tr td:nth-child(4)").all_text_contents()
    assert actions and all(a.startswith("task.") for a in actions)
    assert set(page.locator("#events tr td:nth-child(3)").all_text_contents()) == {"approver:bob"}
    apply(page, audit, action="task.revoked")
    assert page.locator("#events tr td:nth-child(5)").all_text_contents() == [h.web_task]
    apply(page, audit, action="idea.captured", since="24h")
    assert page.locator("#events tr").count() == 1 + 25
    assert "Nothing has been archived" in (page.text_content("#coverage") or "")
    shot(page, "console-audit-filtered")
    ctx.close()


def test_the_audit_list_goes_on_into_the_archive(app: Running, browser: Browser,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import intake.audit.archive as archive_mod
    from tests.console_history import enrol_all
    from tests.factories import draft

    monkeypatch.setattr(archive_mod, "SEGMENT_MAX", 30)
    broker = app.broker
    broker.settings = broker.settings.model_copy(update={"audit_hot": 3600.0})
    totps = enrol_all(broker, ("dave",))
    for n in range(80):
        broker.store.capture(draft(text=f"archived request {n}"))
    broker.audit.seal_pending()
    assert broker.ledger.follow().snapshot_if_due(every=1)
    broker.store.capture(draft(text="hot request"))
    broker.audit.seal_pending()
    deadline = time.monotonic() + 30
    while broker.audit.lease.acquire() is None:  # the app's sealer may hold it: that is us too
        assert time.monotonic() < deadline, "no sealer lease"
    moved = broker.archive_due(now=time.time() + 7200)
    assert moved > 60
    ctx = _context(browser, DESKTOP)
    page = ctx.new_page()
    sign_in(page, app, "dave", totps["dave"])
    page.goto(f"{app.url}/console/audit")
    assert f"Entries #1 to #{moved} were moved to the archive" in (page.text_content("#coverage") or "")
    page.click("#archive-next a")
    page.wait_for_url(re.compile(r".*/console/audit/archive\?to=.*"))
    seqs = [int(s) for s in page.locator("#events tr td:first-child").all_text_contents()]
    assert seqs and seqs == list(range(moved, moved - len(seqs), -1))  # newest first, a segment at most
    shot(page, "console-audit-archive")
    while page.locator("#pager a[rel=next]").count():
        page.click("#pager a[rel=next]")
        page.wait_for_load_state("domcontentloaded")
        seqs += [int(s) for s in page.locator("#events tr td:first-child").all_text_contents()]
    assert seqs == list(range(moved, 0, -1))
    ctx.close()
