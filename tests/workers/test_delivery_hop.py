"""The delivery hop (issue 21): the broker enqueues a result's delivery on the result report
itself, inside the one pass of its report processor that reads it (no sweep, no reconcile, no
poll interval in between), and that fast path still decides everything from the ledger: a
forged, replayed or someone else's result report gets no delivery, and a result that needs an
approval waits for it.

The worker's side is an honest worker's reports, signed with its report key (what
:class:`~intake.workers.run.TaskRunner` sends), so each step is one explicit
:meth:`ReportProcessor.poll`; how fast the whole hop is on real processes is bench/delivery_latency.py.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from intake.core.models import Task, TaskState
from intake.protocol.keyfiles import load_worker_key
from intake.protocol.reports import Reporter
from intake.protocol.tokens import verify_dispatch
from intake.tasks.dispatch import job_id_for
from intake.tasks.worker_reports import ReportProcessor
from tests.workers.harness import Rig, rig  # noqa: F401

DIFF = "--- a/docs/x.md\n+++ b/docs/x.md\n@@ -0,0 +1 @@\n+hello\n"


def reporter(rig: Rig, name: str) -> Reporter:
    key_name, generation, key = load_worker_key(rig.settings.worker_key_path(name))
    assert key_name == name
    return Reporter(rig.r, rig.settings.key_prefix, name, generation, key)


def delivery_jobs(rig: Rig, task: Task) -> list[str]:
    queue = rig.fact(task.id).queue
    return [j for j in rig.queue(queue).job_ids if j.startswith(job_id_for(queue, task.id, "d"))]


def deliveries_dispatched(rig: Rig, task: Task) -> list[dict[str, Any]]:
    return [e for e in rig.events("task.dispatched") if e["subject"] == task.id and e["data"].get("kind") == "deliver"]


def result_data(task: Task, run: str, sha: str = "ab" * 20) -> dict[str, Any]:
    """What a worker reports for attempt 1 that passed its gates and checks (one docs file,
    quarantined at the task's ref)."""
    path = "docs/x.md"
    return {"attempt": 1, "run": run, "state": "succeeded", "reason": None,
            "result": {"commit": sha, "base": "cd" * 20, "quarantine": f"refs/intake/{task.id}", "files": [path],
                       "files_changed": 1, "additions": 1, "deletions": 0,
                       "gates": "passed", "review": {"diff": DIFF, "sha256": hashlib.sha256(DIFF.encode()).hexdigest()}},
            "summary": {"commit": sha, "files_changed": 1}, "paths": [path], "paths_complete": True}


@pytest.fixture
def processor(rig: Rig) -> Iterator[ReportProcessor]:  # noqa: F811
    """The broker's report processor, driven one pass at a time (never started on a thread)."""
    yield ReportProcessor(rig.broker)


def running(rig: Rig, processor: ReportProcessor, repo: str = "acme/web") -> tuple[Task, Reporter, str]:  # noqa: F811
    """A promoted task claimed by worker ``test`` (its claim report applied): (task, its
    reporter, the run id)."""
    rig.issue_key("test")
    task = rig.promote(repo=repo)
    claims = verify_dispatch(rig.job_token(task.id), rig.broker.keyring, now=rig.clock())
    worker = reporter(rig, "test")
    run = secrets.token_hex(16)
    worker.send("report.claimed", task.id, attempt=1, run=run, job=claims.job, nonce=claims.nonce, sandbox="bwrap")
    assert processor.poll(block_ms=1) == 1
    assert rig.fact(task.id).state is TaskState.RUNNING
    return task, worker, run


def test_the_delivery_is_enqueued_in_the_same_pass_that_reads_the_result(rig: Rig, processor: ReportProcessor) -> None:  # noqa: F811
    task, worker, run = running(rig, processor)
    assert delivery_jobs(rig, task) == []
    worker.send("report.result", task.id, **result_data(task, run))
    # One pass reads the result, applies it, mints the delivery token and enqueues the job:
    # by the time it returns, the job is on the queue (nothing else ran: no sweep, no reconcile).
    assert processor.poll(block_ms=1) == 1
    assert delivery_jobs(rig, task) == [job_id_for("tier-standard", task.id, "d1")]
    # On the record in that order, the token minted right after the result was applied.
    actions = [e["action"] for e in rig.events() if e["subject"] == task.id]
    assert actions[actions.index("task.delivering"):] == ["task.delivering", "task.dispatched", "provenance.issued"]
    [dispatched] = deliveries_dispatched(rig, task)
    assert dispatched["data"]["sha"] == "ab" * 20
    assert rig.fact(task.id).state is TaskState.DELIVERING


def test_a_forged_result_report_gets_no_delivery(rig: Rig, processor: ReportProcessor) -> None:  # noqa: F811
    """A plain redis-py client with no keys writes a result into the worker's stream: its MAC
    does not verify, it is rejected, and nothing is delivered."""
    task, _, run = running(rig, processor)
    body = ('{"action":"report.result","at":0,"data":' + __import__("json").dumps(result_data(task, run))
            + f',"g":1,"rid":"00","task":"{task.id}","w":"test"}}')
    attacker = redis.Redis.from_url(rig.broker.url, decode_responses=True)
    try:
        attacker.xadd(rig.store.keys.reports("test"), {"r": body, "m": "0" * 64})
    finally:
        attacker.close()
    processor.poll(block_ms=1)
    assert rig.fact(task.id).state is TaskState.RUNNING
    assert delivery_jobs(rig, task) == [] and deliveries_dispatched(rig, task) == []
    assert [e["data"]["reason"] for e in rig.events("report.rejected")] == ["bad_mac"]


def test_a_replayed_result_report_gets_no_second_delivery(rig: Rig, processor: ReportProcessor) -> None:  # noqa: F811
    """Someone who can read and write Redis copies the genuine result report back into the
    stream, before and after the delivery started: the copy is a stale run's word and changes
    nothing (one delivery token, one job)."""
    task, worker, run = running(rig, processor)
    entry = worker.send("report.result", task.id, **result_data(task, run))
    assert processor.poll(block_ms=1) == 1
    [genuine] = rig.r.xrange(rig.store.keys.reports("test"), entry, entry)
    attacker = redis.Redis.from_url(rig.broker.url, decode_responses=True)
    try:
        attacker.xadd(rig.store.keys.reports("test"), genuine[1])
        processor.poll(block_ms=1)
        # The delivery job claimed meanwhile (the honest worker): a replay now is stale too.
        claims = verify_dispatch(rig.job_token(task.id, "d1"), rig.broker.keyring, now=rig.clock())
        worker.send("report.claimed", task.id, attempt=1, run=secrets.token_hex(16), job=claims.job,
                    nonce=claims.nonce, sandbox="bwrap")
        processor.poll(block_ms=1)
        assert len(rig.events("task.delivery_started")) == 1
        attacker.xadd(rig.store.keys.reports("test"), genuine[1])
        processor.poll(block_ms=1)
    finally:
        attacker.close()
    assert rig.fact(task.id).state is TaskState.DELIVERING
    assert len(deliveries_dispatched(rig, task)) == 1
    assert len(rig.events("run.discarded")) == 2


def test_another_worker_cannot_report_the_result_of_a_run_it_did_not_claim(
        rig: Rig, processor: ReportProcessor) -> None:  # noqa: F811
    """Worker ``mallory`` holds a current key and serves the same queue and repo, and sends a
    result for ``test``'s run (with its run id): rejected, no delivery."""
    task, _, run = running(rig, processor)
    rig.issue_key("mallory")
    reporter(rig, "mallory").send("report.result", task.id, **result_data(task, run))
    processor.poll(block_ms=1)
    assert rig.fact(task.id).state is TaskState.RUNNING
    assert delivery_jobs(rig, task) == [] and deliveries_dispatched(rig, task) == []
    assert [e["data"]["reason"] for e in rig.events("report.rejected")] == ["not_your_run"]


def test_a_result_that_needs_approval_still_waits_for_it(rig: Rig, processor: ReportProcessor) -> None:  # noqa: F811
    """Privileged work: the same fast path applies the result, and enqueues nothing until an
    approver accepts exactly that commit; then the acceptance enqueues it at once."""
    task, worker, run = running(rig, processor, repo="acme/payments")
    worker.send("report.result", task.id, **result_data(task, run))
    assert processor.poll(block_ms=1) == 1
    assert rig.fact(task.id).state is TaskState.AWAITING_RESULT_APPROVAL
    assert delivery_jobs(rig, task) == [] and deliveries_dispatched(rig, task) == []
    assert rig.reconcile() == 0 and delivery_jobs(rig, task) == []
    rig.accept(task.id, "carol")
    assert delivery_jobs(rig, task) == [job_id_for("tier-privileged", task.id, "d1")]
