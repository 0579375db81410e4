"""The power commands through the CLI, as a client of the real broker app, with real codes.

The CLI runs in this process, so the kernel names this OS user as the caller on the socket;
each test links that user to the person it plays."""

from __future__ import annotations

import getpass
import json

import pyotp
import pytest
from click.testing import CliRunner, Result

from intake.cli.main import cli
from intake.core.models import Channel
from intake.core.settings import Settings
from intake.people.registry import People
from intake.runtime import open_broker
from tests.api_harness import Codes, enrol
from tests.factories import draft

pytestmark = pytest.mark.usefixtures("api")
ME = f"os:{getpass.getuser()}"


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def capture(settings: Settings, requester: str, channel: Channel = Channel.SLACK,
            text: str = "Document the retry flag") -> str:
    """An idea as a channel would file it (the channel is not what these tests are about)."""
    with open_broker(settings) as broker:
        return broker.store.capture(draft(requester=requester, channel=channel, text=text))[0].id


def test_bootstrap_enrol_promote_and_queue(env: dict[str, str], settings: Settings) -> None:
    boot = run(env, "admin", "bootstrap", "alice", "--name", "Alice")
    assert boot.exit_code == 0, boot.stderr
    again = run(env, "admin", "bootstrap", "alice", "--name", "Alice")
    assert again.exit_code != 0 and "an admin already exists" in again.stderr
    added = run(env, "approver", "add", "alice", "--name", "Alice", "--groups", "platform", "--json")
    assert added.exit_code == 0, added.stderr  # the first admin enrols themselves without a code
    codes = Codes(pyotp.parse_uri(json.loads(added.stdout)["otpauth_uri"]))
    assert run(env, "approver", "confirm", "alice", "--code", codes.next()).exit_code == 0
    listed = json.loads(run(env, "approver", "list", "--json").stdout)
    assert listed == [{"id": "alice", "name": "Alice", "groups": ["platform"], "slack_user": None,
                       "email": None, "confirmed": True, "locked": False}]
    assert "otpauth" not in run(env, "approver", "list").stdout
    # A second enrolment now needs the admin's own code.
    bob = run(env, "approver", "add", "bob", "--name", "Bob", "--groups", "platform")
    assert bob.exit_code == 1 and "needs your fresh authenticator code" in bob.stderr

    idea_id = capture(settings, "slack:UERIN00001")
    promoted = run(env, "promote", idea_id, "--repo", "acme/web", "--change-type", "docs",
                   "--code", codes.next(), "--json")
    assert promoted.exit_code == 0, promoted.stderr
    data = json.loads(promoted.stdout)
    assert {k: data[k] for k in ("status", "approvals", "required", "approvers")} == {
        "status": "queued", "approvals": 1, "required": 1, "approvers": ["alice"]}
    task = json.loads(run(env, "show", data["task"], "--json").stdout)
    assert task["state"] == "queued" and task["spec_hash"] == data["spec_hash"]
    assert "token" not in task  # no token ever sits on a task record
    assert run(env, "audit", "verify").exit_code == 0


def test_an_idea_filed_under_another_cli_name_by_its_approver_is_refused(env: dict[str, str],
                                                                       settings: Settings) -> None:
    codes = enrol(settings, {"alice": ("platform", (ME,))})
    filed = json.loads(run(env, "idea", "give me prod access", "--as", "zed", "--json").stdout)
    assert filed["requester"] == "cli:zed" and filed["filed_by"] == ME
    own = run(env, "promote", filed["id"], "--repo", "acme/web", "--change-type", "docs",
              "--code", codes["alice"].next())
    assert own.exit_code == 1 and own.stderr == "intake: you cannot approve your own request\n"


def test_approving_via_a_second_linked_identity_is_refused(env: dict[str, str], settings: Settings) -> None:
    """alice files from her GitHub login and another approver promotes; alice, on the CLI as
    her OS user, may not add the second approval to her own request."""
    codes = enrol(settings, {"alice": ("platform", (ME, "github:id:4242")), "carol": ("security", ())})
    idea_id = capture(settings, "github:id:4242", Channel.GITHUB, "rotate the payments key")
    with open_broker(settings) as broker:
        task = broker.gatekeeper.promote(idea_id, repo="acme/payments", change_type="bugfix",
                                         approver_id="carol", code=codes["carol"].next()).task
    own = run(env, "approve", task.id, "--code", codes["alice"].next())
    assert own.exit_code == 1 and "your own request" in own.stderr
    assert json.loads(run(env, "show", task.id, "--json").stdout)["approvals_count"] == 1


def test_deny_revoke_freeze_need_no_code_thaw_does(env: dict[str, str], settings: Settings) -> None:
    codes = enrol(settings, {"alice": ("platform", (ME,))})
    denied = capture(settings, "slack:UERIN00001", text="delete the audit log")
    assert run(env, "deny", denied, "--reason", "no").exit_code == 0
    idea_id = capture(settings, "slack:UERIN00001")
    task = json.loads(run(env, "promote", idea_id, "--repo", "acme/web", "--change-type", "docs",
                          "--code", codes["alice"].next(), "--json").stdout)["task"]
    assert run(env, "revoke", task, "--reason", "not needed").exit_code == 0
    assert json.loads(run(env, "show", task, "--json").stdout)["state"] == "revoked"
    assert run(env, "freeze", "--reason", "incident").exit_code == 0
    no_code = run(env, "thaw", "--code", "000000")
    assert no_code.exit_code == 1 and "not valid" in no_code.stderr
    assert run(env, "thaw", "--code", codes["alice"].next()).exit_code == 0
    again = run(env, "freeze", "--reason", "x")
    assert again.exit_code == 0
    actions = [(e["actor"], e["action"]) for e in json.loads("[" + ",".join(
        run(env, "audit", "export").stdout.splitlines()) + "]")]
    assert ("person:alice", "broker.frozen") in actions and ("person:alice", "broker.thawed") in actions


def test_an_unlinked_os_user_cannot_approve_but_can_file(env: dict[str, str], settings: Settings) -> None:
    enrol(settings, {"alice": ("platform", ())})  # alice exists, but this OS user is nobody
    filed = json.loads(run(env, "idea", "please fix the flaky test", "--json").stdout)
    assert filed["requester"] == ME == filed["filed_by"]
    refused = run(env, "promote", filed["id"], "--repo", "acme/web", "--change-type", "docs", "--code", "123456")
    assert refused.exit_code == 1 and "is not linked to a person" in refused.stderr
    with open_broker(settings) as broker:
        assert People(broker.store).resolve(ME) is None
        assert broker.store.get_idea(filed["id"]).state.value == "captured"
