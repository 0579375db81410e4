"""Dispatch tokens and leases: any tampering, another or unknown key, expiry, a changed spec or
the wrong kind of token fail; rotation keeps old tokens verifiable until the key is retired."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from intake.core.errors import TokenInvalid
from intake.core.models import Limits, RequiredCheck, TaskSpec, canonical_json
from intake.protocol.tokens import Keyring, Signer, mint_dispatch, mint_lease, verify_dispatch, verify_lease

NOW = 1_800_000_000.0


def spec(**changes: object) -> TaskSpec:
    fields: dict = dict(
        idea_id="I-000000000001", prompt="fix the docs", repo="acme/web", base_ref="main",
        change_type="docs", change_type_paths=("docs/**",), allowed_paths=("**",),
        blocked_paths=(".github/**",), branch_prefix="intake",
        required_checks=(RequiredCheck(name="ci/test", argv=("true",), timeout_s=60),),
        limits=Limits(run_timeout_s=60, max_output_bytes=4096),
        policy_version="a" * 64,
    )
    fields.update(changes)
    return TaskSpec(**fields)


@pytest.fixture
def signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


def ring(*signers: Signer) -> Keyring:
    return Keyring.of(*(s.public_key() for s in signers))


def dispatch(signer: Signer, **over: object) -> tuple[str, object]:
    args: dict = dict(task_id="T-000000000001", attempt=1, job_id="T-000000000001_1", queue="tier-standard",
                      spec=spec(), now=NOW, ttl_s=120)
    args.update(over)
    return mint_dispatch(signer, **args)


def reason(fn) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(TokenInvalid) as err:
        fn()
    return err.value.reason


def _resign(token: str, signer: Signer, change) -> str:  # type: ignore[no-untyped-def]
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    change(payload)
    raw = canonical_json(payload)
    return (base64.urlsafe_b64encode(raw).rstrip(b"=").decode() + "."
            + base64.urlsafe_b64encode(signer._key.sign(raw)).rstrip(b"=").decode())


def test_dispatch_token_binds_task_attempt_job_queue_and_spec(signer: Signer) -> None:
    token, claims = dispatch(signer)
    got = verify_dispatch(token, ring(signer), now=NOW + 1)
    assert got == claims
    assert (got.task, got.attempt, got.job, got.queue, got.kid) == (
        "T-000000000001", 1, "T-000000000001_1", "tier-standard", signer.kid)
    assert got.spec == spec() and got.spec_hash == spec().spec_hash()


def test_every_character_of_the_token_matters(signer: Signer) -> None:
    token, _ = dispatch(signer)
    for i in range(0, len(token), max(1, len(token) // 40)):
        flipped = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        assert reason(lambda flipped=flipped: verify_dispatch(flipped, ring(signer), now=NOW)) in {"malformed", "bad_signature",
                                                                                   "unknown_key"}


def test_other_key_unknown_key_and_expiry(signer: Signer) -> None:
    other = Signer(Ed25519PrivateKey.generate())
    token, _ = dispatch(other)
    assert reason(lambda: verify_dispatch(token, ring(signer), now=NOW)) == "unknown_key"
    forged = _resign(dispatch(other)[0], other, lambda p: p.update(kid=signer.kid))
    assert reason(lambda: verify_dispatch(forged, ring(signer), now=NOW)) == "bad_signature"
    token, _ = dispatch(signer)
    assert reason(lambda: verify_dispatch(token, ring(signer), now=NOW + 120)) == "expired"


def test_a_spec_changed_under_the_signature_is_refused(signer: Signer) -> None:
    token, _ = dispatch(signer)
    edited = _resign(token, signer, lambda p: p["spec"].update(prompt="rm -rf"))
    assert reason(lambda: verify_dispatch(edited, ring(signer), now=NOW)) == "spec_mismatch"


def test_a_lease_is_no_dispatch_token_and_the_reverse(signer: Signer) -> None:
    lease, _ = mint_lease(signer, task_id="T-000000000001", attempt=1, run_id="r" * 32, now=NOW)
    assert reason(lambda: verify_dispatch(lease, ring(signer), now=NOW)) == "malformed"
    token, _ = dispatch(signer)
    assert reason(lambda: verify_lease(token, ring(signer))) == "malformed"
    got = verify_lease(lease, ring(signer))
    assert got.granted and got.exp - got.iat == 15
    refused, _ = mint_lease(signer, task_id="T-000000000001", attempt=1, run_id="r" * 32, now=NOW, status="revoked")
    assert not verify_lease(refused, ring(signer)).granted


def test_rotation_keeps_old_tokens_valid_until_retired(signer: Signer) -> None:
    new = Signer(Ed25519PrivateKey.generate())
    old_token, _ = dispatch(signer)
    new_token, _ = dispatch(new)
    both = ring(new, signer)
    assert verify_dispatch(old_token, both, now=NOW).kid == signer.kid
    assert verify_dispatch(new_token, both, now=NOW).kid == new.kid
    assert reason(lambda: verify_dispatch(old_token, ring(new), now=NOW)) == "unknown_key"


def test_oversize_and_malformed_tokens(signer: Signer) -> None:
    for bad in ["", "a", "a.b.c", "x" * (600 * 1024), "!!.!!"]:
        assert reason(lambda b=bad: verify_dispatch(b, ring(signer), now=NOW)) == "malformed"


def test_a_delivery_token_carries_its_reviewed_diff_whole_and_a_run_token_none(signer: Signer) -> None:
    base, commit, digest = "b" * 40, "c" * 40, "d" * 64
    token, _ = dispatch(signer, deliver_sha=commit, reviewed=(base, digest))
    got = verify_dispatch(token, ring(signer), now=NOW)
    assert (got.kind, got.deliver_sha, got.deliver_base, got.deliver_diff) == ("deliver", commit, base, digest)
    # Signed by the broker's key but shaped wrong: half a reviewed diff, or one on a run token.
    half = _resign(token, signer, lambda p: p.update(deliver_diff=None))
    assert reason(lambda: verify_dispatch(half, ring(signer), now=NOW)) == "malformed"
    run, _ = dispatch(signer)
    on_run = _resign(run, signer, lambda p: p.update(deliver_base=base, deliver_diff=digest))
    assert reason(lambda: verify_dispatch(on_run, ring(signer), now=NOW)) == "malformed"
    not_hex = _resign(token, signer, lambda p: p.update(deliver_base="--upload-pack=x" + "0" * 25))
    assert reason(lambda: verify_dispatch(not_hex, ring(signer), now=NOW)) == "malformed"
