"""`intake serve` cold-starts on a data dir with history: the embedded Redis is still loading
its AOF when serve connects (it answers a raw PING with -NOAUTH and every command with
-LOADING), serve waits for it, /healthz answers at once, /readyz says "starting" until the
ledger is ready, and a stop leaves nothing running. Ten starts in a row, each from cold.

The data dir holds :data:`ENTRIES` sealed entries written through ``Store.capture_many`` (the
path every channel uses). bench/ledger_scale.py shows the same figures at 10k, 100k and 1M."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.ledger_scale import build_log, settings_for
from tests.functional.test_serve import free_port

ENTRIES = 100_000
STARTS = 10


def answer(url: str) -> tuple[int, dict[str, object]] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return None


def test_ten_cold_starts_on_a_long_log_all_succeed(tmp_path: Path) -> None:
    data = tmp_path / "d"
    settings = settings_for(data)
    build_log(settings, ENTRIES)
    redis_dir = data / "redis"
    assert not (redis_dir / "redis.sock").exists()  # the builder was the last user: stopped
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env.update(INTAKE_DATA_DIR=str(data), INTAKE_POLICY=str(settings.policy_path))
    seen_starting = 0
    for attempt in range(STARTS):
        port = free_port()
        log = tmp_path / f"serve-{attempt}.log"
        with open(log, "wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "intake", "serve"], env={**env, "INTAKE_PORT": str(port)},
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                assert serve.poll() is None, f"start {attempt + 1} failed: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"start {attempt + 1} not ready: {log.read_text()[-2000:]}"
                found = answer(f"http://127.0.0.1:{port}/readyz")
                if found is not None and found[0] == 200:
                    assert found[1] == {"status": "ok", "redis": "up", "ledger": "ok"}
                    break
                if found is not None:
                    assert found == (503, {"status": "starting"}), found
                    seen_starting += 1
                    assert answer(f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok"})
                    # Nothing else is served half-started (unless it became ready meanwhile).
                    refused = answer(f"http://127.0.0.1:{port}/api/v1/ideas")
                    assert refused is not None
                    assert refused == (503, {"status": "starting"}) or answer(
                        f"http://127.0.0.1:{port}/readyz") == (200, {"status": "ok", "redis": "up", "ledger": "ok"})
                time.sleep(0.05)
        finally:
            serve.send_signal(signal.SIGINT)
            assert serve.wait(timeout=60) == 0, log.read_text()[-2000:]
        assert not (redis_dir / "redis.sock").exists(), "serve left the embedded Redis running"
    assert seen_starting > 0, "readyz never said 'starting': start-up did not overlap serving"
    loads = re.findall(r"DB loaded from (?:append only file|disk): ([0-9.]+) seconds",
                       (redis_dir / "redis.log").read_text())
    assert len(loads) >= STARTS, "the embedded Redis did not load its data on each start"


def test_a_start_that_fails_in_the_background_stops_serve_with_its_one_line(tmp_path: Path) -> None:
    data = tmp_path / "d"
    settings = settings_for(data)
    (data / "redis").write_text("a file where the embedded Redis's directory should be")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env.update(INTAKE_DATA_DIR=str(data), INTAKE_POLICY=str(settings.policy_path), INTAKE_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-m", "intake", "serve"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"intake: INTAKE_DATA_DIR: cannot create {data / 'redis'}: File exists"
