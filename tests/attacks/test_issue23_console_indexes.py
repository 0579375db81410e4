"""Issue 23, the console's listing indexes, as an attacker who can write Redis meets them.

The indexes are written by the broker only (in the record's MULTI, or in the sealer's fenced
script); a worker's Redis user cannot touch them at all. Someone holding the whole keyspace but
no broker key can add and remove members, and edit records, but the console re-reads every
record and decides each filter on the ledger's facts, the idea's MAC or the entry's own MAC: a
record never appears under a filter it does not belong to as if it did.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from intake.console.listing import SCAN_BUDGET, Filters
from intake.console.lists import AUDIT_FILTERS, IDEA_FILTERS, TASK_FILTERS, audit_page, ideas_page, tasks_page
from intake.core.models import Task, TaskState
from intake.core.redis_conn import make_client
from intake.core.settings import Settings
from intake.protocol.keyspace import Keys, index_member
from intake.runtime import Broker, open_broker
from tests.attacks.test_issue19_workers import users  # noqa: F401
from tests.conftest import FakeClock
from tests.console_history import History, build


@pytest.fixture
def broker(settings: Settings) -> Iterator[Broker]:
    with open_broker(settings) as b:
        yield b


@pytest.fixture
def history(broker: Broker, clock: FakeClock) -> History:
    return build(broker, clock, newer=60)


def test_a_worker_user_cannot_touch_an_index(users: dict[str, str]) -> None:  # noqa: F811
    """A named worker's narrowed Redis user (Redis 7 selectors, and the embedded 6.2's flat
    rules) can neither read, add to nor remove from any listing index, nor the backfill mark."""
    broker, mallory = make_client(users["broker"]), make_client(users["mallory"])
    try:
        keys = Keys("intake")
        targets = [keys.index("idea", "all"), keys.index("task", "state", "succeeded"),
                   keys.index("audit", "actor", "approver:alice"), keys.index("idea", "requester", "cli:mallory")]
        for key in targets:
            broker.zadd(key, {index_member(1.0, "T-000000000001"): 0})
        for key in [*targets, keys.index_backfill]:
            with pytest.raises(redis.exceptions.NoPermissionError):
                mallory.zadd(key, {index_member(2e9, "T-00000000000f"): 0})
            with pytest.raises(redis.exceptions.NoPermissionError):
                mallory.zrem(key, index_member(1.0, "T-000000000001"))
            with pytest.raises(redis.exceptions.NoPermissionError):
                mallory.zrevrangebylex(key, "+", "-")
            with pytest.raises(redis.exceptions.NoPermissionError):
                mallory.delete(key)
        assert all(broker.zcard(k) == 1 for k in targets)
    finally:
        mallory.close()
        broker.close()


def test_a_planted_member_lists_nothing_it_does_not_belong_to(broker: Broker, history: History) -> None:
    keys, r = broker.store.keys, broker.client
    # The revoked web task, planted under "succeeded", "acme/payments" and approver carol.
    web = broker.store.get_task(history.web_task)
    member = index_member(web.created_at, web.id)
    for facet, value in (("state", "succeeded"), ("repo", "acme/payments"), ("approver", "carol"),
                         ("tier", "privileged"), ("requester", "cli:frank")):
        r.zadd(keys.index("task", facet, value), {member: 0})
    f = Filters.parse
    assert tasks_page(broker, f({"state": "succeeded"}, TASK_FILTERS)).items == []
    assert [t.id for t in tasks_page(broker, f({"repo": "acme/payments"}, TASK_FILTERS)).items] == [history.pay_task]
    assert [t.id for t in tasks_page(broker, f({"approver": "carol"}, TASK_FILTERS)).items] == [history.pay_task]
    assert [t.id for t in tasks_page(broker, f({"tier": "privileged"}, TASK_FILTERS)).items] == [history.pay_task]
    assert [t.id for t in tasks_page(broker, f({"requester": "cli:frank"}, TASK_FILTERS)).items] == [history.pay_task]
    # An idea planted under another requester and channel.
    r.zadd(keys.index("idea", "requester", "email:zed@example.com"), {index_member(0, history.newer[0]): 0})
    assert [i.id for i in ideas_page(broker, f({"requester": "email:zed@example.com"}, IDEA_FILTERS)).items] \
        == [history.old_idea]


def test_an_edited_record_is_matched_on_sealed_history_and_shown_as_disagreeing(broker: Broker,
                                                                                history: History) -> None:
    keys, r = broker.store.keys, broker.client
    web = broker.store.get_task(history.web_task)
    forged = web.model_copy(update={"state": TaskState.SUCCEEDED, "risk_tier": "privileged"})
    r.set(keys.task(web.id), Task.model_validate(forged.model_dump()).model_dump_json())
    r.zadd(keys.index("task", "state", "succeeded"), {index_member(web.created_at, web.id): 0})
    f = Filters.parse
    assert tasks_page(broker, f({"state": "succeeded"}, TASK_FILTERS)).items == []
    rows = tasks_page(broker, f({"state": "revoked"}, TASK_FILTERS)).rows
    assert [row.item.id for row in rows] == [web.id]
    assert "sealed history says revoked" in rows[0].doubt
    # An idea whose requester was edited fails its MAC: it matches no requester filter.
    old = broker.store.get_idea(history.old_idea)
    r.set(keys.idea(old.id), old.model_copy(update={"requester": "cli:frank"}).model_dump_json())
    r.zadd(keys.index("idea", "requester", "cli:frank"), {index_member(old.created_at, old.id): 0})
    assert history.old_idea not in [i.id for i in ideas_page(broker, f({"requester": "cli:frank", "state": "any"},
                                                                       IDEA_FILTERS)).items]
    everything = ideas_page(broker, f({"state": "any", "q": history.old_idea}, IDEA_FILTERS)).rows
    assert everything[0].doubt.startswith("this record fails its MAC")


def test_a_forged_audit_entry_is_never_listed_under_a_filter(broker: Broker, history: History) -> None:
    r, keys = broker.client, broker.store.keys
    sid = r.xadd(broker.audit.stream, {"e": '{"actor":"approver:alice","action":"task.succeeded","subject":"'
                                            + history.web_task + '","data":{}}', "m": "0" * 64})
    broker.audit.seal_pending()  # sealed as rejected:bad_mac: never indexed by the sealer
    member = index_member(int(sid.split("-")[0]) / 1000, sid)
    r.zadd(keys.index("audit", "actor", "approver:alice"), {member: 0})
    r.zadd(keys.index("audit", "subject", history.web_task), {member: 0})
    f = Filters.parse
    listed = audit_page(broker, f({"subject": history.web_task}, AUDIT_FILTERS)).items
    assert sid not in [e["id"] for e in listed] and listed
    alice = audit_page(broker, f({"actor": "approver:alice"}, AUDIT_FILTERS)).items
    assert sid not in [e["id"] for e in alice]
    # The unfiltered log shows it, marked as not genuine.
    rows = audit_page(broker, f({}, AUDIT_FILTERS)).rows
    forged = [row for row in rows if row.item["id"] == sid]
    assert forged and forged[0].doubt == "not genuine: rejected:bad_mac" and not forged[0].item["verified"]


def test_a_flood_of_planted_members_costs_a_bounded_scan(broker: Broker, history: History) -> None:
    key = broker.store.keys.index("idea", "requester", "email:zed@example.com")
    broker.client.zadd(key, {index_member(2e9 + n, f"I-{n:012x}"): 0 for n in range(3 * SCAN_BUDGET)})
    f = Filters.parse({"requester": "email:zed@example.com", "state": "any", "q": "zebra"}, IDEA_FILTERS)
    page = ideas_page(broker, f)
    assert page.items == [] and page.looked == SCAN_BUDGET and page.cut is not None


def test_records_from_before_the_indexes_are_indexed_by_a_bounded_idempotent_backfill(
        broker: Broker, history: History) -> None:
    r, keys = broker.client, broker.store.keys
    r.delete(*r.keys(f"{keys.p}:ix:*"))
    f = Filters.parse({"requester": "email:zed@example.com", "state": "any"}, IDEA_FILTERS)
    assert ideas_page(broker, f).items == []
    calls = 0
    while broker.store.backfill_indexes(batch=25) is not None:
        calls += 1
        assert calls < 100
    assert calls >= 3  # in bounded batches
    assert [i.id for i in ideas_page(broker, f).items] == [history.old_idea]
    assert [t.id for t in tasks_page(broker, Filters.parse({"approver": "bob"}, TASK_FILTERS)).items] == [history.web_task]
    audit = audit_page(broker, Filters.parse({"subject": history.web_task}, AUDIT_FILTERS)).items
    assert "task.revoked" in [e["action"] for e in audit]
    before = {k: r.zcard(k) for k in r.keys(f"{keys.p}:ix:*") if r.type(k) == "zset"}
    r.delete(keys.index_backfill)
    while broker.store.backfill_indexes(batch=25) is not None:
        pass
    assert {k: r.zcard(k) for k in r.keys(f"{keys.p}:ix:*") if r.type(k) == "zset"} == before  # idempotent
