"""Gates on the change an agent produced, checked before anything is pushed.

Every function here is pure: it gets the changed paths and, for manifests, a way to read a
file's text before and after the change. Each returns a list of reasons, one line each; an
empty list means the change passes. Path patterns follow :mod:`intake.core.paths`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from intake.core.paths import glob_match, is_safe_path, validate_pattern

from .deps.files import is_dependency_file, lockfile_kind, manifest_kind
from .snapshot import ChangedFile


def _show(path: str) -> str:
    # Reasons are one line each: show a path with newlines or control characters quoted.
    return path if path.isprintable() else repr(path)


def _dedupe(reasons: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(reasons))


def check_paths(
    changed: Sequence[ChangedFile],
    allowed: Sequence[str],
    blocked: Sequence[str],
    change_type_paths: Sequence[str] | None = None,
) -> list[str]:
    """Reasons why the changed paths fall outside the spec's scope.

    Every path must match an allowed pattern, a pattern of the change type's paths (when
    given) and no blocked pattern: the scope is the intersection, and blocked beats both.
    A rename is checked at both its old and its new path, a deletion at its path. No allowed
    patterns (or an empty change-type scope) means nothing is allowed.
    """
    scope = () if change_type_paths is None else tuple(change_type_paths)
    bad = []
    for pattern in (*allowed, *blocked, *scope):
        try:
            validate_pattern(pattern)
        except ValueError:
            bad.append(f"invalid path pattern in the task spec: {_show(pattern)}")
    if bad:
        return _dedupe(bad)
    reasons = []
    for change in changed:
        for path in (change.old_path, change.path) if change.old_path else (change.path,):
            if not is_safe_path(path):
                reasons.append(f"unsafe path: {_show(path)}")
            elif any(glob_match(b, path, case_sensitive=False) for b in blocked):
                reasons.append(f"blocked path: {_show(path)}")
            elif not any(glob_match(a, path) for a in allowed):
                reasons.append(f"path outside allowed paths: {_show(path)}")
            elif change_type_paths is not None and not any(glob_match(c, path) for c in scope):
                reasons.append(f"path outside the change type's paths: {_show(path)}")
    return _dedupe(reasons)


# -- branch ---------------------------------------------------------------------------------

_BAD_REF_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


def is_valid_branch_name(name: str) -> bool:
    """The rules of ``git check-ref-format --branch``, without running git."""
    if not name or name in {"@", "HEAD"} or name.startswith("-"):
        return False
    if _BAD_REF_CHARS.search(name) or ".." in name or "@{" in name:
        return False
    if name.startswith("/") or name.endswith(("/", ".")) or "//" in name:
        return False
    return all(not seg.startswith(".") and not seg.endswith(".lock") for seg in name.split("/"))


def check_branch(branch: str, prefix: str) -> list[str]:
    """Reasons why ``branch`` is not a valid branch named ``<prefix>/<something>``."""
    reasons = []
    if not is_valid_branch_name(branch):
        reasons.append(f"invalid branch name: {_show(branch)}")
    base = prefix.rstrip("/")
    if not base or not branch.startswith(base + "/") or branch == base + "/":
        reasons.append(f"branch {_show(branch)} is not under the prefix {_show(base)}/")
    return reasons


# -- build files -----------------------------------------------------------------------

# Build and dependency files, matched by lower-cased file name anywhere in the tree: they say
# where packages come from and what runs at install, build or CI time. Only the manifests and
# lockfiles that workers/deps parses can be checked against the dependency policy; an agent may never change
# the others (a human makes those changes). Makefiles and Dockerfiles count: they fetch and run
# code with the build's privileges, and nothing here can tell a safe edit from a curl | sh.
_BUILD_NAMES = frozenset({
    # Python
    "setup.py", "setup.cfg", "pyproject.toml", "pipfile", "pipfile.lock", "poetry.lock",
    "uv.lock", "uv.toml", "pdm.lock", "pylock.toml", "pip.conf", "pip.ini", ".pypirc",
    "tox.ini", "noxfile.py", "manifest.in", ".pre-commit-config.yaml",
    # JavaScript
    "package.json", "package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml",
    "pnpm-workspace.yaml", ".pnpmfile.cjs", "bun.lock", "bun.lockb", ".npmrc", ".yarnrc",
    ".yarnrc.yml", "deno.json", "deno.lock",
    # Go, Rust, Ruby, PHP, JVM
    "go.mod", "go.sum", "go.work", "go.work.sum", "cargo.toml", "cargo.lock", "build.rs",
    "rust-toolchain", "rust-toolchain.toml", "gemfile", "gemfile.lock", "composer.json",
    "composer.lock", "pom.xml", "gradle.properties", "gradle-wrapper.properties", "gradlew",
    # Make and containers
    "makefile", "gnumakefile", "dockerfile", "containerfile", ".dockerignore",
})
_BUILD_NAME_PATTERNS = re.compile(
    r"requirements.*\.(txt|in)|constraints.*\.txt|(build|settings)\.gradle(\.kts)?"
    r"|.*\.gemspec|.*\.mk|(docker|container)file\..*|.*\.dockerfile"
)
# Files that are build configuration by the directory they sit in.
_BUILD_IN_DIR = {".cargo": {"config", "config.toml"}, ".pip": {"pip.conf"},
                 ".mvn": None, ".yarn": None}


def is_build_file(path: str) -> bool:
    """Whether ``path`` is a build or dependency file (see ``_BUILD_NAMES``), case-insensitively,
    at any depth. Only ``dependency-bump`` tasks may change one, and only a parsed manifest or
    lockfile (:func:`intake.workers.deps.files.is_dependency_file`)."""
    if is_dependency_file(path):
        return True
    parts = path.lower().split("/")
    name = parts[-1]
    if name in _BUILD_NAMES or _BUILD_NAME_PATTERNS.fullmatch(name):
        return True
    for directory in parts[:-1]:
        if directory in _BUILD_IN_DIR:
            names = _BUILD_IN_DIR[directory]
            if names is None or name in names:
                return True
    return False


#: The change type whose tasks may change dependency manifests (and nothing else may).
DEPENDENCY_BUMP = "dependency-bump"


def _dependency_kind(path: str) -> str | None:
    # A manifest renamed to another kind (or a lockfile to a manifest) is a removal.
    return manifest_kind(path) or lockfile_kind(path)


def check_build_files(changed: Sequence[ChangedFile], change_type: str) -> list[str]:
    """Reasons for build and dependency files changed outside what ``change_type`` may do.

    Outside ``dependency-bump`` no build file may be added, changed, renamed or removed. In a
    ``dependency-bump`` only a parsed manifest or lockfile may change (its dependencies then go
    through :mod:`intake.workers.deps.gate`), and none may be removed: removing or renaming one
    away changes what gets installed without naming a package.
    """
    reasons = []
    for change in changed:
        ends = (change.old_path, change.path) if change.old_path else (change.path,)
        for path in ends:
            if not is_build_file(path):
                continue
            if change_type != DEPENDENCY_BUMP:
                reasons.append(f"build or dependency file changed outside a {DEPENDENCY_BUMP} task: "
                               f"{_show(path)}")
            elif not is_dependency_file(path):
                reasons.append(f"build file an agent may not change: {_show(path)}")
            elif change.status == "D" or (
                path == change.old_path and _dependency_kind(change.path) != _dependency_kind(path)
            ):
                reasons.append(f"dependency manifest removed: {_show(path)}")
    return _dedupe(reasons)


def run_gates(
    *,
    changed: Sequence[ChangedFile],
    branch: str,
    branch_prefix: str,
    change_type: str,
    change_type_paths: Sequence[str],
    allowed_paths: Sequence[str],
    blocked_paths: Sequence[str],
    dependency_reasons: Sequence[str] = (),
) -> list[str]:
    """All gates on one change: branch, paths (the repo's scope intersected with the change
    type's), build files, and, in a ``dependency-bump``, ``dependency_reasons``: what
    :func:`intake.workers.deps.gate.check_dependency_change` found, computed from trusted
    copies (see :mod:`workers.snapshot`). An empty list means it passes."""
    reasons = [
        *check_branch(branch, branch_prefix),
        *check_paths(changed, allowed_paths, blocked_paths, change_type_paths),
        *check_build_files(changed, change_type),
    ]
    if change_type == DEPENDENCY_BUMP:
        reasons += dependency_reasons
    return reasons
