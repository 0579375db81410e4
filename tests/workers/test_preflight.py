"""`intake worker` checks its agent program, credentials and report key before it takes a job:
a broken set-up is one line and a non-zero exit, and the queued job is still there."""

from __future__ import annotations

from pathlib import Path

import pytest

from intake.core.errors import ConfigError
from intake.tasks.dispatch import job_id_for
from intake.workers.config import load_worker_config
from intake.workers.preflight import preflight, worker_problems
from tests.workers.harness import Rig, rig  # noqa: F401  (fixture)

UNSET = "INTAKE_TEST_SURELY_UNSET_MODEL_KEY"


def _refused_before_a_job(rig: Rig, config: Path) -> str:  # noqa: F811
    task = rig.promote()
    assert rig.queue().count == 1
    proc = rig.spawn(config, burst=True)
    assert proc.wait(timeout=60) == 2
    lines = rig.worker_log().splitlines()
    assert len(lines) == 1, lines  # one line, no traceback, no worker banner
    assert rig.queue().count == 1  # the job was not taken
    assert rig.task(task.id).state.value == "queued"
    return lines[0]


def test_a_missing_agent_binary_stops_the_worker_at_start(rig: Rig) -> None:  # noqa: F811
    config = rig.config(agent={"type": "command", "argv": ["/nonexistent/bin/agent", "--go"]})
    assert _refused_before_a_job(rig, config) == \
        "intake: worker test: agent.argv[0]: no program at /nonexistent/bin/agent"


def test_an_unset_credential_variable_stops_the_worker_at_start(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.delenv(UNSET, raising=False)
    config = rig.config(repos={"acme/web": {"agent_env": {"MODEL_KEY": {"env": UNSET}}}, "acme/payments": {}})
    line = _refused_before_a_job(rig, config)
    assert line == f"intake: worker test: repos[0].agent_env.MODEL_KEY: environment variable {UNSET} is not set"


def test_every_problem_is_listed_and_none_holds_a_secret(rig: Rig, tmp_path: Path,  # noqa: F811
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("ghp_s3cretvalue\n")
    secret_file.chmod(0o644)
    monkeypatch.delenv(UNSET, raising=False)
    config = rig.config(
        agent={"type": "command", "argv": ["no-such-agent-program"]},
        repos={"acme/web": {"agent_env": {"MODEL_KEY": {"env": UNSET}, "GH": {"file": str(secret_file)}}},
               "acme/payments": {}},
        name="other",
    )
    rig.settings.worker_key_path("other").unlink()
    problems = worker_problems(rig.settings, load_worker_config(config))
    assert [p.split(":")[0] for p in problems] == [
        "agent.argv[0]", "repos[0].agent_env.MODEL_KEY", "repos[0].agent_env.GH", "INTAKE_WORKER_KEY"]
    assert "readable by group or others" in problems[2]
    assert not any("s3cret" in p for p in problems)
    with pytest.raises(ConfigError, match=r"^worker other: agent\.argv\[0\]: .* \(and 3 more"):
        preflight(rig.settings, load_worker_config(config))


def test_a_ready_worker_passes(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv(UNSET, "k-123")
    config = rig.config(agent={"type": "command", "argv": ["python3", "-c", "pass"]},
                        repos={"acme/web": {"agent_env": {"MODEL_KEY": {"env": UNSET}}}, "acme/payments": {}})
    assert worker_problems(rig.settings, load_worker_config(config)) == []


def test_an_unreachable_redis_stops_the_worker_at_start(rig: Rig, tmp_path: Path) -> None:  # noqa: F811
    config = rig.config()
    proc = rig.spawn(config, burst=True, INTAKE_REDIS_URL=f"unix://{tmp_path}/no-redis.sock")
    assert proc.wait(timeout=60) == 1
    assert rig.worker_log().splitlines() == ["intake: INTAKE_REDIS_URL: cannot reach Redis (ConnectionError)"]


def test_a_worker_logs_json_lines_without_its_token(rig: Rig) -> None:  # noqa: F811
    import json

    task = rig.promote()
    token = rig.job_token(task.id)
    config = rig.config()
    proc = rig.spawn(config, burst=True, INTAKE_LOG_FORMAT="json", INTAKE_LOG_LEVEL="DEBUG")
    assert proc.wait(timeout=120) == 0, rig.worker_log()
    assert job_id_for("tier-standard", task.id, 1) not in rig.queue().job_ids  # it took the job and ran it
    lines = [json.loads(line) for line in rig.worker_log().splitlines()]  # every line is JSON
    assert any(line["logger"].startswith("rq.") for line in lines)
    assert token not in rig.worker_log() and token.split(".")[-1] not in rig.worker_log()
