"""Step-up MFA: RFC 6238 TOTP (6 digits, 30 s, SHA-1, ±1 step) with single use and throttling.

Order of a check (the TOTP habits of pypi/warehouse and django-otp, tightened):

1. **Locked?** An approver past the hourly failure limit stays locked until ``approver unlock``.
2. **Throttle before checking.** An attempt first reserves a slot in the approver's failure
   window, atomically in Lua and on the Redis server's clock (``TIME``), so a caller's shifted
   clock changes nothing; past 5 in 5 minutes the code is not even looked at. The slot is
   given back only on success, so concurrent guesses cannot slip past the limit.
3. **Check.** Codes are strings of exactly six ASCII digits, compared in constant time against the
   previous, current and next step. A code that would match 2-10 steps away is reported as
   *out of sync* (still refused).
4. **Consume.** The matched time step must be greater than the last accepted one; the
   compare-and-set is a Lua script, so of many concurrent uses of one code exactly one wins.

Every refusal is audited with its reason; the code itself is never logged or stored.

**Throttles strangers cannot aim.** The approver's own failure window and lock above count only
codes sent by a caller already authenticated as that approver (their session, socket user, own
token, Slack id): :meth:`StepUp.verify`. A sign-in is not yet anybody, so :meth:`StepUp.verify_signin`
counts its failures per source address, per (source, approver id) pair and under one global
ceiling, never on the approver: a thousand anonymous wrong codes for ``alice`` throttle the
source that sent them and leave alice's own step-up alone. Sign-in answers are the same for ids
that exist and ids that do not (an unknown id is checked against a throwaway secret).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

import pyotp

from intake.core.errors import Refused
from intake.core.models import Approver
from intake.storage.store import Store

DIGITS = 6
PERIOD = 30
WINDOW = 1  # steps either side accepted (RFC 6238 §5.2 recommends at most one)
SYNC_REACH = 10  # steps either side checked only to say "out of sync"
_CODE = re.compile(r"[0-9]{6}")  # ASCII digits only (\d admits other scripts), used with fullmatch

# Throttle windows are measured on the Redis server's clock (TIME), never the caller's: a client
# with a shifted clock gets no extra guesses. Every time calculation happens in these scripts.
_RESERVE = """
-- KEYS: failures zset, lock key. ARGV: short window, short max, long window, long max, member
-- Returns {verdict, seconds until the short window frees a slot}.
if redis.call('EXISTS', KEYS[2]) == 1 then return {'locked', 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  redis.call('SET', KEYS[2], t[1])
  return {'locked', 0}
end
local recent = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[1]), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf') >= tonumber(ARGV[2]) then
  return {'throttled', math.floor(tonumber(recent[2]) + tonumber(ARGV[1]) - now) + 1}
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {'ok', 0}
"""

# After a failure: lock the approver once the long window holds ``long max`` failures.
_LOCK = """
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[2], redis.call('TIME')[1])
return 1
"""

_CONSUME = """
local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) <= last then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


# Anonymous sign-in: reserve one slot in each window (source, pair, global) or none. Never locks.
# KEYS: the zsets. ARGV: member, then (window s, max) per key. Returns {verdict, seconds}.
_RESERVE_ANON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i, key in ipairs(KEYS) do
  local window, max = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= max then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return {'throttled', math.floor(tonumber(oldest[2]) + window - now) + 1}
  end
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('EXPIRE', key, ARGV[2 * i])
end
return {'ok', 0}
"""


def new_secret() -> str:
    """A fresh 160-bit TOTP secret from the CSPRNG, base32 (RFC 4226 §4, RFC 6238 §5.1)."""
    return base64.b32encode(secrets.token_bytes(20)).decode()


def provisioning_uri(secret: str, account: str, issuer: str = "intake") -> str:
    return pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD).provisioning_uri(
        name=account, issuer_name=issuer
    )


def matching_step(secret: str, code: str, now: float, window: int = WINDOW) -> int | None:
    """The time step whose code equals ``code`` within ±``window`` steps of ``now``, else None.

    Every candidate is compared (constant time each) so timing does not tell which step matched.
    """
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD)
    current = totp.timecode(int(now))
    found = None
    for offset in range(-window, window + 1):
        candidate = totp.generate_otp(current + offset)
        if hmac.compare_digest(candidate.encode(), code.encode()) and found is None:
            found = current + offset
    return found


def is_out_of_sync(secret: str, code: str, now: float) -> bool:
    """True when ``code`` matches 2-10 steps away: the device clock drifted (still refused)."""
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=PERIOD)
    current = totp.timecode(int(now))
    return any(
        hmac.compare_digest(totp.generate_otp(current + off).encode(), code.encode())
        for off in range(-SYNC_REACH, SYNC_REACH + 1)
        if abs(off) > WINDOW
    )


@dataclass(frozen=True)
class Throttle:
    """Failure limits per approver: ``short_max`` in ``short_s``, then ``long_max`` in ``long_s``
    locks the approver until an operator unlocks them."""

    short_max: int = 5
    short_s: int = 300
    long_max: int = 20
    long_s: int = 3600


@dataclass(frozen=True)
class SigninThrottle:
    """Failure limits for sign-in by people not yet authenticated: per source address, per
    (source, approver id) and a global ceiling. None of them touches the approver's own window."""

    per_pair_max: int = 5
    per_source_max: int = 30
    global_max: int = 600
    window_s: int = 300


