"""Benchmark: signed ``/intake`` captures, against baselines measured in the same run.

    .venv/bin/python -m bench.slack_capture [--requests N] [--concurrency C] [--rounds R]

Targets, each a server in its own process on 127.0.0.1:
  intake   the real app as an edge (`intake serve --edge`): verify, durable capture on Redis (AOF,
           appendfsync always), ack; the full serve on the same Redis (intake-full, another
           process) seals the audit log and its outbox posts the cards to a Slack API simulator
           (a third process) meanwhile
  bolt     a plain slack-bolt AsyncApp whose /intake handler only acks (same signed requests)
  bare     a bare aiohttp handler (same requests)
  forged   the intake app again, every request carrying a bad signature
  intake-edges2
           the real `intake serve --edge --processes 2` (two processes on one port, SO_REUSEPORT;
           log level WARNING so no access log, as the other targets), on the same Redis
  intake-full, intake-asyncio, intake-nohiredis, bolt-uvloop
           one lever each taken from intake (or given to bolt), to report what it is worth

The load generator sends pre-built HTTP/1.1 requests over keep-alive sockets so it costs little
next to the servers. Rounds are interleaved and the median of each target is reported, with
ratios; targets: capture >= 0.8x bolt, forged rejection >= 0.8x bare. Each round's own ratios are
printed too (their spread says how noisy the machine was), and the CPU each target's processes
used per request (its server processes; for intake also the full serve and Redis), which other
load on the machine disturbs far less than req/s, and the disk's fsync latency before and after
each round (every durable batch waits for one; on a disk other work keeps busy it dominates).
Loopback only, bounded in count. Not a CI test: wall-clock figures belong here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from intake.channels.slack.verify import compute_signature
from intake.core.redis_conn import EmbeddedRedis
from intake.core.settings import load_settings
from intake.protocol.keyfiles import generate_keys
from intake.runtime import EXAMPLE_POLICY

SECRET = "bench-signing-secret-0123456789abcdef"
# bench/servers.py kinds; intake-full starts first, so it holds the sealer lease of the Redis they share
SERVERS = ("bare", "bolt", "intake-full", "intake", "intake-asyncio", "intake-nohiredis", "bolt-uvloop",
           "intake-edges2")
EDGES = {"intake", "intake-asyncio", "intake-nohiredis"}  # run as `intake serve --edge` does
# One round, in order: each ratio's pair back to back; forged before the intake rounds so it never
# shares the CPU with their follow-ups (sealing, paced card posts).
ROUND = ("bare", "forged", "bolt", "intake", "intake-edges2", "intake-full", "intake-asyncio", "intake-nohiredis",
         "bolt-uvloop")
SHARED = ("intake-full", "redis")  # the processes every intake target uses besides its own
LEVERS = {
    "intake-edges2": "two edge processes on one port (--processes 2)",
    "intake-asyncio": "intake without uvloop (asyncio's own loop)",
    "intake-nohiredis": "intake without hiredis (redis-py's Python parser)",
    "intake-full": "a full serve answering requests too (not --edge)",
    "bolt-uvloop": "plain bolt given uvloop too (for reference)",
}
ROOT = Path(__file__).resolve().parent.parent
_ids = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_requests(port: int, n: int, *, forged: bool = False) -> list[bytes]:
    """n distinct, correctly signed (or forged) slash-command requests."""
    out = []
    ts = str(int(time.time()))
    for _ in range(n):
        i = next(_ids)
        body = urllib.parse.urlencode({
            "token": "x", "team_id": "T00000001", "channel_id": "C0GENERAL1", "user_id": "UBENCH0001",
            "command": "/intake", "text": f"benchmark request {i}: please fix the flaky test",
            "response_url": "https://hooks.slack.invalid/1", "trigger_id": f"bench.{i}",
        }).encode()
        sig = compute_signature(body=body, timestamp=ts, signing_secret=SECRET if not forged else "wrong")
        head = (
            f"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
            f"X-Slack-Request-Timestamp: {ts}\r\nX-Slack-Signature: {sig}\r\n\r\n"
        ).encode()
        out.append(head + body)
    return out


@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    latencies: list[float]
    statuses: dict[int, int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def p99_ms(self) -> float:
        return statistics.quantiles(self.latencies, n=100)[98] * 1000


async def _connection(port: int, work: Iterator[bytes], lat: list[float], statuses: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for request in work:
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - start)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def load(name: str, port: int, requests: list[bytes], concurrency: int) -> Result:
    work = iter(requests)
    lat: list[float] = []
    statuses: dict[int, int] = {}
    start = time.perf_counter()
    await asyncio.wait_for(
        asyncio.gather(*(_connection(port, work, lat, statuses) for _ in range(concurrency))), timeout=300
    )
    return Result(name, len(requests), time.perf_counter() - start, lat, statuses)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server on {port} exited early")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on {port} did not start")


def fsync_ms(directory: Path, count: int = 200) -> tuple[float, float]:
    """p50 and p90 of an append + fsync in ``directory`` (ms): what each durable batch waits for
    on this disk at the moment (a disk shared with other busy work makes it slow)."""
    path = directory / "fsync-probe"
    took = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"x" * 1024)
            start = time.perf_counter()
            os.fsync(fd)
            took.append((time.perf_counter() - start) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(took), statistics.quantiles(took, n=10)[8]


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_children(pid: int) -> list[int]:
    """``pid`` and its child processes (an edge's extra processes)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def start_edges(env: dict[str, str], port: int, processes: int) -> subprocess.Popen[bytes]:
    """The real `intake serve --edge --processes N`, once every process answers."""
    own = {**env, "INTAKE_EDGE": "1", "INTAKE_PORT": str(port), "INTAKE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "intake", "serve", "--edge", "--processes", str(processes)],
                            env=own, cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_port(port, proc)
    deadline = time.monotonic() + 60
    while len(with_children(proc.pid)) < processes or asyncio.run(
            load("wait", port, build_requests(port, 100), 16)).statuses.get(200, 0) < 100:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"intake serve --processes {processes} did not start")
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per target per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="intake-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    redis = EmbeddedRedis(tmp)
    try:
        redis.acquire()
        sim_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
        env.update(
            INTAKE_DATA_DIR=str(tmp), INTAKE_POLICY=str(EXAMPLE_POLICY), PYTHONPATH=str(ROOT),
            SLACK_SIGNING_SECRET=SECRET, SLACK_BOT_TOKEN="xoxb-bench",
            SLACK_API_URL=f"http://127.0.0.1:{sim_port}/api/",
        )
        generate_keys(load_settings(_env_file=None, data_dir=tmp))
        sim = subprocess.Popen([sys.executable, "-m", "bench.sim_server", str(sim_port)], env=env, cwd=ROOT)
        procs.append(sim)
        wait_port(sim_port, sim)
        ports: dict[str, int] = {}
        pids: dict[str, list[int]] = {"redis": [int((tmp / "redis" / "redis.pid").read_text())]}
        for kind in SERVERS:
            ports[kind] = free_port()
            if kind == "intake-edges2":
                proc = start_edges(env, ports[kind], 2)
            else:
                own = {**env, "INTAKE_EDGE": "1"} if kind in EDGES else env
                proc = subprocess.Popen([sys.executable, "-m", "bench.servers", kind, str(ports[kind])], env=own,
                                        cwd=ROOT)
                wait_port(ports[kind], proc)
            procs.append(proc)
            pids[kind] = with_children(proc.pid)

        results: dict[str, list[Result]] = {k: [] for k in ROUND}
        cpu: dict[str, list[float]] = {k: [] for k in ROUND}  # µs of CPU per request, per round
        # Warm up each target (imports, bolt's auth.test, connection pools).
        for kind, port in ports.items():
            asyncio.run(load(kind, port, build_requests(port, 200), args.concurrency))
        family = [k for k in ROUND if k.startswith("intake")]
        disk = [fsync_ms(tmp)]
        for n in range(args.rounds):
            # The intake variants take turns going first: each round's background work (sealing,
            # paced card posts) then falls on each of them alike.
            turn = family[n % len(family):] + family[:n % len(family)]
            order = [k for k in ROUND if not k.startswith("intake")]
            at = order.index("bolt") + 1
            for kind in order[:at] + turn + order[at:]:
                server = "intake" if kind == "forged" else kind
                port = ports[server]
                reqs = build_requests(port, args.requests, forged=kind == "forged")
                watched = set(pids[server]) | ({p for k in SHARED for p in pids[k]} if server.startswith("intake") else set())
                before = sum(cpu_seconds(p) for p in watched)
                results[kind].append(asyncio.run(load(kind, port, reqs, args.concurrency)))
                cpu[kind].append((sum(cpu_seconds(p) for p in watched) - before) * 1e6 / args.requests)
            disk.append(fsync_ms(tmp))

        print(f"\n{args.rounds} rounds x {args.requests} requests, {args.concurrency} connections, "
              f"{os.cpu_count()}-core loopback")
        print(f"{'target':<17} {'req/s (median)':>15} {'p99 ms (median)':>16} {'CPU us/req':>11}  statuses")
        med: dict[str, tuple[float, float]] = {}
        for kind, runs in results.items():
            rps = statistics.median(r.rps for r in runs)
            p99 = statistics.median(r.p99_ms for r in runs)
            med[kind] = (rps, p99)
            statuses: dict[int, int] = {}
            for r in runs:
                for code, count in r.statuses.items():
                    statuses[code] = statuses.get(code, 0) + count
            print(f"{kind:<17} {rps:>15.0f} {p99:>16.1f} {statistics.median(cpu[kind]):>11.0f}  {statuses}")
        print("(CPU us/req: the target's own processes during its rounds; for the intake targets also the full"
              " serve and Redis, which seal and store for every one of them)")
        print("fsync on the data dir's disk before the run and after each round (p50/p90 ms; each durable"
              " capture batch waits for one, bolt writes nothing): " + " ".join(f"{a:.1f}/{b:.1f}" for a, b in disk))

        def ratios(kind: str, base: str) -> list[float]:
            return [a.rps / b.rps for a, b in zip(results[kind], results[base], strict=True)]

        def line(label: str, kind: str, base: str) -> str:
            per = ratios(kind, base)
            verdict = "OK" if med[kind][0] / med[base][0] >= 0.8 else "MISSED"
            return (f"{label:<36} {med[kind][0] / med[base][0]:.2f}x  (target >= 0.80) {verdict};"
                    f"  per round {' '.join(f'{r:.2f}' for r in per)}")

        print()
        print(line("capture / plain-bolt ack-only:", "intake", "bolt"))
        print(line("capture, 2 edge processes / bolt:", "intake-edges2", "bolt"))
        print(line("forged rejection / bare aiohttp:", "forged", "bare"))
        print("\nlevers, each measured by taking it away (or giving it to bolt) in this run:")
        for kind, lever in LEVERS.items():
            print(f"  {lever:<50} {kind:<17} {med[kind][0] / med['bolt'][0]:.2f}x bolt")
        for kind in ROUND:
            ok = 401 if kind == "forged" else 200
            bad = {c: n for r in results[kind] for c, n in r.statuses.items() if c != ok}
            if bad:
                print(f"warning: {kind} answered {bad}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        redis.release()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
