"""Issue 8, attacked with one worker's report key: summary fields named like the parameters of
the calls they are passed to (``pipe``, ``at``) must not crash the report processor (which
dropped the result unaudited) nor set a broker event's timestamp."""

from __future__ import annotations

from intake.core.models import TaskState
from intake.protocol.keyfiles import load_worker_key
from intake.protocol.reports import Reporter
from intake.tasks.dispatch import job_id_for
from intake.tasks.worker_reports import ReportProcessor
from tests.workers.harness import Rig, rig  # noqa: F401


def test_summary_fields_named_like_parameters_are_dropped_not_fatal(rig: Rig) -> None:
    name, generation, key = load_worker_key(rig.issue_key("w1"))
    task = rig.promote()
    rig.reconcile()
    fact = rig.fact(task.id)
    nonce = next(iter(fact.dispatches))
    run = "r" * 16
    rig.store.move_task(task.id, TaskState.RUNNING, actor="system", update={"attempts": 1},
                        attempt=1, run=run, nonce=nonce, job=job_id_for(fact.queue, task.id, 1), queue=fact.queue, worker=name)
    rig.store.audit.seal_pending()
    reporter = Reporter(rig.r, rig.settings.key_prefix, name, generation, key)
    reporter.send("report.result", task.id, attempt=1, run=run, state="failed", reason="checks",
                  summary={"pipe": 1, "at": 5.0, "checks": "red"})
    processor = ReportProcessor(rig.broker)
    assert processor.poll(block_ms=50) == 1
    assert rig.fact(task.id).state is TaskState.FAILED
    failed = [e for e in rig.events("task.failed") if e["subject"] == task.id]
    assert len(failed) == 1 and failed[0]["data"]["checks"] == "red" and failed[0]["at"] != 5.0
    # A result for a run that is over is recorded as discarded, at the broker's time.
    reporter.send("report.result", task.id, attempt=1, run=run, state="failed", summary={"at": 5.0})
    assert processor.poll(block_ms=50) == 1
    discarded = [e for e in rig.events("run.discarded") if e["subject"] == task.id]
    assert len(discarded) == 1 and discarded[0]["at"] != 5.0
