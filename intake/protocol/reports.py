"""Workers' reports: the one thing a worker writes, in the shape and MAC both sides agree on.

A worker appends reports to its own stream ``{prefix}:reports:<worker>``, each a canonical JSON
body (worker, key generation, action, task, time, a random report id, data) with an HMAC-SHA256
under the worker's report key. The broker checks and applies them
(:mod:`intake.tasks.worker_reports`); nothing here grants anything.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

import redis

from intake.core.models import canonical_json
from intake.protocol.keyspace import Keys

REPORT_ACTIONS = frozenset({
    "report.claimed", "report.heartbeat", "report.result", "report.refused", "report.stopped",
})

#: A worker's name: it appears in key names and ACL patterns.
WORKER_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
MAX_REPORT_BYTES = 256 * 1024


def report_mac(key: bytes, body: str) -> str:
    return hmac.new(key, b"report|" + body.encode(), hashlib.sha256).hexdigest()


class Reporter:
    """Append MAC'd reports to one worker's stream (the worker's only write to broker state)."""

    def __init__(self, client: redis.Redis, prefix: str, worker: str, generation: int, key: bytes) -> None:
        self.r = client
        self.worker = worker
        self.generation = generation
        self._key = key
        self.stream = Keys(prefix).reports(worker)

    def send(self, action: str, task_id: str, **data: Any) -> str:
        if action not in REPORT_ACTIONS:
            raise ValueError(f"not a report action: {action}")
        body = canonical_json({
            "w": self.worker, "g": self.generation, "action": action, "task": task_id,
            "at": time.time(), "rid": secrets.token_hex(8), "data": data,
        }).decode()
        return str(self.r.xadd(self.stream, {"r": body, "m": report_mac(self._key, body)},
                               maxlen=100_000, approximate=True))
