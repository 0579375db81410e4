"""Credential hygiene from sealed events: rotations and revocations with the time they took (checked
against the exported log), an API token past the policy's maximum age flagged by the report and
by `intake doctor`, and `intake credentials rotated NAME` (admins, with their code; a forged event
written straight into Redis counts for nothing)."""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from intake.api.callers import ApiTokens
from intake.cli.client import ApiClient, ApiError
from intake.cli.main import cli
from intake.core.models import canonical_json
from intake.core.settings import Settings
from intake.people.registry import People
from intake.runtime import Broker, open_broker
from tests.api_harness import RunningBroker, enrol, link_os_user, running_broker
from tests.conftest import FakeClock
from tests.report.weeks import DAY, HOUR, Weeks, run_weeks, weeks_broker

ME = f"os:{getpass.getuser()}"


@pytest.fixture
def weeks(settings: Settings, rclient: redis.Redis) -> Iterator[tuple[Broker, Weeks]]:
    clock = FakeClock()
    broker = weeks_broker(settings, rclient, clock)
    ran = run_weeks(broker, clock)
    link_os_user(settings)  # the CLI reads as the OS user, who must be a person
    yield broker, ran


def cli_run(env: dict[str, str], *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout


def report_json(env: dict[str, str]) -> dict[str, Any]:
    code, out = cli_run(env, "report", "--since", "12w", "--format", "json")
    assert code == 0, out
    return json.loads(out)


def test_rotations_and_revocations_show_with_the_time_they_took(weeks: tuple[Broker, Weeks], settings: Settings,
                                                               env: dict[str, str]) -> None:
    broker, w = weeks
    with running_broker(settings):
        fig = report_json(env)
        _, export = cli_run(env, "audit", "export")
    log = [e for e in map(json.loads, export.splitlines()) if e["verified"] and e["mac_kind"] == "broker"]
    cred = fig["credentials"]
    rotations = {(r["kind"], r["name"]): r for r in cred["rotations"]}

    # The worker key: generation 2 issued; done at the first broker event naming the worker after it.
    issued = next(e for e in log if e["action"] == "worker.key_issued" and e["data"]["generation"] == 2)
    back = next(e for e in log if e["at"] > issued["at"] and e["data"].get("worker") == "w1")
    worker = rotations[("worker_key", "w1")]
    assert (worker["old"], worker["new"]) == ("generation 1", "generation 2")
    assert worker["seconds"] == back["at"] - issued["at"] == w.worker_rotation[1] - w.worker_rotation[0] == 3 * HOUR

    # The signing key: rotated, and the old key id retired two days later.
    new, old, _, _ = w.signing_rotation
    rotated = next(e for e in log if e["action"] == "keys.rotated")
    retired = next(e for e in log if e["action"] == "keys.retired")
    assert (rotated["data"]["new_kid"], rotated["data"]["old_kid"], retired["data"]["kid"]) == (new, old, old)
    signing = rotations[("signing_key", "broker")]
    assert (signing["old"], signing["new"]) == (old, new)
    assert signing["seconds"] == retired["at"] - rotated["at"] == 2 * DAY
    kids = {c["name"] for c in cred["credentials"] if c["kind"] == "signing_key"}
    assert kids == {new} == {broker.signer.kid}  # the retired key is gone from the live list

    # An API token replaced: from the new token's creation to the old one's revocation.
    first, second, _, _ = w.token_rotation
    token = rotations[("api_token", "dave")]
    assert (token["old"], token["new"], token["seconds"]) == (first, second, DAY)

    assert cred["time_to_rotate"]["count"] == 3
    assert cred["time_to_rotate"]["mean"] == pytest.approx((3 * HOUR + 2 * DAY + DAY) / 3)

    # Revocations: the worker key with a live run took effect when that run ended (90 s later);
    # the API token at once (its record goes in the revoking transaction).
    revs = {(r["kind"], r["name"]): r for r in cred["revocations"]}
    key_revoked = next(e for e in log if e["action"] == "worker.key_revoked")
    run_ended = next(e for e in log if e["action"] == "task.failed" and e["at"] > key_revoked["at"])
    assert revs[("worker_key", "w2")]["how"] == "no_live_lease"
    assert revs[("worker_key", "w2")]["seconds"] == run_ended["at"] - key_revoked["at"] == 90
    assert (revs[("api_token", first)]["how"], revs[("api_token", first)]["seconds"]) == ("at_once", 0)
    assert cred["time_to_revoke"]["count"] == 2 and cred["time_to_revoke"]["mean"] == 45


def test_an_api_token_past_the_maximum_age_is_flagged_by_the_report_and_the_doctor(
        weeks: tuple[Broker, Weeks], settings: Settings, env: dict[str, str]) -> None:
    _, w = weeks
    with running_broker(settings):
        fig = report_json(env)
        code, text = cli_run(env, "report", "--since", "12w")
        _, page = cli_run(env, "report", "--since", "12w", "--format", "html")
        _, doctor = cli_run(env, "doctor", "--json")
    creds = {(c["kind"], c["name"]): c for c in fig["credentials"]["credentials"]}
    old = creds[("api_token", w.old_token)]
    assert old["max_age"] == 30 * DAY and old["age"] > 30 * DAY and old["overdue"] is True
    newer = [c for (kind, _), c in creds.items() if kind == "api_token" and c["name"] != w.old_token]
    assert newer and not any(c["overdue"] for c in newer)  # dave's tokens are younger than 30 days
    assert [k for k, c in creds.items() if c["overdue"]] == [("api_token", w.old_token)]
    assert fig["credentials"]["overdue"] == 1
    assert code == 0 and any(w.old_token in line and "PAST MAX AGE" in line for line in text.splitlines())
    assert f"<td class=\"name\">{w.old_token}</td>" in page and "(past maximum)" in page
    findings = json.loads(doctor)["findings"]
    flagged = [f for f in findings if f["check"] == "credentials"]
    assert len(flagged) == 1 and flagged[0]["status"] == "warning"
    assert flagged[0]["message"].startswith(f"api_token {w.old_token}: 83d")
    assert "past the policy's maximum of 30d 0h" in flagged[0]["message"]


def test_the_doctor_without_a_broker_says_credentials_were_not_checked_and_creates_nothing(
        settings: Settings, env: dict[str, str]) -> None:
    sock = Path(settings.data_dir) / "intake.sock"
    before = sorted(p.name for p in Path(settings.data_dir).rglob("*"))
    _, out = cli_run(env, "doctor", "--json")
    found = [f for f in json.loads(out)["findings"] if f["check"] == "credentials"]
    assert len(found) == 1 and found[0]["status"] == "warning" and "not checked" in found[0]["message"]
    assert not sock.exists() and sorted(p.name for p in Path(settings.data_dir).rglob("*")) == before


def forged_event(action: str, subject: str, at: float) -> dict[str, str]:
    body = canonical_json({"at": at, "actor": "person:alice", "action": action, "subject": subject, "data": {},
                           "eid": "f" * 16}).decode()
    return {"e": body, "m": "0" * 64}


def test_credentials_rotated_is_an_admins_act_with_a_code(api: RunningBroker, settings: Settings,
                                                          env: dict[str, str], rclient: redis.Redis) -> None:
    codes = enrol(settings, {"alice": ("platform", (ME,)), "bob": ("platform", ())})
    admin = ApiClient(api.socket_url)
    for body, status, reason in (({}, 400, "invalid_input"), ({"code": "000000"}, 403, "invalid"),
                                 ({"code": "123456", "on_behalf_of": "bob"}, 400, "invalid_input")):
        with pytest.raises(ApiError) as err:
            admin.call("POST", "/credentials/slack-bot/rotated", body)
        assert (err.value.status, err.value.reason) == (status, reason)
    for bad in ("Slack-Bot", "x", "slack_bot", "a" * 41, "slack-bot\n"):
        with pytest.raises(ApiError) as err:
            admin.call("POST", f"/credentials/{bad}/rotated".replace("\n", "%0A"), {"code": "123456"})
        assert err.value.status in (400, 404), bad
    code, out = cli_run(env, "credentials", "rotated", "slack-bot", "--code", codes["alice"].next())
    assert code == 0 and out.strip() == "credential slack-bot: rotation recorded"

    # Someone with only the keyspace plants a newer declaration for another name: sealed as
    # rejected, it dates nothing.
    rclient.xadd("intake:audit", forged_event("credentials.rotated", "forge-token", 4_000_000_000.0))
    # A person who is not an admin cannot declare one: with a token an admin made for them it is
    # refused by the token's scope (issue 20), with their own token by their role.
    made = admin.call("POST", "/people/bob/tokens", {"code": codes["alice"].next()})
    with pytest.raises(ApiError) as err:
        ApiClient(api.tcp_url, made["token"]).call("POST", "/credentials/slack-bot/rotated", {"code": "123456"})
    assert (err.value.status, err.value.reason) == (403, "token_scope")
    with open_broker(settings) as broker:
        _, own = ApiTokens(broker.store, People(broker.store)).create("bob", actor="person:bob", scope="power")
    with pytest.raises(ApiError) as err:
        ApiClient(api.tcp_url, own).call("POST", "/credentials/slack-bot/rotated", {"code": "123456"})
    assert (err.value.status, err.value.reason) == (403, "forbidden")

    fig = report_json(env)
    external = [c for c in fig["credentials"]["credentials"] if c["kind"] == "external"]
    assert [c["name"] for c in external] == ["slack-bot"]
    assert external[0]["since"] == external[0]["last_rotation"] and external[0]["age"] < 600
    assert fig["audit"]["rejected"] >= 1
    rotated = [json.loads(e[1]["e"]) for e in rclient.xrange("intake:audit")
               if json.loads(e[1]["e"]).get("action") == "credentials.rotated"]
    assert [(e["actor"], e["subject"]) for e in rotated if e["eid"] != "f" * 16] == [("person:alice", "slack-bot")]


def test_forged_and_replayed_credential_events_change_nothing(settings: Settings, rclient: redis.Redis) -> None:
    """Whoever holds only the keyspace forges a fresh API token and a signing key retirement, and
    replays a genuine rotation: the figures are the genuine history's."""
    from intake.operations.indicators.figures import Timeline, report_figures
    from intake.operations.keys import retire_signing, rotate_signing

    clock = FakeClock()
    broker = weeks_broker(settings, rclient, clock)
    new, old, _ = rotate_signing(broker, actor="os:intake")
    clock.advance(HOUR)
    broker.audit.seal_pending()

    def figures() -> dict[str, Any]:
        fig = report_figures(Timeline(broker.audit).follow(), clock.now - DAY, now=clock.now + 1,
                             max_ages={"api_token": 30 * DAY, "signing_key": 90 * DAY}, signing_kid=new)
        return fig.credentials.model_dump()

    genuine = figures()
    assert [(r["old"], r["new"], r["finished"]) for r in genuine["rotations"]] == [(old, new, None)]
    rotated = next(fields for _, fields in rclient.xrange("intake:audit")
                   if json.loads(fields["e"])["action"] == "keys.rotated")
    rclient.xadd("intake:audit", dict(rotated))  # a verbatim copy: the same eid
    forged = json.loads(forged_event("api_token.created", "mallory", clock.now)["e"])
    forged["data"] = {"token": "tok-000000000bad"}
    rclient.xadd("intake:audit", {"e": canonical_json(forged).decode(), "m": "0" * 64})
    retire = {**json.loads(forged_event("keys.retired", "broker", clock.now)["e"]), "data": {"kid": old}}
    rclient.xadd("intake:audit", {"e": canonical_json(retire).decode(), "m": "0" * 64})
    broker.audit.seal_pending()
    after = figures()
    assert after == genuine
    assert not any(c["name"] == "tok-000000000bad" for c in after["credentials"])
    # The real retirement still counts, with its time.
    clock.advance(HOUR)
    retire_signing(broker, old, actor="os:intake")
    broker.audit.seal_pending()
    done = figures()["rotations"]
    assert [(r["old"], r["seconds"]) for r in done] == [(old, 2 * HOUR)]
