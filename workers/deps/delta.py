"""The dependency delta of one change, computed from the worker's trusted copies.

For every directory with a changed manifest or lockfile, the directory's dependency files
(the changed ones and its fixed-name siblings: pyproject.toml, uv.lock, poetry.lock,
package.json, package-lock.json, go.mod, go.sum, Cargo.toml, Cargo.lock) are read before and
after through ``read_before``/``read_after``, which must read what the agent cannot blind
(see :mod:`intake.workers.snapshot`), never its working tree. Each side becomes a
:class:`Record` per package: the versions it resolves to (a lockfile's, else an exact pin in
the manifest; go.mod's requires are exact), their integrity hashes and licenses, and the
manifest spec that names it directly. Comparing the two sides gives :class:`Change` entries.

Anything that is not a plain registry package (a URL, VCS or path source, a refused
requirements line, an override, a replace or patch, a lockfile entry from another source),
a file too large to parse, one that does not parse, and a direct dependency that the
directory's lockfile does not lock (or locks outside the manifest's spec) become *problems*:
one line each, which the gate turns into block reasons.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from intake.core.versions import (
    PackageRef,
    canonical_version,
    compare,
    is_registry_name,
    is_version,
    normalize_name,
    version_in,
)

from ..snapshot import ChangedFile
from .files import (
    MAX_DEPENDENCY_FILE_BYTES,
    SIBLING_NAMES,
    ecosystem_of,
    lockfile_kind,
    manifest_kind,
)
from .lockfiles import parse_lockfile
from .manifests import ManifestError, non_dependency_fields, parse_manifest, unread_part

ReadFile = Callable[[str], "str | None"]

_DIRECT = {
    "pypi": ("project", "optional:", "group:", "build-system", "requirements", "poetry", "poetry:"),
    "npm": ("dependencies", "devDependencies", "peerDependencies", "optionalDependencies"),
    "go": ("require",),
    "cargo": ("dependencies", "dev-dependencies", "build-dependencies", "target.", "workspace."),
}


def _show(text: str) -> str:
    return text if text.isprintable() else repr(text)


@dataclass
class Record:
    """What one side of the change says about one package in one directory."""

    versions: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # -> (integrity, license)
    spec: str | None = None  # the manifest's version spec, when a manifest names it directly
    manifest: str | None = None
    section: str | None = None
    locked: bool = False


@dataclass(frozen=True)
class Change:
    """One entry of the delta. ``change`` is ``added``, ``removed``, ``upgraded``,
    ``downgraded`` or ``changed`` (same versions, another spec or hash); ``before``/``after``
    are the versions (comma-separated when several are installed), ``None`` when unknown."""

    package: PackageRef
    change: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    new_versions: tuple[str, ...]  # after-side versions the base did not have
    facts: dict[str, tuple[str | None, str | None]]  # after-side version -> (integrity, license)
    path: str

    def as_dict(self, license: str | None = None) -> dict[str, str | None]:
        """The entry as the task result stores it (the contract the report and provenance read)."""
        top = self.after[-1] if self.after else None
        return {
            "ecosystem": self.package.ecosystem, "name": self.package.name,
            "before": ", ".join(self.before) or None, "after": ", ".join(self.after) or None,
            "change": self.change,
            "license": license if license is not None else (self.facts.get(top, (None, None))[1] if top else None),
            "integrity": self.facts.get(top, (None, None))[0] if top else None,
        }


@dataclass
class Delta:
    """The change's delta and the problems found computing it."""

    changes: list[Change] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


State = dict[PackageRef, Record]


def _is_direct(ecosystem: str, section: str) -> bool:
    return any(section == p or (p.endswith((":", ".")) and section.startswith(p)) for p in _DIRECT[ecosystem])


def _manifest_spec(ecosystem: str, section: str, raw: str) -> tuple[str | None, str | None, str | None]:
    """(spec, exact pin, integrity) of a manifest entry's canonical spec string."""
    if ecosystem == "go":
        return raw, raw if is_version("go", raw) else None, None
    if ecosystem == "npm":
        return raw, raw if is_version("npm", raw) else None, None
    if ecosystem == "pypi" and not section.startswith("poetry"):
        extras, specifier, marker, hashes = json.loads(raw)
        pin = None
        parts = [p.strip() for p in specifier.split(",") if p.strip()]
        if len(parts) == 1 and parts[0].startswith("==") and "*" not in parts[0]:
            pin = parts[0].lstrip("=").strip()
        return specifier or None, pin, hashes[0] if hashes else None
    value = json.loads(raw)  # poetry or cargo: a string or a table with "version"
    spec = value if isinstance(value, str) else value.get("version") if isinstance(value, dict) else None
    if not isinstance(spec, str):
        return None, None, None
    exact = spec.lstrip("=").strip()
    pin = exact if ecosystem == "cargo" and spec.startswith("=") and is_version("cargo", exact) else None
    if ecosystem == "pypi" and spec[:1].isdigit() and is_version("pypi", spec):
        pin = spec  # poetry: a bare version is an exact pin
    return None if ecosystem == "pypi" else spec, pin, None


