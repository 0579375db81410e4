"""Store: idempotent capture, concurrency, refusals, transitions, listing."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from intake.audit.log import AuditLog
from intake.core.errors import IllegalTransition, InvalidInput, NotFound
from intake.core.models import Channel, IdeaDraft, IdeaState
from intake.core.settings import Settings
from intake.storage.capture_queue import CaptureQueue
from intake.storage.store import Store
from tests.conftest import FakeClock
from tests.factories import draft


def audit_actions(audit: AuditLog) -> list[str]:
    return [e["action"] for e in audit.export()]


def test_capture_is_idempotent_on_channel_and_delivery(store: Store, audit: AuditLog) -> None:
    first, created = store.capture(draft(delivery_id="Ev1"))
    again, created_again = store.capture(draft(delivery_id="Ev1", text="a different body"))
    assert created and not created_again
    assert again.id == first.id and again.text == first.text
    assert audit_actions(audit) == ["idea.captured"]
    # The same delivery id on another channel is another delivery.
    other, created_other = store.capture(draft(delivery_id="Ev1", channel=Channel.EMAIL))
    assert created_other and other.id != first.id


def test_captured_idea_reads_back_whole(store: Store) -> None:
    idea, _ = store.capture(draft(text="line one\nline two", provenance={"k": "v"}), ttl_s=60)
    got = store.get_idea(idea.id)
    assert got == idea
    assert got.state is IdeaState.CAPTURED and got.title == "line one"
    assert got.expires_at == pytest.approx(got.created_at + 60)
    assert len(got.raw_sha256) == 64


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_text_is_refused(store: Store, audit: AuditLog, text: str) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        store.capture(draft(text=text))
    assert store.pending_ideas() == [] and audit_actions(audit) == []


def test_oversize_text_is_refused_not_truncated(store: Store, audit: AuditLog) -> None:
    limit = store.max_text_bytes
    ok, _ = store.capture(draft(text="é" * (limit // 2)))  # exactly the limit in bytes
    assert len(ok.text.encode()) == limit
    with pytest.raises(InvalidInput, match=f"{limit + 1} bytes; the limit is {limit}"):
        store.capture(draft(text="x" * (limit + 1)))
    assert len(store.pending_ideas()) == 1 and audit_actions(audit) == ["idea.captured"]


def test_fifty_concurrent_distinct_captures(store: Store, audit: AuditLog) -> None:
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda i: store.capture(draft(delivery_id=f"D{i}")), range(50)))
    assert all(created for _, created in results)
    assert len({idea.id for idea, _ in results}) == 50
    assert len(store.pending_ideas()) == 50
    assert audit_actions(audit).count("idea.captured") == 50
    assert audit.verify().events == 50


def test_fifty_concurrent_duplicate_captures(store: Store, audit: AuditLog) -> None:
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda _: store.capture(draft(delivery_id="SAME")), range(50)))
    assert sum(created for _, created in results) == 1
    assert len({idea.id for idea, _ in results}) == 1
    assert audit_actions(audit) == ["idea.captured"]
    report = audit.verify()
    assert report.events == 1 and report.unsealed == 0


def test_illegal_transition_raises_and_changes_nothing(store: Store, audit: AuditLog) -> None:
    idea, _ = store.capture(draft())
    store.move_idea(idea.id, IdeaState.DENIED, actor="cli:alice", reason="out of scope")
    with pytest.raises(IllegalTransition, match="is denied; it cannot become promoted"):
        store.move_idea(idea.id, IdeaState.PROMOTED, actor="cli:bob")
    got = store.get_idea(idea.id)
    assert got.state is IdeaState.DENIED and got.reason == "out of scope"
    assert audit_actions(audit) == ["idea.captured", "idea.denied"]


def test_pending_listing_tracks_state(store: Store, clock: FakeClock) -> None:
    ideas = []
    for _ in range(3):
        ideas.append(store.capture(draft())[0])
        clock.advance(1)
    store.move_idea(ideas[1].id, IdeaState.WITHDRAWN, actor="slack:U0REQUEST1")
    assert [i.id for i in store.pending_ideas()] == [ideas[0].id, ideas[2].id]
    assert {i.id for i in store.recent_ideas()} == {i.id for i in ideas}


def test_unknown_and_malformed_ids(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get_idea("I-000000000000")
    with pytest.raises(InvalidInput, match="not an idea id"):
        store.get_idea("I-../../etc")


def _batch_with_every_case(store: Store) -> tuple[list[IdeaDraft], str]:
    """A batch holding a new idea, a refused draft, a retry of the first within the batch, another
    new idea and a retry of a delivery captured before it: (drafts, the earlier idea's id)."""
    earlier, _ = store.capture(draft(delivery_id="Ev-earlier"))
    drafts = [draft(delivery_id="Ev-a"), draft(delivery_id="Ev-empty", text="  "),
              draft(delivery_id="Ev-a", text="the same delivery again"), draft(delivery_id="Ev-b"),
              draft(delivery_id="Ev-earlier", text="a retry of an old delivery")]
    return drafts, earlier.id


def _check_batch(results: list[Any], earlier: str, audit: AuditLog) -> None:
    (a, a_new), refused, (a_again, a_again_new), (b, b_new), (old, old_new) = results
    assert isinstance(refused, InvalidInput)
    assert a_new and b_new and not a_again_new and not old_new
    assert a_again.id == a.id and a_again.text == a.text and old.id == earlier and a.id != b.id
    captured = [e["subject"] for e in audit.export() if e["action"] == "idea.captured"]
    assert sorted(captured) == sorted([earlier, a.id, b.id]), "one audit event per new idea, none for retries"
    assert audit.verify().anomalies == ()


def test_capture_many_stores_a_batch_in_one_call_each_capture_on_its_own(store: Store, audit: AuditLog) -> None:
    drafts, earlier = _batch_with_every_case(store)
    _check_batch(store.capture_many(drafts), earlier, audit)


async def test_the_capture_queue_batches_concurrent_captures_alike(
        store: Store, audit: AuditLog, settings: Settings) -> None:
    assert settings.redis_url is not None
    drafts, earlier = _batch_with_every_case(store)
    queue = CaptureQueue(store, settings.redis_url.get_secret_value(), ttl_s=3600, writers=1)
    await queue.start()
    try:
        results = await asyncio.gather(*(queue.capture(d) for d in drafts), return_exceptions=True)
    finally:
        await queue.stop()
    audit.seal_pending()
    _check_batch(list(results), earlier, audit)
