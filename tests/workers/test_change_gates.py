"""Change types and build files enforced on real runs, and gates the agent cannot blind: a
real worker (TaskRunner over RQ, real git) runs command agents of ours."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from intake.core.models import TaskState
from intake.tasks.dispatch import job_id_for
from intake.workers.dev import create_bare_repo
from tests.workers.harness import Rig, git_refs, rig  # noqa: F401


def sh(script: str) -> dict[str, object]:
    return {"type": "command", "argv": ["/bin/sh", "-c", script]}


def blocked(rig: Rig, task_id: str) -> list[str]:
    ended = rig.task(task_id)
    assert ended.state is TaskState.BLOCKED, (ended.state, ended.reason)
    assert ended.result is not None and ended.result["pushed"] is False
    return list(ended.result["gates"])


def branches(bare: Path) -> set[str]:
    return set(git_refs(bare)) - {"refs/heads/main"}


def test_the_spec_carries_the_change_types_paths(rig: Rig) -> None:
    task = rig.promote(change_type="docs")
    assert task.spec.change_type_paths == ("docs/**", "**/*.md", "**/*.rst")


def test_a_docs_task_that_edits_tests_is_blocked(rig: Rig) -> None:
    task = rig.promote(change_type="docs")
    rig.work(rig.config(agent=sh("mkdir -p tests && echo 'import os' > tests/conftest.py && "
                                 "echo ok > docs/how.md")))
    assert blocked(rig, task.id) == ["path outside the change type's paths: tests/conftest.py"]
    assert not branches(rig.bare("acme/web"))
    # What `rq info` and rq-dashboard show: the job failed, with the reason.
    job = Job.fetch(job_id_for("tier-standard", task.id, 1), connection=rig.rq(), serializer=JSONSerializer)
    assert job.get_status() == "failed" and job_id_for("tier-standard", task.id, 1) in FailedJobRegistry("tier-standard", connection=rig.rq())
    assert "blocked by the gates: path outside the change type's paths" in (job.latest_result().exc_string or "")


def test_a_docs_task_that_edits_a_lockfile_is_blocked(rig: Rig) -> None:
    # Inside docs/, so the change type's paths alone would let it through.
    task = rig.promote(change_type="docs")
    rig.work(rig.config(agent=sh("echo '{}' > docs/package-lock.json && echo ok > docs/how.md")))
    assert blocked(rig, task.id) == [
        "build or dependency file changed outside a dependency-bump task: docs/package-lock.json"
    ]
    assert not branches(rig.bare("acme/web"))


@pytest.mark.parametrize("option", [
    "--index=https://evil.example/simple", "--extra-index=https://evil.example/simple",
    "--find=https://evil.example/wheels", "-ihttps://evil.example/simple",
])
def test_a_requirements_option_that_adds_a_package_source_is_blocked(rig: Rig, option: str) -> None:
    task = rig.promote(change_type="dependency-bump")
    rig.work(rig.config(agent=sh(f"printf 'pytest==8.0\\n{option}\\n' > requirements.txt")))
    # pytest is on the example allowlist; the option line never is.
    assert blocked(rig, task.id) == [f"dependency: requirement line not allowed: {option} (requirements.txt)"]
    assert not branches(rig.bare("acme/web"))


def test_an_allowlisted_bump_passes_and_is_pushed(rig: Rig) -> None:
    task = rig.promote(change_type="dependency-bump")
    rig.work(rig.config(agent=sh("printf 'pytest==8.1\\nruff>=0.5\\n' > requirements.txt")))
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED, done.reason
    assert branches(rig.bare("acme/web")) == {f"refs/heads/intake/{task.id}", f"refs/intake/{task.id}",
                                              "refs/notes/intake"}


# The hostile agent: it rewrites the base blob of requirements.txt in every git object store it
# can reach (the worker's private one while agents share its uid, its own .git once it has
# one) so that git shows the base as already holding the new dependency, then makes the change.
TAMPER = '''
import glob, hashlib, os, sys, zlib
old, new = b"pytest==8.0\\n", b"pytest==8.0\\nrequests==2.32.0\\n"
oid = hashlib.sha1(b"blob %d\\0" % len(old) + old).hexdigest()
marker, tmp = sys.argv[1], sys.argv[2]
stores = [".git"] + [g for g in glob.glob(os.path.join(tmp, "intake-git-*", "git"))
                     if marker in open(os.path.join(g, "config")).read()]  # this test's only
rewritten = 0
for store in stores:
    obj = os.path.join(store, "objects", oid[:2], oid[2:])
    if os.path.exists(obj):
        with open(obj + ".new", "wb") as handle:
            handle.write(zlib.compress(b"blob %d\\0" % len(new) + new))
        os.replace(obj + ".new", obj)
        rewritten += 1
open("requirements.txt", "wb").write(new)
print(f"rewrote {rewritten} base object(s)")
'''


@pytest.mark.parametrize("sandbox", ["none", "bwrap"])
def test_rewriting_the_base_blob_does_not_blind_the_dependency_gate(rig: Rig, tmp_path: Path, sandbox: str) -> None:
    """Unsandboxed the agent shares the worker's uid and reaches the worker's own object store;
    in the sandbox it reaches only its throwaway ``.git``. Either way the gate sees the truth."""
    if sandbox == "bwrap" and not Path("/usr/bin/bwrap").exists():
        pytest.skip("bubblewrap is not installed")
    bare = create_bare_repo(tmp_path / "remotes" / "tamper" / "web.git", "main",
                            {"README.md": "# web\n", "requirements.txt": "pytest==8.0\n"})
    python = sys.executable if sandbox == "none" else "/usr/bin/python3"
    agent = {"type": "command", "argv": [python, "-c", TAMPER, str(bare), tempfile.gettempdir()]}
    task = rig.promote(change_type="dependency-bump")
    rig.work(rig.config(agent=agent, repos={"acme/web": {"url": str(bare)}}, sandbox=sandbox))
    ended = rig.task(task.id)
    # The attack did happen: a base object within the agent's reach was rewritten.
    assert "rewrote 1 base object(s)" in (ended.result or {}).get("output_tail", ""), ended.result
    assert blocked(rig, task.id) == ["dependency: unlisted package: pypi:requests 2.32.0"]
    assert not branches(bare)
