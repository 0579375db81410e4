"""Capability tokens: the broker is the only minter; workers hold only the public key.

A token is ``base64url(canonical JSON claims) "." base64url(Ed25519 signature over those bytes)``.
Claims bind the task id, the spec hash, the scope, issue and expiry times and a single-use
nonce. :func:`verify_capability` is what a worker runs before doing anything: signature, expiry,
the spec hash recomputed from the stored spec, the scope, and the nonce not yet burned.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from intake.errors import TokenInvalid
from intake.models import TaskSpec, canonical_json

MAX_TOKEN_LEN = 4096


class Scope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    repo: str
    change_type: str
    branch_prefix: str
    allowed_paths: tuple[str, ...]
    blocked_paths: tuple[str, ...]

    @classmethod
    def of(cls, spec: TaskSpec) -> Scope:
        return cls(
            repo=spec.repo,
            change_type=spec.change_type,
            branch_prefix=spec.branch_prefix,
            allowed_paths=spec.allowed_paths,
            blocked_paths=spec.blocked_paths,
        )


class Claims(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int
    task: str
    spec_hash: str
    scope: Scope
    iat: int
    exp: int
    nonce: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """Strict base64url: only the canonical encoding of the bytes is accepted. Otherwise the
    unused low bits of the last character would let many token strings carry one signature."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("non-canonical base64")
    return data


def mint(key: Ed25519PrivateKey, *, task_id: str, spec: TaskSpec, now: float, ttl_s: int) -> tuple[str, Claims]:
    """Sign a fresh single-use token for ``task_id``'s current spec."""
    claims = Claims(
        v=1,
        task=task_id,
        spec_hash=spec.spec_hash(),
        scope=Scope.of(spec),
        iat=int(now),
        exp=int(now) + ttl_s,
        nonce=secrets.token_urlsafe(18),
    )
    payload = canonical_json(claims.model_dump(mode="json"))
    return f"{_b64(payload)}.{_b64(key.sign(payload))}", claims


def read_claims(token: str) -> Claims:
    """Parse claims WITHOUT verifying: only for burning a nonce on revocation or display."""
    try:
        return Claims.model_validate_json(_unb64(token.split(".", 1)[0]))
    except (ValueError, ValidationError, binascii.Error):
        raise TokenInvalid("malformed", "capability token is malformed") from None


def verify_signature(token: str, public_key: Ed25519PublicKey, *, now: float) -> Claims:
    """Check shape, signature and expiry; return the claims."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN or token.count(".") != 1:
        raise TokenInvalid("malformed", "capability token is malformed")
    payload_b64, sig_b64 = token.split(".")
    try:
        payload, signature = _unb64(payload_b64), _unb64(sig_b64)
    except (ValueError, binascii.Error):
        raise TokenInvalid("malformed", "capability token is malformed") from None
    try:
        public_key.verify(signature, payload)
    except InvalidSignature:
        raise TokenInvalid("bad_signature", "capability token signature is not valid") from None
    try:
        claims = Claims.model_validate_json(payload)
    except ValidationError:
        raise TokenInvalid("malformed", "capability token claims are malformed") from None
    if claims.v != 1:
        raise TokenInvalid("malformed", f"capability token version {claims.v} is not supported")
    if now >= claims.exp:
        raise TokenInvalid("expired", "capability token has expired")
    return claims


def verify_capability(
    token: str,
    public_key: Ed25519PublicKey,
    *,
    task_id: str,
    spec: TaskSpec,
    now: float,
    nonce_burned: Callable[[str], bool],
) -> Claims:
    """Everything a worker checks before it runs a task, with only the public key.

    The spec hash is recomputed from the stored spec, never read from Redis, so a spec edited in
    Redis no longer matches the signed hash. Raises :class:`TokenInvalid` with a reason tag.
    """
    claims = verify_signature(token, public_key, now=now)
    if claims.task != task_id:
        raise TokenInvalid("wrong_task", "capability token is for another task")
    if claims.spec_hash != spec.spec_hash():
        raise TokenInvalid("spec_mismatch", "capability token does not match the stored task spec")
    if claims.scope != Scope.of(spec):
        raise TokenInvalid("scope_mismatch", "capability token scope does not match the task spec")
    if nonce_burned(claims.nonce):
        raise TokenInvalid("burned", "capability token was already used or revoked")
    return claims
