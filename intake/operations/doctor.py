"""``intake doctor``: check a deployment the way an operator would, one line per finding.

Each check returns :class:`Finding`\\ s: ``ok``, ``warning`` (could not be verified, or works
with less protection) or ``problem`` (something that loses data, leaks a secret or stops work).
``intake doctor`` exits non-zero when there is any problem. It only reads: run in an empty
directory it creates nothing (no data dir, no Redis, no password file). What is checked:

- settings: every ``INTAKE_*`` / ``SLACK_*`` value parses (:func:`intake.core.settings.load_settings`);
- key files: present; private ones (signing, audit, secrets, console, worker keys, Redis
  passwords) readable by their owner only; the public keyring and the audit checkpoint not
  writable by group or others (whoever rewrites them can make workers trust another key or
  hide a rollback);
- Redis (INTAKE_REDIS_URL, or the data dir's embedded server if it is running): reachable, version (6.2+, 7+ for ACL selectors), connected as its own ACL user (not
  ``default``, unable to manage ACLs), the intake users present when they can be listed, AOF on,
  ``appendfsync`` as intended, and ``maxmemory-policy noeviction`` (any ``allkeys-*`` or
  ``volatile-*`` policy may evict ledger state and queued work);
- the policy file validates;
- Slack: with a bot token, ``auth.test`` accepts it (at ``SLACK_API_URL`` when set), and the
  signing secret or app token its mode needs is set;
- worker configs (``--worker-config FILE``): valid, covering their queues, agent program
  present and executable, credentials resolvable, report key usable
  (:mod:`intake.workers.preflight`);
- credential ages (:func:`check_credentials`): every credential past the policy's
  ``[credentials]`` maximum age is a warning. The ages come from the sealed audit log, which
  ``intake doctor`` reads only through a broker that is running (``GET /api/v1/report``): the
  doctor opens and starts nothing for it, and says so when no broker answers.

No finding ever holds a secret value: they name variables and files.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import redis

from intake.core.errors import ConfigError, IntakeError
from intake.core.settings import Settings, load_settings
from intake.operations.indicators.credentials import CredentialFigures

Status = Literal["ok", "warning", "problem"]
MIN_REDIS = (6, 2)
SELECTORS_REDIS = (7, 0)


@dataclass(frozen=True)
class Finding:
    """One result: which check, how it went, and a one-line message for a person."""

    check: str
    status: Status
    message: str

    def as_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "message": self.message}


def ok(check: str, message: str) -> Finding:
    return Finding(check, "ok", message)


def warning(check: str, message: str) -> Finding:
    return Finding(check, "warning", message)


def problem(check: str, message: str) -> Finding:
    return Finding(check, "problem", message)


# -- key files ---------------------------------------------------------------------------------
def _private(check: str, path: Path, what: str) -> Finding:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return problem(check, f"{what}: no file at {path} (run `intake keys generate`)")
    if mode & 0o037:
        return problem(check, f"{what}: {path} is readable by others or writable by group (mode {mode:04o}; "
                              "chmod 600 it)")
    if mode & 0o040:
        # Kubernetes Secret volumes (defaultMode 0440 with the pod's fsGroup) and systemd
        # credentials can only be group-readable: fine when that group is the service's own.
        return warning(check, f"{what}: {path} is group-readable (mode {mode:04o}): make sure the group is "
                              "this service's alone")
    return ok(check, f"{what}: {path} (mode {mode:04o})")


def _not_writable(check: str, path: Path, what: str, *, required: bool) -> Finding | None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return problem(check, f"{what}: no file at {path} (run `intake keys generate`)") if required else None
    if mode & 0o022:
        return problem(check, f"{what}: {path} is writable by group or others (mode {mode:04o}; chmod 644 it)")
    return ok(check, f"{what}: {path} (mode {mode:04o})")


def check_keys(settings: Settings) -> list[Finding]:
    """Key files present, private ones owner-only, integrity files not writable by others."""
    keys = settings.keys
    found = [_private("keys", keys[p], f"{p} key") for p in ("signing", "audit", "secrets", "console")]
    keydir = keys["audit"].parent
    extra = sorted(keydir.glob("redis-*.pass")) + sorted((keydir / "workers").glob("*.key"))
    if settings.worker_key is not None:
        extra.append(settings.worker_key)
    found += [_private("keys", path, path.name) for path in dict.fromkeys(extra)]
    secrets_dir = os.environ.get("INTAKE_SECRETS_DIR")
    if secrets_dir:  # the files settings were read from (INTAKE_SECRETS_DIR): as private as keys
        found += [_private("keys", path, f"secret file {path.name}") for path in sorted(Path(secrets_dir).iterdir())
                  if path.is_file() and not path.name.startswith(".")]
    for path, what, required in ((keys["public"], "public keyring", True),
                                 (keydir / "audit.checkpoint", "audit checkpoint", False)):
        finding = _not_writable("keys", path, what, required=required)
        if finding is not None:
            found.append(finding)
    return found


# -- Redis -------------------------------------------------------------------------------------
def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def _optional(client: redis.Redis, *args: str) -> Any:
    """A command the connection's ACL user may not be allowed: None when refused."""
    try:
        return client.execute_command(*args)
    except redis.ResponseError:
        return None


