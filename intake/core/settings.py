"""Settings: read once from the environment (prefix ``INTAKE_``, optional ``.env``), cast, validated.

Nothing reads the environment at import time; call :func:`load_settings` at start. A missing or
invalid value raises :class:`ConfigError` with one line that names the variable. Secrets are
``SecretStr`` so they never show in a repr or a log line.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from intake.core.errors import ConfigError
from intake.core.redis_url import parse_sentinel_url

ENV_PREFIX = "INTAKE_"


class Settings(BaseSettings):
    """Every knob of the broker. Key paths default to files under ``data_dir/keys``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Path(".intake")
    redis_url: SecretStr | None = None
    # TLS to a configured rediss:// Redis: the CA that signed its certificate, and a client
    # certificate and key when the server asks for one.
    redis_ca_file: Path | None = None
    redis_cert_file: Path | None = None
    redis_key_file: Path | None = None
    # The embedded Redis's AOF fsync policy (README: what each one risks on a crash).
    redis_appendfsync: Literal["always", "everysec", "no"] = "always"
    policy: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # /metrics is served on a listener of its own, never on the public API port: on only when
    # metrics_port is set, loopback unless metrics_host says otherwise (a Prometheus in the
    # same pod or host scrapes it; anything wider is a network-policy decision).
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    key_prefix: str = "intake"
    max_text_bytes: int = Field(16 * 1024, ge=1, le=1024 * 1024)
    sweep_interval: float = Field(5.0, gt=0, le=3600)
    # An edge serve (`intake serve --edge`) only answers requests: it captures and reads, and
    # leaves sealing, worker reports, dispatch, sweeps and the Slack outbox to the full serves
    # on the same Redis, so none of that shares a core with its requests.
    edge: bool = False
    # How many processes an edge serve runs on its port (`intake serve --edge --processes N`):
    # each its own event loop on its own SO_REUSEPORT socket, the kernel spreading connections
    # over them. Only edges: they keep no per-process state a request depends on.
    edge_processes: int = Field(1, ge=1, le=64)
    # The outbox (README, "Delivery guarantees"): first retry after outbox_retry_ms, doubling with
    # full jitter up to outbox_retry_cap seconds; an event is given up (audited) only once it is
    # outbox_max_age seconds old; a delivery (and a card reservation) is one consumer's for
    # outbox_lease seconds, and consumers idle for two leases are removed.
    outbox_retry_ms: int = Field(5000, ge=1, le=3_600_000)
    outbox_retry_cap: float = Field(300.0, gt=0, le=86400)
    outbox_max_age: float = Field(86400.0, gt=0, le=30 * 86400)
    outbox_lease: float = Field(60.0, ge=0.3, le=3600)
    # Logging for serve and worker (intake/core/logs.py): one JSON object a line, or plain text.
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
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
    # Where this host records the newest sealed audit head it saw (a rollback detector, per
    # host). Writable state, so it lives in the data dir even when the keys are mounted read-only.
    audit_checkpoint: Path | None = None
    # Sealed audit entries older than audit_hot seconds move out of Redis into segment files in
    # audit_archive (default $INTAKE_DATA_DIR/audit-archive); see intake/audit/archive.py.
    audit_hot: float = Field(30 * 86400.0, gt=0)
    audit_archive: Path | None = None
    # Where people reach the web console; passkeys are bound to its origin and host (the RP id).
    # Browsers refuse an IP address as a WebAuthn RP id, hence localhost rather than 127.0.0.1.
    console_origin: str = "http://localhost:8080"
    # Single sign-on for the console (OpenID Connect, code flow with PKCE; intake/console/sso.py):
    # on when all three are set. SSO names the person; power still needs a fresh step-up.
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: SecretStr | None = None

    # Slack uses its own well-known variable names, without our prefix.
    slack_signing_secret: SecretStr | None = Field(None, validation_alias="SLACK_SIGNING_SECRET")
    slack_bot_token: SecretStr | None = Field(None, validation_alias="SLACK_BOT_TOKEN")
    slack_app_token: SecretStr | None = Field(None, validation_alias="SLACK_APP_TOKEN")
    slack_api_url: str | None = Field(None, validation_alias="SLACK_API_URL")
    slack_max_body: int = Field(64 * 1024, ge=1024, le=4 * 1024 * 1024)
    # Slack Web API calls per second from the notifier (Slack allows ~1 message/s per channel
    # with short bursts; 429s are honoured on top).
    slack_rate: float = Field(5.0, gt=0, le=1000)

    # The email channel (intake.channels.email): an SMTP listener, on only when smtp_port is set.
    smtp_port: int | None = Field(None, ge=0, le=65535)
    smtp_host: str = "127.0.0.1"
    smtp_cert: Path | None = None  # STARTTLS when both cert and key are set
    smtp_key: Path | None = None
    smtp_max_bytes: int = Field(25 * 1024 * 1024, ge=1024, le=200 * 1024 * 1024)
    smtp_recipients: str = ""  # comma-separated allowlist, e.g. intake@example.com
    smtp_trusted_authserv: str = ""  # comma-separated authserv-ids whose Authentication-Results count
    # ... and only on connections from these addresses/networks (the MTA that wrote them): a
    # client connecting directly could write the same header itself.
    smtp_trusted_peers: str = ""
    # Domains whose ARC seal (ARC-Seal d=) makes an ARC set's results count; empty: ARC never does.
    smtp_arc_sealers: str = ""
    smtp_relay: str | None = None  # host:port of the relay that carries replies

    @field_validator("smtp_recipients", "smtp_trusted_authserv", "smtp_arc_sealers")
    @classmethod
    def _comma_list(cls, value: str) -> str:
        items = [v.strip().lower() for v in value.split(",") if v.strip()]
        if any(not re.fullmatch(r"[a-z0-9._%+@-]{1,254}", v) for v in items):
            raise ValueError("must be a comma-separated list of addresses or host names")
        return ",".join(items)

    @field_validator("smtp_trusted_peers")
    @classmethod
    def _networks(cls, value: str) -> str:
        items = [v.strip() for v in value.split(",") if v.strip()]
        try:
            return ",".join(str(ipaddress.ip_network(v, strict=False)) for v in items)
        except ValueError:
            raise ValueError("must be a comma-separated list of IP addresses or networks (e.g. 10.0.0.5,10.1.0.0/16)") from None

    @field_validator("smtp_relay")
    @classmethod
    def _relay_shape(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9.-]{1,253}:[0-9]{1,5}", value):
            raise ValueError("must be host:port, e.g. smtp.example.com:25")
        return value

    @model_validator(mode="after")
    def _smtp_complete(self) -> Settings:
        if self.smtp_port is not None and not self.smtp_recipients:
            raise ConfigError("INTAKE_SMTP_RECIPIENTS: required when INTAKE_SMTP_PORT is set")
        if self.smtp_trusted_authserv and not self.smtp_trusted_peers:
            raise ConfigError("INTAKE_SMTP_TRUSTED_PEERS: required with INTAKE_SMTP_TRUSTED_AUTHSERV (the addresses "
                              "of the MTA whose Authentication-Results are believed)")
        if (self.smtp_cert is None) != (self.smtp_key is None):
            raise ConfigError("INTAKE_SMTP_CERT and INTAKE_SMTP_KEY: set both for STARTTLS, or neither")
        return self

    # Ticket webhooks (README: Channels): each is on when its secret is set. The API URL and
    # token are only for the reply with the idea id; without a token no reply is sent.
    webhook_max_body: int = Field(1024 * 1024, ge=1024, le=25 * 1024 * 1024)
    github_webhook_secret: SecretStr | None = None
    github_label: str = ""  # capture issues when given this label (default: every opened issue)
    github_api_url: str = "https://api.github.com"
    github_token: SecretStr | None = None
    gitlab_webhook_token: SecretStr | None = None
    gitlab_signing_token: SecretStr | None = None
    gitlab_api_url: str = "https://gitlab.com"
    gitlab_token: SecretStr | None = None
    jira_webhook_secret: SecretStr | None = None
    jira_api_url: str | None = None
    jira_user: str | None = None  # Jira Cloud: the e-mail the API token belongs to
    jira_token: SecretStr | None = None

    @field_validator("github_webhook_secret", "gitlab_webhook_token", "jira_webhook_secret")
    @classmethod
    def _webhook_secret_strength(cls, value: SecretStr | None) -> SecretStr | None:
        # A short or empty secret would let anyone forge deliveries: refuse it at start.
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        return value

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
        if value is None:
            return value
        url = value.get_secret_value()
        if not re.match(r"(redis|rediss|unix|redis\+sentinel)://", url):
            raise ValueError("must start with redis://, rediss://, unix:// or redis+sentinel://")
        parse_sentinel_url(url)  # ValueError names the expected shape
        return value

    @field_validator("oidc_issuer")
    @classmethod
    def _issuer_shape(cls, value: str | None) -> str | None:
        # https, or http on the loopback only (a provider on the same host, as in the tests).
        if value is not None and not re.fullmatch(
                r"(https://[A-Za-z0-9.-]{1,253}|http://(127\.0\.0\.1|localhost|\[::1\]))(:[0-9]{1,5})?"
                r"(/[A-Za-z0-9._~%/-]{0,200})?", value):
            raise ValueError("must be the provider's issuer URL: https://…, or http:// on 127.0.0.1/localhost")
        return value

    @model_validator(mode="after")
    def _oidc_complete(self) -> Settings:
        given = [self.oidc_issuer is not None, self.oidc_client_id is not None, self.oidc_client_secret is not None]
        if any(given) and not all(given):
            raise ValueError("INTAKE_OIDC_ISSUER, INTAKE_OIDC_CLIENT_ID and INTAKE_OIDC_CLIENT_SECRET go together")
        return self

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
        self.audit_checkpoint = self.audit_checkpoint or keys / "audit.checkpoint"
        self.audit_archive = self.audit_archive or self.data_dir / "audit-archive"
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
    """Build settings from the environment plus explicit overrides, or raise ConfigError.

    ``INTAKE_SECRETS_DIR`` names a directory of secret files, one per setting, named like the
    variable in lower case (``intake_redis_url``, ``slack_bot_token``): how containers and
    systemd's ``LoadCredential=`` hand over secrets without putting them in the environment."""
    secrets_dir = os.environ.get("INTAKE_SECRETS_DIR")
    if secrets_dir and "_secrets_dir" not in overrides:
        if not Path(secrets_dir).is_dir():
            raise ConfigError(f"INTAKE_SECRETS_DIR: {secrets_dir} is not a directory")
        overrides["_secrets_dir"] = secrets_dir
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a rule across fields: its message names them
            raise ConfigError(str(first["msg"]).removeprefix("Value error, ")) from None
        raise ConfigError(f"{_env_name(str(first['loc'][0]))}: {first['msg']}") from None
