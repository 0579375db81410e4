"""Gates: path patterns, branch names, and how run_gates combines them."""

from __future__ import annotations

import pytest

from intake.core.paths import glob_match, is_safe_path, validate_pattern
from intake.workers.gates import check_branch, check_paths, run_gates
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


# -- run_gates ------------------------------------------------------------------------------


def test_run_gates_combines_everything() -> None:
    manifest = ChangedFile("docs/requirements.txt", "M")
    changed = [manifest, ChangedFile("payments/keys/k.pem", "D"), ChangedFile("src/x.py", "A")]
    found = ["dependency: unlisted package: pypi:requests 2.32.0"]

    def gates(changed: list[ChangedFile], branch: str, dependency_reasons: list[str],
              change_type: str = "dependency-bump", scope: tuple[str, ...] = ("**/requirements*.txt",)
              ) -> list[str]:
        return run_gates(changed=changed, branch=branch, branch_prefix="intake",
                         change_type=change_type, change_type_paths=scope,
                         allowed_paths=["docs/**"], blocked_paths=["payments/keys/**"],
                         dependency_reasons=dependency_reasons)

    assert gates(changed, "main", found) == [
        "branch main is not under the prefix intake/",
        "blocked path: payments/keys/k.pem",
        "path outside allowed paths: src/x.py",
        *found,
    ]
    assert gates([manifest], "intake/T-1", []) == []
    # The same manifest edit in a docs task: a build file, whatever the dependencies say, and
    # no dependency reasons on top.
    assert gates([manifest], "intake/T-1", found, "docs", ("docs/**",)) == [
        "build or dependency file changed outside a dependency-bump task: docs/requirements.txt"
    ]
