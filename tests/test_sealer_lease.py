"""The sealer lease: one sealer per Redis, fenced writes, takeover, and who may touch the lease."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from intake.audit.log import AuditLog
from intake.audit.sealer import LeaseLost
from intake.core.redis_conn import EmbeddedRedis, make_client
from intake.core.settings import Settings
from intake.protocol.keyfiles import load_secret


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def second_log(settings: Settings, client: redis.Redis) -> AuditLog:
    """Another process's view of the same log (its own lease owner id)."""
    return AuditLog(client, load_secret(settings, "audit"), settings.key_prefix,
                    checkpoint=settings.keys["audit"].parent / "audit.checkpoint")


@pytest.fixture
def two(settings: Settings, rclient: redis.Redis, audit: AuditLog) -> Iterator[tuple[AuditLog, AuditLog]]:
    other = second_log(settings, make_client(settings.redis_url.get_secret_value()))  # type: ignore[union-attr]
    yield audit, other
    audit.stop_sealer()
    other.stop_sealer()
    other.r.close()


def test_one_holder_seals_every_replicas_appends(two: tuple[AuditLog, AuditLog]) -> None:
    a, b = two
    a.start_sealer()
    wait_until(lambda: a.lease.token is not None, "the first sealer to take the lease")
    b.start_sealer()
    for i in range(20):
        (a if i % 2 else b).record("system", "test.event", f"S{i}", n=i)
    wait_until(lambda: a.verify().unsealed == 0, "every append to be sealed")
    assert b.lease.token is None  # b never held it: exactly one sealer
    assert a.r.hlen(a.seals) == a.r.xlen(a.stream) == 20
    assert a.verify().anomalies == ()


def test_a_non_holder_seal_pending_waits_for_the_holder(two: tuple[AuditLog, AuditLog]) -> None:
    a, b = two
    a.start_sealer()
    wait_until(lambda: a.lease.token is not None, "a to take the lease")
    pipe = b.r.pipeline(transaction=True)
    from intake.audit.log import event
    b.append(pipe, event("system", "test.event", "S1"))
    pipe.execute()
    assert b.seal_pending() == 0  # sealed by the holder, which b waited for
    assert b.verify().unsealed == 0 and b.lease.token is None


def test_the_lease_is_taken_over_when_its_holder_stops_renewing(two: tuple[AuditLog, AuditLog]) -> None:
    a, b = two
    a.lease.ttl_ms = b.lease.ttl_ms = 300
    assert a.lease.acquire() == 1  # a holds it and then goes silent (a crash, SIGSTOP)
    b.start_sealer(idle_s=0.05)
    wait_until(lambda: b.lease.token is not None, "b to take the expired lease")
    assert b.lease.token == 2  # a new fencing token
    a.record("system", "test.event", "after")  # a, unaware, appends; b seals it
    wait_until(lambda: b.verify().unsealed == 0, "b to seal")


def test_a_paused_old_holder_cannot_seal_when_it_wakes(two: tuple[AuditLog, AuditLog]) -> None:
    a, b = two
    a.lease.ttl_ms = 200
    assert a.lease.acquire() == 1
    wait_until(lambda: a.r.pttl(a.lease.key) == -2, "a's lease to expire while a is paused")
    assert b.lease.acquire() == 2
    pipe = a.r.pipeline(transaction=True)
    from intake.audit.log import event
    a.append(pipe, event("system", "test.event", "S1"))
    pipe.execute()
    with pytest.raises(LeaseLost):
        a._seal_held()  # a wakes up with token 1 and tries to publish
    assert a.r.hlen(a.seals) == 0 and a.r.get(a.head) is None  # nothing was written
    assert a.lease.token is None
    # Even a stale holder that re-writes the lease value cannot publish on an old token.
    a.r.set(a.lease.key, f"1 {a.lease.owner}")
    a.lease.token = 1
    with pytest.raises(LeaseLost):
        a._seal_held()
    assert a.r.hlen(a.seals) == 0
    a.r.set(b.lease.key, b.lease.value)
    assert b.seal_pending() == 1 and b.verify().anomalies == ()


def test_a_cli_sealer_gives_the_lease_back(audit: AuditLog) -> None:
    audit.record("system", "test.event", "S1")  # no sealer thread: sealed at once
    assert audit.verify().unsealed == 0
    assert audit.r.get(audit.lease.key) is None  # free for a serve to take


# -- attackers: the worker user and an unauthenticated client ----------------------------------
@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "d")
    server.acquire()
    yield server
    server.release()


def test_the_worker_user_and_no_password_cannot_take_or_extend_the_lease(embedded: EmbeddedRedis,
                                                                          tmp_path: Path) -> None:
    broker = make_client(embedded.url_for("broker"))
    worker = make_client(embedded.url_for("worker"))
    anonymous = make_client(f"unix://{embedded.sock}")  # no user, no password
    from intake.audit.sealer import SealerLease

    lease = SealerLease(broker, "intake", ttl_ms=600_000)
    assert lease.acquire() == 1
    held = broker.get(lease.key)
    for client, refused in ((worker, redis.exceptions.NoPermissionError),
                            (anonymous, redis.exceptions.AuthenticationError)):
        for command in (("SET", lease.key, "9 mallory"), ("PEXPIRE", lease.key, "999999"), ("DEL", lease.key),
                        ("INCR", lease.fence), ("GET", lease.key),
                        ("EVAL", "return redis.call('SET', KEYS[1], 'x')", "1", lease.key)):
            with pytest.raises((refused, redis.exceptions.ResponseError)):
                client.execute_command(*command)
        with pytest.raises((refused, redis.exceptions.ResponseError)):
            SealerLease(client, "intake").acquire()
    assert broker.get(lease.key) == held and broker.get(lease.fence) == "1"
    assert 0 < broker.pttl(lease.key) <= lease.ttl_ms
    for client in (broker, worker, anonymous):
        client.close()
