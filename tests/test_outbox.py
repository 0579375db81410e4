"""The outbox acts only on genuine broker events: junk written into the audit stream by someone
with Redis access (unsigned, garbage, a worker-key approval) is skipped and acknowledged, and the
events behind it are still delivered."""

from __future__ import annotations

import json
import time

import pytest

from intake.audit.log import AuditLog, worker_report_key
from intake.core.redis_conn import make_client
from intake.core.settings import Settings
from intake.operations.metrics import AuditMetrics
from intake.protocol.reports import report_mac
from intake.runtime import open_broker
from intake.storage.outbox import Delivery, Outbox, backoff_delay
from intake.storage.store import Store
from tests.conftest import FakeClock
from tests.factories import draft


def test_junk_is_skipped_and_the_events_behind_it_are_delivered(audit: AuditLog) -> None:
    outbox = Outbox(audit, "slack-test", retry_ms=0)
    outbox.ensure_group()
    audit.record("system", "idea.captured", "I-000000000001", channel="slack")
    r = audit.r
    body = json.dumps({"at": 1.0, "actor": "approver:alice", "action": "approval.recorded",
                       "subject": "T-000000000001", "data": {}, "eid": "a" * 16})
    r.xadd(audit.stream, {"e": body, "m": "0" * 64})
    r.xadd(audit.stream, {"x": "garbage"})
    forged = json.dumps({"w": "w1", "g": 1, "action": "approval.recorded", "task": "T-000000000001"})
    r.xadd(audit.stream, {"e": forged, "m": report_mac(worker_report_key(audit._key, "w1", 1), forged), "k": "w"})
    audit.record("system", "idea.announced", "I-000000000001")
    seen = []
    for _ in range(3):
        for delivery in outbox.fetch(block_ms=10):
            seen.append(delivery.event.action)
            outbox.ack(delivery)
    assert seen == ["idea.captured", "idea.announced"]
    assert r.xpending(audit.stream, "slack-test")["pending"] == 0  # the junk was acknowledged, not left to stall


# -- backoff, give-up, leases, dead consumers ------------------------------------------------------
def test_backoff_doubles_with_full_jitter_up_to_the_cap() -> None:
    ceilings = [backoff_delay(n, 1.0, 60.0, 0.999999) for n in range(1, 10)]
    assert ceilings == pytest.approx([1, 2, 4, 8, 16, 32, 60, 60, 60], rel=1e-5)
    assert backoff_delay(5, 1.0, 60.0, 0.25) == pytest.approx(4.0)  # a quarter of the 16 s ceiling
    assert backoff_delay(3, 1.0, 60.0, 0.0) == 0.5  # never below half the base: no spinning
    assert backoff_delay(10_000, 1.0, 60.0, 0.5) == 30.0  # huge counts do not overflow


def _events(audit: AuditLog, action: str) -> list[dict]:  # type: ignore[type-arg]
    """The sealed, genuine events of one kind."""
    return [e for e in audit.export() if e["action"] == action and e["verified"]]


def _one(outbox: Outbox) -> Delivery:
    got = outbox.fetch(block_ms=10)
    assert len(got) == 1, got
    return got[0]


def test_a_failure_is_retried_later_with_backoff_and_retry_after(audit: AuditLog) -> None:
    outbox = Outbox(audit, "g", retry_ms=1000, retry_cap_s=60, lease_s=30)
    outbox.ensure_group()
    audit.record("system", "idea.captured", "I-000000000001")
    delivery = _one(outbox)
    before = time.time()
    assert outbox.failed(delivery, "ratelimited", retry_after=20) is False
    due_ms = audit.r.zscore(outbox.due_key, delivery.id)
    assert due_ms >= int(before * 1000) + 20_000  # Slack's Retry-After wins over the (smaller) backoff
    assert outbox.attempts(delivery) == 1 and outbox.fetch(block_ms=10) == []  # not due yet
    audit.r.zadd(outbox.due_key, {delivery.id: 0})  # time passes
    again = _one(outbox)
    assert again.id == delivery.id
    outbox.failed(again, "internal_error")
    assert outbox.attempts(again) == 2
    outbox.ack(again)
    assert audit.r.zcard(outbox.due_key) == 0 and audit.r.hlen(outbox.tries_key) == 0
    assert audit.r.xpending(audit.stream, "g")["pending"] == 0


