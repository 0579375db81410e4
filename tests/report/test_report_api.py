"""``GET /api/v1/report``: authenticated like every API call, the window validated, and the
CLI's one-line errors."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from intake.cli.main import cli
from intake.core.settings import Settings
from tests.api_harness import RunningBroker, link_os_user


@pytest.fixture(autouse=True)
def linked(settings: Settings) -> str:
    """The OS user running the tests is a person (an unlinked one reads nothing)."""
    return link_os_user(settings)


def get(url: str, path: str) -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    conn.request("GET", "/api/v1" + path)
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out


def test_the_report_needs_a_caller(api: RunningBroker) -> None:
    status, body = get(api.tcp_url, "/report")  # TCP without a token
    assert status == 401 and body["error"] == "unauthenticated"


@pytest.mark.parametrize("since", ["yesterday", "7d%0A", "1e9d"])
def test_a_malformed_window_is_a_400_and_a_one_line_error(api: RunningBroker, env: dict[str, str], since: str) -> None:
    result = CliRunner().invoke(cli, ["report", "--since", since.replace("%0A", "\n")], env=env)
    assert result.exit_code != 0 and "--since" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_empty_log_reports_zeros_without_inventing_shares(api: RunningBroker, env: dict[str, str]) -> None:
    result = CliRunner().invoke(cli, ["report", "--format", "json"], env=env, catch_exceptions=False)
    fig = json.loads(result.stdout)
    assert (fig["ideas"], fig["delivered"], fig["segments"]) == (0, 0, [])
    assert fig["provenance"]["share"] is None and fig["time_to_promote"] == {"count": 0, "p50": None, "p90": None,
                                                                            "mean": None}
    text = CliRunner().invoke(cli, ["report"], env=env, catch_exceptions=False).stdout
    assert "provenance: 0 of 0 delivered changes verified (n/a)" in text


@pytest.mark.parametrize(("query", "says"), [("?by=month", "--by"), ("?by=week%0A", "--by"),
                                             ("?since=2000-01-01&by=day", "at most")])
def test_a_bad_period_is_a_400(api: RunningBroker, env: dict[str, str], query: str, says: str) -> None:
    from intake.cli.client import ApiClient, ApiError

    with pytest.raises(ApiError) as err:
        ApiClient(api.socket_url).call("GET", "/report" + query)
    assert err.value.status == 400 and says in str(err.value)
    result = CliRunner().invoke(cli, ["report", "--by", "month"], env=env)
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_an_empty_log_has_an_empty_trend_without_made_up_changes(api: RunningBroker, env: dict[str, str]) -> None:
    out = CliRunner().invoke(cli, ["report", "--since", "3d", "--by", "day", "--format", "json"], env=env,
                             catch_exceptions=False).stdout
    fig = json.loads(out)
    assert fig["by"] == "day" and len(fig["periods"]) == 3
    first, second = fig["periods"][:2]
    assert first["values"]["ideas"] == 0 and first["change"]["ideas"] is None and second["change"]["ideas"] == 0
    assert second["values"]["promote_p50"] is None and second["change"]["promote_p50"] is None
    assert fig["credentials"]["overdue"] == 0 and fig["credentials"]["time_to_rotate"]["count"] == 0
