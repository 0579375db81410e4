"""Benchmark: what one console list page costs in Redis commands as history grows (issue 23).

    .venv/bin/python -m bench.console_lists [--sizes 10000,100000]

For each size a fresh data dir (embedded Redis, real keys, the example policy) gets that many
ideas through ``Store.capture_many`` (each one a sealed audit entry too: the sealer indexes it),
from seven requesters, plus one email idea first (the oldest record). Then each page view the
console serves is run as the console runs it (:mod:`intake.console.lists`), and the Redis
commands it sent are counted from ``INFO commandstats`` (calls, not wall clock), with the
candidates it read. The last rows are what the old console did per view (the newest 1,000 ideas
read and filtered in Python; the audit page's full ``verify`` and export walk) for comparison.
The figure to look at: the ratio of the largest size to the smallest per view (1.0: flat).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.ledger_scale import settings_for
from intake.console.listing import Filters
from intake.console.lists import AUDIT_FILTERS, IDEA_FILTERS, audit_page, ideas_page
from intake.core.models import Channel, IdeaDraft
from intake.runtime import Broker, open_broker

_ids = itertools.count()
BATCH = 500


def calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def counted(client: redis.Redis, fn: Callable[[], Any]) -> tuple[int, Any]:
    """Commands ``fn`` sent (the two INFO calls around it taken off)."""
    before = calls(client)
    result = fn()
    return calls(client) - before - 1, result


def build(broker: Broker, size: int) -> None:
    broker.store.capture(IdeaDraft(channel=Channel.EMAIL, requester="email:zed@example.com", delivery_id="oldest",
                                   text="the oldest request: zebra-needle", provenance={}))
    done = 0
    while done < size:
        n = min(BATCH, size - done)
        broker.store.capture_many([IdeaDraft(
            channel=Channel.SLACK, requester=f"slack:UBENCH{i % 7:04d}", delivery_id=f"b-{i}",
            text=f"request {i}: please fix the flaky test", provenance={}) for i in (next(_ids) for _ in range(n))])
        done += n
    broker.audit.seal_pending(max_rounds=10 ** 6)


VIEWS: list[tuple[str, str, dict[str, str]]] = [
    ("ideas: pending (the default)", "ideas", {}),
    ("ideas: requester (oldest record)", "ideas", {"state": "any", "requester": "email:zed@example.com"}),
    ("ideas: channel + requester", "ideas", {"state": "any", "channel": "slack", "requester": "slack:UBENCH0003"}),
    ("ideas: since 7d", "ideas", {"state": "any", "since": "7d"}),
    ("ideas: free text (bounded scan)", "ideas", {"state": "any", "q": "zebra-needle"}),
    ("ideas: a whole id searched", "ideas", {"state": "any", "q": "<old>"}),
    ("audit: newest entries", "audit", {}),
    ("audit: action idea.captured", "audit", {"action": "idea.captured"}),
    ("audit: actor", "audit", {"actor": "slack:UBENCH0003"}),
]


def run(size: int) -> dict[str, tuple[int, int]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-console-"))
    try:
        settings = settings_for(tmp / "data")
        with open_broker(settings) as broker:
            build(broker, size)
            broker.ledger.follow()
            old = broker.store.recent_ideas(1)  # warm the script cache and connections
            oldest = broker.client.zrange(broker.store.keys.ideas, 0, 0)[0]
            out: dict[str, tuple[int, int]] = {}
            for name, kind, query in VIEWS:
                query = {k: (oldest if v == "<old>" else v) for k, v in query.items()}
                if kind == "ideas":
                    n, page = counted(broker.client, lambda q=query: ideas_page(broker, Filters.parse(q, IDEA_FILTERS)))
                else:
                    n, page = counted(broker.client, lambda q=query: audit_page(broker, Filters.parse(q, AUDIT_FILTERS)))
                out[name] = (n, page.looked)
            deep = ideas_page(broker, Filters.parse({"state": "any"}, IDEA_FILTERS))
            for _ in range(20):  # twenty pages back, then one more counted
                deep = ideas_page(broker, Filters.parse({"state": "any", "after": deep.older or ""}, IDEA_FILTERS))
            n, page = counted(broker.client, lambda: ideas_page(
                broker, Filters.parse({"state": "any", "after": deep.older or ""}, IDEA_FILTERS)))
            out["ideas: page 22 (keyset)"] = (n, page.looked)
            n, old = counted(broker.client, lambda: broker.store.recent_ideas(1000))
            out["before: ideas (newest 1,000 read)"] = (n, len(old))
            n, _ = counted(broker.client, lambda: (broker.audit.verify(), list(broker.audit.export())))
            out["before: audit page (verify + export)"] = (n, size)
            index_bytes = sum(int(broker.client.memory_usage(k) or 0)
                              for k in broker.client.scan_iter(f"{broker.store.keys.p}:ix:*", count=1000))
            print(f"{size} ideas: the listing indexes hold {index_bytes / (size + 1):.0f} bytes of Redis memory per idea "
                  "(with its audit entry)")
            return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {size: run(size) for size in sizes}
    names = list(results[sizes[0]])
    print(f"{'page view':40} " + " ".join(f"{f'cmds@{s}':>12} {f'read@{s}':>10}" for s in sizes) + "   ratio")
    for name in names:
        cells = " ".join(f"{results[s][name][0]:>12} {results[s][name][1]:>10}" for s in sizes)
        ratio = results[sizes[-1]][name][0] / max(1, results[sizes[0]][name][0])
        print(f"{name:40} {cells}   {ratio:.2f}x")


if __name__ == "__main__":
    main()
