"""The embedded redis-server: AOF persistence across restarts, one server per data dir."""

from __future__ import annotations

import base64
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from intake.core.errors import RedisUnavailable
from intake.core.redis_conn import EmbeddedRedis, make_client


def test_data_survives_stop_and_restart(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    url = server.acquire()
    make_client(url).set("intake:k", "kept")
    conf = (tmp_path / "redis" / "redis.conf").read_text()
    assert "appendonly yes" in conf and "appendfsync always" in conf and "save \"\"" in conf
    assert "maxmemory-policy noeviction" in conf and "port 0" in conf
    server.release()
    assert not server.sock.exists()  # the last user out shut it down

    again = EmbeddedRedis(tmp_path)
    client = make_client(again.acquire())
    try:
        assert client.get("intake:k") == "kept"
        assert client.info("persistence")["aof_enabled"] == 1
    finally:
        client.close()
        again.release()


def test_users_share_one_server_and_last_one_stops_it(tmp_path: Path) -> None:
    first, second = EmbeddedRedis(tmp_path), EmbeddedRedis(tmp_path)
    first.acquire()
    pid = (tmp_path / "redis" / "redis.pid").read_text()
    second.acquire()
    assert (tmp_path / "redis" / "redis.pid").read_text() == pid  # joined, not a second server
    first.release()
    assert make_client(second.url).ping()  # still up for the remaining user
    second.release()
    assert not second.sock.exists()


def test_an_unused_server_left_behind_is_stopped(tmp_path: Path) -> None:
    holder = EmbeddedRedis(tmp_path)
    holder.acquire()
    assert not EmbeddedRedis(tmp_path).stop_if_unused()  # in use: left alone
    assert holder._users is not None
    holder._users.close()  # the hold is lost (a process interrupted mid-shutdown)
    holder._users = None
    assert EmbeddedRedis(tmp_path).stop_if_unused()
    assert not holder.sock.exists()


def test_the_embedded_redis_is_aof_only(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "d")
    client = make_client(server.acquire())
    try:
        conf = (server.dir / "redis.conf").read_text().splitlines()
        assert 'save ""' in conf and "appendonly yes" in conf  # no RDB save point can block a shutdown
        info = client.info("persistence")
        assert info["aof_enabled"] == 1 and info["rdb_bgsave_in_progress"] == 0
    finally:
        client.close()
        server.release()


def test_start_up_disk_errors_name_the_path(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "redis").write_text("a file where the directory should be")
    with pytest.raises(RedisUnavailable, match=re.escape(str(blocked / "redis"))):
        EmbeddedRedis(blocked).acquire(timeout=5)
    broken = tmp_path / "broken"
    (broken / "redis" / "appendonly.aof").mkdir(parents=True)  # the AOF cannot be opened
    (broken / "redis" / "appendonlydir").write_text("")  # (Redis 7 names its AOF folder so)
    with pytest.raises(RedisUnavailable, match=re.escape(str(broken / "redis"))):
        EmbeddedRedis(broken).acquire(timeout=3)


def test_the_last_user_leaving_never_stops_a_server_another_process_waits_for(tmp_path: Path) -> None:
    """A process that is still waiting to join (here: for the start lock) already counts as a
    user, so the last user leaving meanwhile leaves the server running for it."""
    import fcntl
    import threading
    import time

    first = EmbeddedRedis(tmp_path)
    first.acquire()
    pid = (tmp_path / "redis" / "redis.pid").read_text()
    joined: list[str] = []
    with open(tmp_path / "redis" / "start.lock", "a") as start:
        fcntl.flock(start, fcntl.LOCK_EX)  # hold the joiner at the start lock
        joiner = EmbeddedRedis(tmp_path)
        thread = threading.Thread(target=lambda: joined.append(joiner.acquire(timeout=30)))
        thread.start()
        deadline = time.monotonic() + 10
        inode = (tmp_path / "redis" / "users.lock").stat().st_ino

        def shared_holds() -> int:
            return sum(1 for line in Path("/proc/locks").read_text().splitlines()
                       if "FLOCK" in line and "READ" in line and line.split()[5].endswith(f":{inode}"))

        while shared_holds() < 2:  # until the joiner holds its shared users lock too
            assert time.monotonic() < deadline, "the joiner never took the users lock"
            time.sleep(0.01)
        fcntl.flock(start, fcntl.LOCK_UN)
        first.release()  # the last *joined* user leaves while the joiner waits
    thread.join(timeout=30)
    assert joined, "the joiner never joined"
    assert (tmp_path / "redis" / "redis.pid").read_text() == pid  # the same server, never stopped
    assert make_client(joiner.url).ping()
    joiner.release()
    assert not joiner.sock.exists()


def _rewrites_until(client: Any, base_above: int, deadline_s: float = 60.0) -> int:
    """Wait (the deadline is only the failure bound) until the AOF was rewritten to a base larger
    than ``base_above`` bytes and no rewrite runs; returns the new base size."""
    deadline = time.monotonic() + deadline_s
    while True:
        info = client.info("persistence")
        if int(info["aof_base_size"]) > base_above and not int(info["aof_rewrite_in_progress"]) \
                and not int(info["aof_rewrite_scheduled"]):
            return int(info["aof_base_size"])
        assert time.monotonic() < deadline, f"no AOF rewrite past {base_above} bytes: {info}"
        time.sleep(0.05)


def test_the_aof_is_rewritten_as_an_rdb_image_when_it_grows_by_a_quarter(tmp_path: Path) -> None:
    """A restart on a long history loads an RDB image, not millions of commands: the AOF is
    rewritten (RDB preamble) once it passes 64 MB, and again once it grew by a quarter (Redis's
    default waits until it doubled, leaving a command tail as long as the image)."""
    server = EmbeddedRedis(tmp_path / "d", appendfsync="no")
    client = make_client(server.acquire())
    def blob() -> str:  # 1 MiB that the RDB image cannot compress
        return base64.b64encode(os.urandom(3 << 18)).decode()

    try:
        for i in range(70):  # past auto-aof-rewrite-min-size
            client.set(f"intake:blob:{i}", blob())
        base = _rewrites_until(client, 64 << 20)
        for i in range(70, 70 + int(70 * 0.3)):  # 30 % more: over 25 %, far under 100 %
            client.set(f"intake:blob:{i}", blob())
        _rewrites_until(client, base)
    finally:
        client.close()
        server.release()
    aof = server.dir / "appendonly.aof"
    assert aof.read_bytes()[:5] == b"REDIS", "the rewritten AOF starts with an RDB image"
    again = EmbeddedRedis(tmp_path / "d")
    client = make_client(again.acquire())
    try:
        assert client.dbsize() == 70 + int(70 * 0.3)
    finally:
        client.close()
        again.release()
    assert "RDB preamble" in (server.dir / "redis.log").read_text()
