"""Which files hold dependencies: manifests (what a project asks for) and lockfiles (what it
resolved to), by lower-cased file name at any depth, and the ecosystem each belongs to."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

#: A manifest or lockfile larger than this is not parsed (the gate blocks it): parsers face
#: hostile input, and a real package-lock.json of a large app stays well below it.
MAX_DEPENDENCY_FILE_BYTES = 16 * 1024 * 1024
#: At most this many packages are read from one lockfile.
MAX_LOCKED_PACKAGES = 50_000

ECOSYSTEMS = ("pypi", "npm", "go", "cargo")

_MANIFEST_ECOSYSTEM = {"pyproject": "pypi", "requirements": "pypi", "npm": "npm", "go": "go", "cargo": "cargo"}
_LOCKFILES = {
    "uv.lock": ("uv", "pypi"), "poetry.lock": ("poetry", "pypi"),
    "package-lock.json": ("npm-lock", "npm"), "npm-shrinkwrap.json": ("npm-lock", "npm"),
    "go.sum": ("go-sum", "go"), "cargo.lock": ("cargo-lock", "cargo"),
}
#: The fixed-name dependency files of one directory, read beside any changed one so that a
#: manifest is always compared with its lockfile (and the other way round).
SIBLING_NAMES = {
    "pypi": ("pyproject.toml", "uv.lock", "poetry.lock"),
    "npm": ("package.json", "package-lock.json", "npm-shrinkwrap.json"),
    "go": ("go.mod", "go.sum"),
    "cargo": ("Cargo.toml", "Cargo.lock"),
}


def manifest_kind(path: str) -> str | None:
    """Which parsed manifest format ``path`` is (by file name, case-insensitively), or ``None``."""
    p = PurePosixPath(path.lower())
    if p.name == "pyproject.toml":
        return "pyproject"
    if (
        re.fullmatch(r"(requirements|constraints).*\.(txt|in)", p.name)
        or (p.suffix in {".txt", ".in"} and p.parent.name == "requirements")
    ):
        return "requirements"
    return {"package.json": "npm", "go.mod": "go", "cargo.toml": "cargo"}.get(p.name)


def lockfile_kind(path: str) -> str | None:
    """Which parsed lockfile format ``path`` is (``uv``, ``poetry``, ``npm-lock``, ``go-sum``,
    ``cargo-lock``), or ``None``."""
    entry = _LOCKFILES.get(PurePosixPath(path.lower()).name)
    return entry[0] if entry else None


def ecosystem_of(path: str) -> str | None:
    """The ecosystem (``pypi``, ``npm``, ``go``, ``cargo``) of a manifest or lockfile path."""
    kind = manifest_kind(path)
    if kind is not None:
        return _MANIFEST_ECOSYSTEM[kind]
    entry = _LOCKFILES.get(PurePosixPath(path.lower()).name)
    return entry[1] if entry else None


def is_dependency_file(path: str) -> bool:
    """Whether ``path`` is a manifest or a lockfile that the dependency gate parses."""
    return ecosystem_of(path) is not None
