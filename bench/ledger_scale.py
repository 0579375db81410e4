"""Benchmark: how `intake serve` starts and idles on a long audit log.

    .venv/bin/python -m bench.ledger_scale [--sizes 10000,100000,1000000] [--idle 60] [--keep DIR]

For each size a fresh data dir (embedded Redis, real keys, the example policy) gets that many
ideas written through ``Store.capture_many`` (the path every channel uses; each capture is one
sealed audit entry). Then `intake serve` is started twice as a real process:

  cold   the first start: no ledger snapshot yet, so it replays the whole log (and then writes
         one); the embedded Redis also loads the AOF from scratch
  warm   the next start: Redis loads the AOF again, the ledger starts from the snapshot

and the figures printed per size are the time from spawn to ``/readyz`` answering ok (and, for
the warm start, to ``/healthz`` answering: Python's imports alone, on a busy host), the CPU
the serve process (with its threads) used while idle for ``--idle`` seconds after the warm
start, its RSS, and Redis ``used_memory`` per entry. The last line is the warm start-up ratio of
the largest to the smallest size (goal: under 2x). Not a CI test: wall-clock figures belong here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from intake.core.models import Channel, IdeaDraft
from intake.core.redis_conn import make_client
from intake.core.settings import Settings, load_settings
from intake.protocol.keyfiles import generate_keys
from intake.runtime import EXAMPLE_POLICY, open_broker

_ids = itertools.count()
BATCH = 500


def settings_for(data_dir: Path) -> Settings:
    """Settings for an embedded-Redis data dir with real keys and the example policy."""
    settings = load_settings(_env_file=None, data_dir=data_dir, policy=EXAMPLE_POLICY)
    if not settings.keys["audit"].exists():
        generate_keys(settings)
    return settings


def build_log(settings: Settings, entries: int) -> None:
    """Append ``entries`` captured ideas (one sealed audit entry each) through the real capture
    path, in group commits of :data:`BATCH`, and seal them all."""
    with open_broker(settings) as broker:
        done = 0
        while done < entries:
            n = min(BATCH, entries - done)
            drafts = []
            for _ in range(n):
                i = next(_ids)
                drafts.append(IdeaDraft(channel=Channel.SLACK, requester="slack:UBENCH0001",
                                        delivery_id=f"scale-{i}", text=f"scale request {i}: please fix the flaky test",
                                        provenance={"channel_id": "C0GENERAL1"}))
            broker.store.capture_many(drafts)
            done += n
        broker.audit.seal_pending(max_rounds=10 ** 6)


def serve_env(settings: Settings, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env.update(INTAKE_DATA_DIR=str(settings.data_dir), INTAKE_POLICY=str(settings.policy_path),
               INTAKE_PORT=str(port))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(port: int, path: str = "/readyz") -> dict[str, object] | None:
    """``path``'s answer when it says ok, else None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            found = json.loads(resp.read())
            return found if found.get("status") == "ok" else None
    except (OSError, ValueError):
        return None


def start(settings: Settings, log: Path, timeout: float = 600) -> tuple[subprocess.Popen[bytes], float, float]:
    """Spawn `intake serve`; (the process, seconds until /healthz answered, seconds until
    /readyz said ok)."""
    port = free_port()
    began = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "intake", "serve"], env=serve_env(settings, port),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    alive = None
    while ready(port) is None:
        if alive is None and ready(port, "/healthz") is not None:
            alive = time.perf_counter() - began
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"serve not ready within {timeout:.0f} s; see {log}")
        time.sleep(0.02)
    done = time.perf_counter() - began
    return proc, done if alive is None else alive, done


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def redis_memory(settings: Settings) -> tuple[int, int]:
    """(used_memory in bytes, audit entries in Redis) of the data dir's running embedded Redis."""
    from intake.core.redis_conn import EmbeddedRedis

    client = make_client(EmbeddedRedis(settings.data_dir).url)
    try:
        return int(client.info("memory")["used_memory"]), int(client.xlen(f"{settings.key_prefix}:audit"))
    finally:
        client.close()


def measure(size: int, root: Path, idle_s: float) -> dict[str, float]:
    data = root / f"d{size}"
    settings = settings_for(data)
    began = time.perf_counter()
    build_log(settings, size)
    built = time.perf_counter() - began
    log = root / f"serve-{size}.log"
    proc, _, cold = start(settings, log)
    stop(proc)
    proc, alive, warm = start(settings, log)
    try:
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(idle_s)
        idle = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0) * 100
        rss = rss_mb(proc.pid)
        used, entries = redis_memory(settings)
    finally:
        stop(proc)
    return {"size": size, "build_s": built, "cold_s": cold, "alive_s": alive, "warm_s": warm, "idle_cpu_pct": idle, "rss_mb": rss,
            "redis_bytes_per_entry": used / max(entries, 1), "entries_in_redis": entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU to measure")
    parser.add_argument("--keep", type=Path, default=None, help="build the data dirs here and keep them")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = args.keep or Path(tempfile.mkdtemp(prefix="intake-scale-", dir=os.environ.get("TMPDIR", "/tmp")))
    root.mkdir(parents=True, exist_ok=True)
    print(f"{'entries':>9} {'build s':>8} {'cold start s':>13} {'warm: healthz s':>16} {'readyz s':>9} "
          f"{'idle CPU %':>11} "
          f"{'serve RSS MB':>13} {'Redis B/entry':>14}", flush=True)
    results = []
    try:
        for size in sizes:
            r = measure(size, root, args.idle)
            results.append(r)
            print(f"{size:>9} {r['build_s']:>8.1f} {r['cold_s']:>13.2f} {r['alive_s']:>16.2f} {r['warm_s']:>9.2f} "
                  f"{r['idle_cpu_pct']:>11.2f} {r['rss_mb']:>13.0f} {r['redis_bytes_per_entry']:>14.0f}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"warm start-up ratio {last['size']}/{first['size']}: {last['warm_s'] / first['warm_s']:.2f}x "
              "(goal < 2x)")


if __name__ == "__main__":
    main()
