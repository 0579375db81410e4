"""Gates on the change an agent produced, checked before anything is pushed.

Every function here is pure: it gets the changed paths and, for manifests, a way to read a
file's text before and after the change. Each returns a list of reasons, one line each; an
empty list means the change passes.

Path patterns (``allowed_paths``/``blocked_paths`` of a task spec) are anchored at the
repository root and use these rules:

* ``*`` matches any run of characters within one path segment, ``?`` exactly one character,
  ``[abc]``/``[a-z]``/``[!abc]`` one character of (or not of) a set; none of them matches ``/``.
* ``**`` as a whole segment matches any number of segments, including none: ``**/*.pem``
  matches ``k.pem`` and ``a/b/k.pem``; ``a/**/b`` matches ``a/b`` and ``a/x/y/b``.
* A trailing ``/**`` (or a trailing ``/``) matches the directory *itself* and everything
  beneath it: ``payments/keys/**`` matches ``payments/keys`` (say a file that replaced the
  directory) as well as ``payments/keys/a/b.pem``.
* A pattern without ``**`` matches at the root only: ``*.pem`` matches ``k.pem`` but not
  ``a/k.pem``. A leading ``/`` is allowed and means the same.
* ``\\`` escapes the next character.

Blocked patterns match case-insensitively (a checkout on a case-insensitive file system would
treat ``Payments/Keys`` as ``payments/keys``); allowed patterns match case-sensitively. Both
make the gate stricter, never looser.
"""

from __future__ import annotations

import json
import posixpath
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from intake.workers.snapshot import ChangedFile

ReadFile = Callable[[str], "str | None"]


# -- paths ----------------------------------------------------------------------------------


def is_safe_path(path: str) -> bool:
    """A clean repository-relative path: not empty or absolute, no ``.``/``..``/empty segment,
    no ``.git`` segment, no NUL. git never produces anything else, so anything else is refused.
    """
    if not path or path.startswith("/") or "\0" in path:
        return False
    return all(seg not in {"", ".", ".."} and seg.lower() != ".git" for seg in path.split("/"))


def _class(body: str) -> str:
    negate = body[:1] in {"!", "^"}
    if negate:
        body = body[1:]
    out = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            i += 1
            ch = body[i]
            out.append("\\" + ch if ch in "\\]^[-" else ch)
        else:
            out.append("\\" + ch if ch in "\\]^[" else ch)
        i += 1
    # A class never matches "/": a segment cannot contain one.
    return f"[^/{''.join(out)}]" if negate else f"(?!/)[{''.join(out)}]"


