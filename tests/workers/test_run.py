"""Runs on real git: the demo agent end to end, the gates, agent failures, limits, redaction,
freeze mid-run and pull-request creation against a local fake forge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from intake.core.models import TaskState
from intake.runtime import EXAMPLE_POLICY
from tests.api_harness import link_os_user, running_broker
from tests.conftest import FakeClock
from tests.workers.fake_forge import FakeForge, fake_forge  # noqa: F401
from tests.workers.harness import Rig, git_refs, git_show, in_a_work_tree, make_rig, rig, wait_for  # noqa: F401


def sh(script: str) -> dict[str, object]:
    return {"type": "command", "argv": ["/bin/sh", "-c", script]}


def pushed(rig: Rig, repo: str = "acme/web") -> set[str]:
    return set(git_refs(rig.bare(repo))) - {"refs/heads/main"}


def test_demo_agent_run_pushes_the_branch_and_records_the_result(rig: Rig) -> None:
    task = rig.promote()
    assert rig.work(rig.config())
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED and done.reason is None and done.attempts == 1
    result = done.result or {}
    branch = f"intake/{task.id}"
    refs = git_refs(rig.bare("acme/web"))
    assert result["branch"] == branch and refs[f"refs/heads/{branch}"] == result["commit"]
    assert result["base"] == refs["refs/heads/main"]
    assert result["files"] == [f"docs/intake/{task.id}.md"]
    assert result["checks"] == [{"name": "docs/no-empty-markdown", "ok": True, "exit_code": 0,
                                 "timed_out": False, "tail": ""}]
    assert result["pr_url"] is None and result["sandbox"] == "bwrap" and result["network"] == "none"
    assert "intake demo agent" in git_show(rig.bare("acme/web"), branch, f"docs/intake/{task.id}.md")
    succeeded = rig.events("task.succeeded")[-1]
    assert succeeded["data"]["branch"] == branch and succeeded["data"]["commit"] == result["commit"]
    # What an operator sees: `intake show TASK --json`.
    link_os_user(rig.settings)  # the CLI reads as the OS user, who must be a person
    with running_broker(rig.settings):  # the CLI reads through the broker's API
        shown = subprocess.run([sys.executable, "-m", "intake", "show", task.id, "--json"], env=rig.env(),
                               capture_output=True, text=True, timeout=60, check=True)
    data = json.loads(shown.stdout)
    assert data["state"] == "succeeded" and "token" not in data
    assert data["result"]["branch"] == branch and data["result"]["commit"] == result["commit"]


def test_a_blocked_path_blocks_the_run_and_nothing_is_pushed(rig: Rig) -> None:
    task = rig.promote(repo="acme/payments", change_type="bugfix")
    agent = sh("mkdir -p payments/keys && echo secret > payments/keys/new.pem && echo ok > docs/x.md")
    rig.work(rig.config(agent=agent))
    ended = rig.task(task.id)
    assert ended.state is TaskState.BLOCKED
    assert ended.result is not None and ended.result["pushed"] is False
    assert ended.result["gates"] == ["blocked path: payments/keys/new.pem"]
    assert "payments/keys/new.pem" in (ended.reason or "")
    assert not pushed(rig, "acme/payments")
    assert rig.events("task.blocked")[-1]["data"]["gates"] == 1


def test_a_dependency_off_the_allowlist_blocks_the_run(rig: Rig) -> None:
    task = rig.promote(change_type="dependency-bump")
    rig.work(rig.config(agent=sh("printf 'pytest==8.0\\nrequests==2.31\\n' > requirements.txt")))
    ended = rig.task(task.id)
    assert ended.state is TaskState.BLOCKED
    assert ended.result is not None
    assert ended.result["gates"] == ["dependency: unlisted package: pypi:requests 2.31"]
    assert not pushed(rig)


def test_agent_failure_and_no_change_fail_the_task(rig: Rig) -> None:
    failing, idle = rig.promote(), rig.promote()
    rig.work(rig.config(agent=sh("echo 'agent says no'; exit 3")))
    ended = rig.task(failing.id)
    assert ended.state is TaskState.FAILED and ended.reason == "the agent exited with status 3"
    assert ended.result is not None and "agent says no" in ended.result["output_tail"]
    assert rig.task(idle.id).state is TaskState.FAILED
    assert not pushed(rig)


def test_no_change_is_a_failure(rig: Rig) -> None:
    task = rig.promote()
    rig.work(rig.config(agent=sh("true")))
    assert rig.task(task.id).reason == "the agent made no changes"


def test_agent_output_past_the_cap_blocks_the_run_and_credentials_are_redacted(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_AGENT_TOKEN", "agent-token-abc123")
    task = rig.promote()
    script = 'echo "token=$MODEL_API_KEY"; head -c 3000000 /dev/zero | tr "\\0" x; echo; echo done > docs/a.md'
    config = rig.config(agent=sh(script), repos={"acme/web": {"agent_env": {"MODEL_API_KEY": {"env": "WEB_AGENT_TOKEN"}}}})
    rig.work(config)
    result = rig.task(task.id).result or {}
    assert rig.task(task.id).state is TaskState.BLOCKED
    assert rig.task(task.id).reason == "stopped at a limit: the output passed limits.max_output_bytes (1048576)"
    assert result["limit"] == "output" and result["pushed"] is False
    assert result["output_truncated"] is True and len(result["output_tail"]) <= 4000
    assert "agent-token-abc123" not in json.dumps(rig.task(task.id).model_dump(mode="json"))


def test_agent_output_tail_redacts_the_agent_token(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_AGENT_TOKEN", "agent-token-abc123")
    task = rig.promote()
    config = rig.config(agent=sh('echo "token=$MODEL_API_KEY"; echo x > docs/a.md'),
                        repos={"acme/web": {"agent_env": {"MODEL_API_KEY": {"env": "WEB_AGENT_TOKEN"}}}})
    rig.work(config)
    assert (rig.task(task.id).result or {})["output_tail"] == "token=***\n"


@pytest.fixture
def short_rig(tmp_path: Path, redis_server: str, rclient: redis.Redis, clock: FakeClock) -> Iterator[Rig]:
    text = EXAMPLE_POLICY.read_text().replace('run_timeout = "30m"', 'run_timeout = "1s"')
    made = make_rig(tmp_path, redis_server, rclient, clock, policy_text=text)
    yield made
    made.close()


def test_the_spec_time_limit_stops_the_agent(short_rig: Rig) -> None:
    task = short_rig.promote()
    assert task.spec.limits.run_timeout_s == 1
    short_rig.work(short_rig.config(agent=sh("exec sleep 30")))
    ended = short_rig.task(task.id)
    assert ended.state is TaskState.FAILED and ended.reason == "the agent timed out after 1s"


def test_freezing_intake_stops_a_running_task_too(rig: Rig) -> None:
    """The broker stops renewing leases while frozen: the run stops, nothing is pushed."""
    task = rig.promote()
    started = f"started-{task.id}"
    agent = sh(f"touch {started}; sleep 30; rm {started}; echo frozen-but-finished > docs/note.md")

    def freeze_when_started() -> None:
        wait_for(lambda: in_a_work_tree(started), 20, "the agent to start")
        rig.broker.gatekeeper.freeze(by="bob", actor="cli:bob", reason="incident")

    helper = threading.Thread(target=freeze_when_started)
    helper.start()
    rig.work(rig.config(agent=agent))
    helper.join(timeout=30)
    assert rig.task(task.id).state is TaskState.RUNNING  # until its lease lapses and the reaper settles it
    assert not any(ref.startswith("refs/heads/intake/") for ref in git_refs(rig.bare("acme/web")))
    assert rig.events("run.stopped")[-1]["data"]["why"] == "frozen"


def test_pull_request_is_opened_through_the_forge(rig: Rig, fake_forge: FakeForge,  # noqa: F811
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_FORGE_TOKEN", "forge-token-xyz789")
    task = rig.promote()
    forge = {"api_url": fake_forge.url, "repository": "acme/web", "token": {"env": "WEB_FORGE_TOKEN"}}
    rig.work(rig.config(repos={"acme/web": {"forge": forge}}))
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED
    assert (done.result or {})["pr_url"] == "https://forge.test/acme/web/pull/1"
    [call] = fake_forge.calls
    assert call["path"] == "/repos/acme/web/pulls"
    assert call["authorization"] == "Bearer forge-token-xyz789"
    assert call["json"]["head"] == f"intake/{task.id}" and call["json"]["base"] == "main"
    assert "document the deploy" not in call["json"]["body"]  # untrusted text stays out of the PR


def test_a_forge_error_keeps_the_pushed_branch(rig: Rig, fake_forge: FakeForge,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_FORGE_TOKEN", "forge-token-xyz789")
    fake_forge.status = 422
    task = rig.promote()
    forge = {"api_url": fake_forge.url, "repository": "acme/web", "token": {"env": "WEB_FORGE_TOKEN"}}
    rig.work(rig.config(repos={"acme/web": {"forge": forge}}))
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED and (done.result or {})["pr_url"] is None
    assert (done.result or {})["pr_error"] == "pull request not created: the forge answered HTTP 422"
    assert pushed(rig) == {f"refs/heads/intake/{task.id}", f"refs/intake/{task.id}", "refs/notes/intake"}


def test_git_credentials_for_local_repos_are_refused_by_the_config(rig: Rig) -> None:
    from intake.core.errors import ConfigError
    from intake.workers.config import load_worker_config

    with pytest.raises(ConfigError, match=r"repos\[0\]: a credential is only sent over https"):
        load_worker_config(rig.config(repos={"acme/web": {"credential": {"env": "X"}}}))
    assert os.environ.get("X") is None


def test_symlinks_and_embedded_repositories_are_blocked(rig: Rig) -> None:
    task = rig.promote()
    agent = sh("mkdir -p docs && ln -s ../.github docs/ci && ln -s /etc/passwd docs/pw && "
               "git init -q docs/sub && git -C docs/sub -c user.name=a -c user.email=a@b commit -q "
               "--allow-empty -m x")
    rig.work(rig.config(agent=agent))
    ended = rig.task(task.id)
    assert ended.state is TaskState.BLOCKED
    gates = (ended.result or {}).get("gates", [])
    assert "symlink not allowed: docs/ci" in gates and "symlink not allowed: docs/pw" in gates
    assert "embedded repository (gitlink) not allowed: docs/sub" in gates
    assert not pushed(rig)