def test_the_give_up_path_is_audited_and_counted(settings: Settings, store: Store, clock: FakeClock) -> None:
    clock.advance(-7200)  # the idea was captured two hours ago
    idea, _ = store.capture(draft())
    with open_broker(settings) as broker:
        metrics = AuditMetrics(broker)
        outbox = Outbox(broker.audit, "slack-notifier", retry_ms=10, max_age_s=3 * 3600)
        outbox.ensure_group()
        delivery = _one(outbox)
        assert outbox.failed(delivery, "internal_error") is False  # young enough: retried later
        outbox.max_age_s = 3600  # (as if an hour went by)
        assert outbox.failed(delivery, "service_unavailable") is True  # no TypeError: audited, dropped
        assert outbox.failed(delivery, "service_unavailable") is True  # once: it is no longer pending
        assert broker.client.xpending(broker.audit.stream, "slack-notifier")["pending"] == 0
        assert broker.client.zcard(outbox.due_key) == 0
        assert "idea.captured" not in [d.event.action for d in outbox.fetch(block_ms=10)]
        dropped = _events(broker.audit, "outbox.dropped")
        assert len(dropped) == 1 and dropped[0]["subject"] == idea.id
        assert dropped[0]["data"] == {"group": "slack-notifier", "event": delivery.id, "event_action": "idea.captured",
                                      "attempts": 2, "age_s": dropped[0]["data"]["age_s"],
                                      "error": "service_unavailable"}
        assert dropped[0]["data"]["age_s"] >= 7200
        metrics.update()
        assert metrics.outbox_dropped == {"slack_notifier": 1}


def test_a_rewritten_schedule_cannot_get_a_young_event_dropped(audit: AuditLog, redis_server: str) -> None:
    outbox = Outbox(audit, "g", retry_ms=10, max_age_s=3600)
    outbox.ensure_group()
    audit.record("system", "idea.captured", "I-000000000001")
    delivery = _one(outbox)
    attacker = make_client(redis_server)  # a plain client: no audit key
    attacker.hset(outbox.tries_key, delivery.id, json.dumps({"n": 10**6, "error": "x"}))
    attacker.zadd(outbox.due_key, {delivery.id: 0})
    again = _one(outbox)
    assert outbox.failed(again, "internal_error") is False  # the age comes from the MAC'd event
    assert _events(audit, "outbox.dropped") == []


def test_a_leased_delivery_is_nobody_elses_until_the_lease_ends(audit: AuditLog) -> None:
    one = Outbox(audit, "g", lease_s=0.4)
    two = Outbox(audit, "g", lease_s=0.4)
    one.ensure_group()
    audit.record("system", "idea.captured", "I-000000000001")
    taken = _one(one)
    assert two.fetch(block_ms=10) == []  # leased to one
    deadline = time.monotonic() + 10
    while not (got := two.fetch(block_ms=50)):  # one died with it: the lease runs out
        if time.monotonic() > deadline:
            pytest.fail("the lease never ran out")
    assert [d.id for d in got] == [taken.id]
    assert audit.r.xpending_range(audit.stream, "g", "-", "+", 10)[0]["consumer"] == two.consumer


def test_dead_consumers_are_removed_and_their_entries_delivered(audit: AuditLog) -> None:
    audit.record("system", "idea.captured", "I-000000000001")
    r = audit.r
    r.xgroup_create(audit.stream, "g", id="0")
    assert r.xreadgroup("g", "crashed-broker", {audit.stream: ">"})  # read, never leased, never acked
    live = Outbox(audit, "g", lease_s=0.3)
    deadline = time.monotonic() + 10
    while not (got := live.fetch(block_ms=50)):
        if time.monotonic() > deadline:
            pytest.fail("the dead consumer's entry was never delivered")
    assert got[0].event.action == "idea.captured"
    assert [c["name"] for c in r.xinfo_consumers(audit.stream, "g")] == [live.consumer]


def test_a_success_or_a_probe_ends_the_wait_of_backed_off_deliveries(audit: AuditLog) -> None:
    """Slack was down long enough for retries to back off to the cap; the first delivery that
    gets through makes every waiting one due now, and while all fail a probe tries one early."""
    outbox = Outbox(audit, "g", retry_ms=60_000, retry_cap_s=300, lease_s=30)
    outbox.ensure_group()
    for n in (1, 2, 3):
        audit.record("system", "idea.captured", f"I-00000000000{n}")
    waiting = outbox.fetch(count=3, block_ms=10)
    assert len(waiting) == 3
    for delivery in waiting:
        outbox.failed(delivery, "TimeoutError")
    assert outbox.fetch(block_ms=10) == []  # all backed off
    assert outbox.probe() is True  # the one due soonest is tried now
    assert outbox.probe() is False  # and not again before PROBE_S
    [probed] = outbox.fetch(block_ms=10)
    assert outbox.fetch(block_ms=10) == []  # only one
    outbox.ack(probed)  # it got through: Slack is back
    rest = outbox.fetch(count=10, block_ms=10)
    assert sorted(d.id for d in rest) == sorted(d.id for d in waiting if d.id != probed.id)
    for delivery in rest:
        outbox.ack(delivery)
    assert audit.r.hlen(outbox.tries_key) == 0 and outbox.probe() is False
