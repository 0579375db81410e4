"""Audit log: sealing, concurrent appends, and tamper detection done directly in Redis."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from intake.audit import AuditLog, event
from intake.errors import AuditBroken


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
    with pytest.raises(AuditBroken, match="replayed copy") as err:
        audit.verify()
    assert err.value.event_id == f"{ms}-99"
    invented = (f"{ms}-99", {"e": entries[0][1]["e"].replace("S0", "S9"), "m": entries[0][1]["m"]})
    rebuild(audit.r, audit.stream, entries[:2] + [invented] + entries[2:])
    with pytest.raises(AuditBroken, match="MAC mismatch") as err:
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
    audit.r.hset(audit.seals, ids[1], "2 " + "0" * 64)
    with pytest.raises(AuditBroken, match="seal mismatch") as err:
        audit.verify()
    assert err.value.event_id == ids[1]


def test_another_key_cannot_verify(audit: AuditLog) -> None:
    fill(audit, 2)
    other = AuditLog(audit.r, b"k" * 32, "intake")
    with pytest.raises(AuditBroken, match="MAC mismatch"):
        other.verify()


def test_truncation_with_a_rewritten_head_is_detected(audit: AuditLog) -> None:
    ids = fill(audit, 5)
    for victim in ids[2:]:
        audit.r.xdel(audit.stream, victim)
    seq, seal = audit.r.hget(audit.seals, ids[1]).split(" ")
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
    audit.seal_pending()  # a replay gets sealed like any append...
    with pytest.raises(AuditBroken, match="replayed copy") as err:
        audit.verify()  # ...but verify names it
    assert err.value.event_id == copy_id


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


def test_workers_append_with_their_own_key_and_cannot_seal(audit: AuditLog, settings) -> None:  # type: ignore[no-untyped-def]
    from intake.audit import worker_events_key
    from intake.keys import load_secret

    fill(audit, 2)
    worker = AuditLog(audit.r, load_secret(settings, "worker_events"), "intake", worker=True)
    assert load_secret(settings, "worker_events") == worker_events_key(load_secret(settings, "audit"))
    worker.record("worker:w1", "task.running", "T-000000000001", attempt=1)
    assert worker.seal_pending() == 0 and audit.verify().unsealed == 1  # only the broker seals
    audit.seal_pending()
    assert audit.verify().events == 3
    with pytest.raises(PermissionError):
        worker.record_mac("approval", {})
    # An event MAC'd with some other key, claiming to be a worker's, is named.
    rogue = AuditLog(audit.r, b"r" * 32, "intake", worker=True)
    rogue.record("worker:evil", "task.succeeded", "T-000000000001")
    with pytest.raises(AuditBroken, match="MAC mismatch"):
        audit.verify()
