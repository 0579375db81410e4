"""The outbox: slow follow-ups (Slack cards, thread updates) read from the audit stream.

Every state change already appends its audit event in the same MULTI as the change, so the audit
stream *is* a transactional outbox: nothing can change without its follow-up being durably
queued. One Redis consumer group, shared by every broker process, reads it at least once:

- every entry a consumer takes is **leased** to it in the same Lua call that takes it (a sorted
  set, entry id → due time): nobody else touches it until the lease runs out, so two replicas never
  work on one event at once, and a crashed consumer's work is picked up when its leases expire;
- a delivery that failed is rescheduled in that same set with **exponential backoff and full
  jitter** (capped, and never sooner than a Retry-After Slack asked for), so an outage of any
  length only delays follow-ups;
- an outage ends as soon as one delivery gets through: a success makes every failed delivery
  waiting on its backoff due at once (:meth:`Outbox.ack`), and while deliveries are failing a
  **probe** (:meth:`Outbox.probe`, every :data:`PROBE_S`) makes the one due soonest due now, so
  recovery is noticed within seconds even when every retry has backed off to the cap;
- only once an event is older than ``max_age_s`` does a failure give it up: it is acknowledged and
  ``outbox.dropped`` is audited (idea, attempts, last error) and counted in the metrics;
- consumers idle for longer than two leases (dead processes) are removed from the group, after
  their pending entries are handed to a live consumer (``XGROUP DELCONSUMER`` alone would drop
  them).

Entries are MAC-checked before use, so an event written straight into Redis is never acted on.
The age that decides a give-up is the event's own MAC'd timestamp, and a pending entry erased from
the schedule is put back (:meth:`Outbox.reschedule_orphans`), so rewriting the schedule in Redis
can delay or hurry a retry but never get an event dropped. Handlers must be idempotent
(they act on the subject's *current* state); the Slack card, which is not, has its own
reservation (:mod:`intake.channels.slack.cards`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass

import redis

from intake.audit.log import AuditLog
from intake.core.models import AuditEvent

log = logging.getLogger("intake.storage.outbox")

# Take up to ARGV[3] entries whose lease or retry time has come (ZSET score <= now), claim them for
# this consumer and lease them; if none, read new entries and lease those. One atomic call, so an
# entry is never held by two consumers and never handed out without a lease.
# KEYS: stream, due; ARGV: group, consumer, count, now_ms, lease_ms
_TAKE = """
local now, lease, count = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[3])
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, count)
for _, id in ipairs(ids) do
  local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
  if #got == 0 then
    redis.call('ZREM', KEYS[2], id)  -- acknowledged meanwhile, or gone from the stream
  else
    redis.call('ZADD', KEYS[2], now + lease, id)
    out[#out + 1] = got[1]
  end
end
if #out > 0 then return {'due', out} end
local fresh = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count, 'STREAMS', KEYS[1], '>')
if fresh then
  for _, entry in ipairs(fresh[1][2]) do
    redis.call('ZADD', KEYS[2], now + lease, entry[1])
    out[#out + 1] = entry
  end
end
return {'new', out}
"""


#: While deliveries are failing, one of them is tried this often whatever its backoff says.
PROBE_S = 10.0

# A success after failures: every failed delivery still waiting on its backoff becomes due now
# (only moved earlier, never later). KEYS: tries, due; ARGV: now_ms
_RECOVERED = """
local ids = redis.call('HKEYS', KEYS[1])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[2], 'XX', 'LT', ARGV[1], id) end
return #ids
"""


def backoff_delay(failures: int, base: float, cap: float, rand: float) -> float:
    """Seconds to wait after the ``failures``-th failure: full jitter ("AWS backoff") over an
    exponential that doubles from ``base`` up to ``cap``. ``rand`` in [0, 1) is the jitter; the
    delay never drops below ``base / 2`` so a burst of failures cannot spin."""
    ceiling = min(cap, base * 2 ** min(max(failures - 1, 0), 62))
    return max(base / 2, ceiling * rand)


def _jitter() -> float:
    return secrets.randbelow(1 << 30) / (1 << 30)


@dataclass(frozen=True)
class Delivery:
    id: str
    event: AuditEvent


class Outbox:
    """One consumer of the audit stream in consumer group ``group``.

    ``retry_ms`` is the first retry's delay, ``retry_cap_s`` the longest, ``max_age_s`` how old an
    event may get before a failure gives it up, ``lease_s`` how long a taken delivery is this
    consumer's alone."""

    def __init__(
        self,
        audit: AuditLog,
        group: str,
        *,
        consumer: str | None = None,
        retry_ms: int = 5000,
        retry_cap_s: float = 300.0,
        max_age_s: float = 86400.0,
        lease_s: float = 60.0,
    ) -> None:
        self.audit = audit
        self.r = audit.r
        self.group = group
        # Unique per process: two brokers on one host must not share (and double-deliver) a PEL.
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.retry_s = retry_ms / 1000
        self.retry_cap_s = max(retry_cap_s, self.retry_s)
        self.max_age_s = max_age_s
        self.lease_s = lease_s
        prefix = audit.stream.removesuffix(":audit")
        self.due_key = f"{prefix}:outbox:{group}:due"  # entry id -> when it may be taken (ms)
        self.tries_key = f"{prefix}:outbox:{group}:tries"  # entry id -> {"n": failures, "error": last}
        self._take = self.r.register_script(_TAKE)
        self._recovered = self.r.register_script(_RECOVERED)
        self._next_reap = 0.0
        self._next_probe = 0.0

    def ensure_group(self, start: str = "0") -> None:
        """Create the group, if it does not exist yet, at ``start``: the start of the stream
        (handlers skip what is already done), or ``$`` for a group that must act only on events
        from its creation on (one whose past deliveries were made some other way)."""
        try:
            self.r.xgroup_create(self.audit.stream, self.group, id=start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _parse(self, entries: list[tuple[str, dict[str, str]]]) -> list[Delivery]:
        out = []
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream while pending
                self._done(entry_id)
                continue
            event = self.audit.parse_entry(fields)
            if event is None:
                log.warning("outbox: ignoring event %s with a bad MAC", entry_id)
                self._done(entry_id)
                continue
            out.append(Delivery(entry_id, event.model_copy(update={"id": entry_id})))
        return out

    def _take_now(self, count: int) -> tuple[str, list[tuple[str, dict[str, str]]]]:
        kind, raw = self._take(keys=[self.audit.stream, self.due_key],
                               args=[self.group, self.consumer, count, int(time.time() * 1000),
                                     int(self.lease_s * 1000)])
        entries = []
        for entry_id, flat in raw:
            flat = flat or []
            entries.append((entry_id, dict(zip(flat[::2], flat[1::2], strict=True))))
        return kind, entries

    def fetch(self, count: int = 50, block_ms: int = 1000) -> list[Delivery]:
        """Deliveries whose retry (or a dead consumer's lease) has come due first, then new
        events, each leased to this consumer for ``lease_s``; waits up to ``block_ms`` for new
        events when there is nothing to do."""
        if time.monotonic() >= self._next_reap:
            self._next_reap = time.monotonic() + self.lease_s
            self.reap_dead_consumers()
            self.reschedule_orphans()
        kind, entries = self._take_now(count)
        if not entries and block_ms > 0:
            # Wait for the stream to grow past what the group has seen (a plain XREAD: the group
            # read itself must stay inside the Lua call that leases what it reads).
            last = self.r.xinfo_stream(self.audit.stream)["last-generated-id"]
            self.r.xread({self.audit.stream: last}, count=1, block=block_ms)
            kind, entries = self._take_now(count)
        return self._parse(entries)

    def _done(self, entry_id: str) -> bool:
        """Acknowledge and unschedule; False when it was not pending any more."""
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(self.audit.stream, self.group, entry_id)
        pipe.zrem(self.due_key, entry_id)
        pipe.hdel(self.tries_key, entry_id)
        return bool(pipe.execute()[0])

    def ack(self, delivery: Delivery) -> None:
        """Done with it: acknowledged and off the schedule. When other deliveries are waiting
        on a backoff, this success says the far side is back: they are all due now (the
        notifier's pacer still spaces the calls)."""
        self._done(delivery.id)
        if self.r.hlen(self.tries_key):
            moved = int(self._recovered(keys=[self.tries_key, self.due_key], args=[int(time.time() * 1000)]))
            if moved:
                log.info("outbox: a delivery got through; %d waiting deliveries are due now", moved)

    def probe(self) -> bool:
        """While deliveries are failing, make the one due soonest due now, at most once every
        :data:`PROBE_S` seconds: one early try that, when it gets through, brings the rest
        forward (:meth:`ack`). Returns True when it moved one."""
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + PROBE_S
        failing = self.r.hkeys(self.tries_key)
        if not failing:
            return False
        scores = self.r.zmscore(self.due_key, failing)
        waiting = [(score, entry) for entry, score in zip(failing, scores, strict=True)
                   if score is not None and score > time.time() * 1000]
        if not waiting:
            return False
        _, first = min(waiting)
        self.r.zadd(self.due_key, {first: int(time.time() * 1000)}, xx=True, lt=True)
        return True

    def hand_back(self, deliveries: list[Delivery]) -> None:
        """Deliveries taken but not started: due now, for whichever consumer comes first."""
        if deliveries:
            self.r.zadd(self.due_key, {d.id: int(time.time() * 1000) for d in deliveries}, xx=True)

    def attempts(self, delivery: Delivery) -> int:
        """How many deliveries of this event have failed so far."""
        raw = self.r.hget(self.tries_key, delivery.id)
        try:
            return int(json.loads(raw)["n"]) if raw else 0
        except (ValueError, KeyError, TypeError):  # rewritten in Redis: count from scratch
            return 0

    def later(self, delivery: Delivery, seconds: float) -> None:
        """Try again in ``seconds`` without counting a failure (someone else holds it now)."""
        self.r.zadd(self.due_key, {delivery.id: int((time.time() + max(seconds, 0.01)) * 1000)})

    def failed(self, delivery: Delivery, error: str, *, retry_after: float | None = None) -> bool:
        """Schedule a retry with backoff (at least ``retry_after`` seconds when Slack said so),
        or, once the event is older than ``max_age_s``, give it up: acknowledge it and audit
        ``outbox.dropped``. ``error`` names what failed (an error code or exception type, never a
        message body or token). Returns True when it was given up."""
        failures = self.attempts(delivery) + 1
        age = time.time() - delivery.event.at
        if age >= self.max_age_s:
            if not self._done(delivery.id):
                return True  # someone else finished it (or gave it up) meanwhile
            self.audit.record(
                "system", "outbox.dropped", delivery.event.subject,
                group=self.group, event=delivery.id, event_action=delivery.event.action,
                attempts=failures, age_s=int(age), error=error,
            )
            log.error("outbox gave up on %s %s after %d attempts (%s)", delivery.event.action,
                      delivery.event.subject, failures, error)
            return True
        delay = backoff_delay(failures, self.retry_s, self.retry_cap_s, _jitter())
        if retry_after is not None:
            delay = max(delay, retry_after)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.tries_key, delivery.id, json.dumps({"n": failures, "error": error}))
        pipe.zadd(self.due_key, {delivery.id: int((time.time() + delay) * 1000)})
        pipe.execute()
        return False

    def reschedule_orphans(self) -> int:
        """Make every pending entry missing from the schedule (and idle for two leases) due now.
        Every entry is leased in the call that takes it and unscheduled only in the transaction
        that acknowledges it, so a pending entry without a due time was erased from the schedule
        in Redis: rewriting the schedule delays a delivery, never drops it. Returns how many were
        rescheduled."""
        # Idle for two leases, like a dead consumer's: a consumer that read an entry but died
        # before leasing it (an older broker) is left to reap_dead_consumers.
        found, start, idle_ms = 0, "-", int(self.lease_s * 2000)
        while True:
            try:
                pending = self.r.xpending_range(self.audit.stream, self.group, min=start, max="+", count=500,
                                                idle=idle_ms)
            except redis.ResponseError:  # no group yet
                return found
            if not pending:
                return found
            ids = [p["message_id"] for p in pending]
            found += int(self.r.zadd(self.due_key, {i: int(time.time() * 1000) for i in ids}, nx=True))
            if len(ids) < 500:
                return found
            start = f"({ids[-1]}"

    def reap_dead_consumers(self) -> list[str]:
        """Remove consumers idle for more than two leases (their process is gone: a live one
        reads at least every lease). Their pending entries are first claimed by this consumer
        and scheduled now, so nothing they held is lost. Returns the names removed."""
        try:
            consumers = self.r.xinfo_consumers(self.audit.stream, self.group)
        except redis.ResponseError:  # no group yet
            return []
        removed = []
        dead_ms = int(self.lease_s * 2000)
        for consumer in consumers:
            name = str(consumer["name"])
            if name == self.consumer or int(consumer["idle"]) < dead_ms:
                continue
            while True:
                pending = self.r.xpending_range(self.audit.stream, self.group, min="-", max="+",
                                                count=100, consumername=name)
                if not pending:
                    break
                ids = [p["message_id"] for p in pending]
                pipe = self.r.pipeline(transaction=True)
                pipe.xclaim(self.audit.stream, self.group, self.consumer, 0, ids, justid=True)
                # Leased ones keep their time; entries it read but never leased are due now.
                pipe.zadd(self.due_key, {i: int(time.time() * 1000) for i in ids}, nx=True)
                pipe.execute()
            self.r.xgroup_delconsumer(self.audit.stream, self.group, name)
            removed.append(name)
            log.info("outbox: removed dead consumer %s", name)
        return removed
