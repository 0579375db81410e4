"""Ids as people type them: unique prefixes, any case, never across kinds; tables and a
readable `show` (no Python reprs)."""

from __future__ import annotations

import json

import pytest
import redis
from click.testing import CliRunner, Result

from intake.cli.client import ApiClient, ApiError, broker_url, seg
from intake.cli.main import cli
from intake.core.settings import Settings

pytestmark = pytest.mark.usefixtures("api")


@pytest.fixture
def linked(settings: Settings) -> str:
    """The OS user running the tests is a person (an unlinked one reads nothing)."""
    from tests.api_harness import link_os_user

    return link_os_user(settings)


def run(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def file_idea(env: dict[str, str], text: str) -> str:
    done = run(env, "idea", text, "--as", "bob", "--json")
    assert done.exit_code == 0, done.stderr
    return str(json.loads(done.stdout)["id"])


def one_line_error(result: Result) -> str:
    assert result.exit_code != 0
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("intake: "), result.stderr
    return result.stderr


def test_a_unique_prefix_in_any_case_names_the_idea(env: dict[str, str], linked: str) -> None:
    ident = file_idea(env, "Document the release steps")
    for typed in (ident[:6], "i-" + ident[2:8].upper(), ident.lower(), ident.upper()):
        shown = run(env, "show", typed, "--json")
        assert shown.exit_code == 0, (typed, shown.stderr)
        assert json.loads(shown.stdout)["id"] == ident


def test_an_ambiguous_prefix_says_how_many(env: dict[str, str], rclient: redis.Redis, linked: str) -> None:
    # Two ideas whose ids share a prefix (index entries; ids are random otherwise).
    rclient.zadd("intake:ideas", {"I-abcd00000001": 1.0, "I-abcd00000002": 2.0, "I-abce00000003": 3.0})
    err = one_line_error(run(env, "show", "I-ABCD"))
    assert err == "intake: I-abcd is ambiguous: 2 ideas start with it (type more of the id)\n"
    # A prefix only one id has resolves to it (then the broker has no record behind the entry).
    assert "no idea I-abce00000003" in one_line_error(run(env, "show", "i-AbCe"))


def test_unknown_and_malformed_prefixes(env: dict[str, str], linked: str) -> None:
    assert one_line_error(run(env, "show", "I-ffff")) == "intake: no idea id starts with I-ffff\n"
    assert "not an idea id" in one_line_error(run(env, "show", "I-abc"))  # too short
    assert "not an idea id" in one_line_error(run(env, "show", "I-ab*"))  # no globs
    assert "not an idea id" in one_line_error(run(env, "show", "3f9a1c"))  # the kind letter is needed


def test_prefixes_never_cross_kinds(env: dict[str, str], rclient: redis.Redis, settings: Settings, linked: str) -> None:
    ident = file_idea(env, "Add a test for the parser")
    hexpart = ident[2:]
    # A task whose id has the idea's digits: each kind resolves to its own.
    rclient.zadd("intake:tasks", {f"T-{hexpart}": 1.0})
    client = ApiClient(broker_url(settings))
    assert client.call("GET", f"/ids/I-{hexpart[:5]}") == {"id": ident}
    assert client.call("GET", f"/ids/T-{hexpart[:5]}") == {"id": f"T-{hexpart}"}
    rclient.zrem("intake:tasks", f"T-{hexpart}")
    assert one_line_error(run(env, "show", f"T-{hexpart[:6]}")) == f"intake: no task id starts with T-{hexpart[:6]}\n"
    # A command that takes a task refuses an idea id before asking anything.
    err = one_line_error(run(env, "revoke", ident[:8], "--reason", "x"))
    assert err == f"intake: {ident[:8]!r} is an idea id; this needs a task id (T-…)\n"


def test_the_resolver_refuses_hostile_input(settings: Settings, linked: str) -> None:
    """A raw API caller: glob characters, other shapes and overlong input are a 400, not a scan."""
    client = ApiClient(broker_url(settings))
    for bad in ("I-*", "I-ab[cd]e", "I-abcd?", "X-abcd", "I-" + "a" * 13, "I-abcd\n"):
        with pytest.raises(ApiError) as caught:
            client.call("GET", f"/ids/{seg(bad)}")
        assert caught.value.status == 400, bad


def test_lists_are_tables_and_show_has_no_reprs(env: dict[str, str], linked: str) -> None:
    first = file_idea(env, "Rotate the staging cert\nand say so in #ops")
    second = file_idea(env, "x" * 200)
    lines = run(env, "list").stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "REQUESTER", "CHANNEL", "CREATED", "TITLE"]
    assert [line.split()[0] for line in lines[1:]] == [first, second]
    assert all(len(line) < 160 and line == line.rstrip() for line in lines)  # long titles are cut
    assert lines[2].endswith("…")
    shown = run(env, "show", first).stdout
    assert "{" not in shown and "[" not in shown and "None" not in shown
    assert shown.splitlines()[0].split() == ["idea", first]
    assert "  | Rotate the staging cert" in shown and "  | and say so in #ops" in shown
    assert "requester  cli:bob" in shown


def test_promote_by_prefix_and_a_readable_task(env: dict[str, str], settings: Settings) -> None:
    """The power path with prefixes: promote I-<prefix>, then show T-<PREFIX> in sections."""
    import pyotp

    from tests.api_harness import Codes
    from tests.test_cli_promotion import capture

    assert run(env, "admin", "bootstrap", "Alice", "--name", "Alice").exit_code == 0  # ids fold case
    added = run(env, "approver", "add", "ALICE", "--name", "Alice", "--groups", "platform", "--json")
    assert added.exit_code == 0, added.stderr
    codes = Codes(pyotp.parse_uri(json.loads(added.stdout)["otpauth_uri"]))
    assert run(env, "approver", "confirm", "alice", "--code", codes.next()).exit_code == 0
    listed = run(env, "approver", "list").stdout.splitlines()
    assert listed[0].split() == ["ID", "NAME", "GROUPS", "SLACK", "EMAIL", "STATUS"]
    assert listed[1].split() == ["alice", "Alice", "platform", "-", "-", "confirmed"]

    idea_id = capture(settings, "slack:UERIN00001")
    promoted = run(env, "promote", idea_id[:7].lower(), "--repo", "acme/web", "--change-type", "docs",
                   "--code", codes.next(), "--json")
    assert promoted.exit_code == 0, promoted.stderr
    task_id = json.loads(promoted.stdout)["task"]
    shown = run(env, "show", task_id[:7].upper())
    assert shown.exit_code == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["task", task_id]
    assert lines[lines.index("approvals:") + 1].split() == ["APPROVER", "GROUPS", "AT", "VIA", "SHA", "NOTE"]
    assert "spec:" in lines and "prompt (untrusted):" in lines
    assert "  | Document the retry flag" in lines
    assert not any(r in shown.stdout for r in ("{'", "['", "('", "None", "True", "False")), shown.stdout
    assert any(line.startswith("  limits:") for line in lines)
    assert any(line.startswith("    run timeout s ") for line in lines)
    tasks = run(env, "list", "--tasks").stdout.splitlines()
    assert tasks[0].split() == ["ID", "STATE", "REPO", "CHANGE", "APPROVALS", "IDEA", "CREATED"]
    assert tasks[1].split()[:5] == [task_id, "queued", "acme/web", "docs", "1/1"]
