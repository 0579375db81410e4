"""Dev mode, the quick start's whole path: idea -> promote with a code -> the embedded worker
(a real subprocess on the embedded Redis) runs the demo agent on a local bare repo -> branch
pushed -> ``intake show TASK --json`` says succeeded with the branch and commit."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from intake.core.models import TaskState
from intake.core.policy import load_policy
from intake.core.settings import load_settings
from intake.runtime import open_broker, prepare_dev
from intake.tasks.worker_reports import ensure_worker_key, policy_scope
from intake.workers.dev import DEV_WORKER_NAME, prepare_dev_worker, start_dev_worker, stop_dev_worker, worker_env
from tests.api_harness import link_os_user, running_broker
from tests.conftest import FakeClock
from tests.workers.harness import git_refs, git_show, make_rig, wait_for


@pytest.fixture
def dev_settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    # No INTAKE_REDIS_URL: the embedded redis-server in the data dir, as `intake serve --dev`.
    settings = load_settings(_env_file=None, data_dir=tmp_path / "d")
    prepare_dev(settings)
    return settings


def test_prepare_dev_worker_maps_every_policy_repo_to_a_local_bare_repo(dev_settings) -> None:  # type: ignore[no-untyped-def]
    path = prepare_dev_worker(dev_settings)
    assert prepare_dev_worker(dev_settings) == path  # idempotent
    config = tomllib.loads(path.read_text())
    policy = load_policy(dev_settings.policy_path)
    assert config["agent"] == {"type": "demo"}
    assert sorted(config["queues"]) == sorted({policy.queue_for(r) for r in policy.repos})
    for repo, entry in zip(policy.repos, config["repos"], strict=True):
        bare = Path(entry["url"])
        assert entry["name"] == repo.name and bare.is_relative_to(dev_settings.data_dir / "repos")
        assert "refs/heads/main" in git_refs(bare)
        assert git_show(bare, "main", "docs/README.md")
    env = worker_env(dev_settings)
    assert env["INTAKE_SIGNING_KEY"] == env["INTAKE_SECRETS_KEY"] == "/dev/null"
    assert env["INTAKE_PUBLIC_KEY"] == str(dev_settings.keys["public"])


def test_dev_mode_runs_an_idea_all_the_way_to_a_pushed_branch(dev_settings, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    with open_broker(dev_settings) as broker:  # the server's hold on the embedded Redis
        rig = make_rig(dev_settings.data_dir.parent, broker.url, broker.client, clock, settings=dev_settings)
        ensure_worker_key(rig.broker, DEV_WORKER_NAME, policy_scope(rig.broker.policy))  # what `serve --dev` does before it starts the worker
        rig.serve_reports()
        worker = start_dev_worker(dev_settings)
        try:
            task = rig.promote(text="Document how to run the tests")
            done = wait_for(lambda: rig.task(task.id).state is TaskState.SUCCEEDED and rig.task(task.id),
                            30, "the embedded worker to run the task")
            link_os_user(dev_settings)  # the CLI reads as the OS user, who must be a person
            with running_broker(dev_settings):  # the CLI reads through the broker's API
                shown = subprocess.run(
                    [sys.executable, "-m", "intake", "show", task.id, "--json"], env=rig.env(),
                    capture_output=True, text=True, timeout=60, check=True,
                )
        finally:
            code = stop_dev_worker(worker)
            rig.close()
        assert code == 0, worker.log_path.read_text()
    data = json.loads(shown.stdout)
    branch = f"intake/{task.id}"
    assert data["state"] == "succeeded"
    assert data["result"]["branch"] == branch and data["result"]["commit"] == done.result["commit"]
    bare = dev_settings.data_dir / "repos" / "acme" / "web.git"
    assert git_refs(bare)[f"refs/heads/{branch}"] == data["result"]["commit"]
