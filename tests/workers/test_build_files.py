"""Change-type scopes, the build-file list and the requirements parser (workers/gates.py)."""

from __future__ import annotations

import pytest

from intake.core.policy import Dependencies
from intake.workers.deps.gate import check_dependency_change
from intake.workers.gates import check_build_files, check_paths, is_build_file
from intake.workers.workspace import ChangedFile

DOCS = ("docs/**", "**/*.md")


def test_the_scope_is_the_intersection_of_repo_and_change_type() -> None:
    changed = [ChangedFile("docs/a.md", "A"), ChangedFile("README.md", "M"),
               ChangedFile("tests/conftest.py", "M"), ChangedFile("payments/keys/x.md", "A"),
               ChangedFile("src/x.md", "R", "src/x.py")]
    reasons = check_paths(changed, ["docs/**", "README.md", "tests/**", "src/**"], ["payments/**"], DOCS)
    assert reasons == [
        "path outside the change type's paths: tests/conftest.py",
        "blocked path: payments/keys/x.md",
        "path outside the change type's paths: src/x.py",  # the old end of a rename counts
    ]
    # The repo's own scope still applies inside the change type's.
    assert check_paths([ChangedFile("notes/x.md", "A")], ["docs/**"], [], DOCS) == [
        "path outside allowed paths: notes/x.md"
    ]
    assert check_paths([ChangedFile("docs/a.md", "A")], ["**"], [], ()) == [
        "path outside the change type's paths: docs/a.md"
    ]


@pytest.mark.parametrize("path", [
    "setup.py", "setup.cfg", "pyproject.toml", "Pipfile", "Pipfile.lock", "requirements.txt",
    "svc/requirements-dev.in", "constraints-ci.txt", "requirements/base.txt", "poetry.lock",
    "uv.lock", "pdm.lock", "package.json", "web/package-lock.json", "npm-shrinkwrap.json",
    "yarn.lock", "pnpm-lock.yaml", ".npmrc", "deep/dir/.yarnrc.yml", "pip.conf", "pip.ini",
    ".pypirc", "go.mod", "go.sum", "go.work", "go.work.sum", "Cargo.toml", "Cargo.lock",
    ".cargo/config", "crate/.cargo/config.toml", "Gemfile", "Gemfile.lock", "x.gemspec",
    "composer.json", "composer.lock", "build.gradle", "app/build.gradle.kts", "pom.xml",
    "Makefile", "rules.mk", "tox.ini", "noxfile.py", ".pre-commit-config.yaml", "Dockerfile",
    "docker/Dockerfile.dev", "api.dockerfile", "Containerfile",
    # Case does not help: a case-insensitive checkout would treat these as the real thing.
    "REQUIREMENTS.TXT", "Docs/Package.JSON", "SETUP.PY", ".NPMRC",
])
def test_build_files_are_recognised_anywhere(path: str) -> None:
    assert is_build_file(path)


@pytest.mark.parametrize("path", ["docs/setup.md", "requirements.md", "notes.txt", "src/app.py",
                                  "docs/makefile-howto.md", "cargo/readme.md", "tests/test_setup.py"])
def test_other_files_are_not_build_files(path: str) -> None:
    assert not is_build_file(path)


def test_build_files_change_only_in_a_dependency_bump() -> None:
    changed = [ChangedFile("tests/conftest.py", "M"), ChangedFile("poetry.lock", "M"),
               ChangedFile("docs/a.md", "R", "setup.cfg")]
    assert check_build_files(changed, "docs") == [
        "build or dependency file changed outside a dependency-bump task: poetry.lock",
        "build or dependency file changed outside a dependency-bump task: setup.cfg",
    ]
    bump = [ChangedFile("requirements.txt", "M"), ChangedFile("yarn.lock", "M"), ChangedFile("Makefile", "A"),
            ChangedFile("go.mod", "D"), ChangedFile("req/requirements.txt", "R", "requirements-old.txt"),
            ChangedFile("docs/x.md", "R", "requirements-gone.txt")]
    assert check_build_files(bump, "dependency-bump") == [
        "build file an agent may not change: yarn.lock",
        "build file an agent may not change: Makefile",
        "dependency manifest removed: go.mod",
        "dependency manifest removed: requirements-gone.txt",
    ]