def check_redis_server(client: redis.Redis, *, prefix: str, appendfsync: str, username: str | None = None,
                       conf: Path | None = None) -> list[Finding]:
    """Everything about one Redis connection (the broker's), from INFO and what its user may ask
    (``username``: the URL's, when the server will not say who we are; ``conf``: the embedded
    server's redis.conf, for what its ACL users may not read)."""
    c = "redis"
    try:
        server = client.info("server")
    except redis.ResponseError:
        return [warning(c, "INFO is not allowed for this user; version, persistence and eviction unchecked")]
    version = str(server.get("redis_version", "?"))
    found = []
    if _version(version) < MIN_REDIS:
        found.append(problem(c, f"version {version}: intake needs Redis 6.2+ (7+ for ACL selectors)"))
    elif _version(version) < SELECTORS_REDIS:
        found.append(warning(c, f"version {version}: no ACL selectors before 7.0, so each worker user may "
                                "also overwrite or delete its own leases, delete its own report stream "
                                "(never another worker's) and set or clear RQ's rq:suspended flag, "
                                "pausing every RQ worker (README: Redis users)"))
    else:
        found.append(ok(c, f"version {version}"))

    user = _optional(client, "ACL", "WHOAMI") or username or "default"
    if user == "default":
        found.append(problem(c, "connected as the default user: give the broker its own ACL user "
                                f"({prefix}-broker; `intake redis acl`) and turn default off"))
    users = _optional(client, "ACL", "USERS")
    if users is not None:
        found.append(problem(c, f"user {user} may manage ACL users: the broker's user should not "
                                "(`intake redis acl`)"))
        missing = [u for u in (f"{prefix}-broker", f"{prefix}-worker", f"{prefix}-readonly") if u not in users]
        if missing:
            found.append(problem(c, f"ACL users missing: {', '.join(missing)} (`intake redis acl`)"))
    elif user != "default":
        found.append(ok(c, f"connected as ACL user {user}"))

    persistence = client.info("persistence")
    if str(persistence.get("aof_enabled")) != "1":
        found.append(problem(c, "AOF is off: acknowledged captures, approvals and audit events are lost "
                                "on a restart (appendonly yes)"))
    else:
        found.append(ok(c, "AOF on"))
    fsync = _optional(client, "CONFIG", "GET", "appendfsync")
    if not fsync and conf is not None and conf.exists():
        fsync = [line.split() for line in conf.read_text().splitlines() if line.startswith("appendfsync ")][-1:]
        fsync = fsync[0] if fsync else None
    if not fsync:
        found.append(warning(c, f"appendfsync: cannot be read by this user (no CONFIG); make sure it is "
                                f"{appendfsync} on the server"))
    else:
        actual = fsync[1] if isinstance(fsync, list) else dict(fsync).get("appendfsync")
        if actual != appendfsync:
            found.append(problem(c, f"appendfsync is {actual}, intended {appendfsync}: a crash can lose "
                                    "acknowledged writes (README: INTAKE_REDIS_APPENDFSYNC)"))
        else:
            found.append(ok(c, f"appendfsync {actual}"))

    policy = str(client.info("memory").get("maxmemory_policy", "?"))
    if policy != "noeviction":
        found.append(problem(c, f"maxmemory-policy is {policy}: Redis may evict intake's keys (ledger "
                                "state, nonces, queued work); set maxmemory-policy noeviction"))
    else:
        found.append(ok(c, "maxmemory-policy noeviction"))
    return found


def check_redis(settings: Settings) -> list[Finding]:
    """Connect as the broker and check the server. With no INTAKE_REDIS_URL, only an embedded
    server that is already running is inspected: doctor never starts one or writes its files."""
    from intake.core.redis_conn import EmbeddedRedis, make_client, with_tls_files

    expected = settings.redis_appendfsync if settings.redis_url is None else "always"
    try:
        if settings.redis_url is not None:
            url = with_tls_files(settings.redis_url.get_secret_value(), settings)
        else:
            embedded = EmbeddedRedis(settings.data_dir, prefix=settings.key_prefix,
                                     appendfsync=settings.redis_appendfsync)
            running = embedded.running_url("broker")
            if running is None:
                return [warning("redis", f"no embedded Redis running at {embedded.sock} (doctor starts none: "
                                         "check again while `intake serve` runs, or set INTAKE_REDIS_URL)")]
            url = running
        client = make_client(url)
        try:
            client.ping()
            return check_redis_server(client, prefix=settings.key_prefix, appendfsync=expected,
                                      username=urlsplit(url).username,
                                      conf=None if settings.redis_url else settings.data_dir / "redis" / "redis.conf")
        finally:
            client.close()
    except IntakeError as exc:
        return [problem("redis", str(exc))]
    except redis.RedisError as exc:
        return [problem("redis", f"cannot reach Redis ({type(exc).__name__}; INTAKE_REDIS_URL)")]


