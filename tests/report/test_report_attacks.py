"""Attacks on the report: whoever can write Redis, holding no key, cannot change a figure. They
can add unsigned or forged entries (sealed as rejected, counted for nothing), replay a genuine
entry (counted once), plant task records (never read) or edit an idea record (its title is then
withheld); deleting sealed history is reported as a broken chain."""

from __future__ import annotations

import json
from typing import Any

import redis

from intake.core.models import canonical_json
from intake.operations.indicators.figures import Figures, Timeline, compute_figures
from intake.operations.indicators.render import render_html
from intake.storage.store import Store
from tests.conftest import FakeClock
from tests.factories import draft
from tests.report.events import emit, settle

HOSTILE = "<script>alert(1)</script> please <b>fix</b> the docs"


def scenario(store: Store) -> tuple[str, str]:
    """One idea promoted and blocked, one delivered: (blocked task, its idea)."""
    idea = store.capture(draft(text=HOSTILE))[0]
    other = store.capture(draft())[0]
    for task, of in (("T-0000000000b1", idea.id), ("T-0000000000d1", other.id)):
        emit(store, "approver:alice", "idea.promoted", of, task=task, via="cli")
        emit(store, "approver:alice", "task.created", task, idea=of, repo="acme/web", change_type="docs",
             tier="standard", spec_hash="0" * 64)
    settle(store, "T-0000000000b1", "blocked", {"gates": ["blocked path: .github/x.yml"]})
    settle(store, "T-0000000000d1", "delivering", {"commit": "a" * 40})
    emit(store, "system", "task.succeeded", "T-0000000000d1", commit="a" * 40)
    return "T-0000000000b1", idea.id


def figures(store: Store, clock: FakeClock) -> Figures:
    return compute_figures(Timeline(store.audit, store).follow(), clock.now - 3600, now=clock.now)


def counted(fig: Figures) -> dict[str, Any]:
    """Every figure except the audit walk's own bookkeeping and the verified titles."""
    data = fig.model_dump(exclude={"audit", "generated_at"})
    for n in data["notable"]:
        n.pop("title")
    return data


def test_forged_replayed_and_planted_records_change_no_figure(store: Store, clock: FakeClock,
                                                                redis_server: str) -> None:
    blocked, idea_id = scenario(store)
    before = figures(store, clock)
    assert (before.ideas, before.promoted, before.delivered, before.blocked) == (2, 2, 1, 1)
    assert before.notable[0].title == HOSTILE

    attacker = redis.Redis.from_url(redis_server, decode_responses=True)  # no key of any kind
    stream = store.audit.stream
    fake = {"at": clock.now, "actor": "system", "action": "task.succeeded", "subject": blocked,
            "data": {"commit": "b" * 40}, "eid": "f" * 16}
    attacker.xadd(stream, {"e": canonical_json(fake).decode(), "m": "0" * 64})  # a guessed MAC
    attacker.xadd(stream, {"e": json.dumps({**fake, "action": "idea.captured", "subject": "I-ffffffffffff"})})
    attacker.xadd(stream, {"e": "not json", "m": "x"})
    evidence = {"w": "w1", "g": 1, "action": "report.result", "task": blocked, "at": clock.now, "rid": "e" * 16,
                "data": {"attempt": 1, "run": "r1", "state": "succeeded",
                         "result": {"dependencies": {"delta": [{"name": "x", "change": "added"}]}}}}
    attacker.xadd(stream, {"e": canonical_json(evidence).decode(), "m": "1" * 64, "k": "w"})
    # A verbatim copy of a genuine, sealed capture: its MAC holds, but it is the same event.
    genuine = next(f for _, f in attacker.xrange(stream) if '"idea.captured"' in f.get("e", ""))
    attacker.xadd(stream, genuine)
    # Planted records the report never reads, and an edited idea record.
    attacker.set(store.keys.task("T-00000000ffff"), json.dumps({"id": "T-00000000ffff", "state": "succeeded"}))
    key = store.keys.idea(idea_id)
    record = json.loads(attacker.get(key))
    record["text"] = "a harmless request"
    attacker.set(key, json.dumps(record))

    after = figures(store, clock)
    assert counted(after) == counted(before)
    assert (after.audit.rejected, after.audit.replayed, after.audit.broken) == (4, 1, [])
    assert after.notable[0].title is None  # the record no longer verifies: no title shown
    assert "harmless" not in render_html(after)


def test_deleting_sealed_history_is_reported_as_broken(store: Store, clock: FakeClock, redis_server: str) -> None:
    scenario(store)
    attacker = redis.Redis.from_url(redis_server, decode_responses=True)
    victim = next(i for i, f in attacker.xrange(store.audit.stream) if '"task.created"' in f.get("e", ""))
    attacker.xdel(store.audit.stream, victim)
    fig = figures(store, clock)
    assert fig.created == 1  # the deleted event is gone, and the report says so:
    assert fig.audit.broken and "deleted" in fig.audit.broken[0], fig.audit.broken
    assert "The audit chain is broken" in render_html(fig)
