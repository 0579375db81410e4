"""Benchmark: durable captures on the embedded Redis with ``appendfsync always`` vs ``everysec``.

    .venv/bin/python -m bench.appendfsync [--captures N] [--rounds R] [--batch B] [--threads T]

Two embedded redis-servers (each in its own data dir, one per setting) run side by side; each
round runs every workload on both, interleaved, and the median of the rounds is reported with
the ratio always / everysec:

  single     one client, one ``Store.capture`` at a time (each waits for its own fsync)
  threads    T threads each capturing one at a time (Redis fsyncs once per event-loop pass, so
             concurrent writers share an fsync)
  batch      ``Store.capture_many`` of B drafts per round trip (group commit, as the Slack
             capture queue does)

Not a CI test: wall-clock figures belong here, never in tests.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from intake.core.models import Channel, IdeaDraft
from intake.core.settings import load_settings
from intake.protocol.keyfiles import generate_keys
from intake.runtime import EXAMPLE_POLICY, Broker, open_broker
from intake.storage.store import Store

MODES = ("always", "everysec")
_ids = itertools.count()


def drafts(n: int) -> list[IdeaDraft]:
    out = []
    for _ in range(n):
        i = next(_ids)
        out.append(IdeaDraft(channel=Channel.SLACK, requester="slack:UBENCH0001", delivery_id=f"bench-{i}",
                             text=f"benchmark request {i}: please fix the flaky test",
                             provenance={"channel_id": "C0GENERAL1"}))
    return out


def single(store: Store, n: int, _batch: int, _threads: int) -> None:
    for d in drafts(n):
        store.capture(d)


def threads(store: Store, n: int, _batch: int, workers: int) -> None:
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(store.capture, drafts(n)))


def batch(store: Store, n: int, size: int, _threads: int) -> None:
    work = drafts(n)
    for start in range(0, n, size):
        store.capture_many(work[start:start + size])


WORKLOADS: dict[str, Callable[[Store, int, int, int], None]] = {"single": single, "threads": threads, "batch": batch}


def open_store(stack: ExitStack, root: Path, mode: str) -> Broker:
    data = root / mode
    settings = load_settings(_env_file=None, data_dir=data, policy=EXAMPLE_POLICY, redis_appendfsync=mode)
    generate_keys(settings)
    broker = stack.enter_context(open_broker(settings))
    if broker.client.info("persistence")["aof_enabled"] != 1:
        raise SystemExit("the embedded Redis must run with AOF")
    return broker


def rounds(args: argparse.Namespace, brokers: dict[str, Broker]) -> Iterator[tuple[str, str, float]]:
    for _ in range(args.rounds):
        for name, workload in WORKLOADS.items():
            n = args.captures if name != "single" else max(args.captures // 4, 50)
            for mode in MODES:
                start = time.perf_counter()
                workload(brokers[mode].store, n, args.batch, args.threads)
                yield name, mode, n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captures", type=int, default=2000, help="captures per workload per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="drafts per capture_many")
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="intake-fsync-"))
    try:
        with ExitStack() as stack:
            brokers = {mode: open_store(stack, root, mode) for mode in MODES}
            for mode in MODES:  # warm up: scripts loaded, connections open
                batch(brokers[mode].store, 200, args.batch, args.threads)
            results: dict[tuple[str, str], list[float]] = {}
            for name, mode, rps in rounds(args, brokers):
                results.setdefault((name, mode), []).append(rps)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{args.rounds} rounds, {args.captures} captures per workload (single: a quarter), "
          f"batch {args.batch}, {args.threads} threads, embedded Redis on this machine's disk")
    print(f"{'workload':<9} {'always req/s':>13} {'everysec req/s':>15} {'always/everysec':>16}")
    for name in WORKLOADS:
        always = statistics.median(results[(name, "always")])
        everysec = statistics.median(results[(name, "everysec")])
        print(f"{name:<9} {always:>13.0f} {everysec:>15.0f} {always / everysec:>15.2f}x")


if __name__ == "__main__":
    main()
