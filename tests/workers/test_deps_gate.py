"""The dependency gate (workers/deps/): delta from manifests and lockfiles before and after,
checked against a real parsed policy section, and the SBOM it records."""

from __future__ import annotations

import json
from typing import Any

import pytest

from intake.core.models import canonical_json, sha256_hex
from intake.core.policy import Dependencies
from intake.core.versions import PackageRef
from intake.workers.deps.delta import compute_delta
from intake.workers.deps.files import MAX_DEPENDENCY_FILE_BYTES
from intake.workers.deps.gate import DependencyCheck, check_dependency_change
from intake.workers.deps.sbom import purl_of
from intake.workers.snapshot import ChangedFile

SHA = "ab" * 32
GPL_DENIED = {"denied": ["GPL-2.0-only", "GPL-2.0-or-later", "GPL-3.0-only", "GPL-3.0-or-later"]}


def rules(**section: Any) -> Dependencies:
    section.setdefault("licenses", {"unknown": "allow"})
    return Dependencies.model_validate(section)


def gate(before: dict[str, str], after: dict[str, str], policy: Dependencies) -> DependencyCheck:
    changed = [ChangedFile(p, "M" if p in before else "A") for p in sorted(after) if before.get(p) != after[p]]
    changed += [ChangedFile(p, "D") for p in sorted(before) if p not in after]
    return check_dependency_change(changed, before.get, after.get, policy)


def package_json(deps: dict[str, str]) -> str:
    return json.dumps({"name": "web", "dependencies": deps})


def package_lock(locked: dict[str, dict[str, Any]]) -> str:
    return json.dumps({"name": "web", "lockfileVersion": 3, "packages": {
        "": {"name": "web"},
        **{f"node_modules/{n}": {"resolved": f"https://registry.npmjs.org/{n}/-/{n}.tgz", **e} for n, e in locked.items()},
    }})


