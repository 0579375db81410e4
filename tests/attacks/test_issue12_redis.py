"""Issue 12 attacks through Redis on the replica machinery: the sealer lease and its fence, the
outbox's schedule and consumer group, and the Slack card reservations.

The worker's ACL user (the likeliest to be stolen: it lives on the agent hosts) must reach none of
them. The broker's own user can (Redis is storage, not authority): what it must not get is a
seal published under a stale fence, or an outbox event silently never delivered by rewriting the
schedule.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from intake.audit.log import AuditLog
from intake.audit.sealer import SealerLease
from intake.core.redis_conn import EmbeddedRedis, make_client
from intake.storage.outbox import Outbox

NoPerm = redis.exceptions.NoPermissionError


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "d")
    server.acquire()
    yield server
    server.release()


def test_worker_user_cannot_take_bump_or_drop_the_sealer_lease_outbox_or_cards(embedded: EmbeddedRedis) -> None:
    worker = make_client(embedded.url_for("worker"))  # type: ignore[arg-type]
    broker = make_client(embedded.url_for("broker"))  # type: ignore[arg-type]
    try:
        lease = SealerLease(broker, "intake")
        token = lease.acquire()
        assert token is not None
        broker.xadd("intake:audit", {"event": "genuine"})
        broker.xgroup_create("intake:audit", "slack", id="0")
        assert broker.xreadgroup("slack", "c1", {"intake:audit": ">"})
        broker.zadd("intake:outbox:slack:due", {"1-0": 1})
        broker.set("intake:card:I-0123456789ab:lock", "tok")
        broker.set("intake:card:I-0123456789ab:inflight", "1")
        attempts = [
            lambda: worker.set("intake:audit:sealer", "99 attacker", px=60000),  # take it
            lambda: worker.pexpire("intake:audit:sealer", 600000),  # hold it forever
            lambda: worker.delete("intake:audit:sealer"),  # steal it
            lambda: worker.incr("intake:audit:fence"),  # make the holder's token stale
            lambda: worker.set("intake:audit:fence", "0"),  # or reuse an old token
            lambda: worker.get("intake:audit:sealer"),
            lambda: SealerLease(worker, "intake").acquire(),  # the script itself
            lambda: worker.zrem("intake:outbox:slack:due", "1-0"),  # orphan an event
            lambda: worker.zadd("intake:outbox:slack:due", {"1-0": 2**40}),  # postpone it forever
            lambda: worker.hset("intake:outbox:slack:tries", "1-0", '{"n": 999}'),
            lambda: worker.xack("intake:audit", "slack", "1-0"),  # drop it
            lambda: worker.xclaim("intake:audit", "slack", "evil", 0, ["1-0"]),
            lambda: worker.xgroup_destroy("intake:audit", "slack"),
            lambda: worker.xgroup_setid("intake:audit", "slack", "$"),  # skip everything unread
            lambda: worker.delete("intake:card:I-0123456789ab:lock"),  # a second post
            lambda: worker.delete("intake:card:I-0123456789ab:inflight"),  # post without looking
            lambda: worker.set("intake:card:I-0123456789ab:lock", "evil"),
        ]
        for i, attempt in enumerate(attempts):
            with pytest.raises(NoPerm):
                attempt()
                pytest.fail(f"attempt {i} was allowed")
        # Nothing moved.
        assert lease.holder() == lease.value and lease.acquire() == token
        assert int(broker.get("intake:audit:fence")) == token
        assert broker.xpending("intake:audit", "slack")["pending"] == 1
        assert broker.zscore("intake:outbox:slack:due", "1-0") == 1
        assert broker.get("intake:card:I-0123456789ab:lock") == "tok"
    finally:
        worker.close()
        broker.close()


@pytest.mark.parametrize("tamper", ["stale value written back", "fence bumped"])
def test_a_lease_whose_token_is_not_the_fence_is_never_renewed(rclient: redis.Redis, audit: AuditLog,
                                                                  tamper: str) -> None:
    """A holder paused past its TTL (SIGSTOP) comes back after someone else took the lease and
    bumped the fence. An attacker with the broker's user writes the paused holder's old lease
    value back (or just bumps the fence under a live holder) so that its renewal would
    "succeed": it must not publish a seal with the stale token, and sealing must fail loudly
    (AuditBroken) rather than spin on the refusal forever."""
    from intake.core.errors import AuditBroken

    audit.record("system", "idea.created", "I-0123456789ab")
    ours = audit.lease
    assert ours.acquire() is not None
    stale_value, stale_token = ours.value, ours.token
    if tamper == "fence bumped":
        rclient.incr("intake:audit:fence")
    else:
        rclient.delete("intake:audit:sealer")  # the lease "expired" ...
        thief = SealerLease(rclient, "intake")
        assert thief.acquire() == (stale_token or 0) + 1  # ... and was taken: the fence moved on
        rclient.set("intake:audit:sealer", stale_value, px=60000)  # the old value back
    assert ours.acquire() is None  # the stale token is not renewed
    rclient.xadd("intake:audit", {"a": "idea.created"})  # something waiting to be sealed
    head = rclient.get("intake:audit:head")
    outcome: list[BaseException | int] = []

    def seal() -> None:
        try:
            outcome.append(audit.seal_pending(wait_s=0.5))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=seal, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        pytest.fail("seal_pending spins on the refused stale token")
    assert len(outcome) == 1 and isinstance(outcome[0], AuditBroken), outcome
    assert rclient.get("intake:audit:head") == head  # nothing published under the stale token


def test_removing_an_event_from_the_outbox_schedule_only_delays_it(audit: AuditLog) -> None:
    """The schedule (a sorted set) is a cache of the consumer group's pending list: an attacker
    who ZREMs a pending event's entry must not make the outbox forget it while its consumer is
    alive and well."""
    outbox = Outbox(audit, "attack", lease_s=0.2, retry_ms=50)
    outbox.ensure_group()
    audit.record("system", "idea.created", "I-0123456789ab")
    first = [d for d in outbox.fetch(block_ms=0) if d.event.subject == "I-0123456789ab"]
    assert len(first) == 1
    outbox.failed(first[0], "slack_down")  # a retry is scheduled ...
    audit.r.zrem(outbox.due_key, first[0].id)  # ... and erased by the attacker
    deadline = time.monotonic() + 10
    while True:
        again = [d for d in outbox.fetch(block_ms=50) if d.id == first[0].id]
        if again:
            break
        if time.monotonic() > deadline:
            pytest.fail("the event was never delivered again: dropped silently")
        time.sleep(0.05)
    outbox.ack(again[0])
    assert audit.r.xpending(audit.stream, "attack")["pending"] == 0
