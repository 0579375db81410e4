"""The sealer lease: at most one process per Redis seals the audit log at a time.

Any number of ``intake serve`` replicas (and CLI commands) may share one Redis. Sealing is
deterministic, so two sealers would compute the same seals; still, exactly one sealer at a time
keeps the work and the log lines in one place and lets every other process simply wait for the
head to move. The lease is two keys beside the audit stream:

- ``<prefix>:audit:fence`` — a counter, ``INCR``'d each time the lease is taken: the **fencing
  token**. It only ever grows.
- ``<prefix>:audit:sealer`` — ``"<token> <owner>"`` with a TTL (:data:`LEASE_TTL_MS`). Its holder
  renews it well inside the TTL; when the holder dies the key expires and another process takes
  the lease (with a new, larger token) within seconds.

The seal write itself (:data:`intake.audit.log._FENCED_SEALS`) runs in one Lua script that first
checks that the lease still holds this holder's value *and* that the fence is still its token.
A holder that was paused (SIGSTOP, a long GC, a VM freeze) past its TTL wakes up with a stale
token: its write is refused atomically, so it can never publish a seal after someone else took
over. It learns so from the refusal (:class:`LeaseLost`) and goes back to asking.

Redis is storage, not authority: whoever can write these keys (the broker's own Redis user) can
hold the lease and stop sealing, which is loud (``intake audit verify`` counts unsealed events,
the ledger stops following), but cannot make a forged seal verify. The agent workers' Redis user
has no access to ``<prefix>:audit:*`` at all (:mod:`intake.core.redis_acl`).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading

import redis

#: How long a lease lives without renewal; the holder renews every :data:`RENEW_S`.
LEASE_TTL_MS = 4000
RENEW_S = 1.0

# Take the lease if it is free (a new token), or renew it if this owner holds it (same token).
# Returns the token, or 0 when someone else holds it. A lease naming this owner with a token that
# is no longer the fence (written back by someone, or the fence bumped) is not renewed: the fenced
# seal would refuse that token, and renewing it would only loop on the refusal.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local sp = string.find(cur, ' ', 1, true)
  if sp and string.sub(cur, sp + 1) == ARGV[1] then
    local token = string.sub(cur, 1, sp - 1)
    if token ~= redis.call('GET', KEYS[2]) then return 0 end
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token .. ' ' .. ARGV[1], 'PX', ARGV[2])
return token
"""

# Give the lease back, only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseLost(Exception):
    """The fenced write was refused: another process took the lease (or it expired)."""


class SealerLease:
    """This process's view of the sealer lease under ``prefix``.

    :meth:`acquire` takes or renews it and returns the fencing token (None when another process
    holds it); :attr:`value` is what the fenced seal script compares against."""

    def __init__(self, client: redis.Redis, prefix: str, *, ttl_ms: int = LEASE_TTL_MS) -> None:
        self.r = client
        self.key = f"{prefix}:audit:sealer"
        self.fence = f"{prefix}:audit:fence"
        self.ttl_ms = ttl_ms
        # Unique per process and per instance: a restarted process never inherits a lease.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"
        self.token: int | None = None
        self._lock = threading.Lock()
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    @property
    def value(self) -> str:
        return f"{self.token} {self.owner}"

    def acquire(self) -> int | None:
        """Take the lease if it is free or renew it if it is ours; the token, or None (and
        :attr:`token` cleared) when another process holds it."""
        with self._lock:
            token = int(self._acquire(keys=[self.key, self.fence], args=[self.owner, self.ttl_ms]))
            self.token = token or None
            return self.token

    def lost(self) -> None:
        """Forget the token after a fenced write was refused."""
        with self._lock:
            self.token = None

    def release(self) -> None:
        """Give the lease back (if still ours), so another process takes over at once."""
        with self._lock:
            if self.token is not None:
                self._release(keys=[self.key], args=[self.value])
            self.token = None

    def holder(self) -> str | None:
        """The current lease value ``"<token> <owner>"``, or None when nobody holds it."""
        raw = self.r.get(self.key)
        return str(raw) if raw else None
