"""A running task's heartbeat: proof, renewed every few seconds, that its worker is alive.

The key (``Keys.heartbeat``) is set with a TTL in the same transaction that moves the task to
``running`` and holds the run's random id. This thread renews it only while it still holds that
id (compare-and-expire), so a run the broker has already given up on can never revive its key.
The broker's reaper treats a running task without the key as abandoned.

Fencing: when renewals keep failing (Redis unreachable, the process stalled) for half the TTL,
:attr:`Heartbeat.lost` turns true and the run stops itself, well before the key can expire and
the broker can hand the task to another worker. That is what keeps one task from running twice
at once.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

log = logging.getLogger("intake.worker")

# Renew only our own run's key.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Drop only our own run's key.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Heartbeat:
    """Renews ``key`` (holding ``run_id``) every ``ttl_s / 4`` seconds on a daemon thread."""

    def __init__(self, client: redis.Redis, key: str, run_id: str, ttl_s: int) -> None:
        self.key = key
        self.run_id = run_id
        self.ttl_ms = ttl_s * 1000
        self.interval = ttl_s / 4
        self.fence_after = ttl_s / 2
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._last_ok = time.monotonic()
        self._taken = False  # the key is gone or someone else's: this run is over
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{key}", daemon=True)

    @property
    def lost(self) -> bool:
        """True once this run may no longer act: its key is gone or renewals are overdue."""
        return self._taken or time.monotonic() - self._last_ok > self.fence_after

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self._renew(keys=[self.key], args=[self.run_id, self.ttl_ms]):
                    self._last_ok = time.monotonic()
                else:
                    self._taken = True
                    log.warning("heartbeat %s: the run no longer holds its key; stopping", self.key)
                    return
            except redis.RedisError as exc:
                log.warning("heartbeat %s: renewal failed (%s)", self.key, type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def release(self) -> None:
        """Stop, and drop the key if it is still ours, so the broker settles the run at once."""
        self.stop()
        try:
            self._release(keys=[self.key], args=[self.run_id])
        except redis.RedisError as exc:
            log.warning("heartbeat %s: release failed (%s); it expires by itself", self.key, type(exc).__name__)
