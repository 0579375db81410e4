"""The outbox acts only on genuine broker events: junk written into the audit stream by someone
with Redis access (unsigned, garbage, a worker-key approval) is skipped and acknowledged, and the
events behind it are still delivered."""

from __future__ import annotations

import json

from intake.audit import AuditLog, report_mac, worker_report_key
from intake.outbox import Outbox


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
