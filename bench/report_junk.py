"""Benchmark: genuine worker reports with and without 10,000 junk XADDs on another worker's stream.

    .venv/bin/python -m bench.report_junk [--junk N] [--reports R] [--rounds K]

Issue 19: junk on a report stream is rejected in bulk (one XACK per batch, one audit record per
stream per interval), so a flood on mallory's stream should cost the genuine reports of another
worker little more than reading past it. Each round, on the embedded Redis, a fresh broker and
two registered workers: R genuine ``report.stopped`` reports on the good worker's stream are
timed through :class:`ReportProcessor` alone (the baseline), then again with N junk entries
XADDed to mallory's stream just before; the time is until every genuine report is handled
(the processor reads every stream each round, so a flood on one stream delays another's
reports by the junk it reads alongside them, not by the whole flood). Prints the medians, the
ratio, and the audit records the junk produced.

Not a CI test: wall-clock figures belong here, never in tests.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from intake.core.settings import load_settings
from intake.protocol.keyfiles import generate_keys
from intake.protocol.reports import Reporter
from intake.runtime import EXAMPLE_POLICY, open_broker
from intake.tasks.worker_reports import ReportProcessor, issue_worker_key, worker_scope


def one_round(junk: int, reports: int) -> tuple[float, int]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-junk-"))
    try:
        settings = load_settings(_env_file=None, data_dir=tmp / "d", policy=EXAMPLE_POLICY)
        generate_keys(settings)
        with open_broker(settings) as broker:
            scope = worker_scope(["tier-standard"], ["acme/web"], ["docs"])
            reporters = {}
            for name in ("good", "mallory"):
                generation, key = issue_worker_key(broker, name, actor="cli:bench", scope=scope)
                reporters[name] = Reporter(broker.client, settings.key_prefix, name, generation, key)
            processor = ReportProcessor(broker)
            processor.streams()
            if junk:
                pipe = broker.client.pipeline(transaction=False)
                for i in range(junk):
                    pipe.xadd(reporters["mallory"].stream, {"r": f'{{"junk":{i}}}', "m": "0" * 64})
                pipe.execute()
            before = sum(1 for e in broker.audit.export() if e.get("action") == "report.rejected")
            for _ in range(reports):
                reporters["good"].send("report.stopped", "T-000000000001", attempt=1, why="bench")
            good = reporters["good"].stream
            last = broker.client.xinfo_stream(good)["last-generated-id"]
            start = time.perf_counter()
            while True:  # until every genuine report is handled (the junk may still be waiting)
                processor.poll(block_ms=10)
                group = next(g for g in broker.client.xinfo_groups(good) if g["name"] == "broker")
                if group["last-delivered-id"] == last and not group["pending"]:
                    break
            took = time.perf_counter() - start
            while processor.poll(block_ms=10):
                pass  # the rest of the junk, for the audit count
            audited = sum(1 for e in broker.audit.export() if e.get("action") == "report.rejected") - before
            return took, audited
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--junk", type=int, default=10_000)
    parser.add_argument("--reports", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base, flood, audited = [], [], []
    for _ in range(args.rounds):
        base.append(one_round(0, args.reports)[0])
        took, n = one_round(args.junk, args.reports)
        flood.append(took)
        audited.append(n)
    b, f = statistics.median(base), statistics.median(flood)
    print(f"{args.reports} genuine reports alone:          {b * 1000:8.1f} ms (median of {args.rounds})")
    print(f"... behind {args.junk} junk XADDs:        {f * 1000:8.1f} ms")
    print(f"ratio flood / alone: {f / b:.2f}; per junk entry: {(f - b) / args.junk * 1e6:.1f} us")
    print(f"audit records for the junk, per round: {audited}")


if __name__ == "__main__":
    main()