SIGNIN_REFUSED = "sign-in failed: the id, the code or the passkey is not valid"

_MESSAGES = {
    "invalid": "the authenticator code is not valid",
    "out_of_sync": "the authenticator code is for another time; check the device's clock",
    "replayed": "that authenticator code was already used; wait for the next one",
}


class StepUp:
    """Verifies an approver's TOTP code against Redis-held single-use and throttle state."""

    def __init__(self, store: Store, throttle: Throttle = Throttle(),
                 signin: SigninThrottle = SigninThrottle()) -> None:
        self.store = store
        self.throttle = throttle
        self.signin = signin
        self._reserve = store.r.register_script(_RESERVE)
        self._reserve_anon = store.r.register_script(_RESERVE_ANON)
        # An unknown id is checked against this, so it costs the same as a known one.
        self._decoy = new_secret()
        self._consume = store.r.register_script(_CONSUME)
        self._lock = store.r.register_script(_LOCK)

    def _refuse(self, approver: Approver, reason: str, message: str, purpose: str, subject: str) -> Refused:
        self.store.audit.record(
            f"approver:{approver.id}", "mfa.refused", subject, reason=reason, purpose=purpose
        )
        return Refused(reason, message)

    def verify(self, approver: Approver, secret: str, code: str, *, purpose: str, subject: str) -> int:
        """Accept ``code`` once, or raise :class:`Refused` (reason: locked, throttled, invalid,
        out_of_sync, replayed). Returns the consumed time step."""
        keys = self.store.keys
        now = self.store.clock()  # the code's time step only; throttles use the server's clock
        t = self.throttle
        slot = secrets.token_hex(8)
        fails, lock = keys.totp_failures(approver.id), keys.totp_lock(approver.id)
        verdict, resets_in = self._reserve(keys=[fails, lock],
                                           args=[t.short_s, t.short_max, t.long_s, t.long_max, slot])
        if verdict == "locked":
            raise self._refuse(
                approver, "locked",
                f"approver {approver.id} is locked after too many failed codes; "
                f"an operator must run `intake approver unlock {approver.id}`",
                purpose, subject,
            )
        if verdict == "throttled":
            raise self._refuse(
                approver, "throttled",
                f"too many failed codes for {approver.id}; try again in {resets_in} s",
                purpose, subject,
            )
        reason = "invalid"
        step = matching_step(secret, code, now) if _CODE.fullmatch(code) else None
        if step is not None:
            if self._consume(keys=[keys.totp_last_step(approver.id)], args=[step]):
                self.store.r.zrem(fails, slot)  # success gives the reserved slot back
                return step
            reason = "replayed"
            last = int(self.store.r.get(keys.totp_last_step(approver.id)) or step)
            due = max(1, int((last + 1) * PERIOD - now) + 1)
            refusal = self._refuse(approver, reason, f"that authenticator code was already used (a code works "
                                   f"once); the next one is due in {due} s", purpose, subject)
            if self._lock(keys=[fails, lock], args=[t.long_max]):
                self.store.audit.record("system", "approver.locked", approver.id, failures=t.long_max)
            raise refusal
        elif _CODE.fullmatch(code) and is_out_of_sync(secret, code, now):
            reason = "out_of_sync"
        # The reserved slot stays as the recorded failure.
        refusal = self._refuse(approver, reason, _MESSAGES[reason], purpose, subject)
        if self._lock(keys=[fails, lock], args=[t.long_max]):
            self.store.audit.record("system", "approver.locked", approver.id, failures=t.long_max)
        raise refusal

    def verify_signin(self, approver: Approver | None, secret: str | None, code: str, *, approver_id: str,
                      source: str) -> int:
        """A sign-in code from someone not yet authenticated (see the module docstring). Throttled
        per ``source``, per (``source``, ``approver_id``) and globally, never on the approver; the
        matched step is consumed like any other (a code works once). Every refusal raises
        :class:`Refused` with the same reason and message whether or not ``approver_id`` exists."""
        keys = self.store.keys
        t = self.signin
        src = hashlib.sha256(source.encode()).hexdigest()[:32]
        pair = hashlib.sha256(f"{source}|{approver_id}".encode()).hexdigest()[:32]
        zsets = [f"{keys.p}:signin:fail:src:{src}", f"{keys.p}:signin:fail:pair:{pair}", f"{keys.p}:signin:fail:all"]
        slot = secrets.token_hex(8)
        verdict, resets_in = self._reserve_anon(
            keys=zsets, args=[slot, t.window_s, t.per_source_max, t.window_s, t.per_pair_max, t.window_s, t.global_max])
        if verdict == "throttled":
            # Not audited: a stranger could otherwise write to the log at request rate. The
            # refusals that reached the check are (at most the throttles' worth).
            raise Refused("throttled", f"too many failed sign-ins from here; try again in {resets_in} s")
        step = None
        if _CODE.fullmatch(code):
            step = matching_step(secret if approver is not None and secret else self._decoy, code, self.store.clock())
        if step is not None and approver is not None and secret:
            if self._consume(keys=[keys.totp_last_step(approver.id)], args=[step]):
                pipe = self.store.r.pipeline(transaction=False)
                for key in zsets:
                    pipe.zrem(key, slot)
                pipe.execute()
                return step
        # The slots stay as the recorded failure; nothing is recorded against the approver.
        self.store.audit.record("anonymous", "signin.refused", "console", source=src[:12])
        raise Refused("signin_failed", SIGNIN_REFUSED)
