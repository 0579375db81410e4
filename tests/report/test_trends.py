"""`intake report --since 12w --by week` over twelve scripted weeks (tests/report/weeks.py): every
indicator of every week, and its change from the week before, equals an independent count of the
sealed log (written here, from `intake audit export`'s entries, sharing no code with the figures),
in JSON, in the text rendering and in the HTML report opened in Chromium, whose every chart and
sparkline has marks and which runs no script."""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from playwright.sync_api import sync_playwright

from intake.cli.main import cli
from intake.core.settings import Settings
from intake.runtime import Broker
from tests.api_harness import link_os_user, running_broker
from tests.conftest import FakeClock
from tests.functional.console_harness import CHROMIUM_ARGS
from tests.report.weeks import WEEK, WEEKS, Weeks, run_weeks, weeks_broker

CHROMIUM = Path("/usr/bin/chromium")
SCALAR = ("ideas", "promoted", "delivered", "blocked", "refused_egress", "deps_changed", "deps_pinned",
          "deps_unknown_license", "denylist_hits")


@pytest.fixture
def weeks(settings: Settings, rclient: redis.Redis) -> Iterator[tuple[Broker, Weeks]]:
    clock = FakeClock()
    broker = weeks_broker(settings, rclient, clock)
    ran = run_weeks(broker, clock)
    link_os_user(settings)  # the CLI reads as the OS user, who must be a person
    yield broker, ran


