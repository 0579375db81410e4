"""Issue 19, attacked through the report streams and the clocks: replayed heartbeats, junk
XADDs, chatty runs and stale result approvals.

* A heartbeat carries a per-run sequence number inside its MAC'd body: a replayed copy (from
  anyone who can read and XADD the stream) renews nothing, so a dead run is abandoned and
  retried on time.
* Heartbeats are not history: a run that beats hundreds of times adds a bounded number of
  sealed entries (its claim, its result, the evidence), whatever its heartbeat rate.
* 10,000 junk XADDs produce one audit record per stream per interval (and one summary with the
  count), not one each; a genuine report behind them is still applied.
* A result approval older than its validity does not count towards delivery.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import intake.workers.lease as lease_keeper
from intake.core.models import TaskState
from intake.protocol.keyfiles import load_worker_key
from intake.protocol.reports import Reporter
from intake.runtime import EXAMPLE_POLICY
from intake.tasks.worker_reports import ReportProcessor
from tests.conftest import FakeClock
from tests.workers.harness import Rig, in_a_work_tree, make_rig, rig, wait_for  # noqa: F401


def sh(script: str) -> dict[str, object]:
    return {"type": "command", "argv": ["/bin/sh", "-c", script]}


def _claimed(rig: Rig, worker: str = "w1") -> tuple[str, str, Reporter, ReportProcessor]:
    """A task claimed by ``worker`` through its real report stream: (task id, run, reporter, processor)."""
    name, generation, key = load_worker_key(rig.issue_key(worker))
    reporter = Reporter(rig.r, rig.settings.key_prefix, name, generation, key)
    processor = ReportProcessor(rig.broker)
    task = rig.promote()
    rig.reconcile()
    fact = rig.fact(task.id)
    [(nonce, dispatch)] = fact.dispatches.items()
    run = "a" * 32
    reporter.send("report.claimed", task.id, attempt=dispatch.attempt, run=run, job=dispatch.job, nonce=nonce,
                  sandbox="none")
    processor.poll(block_ms=50)
    assert rig.fact(task.id).state is TaskState.RUNNING and rig.fact(task.id).worker == worker
    return task.id, run, reporter, processor


@pytest.fixture
def retry_rig(tmp_path: Path, redis_server: str, rclient: redis.Redis, clock: FakeClock) -> Iterator[Rig]:
    text = EXAMPLE_POLICY.read_text().replace("[risk_tiers.standard]\n", "[risk_tiers.standard]\nretries = 1\n")
    made = make_rig(tmp_path, redis_server, rclient, clock, policy_text=text)
    yield made
    made.close()


def test_a_replayed_heartbeat_does_not_extend_a_dead_run(retry_rig: Rig) -> None:
    rig = retry_rig
    task_id, run, reporter, processor = _claimed(rig)
    lease_key = rig.store.keys.lease("w1", task_id)
    reporter.send("report.heartbeat", task_id, attempt=1, run=run, seq=1)
    assert processor.poll(block_ms=50) == 1
    beat = rig.r.xrange(reporter.stream)[-1][1]  # what someone reading the stream copies
    renewed = rig.r.get(lease_key)
    assert renewed
    # The worker is SIGKILLed: no more beats. Its lease runs out...
    rig.clock.advance(rig.settings.lease_ttl + 11)
    # ...and an attacker replays its last genuine heartbeat, byte for byte, a few times.
    for _ in range(3):
        rig.r.xadd(reporter.stream, beat)
    assert processor.poll(block_ms=50) == 3
    assert rig.r.get(lease_key) == renewed  # no new lease
    reasons = [e["data"]["reason"] for e in rig.events("report.rejected")]
    assert reasons == ["stale_heartbeat"] * 3
    # An out-of-order (older) beat is refused too, even with a fresh MAC.
    reporter.send("report.heartbeat", task_id, attempt=1, run=run, seq=1)
    processor.poll(block_ms=50)
    assert rig.r.get(lease_key) == renewed
    # The run is abandoned and retried on time.
    rig.reconcile()
    fact = rig.fact(task_id)
    assert fact.state is TaskState.QUEUED and fact.attempts == 1 and fact.dispatches
    assert [e for e in rig.events("task.queued") if e["subject"] == task_id and e["data"].get("retry")]


def test_a_new_heartbeat_still_renews(rig: Rig) -> None:
    """The control: a genuine next beat renews the lease (so the test above can fail)."""
    task_id, run, reporter, processor = _claimed(rig)
    lease_key = rig.store.keys.lease("w1", task_id)
    reporter.send("report.heartbeat", task_id, attempt=1, run=run, seq=1)
    processor.poll(block_ms=50)
    first = rig.r.get(lease_key)
    rig.clock.advance(5)
    reporter.send("report.heartbeat", task_id, attempt=1, run=run, seq=2)
    processor.poll(block_ms=50)
    assert rig.r.get(lease_key) != first
    assert not rig.events("report.rejected")


@pytest.fixture
def chatty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beat as fast as the lease keeper can (the 1 s floor down to 10 ms)."""
    monkeypatch.setattr(lease_keeper, "POLL_S", 0.005)
    monkeypatch.setattr(lease_keeper, "MIN_BEAT_S", 0.01)
    monkeypatch.setattr(lease_keeper, "BEAT_SHARE", 0.0001)


