"""Benchmark: after an outage of the far side (Slack), how soon the outbox has delivered everything.

    .venv/bin/python -m bench.outbox_recovery [--cards 50] [--outage 60] [--cap 30]

On an embedded Redis, ``--cards`` events wait in the real :class:`~intake.storage.outbox.Outbox`
while a delivery function standing in for Slack fails for ``--outage`` seconds (retries back off
with full jitter up to ``--cap`` seconds, the retry cap scaled down from the default 300 s so a run
takes minutes). The consumer loop is the notifier's: probe, fetch, deliver, ack or fail. Printed:
seconds from the far side's recovery to the last delivery, with the recovery levers (a success
makes every backed-off delivery due; a probe every 10 s) and, in the same run, without them
(the old behaviour: each delivery waits out its own backoff). This measures the outbox's
scheduling, not Slack's API or the pacer (the delivery function is instant). Not a CI test.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from intake.audit.log import AuditLog
from intake.core.redis_conn import EmbeddedRedis, make_client
from intake.storage import outbox as outbox_mod
from intake.storage.outbox import Outbox


def run(audit: AuditLog, group: str, cards: int, outage_s: float, cap_s: float, levers: bool) -> float:
    outbox = Outbox(audit, group, retry_ms=1000, retry_cap_s=cap_s, lease_s=30)
    if not levers:  # the old outbox: no probe, and a success brings nothing forward
        outbox.probe = lambda: False  # type: ignore[method-assign]
        outbox._recovered = lambda **_: 0  # type: ignore[method-assign]
    outbox.ensure_group()
    for n in range(cards):
        audit.record("system", "idea.captured", f"I-{group[-4:]}{n:08d}")
    began = time.monotonic()
    recovered_at = began + outage_s
    delivered = 0
    while delivered < cards:
        outbox.probe()
        for delivery in outbox.fetch(count=50, block_ms=50):
            if delivery.event.subject[2:6] != group[-4:]:
                outbox.ack(delivery)
                continue
            if time.monotonic() < recovered_at:
                outbox.failed(delivery, "TimeoutError")
            else:
                outbox.ack(delivery)
                delivered += 1
    return time.monotonic() - recovered_at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cards", type=int, default=50)
    parser.add_argument("--outage", type=float, default=60.0)
    parser.add_argument("--cap", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="intake-outbox-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "r")
        client = make_client(server.acquire())
        try:
            audit = AuditLog(client, b"k" * 32, "intake")  # the embedded ACL users own intake:*
            with_levers = run(audit, "g-with", args.cards, args.outage, args.cap, True)
            without = run(audit, "g-without", args.cards, args.outage, args.cap, False)
        finally:
            client.close()
            server.release()
    print(f"{args.cards} cards, far side down {args.outage:.0f} s, retry cap {args.cap:.0f} s "
          f"(probe every {outbox_mod.PROBE_S:.0f} s)")
    print(f"last card after recovery: with the levers {with_levers:.1f} s, without {without:.1f} s "
          f"({without / max(with_levers, 0.001):.1f}x)")


if __name__ == "__main__":
    main()
