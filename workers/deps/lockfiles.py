"""Lockfile parsers: what a uv.lock, poetry.lock, package-lock.json (v2/v3), go.sum or
Cargo.lock resolved to, as :class:`Locked` packages.

Pure and bounded like :mod:`.manifests`: text in, records out, nothing executed or fetched; at
most :data:`~.files.MAX_LOCKED_PACKAGES` packages; anything malformed raises
:class:`~.manifests.ManifestError`. A package from outside the ecosystem's public index (git,
path, URL, another registry) keeps its source in :attr:`Locked.source`, so the gate can refuse it.
The project's own entries (uv's editable/virtual root, npm's workspace links, Cargo's workspace
crates) are not dependencies and are left out.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from intake.core.versions import normalize_name

from .files import MAX_LOCKED_PACKAGES, lockfile_kind
from .manifests import ManifestError


@dataclass(frozen=True)
class Locked:
    """One resolved package: normalised name, exact version, and what the lockfile says of its
    integrity hash, license and (when not the public index) source."""

    name: str
    version: str
    integrity: str | None = None
    license: str | None = None
    source: str | None = None


_PYPI_INDEX = {"https://pypi.org/simple", "https://pypi.org/simple/"}
_PYPI_FILES = "https://files.pythonhosted.org/"
_NPM_REGISTRY = "https://registry.npmjs.org/"
_CRATES_IO = {"registry+https://github.com/rust-lang/crates.io-index", "sparse+https://index.crates.io/"}
_HASH = re.compile(r"(sha256|sha384|sha512):[0-9a-fA-F]{64,128}")
#: The tarball file name after ``<registry>/<name>/-/``: one plain path segment, so that no
#: ``..``, percent-escape, query or fragment can make the URL name another package's tarball.
_NPM_TARBALL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*\.tgz")


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ManifestError("expected an array")
    return value


def _dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError("expected a table")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 1000:
        raise ManifestError("expected a string")
    return value


_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+~_!-]{0,127}")


def _version(value: Any) -> str:
    # Versions end up in one-line reasons, the SBOM and purls: a plain token, or malformed.
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        raise ManifestError("malformed version")
    return value


def _bounded(items: list[Any]) -> list[Any]:
    if len(items) > MAX_LOCKED_PACKAGES:
        raise ManifestError("too many packages")
    return items


def _first_hash(entries: list[Any]) -> str | None:
    for entry in entries:
        digest = _dict(entry).get("hash")
        if isinstance(digest, str) and _HASH.fullmatch(digest):
            return digest.lower()
    return None


def parse_uv_lock(text: str) -> list[Locked]:
    """uv.lock: ``[[package]]`` with name, version, source and sdist/wheel hashes."""
    out = []
    for package in _bounded(_list(tomllib.loads(text).get("package"))):
        package = _dict(package)
        source = _dict(package.get("source"))
        if "editable" in source or "virtual" in source:
            continue  # the project itself
        name, version = normalize_name("pypi", _str(package.get("name"))), _version(package.get("version"))
        registry = source.get("registry")
        other = None if registry in _PYPI_INDEX else json.dumps(source, sort_keys=True)
        files = ([package["sdist"]] if "sdist" in package else []) + _list(package.get("wheels"))
        # uv downloads from the recorded URL: one off PyPI's file host is another source.
        foreign = [str(_dict(f).get("url"))[:200] for f in files
                   if not str(_dict(f).get("url", "")).startswith(_PYPI_FILES)]
        if other is None and foreign:
            other = foreign[0]
        digest = _first_hash(files)
        out.append(Locked(name, version, digest, None, other))
    return out


def parse_poetry_lock(text: str) -> list[Locked]:
    """poetry.lock: ``[[package]]`` with name, version, files (or the old ``[metadata.files]``)
    and an optional ``[package.source]``."""
    data = tomllib.loads(text)
    old_files = _dict(_dict(data.get("metadata")).get("files"))
    out = []
    for package in _bounded(_list(data.get("package"))):
        package = _dict(package)
        raw, version = _str(package.get("name")), _version(package.get("version"))
        name = normalize_name("pypi", raw)
        source = _dict(package.get("source"))
        files = _list(package.get("files")) or _list(old_files.get(raw))
        other = json.dumps(source, sort_keys=True) if source else None
        out.append(Locked(name, version, _first_hash(files), None, other))
    return out


def _npm_license(value: Any) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 200 else None


def parse_package_lock(text: str) -> list[Locked]:
    """package-lock.json / npm-shrinkwrap.json, lockfileVersion 2 or 3 (the ``packages`` map):
    version, ``integrity``, ``license`` and ``resolved`` of every installed package. Version 1
    lockfiles (npm 6) are refused: they do not record what the gate needs."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("lockfileVersion") not in (2, 3):
        raise ManifestError("only lockfileVersion 2 and 3 are supported")
    out = []
    for key, entry in _bounded(list(_dict(data.get("packages")).items())):
        entry = _dict(entry)
        if "node_modules/" not in key or entry.get("link") is True:
            continue  # the root project or a workspace package: the project's own code
        name = _str(entry.get("name") or key.rsplit("node_modules/", 1)[1])
        version = _version(entry.get("version"))
        integrity = entry.get("integrity")
        resolved = entry.get("resolved")
        other = None
        # npm fetches the recorded tarball: it must be this package's, on the public registry
        # (an entry "name"d as an allowed package but resolving to another is another source).
        prefix = f"{_NPM_REGISTRY}{name}/-/"
        if resolved is not None and not (isinstance(resolved, str) and resolved.startswith(prefix)
                                         and _NPM_TARBALL.fullmatch(resolved[len(prefix):])):
            other = str(resolved)[:200]
        out.append(Locked(name, version, integrity if isinstance(integrity, str) else None,
                          _npm_license(entry.get("license")), other))
    return out