def test_heartbeats_are_not_history(rig: Rig, chatty: None) -> None:
    """A run that beats hundreds of times adds a bounded number of sealed entries."""
    beats_wanted = 300
    task = rig.promote()
    audit = rig.broker.audit
    beats_key = rig.store.keys.beats(task.id)

    def release_after_many_beats() -> None:
        wait_for(lambda: in_a_work_tree("docs/running.md"), 60, "the agent to start")

        def enough() -> bool:
            rig.clock.advance(0.1)  # the broker's clock moves on, so each renewal is a new lease
            return any(int(v) >= beats_wanted for v in rig.r.hvals(beats_key))

        wait_for(enough, 120, f"{beats_wanted} heartbeats accepted")
        found = in_a_work_tree("docs/running.md")
        assert found is not None
        (found.parent / "go.md").write_text("go\n")

    start = rig.r.xrevrange(audit.stream, count=1)
    helper = threading.Thread(target=release_after_many_beats, daemon=True)
    helper.start()
    rig.work_once(rig.config(agent=sh("echo up > docs/running.md; while [ ! -e docs/go.md ]; do sleep 0.02; done; "
                                      "rm docs/go.md docs/running.md; echo done > docs/a.md")))
    helper.join(timeout=10)
    assert max(int(v) for v in rig.r.hvals(beats_key)) >= beats_wanted
    after = rig.r.xrange(audit.stream, f"({start[0][0]}")
    # The broker enqueues the delivery in the pass that applies the result (issue 21), so the
    # same burst may already have taken and delivered it: the run's part ends with its
    # delivery's dispatch (provenance.issued is that MULTI's last entry).
    assert rig.fact(task.id).state in (TaskState.DELIVERING, TaskState.SUCCEEDED)
    actions = [json.loads(f["e"]).get("action") for _, f in after]
    run_part = after[:actions.index("provenance.issued") + 1]
    # The run's claim and result (each with the worker's report as evidence), and the
    # dispatch of its delivery with its provenance: whatever the number of beats.
    assert len(run_part) <= 10, [f.get("e", "")[:80] for _, f in run_part]


