"""Audit log: sealing, concurrent appends, and tamper detection done directly in Redis."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from intake.audit.log import AuditLog, event
from intake.core.errors import AuditBroken


def fill(audit: AuditLog, n: int) -> list[str]:
    for i in range(n):
        audit.record("system", "test.event", f"S{i}", n=i)
        time.sleep(0.002)  # distinct stream-id milliseconds, so an insert has room
    return [sid for sid, _ in audit.r.xrange(audit.stream)]


def rebuild(r: redis.Redis, stream: str, entries: list[tuple[str, dict[str, str]]]) -> None:
    """What an attacker with Redis write access does: rewrite the stream wholesale."""
    r.delete(stream)
    for sid, fields in entries:
        r.xadd(stream, fields, id=sid)


def test_intact_chain_verifies(audit: AuditLog) -> None:
    fill(audit, 5)
    report = audit.verify()
    assert (report.events, report.unsealed) == (5, 0)
    exported = list(audit.export())
    assert [e["seq"] for e in exported] == [1, 2, 3, 4, 5]
    assert exported[2]["subject"] == "S2" and exported[2]["data"] == {"n": 2}


def test_concurrent_appends_seal_in_order(audit: AuditLog) -> None:
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda i: audit.record("system", "test.event", f"S{i}"), range(200)))
    assert audit.verify().events == 200


def test_unsealed_tail_is_reported_not_broken(audit: AuditLog) -> None:
    fill(audit, 2)
    pipe = audit.r.pipeline()
    audit.append(pipe, event("system", "late", "S9"))
    pipe.execute()
    assert audit.verify().unsealed == 1
    audit.seal_pending()
    assert audit.verify().unsealed == 0


def test_edit_is_detected(audit: AuditLog) -> None:
    ids = fill(audit, 4)
    entries = audit.r.xrange(audit.stream)
    entries[2][1]["e"] = entries[2][1]["e"].replace('"S2"', '"S7"')
    rebuild(audit.r, audit.stream, entries)
    with pytest.raises(AuditBroken, match="contents altered") as err:
        audit.verify()
    assert err.value.event_id == ids[2]


def test_delete_is_detected(audit: AuditLog) -> None:
    ids = fill(audit, 4)
    audit.r.xdel(audit.stream, ids[1])
    with pytest.raises(AuditBroken, match="missing") as err:
        audit.verify()
    assert err.value.event_id == ids[2]


def test_delete_of_last_event_is_detected(audit: AuditLog) -> None:
    ids = fill(audit, 3)
    audit.r.xdel(audit.stream, ids[2])
    with pytest.raises(AuditBroken, match="truncated") as err:
        audit.verify()
    assert err.value.event_id == ids[2]


def test_insert_is_detected(audit: AuditLog) -> None:
    ids = fill(audit, 4)
    entries = audit.r.xrange(audit.stream)
    ms = ids[1].split("-")[0]
    # Without the key, an inserted event is either a copy of a real one or carries a bad MAC.
    copied = (f"{ms}-99", dict(entries[0][1]))
    rebuild(audit.r, audit.stream, entries[:2] + [copied] + entries[2:])
    with pytest.raises(AuditBroken, match="inserted into sealed history") as err:
        audit.verify()
    assert err.value.event_id == f"{ms}-99"
    invented = (f"{ms}-99", {"e": entries[0][1]["e"].replace("S0", "S9"), "m": entries[0][1]["m"]})
    rebuild(audit.r, audit.stream, entries[:2] + [invented] + entries[2:])
    with pytest.raises(AuditBroken, match="inserted into sealed history") as err:
        audit.verify()
    assert err.value.event_id == f"{ms}-99"


def test_unsealed_event_inside_sealed_history_is_detected(audit: AuditLog) -> None:
    ids = fill(audit, 3)
    audit.r.hdel(audit.seals, ids[1])
    with pytest.raises(AuditBroken, match="no seal") as err:
        audit.verify()
    assert err.value.event_id == ids[1]


def test_reorder_is_detected(audit: AuditLog) -> None:
    ids = fill(audit, 4)
    entries = audit.r.xrange(audit.stream)
    swapped = [entries[0], (ids[1], entries[2][1]), (ids[2], entries[1][1]), entries[3]]
    rebuild(audit.r, audit.stream, swapped)
    with pytest.raises(AuditBroken, match="reordered") as err:
        audit.verify()
    assert err.value.event_id == ids[1]


def test_forged_seal_is_detected(audit: AuditLog) -> None:
    ids = fill(audit, 3)
    audit.r.hset(audit.seals, ids[1], "2 " + "0" * 64 + " ok")
    with pytest.raises(AuditBroken, match="seal mismatch") as err:
        audit.verify()
    assert err.value.event_id == ids[1]


def test_another_key_cannot_verify(audit: AuditLog) -> None:
    fill(audit, 2)
    other = AuditLog(audit.r, b"k" * 32, "intake")
    with pytest.raises(AuditBroken, match="seal mismatch"):
        other.verify()


def test_truncation_with_a_rewritten_head_is_detected(audit: AuditLog) -> None:
    ids = fill(audit, 5)
    for victim in ids[2:]:
        audit.r.xdel(audit.stream, victim)
    seq, seal, _verdict = audit.r.hget(audit.seals, ids[1]).split(" ")
    audit.r.set(audit.head, f"{ids[1]} {seq} {seal}")  # a consistent-looking shorter chain
    with pytest.raises(AuditBroken, match="behind the checkpoint") as err:
        audit.verify()
    assert err.value.event_id == ids[4]


def test_deleted_seals_are_not_resealed(audit: AuditLog) -> None:
    ids = fill(audit, 4)
    audit.r.xdel(audit.stream, ids[1])
    audit.r.delete(audit.seals, audit.head)
    with pytest.raises(AuditBroken, match="behind the checkpoint"):
        audit.seal_pending()  # the broker refuses to bless the shortened history
    with pytest.raises(AuditBroken, match="behind the checkpoint"):
        audit.verify()


def test_replayed_event_is_detected(audit: AuditLog) -> None:
    fill(audit, 3)
    first = audit.r.xrange(audit.stream)[0]
    copy_id = audit.r.xadd(audit.stream, first[1])
    audit.seal_pending()  # a replay is sealed as one...
    report = audit.verify()  # ...and verify names it, without calling history broken
    assert [(a.id, a.kind) for a in report.anomalies] == [(copy_id, "rejected")]
    assert "rejected:replay" in report.anomalies[0].message
    audit.r.delete(audit.uids)  # with the sealer's index wiped, a copy is sealed ok...
    second = audit.r.xadd(audit.stream, first[1])
    audit.seal_pending()
    report = audit.verify()  # ...but still named by its eid, not fatal
    assert [(a.id, a.kind, a.fatal) for a in report.anomalies] == [(copy_id, "rejected", False),
                                                                   (second, "replayed", False)]


@pytest.mark.parametrize("garbage", ["x", "1", "two 0000", ""])
def test_malformed_seal_is_named_not_a_crash(audit: AuditLog, garbage: str) -> None:
    ids = fill(audit, 3)
    audit.r.hset(audit.seals, ids[1], garbage)
    with pytest.raises(AuditBroken) as err:
        audit.verify()
    assert err.value.event_id == ids[1]


def test_malformed_head_is_named(audit: AuditLog) -> None:
    fill(audit, 2)
    audit.r.set(audit.head, "nonsense")
    with pytest.raises(AuditBroken, match="head is malformed"):
        audit.verify()


def test_sealer_seals_only_what_is_genuine(audit: AuditLog) -> None:
    """An attacker with Redis write access and at most a worker's key: an unsigned XADD, a
    garbage entry and a worker-key ``approval.recorded`` are sealed as rejected, listed by
    verify, and never parsed as genuine."""
    import json

    from intake.audit.log import worker_report_key
    from intake.protocol.reports import report_mac

    fill(audit, 2)
    r = audit.r
    body = json.dumps({"at": time.time(), "actor": "approver:alice", "action": "approval.recorded",
                       "subject": "T-000000000001", "data": {}, "eid": "f" * 16})
    unsigned = r.xadd(audit.stream, {"e": body, "m": "0" * 64})
    garbage = r.xadd(audit.stream, {"x": "\x00garbage"})
    worker_key = worker_report_key(audit._key, "w1", 1)  # what a compromised worker holds
    forged_body = json.dumps({"w": "w1", "g": 1, "action": "approval.recorded", "task": "T-000000000001"})
    forged = r.xadd(audit.stream, {"e": forged_body, "m": report_mac(worker_key, forged_body), "k": "w"})
    audit.record("system", "test.after", "S9")  # the log goes on behind them
    report = audit.verify()
    rejected = {a.id: a.message for a in report.anomalies if a.kind == "rejected"}
    assert set(rejected) == {unsigned, garbage, forged}
    assert "bad_mac" in rejected[unsigned] and "malformed" in rejected[garbage]
    assert "not_a_report_action" in rejected[forged]
    exported = {e["id"]: e for e in audit.export()}
    assert [exported[i]["verified"] for i in (unsigned, garbage, forged)] == [False, False, False]
    assert exported[unsigned]["verdict"] == "rejected:bad_mac"
    assert all(e["verified"] for i, e in exported.items() if i not in rejected)
    for entry_id in (unsigned, garbage, forged):
        fields = r.xrange(audit.stream, entry_id, entry_id)[0][1]
        assert audit.parse_entry(fields) is None


def test_broker_key_cannot_speak_for_a_worker(audit: AuditLog) -> None:
    audit.record("worker:w1", "task.succeeded", "T-000000000001")
    report = audit.verify()
    assert [a.kind for a in report.anomalies] == ["rejected"]
    assert "broker_key_for_worker" in report.anomalies[0].message


def test_verify_lists_every_break_not_only_the_first(audit: AuditLog) -> None:
    ids = fill(audit, 6)
    audit.r.hset(audit.seals, ids[1], "2 " + "0" * 64 + " ok")
    audit.r.hset(audit.seals, ids[4], "garbage")
    with pytest.raises(AuditBroken) as err:
        audit.verify()
    found = [a.id for a in err.value.report.anomalies]  # type: ignore[attr-defined]
    assert ids[1] in found and ids[4] in found


def test_rollback_is_refused_until_accepted(audit: AuditLog) -> None:
    ids = fill(audit, 4)
    for victim in ids[2:]:
        audit.r.xdel(audit.stream, victim)
    seq, seal, _ = audit.r.hget(audit.seals, ids[1]).split(" ")
    audit.r.set(audit.head, f"{ids[1]} {seq} {seal}")  # a replica that lost the last two
    with pytest.raises(AuditBroken, match="behind the checkpoint"):
        audit.seal_pending()
    lost = audit.accept_rollback(actor="cli:root", reason="failover to replica r2")
    assert lost is not None and "#3..#4" in lost
    audit.record("system", "test.after", "S9")
    report = audit.verify()
    marker = [e for e in audit.export() if e["action"] == "audit.rollback_accepted"]
    assert len(marker) == 1 and marker[0]["data"]["lost_from_seq"] == 3 and marker[0]["verified"]
    assert report.events == 4
