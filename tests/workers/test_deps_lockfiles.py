"""Lockfile parsers (workers/deps/lockfiles.py), with hostile and malformed input."""

from __future__ import annotations

import json

import pytest

from intake.workers.deps.files import MAX_LOCKED_PACKAGES, ecosystem_of, is_dependency_file, lockfile_kind
from intake.workers.deps.lockfiles import Locked, parse_lockfile
from intake.workers.deps.manifests import ManifestError

SHA = "ab" * 32

UV_LOCK = f"""
version = 1
requires-python = ">=3.11"

[[package]]
name = "app"
version = "0.1.0"
source = {{ editable = "." }}

[[package]]
name = "Requests"
version = "2.32.3"
source = {{ registry = "https://pypi.org/simple" }}
sdist = {{ url = "https://files.pythonhosted.org/packages/requests-2.32.3.tar.gz", hash = "sha256:{SHA}", size = 1 }}

[[package]]
name = "evil"
version = "1.0"
source = {{ git = "https://evil.example/evil.git" }}

[[package]]
name = "idna"
version = "3.7"
source = {{ registry = "https://pypi.org/simple" }}
wheels = [{{ url = "https://evil.example/idna-3.7-py3-none-any.whl", hash = "sha256:{SHA}" }}]
"""


def test_kinds() -> None:
    assert [lockfile_kind(p) for p in ("uv.lock", "a/poetry.lock", "web/package-lock.json", "go.sum",
                                       "x/Cargo.lock", "yarn.lock")] == \
        ["uv", "poetry", "npm-lock", "go-sum", "cargo-lock", None]
    assert ecosystem_of("svc/requirements-dev.txt") == "pypi" and ecosystem_of("Cargo.lock") == "cargo"
    assert is_dependency_file("npm-shrinkwrap.json") and not is_dependency_file("yarn.lock")


def test_uv_lock() -> None:
    assert parse_lockfile("uv.lock", UV_LOCK) == [
        Locked("requests", "2.32.3", f"sha256:{SHA}"),
        Locked("evil", "1.0", None, None, '{"git": "https://evil.example/evil.git"}'),
        Locked("idna", "3.7", f"sha256:{SHA}", None, "https://evil.example/idna-3.7-py3-none-any.whl"),
    ]


def test_poetry_lock_new_and_old_file_tables() -> None:
    new = f'[[package]]\nname = "Flask_Login"\nversion = "0.6.3"\nfiles = [{{file = "f.whl", hash = "sha256:{SHA}"}}]\n'
    old = f'[[package]]\nname = "attrs"\nversion = "23.1"\n\n[metadata.files]\nattrs = [{{file = "a", hash = "sha256:{SHA}"}}]\n'
    assert parse_lockfile("poetry.lock", new) == [Locked("flask-login", "0.6.3", f"sha256:{SHA}")]
    assert parse_lockfile("poetry.lock", old) == [Locked("attrs", "23.1", f"sha256:{SHA}")]


def package_lock(packages: dict[str, dict[str, object]], version: int = 3) -> str:
    return json.dumps({"name": "web", "lockfileVersion": version,
                       "packages": {"": {"name": "web", "dependencies": {}}, **packages}})


def test_package_lock_v2_and_v3() -> None:
    packages = {
        "node_modules/axios": {"version": "1.7.9", "resolved": "https://registry.npmjs.org/axios/-/axios-1.7.9.tgz",
                               "integrity": "sha512-AAAA", "license": "MIT"},
        "node_modules/axios/node_modules/form-data": {"version": "4.0.1"},
        "node_modules/alias": {"name": "real-pkg", "version": "2.0.0"},
        "node_modules/local": {"link": True, "resolved": "packages/local"},
        "packages/local": {"version": "0.0.1"},
        "node_modules/gitdep": {"version": "1.0.0", "resolved": "git+ssh://git@evil.example/x.git#abc"},
        "node_modules/disguised": {"name": "left-pad", "version": "1.14.1",
                                   "resolved": "https://registry.npmjs.org/axios/-/axios-1.14.1.tgz"},
    }
    for version in (2, 3):
        assert parse_lockfile("package-lock.json", package_lock(packages, version)) == [
            Locked("axios", "1.7.9", "sha512-AAAA", "MIT"),
            Locked("form-data", "4.0.1"),
            Locked("real-pkg", "2.0.0"),
            Locked("gitdep", "1.0.0", None, None, "git+ssh://git@evil.example/x.git#abc"),
            Locked("left-pad", "1.14.1", None, None, "https://registry.npmjs.org/axios/-/axios-1.14.1.tgz"),
        ]


def test_go_sum_and_cargo_lock() -> None:
    go_sum = ("github.com/google/uuid v1.6.0 h1:abc=\n"
              "github.com/google/uuid v1.6.0/go.mod h1:def=\n\n")
    assert parse_lockfile("go.sum", go_sum) == [Locked("github.com/google/uuid", "v1.6.0", "h1:abc=")]
    cargo = (f'[[package]]\nname = "app"\nversion = "0.1.0"\n\n'
             f'[[package]]\nname = "Serde_Json"\nversion = "1.0.1"\n'
             f'source = "registry+https://github.com/rust-lang/crates.io-index"\nchecksum = "{SHA}"\n\n'
             f'[[package]]\nname = "x"\nversion = "0.1.0"\nsource = "git+https://evil.example/x#abc"\n')
    assert parse_lockfile("Cargo.lock", cargo) == [
        Locked("serde-json", "1.0.1", f"sha256:{SHA}"),
        Locked("x", "0.1.0", None, None, "git+https://evil.example/x#abc"),
    ]


@pytest.mark.parametrize(("path", "bad"), [
    ("uv.lock", "[[package]\n"),
    ("uv.lock", 'package = "x"'),
    ("uv.lock", '[[package]]\nname = 1\nversion = "1"\n'),
    ("poetry.lock", '[[package]]\nname = "x"\n'),
    ("package-lock.json", "{"),
    ("package-lock.json", json.dumps({"lockfileVersion": 1, "dependencies": {}})),
    ("package-lock.json", json.dumps({"lockfileVersion": 3, "packages": []})),
    ("package-lock.json", json.dumps({"lockfileVersion": 3, "packages": {"node_modules/x": {"version": 1}}})),
    ("package-lock.json", "[" * 100_000 + "]" * 100_000),  # deep nesting: RecursionError inside json
    ("go.sum", "github.com/x v1\n"),
    ("Cargo.lock", '[[package]]\nname = "x"\nsource = "registry+x"\n'),
])
def test_malformed_lockfiles_raise_manifest_error(path: str, bad: str) -> None:
    with pytest.raises(ManifestError):
        parse_lockfile(path, bad)


def test_too_many_packages_is_refused() -> None:
    line = "github.com/x/y v1.0.0 h1:abc=\n"
    with pytest.raises(ManifestError):
        parse_lockfile("go.sum", line * (MAX_LOCKED_PACKAGES + 1))


@pytest.mark.parametrize("version", ["1.0\n- evil", "", "1.0 2.0", "\x1b[31m1.0"])
def test_versions_are_plain_tokens(version: str) -> None:
    lock = json.dumps({"lockfileVersion": 3, "packages": {"node_modules/x": {"version": version}}})
    with pytest.raises(ManifestError):
        parse_lockfile("package-lock.json", lock)
