"""Issue 8, attacked: a plain Redis client (no intake key) replays *genuine* sealed broker events.

Every broker event's MAC is over its own body only, so a byte-for-byte copy XADDed again carries
a valid MAC, and the sealer seals it ``ok``. The ledger must not apply such a copy as a new fact:
each event carries a unique ``eid``, and a second entry with an ``eid`` already seen is a replay.
Otherwise an old ``broker.thawed`` lifts a freeze, an old ``approver.added`` rolls an enrolment
generation back, an old ``worker.key_issued`` revives a revoked worker key, and an old
``task.queued`` re-queues a running task.

Since issue 19 a replay no longer halts the broker (that let any Redis writer stop promotion and
dispatch for good): the sealer seals the copy ``rejected:replay``, the ledger skips it, and
``audit verify`` lists it as a rejected entry. A real break (an edited, deleted or reordered
sealed entry) still halts: see the last tests here and tests/test_ledger.py.
"""

from __future__ import annotations

import json

import pytest

from intake.audit.ledger import Ledger
from intake.core.errors import AuditBroken, LedgerHalted, Refused
from intake.core.models import TaskState, canonical_json
from intake.protocol.reports import report_mac
from intake.tasks.dispatch import job_id_for
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
    """The replay is found and skipped: sealed as a rejected replay (`audit verify` lists it,
    without calling history broken), and the ledger stays live."""
    rig.broker.ledger.follow().require_live()
    assert Ledger(rig.broker.audit).follow().halted is None  # a broker starting now agrees
    report = rig.broker.audit.verify()  # does not raise: nothing sealed was changed
    assert [a.message for a in report.anomalies if "rejected:replay" in a.message]
    assert not [a for a in report.anomalies if a.fatal]


def test_a_replayed_thaw_does_not_lift_the_freeze(rig: Rig) -> None:
    gate = rig.broker.gatekeeper
    gate.freeze(by="alice", actor="cli:ops", reason="drill")
    gate.thaw(actor="cli:ops")
    gate.freeze(by="alice", actor="cli:ops", reason="incident")
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
                    attempt=1, run="r" * 16, nonce=nonce, job=job_id_for(fact.queue, task.id, 1), queue=fact.queue, worker="w")
    store.audit.seal_pending()
    running = rig.r.get(store.keys.task(task.id))
    _replay(rig, "task.queued", task.id)
    rig.r.set(store.keys.task(task.id), running.replace('"state":"running"', '"state":"queued"'))
    assert rig.fact(task.id).state is TaskState.RUNNING
    assert rig.reconcile() == 0
    _assert_flagged(rig)


def test_promotion_and_dispatch_keep_working_after_a_replay(rig: Rig) -> None:
    """Issue 19: one replayed genuine entry used to halt every promotion and dispatch for good."""
    first = rig.promote()
    rig.reconcile()
    _replay(rig, "task.queued", first.id)
    second = rig.promote()  # promotion works
    rig.reconcile()
    assert rig.fact(second.id).state is TaskState.QUEUED and rig.fact(second.id).dispatches  # dispatch works
    _assert_flagged(rig)


def test_a_replay_the_sealer_missed_is_still_skipped_not_a_halt(rig: Rig) -> None:
    """Whoever writes Redis can wipe the sealer's replay index: the copy is then sealed ok, and
    every reader still recognises it by its eid and skips it."""
    gate = rig.broker.gatekeeper
    gate.freeze(by="alice", actor="cli:ops", reason="drill")
    gate.thaw(actor="cli:ops")
    gate.freeze(by="alice", actor="cli:ops", reason="incident")
    rig.broker.ledger.follow()
    rig.r.delete(rig.broker.audit.uids)
    _replay(rig, "broker.thawed")
    assert rig.broker.ledger.follow().frozen is not None
    rig.broker.ledger.require_live()
    report = rig.broker.audit.verify()
    assert [a.kind for a in report.anomalies] == ["replayed"] and not report.anomalies[0].fatal


def test_a_planted_index_entry_cannot_get_a_genuine_event_sealed_as_a_replay(rig: Rig) -> None:
    """The index is only a hint: naming an unrelated entry for a fresh event's uid does nothing."""
    audit = rig.broker.audit
    rig.promote()
    some_id = rig.r.xrange(audit.stream, count=1)[0][0]
    pipe = rig.r.pipeline(transaction=True)
    ev = __import__("intake.audit.log", fromlist=["event"]).event("system", "broker.frozen", "intake", reason="x")
    rig.r.hset(audit.uids, ev.eid, some_id)
    audit.append(pipe, ev)
    pipe.execute()
    audit.seal_pending()
    assert rig.broker.ledger.follow().frozen is not None  # applied: genuine
    assert not audit.verify().anomalies


@pytest.mark.parametrize("how", ["edit", "delete", "reorder"])
def test_a_real_break_still_halts(rig: Rig, how: str) -> None:
    audit = rig.broker.audit
    rig.promote()
    rig.broker.ledger.follow()
    entries = rig.r.xrange(audit.stream)
    if how == "edit":
        body = json.loads(entries[2][1]["e"])
        body["subject"] = "T-000000000666"
        entries[2][1]["e"] = json.dumps(body)
    elif how == "delete":
        del entries[2]
    else:
        entries[2], entries[3] = (entries[2][0], entries[3][1]), (entries[3][0], entries[2][1])
    rig.r.delete(audit.stream)
    for entry_id, fields in entries:  # the attacker rewrites the stream wholesale
        rig.r.xadd(audit.stream, fields, id=entry_id)
    with pytest.raises(LedgerHalted):
        Ledger(audit).follow().require_live()
    with pytest.raises(AuditBroken):
        audit.verify()
