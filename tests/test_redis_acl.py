"""Redis ACL users per role, as an attacker holding a role's password meets them.

Against the embedded redis-server 6.2 (flat rules, the default user off), the session's test
server (the ``intake redis acl --no-selectors`` lines applied to it, and a real worker run under
the worker user with ``ACL LOG`` read afterwards) and a Redis 7 server when one is installed
(the selector rules ``intake redis acl`` prints for a managed Redis).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from intake.core.errors import ConfigError
from intake.core.models import TaskState
from intake.core.redis_acl import ROLES
from intake.core.redis_conn import EmbeddedRedis, make_client, redis_server_binary
from intake.core.settings import load_settings
from tests.conftest import REPO_ROOT
from tests.workers.harness import Rig, rig  # noqa: F401

TASK, NONCE, FREEZE, AUDIT = "intake:task:T-0001", "intake:nonce:0123abcd", "intake:freeze", "intake:audit"
LEASE, REPORTS = "intake:lease:w1:T-0001", "intake:reports:w1"
NoPerm = redis.exceptions.NoPermissionError
NO_RETRY = Retry(NoBackoff(), 0)  # redis-py retries refused logins (a ConnectionError) by default


def user_url(sock: str, user: str, password: str) -> str:
    return f"unix://{quote(user, safe='')}:{quote(password, safe='')}@{sock}"


def acl_lines(*args: str) -> list[list[str]]:
    """``intake redis acl ARGS`` as a real subprocess: its stdout lines, split like redis-cli."""
    out = subprocess.run([sys.executable, "-m", "intake", "redis", "acl", *args], capture_output=True,
                         text=True, timeout=60, check=True, cwd=REPO_ROOT,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT)})
    assert "CHANGE-ME" in out.stderr and "default off" in out.stderr  # the instructions
    return [shlex.split(line) for line in out.stdout.splitlines()]


def apply_acl(admin: redis.Redis, lines: list[list[str]]) -> dict[str, str]:
    """Run printed ACL SETUSER lines with fresh passwords in place of the placeholders; returns
    password per user."""
    passwords = {}
    for words in lines:
        assert words[:2] == ["ACL", "SETUSER"]
        password = secrets.token_urlsafe(24)
        passwords[words[2]] = password
        admin.execute_command(*[f">{password}" if w.startswith(">CHANGE-ME-") else w for w in words])
    return passwords


def seed_broker_keys(broker: redis.Redis) -> None:
    broker.hset(TASK, mapping={"state": "revoked"})
    broker.set(NONCE, "burnt")
    broker.set(FREEZE, "frozen by alice")
    broker.xadd(AUDIT, {"event": "genuine"})
    broker.set(LEASE, "signed-lease")


def assert_worker_confined(worker: redis.Redis, broker: redis.Redis) -> None:
    """The done-when check: no SET/DEL on task, nonce and freeze keys, no XADD on the audit
    stream, no reading task records, no way around it; reports, leases and RQ keys work."""
    seed_broker_keys(broker)
    for key in (TASK, NONCE, FREEZE):
        with pytest.raises(NoPerm):
            worker.set(key, "queued")
        with pytest.raises(NoPerm):
            worker.delete(key)
        with pytest.raises(NoPerm):
            worker.expire(key, 1)
    with pytest.raises(NoPerm):
        worker.xadd(AUDIT, {"event": "forged"})
    for read in (lambda: worker.get(NONCE), lambda: worker.hgetall(TASK), lambda: worker.exists(TASK),
                 lambda: worker.xrange(AUDIT)):
        with pytest.raises(NoPerm):
            read()
    for key in ("intake:approver:alice", "intake:idea:I-0001", "intake:audit:head"):
        with pytest.raises(NoPerm):
            worker.set(key, "x")
    # No way around the key patterns: scripts, renames, key listings, admin commands.
    with pytest.raises(NoPerm):
        worker.eval("return redis.call('DEL', KEYS[1])", 1, FREEZE)
    with pytest.raises(NoPerm):
        worker.eval("return redis.call('DEL', 'intake:freeze')", 0)
    for command in (("KEYS", "*"), ("SCAN", "0"), ("FLUSHALL",), ("CONFIG", "GET", "*"), ("ACL", "LIST"),
                    ("CLIENT", "LIST"), ("MONITOR",), ("PUBLISH", "rq:pubsub:w2", "x"), ("SWAPDB", "0", "1")):
        with pytest.raises(NoPerm):
            worker.execute_command(*command)
    with pytest.raises(NoPerm):
        worker.execute_command("RENAME", "rq:job:j1", FREEZE)
    # Nothing changed.
    assert broker.hgetall(TASK) == {"state": "revoked"} and broker.get(NONCE) == "burnt"
    assert broker.get(FREEZE) == "frozen by alice" and broker.xlen(AUDIT) == 1
    # What a worker needs.
    assert worker.xadd(REPORTS, {"action": "heartbeat"})
    assert worker.get(LEASE) == "signed-lease"
    worker.hset("rq:job:j1", mapping={"status": "queued"})
    worker.rpush("rq:queue:tier-standard", "j1")
    assert worker.lmove("rq:queue:tier-standard", "rq:wip:tier-standard") == "j1"
    assert worker.hgetall("rq:job:j1") == {"status": "queued"}
    assert worker.delete("rq:job:j1", "rq:wip:tier-standard") == 2


# -- the embedded Redis 6.2 -----------------------------------------------------------------------
@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "d")
    server.acquire()
    yield server
    server.release()


def login(server: EmbeddedRedis, role: str) -> redis.Redis:
    return make_client(server.url_for(role))  # type: ignore[arg-type]


def test_embedded_worker_user_cannot_touch_broker_keys(embedded: EmbeddedRedis) -> None:
    worker, broker = login(embedded, "worker"), login(embedded, "broker")
    try:
        assert_worker_confined(worker, broker)
        # Redis 6.2 has no selectors: lease and report grants are flat (README says so).
        worker.set(LEASE, "overwritten")
        assert broker.get(LEASE) == "overwritten"
    finally:
        worker.close()
        broker.close()


def test_embedded_default_user_is_off(embedded: EmbeddedRedis) -> None:
    anonymous = redis.Redis(unix_socket_path=str(embedded.sock), retry=NO_RETRY)
    try:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with pytest.raises(redis.AuthenticationError):
            anonymous.execute_command("AUTH", "default", "")
        with pytest.raises(redis.AuthenticationError):
            anonymous.execute_command("AUTH", "intake-broker", "guessed-password")
    finally:
        anonymous.close()


def test_embedded_readonly_user_reads_but_cannot_write(embedded: EmbeddedRedis) -> None:
    readonly, broker = login(embedded, "readonly"), login(embedded, "broker")
    try:
        seed_broker_keys(broker)
        assert readonly.get(FREEZE) == "frozen by alice" and readonly.hgetall(TASK) == {"state": "revoked"}
        assert readonly.xlen(AUDIT) == 1
        for write in (lambda: readonly.set(FREEZE, "x"), lambda: readonly.delete(FREEZE),
                      lambda: readonly.xadd(AUDIT, {"e": "x"}), lambda: readonly.hset(TASK, "state", "queued"),
                      lambda: readonly.eval("return 1", 0), lambda: readonly.publish("rq:pubsub:w", "x"),
                      lambda: readonly.flushall()):
            with pytest.raises(NoPerm):
                write()
        assert broker.get(FREEZE) == "frozen by alice" and broker.xlen(AUDIT) == 1
    finally:
        readonly.close()
        broker.close()


def test_embedded_broker_user_has_its_prefix_and_no_dangerous_commands(embedded: EmbeddedRedis) -> None:
    broker = login(embedded, "broker")
    try:
        broker.set("intake:x", "1")
        broker.set("rq:x", "1")
        assert broker.eval("return redis.call('GET', KEYS[1])", 1, "intake:x") == "1"
        with pytest.raises(NoPerm):
            broker.set("other-app:x", "1")
        for command in (("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "SET", "appendfsync", "no"),
                        ("ACL", "SETUSER", "intake-worker", "+@all"), ("SHUTDOWN", "NOSAVE"), ("DEBUG", "SLEEP", "0")):
            with pytest.raises(NoPerm):
                broker.execute_command(*command)
        assert broker.info("memory")["maxmemory_policy"] == "noeviction"  # what check_server reads
    finally:
        broker.close()


def test_passwords_are_private_files_never_on_a_command_line(embedded: EmbeddedRedis) -> None:
    keys = embedded.keys_dir
    passwords = {}
    for role in ROLES:
        path = keys / f"redis-{role}.pass"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        passwords[role] = path.read_text().strip()
    assert len(set(passwords.values())) == 3 and all(len(p) >= 32 for p in passwords.values())
    pid = int((embedded.dir / "redis.pid").read_text())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    conf = (embedded.dir / "redis.conf").read_text()
    users = (embedded.dir / "users.acl").read_text()
    for password in passwords.values():
        assert password not in cmdline and password not in conf and password not in users
    assert "user default off" in users and "aclfile" in conf
    assert stat.S_IMODE((embedded.dir / "users.acl").stat().st_mode) == 0o600
    assert stat.S_IMODE((embedded.dir / "redis.conf").stat().st_mode) == 0o600


def test_a_group_readable_password_file_is_refused(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    first.acquire()
    first.release()
    (tmp_path / "keys" / "redis-worker.pass").chmod(0o640)
    with pytest.raises(ConfigError, match="redis-worker.pass is readable by group or others"):
        EmbeddedRedis(tmp_path).acquire(role="worker")


_OLD_CONF = """\
port 0
unixsocket {dir}/redis.sock
unixsocketperm 700
dir {dir}
pidfile {dir}/redis.pid
logfile {dir}/redis.log
daemonize yes
appendonly yes
appendfsync everysec
maxmemory-policy noeviction
"""


def _wait(predicate: object, what: str) -> None:
    deadline = time.monotonic() + 20
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_data_dir_from_before_the_acl_users_starts_with_its_data(tmp_path: Path) -> None:
    # What the previous release left: an AOF written by a server with the default user and no
    # password files.
    server = EmbeddedRedis(tmp_path)
    server.dir.mkdir(parents=True, mode=0o700)
    conf = server.dir / "redis.conf"
    conf.write_text(_OLD_CONF.format(dir=server.dir))
    subprocess.run([redis_server_binary(), str(conf)], check=True, timeout=30, stdout=subprocess.DEVNULL)
    _wait(server._ping, "the old-style server")
    old = redis.Redis(unix_socket_path=str(server.sock), decode_responses=True, retry=NO_RETRY)
    old.set("intake:idea:I-0001", "kept")
    old.shutdown()
    old.close()
    _wait(lambda: not server._ping(), "the old-style server to stop")
    assert not (tmp_path / "keys").exists()

    url = server.acquire()
    client = make_client(url)
    try:
        assert client.get("intake:idea:I-0001") == "kept"
        assert client.info("persistence")["aof_enabled"] == 1
    finally:
        client.close()
        server.release()
    assert all(stat.S_IMODE((tmp_path / "keys" / f"redis-{r}.pass").stat().st_mode) == 0o600 for r in ROLES)


def test_appendfsync_is_a_setting(tmp_path: Path) -> None:
    settings = load_settings(_env_file=None, data_dir=tmp_path, redis_appendfsync="everysec")
    assert settings.redis_appendfsync == "everysec"
    assert load_settings(_env_file=None, data_dir=tmp_path).redis_appendfsync == "always"
    with pytest.raises(ConfigError, match="INTAKE_REDIS_APPENDFSYNC"):
        load_settings(_env_file=None, data_dir=tmp_path, redis_appendfsync="sometimes")
    server = EmbeddedRedis(tmp_path, appendfsync=settings.redis_appendfsync)
    server.acquire()
    try:
        assert "appendfsync everysec\n" in (server.dir / "redis.conf").read_text()
    finally:
        server.release()


# -- the printed rules on the session's Redis 6.2, and a real worker under the worker user ----------
@pytest.fixture
def acl_users(redis_server: str, rclient: redis.Redis) -> Iterator[dict[str, str]]:
    """The ``--no-selectors`` users created on the session's server: URL per role."""
    sock = redis_server.removeprefix("unix://")
    passwords = apply_acl(rclient, acl_lines("--no-selectors"))
    rclient.acl_log_reset()
    yield {user.removeprefix("intake-"): user_url(sock, user, pw) for user, pw in passwords.items()}
    for user in passwords:
        rclient.acl_deluser(user)


