"""The dependency gate: the change's delta (see :mod:`.delta`) against the policy's
``[dependencies]``.

For every package the change adds, re-versions or re-specs (removals always pass), and for each
version it brings in (or, when no version is known, for the package as such):

1. **denylist** (always wins): a denylisted package, or a denylisted exact version, blocks; a
   package with denylisted versions whose version is not pinned anywhere blocks too;
2. **allowlist**: the package must be on it, under its ecosystem (``pypi:mypy`` never admits
   ``npm:mypy``), every package, direct or only locked; when its entries carry ``version``
   specifiers the version must be known and within one of them;
3. **licenses**: the admitting allowlist entry's ``license`` when it states one (the policy
   wins: a lockfile entry is the agent's to write, so one that says another license blocks),
   else the lockfile's; a denied one, one outside ``allowed`` (when set), and an unknown one
   (when ``unknown = "block"``) block;
4. **integrity** (``require_integrity = true``): the version must have a hash in the lockfile
   (npm ``integrity``, pip ``--hash``, uv/poetry file hashes, go.sum, Cargo.lock ``checksum``).

A denylisted, unlisted or out-of-specifier version gets that one reason (nothing else could
admit it); otherwise license and integrity reasons follow. Each reason is one line starting
``dependency:`` and naming the package and version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from intake.core.licenses import license_key, license_passes, same_license
from intake.core.versions import (
    PackageRef,
    parse_package,
    parse_pinned,
    same_version,
    version_in,
)

from ..snapshot import ChangedFile
from .delta import Change, ReadFile, compute_delta
from .sbom import build_sbom, sbom_digest

PREFIX = "dependency: "
#: A change bringing in more package versions than this is blocked: its SBOM must fit in a
#: worker report (and a hostile lockfile must not cost the worker much).
MAX_CHANGES = 200


#: Every kind of reason, the text between ``dependency: `` and the next ``:`` (see :func:`reason_kind`).
REASON_KINDS = (
    "denylisted package", "denylisted version", "denylisted versions exist and none is pinned",
    "unlisted package", "version outside specifier", "denied license", "unknown license",
    "missing integrity hash", "integrity hash changed for an unchanged version", "lockfile mismatch",
    "not a registry package", "requirement line not allowed", "unparseable dependency file",
    "dependency file too large to check", "too many packages", "manifest changed outside its dependencies",
    "license disagrees with the policy", "new manifest holds more than dependencies",
)


def reason_kind(reason: str) -> str | None:
    """The kind of a gate reason (one of :data:`REASON_KINDS`), or ``None`` for a reason that is
    not the dependency gate's: what a report counts blocks by."""
    if not reason.startswith(PREFIX):
        return None
    kind = reason[len(PREFIX):].split(":", 1)[0]
    return kind if kind in REASON_KINDS else None


class AllowRule(Protocol):
    package: str
    version: str | None
    license: str | None


class DenyRule(Protocol):
    package: str


class LicenseRules(Protocol):
    allowed: Sequence[str]
    denied: Sequence[str]
    unknown: str


class DependencyRules(Protocol):
    """What the gate reads of the policy's ``[dependencies]`` (``intake.core.policy.Dependencies``)."""

    allow: Sequence[AllowRule]
    deny: Sequence[DenyRule]
    licenses: LicenseRules
    require_integrity: bool


@dataclass
class DependencyCheck:
    """The gate's verdict on one change: the delta entries (as stored in the task result) and
    the block reasons (empty: the dependencies pass)."""

    changes: list[Change] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def result(self) -> dict[str, Any]:
        """What the task result stores under ``"dependencies"``: ``delta`` (one dict per entry:
        ecosystem, name, before, after, change, license, integrity), ``sbom`` (CycloneDX 1.6
        JSON) and ``sbom_sha256`` (hex SHA-256 of the SBOM's canonical JSON)."""
        sbom = build_sbom(self.changes, [e["license"] for e in self.entries])
        return {"delta": self.entries, "sbom": sbom, "sbom_sha256": sbom_digest(sbom)}


