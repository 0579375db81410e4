"""A broker's start-up and its idle sweeps cost the same on any history: what they read from
Redis grows with the entries sealed since the newest ledger snapshot, never with the log.

Counted, not timed: each part runs against a Redis server of its own, and Redis's own counters
(``INFO stats``: bytes sent to clients, commands processed) say how much it was asked for. A log
six times longer behind its snapshot must cost about the same; a start that walked the whole log,
loaded an index of every idea or replayed from the beginning would cost about six times as much.
bench/ledger_scale.py measures the same starts in seconds on 10k to 1M entries."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from bench.ledger_scale import build_log
from intake.app import sweep
from intake.core.redis_conn import make_client, redis_server_binary
from intake.core.settings import Settings, load_settings
from intake.protocol.keyfiles import generate_keys
from intake.runtime import EXAMPLE_POLICY, open_broker
from tests.api_harness import running_broker

SMALL, LARGE = 2_000, 12_000  # sealed entries before the snapshot
SINCE = 300  # sealed after it, the same in both


@pytest.fixture
def own_redis() -> Iterator[str]:
    """A redis-server nobody else talks to, so its counters are this test's alone."""
    tmp = Path(tempfile.mkdtemp(prefix="it-sc-"))
    sock = tmp / "r.sock"
    proc = subprocess.Popen([redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm",
                             "700", "--save", "", "--appendonly", "no", "--dir", str(tmp),
                             "--maxmemory-policy", "noeviction"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"unix://{sock}"
    deadline = time.monotonic() + 10
    while True:
        try:
            if make_client(url).ping():
                break
        except redis.RedisError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.01)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class Cost:
    sent: int  # bytes Redis sent to its clients
    commands: int


def counters(url: str) -> Cost:
    client = make_client(url)
    try:
        stats = client.info("stats")
        return Cost(int(stats["total_net_output_bytes"]), int(stats["total_commands_processed"]))
    finally:
        client.close()


def cost_of(url: str, action: object) -> Cost:
    before = counters(url)
    action()  # type: ignore[operator]
    after = counters(url)
    return Cost(after.sent - before.sent, after.commands - before.commands)


def history(settings: Settings, before_snapshot: int) -> None:
    """``before_snapshot`` more captures, a ledger snapshot at the head, then :data:`SINCE` more."""
    build_log(settings, before_snapshot, snapshots=False)
    with open_broker(settings) as broker:
        broker.ledger.follow()
        assert broker.ledger.snapshot_if_due(every=1)
    build_log(settings, SINCE, snapshots=False)
    with open_broker(settings) as broker:
        # The console's one-off index backfill (a bounded batch a sweep until it is done, then
        # one GET) is not a per-start cost: finish it so what is compared is the start itself.
        while broker.store.backfill_indexes() is not None:
            pass


def start_and_stop(settings: Settings) -> None:
    """The whole app, as `intake serve` runs it, until it is ready (then stopped)."""
    with running_broker(settings):
        pass


def three_sweeps(settings: Settings, url: str) -> Cost:
    with open_broker(settings) as broker:
        broker.ledger.start()
        return cost_of(url, lambda: [sweep(broker) for _ in range(3)])


def within(large: Cost, small: Cost) -> bool:
    """``large`` costs about what ``small`` does (a walk of the log would cost ~6x)."""
    return large.sent < 1.5 * small.sent + 64 * 1024 and large.commands < 1.5 * small.commands + 200


def test_a_start_and_its_sweeps_read_what_follows_the_snapshot_not_the_whole_log(short_tmp: Path,
                                                                                  own_redis: str) -> None:
    settings = load_settings(_env_file=None, data_dir=short_tmp / "d", redis_url=own_redis, policy=EXAMPLE_POLICY,
                             sweep_interval=3600)
    generate_keys(settings)
    history(settings, SMALL)
    small_start = cost_of(own_redis, lambda: start_and_stop(settings))
    small_sweeps = three_sweeps(settings, own_redis)

    history(settings, LARGE - SMALL - SINCE)  # the log is now six times longer, as far behind its snapshot
    large_start = cost_of(own_redis, lambda: start_and_stop(settings))
    large_sweeps = three_sweeps(settings, own_redis)

    assert within(large_start, small_start), (small_start, large_start)
    assert within(large_sweeps, small_sweeps), (small_sweeps, large_sweeps)
    # And the measure can see a walk: replaying the log without its snapshot costs far more.
    with open_broker(settings) as broker:
        replay = cost_of(own_redis, lambda: broker.ledger.audit.follow(None, lambda _entry: None, lambda _a: None))
    assert not within(replay, small_start), (small_start, replay)
