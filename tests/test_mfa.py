"""Step-up TOTP: RFC vectors, the ±1 window, single use under concurrency, throttling, locking."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pyotp
import pytest

from intake.audit.ledger import Ledger
from intake.core.errors import Refused
from intake.core.models import Approver
from intake.core.policy import load_policy
from intake.core.settings import Settings
from intake.people.approvers import Approvers, SecretBox
from intake.people.mfa import StepUp, Throttle, is_out_of_sync, matching_step, new_secret
from intake.protocol.keyfiles import load_secret
from intake.runtime import EXAMPLE_POLICY
from intake.storage.store import Store
from tests.conftest import VECTORS, FakeClock

TOTP = json.loads((VECTORS / "totp.json").read_text())


@pytest.mark.parametrize("case", TOTP["rfc6238_8digit"], ids=lambda c: f"{c['algorithm']}-{c['unix_time']}")
def test_rfc6238_eight_digit_vectors(case: dict) -> None:
    digest = getattr(hashlib, case["algorithm"].lower())
    totp = pyotp.TOTP(case["secret_base32"], digits=8, interval=30, digest=digest)
    assert totp.generate_otp(case["unix_time"] // 30) == case["code"]


def test_rfc4226_hotp_vectors() -> None:
    hotp = pyotp.HOTP(TOTP["six_digit_sha1_around_1111111111"]["secret_base32"])
    assert [hotp.at(i) for i in range(10)] == TOTP["rfc4226_hotp_counters_0_9"]


def test_six_digit_window_with_rfc_secret() -> None:
    vec = TOTP["six_digit_sha1_around_1111111111"]
    secret, codes, now = vec["secret_base32"], vec["codes"], 1111111111
    step = now // 30
    assert matching_step(secret, codes["1111111111"], now) == step
    assert matching_step(secret, codes["1111111081"], now) == step - 1  # previous step: accepted
    assert matching_step(secret, codes["1111111141"], now) == step + 1  # next step: accepted
    for far in ("1111111051", "1111111171"):  # two steps away: refused, but recognised as drift
        assert matching_step(secret, codes[far], now) is None
        assert is_out_of_sync(secret, codes[far], now)
    assert matching_step(secret, "000000", now) is None and not is_out_of_sync(secret, "000000", now)


def test_leading_zero_codes_stay_strings() -> None:
    vec = TOTP["six_digit_sha1_around_1111111111"]
    assert vec["codes"]["1111111111"] == "050471"
    assert matching_step(vec["secret_base32"], "50471", 1111111111) is None


def test_secrets_are_160_bits_and_unique() -> None:
    secrets_ = {new_secret() for _ in range(100)}
    assert len(secrets_) == 100
    assert all(len(base64.b32decode(s)) == 20 for s in secrets_)


@pytest.fixture
def approvers(store: Store, settings: Settings) -> Approvers:
    return Approvers(store, SecretBox(load_secret(settings, "secrets")), StepUp(store), Ledger(store.audit))


def enrol_alice(approvers: Approvers) -> tuple[Approver, pyotp.TOTP]:
    approvers.add(load_policy(EXAMPLE_POLICY), "alice", name="Alice", groups=("platform",),
                              slack_user="UALICE0001", email=None, actor="cli:root")
    enrolment = approvers.enrol("alice", actor="approver:alice")
    return enrolment.approver, pyotp.parse_uri(enrolment.otpauth_uri)


@pytest.fixture
def alice(approvers: Approvers) -> tuple[Approver, pyotp.TOTP]:
    return enrol_alice(approvers)


def check(approvers: Approvers, approver: Approver, code: str) -> int:
    return approvers.check_code(approver, code, purpose="test", subject="I-000000000000")


def test_code_is_single_use(approvers: Approvers, alice: tuple, clock: FakeClock) -> None:
    approver, totp = alice
    code = totp.at(clock.now)
    assert check(approvers, approver, code) == int(clock.now) // 30
    with pytest.raises(Refused) as err:
        check(approvers, approver, code)
    assert err.value.reason == "replayed"
    # An older code inside the window is a replay too: steps only move forward.
    with pytest.raises(Refused) as err:
        check(approvers, approver, totp.at(clock.now - 30))
    assert err.value.reason == "replayed"
    clock.advance(30)
    assert check(approvers, approver, totp.at(clock.now)) == int(clock.now) // 30


def test_twenty_concurrent_uses_of_one_code_give_one_success(approvers: Approvers, alice: tuple, clock: FakeClock) -> None:
    approver, totp = alice
    code = totp.at(clock.now)

    def attempt(_: int) -> str:
        try:
            check(approvers, approver, code)
            return "ok"
        except Refused as exc:
            return exc.reason

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(attempt, range(20)))
    assert outcomes.count("ok") == 1
    assert set(outcomes) - {"ok"} <= {"replayed", "throttled"}


def wrong(totp: pyotp.TOTP, clock: FakeClock) -> str:
    return "000000" if totp.at(clock.now) != "000000" else "111111"


def wait_until_accepted(approvers: Approvers, approver: Approver, totp: pyotp.TOTP, clock: FakeClock) -> None:
    """Poll (advancing the code's clock) until the throttle window on the server frees a slot."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        clock.advance(30)
        try:
            check(approvers, approver, totp.at(clock.now))
            return
        except Refused as exc:
            assert exc.reason == "throttled"
            time.sleep(0.2)
    pytest.fail("the throttle never lifted")


def test_sixth_wrong_code_is_throttled_without_being_checked(
    store: Store, settings: Settings, clock: FakeClock
) -> None:
    approvers = Approvers(store, SecretBox(load_secret(settings, "secrets")), StepUp(store, Throttle(short_s=1)),
                          Ledger(store.audit))
    approver, totp = enrol_alice(approvers)
    for _ in range(5):
        with pytest.raises(Refused) as err:
            check(approvers, approver, wrong(totp, clock))
        assert err.value.reason == "invalid"
    good = totp.at(clock.now)
    with pytest.raises(Refused, match="try again in") as err:
        check(approvers, approver, good)  # even the right code is not looked at
    assert err.value.reason == "throttled"
    assert store.r.get(store.keys.totp_last_step("alice")) is None  # nothing was consumed
    wait_until_accepted(approvers, approver, totp, clock)


def test_a_shifted_client_clock_gets_no_extra_guesses(approvers: Approvers, alice: tuple, clock: FakeClock) -> None:
    """The caller's clock jumps an hour ahead before every guess: the throttle window is on
    the Redis server's clock, so the sixth guess is still throttled and the 20th still locks."""
    approver, totp = alice
    reasons = []
    for _ in range(25):
        clock.advance(3600)
        try:
            check(approvers, approver, wrong(totp, clock))
        except Refused as exc:
            reasons.append(exc.reason)
    assert reasons[:5] == ["invalid"] * 5 and set(reasons[5:]) == {"throttled"}


def wait_for_short_window_to_clear(store: Store, approver_id: str, short_s: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        secs, micros = store.r.time()
        if not store.r.zcount(store.keys.totp_failures(approver_id), secs + micros / 1e6 - short_s, "+inf"):
            return
        time.sleep(0.1)
    pytest.fail("the short throttle window never cleared")


def test_failures_in_the_long_window_lock_until_unlock(store: Store, settings: Settings, clock: FakeClock) -> None:
    approvers = Approvers(store, SecretBox(load_secret(settings, "secrets")),
                          StepUp(store, Throttle(short_max=5, short_s=1, long_max=10)), Ledger(store.audit))
    approver, totp = enrol_alice(approvers)
    for batch in range(2):
        for _ in range(5):
            with pytest.raises(Refused) as err:
                check(approvers, approver, "abc")
            assert err.value.reason == "invalid"
        if batch == 0:
            wait_for_short_window_to_clear(store, "alice", 1)
    clock.advance(7200)  # the caller's clock means nothing to the lock
    with pytest.raises(Refused) as err:
        check(approvers, approver, totp.at(clock.now))
    assert err.value.reason == "locked" and approvers.is_locked("alice")
    approvers.unlock("alice", actor="cli:root")
    assert check(approvers, approver, totp.at(clock.now))


def test_out_of_sync_is_its_own_reason(approvers: Approvers, alice: tuple, clock: FakeClock) -> None:
    approver, totp = alice
    with pytest.raises(Refused) as err:
        check(approvers, approver, totp.at(clock.now + 120))
    assert err.value.reason == "out_of_sync"


def test_failures_are_audited_without_the_code(approvers: Approvers, alice: tuple, clock: FakeClock, store: Store) -> None:
    approver, totp = alice
    wrong = "123456" if totp.at(clock.now) != "123456" else "654321"
    with pytest.raises(Refused):
        check(approvers, approver, wrong)
    good = totp.at(clock.now)
    check(approvers, approver, good)
    with pytest.raises(Refused):
        check(approvers, approver, good)
    events = [e for e in store.audit.export() if e["action"] == "mfa.refused"]
    assert [e["data"]["reason"] for e in events] == ["invalid", "replayed"]
    dump = json.dumps(list(store.audit.export()))
    assert wrong not in dump and good not in dump


def test_reset_kills_the_old_secret(approvers: Approvers, alice: tuple, clock: FakeClock) -> None:
    approver, old = alice
    approvers.reset("alice", actor="cli:root")
    enrolment = approvers.enrol("alice", actor="approver:alice")
    new = pyotp.parse_uri(enrolment.otpauth_uri)
    refreshed = approvers.get("alice")
    assert not refreshed.confirmed
    with pytest.raises(Refused):
        check(approvers, refreshed, old.at(clock.now))
    clock.advance(30)
    approvers.confirm("alice", new.at(clock.now), actor="approver:alice")
    assert approvers.get("alice").confirmed


def test_secret_is_bound_to_the_record(approvers: Approvers, alice: tuple, store: Store, clock: FakeClock) -> None:
    """Someone who can write Redis re-points alice's record at their own Slack user."""
    approver, totp = alice
    raw = json.loads(store.r.get(store.keys.approver("alice")))
    assert totp.secret not in json.dumps(raw)  # encrypted at rest
    raw["slack_user"] = "UMALLORY01"
    store.r.set(store.keys.approver("alice"), json.dumps(raw))
    with pytest.raises(Refused) as err:
        check(approvers, approvers.get("alice"), totp.at(clock.now))
    assert err.value.reason == "secret_unreadable"


def test_enrolment_must_agree_with_policy(approvers: Approvers) -> None:
    from intake.core.errors import InvalidInput

    policy = load_policy(EXAMPLE_POLICY)
    with pytest.raises(InvalidInput, match="does not list 'alice'"):
        approvers.add(policy, "alice", name="A", groups=("security",), slack_user=None, email=None, actor="x")
    with pytest.raises(InvalidInput, match="no group 'admins'"):
        approvers.add(policy, "alice", name="A", groups=("admins",), slack_user=None, email=None, actor="x")