def cli_run(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


# -- the independent count ---------------------------------------------------------------------
def nearest(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


BLOCK_TAGS = {"blocked path": "blocked_path", "dependency: ": "dependency"}


def count_week(entries: list[dict[str, Any]], since: float, until: float) -> dict[str, float | None]:
    """The week's indicators straight from exported, verified entries (first copy of each eid)."""
    seen: set[str] = set()
    events, evidence = [], {}
    for e in entries:
        if not e["verified"] or e["eid"] in seen:
            continue
        seen.add(e["eid"])
        if e["mac_kind"] == "worker":
            if e["action"] == "report.result":
                evidence[(e["subject"], e["data"]["run"])] = e["data"]["result"]
            continue
        events.append(e)
    inside = [e for e in events if since <= e["at"] < until]
    first = {}
    for e in events:
        first.setdefault((e["action"], e["subject"]), e)
    results = {e["subject"]: evidence[(e["subject"], e["data"]["run"])] for e in events
               if e["action"] in ("task.delivering", "task.blocked", "task.failed") and "run" in e["data"]
               and (e["subject"], e["data"]["run"]) in evidence}
    out: dict[str, float | None] = {k: 0 for k in SCALAR}
    out["ideas"] = sum(e["action"] == "idea.captured" for e in inside)
    out["promoted"] = sum(e["action"] == "idea.promoted" for e in inside)
    delivered = [e for e in inside if e["action"] == "task.succeeded"]
    blocked = [e for e in inside if e["action"] == "task.blocked"]
    out["delivered"], out["blocked"] = len(delivered), len(blocked)
    issued = {(e["data"]["task"], e["data"]["commit"]) for e in events if e["action"] == "provenance.issued"}
    out["provenance_share"] = (sum((e["subject"], e["data"]["commit"]) in issued for e in delivered) / len(delivered)
                               if delivered else None)
    for e in [*delivered, *blocked, *(e for e in inside if e["action"] == "task.failed")]:
        egress = results.get(e["subject"], {}).get("egress")
        if isinstance(egress, list):
            out["refused_egress"] += sum(1 for x in egress if x.get("refused") is True)  # type: ignore[operator]
        elif isinstance(egress, dict):
            out["refused_egress"] += egress["refused"]  # type: ignore[operator]
    for e in blocked:
        for gate in results[e["subject"]]["gates"]:
            tag = next(t for prefix, t in BLOCK_TAGS.items() if gate.startswith(prefix))
            out[f"blocks:{tag}"] = (out.get(f"blocks:{tag}") or 0) + 1
            out["denylist_hits"] += "denylisted" in gate  # type: ignore[operator]
    for e in delivered:
        for d in results[e["subject"]]["dependencies"]["delta"]:
            out["deps_changed"] += 1  # type: ignore[operator]
            out["deps_pinned"] += bool(d["integrity"])  # type: ignore[operator]
            out["deps_unknown_license"] += d["license"] is None  # type: ignore[operator]
    promote = [e["at"] - first[("idea.captured", e["subject"])]["at"] for e in inside if e["action"] == "idea.promoted"]
    deliver = [e["at"] - first[("task.created", e["subject"])]["at"] for e in delivered]
    stop = [e["at"] - first[("task.revoked", e["subject"])]["at"] for e in events
            if e["action"] == "run.stopped" and ("task.revoked", e["subject"]) in first
            and since <= first[("task.revoked", e["subject"])]["at"] < until]
    out.update(promote_p50=nearest(promote, 0.5), promote_p90=nearest(promote, 0.9),
               deliver_p50=nearest(deliver, 0.5), deliver_p90=nearest(deliver, 0.9),
               revoke_to_stop=sum(stop) / len(stop) if stop else None)
    return out


def expected_weeks(entries: list[dict[str, Any]], periods: list[dict[str, Any]]) -> list[dict[str, float | None]]:
    counted = [count_week(entries, p["since"], p["until"]) for p in periods]
    reasons = {k for c in counted for k in c if k.startswith("blocks:")}
    for c in counted:
        for k in reasons:
            c.setdefault(k, 0)
    return counted


def change(now: float | None, before: float | None) -> float | None:
    return None if now is None or before is None else now - before


# -- the test ------------------------------------------------------------------------------------
def test_twelve_weeks_week_by_week_match_an_independent_count_of_the_sealed_log(
        weeks: tuple[Broker, Weeks], settings: Settings, env: dict[str, str], tmp_path: Path) -> None:
    broker, w = weeks
    with running_broker(settings):
        fig = json.loads(cli_run(env, "report", "--since", "12w", "--by", "week", "--format", "json"))
        text = cli_run(env, "report", "--since", "12w", "--by", "week")
        page_file = tmp_path / "report.html"
        cli_run(env, "report", "--since", "12w", "--by", "week", "--format", "html", "--output", str(page_file))
        exported = [json.loads(line) for line in cli_run(env, "audit", "export").splitlines()]

    periods = fig["periods"]
    assert fig["by"] == "week" and len(periods) == WEEKS
    assert periods[0]["since"] == pytest.approx(fig["generated_at"] - WEEKS * WEEK)
    assert all(b["since"] - a["since"] == WEEK for a, b in zip(periods, periods[1:], strict=False))
    assert periods[-1]["until"] == fig["generated_at"]
    assert all(p["since"] < w.start + i * WEEK < p["since"] + 2 * 3600 for i, p in enumerate(periods))

    expected = expected_weeks(exported, periods)
    for i, (p, want) in enumerate(zip(periods, expected, strict=True)):
        assert p["values"] == want, f"week {i}"
        before = expected[i - 1] if i else None
        assert p["change"] == {k: None if before is None else change(v, before.get(k)) for k, v in want.items()}, i
    # The scenario is not flat: every indicator moves, so the comparison above means something.
    for key in ("ideas", "promoted", "delivered", "blocked", "refused_egress", "promote_p50", "deliver_p50",
                "revoke_to_stop", "provenance_share", "deps_changed", "blocks:blocked_path", "blocks:dependency"):
        assert len({e[key] for e in expected}) > 1, key
    # The whole window is the sum of its weeks.
    assert fig["ideas"] == sum(e["ideas"] for e in expected)  # type: ignore[misc]
    assert fig["refused_egress"] == sum(e["refused_egress"] for e in expected)  # type: ignore[misc]
    repos = {r["repo"]: r for r in fig["repos"]}
    assert set(repos) == {"acme/web", "acme/payments"}
    assert sum(sum(r["trend"]) for r in repos.values()) == sum(e["deps_changed"] for e in expected)  # type: ignore[misc]
    assert repos["acme/web"]["denylist_hits"] == 1 and repos["acme/web"]["unknown_licenses"] == 0
    assert repos["acme/payments"]["unknown_licenses"] == 1  # week 9's package states no license

    # Text: each count row shows every week's value and its change.
    rows = {line.split("  ")[1].strip(): line for line in text.splitlines() if line.startswith("  ") and "(" in line}
    for key, label in (("ideas", "ideas"), ("promoted", "promotions"), ("delivered", "deliveries"),
                       ("blocked", "blocked"), ("refused_egress", "refused egress")):
        cells = re.findall(r"(\d+) \(([^)]*)\)", rows[label])
        assert [int(v) for v, _ in cells] == [e[key] for e in expected], key
        signs = [c for _, c in cells]
        assert signs[0] == "-" and all(s == ("±0" if d == 0 else f"{d:+g}") for s, d in
                                       zip(signs[1:], [b[key] - a[key] for a, b in zip(expected, expected[1:],  # type: ignore[operator]
                                                                                      strict=False)], strict=True))

    page = page_file.read_text()
    assert "<script" not in page.lower()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None and html.unescape(csp.group(1)).startswith("default-src 'none'; style-src 'sha256-")
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium for the rendering half (apt-get install chromium)")
    shown_in_chromium(page_file, expected, tmp_path)


def shown_in_chromium(page_file: Path, expected: list[dict[str, float | None]], tmp_path: Path) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri())
            assert requests == [page_file.as_uri()]
            assert page.locator("script").count() == 0
            assert page.evaluate("document.scripts.length") == 0
            figures = page.locator("figure.chart, figure.spark")
            assert figures.count() > 20
            for i in range(figures.count()):
                fig = figures.nth(i)
                key = fig.get_attribute("id")
                box = fig.locator("svg").bounding_box()
                assert box is not None and box["width"] > 0 and box["height"] > 0, key
                marks = fig.locator("rect.bar, circle.point").count()
                assert marks > 0 and fig.locator("text.empty").count() == 0, f"{key} is empty"
                first = fig.locator("rect.bar, circle.point").first.bounding_box()
                assert first is not None and first["height"] > 0, key
            for key in SCALAR:
                row = page.locator(f'#trend tr[data-indicator="{key}"]')
                assert row.locator("span.value").all_inner_texts() == [f"{e[key]:g}" for e in expected], key
                assert row.locator("circle.point").count() == WEEKS, key
            promote = page.locator('#trend tr[data-indicator="promote_p50"] circle.point')
            assert promote.count() == sum(e["promote_p50"] is not None for e in expected)
            shot = tmp_path / "trends.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
