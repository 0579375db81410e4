"""Benchmark: revoke → the agent's sandbox gone, with and without the pushed stop.

    .venv/bin/python -m bench.revoke_latency [--rounds 10]

A real worker (in-process, burst mode, real bubblewrap when the config asks for it) runs an
agent that starts a marked process and sleeps; once the marked process runs, the task is revoked
through the gatekeeper and the time until no marked process is left is measured. Rounds
alternate between ``push`` (the gatekeeper's revoke hook writes a signed refusal on the run's
lease key at once) and ``heartbeat`` (the hook off: the worker learns of the revoke from the
answer to its next heartbeat, as before), so both are measured in the same run on the same
machine. Prints p50/p99 of each and their ratio. Not a CI test: wall-clock figures belong here.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

from intake.core.redis_conn import EmbeddedRedis, make_client
from tests.conftest import FakeClock
from tests.workers.harness import make_rig, pids_with, wait_for


def agent(marker: str) -> dict[str, object]:
    script = (f"python3 -c 'import time\nwhile True: time.sleep(0.05)' {marker} & "
              "while true; do sleep 0.05; done")
    return {"type": "command", "argv": ["/bin/sh", "-c", script]}


def one(rig, push: bool) -> float:  # type: ignore[no-untyped-def]
    marker = f"rv-{secrets.token_hex(8)}"
    task = rig.promote()
    gate = rig.broker.gatekeeper
    gate.on_revoked = rig.broker.dispatcher.on_revoked if push else None
    took: list[float] = []

    def revoke_when_running() -> None:
        wait_for(lambda: pids_with(marker), 60, "the agent")
        began = time.perf_counter()
        gate.revoke(task.id, identity="cli:bob", is_approver=True, reason="bench")
        wait_for(lambda: not pids_with(marker), 60, "the sandbox to go", interval=0.005)
        took.append(time.perf_counter() - began)

    helper = threading.Thread(target=revoke_when_running)
    helper.start()
    rig.work(rig.config(agent=agent(marker)))
    helper.join(timeout=120)
    return took[0]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="intake-revoke-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "r")
        url = server.acquire()
        client = make_client(url)
        try:
            rig = make_rig(Path(tmp), url, client, FakeClock())
            rig.issue_key()
            times: dict[str, list[float]] = {"push": [], "heartbeat": []}
            for i in range(args.rounds * 2):
                mode = "push" if i % 2 == 0 else "heartbeat"
                times[mode].append(one(rig, mode == "push"))
            rig.close()
        finally:
            client.close()
            server.release()
    print(f"{'mode':>10} {'rounds':>7} {'p50 s':>7} {'p99 s':>7} {'max s':>7}")
    for mode, values in times.items():
        print(f"{mode:>10} {len(values):>7} {statistics.median(values):>7.2f} {pct(values, 0.99):>7.2f} "
              f"{max(values):>7.2f}")
    print(f"p50 heartbeat/push: {statistics.median(times['heartbeat']) / statistics.median(times['push']):.1f}x; "
          f"push p99 {'meets' if pct(times['push'], 0.99) <= 1.0 else 'misses'} the 1 s target")


if __name__ == "__main__":
    main()