def test_junk_on_a_report_stream_is_audited_in_bulk(rig: Rig) -> None:
    name, generation, key = load_worker_key(rig.issue_key("w1"))
    reporter = Reporter(rig.r, rig.settings.key_prefix, name, generation, key)
    processor = ReportProcessor(rig.broker)
    processor.streams()
    task = rig.promote()
    rig.reconcile()
    [(nonce, dispatch)] = rig.fact(task.id).dispatches.items()
    attacker = redis.Redis.from_url(rig.broker.url, decode_responses=True)
    pipe = attacker.pipeline(transaction=False)
    for i in range(10_000):
        pipe.xadd(reporter.stream, {"r": f'{{"junk":{i}}}', "m": "0" * 64} if i % 2 else {"x": "y"})
    pipe.execute()
    # A genuine claim behind all of it.
    reporter.send("report.claimed", task.id, attempt=dispatch.attempt, run="b" * 32, job=dispatch.job, nonce=nonce,
                  sandbox="none")
    handled = 0
    while handled < 10_001:
        handled += processor.poll(block_ms=50)
    assert rig.fact(task.id).state is TaskState.RUNNING  # the genuine report was applied
    rejected = rig.events("report.rejected")
    assert len(rejected) == 1, len(rejected)  # one record for the interval, not 10,000
    # When the interval is over, one summary says how many more there were.
    processor._rejects[reporter.stream].since -= 3600
    processor.poll(block_ms=10)
    rejected = rig.events("report.rejected")
    assert len(rejected) == 2 and rejected[1]["data"]["suppressed"] == 9_999
    assert set(rejected[1]["data"]["reasons"]) <= {"malformed", "bad_mac"}
    attacker.close()


@pytest.fixture
def validity_rig(tmp_path: Path, redis_server: str, rclient: redis.Redis, clock: FakeClock) -> Iterator[Rig]:
    text = EXAMPLE_POLICY.read_text().replace(
        'result_approvals = { approvals = 1, groups = ["security"] }',
        'result_approvals = { approvals = 2, groups = ["security"], validity = "1h" }')
    assert "validity" in text
    made = make_rig(tmp_path, redis_server, rclient, clock, policy_text=text)
    yield made
    made.close()


def test_a_result_approval_older_than_its_validity_does_not_count(validity_rig: Rig) -> None:
    rig = validity_rig
    idea = rig.store.capture(__import__("tests.factories", fromlist=["draft"]).draft(
        text="Document the settlement job", requester="slack:U0REQUEST1"), ttl_s=rig.broker.policy.clocks.idea_ttl)[0]
    gate = rig.broker.gatekeeper
    task = gate.promote(idea.id, repo="acme/payments", change_type="docs", approver_id="alice",
                        code=rig.code("alice")).task
    gate.approve(task.id, approver_id="carol", code=rig.code("carol"))
    rig.clock.advance(30)
    rig.work(rig.config(repos={"acme/payments": {}}))
    assert rig.task(task.id).state is TaskState.AWAITING_RESULT_APPROVAL
    sha = rig.fact(task.id).result_commit
    assert rig.fact(task.id).result_rule["validity"] == 3600
    rig.accept(task.id, "carol", sha)
    rig.clock.advance(3601)  # carol's approval is now older than the result validity
    assert rig.broker.gatekeeper.valid_result_approvals(rig.task(task.id)) == []
    assert rig.accept(task.id, "dave", sha).state is TaskState.AWAITING_RESULT_APPROVAL  # 1 of 2 counts
    assert rig.accept(task.id, "carol", sha).state is TaskState.DELIVERING  # carol again, in time
    approved = rig.events("result.approved")
    assert {e["data"]["worker"] for e in approved} == {"test"}  # bound to the worker that produced it


def test_a_worker_key_cannot_flood_the_log_with_records_that_change_nothing(rig: Rig) -> None:
    """Another amplification: each ``report.stopped`` (or refused claim, or stale result) used to
    add one sealed record. 200 of them add the allowance, then one summary."""
    name, generation, key = load_worker_key(rig.issue_key("w1"))
    reporter = Reporter(rig.r, rig.settings.key_prefix, name, generation, key)
    processor = ReportProcessor(rig.broker)
    processor.streams()
    for _ in range(200):
        reporter.send("report.stopped", "T-000000000001", attempt=1, why="spam")
    handled = 0
    while handled < 200:
        handled += processor.poll(block_ms=50)
    from intake.tasks.worker_reports import REJECT_AUDIT_BURST
    assert len(rig.events("run.stopped")) == REJECT_AUDIT_BURST
    processor._rejects[reporter.stream].since -= 3600
    processor.poll(block_ms=10)
    [summary] = rig.events("report.rejected")
    assert summary["data"]["suppressed"] == 200 - REJECT_AUDIT_BURST
    assert summary["data"]["reasons"] == {"run.stopped": 200 - REJECT_AUDIT_BURST}
