"""Store: idempotent capture, concurrency, refusals, transitions, listing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from intake.audit.log import AuditLog
from intake.core.errors import IllegalTransition, InvalidInput, NotFound
from intake.core.models import Channel, IdeaState
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
