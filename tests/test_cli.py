"""The intake CLI, in process, as a client of the real broker app: JSON output, one-line
errors, exit codes, audit verify."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner, Result

from intake.cli.main import cli
from intake.core.settings import Settings

pytestmark = pytest.mark.usefixtures("api", "linked")


@pytest.fixture
def linked(settings: Settings) -> str:
    """The OS user running the tests is a person (an unlinked one reads nothing)."""
    from tests.api_harness import link_os_user

    return link_os_user(settings)


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_idea_then_show_json(env: dict[str, str]) -> None:
    filed = run(env, "idea", "Fix the <b>flaky</b> login test", "--as", "alice", "--json")
    assert filed.exit_code == 0, filed.stderr
    data = json.loads(filed.stdout)
    assert data["id"].startswith("I-") and data["created"] is True
    shown = run(env, "show", data["id"], "--json")
    assert shown.exit_code == 0
    idea = json.loads(shown.stdout)
    assert idea["text"] == "Fix the <b>flaky</b> login test"
    assert idea["requester"] == "cli:alice" and idea["state"] == "captured"
    assert idea["filed_by"] == f"os:{getpass.getuser()}"  # the caller the kernel named
    listed = json.loads(run(env, "list", "--json").stdout)
    assert [i["id"] for i in listed] == [data["id"]]


def test_delivery_id_makes_cli_idempotent(env: dict[str, str]) -> None:
    a = json.loads(run(env, "idea", "one", "--delivery-id", "job-7", "--json").stdout)
    b = json.loads(run(env, "idea", "one", "--delivery-id", "job-7", "--json").stdout)
    assert a["id"] == b["id"] and b["created"] is False


def test_show_escapes_terminal_controls(env: dict[str, str]) -> None:
    data = json.loads(run(env, "idea", "ok\x1b]0;pwned\x07 \u202etxt.exe", "--json").stdout)
    out = run(env, "show", data["id"]).stdout
    assert "\x1b" not in out and "\u202e" not in out
    assert "\\x1b]0;pwned\\x07" in out and "\\u202e" in out


def test_audit_verify_and_xdel(env: dict[str, str], rclient: redis.Redis) -> None:
    linking = rclient.xlen("intake:audit")  # the OS user's link to a person
    for n in range(3):
        assert run(env, "idea", f"idea {n}", "--as", "bob").exit_code == 0
    ok = run(env, "audit", "verify")
    assert ok.exit_code == 0 and f"{linking + 3} events" in ok.stdout
    victim = rclient.xrange("intake:audit")[1][0]
    rclient.xdel("intake:audit", victim)
    broken = run(env, "audit", "verify")
    assert broken.exit_code != 0
    assert broken.stderr.count("\n") == 1 and "missing" in broken.stderr


def test_audit_verify_json_lists_every_entry_that_is_not_genuine(env: dict[str, str], rclient: redis.Redis,
                                                                  settings: Settings) -> None:
    """Issue 8: an unsigned XADD, a garbage entry and a worker-key ``approval.recorded`` are
    sealed as rejected and all three are listed; the ledger does not halt for them."""
    from intake.audit.log import worker_report_key
    from intake.protocol.keyfiles import load_secret
    from intake.protocol.reports import report_mac

    assert run(env, "idea", "before", "--as", "bob").exit_code == 0
    body = json.dumps({"at": 1.0, "actor": "approver:alice", "action": "approval.recorded",
                       "subject": "T-000000000001", "data": {}, "eid": "e" * 16})
    unsigned = rclient.xadd("intake:audit", {"e": body, "m": "0" * 64})
    garbage = rclient.xadd("intake:audit", {"junk": "\x00"})
    key = worker_report_key(load_secret(settings, "audit"), "w1", 1)
    forged = json.dumps({"w": "w1", "g": 1, "action": "approval.recorded", "task": "T-000000000001"})
    worker_forged = rclient.xadd("intake:audit", {"e": forged, "m": report_mac(key, forged), "k": "w"})
    assert run(env, "idea", "after", "--as", "bob").exit_code == 0
    verified = run(env, "audit", "verify", "--json")
    assert verified.exit_code == 0, verified.stdout
    report = json.loads(verified.stdout)
    assert report["ok"] is True and report["ledger"] is None, report
    rejected = {a["id"] for a in report["anomalies"] if a["kind"] == "rejected"}
    assert rejected == {unsigned, garbage, worker_forged}, report
    plain = run(env, "audit", "verify")
    assert plain.exit_code == 0 and "3 rejected entries" in plain.stdout


def test_audit_export_jsonl(env: dict[str, str], tmp_path: Path) -> None:
    run(env, "idea", "a secret-looking body", "--as", "bob")
    out = tmp_path / "audit.jsonl"
    assert run(env, "audit", "export", "-o", str(out)).exit_code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["actor"] for e in lines[:-1]] == ["test:setup"] * (len(lines) - 1)  # the OS user's link
    assert [(e["seq"], e["action"], e["actor"]) for e in lines[-1:]] == [(len(lines), "idea.captured", "cli:bob")]
    assert "secret-looking" not in out.read_text()  # the log holds hashes, not bodies


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["idea", ""], "idea text is empty"),
        (["idea", "x" * 20000], "bytes; the limit is 16384"),
        (["idea", "hi", "--as", "Robert'); DROP"], "--as"),
        (["idea", "hi", "--as", "alice\n"], "--as"),
        (["show", "I-nope"], "not an idea id"),
        (["show", "T-000000000000"], "no task T-000000000000"),
        (["frobnicate"], "No such command"),
    ],
)
def test_errors_are_one_line(env: dict[str, str], args: list[str], message: str) -> None:
    result = run(env, *args)
    assert result.exit_code != 0
    assert result.stderr.startswith("intake: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_invalid_setting_names_variable(env: dict[str, str]) -> None:
    result = run({**env, "INTAKE_PORT": "eighty"}, "list")
    assert result.exit_code == 2
    assert result.stderr.startswith("intake: INTAKE_PORT: ")


def test_the_cli_reads_no_key(env: dict[str, str], settings: Settings) -> None:
    """Only bootstrap commands load keys: with the audit key gone, `list` still works (the
    broker holds its keys), and the local bootstrap names the missing variable."""
    settings.keys["audit"].rename(settings.keys["audit"].with_suffix(".away"))
    try:
        assert run(env, "list").exit_code == 0
        result = run(env, "admin", "bootstrap", "alice", "--name", "Alice")
        assert result.exit_code == 2 and "INTAKE_AUDIT_KEY: no key file" in result.stderr
    finally:
        settings.keys["audit"].with_suffix(".away").rename(settings.keys["audit"])


def test_world_readable_key_is_refused(env: dict[str, str], settings: Settings) -> None:
    settings.keys["audit"].chmod(0o644)
    result = run(env, "admin", "bootstrap", "alice", "--name", "Alice")
    assert result.exit_code == 2 and "readable by group or others" in result.stderr


def test_policy_check_cli(tmp_path: Path) -> None:
    from intake.runtime import EXAMPLE_POLICY

    good = run({}, "policy", "check", str(EXAMPLE_POLICY))
    assert good.exit_code == 0 and "policy ok" in good.stdout
    bad = tmp_path / "p.toml"
    bad.write_text(EXAMPLE_POLICY.read_text().replace('tier = "privileged"', 'tier = "gold"'))
    result = run({}, "policy", "check", str(bad))
    assert result.exit_code == 2
    assert result.stderr == "intake: repos[1].tier: unknown risk tier 'gold'\n"
    deps = tmp_path / "deps.toml"
    deps.write_text(EXAMPLE_POLICY.read_text().replace('"pypi:ruff"', '"ruff"').replace('"npm:axios@0.30.4"', '"npm:axios@x"'))
    result = run({}, "policy", "check", str(deps))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "intake: dependencies.allow[1].package: 'ruff' must start with an ecosystem: one of pypi:, npm:, go:, cargo:",
        "dependencies.deny[1].package: 'x' is not a valid npm version",
    ]
    missing = run({}, "policy", "check", str(tmp_path / "nope.toml"))
    assert missing.exit_code == 2 and "no policy file" in missing.stderr


def test_keys_generate_refuses_overwrite(env: dict[str, str], settings: Settings) -> None:
    result = run(env, "keys", "generate")
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert settings.keys["signing"].stat().st_mode & 0o777 == 0o600


def test_keys_rotate_and_retire_on_the_broker_host(env: dict[str, str], settings: Settings) -> None:
    from intake.protocol.keyfiles import load_public_keys

    rotated = run(env, "keys", "rotate")
    assert rotated.exit_code == 0, rotated.stderr
    assert "signing key rotated in" in rotated.stdout
    old = rotated.stdout.split("old ")[1].split(" ")[0]
    assert len(load_public_keys(settings.keys["public"]).keys) == 2
    events = [json.loads(line) for line in run(env, "audit", "export").stdout.splitlines()]
    assert [e["data"]["old_kid"] for e in events if e["action"] == "keys.rotated"] == [old]
    assert run(env, "keys", "retire", old).exit_code == 0
    assert old not in load_public_keys(settings.keys["public"]).keys
    current = run(env, "keys", "retire", next(iter(load_public_keys(settings.keys["public"]).keys)))
    assert current.exit_code != 0 and "current signing key" in current.stderr


def test_worker_key_issue_registers_what_the_worker_serves(env: dict[str, str], settings: Settings) -> None:
    """Issue 19: a worker is registered (sealed ``worker.registered``) before its key is issued;
    the first issue without a scope is refused with one line."""
    refused = run(env, "worker-key", "issue", "w1")
    assert refused.exit_code != 0 and "not registered" in refused.output
    ok = run(env, "worker-key", "issue", "w1", "--queue", "tier-standard", "--repo", "acme/web",
             "--change-type", "docs", "--change-type", "tests")
    assert ok.exit_code == 0, ok.output
    assert settings.worker_key_path("w1").exists()
    again = run(env, "worker-key", "issue", "w1")  # a new key keeps the registration
    assert again.exit_code == 0, again.output
    bad = run(env, "worker-key", "issue", "w2", "--queue", "tier standard", "--repo", "acme/web",
              "--change-type", "docs")
    assert bad.exit_code != 0 and "--queue" in bad.output
    events = [json.loads(line) for line in run(env, "audit", "export").stdout.splitlines()]
    [registered] = [e for e in events if e.get("action") == "worker.registered"]
    assert registered["subject"] == "w1" and registered["data"] == {
        "queues": ["tier-standard"], "repos": ["acme/web"], "change_types": ["docs", "tests"]}



def test_a_spoofed_logname_does_not_decide_who_the_host_commands_record(
        env: dict[str, str], settings: Settings, tmp_path: Path) -> None:
    """``LOGNAME``/``USER`` are the caller's to set: a host command (here `worker-key issue`,
    which registers a worker) records the account of the effective uid on the audit log, as the
    local socket's SO_PEERCRED check names callers."""
    import os
    import pwd

    from intake.runtime import open_broker

    me = pwd.getpwuid(os.geteuid()).pw_name
    spoofed = {**env, "LOGNAME": "mallory", "USER": "mallory", "LNAME": "mallory", "USERNAME": "mallory"}
    result = run(spoofed, "worker-key", "issue", "w-spoof", "-o", str(tmp_path / "w.key"), "--queue", "tier-standard",
                 "--repo", "acme/web", "--change-type", "docs")
    assert result.exit_code == 0, result.output
    with open_broker(settings) as broker:
        actors = {e["actor"] for e in broker.store.audit.export() if e["subject"] == "w-spoof"}
    assert actors == {f"os:{me}"}
