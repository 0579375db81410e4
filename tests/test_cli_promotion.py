"""The promotion commands end to end through the CLI, with real TOTP codes."""

from __future__ import annotations

import json
import time

import pyotp
from click.testing import CliRunner, Result

from intake.cli import cli


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def enrol(env: dict[str, str], who: str, group: str) -> pyotp.TOTP:
    added = run(env, "approver", "add", who, "--name", who.title(), "--groups", group, "--json")
    assert added.exit_code == 0, added.stderr
    totp = pyotp.parse_uri(json.loads(added.stdout)["otpauth_uri"])
    assert run(env, "approver", "confirm", who, "--code", totp.now()).exit_code == 0
    return totp


def next_code(totp: pyotp.TOTP) -> str:
    """The next step's code: accepted (±1 step) even though this step was just spent."""
    return totp.at(time.time() + 30)


def test_enrol_promote_and_queue(env: dict[str, str]) -> None:
    alice = enrol(env, "alice", "platform")
    listed = json.loads(run(env, "approver", "list", "--json").stdout)
    assert listed == [{"id": "alice", "name": "Alice", "groups": ["platform"], "slack_user": None,
                       "email": None, "confirmed": True, "locked": False}]
    assert "otpauth" not in run(env, "approver", "list").stdout

    idea = json.loads(run(env, "idea", "Document the retry flag", "--as", "erin", "--json").stdout)
    promoted = run(env, "promote", idea["id"], "--repo", "acme/web", "--change-type", "docs",
                   "--as", "alice", "--code", next_code(alice), "--json")
    assert promoted.exit_code == 0, promoted.stderr
    data = json.loads(promoted.stdout)
    assert {k: data[k] for k in ("status", "approvals", "required")} == {"status": "queued", "approvals": 1, "required": 1}
    task = json.loads(run(env, "show", data["task"], "--json").stdout)
    assert task["state"] == "queued" and task["spec_hash"] == data["spec_hash"]
    assert "token" not in task  # no token ever sits on a task record
    assert run(env, "audit", "verify").exit_code == 0


def test_refusals_are_one_line_with_reason(env: dict[str, str]) -> None:
    alice = enrol(env, "alice", "platform")
    idea = json.loads(run(env, "idea", "x", "--as", "alice", "--json").stdout)
    own = run(env, "promote", idea["id"], "--repo", "acme/web", "--change-type", "docs",
              "--as", "alice", "--code", next_code(alice))
    assert own.exit_code == 1 and own.stderr == "intake: you cannot approve your own request\n"
    replay = run(env, "approver", "confirm", "alice", "--code", alice.now())
    assert replay.exit_code == 1 and "already confirmed" in replay.stderr


def test_revoke_freeze_thaw(env: dict[str, str]) -> None:
    alice = enrol(env, "alice", "platform")
    idea = json.loads(run(env, "idea", "y", "--as", "erin", "--json").stdout)
    task = json.loads(run(env, "promote", idea["id"], "--repo", "acme/web", "--change-type", "docs",
                          "--as", "alice", "--code", next_code(alice), "--json").stdout)["task"]
    stranger = run(env, "revoke", task, "--as", "mallory", "--reason", "because")
    assert stranger.exit_code == 1 and "only the requester or an approver" in stranger.stderr
    assert run(env, "revoke", task, "--as", "erin", "--reason", "not needed").exit_code == 0
    assert json.loads(run(env, "show", task, "--json").stdout)["state"] == "revoked"
    assert run(env, "freeze", "--as", "ops", "--reason", "incident").exit_code == 0
    assert run(env, "thaw", "--as", "ops").exit_code == 0
    again = run(env, "thaw", "--as", "ops")
    assert again.exit_code == 1 and "not frozen" in again.stderr