def test_printed_rules_name_three_users_and_confine_the_worker(acl_users: dict[str, str],
                                                                rclient: redis.Redis) -> None:
    assert set(acl_users) == {"broker", "worker", "readonly"}
    worker, broker = make_client(acl_users["worker"]), make_client(acl_users["broker"])
    try:
        assert_worker_confined(worker, broker)
    finally:
        worker.close()
        broker.close()


def _worker_refusals(rclient: redis.Redis) -> list[str]:
    return [f"{e['reason']} {e['object']}" for e in rclient.acl_log() if e["username"] == "intake-worker"]


def test_a_real_worker_runs_a_task_under_the_worker_user(rig: Rig, acl_users: dict[str, str],  # noqa: F811
                                                          rclient: redis.Redis) -> None:
    task = rig.promote()
    planted = rig.queue().enqueue_call("os.system", args=["true"])
    assert rig.work(rig.config(), url=acl_users["worker"])  # reports, leases and RQ all as intake-worker
    assert rig.task(task.id).state is TaskState.SUCCEEDED
    assert planted.id in FailedJobRegistry("tier-standard", connection=rig.rq())  # refused under the ACL
    assert Job.fetch(planted.id, connection=rig.rq(), serializer=JSONSerializer).get_status() == "failed"
    # Only CLIENT LIST (RQ's ip lookup, which it does without) was refused.
    assert set(_worker_refusals(rclient)) <= {"command client"}, _worker_refusals(rclient)


