"""Policy as code: a TOML file that says which repos and change types agents may touch, how many
approvers each risk tier needs and from which groups, who is in each group, who the admins are, the Slack approvals
channel, the three clocks, escalation and the dependency policy.

The policy file is the authority on group membership (Redis is storage, not authority). Its
version hash, a SHA-256 over the canonical JSON of the parsed policy, is frozen into every task
spec, so a policy change makes every spec new.
"""

from __future__ import annotations

import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from intake.core.errors import PolicyError
from intake.core.licenses import license_key, parse_license
from intake.core.models import canonical_json, sha256_hex
from intake.core.paths import glob_match, validate_pattern
from intake.core.versions import parse_package, parse_pinned, validate_specifier

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d{1,6})([smhd])$")


def parse_duration(value: Any) -> int:
    """``"90s"``, ``"30m"``, ``"72h"``, ``"2d"`` (or a whole number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as '30m', '72h' or '2d'")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and (m := _DURATION.match(value.strip())):
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("must be a duration such as '30m', '72h' or '2d'")
    if seconds <= 0:
        raise ValueError("must be longer than zero")
    return seconds


Duration = Annotated[int, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,39}$")]


def _glob(value: str) -> str:
    if not value or len(value) > 200 or any(c.isspace() for c in value):
        raise ValueError("must be a non-empty path glob without spaces")
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError("must be relative to the repo root, without '..'")
    # The gates' own pattern compiler: a pattern the worker would refuse never gets approved.
    validate_pattern(value)
    return value


Glob = Annotated[str, AfterValidator(_glob)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Clocks(_Strict):
    idea_ttl: Duration
    approval_validity: Duration
    run_timeout: Duration


class Escalation(_Strict):
    after: Duration
    group: Name


def _package(value: str) -> str:
    return str(parse_package(value))


def _pinned(value: str) -> str:
    package, version = parse_pinned(value)
    return f"{package}@{version}" if version else str(package)


def _spdx_id(value: str) -> str:
    license_key(value)
    return value


def _spdx_expression(value: str) -> str:
    parse_license(value)
    return value


def _entry(value: Any) -> Any:
    return {"package": value} if isinstance(value, str) else value


class AllowedDependency(_Strict):
    """An allowlist entry: ``"pypi:pytest"``, or a table with a ``version`` specifier of the
    ecosystem (PEP 440, npm range, or comparators for go/cargo; see intake/core/versions.py)
    and the package's SPDX ``license`` where its lockfile does not say."""

    package: Annotated[str, AfterValidator(_package)]
    version: str | None = None
    license: Annotated[str, AfterValidator(_spdx_expression)] | None = None

    @model_validator(mode="after")
    def _specifier(self) -> AllowedDependency:
        if self.version is not None:
            validate_specifier(self.package.partition(":")[0], self.version)
        return self


class DeniedDependency(_Strict):
    """A denylist entry: a package (``"npm:event-stream"``) or one exact version of it
    (``"npm:axios@1.14.1"``). The denylist beats every allowlist entry."""

    package: Annotated[str, AfterValidator(_pinned)]


class LicensePolicy(_Strict):
    """SPDX ids: ``denied`` always blocks; ``allowed``, when set, is the only ones that pass; an
    unknown or unparseable license blocks unless ``unknown = "allow"``."""

    allowed: tuple[Annotated[str, AfterValidator(_spdx_id)], ...] = ()
    denied: tuple[Annotated[str, AfterValidator(_spdx_id)], ...] = ()
    unknown: Literal["allow", "block"] = "block"


class Dependencies(_Strict):
    """What an agent's ``dependency-bump`` may add or bump (see workers/deps/gate.py)."""

    allow: tuple[Annotated[AllowedDependency, BeforeValidator(_entry)], ...] = ()
    deny: tuple[Annotated[DeniedDependency, BeforeValidator(_entry)], ...] = ()
    licenses: LicensePolicy = LicensePolicy()
    require_integrity: bool = False


