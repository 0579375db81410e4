"""The verified ledger: facts from sealed history only; a broken chain halts every power
decision (fail closed) until an operator acts; a rolled-back Redis is accepted explicitly."""

from __future__ import annotations

import json

import pytest

from intake.audit.ledger import Ledger
from intake.core.errors import LedgerHalted, Refused
from intake.core.models import TaskState
from tests.factories import draft
from tests.workers.harness import Rig, rig  # noqa: F401


def test_the_ledger_rebuilds_the_same_facts_from_the_chain(rig: Rig) -> None:
    task = rig.promote()
    rig.broker.gatekeeper.revoke(task.id, identity="cli:bob", is_approver=True, reason="no")
    fresh = Ledger(rig.broker.audit).follow()  # another process starting from nothing
    assert fresh.task(task.id).state is TaskState.REVOKED  # type: ignore[union-attr]
    assert fresh.approvers["alice"].confirmed and fresh.approvers["alice"].generation == 1
    assert fresh.halted is None


def test_an_edited_sealed_entry_halts_dispatch_and_promotion(rig: Rig) -> None:
    queued = rig.promote()
    r, stream = rig.r, rig.broker.audit.stream
    entries = r.xrange(stream)
    body = json.loads(entries[3][1]["e"])
    body["subject"] = "T-000000000666"
    entries[3][1]["e"] = json.dumps(body)
    r.delete(stream)
    for entry_id, fields in entries:  # the attacker rewrites the stream wholesale
        r.xadd(stream, fields, id=entry_id)
    ledger = Ledger(rig.broker.audit).follow()
    assert ledger.halted is not None and "altered" in ledger.halted
    markers = [e for e in rig.broker.audit.export() if e.get("action") == "ledger.halted"]
    assert len(markers) == 1 and markers[0]["data"]["kind"] == "altered"  # the log says it too
    rig.broker.ledger.follow()
    assert rig.broker.ledger.halted is None  # it had verified that entry already, before the edit
    rig.broker.ledger.check_anchor()  # the cheap check each sweep runs does not walk that far back
    assert rig.broker.ledger.halted is None
    rig.broker.ledger.recheck()  # the daily full walk (outside the ledger lock) finds it
    with pytest.raises(LedgerHalted):
        rig.broker.ledger.require_live()
    with pytest.raises(LedgerHalted):
        rig.broker.dispatcher.enqueue(queued.id)
    assert rig.broker.dispatcher.reconcile() == 0
    idea = rig.store.capture(draft(text="after the break"))[0]  # capture still works: it grants nothing
    with pytest.raises(Refused) as err:
        rig.broker.gatekeeper.promote(idea.id, repo="acme/web", change_type="docs", approver_id="bob",
                                      code=rig.code("bob"))
    assert err.value.reason == "ledger_halted"


def test_a_rollback_halts_until_accepted_and_captures_are_not_reported_failed(rig: Rig) -> None:
    audit = rig.broker.audit
    task = rig.promote()
    ids = [sid for sid, _ in rig.r.xrange(audit.stream)]
    keep = ids[-3]
    for victim in ids[-2:]:
        rig.r.xdel(audit.stream, victim)  # a failover to a replica that lost the last writes
    seq, seal, _ = rig.r.hget(audit.seals, keep).split(" ")
    rig.r.set(audit.head, f"{keep} {seq} {seal}")
    assert "behind the checkpoint" in (Ledger(audit).follow().halted or "")
    # A write that lands now is committed; sealing waits, and nothing reports it as failed.
    idea, created = rig.store.capture(draft(text="during the outage"))
    assert created and rig.store.get_idea(idea.id).text == "during the outage"
    lost = audit.accept_rollback(actor="os:ops", reason="failover to r2")
    assert lost is not None and f"#{int(seq) + 1}..#{len(ids)}" in lost
    ledger = rig.broker.ledger.follow()
    assert ledger.halted is None
    assert Ledger(audit).follow().halted is None  # a process starting afterwards agrees
    assert rig.broker.gatekeeper.expire_due() == {"ideas": 0, "tasks": 0}
    assert rig.fact(task.id) is not None


async def test_readyz_is_not_ready_while_the_ledger_is_halted(rig: Rig) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from intake.app import create_app

    rig.promote()
    entries = rig.r.xrange(rig.broker.audit.stream)
    body = json.loads(entries[1][1]["e"])
    body["subject"] = "mallory"
    entries[1][1]["e"] = json.dumps(body)
    rig.r.delete(rig.broker.audit.stream)
    for entry_id, fields in entries:
        rig.r.xadd(rig.broker.audit.stream, fields, id=entry_id)
    async with TestClient(TestServer(create_app(rig.settings), host="127.0.0.1")) as client:
        resp = await client.get("/readyz")
        body = await resp.json()
    assert resp.status == 503 and body["status"] == "halted" and "altered" in body["ledger"]
