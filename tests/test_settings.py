"""Settings from files: secrets handed over as files (containers, systemd credentials), and
writable state that stays in the data dir when keys are mounted read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from intake.core.errors import ConfigError
from intake.core.settings import load_settings


def test_secrets_come_from_files_in_intake_secrets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = tmp_path / "run-secrets"
    secrets.mkdir()
    (secrets / "intake_redis_url").write_text("redis://intake-broker:pw-from-file@redis:6379/0\n")
    (secrets / "slack_bot_token").write_text("xoxb-from-file\n")
    monkeypatch.setenv("INTAKE_SECRETS_DIR", str(secrets))
    settings = load_settings(_env_file=None, data_dir=tmp_path / "d")
    assert settings.redis_url is not None and settings.slack_bot_token is not None
    assert settings.redis_url.get_secret_value() == "redis://intake-broker:pw-from-file@redis:6379/0"
    assert settings.slack_bot_token.get_secret_value() == "xoxb-from-file"
    assert "pw-from-file" not in repr(settings)
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-from-env")  # the environment still wins
    assert load_settings(_env_file=None).slack_bot_token.get_secret_value() == "xoxb-from-env"  # type: ignore[union-attr]


def test_a_missing_secrets_dir_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTAKE_SECRETS_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"^INTAKE_SECRETS_DIR: .* is not a directory$"):
        load_settings(_env_file=None)


def test_the_audit_checkpoint_stays_in_the_data_dir_when_keys_live_elsewhere(tmp_path: Path) -> None:
    default = load_settings(_env_file=None, data_dir=tmp_path / "d")
    assert default.audit_checkpoint == tmp_path / "d" / "keys" / "audit.checkpoint"  # as before
    mounted = load_settings(_env_file=None, data_dir=tmp_path / "d", audit_key=Path("/run/secrets/audit_key"))
    assert mounted.audit_checkpoint == tmp_path / "d" / "keys" / "audit.checkpoint"