def parse_go_sum(text: str) -> list[Locked]:
    """go.sum: ``module version h1:hash`` lines. It records integrity, not what is used (go.mod
    does): each module zip hash becomes a record; the ``/go.mod``-only lines are skipped."""
    out = []
    for line in _bounded(text.splitlines()):
        words = line.split()
        if not words:
            continue
        if len(words) != 3 or not words[2].startswith("h1:"):
            raise ManifestError("malformed go.sum line")
        if words[1].endswith("/go.mod"):
            continue
        out.append(Locked(words[0], _version(words[1]), words[2]))
    return out


def parse_cargo_lock(text: str) -> list[Locked]:
    """Cargo.lock: ``[[package]]`` with name, version, source and checksum; crates without a
    source are the workspace's own."""
    out = []
    for package in _bounded(_list(tomllib.loads(text).get("package"))):
        package = _dict(package)
        source = package.get("source")
        if source is None:
            continue
        name = normalize_name("cargo", _str(package.get("name")))
        checksum = package.get("checksum")
        digest = f"sha256:{checksum}" if isinstance(checksum, str) and re.fullmatch(r"[0-9a-f]{64}", checksum) else None
        out.append(Locked(name, _version(package.get("version")), digest, None,
                          None if source in _CRATES_IO else str(source)[:200]))
    return out


_PARSERS: dict[str, Callable[[str], list[Locked]]] = {
    "uv": parse_uv_lock, "poetry": parse_poetry_lock, "npm-lock": parse_package_lock,
    "go-sum": parse_go_sum, "cargo-lock": parse_cargo_lock,
}


def parse_lockfile(path: str, text: str) -> list[Locked]:
    """The packages lockfile ``path`` (a :func:`~.files.lockfile_kind`) records in ``text``.
    Raises :class:`~.manifests.ManifestError` for anything malformed."""
    kind = lockfile_kind(path)
    if kind is None:
        raise ManifestError(f"not a lockfile: {path}")
    try:
        return _PARSERS[kind](text)
    except ManifestError:
        raise
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError) as exc:
        raise ManifestError(type(exc).__name__) from None