# -- Redis 7: selectors and %R~ ---------------------------------------------------------------------
def _redis7() -> str | None:
    found = shutil.which("redis-server")
    if found is None:
        return None
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=False).stdout
    major = version.split("v=", 1)[-1].split(".", 1)[0]
    return found if major.isdigit() and int(major) >= 7 else None


@pytest.fixture(scope="module")
def redis7() -> Iterator[str]:
    binary = _redis7()
    if binary is None:
        pytest.skip("no Redis 7+ redis-server on PATH (Debian: apt-get install redis-server)")
    tmp = Path(tempfile.mkdtemp(prefix="intake-r7-"))
    sock = tmp / "r.sock"
    proc = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: sock.exists(), "redis 7")
    yield str(sock)
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)


def test_redis7_selectors_make_leases_read_only_and_reports_append_only(redis7: str) -> None:
    admin = redis.Redis(unix_socket_path=redis7, decode_responses=True)
    passwords = apply_acl(admin, acl_lines() + acl_lines("--worker", "w1")[1:2])
    assert set(passwords) == {"intake-broker", "intake-worker", "intake-readonly", "intake-worker-w1"}
    worker = make_client(user_url(redis7, "intake-worker", passwords["intake-worker"]))
    broker = make_client(user_url(redis7, "intake-broker", passwords["intake-broker"]))
    one = make_client(user_url(redis7, "intake-worker-w1", passwords["intake-worker-w1"]))
    try:
        assert_worker_confined(worker, broker)
        with pytest.raises(NoPerm):
            worker.set(LEASE, "overwritten")
        with pytest.raises(NoPerm):
            worker.delete(LEASE)
        with pytest.raises(NoPerm):
            worker.delete(REPORTS)
        with pytest.raises(NoPerm):
            worker.xrange(REPORTS)
        with pytest.raises(NoPerm):
            worker.xtrim(REPORTS, maxlen=0)
        assert broker.get(LEASE) == "signed-lease" and broker.xlen(REPORTS) == 1
        assert one.xadd(REPORTS, {"action": "heartbeat"})
        with pytest.raises(NoPerm):
            one.xadd("intake:reports:w2", {"action": "heartbeat"})  # another worker's stream
    finally:
        for client in (worker, broker, one):
            client.close()
        admin.flushall()
        for user in passwords:
            admin.acl_deluser(user)
        admin.close()


