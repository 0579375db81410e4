"""Worker settings: validated, one-line errors naming the field, credentials only by reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from intake.core.errors import ConfigError
from intake.core.resources import EXAMPLE_WORKER
from intake.workers.agents import CommandAgent, DemoAgent
from intake.workers.config import CredentialSource, load_worker_config, parse_worker_config

BASE = {"name": "w1", "queues": ["tier-standard"], "agent": {"type": "demo"},
        "repos": [{"name": "acme/web", "url": "/srv/git/web.git", "change_types": ["docs"]}]}


def with_repo(**extra: object) -> dict[str, object]:
    return {**BASE, "repos": [{**BASE["repos"][0], **extra}]}  # type: ignore[index]


def test_the_example_config_is_valid() -> None:
    config = load_worker_config(EXAMPLE_WORKER)
    assert config.queues == ("tier-standard",)
    assert isinstance(config.build_agent(), CommandAgent)
    web = config.repo("acme/web")
    assert web is not None and web.credential == CredentialSource(env="ACME_WEB_GIT_TOKEN")
    assert config.serves("acme/web", "docs") and not config.serves("acme/payments", "docs")


@pytest.mark.parametrize(("data", "message"), [
    ({**BASE, "queues": []}, "queues: Tuple should have at least 1 item"),
    ({**BASE, "agent": {"type": "shell"}}, "agent: Input tag 'shell'"),
    ({**BASE, "agent": {"type": "command"}}, "agent.argv: Field required"),
    (with_repo(credential={"env": "T"}), "repos[0]: a credential is only sent over https:// URLs"),
    (with_repo(url="https://tok@git.example.com/a.git"), "repos[0]: url must not embed credentials"),
    (with_repo(credential={"env": "T", "file": "x"}), "repos[0].credential: give exactly one of"),
    (with_repo(token="ghp_inline"), "repos[0].token: Extra inputs are not permitted"),
    (with_repo(forge={"repository": "acme/web", "token": {"env": "T"}, "api_url": "http://forge.example.com"}),
     "repos[0].forge: api_url must be https://"),
    ({**BASE, "repos": [BASE["repos"][0], BASE["repos"][0]]}, "config: repo 'acme/web' is listed twice"),
])
def test_errors_name_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_worker_config(data)
    assert str(err.value).startswith("worker config: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_credentials_are_read_by_reference_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEB_TOKEN", "s3cret-value")
    assert CredentialSource(env="WEB_TOKEN").read() == "s3cret-value"
    with pytest.raises(ConfigError, match="NOPE is not set"):
        CredentialSource(env="NOPE").read()
    secret = tmp_path / "token"
    secret.write_text("file-secret\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group or others") as err:
        CredentialSource(file=secret).read()
    assert "file-secret" not in str(err.value)
    secret.chmod(0o600)
    assert CredentialSource(file=secret).read() == "file-secret"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "worker.toml"
    path.write_text('name = "w1"\nqueues = ["q"]\nagent = { type = "demo" }\n[[repos]]\nname = "a/b"\n'
                    'url = "https://git.example.com/a/b.git"\nchange_types = ["docs"]\n'
                    'credential = { file = "secrets/token" }\n')
    config = load_worker_config(path)
    assert config.repos[0].credential == CredentialSource(file=tmp_path / "conf" / "secrets" / "token")
    assert isinstance(config.build_agent(), DemoAgent)


def test_the_worker_command_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "worker.toml"
    bad.write_text('name = "w1"\nqueues = ["q"]\nagent = { type = "shell" }\n')
    env = {"PATH": os.environ.get("PATH", ""), "INTAKE_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, "-m", "intake", "worker", "--config", str(bad)],
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"intake: {bad}: agent: Input tag 'shell' found using "
                                                  "'type' does not match any of the expected tags: 'demo', 'command'"]


def test_a_worker_must_serve_everything_on_its_queues(tmp_path: Path) -> None:
    from intake.core.errors import ConfigError
    from intake.core.policy import load_policy
    from intake.runtime import EXAMPLE_POLICY

    policy = load_policy(EXAMPLE_POLICY)
    partial = tmp_path / "w.toml"
    partial.write_text(
        'name = "w1"\nqueues = ["tier-standard"]\nagent = { type = "demo" }\n'
        '[[repos]]\nname = "acme/web"\nurl = "/srv/web.git"\nchange_types = ["docs"]\n'
    )
    with pytest.raises(ConfigError, match="carries tests work on acme/web"):
        load_worker_config(partial).check_covers(policy)


def test_sandbox_keys_and_agent_env() -> None:
    config = parse_worker_config({**BASE, "repos": [{**BASE["repos"][0], "network": "host",
                                                      "agent_env": {"ANTHROPIC_API_KEY": {"file": "/run/k"}}}]})
    assert config.sandbox == "bwrap" and config.agent_user == "intake-agent"
    assert config.repos[0].network == "host" and config.secret_files() == [Path("/run/k")]
    for bad, message in [({"sandbox": "docker"}, "sandbox: Input should be 'bwrap' or 'none'"),
                         ({"agent": {"type": "command", "argv": ["x"], "ro_paths": ["opt"]}}, "ro_paths must be absolute")]:
        with pytest.raises(ConfigError, match=message):
            parse_worker_config({**BASE, **bad})
    for name in ("PATH", "HOME", "INTAKE_TASK_ID"):
        with pytest.raises(ConfigError, match=f"agent_env: {name} is set by the worker"):
            parse_worker_config(with_repo(agent_env={name: {"env": "X"}}))
    with pytest.raises(ConfigError, match="network"):
        parse_worker_config(with_repo(network="internet"))
