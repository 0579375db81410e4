"""Keeping a run's lease: the broker's word, renewed every few seconds, that the run may go on.

While a run lasts, :class:`LeaseKeeper` sends ``report.heartbeat`` every quarter of the lease's
life and watches the lease key for the broker's answer. The broker renews the lease only while
its ledger says this very run is live (not revoked, not frozen, not superseded); otherwise it
writes a signed refusal, or nothing. Either way :attr:`LeaseKeeper.lost` turns true and the run
stops itself: on a refusal at once, and without any answer when the last granted lease runs out
on the worker's own monotonic clock (counted from when it first saw the lease, so neither a
skewed clock nor a lease replayed by someone who can write Redis extends it).
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from intake.protocol.tokens import LeaseClaims

from .claim import Claim, Claimer

log = logging.getLogger("intake.worker")
POLL_S = 0.25
#: A beat every quarter of the lease's life, and at least this far apart.
BEAT_SHARE = 0.25
MIN_BEAT_S = 1.0


class LeaseKeeper:
    """Heartbeats and lease checks for one claimed run, on a daemon thread."""

    def __init__(self, claimer: Claimer, claim: Claim) -> None:
        self.claimer = claimer
        self.claim = claim
        self._stop = threading.Event()
        self._seen = claim.lease_token
        self._iat = claim.lease.iat
        self._deadline = time.monotonic() + _life(claim.lease)
        self.why: str | None = None
        self._thread = threading.Thread(target=self._loop, name=f"lease-{claim.task.id}", daemon=True)

    @property
    def lost(self) -> bool:
        """True once this run may no longer act: refused, or its lease ran out."""
        if self.why is None and time.monotonic() > self._deadline:
            self.why = "lease_expired"
        return self.why is not None

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def _loop(self) -> None:
        interval = max(_life(self.claim.lease) * BEAT_SHARE, MIN_BEAT_S)
        next_beat = 0.0
        seq = 0  # per-run heartbeat sequence number, inside the MAC'd body: a copy is refused
        task, attempt, run = self.claim.task.id, self.claim.attempt, self.claim.run_id
        while not self._stop.wait(POLL_S) and not self.lost:
            try:
                if time.monotonic() >= next_beat:
                    seq += 1
                    self.claimer.reporter.send("report.heartbeat", task, attempt=attempt, run=run, seq=seq)
                    next_beat = time.monotonic() + interval
                found = self.claimer.read_lease(task, attempt, run)
            except redis.RedisError as exc:
                log.warning("lease %s: Redis failed (%s)", task, type(exc).__name__)
                continue
            if found is None or found[1] == self._seen or found[0].iat < self._iat:
                continue  # nothing new (a replayed older lease is not news either)
            lease, raw = found
            self._seen, self._iat = raw, lease.iat
            if not lease.granted:
                self.why = lease.status
                log.warning("lease %s: the broker says %s; stopping", task, lease.status)
                return
            self._deadline = time.monotonic() + _life(lease)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def _life(lease: LeaseClaims) -> float:
    return float(max(lease.exp - lease.iat, 1))
