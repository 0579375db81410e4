"""Worker settings: a TOML file naming the queues a worker listens on, the repos and change types
it serves (with each repo's clone URL and where its credential comes from), and the agent.

Credentials are never written in the file: a source is ``{ env = "VAR" }`` or ``{ file = "PATH" }``
and is read when a run needs it. A credential file must not be readable by group or others.
Every error is one line that names the file and the field (``repos[1].credential.env: …``).

The broker side (Redis, key prefix, the broker's public key, the audit key and the policy file)
comes from the usual ``INTAKE_*`` settings, not from this file.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from intake.core.errors import ConfigError
from intake.core.policy import Policy

from .agents import CommandAgent, DemoAgent, agent_from_config
from .sandbox import Sandbox

_QUEUE = r"^[a-z][a-z0-9_-]{0,63}$"  # policy queue names: a name, or "tier-" + a name
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_REPO = r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$"
_CHANGE_TYPE = r"^[a-z][a-z0-9_-]{0,39}$"
_RESERVED_ENV = frozenset({"PATH", "HOME", "TMPDIR"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CredentialSource(_Strict):
    """Where a secret comes from: an environment variable of the worker, or a file."""

    env: str | None = Field(None, pattern=_ENV_NAME)
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> CredentialSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' (a variable name) or 'file' (a path)")
        return self

    def describe(self) -> str:
        return f"env {self.env}" if self.env else f"file {self.file}"

    def read(self) -> str:
        """The secret, read now. Raises :class:`ConfigError` naming the source, never the value."""
        if self.env is not None:
            value = os.environ.get(self.env, "")
            if not value:
                raise ConfigError(f"credential: environment variable {self.env} is not set")
            return value
        assert self.file is not None
        try:
            info = self.file.stat()
            if stat.S_IMODE(info.st_mode) & 0o077:
                raise ConfigError(f"credential: {self.file} is readable by group or others (chmod 600 it)")
            value = self.file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise ConfigError(f"credential: no file at {self.file}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"credential: cannot read {self.file} ({type(exc).__name__})") from None
        if not value or "\n" in value:
            raise ConfigError(f"credential: {self.file} must hold exactly one line")
        return value


class DemoAgentConfig(_Strict):
    type: Literal["demo"]


class CommandAgentConfig(_Strict):
    type: Literal["command"]
    argv: tuple[Annotated[str, Field(min_length=1)], ...] = Field(min_length=1)
    # Directories the agent needs read-only inside the sandbox (its own install).
    ro_paths: tuple[Path, ...] = ()

    @model_validator(mode="after")
    def _absolute(self) -> CommandAgentConfig:
        if any(not p.is_absolute() for p in self.ro_paths):
            raise ValueError("ro_paths must be absolute paths")
        return self


AgentConfig = Annotated[DemoAgentConfig | CommandAgentConfig, Field(discriminator="type")]


class ForgeConfig(_Strict):
    """Optional pull-request creation through a GitHub-shaped REST API."""

    type: Literal["github"] = "github"
    api_url: str = "https://api.github.com"
    repository: str = Field(pattern=_REPO)
    token: CredentialSource

    @model_validator(mode="after")
    def _https(self) -> ForgeConfig:
        parts = urlsplit(self.api_url)
        local = parts.hostname in {"127.0.0.1", "localhost", "::1"}
        if parts.scheme != "https" and not (parts.scheme == "http" and local):
            raise ValueError("api_url must be https:// (plain http only for localhost)")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("api_url must not carry credentials, a query or a fragment")
        return self


class RepoConfig(_Strict):
    """One repository this worker serves."""

    name: str = Field(pattern=_REPO)
    url: str = Field(min_length=1, max_length=2000)
    change_types: tuple[Annotated[str, Field(pattern=_CHANGE_TYPE)], ...] = Field(min_length=1)
    # Used by git only (clone and push, through an askpass helper); never given to the agent.
    credential: CredentialSource | None = None
    username: str = Field("x-access-token", pattern=r"^[A-Za-z0-9_.@-]{1,100}$")
    ca_file: Path | None = None
    # Secrets meant for the agent (a model API key, a read-only token): variable name -> source.
    # They reach only the agent's environment and are redacted from its output. The push
    # credential never does, so the agent cannot push around the gates.
    agent_env: dict[Annotated[str, Field(pattern=_ENV_NAME)], CredentialSource] = Field(default_factory=dict)
    # "none": the agent gets the network the approved spec names (its egress allowlist, through
    # the filtering proxy; no allowlist: no network). "host": the host's whole network, an
    # explicit opt-out, warned at start and recorded on every run.
    network: Literal["none", "host"] = "none"
    forge: ForgeConfig | None = None

    @model_validator(mode="after")
    def _url(self) -> RepoConfig:
        if self.url.startswith("-") or any(ch.isspace() for ch in self.url):
            raise ValueError("url must not start with '-' or contain spaces")
        parts = urlsplit(self.url) if "://" in self.url else None
        if parts is not None and (parts.username or parts.password):
            raise ValueError("url must not embed credentials; use 'credential'")
        if self.credential is not None and (parts is None or parts.scheme != "https"):
            raise ValueError("a credential is only sent over https:// URLs")
        if parts is not None and parts.scheme == "ext":
            raise ValueError("ext:: URLs are not allowed")
        for name in self.agent_env:
            if name in _RESERVED_ENV or name.startswith("INTAKE_"):
                raise ValueError(f"agent_env: {name} is set by the worker and cannot be given")
        return self


class WorkerConfig(_Strict):
    """A validated worker configuration."""

    # The worker's identity towards the broker: its report key is issued for this name
    # (`intake worker-key issue NAME`).
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    queues: tuple[Annotated[str, Field(pattern=_QUEUE)], ...] = Field(min_length=1)
    # "bwrap": every agent and check runs under bubblewrap as agent_user. "none" is an explicit
    # opt-out (warned at start and recorded on every run).
    sandbox: Literal["bwrap", "none"] = "bwrap"
    agent_user: str = Field("intake-agent", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    agent: AgentConfig
    repos: tuple[RepoConfig, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> WorkerConfig:
        seen: set[str] = set()
        for repo in self.repos:
            if repo.name in seen:
                raise ValueError(f"repo {repo.name!r} is listed twice")
            seen.add(repo.name)
        return self

    def repo(self, name: str) -> RepoConfig | None:
        return next((r for r in self.repos if r.name == name), None)

    def serves(self, repo: str, change_type: str) -> bool:
        found = self.repo(repo)
        return found is not None and change_type in found.change_types

    def check_covers(self, policy: Policy) -> None:
        """Refuse a worker that listens on a queue carrying work it does not serve: it would
        take those tasks only to refuse them. Give such repos their own ``queue`` in the policy."""
        for repo in policy.repos:
            if policy.queue_for(repo) not in self.queues:
                continue
            for change_type in repo.change_types:
                if not self.serves(repo.name, change_type):
                    raise ConfigError(
                        f"worker config: queue {policy.queue_for(repo)!r} carries {change_type} work on "
                        f"{repo.name}, which this worker does not serve (serve it, or give the repo its "
                        "own queue in the policy)"
                    )

    def build_agent(self) -> CommandAgent | DemoAgent:
        data: dict[str, Any] = self.agent.model_dump(mode="json")
        for key in ("argv", "ro_paths"):
            if key in data:
                data[key] = list(data[key])
        return agent_from_config(data)

    def build_sandbox(self) -> Sandbox:
        """The sandbox agents and checks run in (network off; runs pick the repo's)."""
        return Sandbox(self.sandbox, self.agent_user)

    def credential_sources(self) -> list[tuple[str, CredentialSource]]:
        """Every credential source the config names, with the field it is in
        (``repos[0].credential``, ``repos[0].forge.token``, ``repos[0].agent_env.KEY``)."""
        found: list[tuple[str, CredentialSource]] = []
        for i, repo in enumerate(self.repos):
            if repo.credential is not None:
                found.append((f"repos[{i}].credential", repo.credential))
            if repo.forge is not None:
                found.append((f"repos[{i}].forge.token", repo.forge.token))
            found += [(f"repos[{i}].agent_env.{name}", source) for name, source in repo.agent_env.items()]
        return found

    def secret_files(self) -> list[Path]:
        """Every credential file the config names (they must stay out of the agent's reach)."""
        return [s.file for _, s in self.credential_sources() if s.file is not None]


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"demo", "command"}:
            continue  # pydantic's union tags are not fields
        else:
            out += f".{part}" if out else str(part)
    return out


def _resolve(base: Path, value: Any) -> Any:
    """Relative paths in the file are relative to the file, not to the working directory."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in {"file", "ca_file"} and isinstance(item, str):
                item = str((base / item).expanduser()) if not Path(item).expanduser().is_absolute() else item
            out[key] = _resolve(base, item)
        return out
    if isinstance(value, list):
        return [_resolve(base, item) for item in value]
    return value


def parse_worker_config(data: dict[str, Any], *, source: str = "worker config") -> WorkerConfig:
    try:
        return WorkerConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _loc(tuple(first["loc"])) or "config"
        message = re.sub(r"^(Value|Assertion) ?[Ee]rror,?\s*", "", first["msg"])
        raise ConfigError(f"{source}: {where}: {message}") from None


def load_worker_config(path: Path) -> WorkerConfig:
    """Read and validate a worker config file, or raise :class:`ConfigError` naming the field."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"--config: no worker config at {path}") from None
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    return parse_worker_config(_resolve(path.resolve().parent, data), source=str(path))