#: Kinds of credential the report tracks (``[credentials.<kind>]``): keys and factors intake
#: issues or holds, and ``external`` ones it does not issue (Slack, forge tokens), whose
#: rotations an operator declares (``intake credentials rotated NAME``).
CREDENTIAL_KINDS = ("signing_key", "audit_key", "secrets_key", "worker_key", "api_token", "factor", "external")


class CredentialKind(_Strict):
    max_age: Duration


class Credentials(_Strict):
    """How old a credential may grow before the report and ``intake doctor`` flag it:
    ``max_age`` for every kind, ``[credentials.<kind>] max_age`` for one kind."""

    max_age: Duration = 90 * 86400
    signing_key: CredentialKind | None = None
    audit_key: CredentialKind | None = None
    secrets_key: CredentialKind | None = None
    worker_key: CredentialKind | None = None
    api_token: CredentialKind | None = None
    factor: CredentialKind | None = None
    external: CredentialKind | None = None

    def max_age_of(self, kind: str) -> int:
        own = getattr(self, kind, None) if kind in CREDENTIAL_KINDS else None
        return own.max_age if isinstance(own, CredentialKind) else self.max_age

    def max_ages(self) -> dict[str, int]:
        return {kind: self.max_age_of(kind) for kind in CREDENTIAL_KINDS}


class ChangeType(_Strict):
    """A kind of change and the paths it may touch (globs, as the gates match them). A task's
    effective scope is these paths intersected with its repo's allowed and blocked paths; build
    and dependency files are further limited to ``dependency-bump`` (see workers/gates.py)."""

    description: str = ""
    paths: tuple[Glob, ...] = Field(min_length=1)


class ApprovalRule(_Strict):
    """How many distinct approvers, from which groups, with at least ``require[g]`` from g."""

    approvals: int = Field(ge=1, le=10)
    groups: tuple[Name, ...] = Field(min_length=1)
    require: dict[Name, int] = Field(default_factory=dict)


class ResultApprovalRule(ApprovalRule):
    """``result_approvals``: the rule for approving a run's result, and how long such an
    approval counts (``validity``; default: ``clocks.approval_validity``). An approval older
    than that no longer counts towards delivery (issue 19)."""

    validity: Duration | None = None


class RiskTier(ApprovalRule):
    """A tier's rule for approving the spec, and optionally (``result_approvals``) for approving
    the result: the quarantined commit, before it may become a branch."""

    retries: int = Field(0, ge=0, le=3)
    # "passkey": every approval of this tier's work needs a passkey assertion, not a TOTP code.
    step_up: Literal["any", "passkey"] = "any"
    result_approvals: ResultApprovalRule | None = None

    def result_rule(self, touches_privileged: bool) -> ResultApprovalRule | None:
        """The rule a result must meet before delivery, or None to deliver automatically. A
        change to a repo's privileged paths needs one whatever the tier: the tier's own
        ``result_approvals``, else one approval from the tier's groups."""
        if self.result_approvals is not None:
            return self.result_approvals
        if touches_privileged:
            return ResultApprovalRule(approvals=1, groups=self.groups)
        return None


class EmailChannel(_Strict):
    """``[channels.email]``: what to do with mail whose sender is not DKIM-aligned (or vouched
    for by a trusted authserv-id): capture it flagged as unverified, or refuse it at DATA."""

    unverified: Literal["flag", "refuse"] = "refuse"


class Channels(_Strict):
    email: EmailChannel = EmailChannel()


class Identities(_Strict):
    """``[identities]``: how identities are compared. ``email_subaddress_domains`` lists the mail
    domains whose system delivers ``local+tag@domain`` to ``local@domain``; for those, a
    ``+tag`` is stripped before an address is matched to a person (the local part is compared
    case-insensitively everywhere)."""

    email_subaddress_domains: tuple[Annotated[str, Field(pattern=r"^[a-z0-9-]{1,63}(\.[a-z0-9-]{1,63})+$")], ...] = ()


