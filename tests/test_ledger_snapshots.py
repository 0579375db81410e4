"""Ledger snapshots: a start replays only what was sealed after the newest snapshot, and a
snapshot someone with Redis write access forged, swapped or never put on the chain is not used."""

from __future__ import annotations

import json

from intake.audit.ledger import Ledger
from intake.core.models import TaskState
from tests.factories import draft
from tests.workers.harness import Rig, rig  # noqa: F401


def facts(ledger: Ledger) -> dict[str, object]:
    """What a ledger believes, comparable across ledgers (cursor aside)."""
    state = ledger._state()
    return {**state, "halted": ledger.halted}


def counting(rig: Rig) -> tuple[Ledger, list[int]]:
    """A fresh ledger (another process starting) that counts the entries it follows."""
    ledger = Ledger(rig.broker.audit)
    seen: list[int] = []
    original = ledger._entry

    def entry(sealed: object) -> None:
        seen.append(sealed.seq)  # type: ignore[attr-defined]
        original(sealed)  # type: ignore[arg-type]

    ledger._entry = entry  # type: ignore[method-assign]
    return ledger, seen


def test_a_start_replays_only_what_follows_the_snapshot_and_believes_the_same(rig: Rig) -> None:
    task = rig.promote()
    rig.issue_key("w1")  # a registered worker: its scope must survive the snapshot too
    rig.broker.ledger.follow()
    assert rig.broker.ledger.snapshot_if_due(every=1)
    snap = rig.broker.ledger.snapshot_at
    assert snap is not None
    on_chain = rig.events("ledger.snapshot")
    assert len(on_chain) == 1 and on_chain[0]["data"]["seq"] == snap.seq
    rig.broker.gatekeeper.revoke(task.id, identity="cli:bob", is_approver=True, reason="after the snapshot")
    for _ in range(5):
        rig.store.capture(draft())
    rig.broker.audit.seal_pending()

    fresh, seen = counting(rig)
    fresh.follow()
    assert seen and min(seen) == snap.seq + 1  # nothing before the snapshot was replayed
    assert fresh.snapshot_at == snap
    full = Ledger(rig.broker.audit)
    full._loaded = True  # no snapshot: the whole log
    full.follow()
    assert facts(fresh) == facts(full)
    assert "w1" in fresh.worker_scopes
    assert fresh.task(task.id).state is TaskState.REVOKED  # type: ignore[union-attr]
    assert fresh.halted is None


def test_a_forged_snapshot_is_ignored(rig: Rig) -> None:
    """Someone who writes Redis plants a snapshot that says the revoked task is queued."""
    task = rig.promote()
    rig.broker.gatekeeper.revoke(task.id, identity="cli:bob", is_approver=True, reason="no")
    rig.broker.ledger.follow()
    assert rig.broker.ledger.snapshot_if_due(every=1)
    key = rig.broker.audit.snapshot
    body = json.loads(rig.r.hget(key, "body"))
    for fact in body["state"]["tasks"]:
        fact["state"] = "queued"
    rig.r.hset(key, "body", json.dumps(body))  # the old MAC no longer holds
    fresh, seen = counting(rig)
    fresh.follow()
    assert min(seen) == 1  # the whole log replayed
    assert fresh.snapshot_at is None
    assert fresh.task(task.id).state is TaskState.REVOKED  # type: ignore[union-attr]
    # Dropping the MAC, or writing garbage, is the same.
    rig.r.hset(key, mapping={"body": "{}", "mac": ""})
    assert Ledger(rig.broker.audit).follow().task(task.id).state is TaskState.REVOKED  # type: ignore[union-attr]


def test_a_snapshot_the_chain_never_named_is_not_used(rig: Rig) -> None:
    """A genuinely MAC'd snapshot whose ``ledger.snapshot`` event never made it to the chain
    (the broker died between the two) is dropped: the whole log is replayed."""
    task = rig.promote()
    ledger = rig.broker.ledger.follow()
    with ledger._lock:
        cursor = ledger.cursor
        body = json.dumps({"v": 1, "cursor": cursor.encode(), "state": ledger._state()},  # type: ignore[union-attr]
                          separators=(",", ":"), sort_keys=True).encode()
    assert rig.broker.audit.store_snapshot(cursor, body)  # type: ignore[arg-type]
    rig.store.capture(draft())
    rig.broker.audit.seal_pending()
    fresh, seen = counting(rig)
    fresh.follow()
    assert min(seen) == 1 and fresh.snapshot_at is None
    assert fresh.task(task.id) is not None and fresh.halted is None


def test_a_snapshot_past_a_rewritten_anchor_is_not_used_and_the_sweep_check_halts(rig: Rig) -> None:
    rig.promote()
    ledger = rig.broker.ledger.follow()
    assert ledger.snapshot_if_due(every=1)
    snap = ledger.snapshot_at
    assert snap is not None
    ledger.follow()
    # Rewrite the sealed entry the snapshot is anchored at (its seal changes).
    stored = rig.r.hget(rig.broker.audit.seals, snap.id)
    seq, seal, verdict = stored.split(" ")
    rig.r.hset(rig.broker.audit.seals, snap.id, f"{seq} {'0' * 64} {verdict}")
    assert ledger.check_anchor().halted is not None  # the cheap sweep check catches it
    fresh, seen = counting(rig)
    fresh.follow()
    assert fresh.snapshot_at is None and min(seen) == 1  # no start from a snapshot off the chain
    assert fresh.halted is not None  # and the full replay reports the rewrite