def npm_change(version: str, integrity: str | None = "sha512-AAAA", license: str | None = "MIT",
               spec: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    before = {"web/package.json": package_json({}), "web/package-lock.json": package_lock({})}
    entry: dict[str, Any] = {"version": version}
    if integrity:
        entry["integrity"] = integrity
    if license:
        entry["license"] = license
    after = {"web/package.json": package_json({"axios": spec or version}),
             "web/package-lock.json": package_lock({"axios": entry})}
    return before, after


AXIOS = rules(allow=[{"package": "npm:axios", "version": ">=1.7 <2"}, "npm:left-pad"],
              deny=["npm:axios@1.14.1", "npm:axios@0.30.4"])


def test_an_allowed_npm_version_passes_with_its_lockfile_facts() -> None:
    check = gate(*npm_change("1.7.9"), AXIOS)
    assert check.reasons == []
    assert check.entries == [{"ecosystem": "npm", "name": "axios", "before": None, "after": "1.7.9",
                              "change": "added", "license": "MIT", "integrity": "sha512-AAAA"}]


@pytest.mark.parametrize("version", ["1.14.1", "0.30.4"])
def test_a_denylisted_version_is_blocked_naming_it_whatever_the_allowlist_says(version: str) -> None:
    anything = rules(allow=["npm:axios"], deny=["npm:axios@1.14.1", "npm:axios@0.30.4"])
    for policy in (AXIOS, anything):
        assert gate(*npm_change(version), policy).reasons == [f"dependency: denylisted version: npm:axios {version}"]


def test_a_denylisted_version_hidden_behind_a_range_is_found_in_the_lockfile() -> None:
    assert gate(*npm_change("1.14.1", spec="^1.7.0"), AXIOS).reasons == [
        "dependency: denylisted version: npm:axios 1.14.1"
    ]


def test_a_denylisted_package_and_an_unpinned_version_of_one_with_denied_versions() -> None:
    policy = rules(allow=["npm:event-stream", "npm:axios"], deny=["npm:event-stream", "npm:axios@1.14.1"])
    before, after = {"package.json": package_json({})}, {"package.json": package_json({"event-stream": "^3", "axios": "^1"})}
    assert gate(before, after, policy).reasons == [
        "dependency: denylisted versions exist and none is pinned: npm:axios (version not pinned)",
        "dependency: denylisted package: npm:event-stream (version not pinned)",
    ]


def test_version_outside_the_specifier_and_unlisted_packages() -> None:
    assert gate(*npm_change("2.0.0"), AXIOS).reasons == [
        "dependency: version outside specifier: npm:axios 2.0.0 (allowed: '>=1.7 <2')"
    ]
    assert gate(*npm_change("1.7.9"), rules(allow=["npm:lodash"])).reasons == ["dependency: unlisted package: npm:axios 1.7.9"]


def test_an_allowed_pypi_name_never_admits_the_npm_package_of_that_name() -> None:
    before = {"package.json": package_json({})}
    after = {"package.json": package_json({"mypy": "1.0.0"})}
    assert gate(before, after, rules(allow=["pypi:mypy"])).reasons == ["dependency: unlisted package: npm:mypy 1.0.0"]
    after_py = {"requirements.txt": "MyPy==1.11.0\n"}
    assert gate({}, after_py, rules(allow=["pypi:mypy"])).reasons == []
    assert gate({}, after_py, rules(allow=["npm:mypy"])).reasons == ["dependency: unlisted package: pypi:mypy 1.11.0"]


def test_pypi_specifiers_are_pep_440() -> None:
    policy = rules(allow=[{"package": "pypi:Ruff", "version": ">=0.5,<1"}])
    assert gate({}, {"requirements.txt": "ruff==0.6.1\n"}, policy).reasons == []
    assert gate({}, {"requirements.txt": "ruff==0.4\n"}, policy).reasons == [
        "dependency: version outside specifier: pypi:ruff 0.4 (allowed: '>=0.5,<1')"
    ]
    # A range without a lockfile gives no version: a specifier entry cannot be satisfied.
    assert gate({}, {"requirements.txt": "ruff>=0.5\n"}, policy).reasons == [
        "dependency: version outside specifier: pypi:ruff (version not pinned) (allowed: '>=0.5,<1')"
    ]


def test_licenses_gpl_denied_unknown_blocked_allowed_list() -> None:
    denying = rules(allow=["npm:axios"], licenses=GPL_DENIED)
    assert gate(*npm_change("1.7.9", license="GPL-3.0-only"), denying).reasons == [
        "dependency: denied license: npm:axios 1.7.9 (GPL-3.0-only)"
    ]
    assert gate(*npm_change("1.7.9", license="MIT OR GPL-3.0-only"), denying).reasons == []
    assert gate(*npm_change("1.7.9", license="MIT AND GPL-2.0-or-later"), denying).reasons == [
        "dependency: denied license: npm:axios 1.7.9 (MIT AND GPL-2.0-or-later)"
    ]
    assert gate(*npm_change("1.7.9", license=None), denying).reasons == ["dependency: unknown license: npm:axios 1.7.9"]
    assert gate(*npm_change("1.7.9", license="SEE LICENSE IN x"), denying).reasons == [
        "dependency: unknown license: npm:axios 1.7.9 ('SEE LICENSE IN x' is not an SPDX expression)"
    ]
    only_mit = rules(allow=["npm:axios"], licenses={"allowed": ["MIT"]})
    assert gate(*npm_change("1.7.9", license="ISC"), only_mit).reasons == [
        "dependency: denied license: npm:axios 1.7.9 (ISC)"
    ]
    # The allowlist entry's license stands in where the lockfile says nothing.
    by_entry = rules(allow=[{"package": "pypi:gplthing", "license": "GPL-3.0-or-later"}], licenses=GPL_DENIED)
    assert gate({}, {"requirements.txt": "gplthing==1.0\n"}, by_entry).reasons == [
        "dependency: denied license: pypi:gplthing 1.0 (GPL-3.0-or-later)"
    ]


def test_integrity_required() -> None:
    policy = rules(allow=["npm:axios", "pypi:attrs"], require_integrity=True)
    assert gate(*npm_change("1.7.9", integrity=None), policy).reasons == ["dependency: missing integrity hash: npm:axios 1.7.9"]
    assert gate(*npm_change("1.7.9"), policy).reasons == []
    assert gate({}, {"requirements.txt": "attrs==23.1\n"}, policy).reasons == [
        "dependency: missing integrity hash: pypi:attrs 23.1"
    ]
    assert gate({}, {"requirements.txt": f"attrs==23.1 --hash=sha256:{SHA}\n"}, policy).reasons == []


def test_upgrades_downgrades_removals_and_a_swapped_hash() -> None:
    before = {"requirements.txt": f"attrs==23.1 --hash=sha256:{SHA}\nidna==3.7\nsix==1.16\n"}
    after = {"requirements.txt": f"attrs==23.2\nidna==3.6\nsix==1.16 --hash=sha256:{'cd' * 32}\n"}
    check = gate(before, after, rules(allow=["pypi:attrs", "pypi:idna", "pypi:six"]))
    assert [(e["name"], e["before"], e["after"], e["change"]) for e in check.entries] == [
        ("attrs", "23.1", "23.2", "upgraded"), ("idna", "3.7", "3.6", "downgraded"), ("six", "1.16", "1.16", "changed"),
    ]
    before[("requirements.txt")] = f"six==1.16 --hash=sha256:{SHA}\n"
    swapped = {"requirements.txt": f"six==1.16 --hash=sha256:{'cd' * 32}\n"}
    assert gate(before, swapped, rules(allow=["pypi:six"])).reasons == [
        "dependency: integrity hash changed for an unchanged version: pypi:six 1.16"
    ]
    removed = gate({"requirements.txt": "six==1.16\n"}, {"requirements.txt": "\n"}, rules())
    assert removed.reasons == [] and removed.entries[0]["change"] == "removed"


def test_transitive_packages_in_a_lockfile_must_be_allowed_too() -> None:
    before, after = npm_change("1.7.9")
    lock = json.loads(after["web/package-lock.json"])
    lock["packages"]["node_modules/plain-crypto-js"] = {
        "version": "4.2.1", "resolved": "https://registry.npmjs.org/plain-crypto-js/-/plain-crypto-js-4.2.1.tgz"}
    after["web/package-lock.json"] = json.dumps(lock)
    assert gate(before, after, AXIOS).reasons == ["dependency: unlisted package: npm:plain-crypto-js 4.2.1"]


def test_uv_lock_and_pyproject_together() -> None:
    pyproject = '[project]\nname = "app"\ndependencies = [%s]\n'
    lock = ('version = 1\n[[package]]\nname = "app"\nversion = "0"\nsource = { editable = "." }\n' +
            '[[package]]\nname = "attrs"\nversion = "%s"\nsource = { registry = "https://pypi.org/simple" }\n'
            f'sdist = {{ url = "https://files.pythonhosted.org/a.tgz", hash = "sha256:{SHA}" }}\n')
    before = {"pyproject.toml": pyproject % '"attrs>=23"', "uv.lock": lock % "23.1"}
    after = {"pyproject.toml": pyproject % '"attrs>=23"', "uv.lock": lock % "24.2"}
    policy = rules(allow=[{"package": "pypi:attrs", "version": ">=23"}], require_integrity=True)
    check = gate(before, after, policy)
    assert check.reasons == [] and check.entries[0]["change"] == "upgraded"
    assert check.entries[0]["integrity"] == f"sha256:{SHA}"
    # The lockfile must honour the manifest: a locked version outside its spec is refused.
    outside = {"pyproject.toml": pyproject % '"attrs>=25"', "uv.lock": lock % "24.2"}
    assert gate(before, outside, policy).reasons == [
        "dependency: lockfile mismatch: pypi:attrs is locked at 24.2 outside '>=25' of pyproject.toml"
    ]


def test_go_mod_and_go_sum() -> None:
    before = {"go.mod": "module x\n\ngo 1.22\n", "go.sum": ""}
    after = {"go.mod": "module x\n\ngo 1.22\n\nrequire github.com/google/uuid v1.6.0\n",
             "go.sum": "github.com/google/uuid v1.6.0 h1:abc=\ngithub.com/google/uuid v1.6.0/go.mod h1:d=\n"}
    policy = rules(allow=[{"package": "go:github.com/google/uuid", "version": ">=1.6,<2"}], require_integrity=True)
    check = gate(before, after, policy)
    assert check.reasons == []
    assert check.entries == [{"ecosystem": "go", "name": "github.com/google/uuid", "before": None, "after": "v1.6.0",
                              "change": "added", "license": None, "integrity": "h1:abc="}]
    hidden = {**after, "go.sum": ""}
    assert gate(before, hidden, policy).reasons == [
        "dependency: lockfile mismatch: go:github.com/google/uuid is in go.mod but not in go.sum",
        "dependency: missing integrity hash: go:github.com/google/uuid v1.6.0",
    ]


def test_cargo_toml_and_lock() -> None:
    toml = '[package]\nname = "app"\n\n[dependencies]\n%s'
    lock = (f'[[package]]\nname = "app"\nversion = "0.1.0"\n\n[[package]]\nname = "serde"\nversion = "%s"\n'
            f'source = "registry+https://github.com/rust-lang/crates.io-index"\nchecksum = "{SHA}"\n')
    before = {"Cargo.toml": toml % 'serde = "1"\n', "Cargo.lock": lock % "1.0.100"}
    after = {"Cargo.toml": toml % 'serde = "1"\n', "Cargo.lock": lock % "1.0.200"}
    policy = rules(allow=[{"package": "cargo:serde", "version": "^1.0.150"}])
    check = gate(before, after, policy)
    assert check.reasons == [] and check.entries[0]["before"] == "1.0.100"
    assert gate(before, {**after, "Cargo.lock": lock % "1.0.120"}, policy).reasons == [
        "dependency: version outside specifier: cargo:serde 1.0.120 (allowed: '^1.0.150')"
    ]


def test_hostile_files_are_reasons_not_crashes() -> None:
    huge = {"package.json": " " * (MAX_DEPENDENCY_FILE_BYTES + 1)}
    assert gate({}, huge, rules()).reasons == ["dependency: dependency file too large to check: package.json"]
    for path, text in [("package-lock.json", "{"), ("uv.lock", "[[package]]\nname = 1"), ("go.mod", "bogus\n"),
                       ("Cargo.lock", "x = ["), ("package.json", "[" * 50_000), ("go.sum", "a b c\n")]:
        assert gate({}, {path: text}, rules()).reasons == [f"dependency: unparseable dependency file: {path}"], path


def test_sources_outside_the_index_are_never_admitted() -> None:
    policy = rules(allow=["npm:react", "pypi:requests", "cargo:tokio"])
    assert gate({}, {"package.json": package_json({"react": "github:evil/react"})}, policy).reasons == [
        "dependency: not a registry package: react@github:evil/react (dependencies in package.json)"
    ]
    lock = package_lock({"react": {"version": "18.0.0", "resolved": "https://evil.example/react.tgz"}})
    assert "dependency: not a registry package: react 18.0.0 from https://evil.example/react.tgz (lockfile in package-lock.json)" in \
        gate({}, {"package-lock.json": lock}, policy).reasons
    assert gate({}, {"requirements.txt": "requests @ https://evil.example/r.whl\n"}, policy).reasons == [
        "dependency: requirement line not allowed: requests @ https://evil.example/r.whl (requirements.txt)"
    ]
    before = '[project]\nname = "x"\ndependencies = ["requests>=2"]\n'
    redirect = before + '[[tool.uv.index]]\nurl = "https://evil.example/simple"\n'
    reasons = gate({"pyproject.toml": before}, {"pyproject.toml": redirect}, policy).reasons
    assert len(reasons) == 1 and "tool.uv.index" in reasons[0] and reasons[0].startswith("dependency: not a registry package")


def test_a_second_manifest_is_seen_like_the_first() -> None:
    policy = rules(allow=["pypi:attrs"])
    before = {"requirements.txt": "attrs==23.1\n"}
    after = {"requirements.txt": "attrs==23.1\n", "tools/requirements-dev.txt": "evil-pkg==1.0\n"}
    assert gate(before, after, policy).reasons == ["dependency: unlisted package: pypi:evil-pkg 1.0"]


def test_sbom_lists_the_delta_with_purls_and_is_digested() -> None:
    check = gate(*npm_change("1.7.9", integrity="sha512-" + "A" * 86 + "=="), AXIOS)
    stored = check.result()
    sbom = stored["sbom"]
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    [component] = sbom["components"]
    assert component["purl"] == "pkg:npm/axios@1.7.9" and component["version"] == "1.7.9"
    assert component["licenses"] == [{"expression": "MIT"}]
    assert component["hashes"][0]["alg"] == "SHA-512"
    assert stored["sbom_sha256"] == sha256_hex(canonical_json(sbom))
    assert stored["delta"] == check.entries


def test_purls() -> None:
    assert purl_of(PackageRef("npm", "@types/node"), "20.1.0") == "pkg:npm/%40types/node@20.1.0"
    assert purl_of(PackageRef("go", "github.com/google/uuid"), "v1.6.0") == "pkg:golang/github.com/google/uuid@v1.6.0"
    assert purl_of(PackageRef("pypi", "flask-login"), "0.6.3") == "pkg:pypi/flask-login@0.6.3"
    assert purl_of(PackageRef("cargo", "serde"), "1.0.0") == "pkg:cargo/serde@1.0.0"


def test_no_dependency_files_no_delta() -> None:
    delta = compute_delta([ChangedFile("docs/a.md", "A")], {}.get, {"docs/a.md": "requests==1\n"}.get)
    assert delta.changes == [] and delta.problems == []


def test_poetry_sections_and_cargo_targets_are_registry_dependencies() -> None:
    pyproject = '[tool.poetry.dependencies]\npython = "^3.11"\n\n[tool.poetry.group.test.dependencies]\nhypothesis = "6.100.0"\n'
    check = gate({}, {"pyproject.toml": pyproject}, rules(allow=["pypi:hypothesis"]))
    assert check.reasons == [] and check.entries[0]["after"] == "6.100.0"
    cargo = "[package]\nname = \"a\"\n\n[target.'cfg(unix)'.dependencies]\nlibc = \"=0.2.150\"\n"
    check = gate({}, {"Cargo.toml": cargo}, rules(allow=["cargo:libc"]))
    assert check.reasons == [] and check.entries[0]["after"] == "0.2.150"
    override = json.dumps({"name": "web", "overrides": {"react": "npm:evil-react@1"}})
    assert gate({}, {"package.json": override}, rules(allow=["npm:react", "npm:evil-react"])).reasons == [
        "dependency: not a registry package: evil-react (overrides in package.json)"
    ]


def test_ranges_are_not_pins_and_build_requirements_are_not_locked() -> None:
    check = gate({}, {"package.json": package_json({"left-pad": "1.x"})}, rules(allow=["npm:left-pad"]))
    assert check.reasons == [] and check.entries[0]["after"] is None
    pyproject = '[build-system]\nrequires = ["setuptools>=68"]\n\n[project]\nname = "a"\ndependencies = []\n'
    lock = 'version = 1\n[[package]]\nname = "a"\nversion = "0"\nsource = { editable = "." }\n'
    assert gate({}, {"pyproject.toml": pyproject, "uv.lock": lock}, rules(allow=["pypi:setuptools"])).reasons == []


def test_a_huge_lockfile_delta_is_blocked_not_recorded_whole() -> None:
    from intake.workers.deps.gate import MAX_CHANGES

    lock = package_lock({f"pkg-{i}": {"version": "1.0.0"} for i in range(MAX_CHANGES + 5)})
    check = gate({}, {"package-lock.json": lock}, rules(allow=[f"npm:pkg-{i}" for i in range(MAX_CHANGES + 5)]))
    assert check.reasons == [f"dependency: too many packages: the change brings in more than {MAX_CHANGES} package "
                             "versions; no more can be checked and recorded in one task"]
    assert len(check.entries) == MAX_CHANGES
    assert len(json.dumps(check.result())) < 200 * 1024  # fits in a worker report


def test_versions_compare_by_release() -> None:
    before = {"requirements.txt": "attrs==23.1\n"}
    assert gate(before, {"requirements.txt": "attrs==23.1.0\n"}, rules()).entries[0]["change"] == "changed"
    assert gate(before, {"requirements.txt": "attrs==23.10\n"}, rules(allow=["pypi:attrs"])).entries[0]["change"] == "upgraded"


def test_every_reason_has_a_kind_a_report_can_count() -> None:
    from intake.workers.deps.gate import reason_kind

    policy = rules(allow=["npm:axios", "pypi:attrs"], deny=["npm:axios@1.14.1"], require_integrity=True,
                   licenses={"denied": ["GPL-3.0-only"]})
    reasons = [
        *gate(*npm_change("1.14.1"), policy).reasons,
        *gate(*npm_change("1.7.9", integrity=None, license="GPL-3.0-only"), policy).reasons,
        *gate({}, {"requirements.txt": "attrs==1\nevil==2\n-i https://evil.example\n"}, policy).reasons,
        *gate({}, {"go.mod": "bogus\n"}, policy).reasons,
    ]
    assert [reason_kind(r) for r in reasons] == [
        "denylisted version", "denied license", "missing integrity hash", "requirement line not allowed",
        "unknown license", "missing integrity hash", "unlisted package", "unparseable dependency file",
    ]
    assert reason_kind("blocked path: x") is None


def test_a_lockfile_name_that_is_no_package_name_is_refused_on_one_line() -> None:
    lock = package_lock({"x": {"name": "axios\ndependency: all clear", "version": "1.0.0"}})
    [reason] = gate({}, {"package-lock.json": lock}, rules(allow=["npm:axios"])).reasons
    assert reason.startswith("dependency: not a registry package: 'axios\\ndependency: all clear 1.0.0'")
    assert "\n" not in reason
