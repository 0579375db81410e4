"""`intake doctor` against real parts: a Redis that evicts, a world-readable key, the embedded
Redis done right, a Slack stand-in, and worker configs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from intake.core.redis_conn import EmbeddedRedis, make_client, redis_server_binary
from intake.core.settings import Settings, load_settings
from intake.operations.doctor import check_slack, problems, run_doctor
from intake.protocol.keyfiles import generate_keys
from intake.runtime import EXAMPLE_POLICY
from tests.slack_sim import SlackSim

INTAKE = [sys.executable, "-m", "intake"]


@pytest.fixture
def evicting_redis() -> Iterator[str]:
    """A real redis-server with ``maxmemory-policy allkeys-lru`` and no AOF."""
    tmp = Path(tempfile.mkdtemp(prefix="intake-doc-"))
    sock = tmp / "r.sock"
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--save", "",
         "--appendonly", "no", "--dir", str(tmp), "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"unix://{sock}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if make_client(url).ping():
                break
        except redis.RedisError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the evicting redis-server did not start")
            time.sleep(0.02)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)


def _env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env.update(INTAKE_DATA_DIR=str(data), INTAKE_POLICY=str(EXAMPLE_POLICY), **extra)
    return env


def test_doctor_reports_a_world_readable_key_and_an_evicting_redis(tmp_path: Path, evicting_redis: str) -> None:
    data = tmp_path / "d"
    settings = load_settings(_env_file=None, data_dir=data, redis_url=evicting_redis, policy=EXAMPLE_POLICY)
    generate_keys(settings)
    settings.keys["audit"].chmod(0o644)

    env = _env(data, INTAKE_REDIS_URL=evicting_redis)
    done = subprocess.run([*INTAKE, "doctor", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is False
    found = {(f["check"], f["message"]) for f in report["findings"] if f["status"] == "problem"}
    assert ("keys", f"audit key: {settings.keys['audit']} is readable by others or writable by group "
                    "(mode 0644; chmod 600 it)") in found
    assert any(c == "redis" and m.startswith("maxmemory-policy is allkeys-lru:") for c, m in found)
    assert any(c == "redis" and m.startswith("AOF is off") for c, m in found)
    assert any(c == "redis" and m.startswith("connected as the default user") for c, m in found)
    # The other private keys are fine and say so; nothing else is a problem.
    assert {c for c, _ in found} == {"keys", "redis"}

    text = subprocess.run([*INTAKE, "doctor"], env=env, capture_output=True, text=True, timeout=60)
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert f"problem  keys: audit key: {settings.keys['audit']} is readable by others or writable by group " \
           "(mode 0644; chmod 600 it)" in lines
    assert lines[-1] == f"{len(found)} problem(s)"
    assert text.stderr == ""


def test_doctor_passes_on_the_embedded_redis(tmp_path: Path) -> None:
    """The embedded Redis is set up as doctor wants it: AOF, noeviction, its own ACL users."""
    data = tmp_path / "d"
    settings = load_settings(_env_file=None, data_dir=data, policy=EXAMPLE_POLICY)
    generate_keys(settings)
    embedded = EmbeddedRedis(data, prefix=settings.key_prefix)  # doctor inspects a running one, starts none
    embedded.acquire()
    try:
        done = subprocess.run([*INTAKE, "doctor", "--json"], env=_env(data), capture_output=True, text=True,
                              timeout=120)
    finally:
        embedded.release()
    report = json.loads(done.stdout)
    assert done.returncode == 0, report
    messages = [f["message"] for f in report["findings"]]
    assert "AOF on" in messages and "maxmemory-policy noeviction" in messages and "appendfsync always" in messages
    assert "connected as ACL user intake-broker" in messages
    # The Redis passwords it generated are private files, and doctor checked them.
    assert any(m.startswith("redis-broker.pass:") for m in messages)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_doctor_in_an_empty_directory_creates_nothing(short_tmp: Path) -> None:
    """Read-only: no .intake/, no embedded Redis (no AOF, no socket), no password or key file,
    in the directory or in HOME, however many times it runs, and it says what it could not check.
    (A short path: the embedded Redis's socket path must fit, or doctor says that instead.)"""
    cwd, home = short_tmp / "empty", short_tmp / "home"
    cwd.mkdir()
    home.mkdir()
    (home / "existing").write_text("x")
    before = _tree(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env["HOME"] = str(home)
    for _ in range(2):
        done = subprocess.run([*INTAKE, "doctor", "--json"], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=120)
        report = json.loads(done.stdout)
        assert done.returncode == 1, report  # missing keys are problems
        assert list(cwd.iterdir()) == [], sorted(p.name for p in cwd.rglob("*"))
        assert _tree(home) == before
    redis_finding = [f for f in report["findings"] if f["check"] == "redis"]
    assert redis_finding and redis_finding[0]["status"] == "warning"
    assert "no embedded Redis running" in redis_finding[0]["message"]
    assert any("run `intake keys generate`" in f["message"] for f in report["findings"])


def test_a_doctor_with_unparseable_settings_says_which(tmp_path: Path) -> None:
    done = subprocess.run([*INTAKE, "doctor"], env=_env(tmp_path, INTAKE_PORT="eighty"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout.splitlines()[0].startswith("problem  settings: INTAKE_PORT:")


async def test_slack_auth_test_refuses_a_bad_token(settings: Settings) -> None:
    async with SlackSim() as sim:
        bad = settings.model_copy(update={"slack_bot_token": _secret("not-a-token"), "slack_api_url": sim.base_url,
                                          "slack_signing_secret": _secret("s" * 32)})
        found = await asyncio.to_thread(check_slack, bad)
        assert [(f.status, f.message) for f in found] == [("problem", "auth.test refused SLACK_BOT_TOKEN (invalid_auth)")]
        good = bad.model_copy(update={"slack_bot_token": _secret("xoxb-1-good")})
        found = await asyncio.to_thread(check_slack, good)
        assert [f.status for f in found] == ["ok"] and "UBOT00001" in found[0].message
        assert [c.method for c in sim.calls] == ["auth.test", "auth.test"]


def test_slack_needs_the_secret_of_its_mode(settings: Settings) -> None:
    lone = settings.model_copy(update={"slack_signing_secret": _secret("s" * 32)})
    assert [f.message for f in check_slack(lone)] == [
        "SLACK_SIGNING_SECRET or SLACK_APP_TOKEN is set but SLACK_BOT_TOKEN is not"]


def test_worker_configs_are_checked(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTAKE_TEST_UNSET_FORGE_TOKEN", raising=False)
    config = tmp_path / "w.toml"
    config.write_text(
        'name = "w9"\nqueues = ["tier-standard"]\nagent = { type = "command", argv = ["/nonexistent/agent"] }\n'
        '[[repos]]\nname = "acme/web"\nurl = "/srv/web.git"\nchange_types = ["docs", "tests", "bugfix", '
        '"dependency-bump"]\nagent_env = { MODEL_KEY = { env = "INTAKE_TEST_UNSET_FORGE_TOKEN" } }\n'
    )
    found = run_doctor([config, tmp_path / "missing.toml"], settings=settings)
    worker = [f.message for f in problems(found) if f.check.startswith("worker ")]
    assert worker == [
        "agent.argv[0]: no program at /nonexistent/agent",
        "repos[0].agent_env.MODEL_KEY: environment variable INTAKE_TEST_UNSET_FORGE_TOKEN is not set",
        f"INTAKE_WORKER_KEY: no key file at {settings.worker_key_path('w9')} (run `intake keys generate`)",
        f"--config: no worker config at {tmp_path / 'missing.toml'}",
    ]


def _secret(value: str):  # noqa: ANN202
    from pydantic import SecretStr

    return SecretStr(value)