class Group(_Strict):
    members: tuple[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,39}$")], ...] = Field(min_length=1)


class Admins(_Strict):
    """Person ids who may enrol approvers, manage people and API tokens, and freeze or thaw."""

    members: tuple[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,39}$")], ...] = ()


class Limits(_Strict):
    """What one run may use: output (captured), disk (work tree, HOME and /tmp together) and
    processes (of the agent user). Passing any of them stops the run as blocked."""

    max_output_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_disk_bytes: int = Field(1024 * 1024 * 1024, ge=1024 * 1024, le=1024 ** 4)
    max_processes: int = Field(256, ge=8, le=65536)


_EGRESS_HOST = r"(?:\*\.)?[a-z0-9](?:[a-z0-9.-]{0,252})|\[[0-9a-f:.]+\]"
#: An egress allowlist entry: ``host:port``, ``*.suffix:port`` or a literal address and port.
EgressEntry = Annotated[str, Field(pattern=rf"^(?:{_EGRESS_HOST}):[0-9]{{1,5}}$", max_length=270)]


class Check(_Strict):
    """A required check: a program run on the agent's result, in the sandbox, network off.
    A failing or timed-out check blocks the task."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9/._-]{0,63}$")
    # From the policy, never from an idea. A relative path with a slash would resolve inside
    # the produced tree, i.e. to a file the agent wrote.
    argv: tuple[Annotated[str, Field(min_length=1)], ...] = Field(min_length=1)
    timeout: Duration

    @model_validator(mode="after")
    def _program(self) -> Check:
        program = self.argv[0]
        if "/" in program and not program.startswith("/"):
            raise ValueError("argv[0] must be an absolute path or a bare program name")
        if not 1 <= self.timeout <= 24 * 3600:
            raise ValueError("timeout must be between 1s and 24h")
        return self


class Repo(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
    tier: Name
    change_types: tuple[Name, ...] = Field(min_length=1)
    branch_prefix: str = Field("intake", pattern=r"^[a-z0-9][a-z0-9/_-]{0,39}$")
    base_ref: str = Field("main", pattern=r"^[A-Za-z0-9][A-Za-z0-9/._-]{0,99}$")
    allowed_paths: tuple[Glob, ...] = ("**",)
    blocked_paths: tuple[Glob, ...] = ()
    checks: tuple[Check, ...] = ()
    queue: Name | None = None
    #: Paths whose change needs a result approval whatever the tier (e.g. ``auth/**``).
    privileged_paths: tuple[Glob, ...] = ()
    #: Where the agent may connect, through the worker's filtering proxy (``host:port`` or
    #: ``*.suffix:port``); empty: no network at all. Part of the task spec, so approvals bind to it.
    egress: tuple[EgressEntry, ...] = ()

    def touches_privileged(self, paths: list[str]) -> bool:
        """Whether any of ``paths`` matches a privileged pattern (case-insensitively: a
        case-insensitive checkout must not slip ``Auth/`` past ``auth/**``)."""
        return any(glob_match(p, path, case_sensitive=False) for p in self.privileged_paths for path in paths)

    @model_validator(mode="after")
    def _unique_checks(self) -> Repo:
        names = [c.name for c in self.checks]
        if len(names) != len(set(names)):
            raise ValueError("checks: two checks share a name")
        return self


class Policy(_Strict):
    """A validated policy. Cross-references are checked; errors name the field."""

    version: str = Field(min_length=1, max_length=64)
    approvals_channel: str = Field(pattern=r"^[CG][A-Z0-9]{8,}$")
    clocks: Clocks
    escalation: Escalation
    dependencies: Dependencies = Dependencies()
    limits: Limits = Limits()
    change_types: dict[Name, ChangeType] = Field(min_length=1)
    risk_tiers: dict[Name, RiskTier] = Field(min_length=1)
    groups: dict[Name, Group] = Field(min_length=1)
    repos: tuple[Repo, ...] = Field(min_length=1)
    admins: Admins = Admins()
    channels: Channels = Channels()
    identities: Identities = Identities()
    credentials: Credentials = Credentials()

    @model_validator(mode="after")
    def _cross_references(self) -> Policy:
        for name, tier in self.risk_tiers.items():
            self._check_rule(f"risk_tiers.{name}", tier)
            if tier.result_approvals is not None:
                self._check_rule(f"risk_tiers.{name}.result_approvals", tier.result_approvals)
        if self.escalation.group not in self.groups:
            raise PolicyError("escalation.group", f"unknown group {self.escalation.group!r}")
        seen: set[str] = set()
        for i, repo in enumerate(self.repos):
            if repo.name in seen:
                raise PolicyError(f"repos[{i}].name", f"duplicate repo {repo.name!r}")
            seen.add(repo.name)
            if repo.tier not in self.risk_tiers:
                raise PolicyError(f"repos[{i}].tier", f"unknown risk tier {repo.tier!r}")
            for j, ctype in enumerate(repo.change_types):
                if ctype not in self.change_types:
                    raise PolicyError(f"repos[{i}].change_types[{j}]", f"unknown change type {ctype!r}")
        return self

    def _check_rule(self, where: str, rule: ApprovalRule) -> None:
        for j, group in enumerate(rule.groups):
            if group not in self.groups:
                raise PolicyError(f"{where}.groups[{j}]", f"unknown group {group!r}")
        for group, count in rule.require.items():
            if group not in rule.groups:
                raise PolicyError(f"{where}.require.{group}", "group is not one of the tier's groups")
            if count < 1:
                raise PolicyError(f"{where}.require.{group}", "must be at least 1")
        if sum(rule.require.values()) > rule.approvals:
            raise PolicyError(f"{where}.require", "requires more approvals than the tier's total")
        eligible = {m for g in rule.groups for m in self.groups[g].members}
        if len(eligible) < rule.approvals:
            raise PolicyError(
                f"{where}.approvals",
                f"needs {rule.approvals} distinct approvers but its groups have {len(eligible)}",
            )

    @cached_property
    def version_hash(self) -> str:
        """SHA-256 of the canonical parsed policy: comments and formatting do not change it."""
        return sha256_hex(canonical_json(self.model_dump(mode="json")))

    def find_repo(self, name: str) -> Repo | None:
        return next((r for r in self.repos if r.name == name), None)

    def groups_of(self, member: str) -> tuple[str, ...]:
        """The policy groups that list ``member`` (an approver id)."""
        return tuple(sorted(g for g, group in self.groups.items() if member in group.members))

    def is_admin(self, person_id: str | None) -> bool:
        return person_id is not None and person_id in self.admins.members

    def queue_for(self, repo: Repo) -> str:
        """RQ queue for a repo's tasks: the repo's own, else one per risk tier."""
        return repo.queue or f"tier-{repo.tier}"


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_policy(data: dict[str, Any]) -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        # One line per error (the first names the field; `intake policy check` shows them all).
        lines = [(_loc(tuple(e["loc"])) or "policy", e["msg"].removeprefix("Value error, "))
                 for e in exc.errors()]
        (field, message), rest = lines[0], lines[1:]
        raise PolicyError(field, "\n".join([message, *(f"{f}: {m}" for f, m in rest)])) from None


def load_policy(path: Path) -> Policy:
    """Read and validate a policy file, or raise :class:`PolicyError` naming the field."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError("INTAKE_POLICY", f"no policy file at {path}") from None
    except OSError as exc:
        raise PolicyError("INTAKE_POLICY", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise PolicyError("policy", f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError("policy", f"TOML syntax error: {exc}") from None
    return parse_policy(data)
