"""Capability tokens: any tampering, another key, expiry, a changed spec or a burned nonce fail."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from intake.errors import TokenInvalid
from intake.models import Limits, RequiredCheck, TaskSpec
from intake.tokens import mint, read_claims, verify_capability

NOW = 1_800_000_000.0


def spec(**changes: object) -> TaskSpec:
    fields: dict = dict(
        idea_id="I-000000000001", prompt="fix the docs", repo="acme/web", base_ref="main",
        change_type="docs", allowed_paths=("**",), blocked_paths=(".github/**",), branch_prefix="intake",
        required_checks=(RequiredCheck(name="ci/test", argv=("true",), timeout_s=60),), limits=Limits(run_timeout_s=60, max_output_bytes=4096),
        policy_version="a" * 64,
    )
    fields.update(changes)
    return TaskSpec(**fields)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def verify(token: str, key: Ed25519PrivateKey, *, s: TaskSpec | None = None, now: float = NOW,
           burned: set[str] | None = None, task: str = "T-000000000001"):
    return verify_capability(token, key.public_key(), task_id=task, spec=s or spec(), now=now,
                             nonce_burned=lambda n: n in (burned or set()))


def reason(fn) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(TokenInvalid) as err:
        fn()
    return err.value.reason


def test_valid_token_verifies(key: Ed25519PrivateKey) -> None:
    token, claims = mint(key, task_id="T-000000000001", spec=spec(), now=NOW, ttl_s=600)
    got = verify(token, key)
    assert got == claims and got.exp == int(NOW) + 600 and got.scope.repo == "acme/web"
    assert got.spec_hash == spec().spec_hash()


def test_every_changed_byte_fails(key: Ed25519PrivateKey) -> None:
    token, _ = mint(key, task_id="T-000000000001", spec=spec(), now=NOW, ttl_s=600)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, ch in enumerate(token):
        swap = "." if ch != "." else "A"
        if ch != ".":
            swap = alphabet[(alphabet.index(ch) + 1) % len(alphabet)]
        tampered = token[:i] + swap + token[i + 1:]
        with pytest.raises(TokenInvalid):
            verify(tampered, key)


def test_another_key_fails(key: Ed25519PrivateKey) -> None:
    token, _ = mint(Ed25519PrivateKey.generate(), task_id="T-000000000001", spec=spec(), now=NOW, ttl_s=600)
    assert reason(lambda: verify(token, key)) == "bad_signature"


def test_expired_token_fails(key: Ed25519PrivateKey) -> None:
    token, _ = mint(key, task_id="T-000000000001", spec=spec(), now=NOW, ttl_s=600)
    assert verify(token, key, now=NOW + 599)
    assert reason(lambda: verify(token, key, now=NOW + 600)) == "expired"


def test_spec_changed_in_storage_fails(key: Ed25519PrivateKey) -> None:
    token, _ = mint(key, task_id="T-000000000001", spec=spec(), now=NOW, ttl_s=600)
    assert reason(lambda: verify(token, key, s=spec(prompt="fix the docs; also rm -rf /"))) == "spec_mismatch"
    assert reason(lambda: verify(token, key, s=spec(blocked_paths=()))) == "spec_mismatch"


def test_wrong_task_and_burned_nonce_fail(key: Ed25519PrivateKey) -> None:
    token, claims = mint(key, task_id="T-000000000001", spec=spec(), now=NOW, ttl_s=600)
    assert reason(lambda: verify(token, key, task="T-000000000002")) == "wrong_task"
    assert reason(lambda: verify(token, key, burned={claims.nonce})) == "burned"
    assert read_claims(token).nonce == claims.nonce


@pytest.mark.parametrize("junk", ["", "abc", "a.b.c", "x" * 5000, "..", "eyJ2IjoxfQ.AAAA"])
def test_malformed_tokens_fail_cleanly(key: Ed25519PrivateKey, junk: str) -> None:
    assert reason(lambda: verify(junk, key)) in {"malformed", "bad_signature"}