def _segment(seg: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(seg):
        ch = seg[i]
        if ch == "\\":
            i += 1
            out.append(re.escape(seg[i]) if i < len(seg) else re.escape("\\"))
        elif ch == "*":
            while i + 1 < len(seg) and seg[i + 1] == "*":  # "a**b" is just "a*b"
                i += 1
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            # "]" right after "[" (or "[!") is a literal member, as in fnmatch.
            j = i + 1
            if j < len(seg) and seg[j] in "!^":
                j += 1
            if j < len(seg) and seg[j] == "]":
                j += 1
            while j < len(seg) and seg[j] != "]":
                j += 2 if seg[j] == "\\" else 1
            if j >= len(seg):
                out.append(re.escape("["))  # unterminated: a literal "["
            else:
                out.append(_class(seg[i + 1 : j]))
                i = j
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


@lru_cache(maxsize=1024)
def _compile(pattern: str, case_sensitive: bool) -> re.Pattern[str]:
    pat = pattern[1:] if pattern.startswith("/") else pattern
    if pat.endswith("/"):
        pat += "**"
    segments = pat.split("/")
    if not pat or any(seg in {"", ".", ".."} for seg in segments):
        raise ValueError(f"invalid path pattern: {pattern!r}")
    regex = ""
    for index, seg in enumerate(segments):
        last = index == len(segments) - 1
        if seg == "**" and last:
            # Trailing "**": everything below, and the directory itself when there is one.
            regex = regex[:-1] + "(?:/.*)?" if regex else ".*"
        elif seg == "**":
            regex += "(?:[^/]+/)*"
        else:
            regex += _segment(seg) + ("" if last else "/")
    flags = re.DOTALL | (0 if case_sensitive else re.IGNORECASE)
    try:
        return re.compile(regex, flags)
    except re.error as exc:
        raise ValueError(f"invalid path pattern: {pattern!r}: {exc}") from None


def validate_pattern(pattern: str) -> None:
    """Raise ``ValueError`` if ``pattern`` is not a valid path pattern (see module docs)."""
    _compile(pattern, True)


def glob_match(pattern: str, path: str, *, case_sensitive: bool = True) -> bool:
    """Whether repository path ``path`` matches ``pattern`` (rules in the module docstring).

    An unsafe path (see :func:`is_safe_path`) matches nothing; :func:`check_paths` reports it.
    Raises ``ValueError`` for an invalid pattern.
    """
    if not is_safe_path(path):
        return False
    return _compile(pattern, case_sensitive).fullmatch(path) is not None


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


# -- dependencies ---------------------------------------------------------------------------


class _Unparseable(Exception):
    """A manifest could not be read as its format."""


# A parsed manifest: (section, reported name) -> a canonical string of its version spec. The
# section is part of the key so that moving a dependency (dev -> runtime) counts as a change.
_Deps = dict[tuple[str, str], str]


def normalize_python_name(name: str) -> str:
    """PEP 503 normalisation: ``Foo.Bar_baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _normalize_crate(name: str) -> str:
    # crates.io treats "-" and "_" as the same name, and names are case-insensitive.
    return name.lower().replace("_", "-")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


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


# Build and dependency files, matched by lower-cased file name anywhere in the tree: they say
# where packages come from and what runs at install, build or CI time. Only the manifests that
# :func:`manifest_kind` parses can be checked against the allowlist; an agent may never change
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
    at any depth. Only ``dependency-bump`` tasks may change one, and only a parsed manifest."""
    if manifest_kind(path) is not None:
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


def check_build_files(changed: Sequence[ChangedFile], change_type: str) -> list[str]:
    """Reasons for build and dependency files changed outside what ``change_type`` may do.

    Outside ``dependency-bump`` no build file may be added, changed, renamed or removed. In a
    ``dependency-bump`` only a parsed manifest may change (its dependencies then go through
    :func:`check_dependencies`), and none may be removed: removing or renaming a manifest away
    changes what gets installed without naming a package.
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
            elif manifest_kind(path) is None:
                reasons.append(f"build file an agent may not change: {_show(path)}")
            elif change.status == "D" or (
                path == change.old_path and manifest_kind(change.path) != manifest_kind(path)
            ):
                reasons.append(f"dependency manifest removed: {_show(path)}")
    return _dedupe(reasons)


def _requirement(text: str) -> Requirement:
    try:
        return Requirement(text)
    except InvalidRequirement:
        raise _Unparseable from None


def _spec_of(req: Requirement, hashes: Sequence[str] = ()) -> str:
    return _canonical([sorted(req.extras), str(req.specifier), str(req.marker or ""), sorted(hashes)])


def _pep508(requirement: str) -> tuple[str, str]:
    """(reported name, spec) for a PEP 508 string; a direct URL reference is named raw."""
    if not isinstance(requirement, str):
        raise _Unparseable
    req = _requirement(requirement)
    if req.url is not None:
        # "name @ https://…": a source outside the index; an allowed *name* must not admit it.
        return " ".join(requirement.split()), ""
    return normalize_python_name(req.name), _spec_of(req)


def _add_pep508(deps: _Deps, section: str, requirements: Any) -> None:
    if not isinstance(requirements, list):
        raise _Unparseable
    for requirement in requirements:
        name, spec = _pep508(requirement)
        deps[(section, name)] = spec


def _table(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Unparseable
    return value


def _poetry_deps(deps: _Deps, section: str, table: Any) -> None:
    for name, value in _table(table).items():
        if name.lower() == "python":  # the interpreter constraint, not a package
            continue
        entries = value if isinstance(value, list) else [value]
        sources = [
            str(e[key]) for e in entries if isinstance(e, dict)
            for key in ("git", "path", "url", "source") if key in e
        ]
        reported = normalize_python_name(name)
        if sources:
            reported = f"{reported} @ {sources[0]}"
        deps[(section, reported)] = _canonical(value)


def _parse_pyproject(text: str) -> _Deps:
    data = tomllib.loads(text)
    deps: _Deps = {}
    project = _table(data.get("project"))
    _add_pep508(deps, "project", project.get("dependencies", []))
    for group, reqs in _table(project.get("optional-dependencies")).items():
        _add_pep508(deps, f"optional:{group}", reqs)
    # Build requirements run code at build time: they count like any other dependency.
    _add_pep508(deps, "build-system", _table(data.get("build-system")).get("requires", []))
    for group, reqs in _table(data.get("dependency-groups")).items():  # PEP 735
        if not isinstance(reqs, list):
            raise _Unparseable
        _add_pep508(deps, f"group:{group}", [r for r in reqs if not isinstance(r, dict)])
    tool = _table(data.get("tool"))
    # Where packages come from, and what builds them: a change here redirects every dependency,
    # so it is named by its table and can never be admitted by an allowlisted package name.
    uv = _table(tool.get("uv"))
    redirects = {
        "tool.uv.sources": uv.get("sources"), "tool.uv.index": uv.get("index"),
        "tool.uv.index-url": uv.get("index-url"), "tool.uv.extra-index-url": uv.get("extra-index-url"),
        "tool.uv.find-links": uv.get("find-links"),
        "tool.poetry.source": _table(tool.get("poetry")).get("source"),
        "tool.pdm.source": _table(tool.get("pdm")).get("source"),
        "build-system.build-backend": _table(data.get("build-system")).get("build-backend"),
        "build-system.backend-path": _table(data.get("build-system")).get("backend-path"),
    }
    for where, value in redirects.items():
        if value is not None:
            deps[("source", f"{where} (package source or build backend)")] = _canonical(value)
    poetry = _table(tool.get("poetry"))
    _poetry_deps(deps, "poetry", poetry.get("dependencies"))
    _poetry_deps(deps, "poetry:dev", poetry.get("dev-dependencies"))
    for group, body in _table(poetry.get("group")).items():
        _poetry_deps(deps, f"poetry:{group}", _table(body).get("dependencies"))
    return deps


# Requirements-file options that neither add a package source nor run anything. Every other
# option line is refused, and pip's own abbreviations (optparse accepts any unambiguous prefix:
# "--index=" is "--index-url=", "--extra-index=", "--find=", "--trusted=") never match: only
# these exact names pass. "-r"/"-c" includes are allowed when they name a requirements file
# inside the tree, which the gates then see like any other manifest.
_SAFE_FLAGS = frozenset({"--require-hashes", "--prefer-binary", "--pre"})
_SAFE_VALUED = {"--only-binary": re.compile(r"[A-Za-z0-9:._,-]+")}
_INCLUDES = frozenset({"-r", "--requirement", "-c", "--constraint"})
_HASH = re.compile(r"(sha256|sha384|sha512):[0-9a-fA-F]{64,128}")
_URL_OR_PATH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*:|\.|/|~)")


def _option(line: str) -> tuple[str, str]:
    """(option name, value) of an option line: ``--name=v``, ``--name v``, ``-xv``, ``-x v``."""
    first, rest = line.split(None, 1)[0], " ".join(line.split()[1:])
    if first.startswith("--"):
        name, eq, value = first.partition("=")
        return name, (value + (" " + rest if rest else "")) if eq else rest
    return first[:2], first[2:] + (" " + rest if first[2:] and rest else rest)


def _include_target(path: str, value: str) -> str | None:
    """The repository path an include names, if it is a requirements file inside the tree."""
    if not value or "${" in value or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:|/|~", value):
        return None  # empty, an environment variable, a URL, absolute or home-relative
    target = posixpath.normpath(posixpath.join(posixpath.dirname(path), value))
    if target.startswith("../") or target in {".", ".."} or not is_safe_path(target):
        return None
    return target if manifest_kind(target) == "requirements" else None


def _refuse_option(line: str, path: str) -> str | None:
    """Why an option line is refused, or ``None`` for the safe set."""
    name, value = _option(line)
    if name in _SAFE_FLAGS:
        return None if not value else "unexpected value"
    if name in _SAFE_VALUED:
        return None if _SAFE_VALUED[name].fullmatch(value) else "unexpected value"
    if name in _INCLUDES:
        return None if _include_target(path, value) is not None else "include outside the tree"
    return "option not allowed"


def _parse_requirements(text: str, path: str = "requirements.txt") -> _Deps:
    """pip's requirements format: one PEP 508 requirement per line (parsed by ``packaging``),
    with ``--hash`` options only; option lines from the safe set only. A refused line is kept
    under the ``refused`` section, so that adding it is a change no allowlist admits."""
    deps: _Deps = {}
    joined = re.sub(r"\\\r?\n", " ", text)  # pip joins lines that end with a backslash
    for raw in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        shown = " ".join(line.split())
        if line.startswith("-"):
            why = _refuse_option(line, path)
            if why is not None:
                deps[("refused", shown)] = why
            continue
        if _URL_OR_PATH.match(line):
            # A URL, VCS or local path requirement has no index name to allow.
            deps[("refused", shown)] = "URL or path requirement"
            continue
        tokens = line.split()
        cut = next((i for i, t in enumerate(tokens) if t.startswith("-")), len(tokens))
        hashes, options = [], tokens[cut:]
        while options:
            opt = options.pop(0)
            value = opt.removeprefix("--hash=") if opt.startswith("--hash=") else (
                options.pop(0) if opt == "--hash" and options else None)
            if value is None or not _HASH.fullmatch(value):
                deps[("refused", shown)] = "per-requirement option not allowed"
                break
            hashes.append(value.lower())
        else:
            req = _requirement(" ".join(tokens[:cut]))
            if req.url is not None:
                deps[("refused", shown)] = "direct URL reference"
            else:
                deps[("requirements", normalize_python_name(req.name))] = _spec_of(req, hashes)
    return deps


_NPM_SECTIONS = ("dependencies", "devDependencies", "peerDependencies", "optionalDependencies")


def _npm_name(name: str, spec: str) -> str:
    if spec.startswith("npm:"):
        # "alias": "npm:real-package@^1" installs real-package under another name.
        target = spec[4:]
        at = target.find("@", 1)
        return target[:at] if at > 0 else target
    if ":" in spec or "/" in spec:
        # git, http(s), file, link, workspace or GitHub "user/repo": not the registry package.
        return f"{name}@{spec}"
    return name


def _parse_package_json(text: str) -> _Deps:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise _Unparseable
    deps: _Deps = {}
    for section in _NPM_SECTIONS:
        for name, spec in _table(data.get(section)).items():
            if not isinstance(spec, str):
                raise _Unparseable
            deps[(section, _npm_name(name, spec))] = spec
    # Overrides and resolutions redirect what any dependency resolves to.
    for section in ("overrides", "resolutions"):
        for name, value in _table(data.get(section)).items():
            reported = _npm_name(name, value) if isinstance(value, str) else name
            deps[(section, reported)] = _canonical(value)
    return deps


def _go_unquote(token: str) -> str:
    return token[1:-1] if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"`" else token


def _go_entry(deps: _Deps, directive: str, words: list[str]) -> None:
    if directive == "require":
        if len(words) != 2:
            raise _Unparseable
        deps[("require", _go_unquote(words[0]))] = words[1]
    elif directive == "replace":
        if "=>" not in words:
            raise _Unparseable
        # A replacement points a module at another source: named by the whole directive.
        deps[("replace", "replace " + " ".join(words))] = ""


_GO_OTHER = {"module", "go", "toolchain", "exclude", "retract", "tool", "godebug", "ignore"}


def _parse_go_mod(text: str) -> _Deps:
    deps: _Deps = {}
    block: str | None = None
    for raw in text.splitlines():
        words = raw.split("//", 1)[0].split()
        if not words:
            continue
        if block is not None:
            if words == [")"]:
                block = None
            elif block in {"require", "replace"}:
                _go_entry(deps, block, words)
            continue
        directive = words[0]
        if directive in {"require", "replace"}:
            if words[1:] == ["("]:
                block = directive
            else:
                _go_entry(deps, directive, words[1:])
        elif directive in _GO_OTHER:
            if words[-1] == "(":
                block = directive
        else:
            raise _Unparseable
    if block is not None:
        raise _Unparseable
    return deps


_CARGO_SECTIONS = (
    "dependencies", "dev-dependencies", "build-dependencies",
    "dev_dependencies", "build_dependencies",
)


def _cargo_name(name: str, value: Any) -> str:
    if isinstance(value, str):
        return _normalize_crate(name)
    if not isinstance(value, dict):
        raise _Unparseable
    # `alias = { package = "real" }` depends on "real", whatever the key says.
    real = _normalize_crate(str(value.get("package", name)))
    for key in ("git", "path", "registry", "registry-index"):
        if key in value:
            return f"{real} @ {value[key]}"
    return real


def _parse_cargo(text: str) -> _Deps:
    data = tomllib.loads(text)
    deps: _Deps = {}
    tables: list[tuple[str, dict[str, Any]]] = [("", data)]
    tables += [(f"target.{t}.", _table(body)) for t, body in _table(data.get("target")).items()]
    tables.append(("workspace.", _table(data.get("workspace"))))
    for prefix, table in tables:
        for section in _CARGO_SECTIONS:
            for name, value in _table(table.get(section)).items():
                key = (prefix + section.replace("_", "-"), _cargo_name(name, value))
                deps[key] = _canonical(value)
    # [patch.<registry>] and [replace] point existing crates at other sources.
    for registry, body in _table(data.get("patch")).items():
        for name, value in _table(body).items():
            deps[("patch", f"patch {registry} {_cargo_name(name, value)}")] = _canonical(value)
    for spec, value in _table(data.get("replace")).items():
        deps[("replace", f"replace {spec} {_canonical(value)}")] = ""
    return deps


_PARSERS: dict[str, Callable[[str], _Deps]] = {
    "pyproject": _parse_pyproject,
    "requirements": _parse_requirements,  # given the manifest's path (for includes)
    "npm": _parse_package_json,
    "go": _parse_go_mod,
    "cargo": _parse_cargo,
}


def _changed_keys(path: str, before: str | None, after: str | None) -> set[tuple[str, str]]:
    kind = manifest_kind(path)
    if kind is None or after is None or before == after:
        return set()
    parse = _PARSERS[kind]
    if kind == "requirements":
        def parse(text: str) -> _Deps:
            return _parse_requirements(text, path)
    try:
        old = parse(before) if before is not None else {}
        new = parse(after)
    except (_Unparseable, ValueError, TypeError, AttributeError, IndexError):
        # tomllib and json errors are ValueErrors; odd shapes give the others.
        return {("unparseable", f"{path}: unparseable manifest")}
    return {key for key, spec in new.items() if old.get(key) != spec}


def dependency_changes(path: str, before: str | None, after: str | None) -> set[str]:
    """Dependencies that ``path`` adds or whose version spec it changes.

    ``before``/``after`` are the file's text (``None``: absent). Python names are PEP 503
    normalised, crate names lower-cased with ``_`` as ``-``. A dependency from outside the
    package index (a URL, VCS or path source, a new index, a Go ``replace``, a Cargo ``patch``)
    and a refused requirements line (see ``_SAFE_FLAGS``) are named by their raw text, so an
    allowlisted *name* never admits them. A manifest that does not parse yields
    ``{"<path>: unparseable manifest"}``. Other files yield nothing.
    """
    return {name for _, name in _changed_keys(path, before, after)}


def _allowed_names(kind: str, allowlist: Sequence[str]) -> set[str]:
    names = set(allowlist)
    if kind in {"pyproject", "requirements"}:
        names |= {normalize_python_name(a) for a in allowlist}
    elif kind == "cargo":
        names |= {_normalize_crate(a) for a in allowlist}
    return names


def check_dependencies(
    changed: Sequence[ChangedFile],
    read_before: ReadFile,
    read_after: ReadFile,
    allowlist: Sequence[str],
) -> list[str]:
    """Reasons for each dependency a changed manifest adds or re-specs outside ``allowlist``.

    ``read_before``/``read_after`` return a path's text at the base and in the change
    (``None`` if absent). A manifest renamed from another manifest of the same kind is compared
    with its old content; otherwise a renamed-in manifest counts as new.
    """
    reasons = []
    for change in changed:
        kind = manifest_kind(change.path)
        if kind is None or change.status == "D":
            continue
        before: str | None = None
        if change.status == "M":
            before = read_before(change.path)
        elif change.status == "R" and change.old_path and manifest_kind(change.old_path) == kind:
            before = read_before(change.old_path)
        keys = _changed_keys(change.path, before, read_after(change.path))
        allowed = _allowed_names(kind, allowlist)
        for section, name in sorted(keys, key=lambda k: (k[0] != "refused", k[1])):
            if section == "refused":
                # Never admitted, whatever the allowlist says: it is not a package.
                reasons.append(f"requirement line not allowed: {_show(name)} ({_show(change.path)})")
            elif name not in allowed:
                reasons.append(f"dependency not on the allowlist: {_show(name)} ({_show(change.path)})")
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
    read_before: ReadFile,
    read_after: ReadFile,
    dependency_allowlist: Sequence[str],
) -> list[str]:
    """All gates on one change: branch, paths (the repo's scope intersected with the change
    type's), build files, and, in a ``dependency-bump``, the dependencies its manifests change.
    An empty list means it passes. ``read_before``/``read_after`` must read trusted copies
    (see :mod:`workers.snapshot`), never anything the agent could have rewritten."""
    reasons = [
        *check_branch(branch, branch_prefix),
        *check_paths(changed, allowed_paths, blocked_paths, change_type_paths),
        *check_build_files(changed, change_type),
    ]
    if change_type == DEPENDENCY_BUMP:
        reasons += check_dependencies(changed, read_before, read_after, dependency_allowlist)
    return reasons