def test_open_broker_logs_in_per_role_and_never_shows_a_password(tmp_path: Path) -> None:
    from intake.core.redis_conn import open_redis
    from intake.protocol.keyfiles import generate_keys
    from intake.runtime import EXAMPLE_POLICY, open_broker

    settings = load_settings(_env_file=None, data_dir=tmp_path / "d", policy=EXAMPLE_POLICY)
    generate_keys(settings)
    with open_broker(settings) as broker, open_redis(settings, role="worker") as (worker_url, worker_client):
        worker_password = (tmp_path / "d" / "keys" / "redis-worker.pass").read_text().strip()
        broker_password = (tmp_path / "d" / "keys" / "redis-broker.pass").read_text().strip()
        assert "intake-broker:" in broker.url
        assert "intake-worker:" in worker_url and worker_password in worker_url
        assert worker_password not in repr(broker) and broker_password not in repr(broker)
        with pytest.raises(NoPerm):
            worker_client.get(FREEZE)

def test_redis_aclfile_writes_hashes_only_and_urls_a_redis7_accepts(tmp_path: Path) -> None:
    """`intake redis aclfile` (the compose/Kubernetes set-up step): the ACL file holds no
    password, each URL file is 0600, and a real Redis 7 loading the file confines each user."""
    binary = _redis7()
    if binary is None:
        pytest.skip("no Redis 7+ redis-server on PATH (Debian: apt-get install redis-server)")
    import socket as _socket

    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "redis"
    done = subprocess.run([sys.executable, "-m", "intake", "redis", "aclfile", str(out), "--prefix", "intake",
                           "--worker", "w1", "--host", f"127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    users = (out / "users.acl").read_text()
    urls = {p.stem: p.read_text().strip() for p in out.glob("*.url")}
    assert set(urls) == {"intake-broker", "intake-worker-w1", "intake-readonly"}
    for name, url in urls.items():
        assert stat.S_IMODE((out / f"{name}.url").stat().st_mode) == 0o600
        password = url.split(":")[2].split("@")[0]
        assert password not in users, "the ACL file holds hashes, never a password"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path), "--aclfile", str(out / "users.acl")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _accepts(port), "redis 7 with the aclfile")
        broker, worker = make_client(urls["intake-broker"]), make_client(urls["intake-worker-w1"])
        assert broker.set("intake:task:T-1", "x") and broker.get("intake:task:T-1") == "x"
        assert_worker_confined(worker, broker)
        with pytest.raises(NoPerm):
            worker.set("intake:task:T-1", "queued")
        assert worker.xadd("intake:reports:w1", {"action": "heartbeat"})
        with pytest.raises(NoPerm):
            worker.xadd("intake:reports:w2", {"action": "heartbeat"})
        with pytest.raises(redis.AuthenticationError):
            make_client(f"redis://127.0.0.1:{port}/0").ping()  # the default user is off
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _accepts(port: int) -> bool:
    import socket as _socket

    with _socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_worker_given_its_queues_gets_only_their_rq_keys(tmp_path: Path) -> None:
    """`--queue` narrows a named worker's RQ grant to its queues (no ``rq:*``); a queue for a
    worker not given, or not a policy queue name, is refused with a one-line error."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT)}

    def intake(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "intake", "redis", *args], capture_output=True, text=True,
                              timeout=60, cwd=REPO_ROOT, env=env)

    done = intake("acl", "--worker", "w1", "--queue", "tier-standard")
    assert done.returncode == 0, done.stderr
    [line] = [x for x in done.stdout.splitlines() if "intake-worker-w1" in x]
    assert "~rq:*" not in line and "&rq:pubsub:*" not in line
    assert "~rq:queue:tier-standard " in line and "~rq:job:tier-standard_T-* " in line
    assert "&rq:pubsub:w1@*" in line and "~rq:worker:w1@*" in line
    unnarrowed = intake("acl", "--worker", "w1")
    assert "~rq:* " in unnarrowed.stdout  # no queues given: the old shared grant, as the README says
    for bad in (["aclfile", str(tmp_path / "a"), "--worker", "w1", "--queue", "w2=tier-standard"],
                ["aclfile", str(tmp_path / "b"), "--worker", "w1", "--queue", "w1=rq:*"],
                ["acl", "--worker", "w1", "--queue", "Tier*"], ["acl", "--queue", "tier-standard"]):
        refused = intake(*bad)
        assert refused.returncode != 0 and "--queue" in refused.stderr, bad
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
