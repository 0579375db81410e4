"""Issue 8, attacked: a plain Redis client (no intake key) replays *genuine* sealed broker events.

Every broker event's MAC is over its own body only, so a byte-for-byte copy XADDed again carries
a valid MAC, and the sealer seals it ``ok``. The ledger must not apply such a copy as a new fact:
each event carries a unique ``eid``, and a second entry with an ``eid`` already seen is a replay
(``audit verify`` already calls it one). Otherwise an old ``broker.thawed`` lifts a freeze, an
old ``approver.added`` rolls an enrolment generation back, an old ``worker.key_issued`` revives a
revoked worker key, and an old ``task.queued`` re-queues a running task.
"""

from __future__ import annotations

import json

import pytest

from intake.audit.ledger import Ledger
from intake.core.errors import AuditBroken, LedgerHalted, Refused
from intake.core.models import TaskState, canonical_json
from intake.protocol.reports import report_mac
from tests.workers.harness import Rig, rig  # noqa: F401


def _replay(rig: Rig, action: str, subject: str | None = None, nth: int = 0) -> None:
    """XADD again (verbatim) the nth sealed entry with ``action`` (and ``subject``)."""
    audit = rig.broker.audit
    found = [f for _, f in rig.r.xrange(audit.stream)
             if "k" not in f and json.loads(f["e"]).get("action") == action
             and (subject is None or json.loads(f["e"]).get("subject") == subject)]
    assert len(found) > nth, f"no {action} entry to replay"
    rig.r.xadd(audit.stream, found[nth])


def _assert_flagged(rig: Rig) -> None:
    """The replay is found: the ledger halts and `audit verify` names it."""
    with pytest.raises(LedgerHalted):
        rig.broker.ledger.follow().require_live()
    with pytest.raises(AuditBroken) as err:
        rig.broker.audit.verify()
    assert any(a.kind == "replayed" for a in err.value.report.anomalies)  # type: ignore[union-attr]


def test_a_replayed_thaw_does_not_lift_the_freeze(rig: Rig) -> None:
    gate = rig.broker.gatekeeper
    gate.freeze(actor="cli:ops", reason="drill")
    gate.thaw(actor="cli:ops")
    gate.freeze(actor="cli:ops", reason="incident")
    task = rig.promote()
    rig.r.delete(rig.store.keys.freeze)  # the cache says thawed
    _replay(rig, "broker.thawed")  # and so, now, does a genuine-looking sealed event
    assert rig.broker.ledger.follow().frozen is not None
    assert Ledger(rig.broker.audit).follow().frozen is not None  # a broker starting now agrees
    assert rig.reconcile() == 0
    assert rig.fact(task.id).dispatches == {}  # no token was ever minted for it
    _assert_flagged(rig)


def test_a_replayed_enrolment_does_not_roll_an_approver_back(rig: Rig) -> None:
    approvers = rig.broker.approvers
    old_record = rig.r.get(rig.store.keys.approver("alice"))
    old_code = rig.code("alice")
    approvers.reset("alice", actor="cli:root")
    assert rig.broker.ledger.follow().approvers["alice"].generation == 2
    rig.r.set(rig.store.keys.approver("alice"), old_record)  # restore the old record and seed
    _replay(rig, "approver.added", "alice")
    _replay(rig, "approver.confirmed", "alice")
    fact = rig.broker.ledger.follow().approvers["alice"]
    assert fact.generation == 2 and not fact.confirmed
    assert not rig.broker.ledger.approver_current("alice", 1)
    with pytest.raises(Refused):
        approvers.check_current(approvers.get("alice"))
    assert old_code  # the old seed's codes would verify: only the ledger stands in the way
    _assert_flagged(rig)


def test_a_replayed_key_issue_does_not_revive_a_revoked_worker_key(rig: Rig) -> None:
    from intake.tasks.worker_reports import ReportProcessor, revoke_worker_key

    rig.issue_key("w1")
    revoke_worker_key(rig.broker, "w1", actor="cli:root")
    assert rig.broker.ledger.follow().workers["w1"] is None
    _replay(rig, "worker.key_issued", "w1")
    assert rig.broker.ledger.follow().workers["w1"] is None
    # The revoked key's reports are still refused.
    key = rig.broker.audit.worker_key("w1", 1)
    body = canonical_json({"w": "w1", "g": 1, "action": "report.stopped", "task": "T-000000000001",
                           "at": 0.0, "rid": "00" * 8, "data": {}}).decode()
    processor = ReportProcessor(rig.broker)
    stream = rig.store.keys.reports("w1")
    rig.r.xadd(stream, {"r": body, "m": report_mac(key, body)})
    assert stream not in processor.streams()  # its reports are not even read
    with pytest.raises(Exception) as err:
        processor.parse(stream, "0-1", {"r": body, "m": report_mac(key, body)})
    assert getattr(err.value, "reason", None) == "no_current_key"
    _assert_flagged(rig)


def test_a_replayed_queued_event_does_not_requeue_a_running_task(rig: Rig) -> None:
    task = rig.promote()
    rig.reconcile()
    fact = rig.fact(task.id)
    assert fact.state is TaskState.QUEUED and fact.dispatches
    # The task starts (as the broker applies a worker's claim), then the attacker replays its
    # earlier task.queued and writes the record back to queued, so the two agree.
    store = rig.store
    nonce = next(iter(fact.dispatches))
    store.move_task(task.id, TaskState.RUNNING, actor="system", update={"attempts": 1},
                    attempt=1, run="r" * 16, nonce=nonce, job=f"{task.id}_1", queue=fact.queue, worker="w")
    store.audit.seal_pending()
    running = rig.r.get(store.keys.task(task.id))
    _replay(rig, "task.queued", task.id)
    rig.r.set(store.keys.task(task.id), running.replace('"state":"running"', '"state":"queued"'))
    assert rig.fact(task.id).state is TaskState.RUNNING
    assert rig.reconcile() == 0
    _assert_flagged(rig)
