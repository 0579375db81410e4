"""Issue 20: the result's review, made by a real worker from its own objects. A diff over the cap
is cut and says so (the stat still covers every file), binary files are named, the digest on
the sealed result event is the SHA-256 of the stored text, and a stored copy altered in Redis is
not shown. On the CLI, ``intake show T --diff`` prints the diff (controls made visible) and its
digest, and ``intake accept`` binds to it."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time

from intake.core.models import TaskState
from intake.tasks.review import load_review
from tests.workers.harness import Rig, rig  # noqa: F401


def _agent(script: str) -> dict[str, object]:
    return {"type": "command", "argv": ["/bin/sh", "-c", script]}


def test_a_big_diff_is_cut_and_says_so_binary_files_are_named(rig: Rig) -> None:  # noqa: F811
    task = rig.promote()
    # ~200 KiB of text over many lines, and a binary file, both under docs/ (the docs paths).
    rig.work(rig.config(agent=_agent(
        "mkdir -p docs && i=0; while [ $i -lt 4000 ]; do echo \"line $i of a long document, padded ......\"; "
        "i=$((i+1)); done > docs/big.md && printf '\\000\\001\\002binary' > docs/blob.md")))
    done = rig.task(task.id)
    assert done.state in (TaskState.SUCCEEDED, TaskState.DELIVERING), done.reason
    review = (done.result or {})["review"]
    assert review["truncated"] is True and review["bytes"] > 48 * 1024
    assert "docs/big.md" in review["stat"] and "docs/blob.md" in review["stat"]
    assert review["binary"] == ["docs/blob.md"]
    fact = rig.fact(task.id)
    assert fact.result_diff == review["sha256"]
    [event] = [e for e in rig.events("task.delivering") if e["subject"] == task.id][:1]
    assert event["data"]["diff_sha256"] == review["sha256"]
    shown = load_review(rig.store, task.id, fact.result_diff, review)
    assert shown is not None and shown.diff is not None
    assert len(shown.diff.encode()) <= 48 * 1024 + 300
    assert shown.diff.rstrip().endswith("The stat covers every file.]")
    assert hashlib.sha256(shown.diff.encode()).hexdigest() == fact.result_diff
    # Someone with the keyspace edits the stored text: it is no longer shown.
    key = f"intake:review:{task.id}:{fact.result_diff}"
    rig.r.set(key, shown.diff.replace("line 1 ", "line X "))
    assert load_review(rig.store, task.id, fact.result_diff, review).diff is None  # type: ignore[union-attr]


def test_show_diff_on_the_cli_and_accept_binds_to_it(rig: Rig) -> None:  # noqa: F811
    from intake.api.callers import ApiTokens
    from intake.people.registry import People
    from tests.api_harness import running_broker

    task = rig.promote()
    # auth/** is a privileged path of acme/web: the result waits for an approval from platform.
    rig.work(rig.config(agent=_agent("mkdir -p auth && printf 'x = 1\\033[2J\\n' > auth/notes.md")))
    waiting = [t for t in (rig.task(task.id),) if t.state is TaskState.AWAITING_RESULT_APPROVAL]
    assert waiting, rig.task(task.id).reason
    fact = rig.fact(task.id)
    _, token = ApiTokens(rig.store, People(rig.store)).create("bob", actor="cli:root", scope="power")
    with running_broker(rig.settings) as api:
        env = rig.env(INTAKE_URL=api.tcp_url, INTAKE_TOKEN=token)
        shown = subprocess.run([sys.executable, "-m", "intake", "show", task.id, "--diff"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert "PRIVILEGED PATH CHANGED: auth/notes.md" in shown.stdout
        assert "\x1b" not in shown.stdout and "+x = 1\\x1b[2J" in shown.stdout  # the escape made visible
        assert f"diff sha256: {fact.result_diff}" in shown.stdout
        wrong = subprocess.run([sys.executable, "-m", "intake", "accept", task.id, "--sha", fact.result_commit,
                                "--diff-sha256", "0" * 64, "--code", rig.code("bob")], env=env,
                               capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 1 and "accept what you saw" in wrong.stderr
        # The API's broker runs on the real clock; bob's enrolment spent the step of the rig's start.
        ok = subprocess.run([sys.executable, "-m", "intake", "accept", task.id, "--sha", fact.result_commit,
                             "--diff-sha256", fact.result_diff, "--code", rig.totps["bob"].at(time.time() + 30)],
                            env=env,
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
    [approval] = rig.task(task.id).result_approvals
    assert approval.approver == "bob" and approval.diff_sha256 == fact.result_diff
