"""The console's lists over all history (issue 23): every filter of ideas, tasks and audit finds
records behind more than 1,000 newer ones, pages by keyset, and never believes an index."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from intake.console.listing import Filters
from intake.console.lists import (
    AUDIT_FILTERS,
    IDEA_FILTERS,
    TASK_FILTERS,
    audit_page,
    ideas_page,
    tasks_page,
)
from intake.core.settings import Settings
from intake.runtime import Broker, open_broker
from tests.conftest import FakeClock
from tests.console_history import History, build
from tests.factories import draft


@pytest.fixture
def broker(settings: Settings) -> Iterator[Broker]:
    with open_broker(settings) as b:
        yield b


@pytest.fixture
def history(broker: Broker, clock: FakeClock) -> History:
    return build(broker, clock)


def ideas(broker: Broker, **q: str) -> list[str]:
    return [i.id for i in ideas_page(broker, Filters.parse(q, IDEA_FILTERS)).items]


def tasks(broker: Broker, **q: str) -> list[str]:
    return [t.id for t in tasks_page(broker, Filters.parse(q, TASK_FILTERS)).items]


def test_idea_filters_reach_past_a_thousand_newer_ideas(broker: Broker, history: History) -> None:
    h = history
    assert ideas(broker, requester="email:zed@example.com") == [h.old_idea]
    assert ideas(broker, channel="email") == [h.old_idea]
    assert ideas(broker, state="promoted", approver="alice") == [h.old_idea]
    assert ideas(broker, approver="carol", tier="privileged") == [broker.store.get_task(h.pay_task).idea_id]
    assert ideas(broker, repo="acme/web") == [broker.store.get_task(h.web_task).idea_id, h.old_idea]
    assert ideas(broker, q=h.old_idea) == [h.old_idea]  # a whole id: read directly
    import datetime as dt
    day = dt.datetime.fromtimestamp(h.start, dt.UTC).strftime("%Y-%m-%d")
    assert ideas(broker, state="any", until=day) == [h.old_idea]
    page = ideas_page(broker, Filters.parse({"state": "any"}, IDEA_FILTERS))
    assert page.exact and page.total == len(h.newer) + 3 and len(page.items) == 25


def test_free_text_search_is_a_bounded_scan_that_says_where_it_stopped(broker: Broker, history: History) -> None:
    first = ideas_page(broker, Filters.parse({"state": "any", "q": "zebra-needle"}, IDEA_FILTERS))
    assert first.items == [] and first.cut is not None and first.looked == 1000
    more = ideas_page(broker, Filters.parse({"state": "any", "q": "zebra-needle", "after": first.cut}, IDEA_FILTERS))
    assert [i.id for i in more.items] == [history.old_idea] and more.cut is None


def test_keyset_pages_walk_every_record_once(broker: Broker, history: History) -> None:
    seen: list[str] = []
    f = {"requester": "slack:U0NEWER003"}
    page = ideas_page(broker, Filters.parse(f, IDEA_FILTERS))
    while True:
        seen += [i.id for i in page.items]
        if page.older is None:
            break
        page = ideas_page(broker, Filters.parse({**f, "after": page.older}, IDEA_FILTERS))
    expected = {i for n, i in enumerate(history.newer) if n % 7 == 3}
    assert len(seen) == len(expected) and set(seen) == expected
    assert page.newer is not None  # from the oldest page, one page newer: the 25 just before it
    back = ideas_page(broker, Filters.parse({**f, "before": page.newer}, IDEA_FILTERS))
    assert [i.id for i in back.items] == seen[-len(page.items) - 25:-len(page.items)]


def test_task_filters_use_the_ledger(broker: Broker, history: History) -> None:
    h = history
    assert tasks(broker, state="revoked") == [h.web_task]
    assert tasks(broker, state="awaiting_approvals") == [h.pay_task]
    assert tasks(broker, repo="acme/payments") == [h.pay_task]
    assert tasks(broker, tier="privileged") == [h.pay_task]
    assert tasks(broker, requester="cli:erin") == [h.web_task]
    assert tasks(broker, approver="alice") == [h.old_task]
    assert tasks(broker, approver="bob", repo="acme/web") == [h.web_task]
    assert set(tasks(broker)) == {h.old_task, h.web_task, h.pay_task}


def test_audit_filters(broker: Broker, history: History) -> None:
    h = history
    page = audit_page(broker, Filters.parse({"subject": h.web_task}, AUDIT_FILTERS))
    actions = [e["action"] for e in page.items]
    assert "task.revoked" in actions and "task.created" in actions and "idea.promoted" in actions
    assert all(e["verified"] for e in page.items)
    bob = audit_page(broker, Filters.parse({"actor": "approver:bob", "action": "task"}, AUDIT_FILTERS))
    assert {e["action"] for e in bob.items} >= {"task.created", "task.revoked"}
    assert all(e["actor"] == "approver:bob" and e["action"].startswith("task.") for e in bob.items)
    by_id = audit_page(broker, Filters.parse({"q": h.web_task}, AUDIT_FILTERS))  # read by the subject index
    assert by_id.index == "subject" and {e["id"] for e in by_id.items} == {e["id"] for e in page.items}
    exact = audit_page(broker, Filters.parse({"action": "task.revoked"}, AUDIT_FILTERS))
    assert [e["subject"] for e in exact.items] == [h.web_task]


def test_the_audit_list_says_what_it_covers_and_pages_into_the_archive(settings: Settings) -> None:
    from intake.console.lists import archive_page, audit_coverage

    hot = settings.model_copy(update={"audit_hot": 3600.0})
    with open_broker(hot) as broker:
        import intake.audit.archive as archive_mod

        saved, archive_mod.SEGMENT_MAX = archive_mod.SEGMENT_MAX, 40
        try:
            for n in range(120):
                broker.store.capture(draft(text=f"archived request {n}"))
            broker.audit.seal_pending()
            assert broker.ledger.follow().snapshot_if_due(every=1)
            for n in range(5):
                broker.store.capture(draft(text=f"hot request {n}"))
            broker.audit.seal_pending()
            assert broker.audit.lease.acquire() is not None
            import time

            moved = broker.archive_due(now=time.time() + 2 * 3600)
        finally:
            archive_mod.SEGMENT_MAX = saved
        assert moved > 100
        cover = audit_coverage(broker)
        assert cover.archived_through == moved and cover.first_seq == moved + 1 and cover.segments >= 3
        # The indexes left with the entries: a filter lists the hot window only.
        captured = audit_page(broker, Filters.parse({"action": "idea.captured"}, AUDIT_FILTERS))
        assert [e["data"] for e in captured.items] and all(e["seq"] > moved for e in captured.items)
        in_redis = [sid for sid, f in broker.client.xrange(broker.audit.stream) if '"idea.captured"' in f["e"]]
        assert sorted(e["id"] for e in captured.items) == sorted(in_redis) and len(in_redis) >= 5
        # The archive, a page at a time, newest first, back to #1.
        seen: list[int] = []
        page = archive_page(broker, None)
        while page is not None:
            assert page.error is None
            seen += [row.item["seq"] for row in page.rows]
            assert all(row.item["verified"] for row in page.rows)
            page = archive_page(broker, page.older) if page.older else None
        assert seen == list(range(moved, 0, -1))


def test_filters_are_validated_whole_and_a_cleared_default_stays_cleared() -> None:
    f = Filters.parse({"state": "any", "since": "2026-02-30", "until": "2026-01-31", "after": "1|I-x",
                       "requester": "a b", "q": "x\x00"}, IDEA_FILTERS, {"state": "pending"})
    assert f.values == {"until": "2026-01-31"} and f.cleared == {"state"}
    assert f.query(after="0000000000000001|I-0123456789ab").startswith("state=any&until=2026-01-31&after=")
    assert f.until_ts() == 1769817600.0 + 86400  # the end of the 31st (2026-01-31 00:00 UTC + a day), exclusive
    assert Filters.parse({"since": "2026-01-31"}, IDEA_FILTERS).since_ts() == 1769817600.0
    assert Filters.parse({"since": "7d"}, IDEA_FILTERS).since_ts(now=1e9) == 1e9 - 7 * 86400