def _read(read: ReadFile, path: str, problems: list[str] | None) -> str | None:
    text = read(path)
    if text is not None and len(text) > MAX_DEPENDENCY_FILE_BYTES:
        if problems is not None:
            problems.append(f"dependency file too large to check: {_show(path)}")
        return None
    return text


def _state(read: ReadFile, paths: Sequence[str], problems: list[str] | None,
           foreign: dict[tuple[str, str, str], str]) -> State:
    """One side of one directory. ``problems`` is ``None`` for the base side (its own faults are
    not the change's); ``foreign`` collects non-registry entries, keyed by (file, name)."""
    state: State = {}
    locks: dict[str, list[tuple[str, list]]] = {}
    for path in paths:
        text = _read(read, path, problems)
        if text is None:
            continue
        ecosystem = ecosystem_of(path)
        assert ecosystem is not None
        try:
            if manifest_kind(path) is not None:
                for (section, name), raw in parse_manifest(path, text).items():
                    normal = normalize_name(ecosystem, name)
                    if not _is_direct(ecosystem, section) or not is_registry_name(ecosystem, normal):
                        foreign[(path, section, name)] = raw
                        continue
                    spec, pin, integrity = _manifest_spec(ecosystem, section, raw)
                    record = state.setdefault(PackageRef(ecosystem, normal), Record())
                    record.spec, record.manifest, record.section = spec, path, section
                    if pin is not None and not record.locked:
                        record.versions.setdefault(pin, (integrity, None))
            else:
                locks.setdefault(ecosystem, []).append((path, parse_lockfile(path, text)))
        except (ManifestError, ValueError, TypeError, AttributeError, IndexError, KeyError):
            if problems is not None:
                problems.append(f"unparseable dependency file: {_show(path)}")
    for ecosystem, files in locks.items():
        for path, packages in files:
            if lockfile_kind(path) == "go-sum":
                continue  # integrity only, applied below
            for locked in packages:
                if not is_registry_name(ecosystem, locked.name):
                    foreign[(path, "lockfile", f"{locked.name[:100]} {locked.version}")] = ""
                    continue
                ref = PackageRef(ecosystem, locked.name)
                if locked.source is not None:
                    foreign[(path, "lockfile", f"{locked.name} {locked.version} from {locked.source}")] = ""
                record = state.setdefault(ref, Record())
                if not record.locked:  # the lockfile, not the manifest's pin, says what is installed
                    record.versions, record.locked = {}, True
                record.versions[locked.version] = (locked.integrity, locked.license)
        for path, packages in files:
            if lockfile_kind(path) == "go-sum":
                sums = {(p.name, p.version): p.integrity for p in packages}
                for ref, record in state.items():
                    if ref.ecosystem == "go":
                        record.locked = True
                        record.versions = {v: (sums.get((ref.name, v)), lic) for v, (_, lic) in record.versions.items()}
    return state


def _unlocked(ref: PackageRef, record: Record, lockfiles: list[str]) -> str | None:
    """Why a direct dependency disagrees with its directory's lockfile, or ``None``."""
    if record.manifest is None or not lockfiles:
        return None
    if ref.ecosystem == "pypi" and (manifest_kind(record.manifest) == "requirements" or record.section == "build-system"):
        return None  # a requirements file is its own lock; build requirements are never locked
    where = ", ".join(lockfiles)
    if not record.locked or not record.versions:
        return f"lockfile mismatch: {ref} is in {record.manifest} but not in {where}"
    if ref.ecosystem == "go" and any(i is None for i, _ in record.versions.values()):
        return f"lockfile mismatch: {ref} is in {record.manifest} but not in {where}"
    if record.spec and ref.ecosystem in {"pypi", "npm"} and not any(
        version_in(ref.ecosystem, v, record.spec) for v in record.versions
    ):
        return (f"lockfile mismatch: {ref} is locked at {', '.join(sorted(record.versions))} "
                f"outside {record.spec!r} of {record.manifest}")
    return None


def _classify(ecosystem: str, before: Record, after: Record) -> str | None:
    b, a = sorted(before.versions), sorted(after.versions)
    if {canonical_version(ecosystem, v) for v in b} != {canonical_version(ecosystem, v) for v in a}:
        if b and a:
            top_a = max(a, key=lambda v: _Key(ecosystem, v))
            top_b = max(b, key=lambda v: _Key(ecosystem, v))
            order = compare(ecosystem, top_a, top_b)
            return "upgraded" if order == 1 else "downgraded" if order == -1 else "changed"
        return "changed"
    if before.versions != after.versions or before.spec != after.spec:
        return "changed"
    return None