# -- policy and Slack --------------------------------------------------------------------------
def check_policy(settings: Settings) -> list[Finding]:
    from intake.core.policy import load_policy

    try:
        loaded = load_policy(settings.policy_path)
    except IntakeError as exc:
        return [problem("policy", f"{settings.policy_path}: {exc}")]
    return [ok("policy", f"{settings.policy_path}: {len(loaded.repos)} repos, version {loaded.version_hash[:12]}")]


def check_slack(settings: Settings) -> list[Finding]:
    """With a bot token: ``auth.test`` must accept it, and its mode's other secret must be set."""
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    c = "slack"
    token = settings.slack_bot_token.get_secret_value() if settings.slack_bot_token else ""
    if not token:
        if settings.slack_signing_secret or settings.slack_app_token:
            return [problem(c, "SLACK_SIGNING_SECRET or SLACK_APP_TOKEN is set but SLACK_BOT_TOKEN is not")]
        return [ok(c, "off (no SLACK_BOT_TOKEN)")]
    found = []
    if not settings.slack_signing_secret and not settings.slack_app_token:
        found.append(problem(c, "SLACK_BOT_TOKEN is set but neither SLACK_SIGNING_SECRET (HTTP) nor "
                                "SLACK_APP_TOKEN (Socket Mode)"))
    if settings.slack_app_token and not settings.slack_app_token.get_secret_value().startswith("xapp-"):
        found.append(problem(c, "SLACK_APP_TOKEN is not an app-level token (xapp-…)"))
    kwargs = {"base_url": settings.slack_api_url} if settings.slack_api_url else {}
    client = WebClient(token=token, timeout=10, **kwargs)
    try:
        answer = client.auth_test()
    except SlackApiError as exc:
        error = exc.response.get("error", "error") if exc.response is not None else "error"
        found.append(problem(c, f"auth.test refused SLACK_BOT_TOKEN ({error})"))
    except OSError as exc:
        found.append(problem(c, f"cannot reach Slack at {client.base_url} ({type(exc).__name__})"))
    else:
        found.append(ok(c, f"auth.test ok: bot {answer.get('user_id')} in team {answer.get('team')} "
                           f"({answer.get('team_id')})"))
    return found


# -- worker configs ----------------------------------------------------------------------------
def check_worker_config(settings: Settings, path: Path) -> list[Finding]:
    from intake.core.policy import load_policy
    from intake.workers.config import load_worker_config
    from intake.workers.preflight import worker_problems

    c = f"worker {path}"
    try:
        config = load_worker_config(path)
    except ConfigError as exc:
        return [problem(c, str(exc))]
    found = [problem(c, p) for p in worker_problems(settings, config)]
    try:
        config.check_covers(load_policy(settings.policy_path))
    except ConfigError as exc:
        found.append(problem(c, str(exc)))
    except IntakeError:
        pass  # an invalid policy is the policy check's finding
    return found or [ok(c, f"worker {config.name}: agent, credentials and report key ready")]


# -- credentials -------------------------------------------------------------------------------
def check_credentials(figures: CredentialFigures) -> list[Finding]:
    """A warning per credential past its maximum age (names and ids only, never a secret)."""
    from intake.text.html import duration

    late = [c for c in figures.credentials if c.overdue]
    found = [warning("credentials", f"{c.kind} {c.name}: {duration(c.age or 0)} old, past the policy's maximum of "
                                    f"{duration(c.max_age)} (rotate it)") for c in late]
    return found or [ok("credentials", f"{len(figures.credentials)} credentials, none past its maximum age")]


# -- all ---------------------------------------------------------------------------------------
def run_doctor(worker_configs: Sequence[Path] = (), *, settings: Settings | None = None) -> list[Finding]:
    """Every check, in order. Settings are loaded here unless given; when they do not parse,
    that is the only finding (every other check needs them)."""
    if settings is None:
        try:
            settings = load_settings()
        except ConfigError as exc:
            return [problem("settings", str(exc))]
    found = [ok("settings", f"data dir {settings.data_dir}")]
    # Read-only throughout: nothing here creates the data dir, a key, a password file or a Redis.
    for check in (check_redis, check_keys, check_policy, check_slack):
        found += check(settings)
    for path in worker_configs:
        found += check_worker_config(settings, path)
    return found


def problems(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.status == "problem"]
