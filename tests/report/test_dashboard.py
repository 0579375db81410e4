"""The console dashboard shows the report's figures (one figures function, two views), in a
real Chromium against the real app: the same numbers as the HTML report, charts rendered,
hostile text escaped, a bad window refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from intake.core.settings import Settings
from intake.operations.indicators.figures import compute_figures
from intake.operations.indicators.render import render_html
from tests.factories import draft
from tests.functional.console_harness import (
    CHROMIUM_ARGS,
    Running,
    code_now,
    console_policy,
    console_settings,
    enrol,
    free_port,
    serve,
)
from tests.report.events import emit, settle

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
HOSTILE = "<img src=x onerror=alert(1)> tidy the docs"


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def app(settings: Settings, tmp_path: Path) -> Iterator[Running]:
    with serve(console_settings(settings, free_port(), console_policy(tmp_path))) as running:
        yield running


def history(app: Running) -> None:
    store = app.broker.store
    idea = store.capture(draft(text=HOSTILE))[0]
    store.capture(draft())
    emit(store, "approver:bob", "idea.promoted", idea.id, task="T-0000000000c1", via="console")
    emit(store, "approver:bob", "task.created", "T-0000000000c1", idea=idea.id, repo="acme/web",
         change_type="docs", tier="standard", spec_hash="0" * 64)
    settle(store, "T-0000000000c1", "blocked", {"gates": ["unsafe path: ../x"]})


def test_the_dashboard_shows_the_reports_figures(app: Running, browser: Browser) -> None:
    totps = enrol(app.settings, "alice")
    history(app)
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{app.url}/console/signin")
    page.fill("#signin input[name=approver]", "alice")
    page.fill("#signin input[name=code]", code_now(totps["alice"]))
    page.click("#signin .totp-submit")
    page.wait_for_url(f"{app.url}/console/ideas")

    page.goto(f"{app.url}/console/dashboard?since=24h")
    broker = app.broker
    fig = compute_figures(broker.timeline.follow(), broker.store.clock() - 86400, now=broker.store.clock())
    assert (fig.ideas, fig.promoted, fig.blocked) == (2, 1, 1)
    summary = page.locator("#summary td").all_inner_texts()
    assert summary == [str(v) for v in (fig.ideas, fig.promoted, fig.delivered, fig.blocked, fig.failed,
                                        fig.revoked, fig.denied, fig.expired)]
    # The same body as the self-contained report: one figures function, two views.
    offline = browser.new_page()
    offline.set_content(render_html(fig))
    assert offline.locator("#summary td").all_inner_texts() == summary
    assert offline.locator("#segments").inner_text() == page.locator("#segments").inner_text()
    offline.close()
    box = page.locator("#chart-gate-blocks svg").bounding_box()
    assert box is not None and box["width"] > 0 and box["height"] > 0
    assert page.locator("#chart-gate-blocks text.label").all_text_contents() == ["unsafe_path"]
    assert page.locator("#notable td.title").all_inner_texts() == [HOSTILE]
    assert page.locator("#notable img").count() == 0 and dialogs == []

    # The trend, by day: a column per day, a sparkline per indicator with a point per day.
    page.goto(f"{app.url}/console/dashboard?since=3d&by=day")
    assert page.locator("#trend tr").first.locator("th").count() == 2 + 3
    ideas = page.locator('#trend tr[data-indicator="ideas"]')
    assert ideas.locator("span.value").all_inner_texts() == ["0", "0", "2"]
    assert ideas.locator("circle.point").count() == 3
    box = ideas.locator("svg").bounding_box()
    assert box is not None and box["width"] > 0 and box["height"] > 0
    assert page.locator("#credentials td").count() > 0

    response = page.goto(f"{app.url}/console/dashboard?since=yesterday")
    assert response is not None and response.status == 400
    assert "--since" in (page.text_content("#error") or "")
    assert page.locator("#summary td").count() == 8  # the default window is shown instead