def _shown(license: str) -> str:
    return license[:80] if license[:80].isprintable() else repr(license[:80])


def _label(ref: PackageRef, version: str | None) -> str:
    return f"{ref} {version}" if version else f"{ref} (version not pinned)"


def _check_version(ref: PackageRef, version: str | None, facts: tuple[str | None, str | None],
                   rules: DependencyRules) -> tuple[list[str], str | None]:
    """(reasons, license) for one version of one package."""
    reasons = []
    label = _label(ref, version)
    for rule in rules.deny:
        denied, denied_version = parse_pinned(rule.package)
        if denied != ref:
            continue
        if denied_version is None:
            reasons.append(f"denylisted package: {label}")
        elif version is None:
            reasons.append(f"denylisted versions exist and none is pinned: {label}")
        elif same_version(ref.ecosystem, version, denied_version):
            reasons.append(f"denylisted version: {label}")
    if reasons:  # the denylist wins: nothing else can change the verdict
        return reasons, facts[1]
    entries = [rule for rule in rules.allow if parse_package(rule.package) == ref]
    if not entries:
        return [f"unlisted package: {label}"], facts[1]
    admitting = next((r for r in entries if r.version is None or (
        version is not None and version_in(ref.ecosystem, version, r.version))), None)
    if admitting is None:
        specs = " or ".join(repr(r.version) for r in entries)
        return [f"version outside specifier: {label} (allowed: {specs})"], facts[1]
    integrity, locked_license = facts
    license = admitting.license or locked_license
    if admitting.license and locked_license and not same_license(admitting.license, locked_license):
        reasons.append(f"license disagrees with the policy: {label} (the lockfile says {_shown(locked_license)}, "
                       f"the policy says {_shown(admitting.license)})")
    licenses = rules.licenses
    if license is None:
        if licenses.unknown == "block":
            reasons.append(f"unknown license: {label}")
    else:
        allowed = {license_key(k) for k in licenses.allowed}
        denied = {license_key(k) for k in licenses.denied}
        try:
            passes = license_passes(license, allowed, denied)
        except ValueError:
            passes = None
        if passes is None:
            if licenses.unknown == "block":
                reasons.append(f"unknown license: {label} ({license[:80]!r} is not an SPDX expression)")
        elif not passes:
            reasons.append(f"denied license: {label} ({_shown(license)})")
    if rules.require_integrity and not integrity:
        reasons.append(f"missing integrity hash: {label}")
    return reasons, license


def check_delta(changes: Sequence[Change], problems: Sequence[str], rules: DependencyRules) -> DependencyCheck:
    """Check a computed delta against ``rules``; see the module docstring."""
    reasons = [PREFIX + p for p in problems]
    kept, count = [], 0
    for change in changes:
        count += max(1, len(change.new_versions))
        if count > MAX_CHANGES:
            reasons.append(f"{PREFIX}too many packages: the change brings in more than {MAX_CHANGES} package "
                           "versions; no more can be checked and recorded in one task")
            break
        kept.append(change)
    result = DependencyCheck(changes=kept)
    changes = kept
    for change in changes:
        if change.change == "removed":
            result.entries.append(change.as_dict())
            continue
        versions: Sequence[str | None] = change.new_versions or change.after or (None,)
        license = None
        for version in versions:
            found, lic = _check_version(change.package, version,
                                        change.facts.get(version, (None, None)) if version else (None, None), rules)
            reasons += [PREFIX + r for r in found]
            license = license or lic
        result.entries.append(change.as_dict(license))
    result.reasons = list(dict.fromkeys(reasons))
    return result


def check_dependency_change(changed: Sequence[ChangedFile], read_before: ReadFile, read_after: ReadFile,
                            rules: DependencyRules) -> DependencyCheck:
    """Compute the change's dependency delta from trusted copies and check it against ``rules``.
    ``read_before``/``read_after`` must never read the agent's working tree."""
    delta = compute_delta(changed, read_before, read_after)
    return check_delta(delta.changes, delta.problems, rules)
