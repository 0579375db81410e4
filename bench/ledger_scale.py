"""Benchmark: how `intake serve` starts and idles on a long audit log.

    .venv/bin/python -m bench.ledger_scale [--sizes 10000,100000,1000000] [--idle 60]
                                           [--starts 3] [--keep DIR]

For each size a data dir (embedded Redis, real keys, the example policy) gets that many ideas
written through ``Store.capture_many`` (the path every channel uses; each capture is one sealed
audit entry), with a ledger snapshot every ``SNAPSHOT_EVERY`` entries as a running full serve's
sweep writes them. Then, with real processes:

  redis     the embedded Redis is started alone (as production runs Redis as its own service)
            and loads its AOF: wall seconds and the server's own CPU seconds (``INFO cpu``)
  broker    `intake serve` started on that running Redis: seconds from spawn to ``/healthz``
            (Python's imports) and to ``/readyz`` ok, and the CPU seconds it used until then
            (on a shared host wall time includes waiting for a core; CPU time much less). The
            first start replays the ``SNAPSHOT_EVERY`` entries sealed since the newest snapshot
            (the most a running serve leaves) and snapshots; this is the figure the start-up
            goal is about (under 3 s at 1M, 1M/10k under 2x). ``again``: the median of
            ``--starts`` - 1 more starts
  idle      the serve process's CPU (all its threads) over ``--idle`` seconds after that, its
            RSS, and Redis ``used_memory`` per entry
  cold      Redis stopped, then `intake serve` started alone: spawn to ``/readyz`` ok, Redis's
            AOF load included (a host reboot)

The last lines are the ratios of the largest to the smallest size. Not a CI test: wall-clock
figures belong here. ``--keep DIR`` builds the data dirs there and keeps them; a data dir
already built there (``built`` marker) is reused as it is (its first start then replays only
what was sealed since the snapshot an earlier run's start wrote: build afresh for the worst case).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from intake.audit.ledger import SNAPSHOT_EVERY
from intake.core.models import Channel, IdeaDraft
from intake.core.redis_conn import EmbeddedRedis, make_client
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


def build_log(settings: Settings, entries: int, *, snapshots: bool = True) -> None:
    """Append ``entries`` captured ideas (one sealed audit entry each) through the real capture
    path, in group commits of :data:`BATCH`, and seal them all. With ``snapshots`` the ledger
    follows along and snapshots every ``SNAPSHOT_EVERY`` entries, as a running full serve's
    sweep does (without, a first start replays the whole log: an upgrade's one-off cost)."""
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
            # The newest snapshot is SNAPSHOT_EVERY entries behind the head, the most a serve
            # leaves (it snapshots when that many are sealed): every size's first start
            # replays the same 10,000 entries, its worst case.
            if snapshots and done % SNAPSHOT_EVERY == 0 and done + SNAPSHOT_EVERY <= entries:
                broker.ledger.follow()
                broker.ledger.snapshot_if_due()
        broker.audit.seal_pending(max_rounds=10 ** 6)


def finish_backfill(settings: Settings) -> None:
    """The console's one-off index backfill, which a serve's sweeps finish a batch at a time
    (records written by this code are indexed already; it cannot know that): done here, so the
    idle figure is a broker's steady state, not its first hours on an upgraded data dir."""
    with open_broker(settings) as broker:
        while broker.store.backfill_indexes() is not None:
            pass


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


def start(settings: Settings, log: Path,
          timeout: float = 600) -> tuple[subprocess.Popen[bytes], float, float, float]:
    """Spawn `intake serve`; (the process, seconds until /healthz answered, seconds until
    /readyz said ok, the CPU seconds it had used by then: a figure a busy host inflates less)."""
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
    return proc, done if alive is None else alive, done, cpu_seconds(proc.pid)


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


class RedisHold:
    """This process as a user of the data dir's embedded Redis (started, and its AOF loaded, if
    it is not running), so `intake serve` finds it up; the last user out stops it."""

    def __init__(self, settings: Settings) -> None:
        self.embedded = EmbeddedRedis(settings.data_dir, prefix=settings.key_prefix,
                                      appendfsync=settings.redis_appendfsync)
        self.prefix = settings.key_prefix

    def __enter__(self) -> RedisHold:
        began = time.perf_counter()
        self.embedded.acquire(timeout=60)
        self.load_s = time.perf_counter() - began
        self.client = make_client(self.embedded.url)
        cpu = self.client.info("cpu")
        self.load_cpu_s = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        return self

    def memory(self) -> tuple[int, int]:
        """(used_memory in bytes, audit entries in Redis)."""
        return int(self.client.info("memory")["used_memory"]), int(self.client.xlen(f"{self.prefix}:audit"))

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.embedded.release()


def measure(size: int, root: Path, idle_s: float, starts: int) -> dict[str, float]:
    data = root / f"d{size}"
    marker = data / "built"
    built = 0.0
    if not marker.exists():
        shutil.rmtree(data, ignore_errors=True)
        settings = settings_for(data)
        began = time.perf_counter()
        build_log(settings, size)
        built = time.perf_counter() - began
        finish_backfill(settings)
        marker.write_text(f"{size}\n")
    settings = settings_for(data)
    log = root / f"serve-{size}.log"
    with RedisHold(settings) as redis_up:
        alive, warm, cpu = [], [], []
        for _ in range(starts):
            proc, a, w, c = start(settings, log)
            alive.append(a)
            warm.append(w)
            cpu.append(c)
            if len(warm) < starts:
                stop(proc)
        try:
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(idle_s)
            idle = (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0) * 100
            rss = rss_mb(proc.pid)
            used, entries = redis_up.memory()
        finally:
            stop(proc)
    aof = sum(f.stat().st_size for f in (data / "redis").rglob("*.aof*") if f.is_file())
    proc, _, cold, _ = start(settings, log)  # Redis is down now: this start loads it
    stop(proc)
    return {"size": size, "build_s": built, "redis_load_s": redis_up.load_s, "redis_cpu_s": redis_up.load_cpu_s,
            "alive_s": alive[0], "warm_s": warm[0], "cpu_s": cpu[0], "again_s": statistics.median(warm[1:] or warm), "cold_s": cold,
            "idle_cpu_pct": idle, "rss_mb": rss,
            "redis_bytes_per_entry": used / max(entries, 1), "entries_in_redis": entries, "aof_mb": aof / 2 ** 20}


COLUMNS = (("entries", "size", 9, "d"), ("build s", "build_s", 8, ".1f"), ("AOF MB", "aof_mb", 7, ".0f"),
           ("redis load s", "redis_load_s", 13, ".2f"), ("redis CPU s", "redis_cpu_s", 12, ".2f"),
           ("broker: healthz s", "alive_s", 18, ".2f"), ("readyz s", "warm_s", 9, ".2f"),
           ("broker CPU s", "cpu_s", 13, ".2f"), ("again s", "again_s", 8, ".2f"),
           ("cold readyz s", "cold_s", 14, ".2f"), ("idle CPU %", "idle_cpu_pct", 11, ".2f"),
           ("serve RSS MB", "rss_mb", 13, ".0f"), ("Redis B/entry", "redis_bytes_per_entry", 14, ".0f"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU to measure")
    parser.add_argument("--starts", type=int, default=3, help="broker starts per size on a running Redis")
    parser.add_argument("--keep", type=Path, default=None, help="build the data dirs here and keep them")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    root = args.keep or Path(tempfile.mkdtemp(prefix="intake-scale-", dir=os.environ.get("TMPDIR", "/tmp")))
    root.mkdir(parents=True, exist_ok=True)
    print(" ".join(f"{title:>{width}}" for title, _, width, _ in COLUMNS), flush=True)
    results = []
    try:
        for size in sizes:
            r = measure(size, root, args.idle, max(args.starts, 1))
            results.append(r)
            print(" ".join(f"{r[key]:>{width}{fmt}}" for _, key, width, fmt in COLUMNS), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        what = f"{last['size']}/{first['size']}"
        print(f"broker start-up (Redis up) ratio {what}: {last['warm_s'] / first['warm_s']:.2f}x (goal < 2x), "
              f"CPU {last['cpu_s'] / first['cpu_s']:.2f}x; at {last['size']}: {last['warm_s']:.2f} s (goal < 3 s)")
        print(f"cold start-up (Redis load included) ratio {what}: {last['cold_s'] / first['cold_s']:.2f}x; "
              f"Redis load CPU ratio {last['redis_cpu_s'] / max(first['redis_cpu_s'], 1e-3):.2f}x")
        print(f"idle CPU at {last['size']}: {last['idle_cpu_pct']:.2f} % (goal < 1 %)")


if __name__ == "__main__":
    main()
