"""The dependency policy on real runs (issue 11, first done-when bullet, and the attacks): a real
worker (TaskRunner over RQ, real git repos) runs agents of ours that write manifests and
lockfiles; the gate reads only its trusted copies."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from intake.core.models import TaskState, canonical_json, sha256_hex
from intake.runtime import EXAMPLE_POLICY
from tests.conftest import FakeClock
from tests.workers.harness import Rig, git_refs, make_rig

DEPENDENCIES = '''
[dependencies]
allow = [
  { package = "pypi:attrs", version = ">=23,<25", license = "MIT" },
  { package = "pypi:mypy", license = "MIT" },
  { package = "pypi:gplthing", license = "GPL-3.0-or-later" },
  { package = "npm:axios", license = "MIT" },
  { package = "npm:left-pad", license = "WTFPL" },
]
deny = ["npm:axios@1.14.1", "npm:axios@0.30.4"]
require_integrity = true

[dependencies.licenses]
denied = ["GPL-2.0-only", "GPL-2.0-or-later", "GPL-3.0-only", "GPL-3.0-or-later"]
unknown = "block"
'''
SHA = "0123456789abcdef" * 4
# The agent: writes each file it is given (path -> text) into its work tree.
WRITE = "import json, os, sys\nfor p, t in json.loads(sys.argv[1]).items():\n" \
        "    os.makedirs(os.path.dirname(p) or '.', exist_ok=True)\n    open(p, 'w').write(t)\n"


@pytest.fixture
def deps_rig(tmp_path: Path, redis_server: str, rclient: redis.Redis, clock: FakeClock) -> Iterator[Rig]:
    text = EXAMPLE_POLICY.read_text()
    start, end = text.index("[dependencies]\n"), text.index("[admins]")
    made = make_rig(tmp_path, redis_server, rclient, clock, policy_text=text[:start] + DEPENDENCIES + "\n" + text[end:])
    yield made
    made.close()


def run(rig: Rig, files: dict[str, str]) -> Any:
    task = rig.promote(change_type="dependency-bump")
    rig.work(rig.config(agent={"type": "command", "argv": ["/usr/bin/python3", "-c", WRITE, json.dumps(files)]}))
    return rig.task(task.id)


def blocked(ended: Any) -> list[str]:
    assert ended.state is TaskState.BLOCKED, (ended.state, ended.reason)
    assert ended.result["pushed"] is False
    return list(ended.result["gates"])


def npm(deps: dict[str, str], locked: dict[str, dict[str, Any]]) -> dict[str, str]:
    packages = {"": {"name": "web", "dependencies": deps}}
    packages.update({f"node_modules/{n}": {"resolved": f"https://registry.npmjs.org/{n}/-/{n}.tgz", **e}
                     for n, e in locked.items()})
    return {"web/package.json": json.dumps({"name": "web", "dependencies": deps}),
            "web/package-lock.json": json.dumps({"name": "web", "lockfileVersion": 3, "packages": packages})}


@pytest.mark.parametrize("version", ["1.14.1", "0.30.4"])
def test_a_denylisted_axios_version_is_blocked_naming_the_version(deps_rig: Rig, version: str) -> None:
    ended = run(deps_rig, npm({"axios": f"^{version}"},
                              {"axios": {"version": version, "integrity": "sha512-AAAA", "license": "MIT"}}))
    assert blocked(ended) == [f"dependency: denylisted version: npm:axios {version}"]
    [entry] = ended.result["dependencies"]["delta"]
    assert entry == {"ecosystem": "npm", "name": "axios", "before": None, "after": version, "change": "added",
                     "license": "MIT", "integrity": "sha512-AAAA"}
    assert not set(git_refs(deps_rig.bare("acme/web"))) - {"refs/heads/main"}


def test_an_allowed_pypi_package_within_its_specifier_is_delivered_with_an_sbom(deps_rig: Rig) -> None:
    ended = run(deps_rig, {"requirements.txt": f"attrs==24.2.0 --hash=sha256:{SHA}\n"})
    assert ended.state is TaskState.SUCCEEDED, (ended.reason, ended.result)
    assert ended.result["branch"] == f"intake/{ended.id}"  # delivered: the branch exists
    assert f"refs/heads/intake/{ended.id}" in git_refs(deps_rig.bare("acme/web"))
    deps = ended.result["dependencies"]
    assert deps["delta"] == [{"ecosystem": "pypi", "name": "attrs", "before": None, "after": "24.2.0",
                              "change": "added", "license": "MIT", "integrity": f"sha256:{SHA}"}]
    [component] = deps["sbom"]["components"]
    assert deps["sbom"]["specVersion"] == "1.6"
    assert component["purl"] == "pkg:pypi/attrs@24.2.0"
    assert component["hashes"] == [{"alg": "SHA-256", "content": SHA}]
    assert deps["sbom_sha256"] == sha256_hex(canonical_json(deps["sbom"]))
    # Outside the specifier, the same package is blocked.
    ended = run(deps_rig, {"requirements.txt": f"attrs==25.1.0 --hash=sha256:{SHA}\n"})
    assert blocked(ended) == ["dependency: version outside specifier: pypi:attrs 25.1.0 (allowed: '>=23,<25')"]


def test_a_gpl_addition_under_a_policy_denying_gpl_is_blocked(deps_rig: Rig) -> None:
    ended = run(deps_rig, {"requirements.txt": f"gplthing==1.0 --hash=sha256:{SHA}\n"})
    assert blocked(ended) == ["dependency: denied license: pypi:gplthing 1.0 (GPL-3.0-or-later)"]
    # A lockfile that names another license than the policy's entry is refused (the policy wins).
    ended = run(deps_rig, npm({"left-pad": "1.3.0"},
                              {"left-pad": {"version": "1.3.0", "integrity": "sha512-AAAA", "license": "GPL-2.0-only"}}))
    assert blocked(ended) == ["dependency: license disagrees with the policy: npm:left-pad 1.3.0 "
                              "(the lockfile says GPL-2.0-only, the policy says WTFPL)"]


def test_npm_mypy_is_not_admitted_by_an_allowlisted_pypi_mypy(deps_rig: Rig) -> None:
    ended = run(deps_rig, npm({"mypy": "1.0.0"}, {"mypy": {"version": "1.0.0", "integrity": "sha512-AAAA"}}))
    assert blocked(ended) == ["dependency: unlisted package: npm:mypy 1.0.0"]
    ended = run(deps_rig, {"requirements.txt": f"mypy==1.11.0 --hash=sha256:{SHA}\n"})
    assert ended.state is TaskState.SUCCEEDED, ended.result


def test_missing_integrity_is_blocked_when_required(deps_rig: Rig) -> None:
    ended = run(deps_rig, npm({"axios": "1.7.9"}, {"axios": {"version": "1.7.9", "license": "MIT"}}))
    assert blocked(ended) == ["dependency: missing integrity hash: npm:axios 1.7.9"]


# -- the hostile agent ----------------------------------------------------------------------


def test_a_lockfile_that_hides_a_dependency_is_blocked(deps_rig: Rig) -> None:
    # package.json asks for an allowed axios; the lockfile hides the denylisted release behind
    # the range and slips in a package that no manifest names (npm ci installs it all).
    files = npm({"axios": "^1.7.0"}, {
        "axios": {"version": "1.14.1", "integrity": "sha512-AAAA", "license": "MIT"},
        "plain-crypto-js": {"version": "4.2.1", "integrity": "sha512-BBBB", "license": "MIT"},
    })
    assert blocked(run(deps_rig, files)) == [
        "dependency: denylisted version: npm:axios 1.14.1",
        "dependency: unlisted package: npm:plain-crypto-js 4.2.1",
    ]
    # A manifest dependency left out of the lockfile: the manifest still names it.
    files = npm({"axios": "1.7.9", "event-stream": "3.3.6"},
                {"axios": {"version": "1.7.9", "integrity": "sha512-AAAA", "license": "MIT"}})
    assert blocked(run(deps_rig, files)) == [
        "dependency: lockfile mismatch: npm:event-stream is in web/package.json but not in web/package-lock.json",
        "dependency: unlisted package: npm:event-stream 3.3.6",
    ]
    # An entry named as the allowed left-pad whose tarball is the denylisted axios release.
    files = npm({"left-pad": "1.3.0"}, {"left-pad": {
        "version": "1.3.0", "integrity": "sha512-AAAA", "license": "WTFPL",
        "resolved": "https://registry.npmjs.org/axios/-/axios-1.14.1.tgz"}})
    assert blocked(run(deps_rig, files)) == [
        "dependency: not a registry package: left-pad 1.3.0 from https://registry.npmjs.org/axios/-/axios-1.14.1.tgz "
        "(lockfile in web/package-lock.json)"
    ]


def test_a_dependency_added_through_a_second_manifest_is_blocked(deps_rig: Rig) -> None:
    files = {"requirements.txt": f"attrs==24.2.0 --hash=sha256:{SHA}\n",
             "tools/lint/requirements-dev.txt": f"evil-pkg==1.0 --hash=sha256:{SHA}\n"}
    assert blocked(run(deps_rig, files)) == ["dependency: unlisted package: pypi:evil-pkg 1.0"]


def test_intake_show_summarises_the_delta_and_prints_the_sbom(deps_rig: Rig) -> None:
    """The CLI as the API's client: ``show`` prints the summary, ``show --sbom`` the document."""
    import subprocess

    from intake.api.callers import ApiTokens
    from intake.people.registry import People
    from tests.api_harness import running_broker

    rig = deps_rig
    ended = run(rig, {"requirements.txt": f"attrs==24.2.0 --hash=sha256:{SHA}\n"})
    _, token = ApiTokens(rig.store, People(rig.store)).create("alice", actor="cli:root", scope="power")
    with running_broker(rig.settings) as api:
        env = rig.env(INTAKE_URL=api.tcp_url, INTAKE_TOKEN=token)

        def intake(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "intake", *args], env=env, capture_output=True,
                                  text=True, timeout=60)

        shown = intake("show", ended.id)
        sbom = intake("show", ended.id, "--sbom")
    assert shown.returncode == 0, shown.stderr
    digest = ended.result["dependencies"]["sbom_sha256"]
    assert f"dependencies: 1 added; SBOM: 1 component(s), sha256 {digest[:16]}…" in shown.stdout
    assert "  added pypi:attrs 24.2.0 (MIT)" in shown.stdout
    assert "'sbom'" not in shown.stdout  # the document itself only with --sbom
    assert sbom.returncode == 0, sbom.stderr
    assert json.loads(sbom.stdout) == ended.result["dependencies"]["sbom"]
