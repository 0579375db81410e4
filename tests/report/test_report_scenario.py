"""`intake report` on a scripted scenario through the real broker, a real worker and the real
API: the JSON figures are exactly the scenario's, the text rendering says the same, and the
HTML report renders its charts in a real Chromium (Playwright, Debian's /usr/bin/chromium)."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from playwright.sync_api import sync_playwright

from intake.cli.main import cli
from intake.operations.indicators.figures import spread
from tests.api_harness import link_os_user, running_broker
from tests.conftest import FakeClock
from tests.functional.console_harness import CHROMIUM_ARGS
from tests.report.scenario import HOSTILE, Scenario, run_scenario
from tests.workers.harness import Rig, make_rig

CHROMIUM = Path("/usr/bin/chromium")
CHARTS = ("funnel", "tiers", "change-types", "provenance", "dependencies", "licenses", "durations",
          "gate-blocks", "mfa-failures")


@pytest.fixture
def rig(tmp_path: Path, redis_server: str, rclient: redis.Redis, clock: FakeClock) -> Iterator[Rig]:
    made = make_rig(tmp_path, redis_server, rclient, clock)
    link_os_user(made.settings)  # the CLI reads as the OS user, who must be a person
    yield made
    made.close()


def cli_env(rig: Rig) -> dict[str, str]:
    assert rig.settings.redis_url is not None
    return {"INTAKE_DATA_DIR": str(rig.settings.data_dir), "INTAKE_POLICY": str(rig.settings.policy_path),
            "INTAKE_REDIS_URL": rig.settings.redis_url.get_secret_value()}


def report(rig: Rig, *args: str) -> str:
    result = CliRunner().invoke(cli, ["report", *args], env=cli_env(rig), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def expected_durations(rig: Rig, s: Scenario) -> tuple[list[float], list[float], list[float]]:
    """Time to promote, to deliver and revoke to stop, from the scenario's own sealed events."""
    at: dict[tuple[str, str], float] = {}
    for e in rig.events():
        at.setdefault((e["action"], str(e["subject"])), e["at"])
    tasks = {e["subject"]: e["data"]["idea"] for e in rig.events("task.created")}
    promote = [at[("idea.promoted", tasks[t])] - at[("idea.captured", tasks[t])] for t in s.promoted]
    deliver = [at[("task.succeeded", t)] - at[("task.created", t)] for t in s.delivered]
    stop = [max(at[("run.stopped", t)] - at[("task.revoked", t)], 0.0) for t in s.revoked]
    return promote, deliver, stop


def test_the_report_gives_exactly_the_scenarios_figures(rig: Rig, tmp_path: Path) -> None:
    s = run_scenario(rig)
    with running_broker(rig.settings):
        fig = json.loads(report(rig, "--since", "7d", "--format", "json"))
        text = report(rig)
        out = tmp_path / "report.html"
        report(rig, "--since", "24h", "--format", "html", "--output", str(out))
        narrow = json.loads(report(rig, "--since", "2099-01-01", "--format", "json"))

    assert fig["ideas"] == len(s.ideas)
    assert fig["promoted"] == fig["created"] == len(s.promoted)
    assert fig["delivered"] == len(s.delivered)
    assert fig["blocked"] == len(s.blocked)
    assert fig["revoked"] == len(s.revoked) == 1
    assert fig["failed"] == fig["denied"] == fig["expired"] == 0
    got = {(g["tier"], g["change_type"]): {k: v for k, v in g.items() if k not in ("tier", "change_type") and v}
           for g in fig["segments"]}
    assert got == s.segments
    assert fig["gate_blocks"] == {"outside_change_type_paths": len(s.blocked)}
    assert fig["mfa_failures"] == s.mfa_refusals
    promote, deliver, stop = expected_durations(rig, s)
    assert fig["time_to_promote"] == spread(promote).model_dump()
    assert fig["time_to_deliver"] == spread(deliver).model_dump()
    assert fig["revoke_to_stop"]["count"] == 1 and fig["revoke_to_stop"]["mean"] == pytest.approx(stop[0])
    # Every delivery carried broker-signed provenance (issued with its delivery dispatch); no
    # dependency changed in this scenario, and the figures say so instead of inventing coverage.
    assert fig["provenance"] == {"delivered": len(s.delivered), "verified": len(s.delivered), "share": 1.0}
    assert fig["dependencies"]["changes"] == 0 and fig["dependencies"]["sbom_coverage"] is None
    assert [(n["task"], n["outcome"]) for n in fig["notable"]] == (
        [(t, "blocked") for t in s.blocked] + [(t, "revoked") for t in s.revoked])
    hostile = next(n for n in fig["notable"] if n["task"] == s.hostile_task)
    assert hostile["title"] == HOSTILE  # verified against its MAC'd record and the sealed text hash
    assert fig["audit"]["broken"] == [] and fig["audit"]["rejected"] == 0
    # A window that starts after everything holds nothing.
    assert narrow["ideas"] == narrow["promoted"] == narrow["delivered"] == 0 and narrow["segments"] == []

    assert (f"ideas {len(s.ideas)}, promoted {len(s.promoted)}, delivered {len(s.delivered)}, "
            f"blocked {len(s.blocked)}") in text
    assert f"gate blocks: outside_change_type_paths {len(s.blocked)}" in text

    page = out.read_text()
    assert "<script" not in page and "<img" not in page  # the hostile idea is text, escaped
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page)
    assert csp is not None and html.unescape(csp.group(1)).startswith("default-src 'none'; style-src 'sha256-")
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium for the rendering half (apt-get install chromium)")
    shown_in_chromium(out, tmp_path, s)


def shown_in_chromium(page_file: Path, tmp_path: Path, s: Scenario) -> None:
    """Open the report offline in Chromium: no request leaves the page, no script runs, every
    chart's SVG has a size and its bars and labels, and a screenshot is taken."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(java_script_enabled=True)
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(page_file.as_uri())
            assert requests == [page_file.as_uri()]  # nothing else is fetched (the hostile <img> is text)
            for key in CHARTS:
                svg = page.locator(f"#chart-{key} svg")
                box = svg.bounding_box()
                assert box is not None and box["width"] > 0 and box["height"] > 0, key
                assert page.locator(f"#chart-{key} figcaption").inner_text().strip()
            funnel = page.locator("#chart-funnel")
            labels = funnel.locator("text.label").all_text_contents()
            assert labels[:3] == ["ideas", "promoted", "delivered"]
            values = funnel.locator("text.value").all_text_contents()
            assert values[:3] == [str(len(s.ideas)), str(len(s.promoted)), str(len(s.delivered))]
            bars = funnel.locator("rect.bar")
            assert bars.count() == 8
            first = bars.first.bounding_box()
            assert first is not None and first["width"] > 1 and first["height"] > 0
            gate = page.locator("#chart-gate-blocks text.label").all_text_contents()
            assert gate == ["outside_change_type_paths"]
            assert HOSTILE in page.locator("#notable td.title").all_inner_texts()
            assert dialogs == []  # the hostile idea's script never ran
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
