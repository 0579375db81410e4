"""Settings: read once from the environment (prefix ``INTAKE_``, optional ``.env``), cast, validated.

Nothing reads the environment at import time; call :func:`load_settings` at start. A missing or
invalid value raises :class:`ConfigError` with one line that names the variable. Secrets are
``SecretStr`` so they never show in a repr or a log line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from intake.errors import ConfigError

ENV_PREFIX = "INTAKE_"


class Settings(BaseSettings):
    """Every knob of the broker. Key paths default to files under ``data_dir/keys``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Path(".intake")
    redis_url: SecretStr | None = None
    # The embedded Redis's AOF fsync policy (README: what each one risks on a crash).
    redis_appendfsync: Literal["always", "everysec", "no"] = "always"
    policy: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    key_prefix: str = "intake"
    max_text_bytes: int = Field(16 * 1024, ge=1, le=1024 * 1024)
    sweep_interval: float = Field(5.0, gt=0, le=3600)
    # Logging for serve and worker (intake/logs.py): one JSON object a line, or plain text.
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    outbox_retry_ms: int = Field(5000, ge=0, le=3_600_000)
    # Per-attempt dispatch tokens and running-attempt leases (DESIGN.md, Authority).
    dispatch_ttl: int = Field(120, ge=10, le=3600)
    lease_ttl: int = Field(15, ge=5, le=300)

    # The CLI's view of the broker: INTAKE_URL (unix:///path.sock or http://host:port; default
    # the data dir's socket, else http://127.0.0.1:8080) and INTAKE_TOKEN (an API token, TCP only).
    url: str | None = None
    token: SecretStr | None = None

    signing_key: Path | None = None
    public_key: Path | None = None
    audit_key: Path | None = None
    secrets_key: Path | None = None
    # An agent worker's own report key (issued by `intake worker-key issue NAME`); default
    # keys/workers/NAME.key in the data dir.
    worker_key: Path | None = None
    console_key: Path | None = None
    # Where people reach the web console; passkeys are bound to its origin and host (the RP id).
    # Browsers refuse an IP address as a WebAuthn RP id, hence localhost rather than 127.0.0.1.
    console_origin: str = "http://localhost:8080"

    # Slack uses its own well-known variable names, without our prefix.
    slack_signing_secret: SecretStr | None = Field(None, validation_alias="SLACK_SIGNING_SECRET")
    slack_bot_token: SecretStr | None = Field(None, validation_alias="SLACK_BOT_TOKEN")
    slack_app_token: SecretStr | None = Field(None, validation_alias="SLACK_APP_TOKEN")
    slack_api_url: str | None = Field(None, validation_alias="SLACK_API_URL")
    slack_max_body: int = Field(64 * 1024, ge=1024, le=4 * 1024 * 1024)
    # Slack Web API calls per second from the notifier (Slack allows ~1 message/s per channel
    # with short bursts; 429s are honoured on top).
    slack_rate: float = Field(5.0, gt=0, le=1000)

    @field_validator("key_prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", value):
            raise ValueError("must be 1-32 characters of a-z, 0-9, _ or -, starting with a letter")
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        return value.upper() if value.lower() in {"debug", "info", "warning", "error"} else value.lower()

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.match(
            r"(redis|rediss|unix)://", value.get_secret_value()
        ):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("console_origin")
    @classmethod
    def _origin_shape(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?", value):
            raise ValueError("must be an origin such as https://intake.example.com (scheme, host, optional port)")
        return value

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        keys = self.data_dir / "keys"
        self.policy = (self.policy or self.data_dir / "policy.toml").expanduser()
        self.signing_key = self.signing_key or keys / "broker_ed25519.pem"
        self.public_key = self.public_key or keys / "broker_ed25519.pub.pem"
        self.audit_key = self.audit_key or keys / "audit.key"
        self.secrets_key = self.secrets_key or keys / "secrets.key"
        self.console_key = self.console_key or keys / "console.key"
        return self

    # Typed accessors: the validator above guarantees these are set.
    @property
    def policy_path(self) -> Path:
        assert self.policy is not None
        return self.policy

    @property
    def keys(self) -> dict[str, Path]:
        """Key files by purpose (one secret per purpose)."""
        assert self.signing_key and self.public_key and self.audit_key and self.secrets_key
        assert self.console_key
        return {
            "signing": self.signing_key,
            "public": self.public_key,
            "audit": self.audit_key,
            "secrets": self.secrets_key,
            "console": self.console_key,
        }

    def worker_key_path(self, worker: str) -> Path:
        """Where worker ``worker``'s report key lives (INTAKE_WORKER_KEY overrides)."""
        return self.worker_key or self.data_dir / "keys" / "workers" / f"{worker}.key"


def _env_name(field: str) -> str:
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, str):
        return info.validation_alias
    return ENV_PREFIX + field.upper()


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment plus explicit overrides, or raise ConfigError."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        raise ConfigError(f"{_env_name(field)}: {first['msg']}") from None
