"""Manifest parsers: what a requirements file, pyproject, package.json, go.mod or Cargo.toml
asks for, as ``(section, reported name) -> canonical spec``.

A dependency from outside the package index (a URL, VCS or path source, a new index, a Go
``replace``, a Cargo ``patch``) and a refused requirements line (see ``_SAFE_FLAGS``) are named
by their raw text under a section of their own, so no allowlisted *name* admits them. Python
names are PEP 503 normalised, crate names lower-cased with ``_`` as ``-``.

Every parser is pure: text in, a dict out, nothing executed, nothing fetched. Input is hostile;
anything that does not parse raises :class:`ManifestError`.
"""

from __future__ import annotations

import json
import posixpath
import re
import tomllib
from collections.abc import Callable, Sequence
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from intake.core.paths import is_safe_path

from .files import manifest_kind


class ManifestError(Exception):
    """A manifest or lockfile could not be read as its format."""


# A parsed manifest: (section, reported name) -> a canonical string of its version spec. The
# section is part of the key so that moving a dependency (dev -> runtime) counts as a change.
Deps = dict[tuple[str, str], str]


def normalize_python_name(name: str) -> str:
    """PEP 503 normalisation: ``Foo.Bar_baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def normalize_crate_name(name: str) -> str:
    # crates.io treats "-" and "_" as the same name, and names are case-insensitive.
    return name.lower().replace("_", "-")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _requirement(text: str) -> Requirement:
    try:
        return Requirement(text)
    except InvalidRequirement:
        raise ManifestError from None


def _spec_of(req: Requirement, hashes: Sequence[str] = ()) -> str:
    return _canonical([sorted(req.extras), str(req.specifier), str(req.marker or ""), sorted(hashes)])


def _pep508(requirement: str) -> tuple[str, str]:
    """(reported name, spec) for a PEP 508 string; a direct URL reference is named raw."""
    if not isinstance(requirement, str):
        raise ManifestError
    req = _requirement(requirement)
    if req.url is not None:
        # "name @ https://…": a source outside the index; an allowed *name* must not admit it.
        return " ".join(requirement.split()), ""
    return normalize_python_name(req.name), _spec_of(req)


def _add_pep508(deps: Deps, section: str, requirements: Any) -> None:
    if not isinstance(requirements, list):
        raise ManifestError
    for requirement in requirements:
        name, spec = _pep508(requirement)
        deps[(section, name)] = spec


def _table(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError
    return value


def _poetry_deps(deps: Deps, section: str, table: Any) -> None:
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


def _parse_pyproject(text: str) -> Deps:
    data = tomllib.loads(text)
    deps: Deps = {}
    project = _table(data.get("project"))
    _add_pep508(deps, "project", project.get("dependencies", []))
    for group, reqs in _table(project.get("optional-dependencies")).items():
        _add_pep508(deps, f"optional:{group}", reqs)
    # Build requirements run code at build time: they count like any other dependency.
    _add_pep508(deps, "build-system", _table(data.get("build-system")).get("requires", []))
    for group, reqs in _table(data.get("dependency-groups")).items():  # PEP 735
        if not isinstance(reqs, list):
            raise ManifestError
        _add_pep508(deps, f"group:{group}", [r for r in reqs if not isinstance(r, dict)])
    tool = _table(data.get("tool"))
    # What uv sync and pdm install install beside the project's own tables: dependency groups.
    _add_pep508(deps, "group:tool.uv.dev-dependencies", _table(tool.get("uv")).get("dev-dependencies", []))
    for group, reqs in _table(_table(tool.get("pdm")).get("dev-dependencies")).items():
        _add_pep508(deps, f"group:tool.pdm.dev-dependencies.{group}", reqs)
    # Where packages come from, and what builds them: a change here redirects every dependency,
    # so it is named by its table and can never be admitted by an allowlisted package name.
    uv = _table(tool.get("uv"))
    redirects = {
        "tool.uv.sources": uv.get("sources"), "tool.uv.index": uv.get("index"),
        "tool.uv.index-url": uv.get("index-url"), "tool.uv.extra-index-url": uv.get("extra-index-url"),
        "tool.uv.find-links": uv.get("find-links"),
        "tool.uv.override-dependencies": uv.get("override-dependencies"),
        "tool.uv.constraint-dependencies": uv.get("constraint-dependencies"),
        "tool.uv.build-constraint-dependencies": uv.get("build-constraint-dependencies"),
        "tool.poetry.source": _table(tool.get("poetry")).get("source"),
        "tool.pdm.source": _table(tool.get("pdm")).get("source"),
        "tool.setuptools.dynamic": _table(tool.get("setuptools")).get("dynamic"),  # e.g. deps from a file
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


def _parse_requirements(text: str, path: str = "requirements.txt") -> Deps:
    """pip's requirements format: one PEP 508 requirement per line (parsed by ``packaging``),
    with ``--hash`` options only; option lines from the safe set only. A refused line is kept
    under the ``refused`` section, so that adding it is a change no allowlist admits."""
    deps: Deps = {}
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


def _parse_package_json(text: str) -> Deps:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ManifestError
    deps: Deps = {}
    for section in _NPM_SECTIONS:
        for name, spec in _table(data.get(section)).items():
            if not isinstance(spec, str):
                raise ManifestError
            deps[(section, _npm_name(name, spec))] = spec
    # Overrides and resolutions redirect what any dependency resolves to.
    for section in ("overrides", "resolutions"):
        for name, value in _table(data.get(section)).items():
            reported = _npm_name(name, value) if isinstance(value, str) else name
            deps[(section, reported)] = _canonical(value)
    return deps


def _go_unquote(token: str) -> str:
    return token[1:-1] if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"`" else token


def _go_entry(deps: Deps, directive: str, words: list[str]) -> None:
    if directive == "require":
        if len(words) != 2:
            raise ManifestError
        deps[("require", _go_unquote(words[0]))] = words[1]
    elif directive == "replace":
        if "=>" not in words:
            raise ManifestError
        # A replacement points a module at another source: named by the whole directive.
        deps[("replace", "replace " + " ".join(words))] = ""


_GO_OTHER = {"module", "go", "toolchain", "exclude", "retract", "tool", "godebug", "ignore"}


def _parse_go_mod(text: str) -> Deps:
    deps: Deps = {}
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
            raise ManifestError
    if block is not None:
        raise ManifestError
    return deps


_CARGO_SECTIONS = (
    "dependencies", "dev-dependencies", "build-dependencies",
    "dev_dependencies", "build_dependencies",
)


def _cargo_name(name: str, value: Any) -> str:
    if isinstance(value, str):
        return normalize_crate_name(name)
    if not isinstance(value, dict):
        raise ManifestError
    # `alias = { package = "real" }` depends on "real", whatever the key says.
    real = normalize_crate_name(str(value.get("package", name)))
    for key in ("git", "path", "registry", "registry-index"):
        if key in value:
            return f"{real} @ {value[key]}"
    return real


def _parse_cargo(text: str) -> Deps:
    data = tomllib.loads(text)
    deps: Deps = {}
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


# The tables the parsers above read, as key paths ("*" is any key). Everything else in a
# manifest (npm scripts, a Cargo build script, a hatch environment, ...) can run or install
# code that no dependency entry names: see :func:`unread_part`.
_READ_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {
    "pyproject": (
        ("project", "dependencies"), ("project", "optional-dependencies"), ("dependency-groups",),
        ("build-system", "requires"), ("build-system", "build-backend"), ("build-system", "backend-path"),
        ("tool", "uv", "dev-dependencies"), ("tool", "uv", "sources"), ("tool", "uv", "index"),
        ("tool", "uv", "index-url"), ("tool", "uv", "extra-index-url"), ("tool", "uv", "find-links"),
        ("tool", "uv", "override-dependencies"), ("tool", "uv", "constraint-dependencies"),
        ("tool", "uv", "build-constraint-dependencies"), ("tool", "pdm", "dev-dependencies"),
        ("tool", "pdm", "source"), ("tool", "poetry", "source"), ("tool", "setuptools", "dynamic"),
        ("tool", "poetry", "dependencies"), ("tool", "poetry", "dev-dependencies"),
        ("tool", "poetry", "group", "*", "dependencies"),
    ),
    "npm": tuple((s,) for s in (*_NPM_SECTIONS, "overrides", "resolutions")),
    "cargo": (
        *((s,) for s in _CARGO_SECTIONS), *(("target", "*", s) for s in _CARGO_SECTIONS),
        *(("workspace", s) for s in _CARGO_SECTIONS), ("patch",), ("replace",),
    ),
}


def _drop(value: Any, path: tuple[str, ...]) -> None:
    if not path or not isinstance(value, dict):
        return
    keys = list(value) if path[0] == "*" else [path[0]]
    for key in keys:
        if key not in value:
            continue
        if len(path) > 1:
            _drop(value[key], path[1:])
        if len(path) == 1 or value[key] == {}:  # a table left empty says nothing either
            del value[key]


def unread_part(path: str, text: str) -> str:
    """Everything of manifest ``path`` that :func:`parse_manifest` does not read as a
    dependency or a package source, as one canonical string: a dependency-bump must leave it
    alone. A requirements file is read whole; of go.mod only the ``go`` version is left out
    (``go get`` raises it when a module needs a newer Go). Raises :class:`ManifestError` like
    :func:`parse_manifest`."""
    kind = manifest_kind(path)
    try:
        if kind == "requirements":
            return ""
        if kind == "go":
            lines, block = [], None
            for raw in text.splitlines():
                words = raw.split("//", 1)[0].split()
                if block is not None:
                    block = None if words == [")"] else block
                    if block == "other":
                        lines.append(" ".join(words))
                    continue
                if not words:
                    continue
                if words[0] in {"require", "replace"} or (words[0] == "go" and len(words) == 2):
                    block = "dependencies" if words[-1] == "(" else None
                    continue
                block = "other" if words[-1] == "(" else None
                lines.append(" ".join(words))
            return "\n".join(lines)
        data = tomllib.loads(text) if kind in {"pyproject", "cargo"} else json.loads(text)
        if not isinstance(data, dict):
            raise ManifestError
        for read in _READ_PATHS[kind or ""]:
            _drop(data, read)
        return _canonical(data)
    except ManifestError:
        raise
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise ManifestError(type(exc).__name__) from None


# What a NEW manifest may hold beside its dependency tables: identity fields that neither run
# nor fetch anything. Scripts, entry points, ``bin``, ``workspaces``, registry settings, build
# backends and every unknown key are refused: a new manifest has no base to compare with, so
# nothing but this list can vouch for it.
_IDENTITY: dict[str, tuple[tuple[str, ...], ...]] = {
    "npm": (("name",), ("version",), ("private",), ("description",)),
    "pyproject": (("project", "name"), ("project", "version"), ("project", "description")),
    "cargo": (("package", "name"), ("package", "version"), ("package", "description"), ("package", "publish")),
}


def _leaves(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(value, dict) and value:
        return [leaf for key, body in value.items() for leaf in _leaves(body, (*prefix, str(key)))]
    return [prefix]


def non_dependency_fields(path: str, text: str) -> list[str]:
    """The fields of manifest ``path`` outside its dependency tables and the inert identity
    fields (name, version, private, description; go.mod's ``module``), as dotted key paths (go.mod:
    its directives): what a NEW manifest may not hold. Raises :class:`ManifestError` like
    :func:`parse_manifest`."""
    kind = manifest_kind(path)
    rest = unread_part(path, text)
    if kind == "requirements":
        return []
    if kind == "go":
        lines = [line for line in rest.splitlines() if line.split()[0] != "module"]
        return [line.split()[0] for line in lines]
    data = json.loads(rest)
    for identity in _IDENTITY[kind or ""]:
        _drop(data, identity)
    return [".".join(leaf)[:80] for leaf in _leaves(data) if leaf]


_PARSERS: dict[str, Callable[[str], Deps]] = {
    "pyproject": _parse_pyproject,
    "requirements": _parse_requirements,  # given the manifest's path (for includes)
    "npm": _parse_package_json,
    "go": _parse_go_mod,
    "cargo": _parse_cargo,
}


def parse_manifest(path: str, text: str) -> Deps:
    """The dependencies manifest ``path`` (a :func:`manifest_kind`) declares in ``text``.

    Raises :class:`ManifestError` for anything that is not a well-formed manifest of its kind
    (including the ``ValueError`` of a TOML or JSON syntax error and odd shapes).
    """
    kind = manifest_kind(path)
    if kind is None:
        raise ManifestError(f"not a manifest: {path}")
    try:
        if kind == "requirements":
            return _parse_requirements(text, path)
        return _PARSERS[kind](text)
    except ManifestError:
        raise
    except (ValueError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        raise ManifestError(type(exc).__name__) from None