class _Key:
    """Sort key for versions of one ecosystem (unparseable ones sort by text)."""

    def __init__(self, ecosystem: str, version: str) -> None:
        self.ecosystem, self.version = ecosystem, version

    def __lt__(self, other: _Key) -> bool:
        order = compare(self.ecosystem, self.version, other.version)
        return order == -1 if order is not None else self.version < other.version


def _directories(changed: Sequence[ChangedFile]) -> dict[str, set[str]]:
    dirs: dict[str, set[str]] = {}
    for change in changed:
        for path in (change.path, change.old_path):
            ecosystem = ecosystem_of(path) if path else None
            if path and ecosystem:
                directory = posixpath.dirname(path)
                files = dirs.setdefault(directory, set())
                files.add(path)
                files.update(posixpath.join(directory, n) for n in SIBLING_NAMES[ecosystem])
    return dirs


def _outside_dependencies(path: str, read_before: ReadFile, read_after: ReadFile) -> str | None:
    """Why manifest ``path`` changed outside what the gate reads (npm scripts, a Cargo build
    script, ...: code that runs at install or build time, which no allowlist entry covers), or
    ``None``. A manifest the base has is compared with it; a new one (nothing to compare with)
    may hold only its dependency tables and inert identity fields (see
    :func:`.manifests.non_dependency_fields`). An unparseable side is reported elsewhere."""
    before, after = _read(read_before, path, None), _read(read_after, path, None)
    if before is None and after is not None:
        try:
            parse_manifest(path, after)  # an unparseable one is reported as such
            extra = non_dependency_fields(path, after)
        except ManifestError:
            return None
        if not extra:
            return None
        shown = ", ".join(_show(e) for e in sorted(set(extra))[:5]) + (", ..." if len(set(extra)) > 5 else "")
        return (f"new manifest holds more than dependencies: {_show(path)} ({shown}; a new manifest may hold only "
                "dependency tables and name, version, private, description)")
    if before is None or after is None or before == after:
        return None
    try:
        parse_manifest(path, before), parse_manifest(path, after)
        if unread_part(path, before) == unread_part(path, after):
            return None
    except ManifestError:
        return None
    return f"manifest changed outside its dependencies: {_show(path)} (only dependency entries may change)"


def compute_delta(changed: Sequence[ChangedFile], read_before: ReadFile, read_after: ReadFile) -> Delta:
    """The dependency delta of a change (see the module docstring). Never raises on file
    contents: a malformed or oversized file is a problem, not a crash."""
    delta = Delta()
    for directory, files in sorted(_directories(changed).items()):
        paths = sorted(files)
        old_foreign: dict[tuple[str, str, str], str] = {}
        new_foreign: dict[tuple[str, str, str], str] = {}
        before = _state(read_before, paths, None, old_foreign)
        after = _state(read_after, paths, delta.problems, new_foreign)
        for (path, section, name), raw in sorted(new_foreign.items(), key=lambda i: (i[0][1] != "refused", i[0])):
            if old_foreign.get((path, section, name)) == raw:
                continue  # left alone by the change: not the agent's doing
            if section == "refused":  # never admitted, whatever the policy says: not a package
                delta.problems.append(f"requirement line not allowed: {_show(name)} ({_show(path)})")
            else:
                delta.problems.append(f"not a registry package: {_show(name)} ({section} in {_show(path)})")
        for path in paths:
            if manifest_kind(path) is not None and (outside := _outside_dependencies(path, read_before, read_after)):
                delta.problems.append(outside)
        lockfiles = {e: [p for p in paths if lockfile_kind(p) and ecosystem_of(p) == e and read_after(p) is not None]
                     for e in ("pypi", "npm", "go", "cargo")}
        for ref in sorted(set(before) | set(after)):
            old, new = before.get(ref), after.get(ref)
            shown = new.manifest if new and new.manifest else directory or "."
            if new is None:
                assert old is not None
                delta.changes.append(Change(ref, "removed", tuple(sorted(old.versions)), (), (), {}, shown))
                continue
            kind = "added" if old is None else _classify(ref.ecosystem, old, new)
            if kind is None:
                continue
            base_versions = old.versions if old else {}
            fresh = tuple(v for v in sorted(new.versions) if kind != "added" and v in base_versions
                          and base_versions[v][0] != new.versions[v][0] and base_versions[v][0] is not None)
            for v in fresh:
                delta.problems.append(f"integrity hash changed for an unchanged version: {ref} {v}")
            known = {canonical_version(ref.ecosystem, b) for b in base_versions}
            new_versions = tuple(v for v in sorted(new.versions) if canonical_version(ref.ecosystem, v) not in known)
            def by_version(versions: dict[str, Any], eco: str = ref.ecosystem) -> tuple[str, ...]:
                return tuple(sorted(versions, key=lambda version: _Key(eco, version)))
            delta.changes.append(Change(ref, kind, by_version(base_versions), by_version(new.versions),
                                        new_versions, dict(new.versions), shown))
            problem = _unlocked(ref, new, lockfiles[ref.ecosystem])
            if problem is not None:
                delta.problems.append(problem)
    return delta