def test_lockfiles_change_in_a_dependency_bump_but_are_never_removed() -> None:
    changed = [ChangedFile("uv.lock", "M"), ChangedFile("web/package-lock.json", "A"), ChangedFile("go.sum", "M"),
               ChangedFile("Cargo.lock", "D"), ChangedFile("poetry.lock", "R", "uv.lock"),
               ChangedFile("yarn.lock", "R", "web/package-lock.json")]
    assert check_build_files(changed, "dependency-bump") == [
        "dependency manifest removed: Cargo.lock",
        "dependency manifest removed: uv.lock",
        "dependency manifest removed: web/package-lock.json",
        "build file an agent may not change: yarn.lock",
    ]


BASE = "pytest==8.0\n-r requirements-base.txt\n--only-binary :all:\n"


def requirement_reasons(line: str, path: str = "requirements.txt", allow: tuple[str, ...] = ("pytest",)
                        ) -> list[str]:
    before, after = {path: BASE}, {path: BASE + line + "\n"}
    return check(path, before, after, allow)


def check(path: str, before: dict[str, str], after: dict[str, str], allow: tuple[str, ...]) -> list[str]:
    rules = Dependencies.model_validate({"allow": [f"pypi:{a}" for a in allow], "licenses": {"unknown": "allow"}})
    return check_dependency_change([ChangedFile(path, "M")], before.get, after.get, rules).reasons


@pytest.mark.parametrize("line", [
    "--index=https://evil.example/simple",
    "--index https://evil.example/simple",
    "--extra-index=https://evil.example/simple",
    "--extra-index-url https://evil.example/simple",
    "--index-url=https://evil.example/simple",
    "-i https://evil.example/simple",
    "-ihttps://evil.example/simple",
    "--find=https://evil.example/wheels",
    "-f ./wheels",
    "--find-links /tmp/wheels",
    "--trusted=evil.example",
    "--trusted-host evil.example",
    "--no-index",
    "--no-binary :all:",
    "-e git+https://evil.example/x.git#egg=pytest",
    "--editable=./vendor/pytest",
    "-r https://evil.example/requirements.txt",
    "-r /etc/requirements.txt",
    "-r ../../requirements.txt",
    "-r extra-deps.txt",
    "-c ${CONSTRAINTS}",
    "--constraint=~/constraints.txt",
    "pytest @ https://evil.example/pytest.whl",
    "git+https://evil.example/pytest.git#egg=pytest",
    "./vendor/pytest",
    "pytest==8.1 --global-option=--build",
    "pytest==8.1 --hash=md5:0123",
])
def test_refused_requirement_lines_are_never_allowlisted(line: str) -> None:
    reasons = requirement_reasons(line)
    assert reasons == [f"dependency: requirement line not allowed: {' '.join(line.split())} (requirements.txt)"]


@pytest.mark.parametrize("line", [
    "--pre", "--require-hashes", "--prefer-binary", "--only-binary=pytest",
    "-r requirements-base.txt", "-r ./requirements/extra.txt", "-c constraints.txt",
    "pytest==8.1", "pytest[testing]>=8.1 ; python_version >= '3.11'",
    f"pytest==8.1 --hash=sha256:{'a' * 64}", "# a comment",
])
def test_safe_requirement_lines_pass_for_allowlisted_packages(line: str) -> None:
    assert requirement_reasons(line) == []


def test_includes_resolve_relative_to_the_manifest() -> None:
    # svc/requirements.txt including ../requirements-base.txt stays inside the tree.
    assert requirement_reasons("-r ../requirements-base.txt", "svc/requirements.txt") == []
    assert requirement_reasons("-r ../../requirements-base.txt", "svc/requirements.txt") == [
        "dependency: requirement line not allowed: -r ../../requirements-base.txt (svc/requirements.txt)"
    ]


def test_requirement_lines_use_a_real_parser() -> None:
    assert requirement_reasons("Flask_Login[extra]>=0.6", allow=("pytest", "flask-login")) == []
    assert requirement_reasons("pytest (>=8") == [
        "dependency: unparseable dependency file: requirements.txt"
    ]
    # An existing refused line that the change leaves alone is not the agent's doing.
    before = {"requirements.txt": "--index-url https://internal.example/simple\npytest==8.0\n"}
    after = {"requirements.txt": "--index-url https://internal.example/simple\npytest==8.1\n"}
    assert check("requirements.txt", before, after, ("pytest",)) == []
