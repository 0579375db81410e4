"""Signed tokens: the broker is the only minter; workers hold only the public keys.

A token is ``base64url(canonical JSON claims) "." base64url(Ed25519 signature over those bytes)``.
Two kinds, told apart by their ``typ`` claim so one can never pass as the other:

* **Dispatch tokens** (``typ = "dispatch"``) are minted per attempt when a task is handed to RQ,
  live about two minutes, and bind the task, the attempt number, the RQ job id, the queue, a
  single-use nonce and the whole frozen spec (so the worker needs no broker record: the spec it
  runs is the one the approvers' spec hash names). The broker's ledger, not Redis, decides
  whether a nonce has been used.
* **Leases** (``typ = "lease"``) keep one running attempt alive: task, attempt, run id and an
  expiry about 15 s out. The broker renews them only while its ledger says the attempt is live;
  a lease with ``status != "granted"`` tells the worker to stop now.

Every token names the key that signed it (``kid``): :class:`Keyring` holds the public keys a
verifier accepts, so ``intake keys rotate`` can introduce a new signing key while tokens signed
with the old one still verify until it is retired.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from intake.core.errors import TokenInvalid
from intake.core.models import TaskSpec, canonical_json

#: A dispatch token carries the spec, whose prompt may be up to INTAKE_MAX_TEXT_BYTES (and more
#: after JSON escaping); anything larger is not ours.
MAX_TOKEN_LEN = 512 * 1024
DISPATCH_TTL_S = 120
LEASE_TTL_S = 15


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the start of the SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Keyring:
    """The public keys a verifier accepts, by key id."""

    keys: dict[str, Ed25519PublicKey]

    @classmethod
    def of(cls, *public_keys: Ed25519PublicKey) -> Keyring:
        return cls({key_id(k): k for k in public_keys})

    def get(self, kid: str) -> Ed25519PublicKey:
        found = self.keys.get(kid)
        if found is None:
            raise TokenInvalid("unknown_key", "token is signed with a key this verifier does not accept")
        return found


class Signer:
    """The broker's signing key and its key id."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.kid = key_id(key.public_key())

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def sign_bytes(self, data: bytes) -> bytes:
        """A raw Ed25519 signature over ``data`` (DSSE envelopes, :mod:`intake.tasks.provenance`)."""
        return self._key.sign(data)

    def sign(self, claims: BaseModel) -> str:
        payload = canonical_json(claims.model_dump(mode="json"))
        return f"{_b64(payload)}.{_b64(self._key.sign(payload))}"


class _Claims(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DispatchClaims(_Claims):
    v: Literal[2]
    typ: Literal["dispatch"]
    kid: str
    task: str
    attempt: int
    job: str
    queue: str
    nonce: str
    spec_hash: str
    spec: TaskSpec
    iat: int
    exp: int
    #: ``run``: run the agent. ``deliver``: push the quarantined commit ``deliver_sha`` (and no
    #: other) to the task branch and open the pull request, ``draft`` for privileged work.
    kind: Literal["run", "deliver"] = "run"
    deliver_sha: str | None = None
    #: A delivery's reviewed diff as the sealed history names it: the run's base commit and the
    #: SHA-256 of the diff from it to ``deliver_sha`` that approvers were shown. The delivery
    #: worker recomputes that diff from the fetched objects and pushes only if it matches.
    #: None for results sealed before diffs were reviewed.
    deliver_base: str | None = Field(None, pattern=r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
    deliver_diff: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    draft: bool = False
    #: A delivery's signed provenance (a DSSE envelope, :mod:`intake.tasks.provenance`) for the worker
    #: to attach as a git note and embed in the pull request.
    provenance: str | None = None


class LeaseClaims(_Claims):
    v: Literal[1]
    typ: Literal["lease"]
    kid: str
    task: str
    attempt: int
    run: str
    status: Literal["granted", "revoked", "frozen", "halted", "refused", "superseded"]
    reason: str = ""
    iat: int
    exp: int

    @property
    def granted(self) -> bool:
        return self.status == "granted"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """Strict base64url: only the canonical encoding of the bytes is accepted. Otherwise the
    unused low bits of the last character would let many token strings carry one signature."""
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("non-canonical base64")
    return data


def mint_dispatch(signer: Signer, *, task_id: str, attempt: int, job_id: str, queue: str, spec: TaskSpec,
                  now: float, ttl_s: int = DISPATCH_TTL_S, deliver_sha: str | None = None,
                  draft: bool = False, provenance: str | None = None,
                  reviewed: tuple[str, str] | None = None) -> tuple[str, DispatchClaims]:
    """Sign a fresh single-use dispatch token for one attempt of ``task_id`` (a delivery
    attempt when ``deliver_sha`` is given: bound to that commit, and with ``reviewed`` =
    (base, diff SHA-256) to the diff the approvers were shown)."""
    claims = DispatchClaims(
        v=2, typ="dispatch", kid=signer.kid, task=task_id, attempt=attempt, job=job_id, queue=queue,
        nonce=secrets.token_urlsafe(18), spec_hash=spec.spec_hash(), spec=spec,
        iat=int(now), exp=int(now) + ttl_s,
        kind="deliver" if deliver_sha else "run", deliver_sha=deliver_sha, draft=draft, provenance=provenance,
        deliver_base=reviewed[0] if reviewed else None, deliver_diff=reviewed[1] if reviewed else None,
    )
    return signer.sign(claims), claims


def mint_lease(signer: Signer, *, task_id: str, attempt: int, run_id: str, now: float,
               status: str = "granted", reason: str = "", ttl_s: int = LEASE_TTL_S) -> tuple[str, LeaseClaims]:
    claims = LeaseClaims(v=1, typ="lease", kid=signer.kid, task=task_id, attempt=attempt, run=run_id,
                         status=status, reason=reason, iat=int(now), exp=int(now) + ttl_s)  # type: ignore[arg-type]
    return signer.sign(claims), claims


def read_kid(token: str) -> str:
    """The key id a token names, WITHOUT verifying it (for display and tests)."""
    try:
        return _peek_kid(_unb64(token.split(".", 1)[0]))
    except (ValueError, binascii.Error):
        raise TokenInvalid("malformed", "token is malformed") from None


def _verified_payload(token: str, keyring: Keyring) -> bytes:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN or token.count(".") != 1:
        raise TokenInvalid("malformed", "token is malformed")
    payload_b64, sig_b64 = token.split(".")
    try:
        payload, signature = _unb64(payload_b64), _unb64(sig_b64)
        kid = _peek_kid(payload)
    except (ValueError, binascii.Error):
        raise TokenInvalid("malformed", "token is malformed") from None
    try:
        keyring.get(kid).verify(signature, payload)
    except InvalidSignature:
        raise TokenInvalid("bad_signature", "token signature is not valid") from None
    return payload


def _peek_kid(payload: bytes) -> str:
    data = json.loads(payload)
    if not isinstance(data, dict) or not isinstance(data.get("kid"), str):
        raise ValueError("no key id")
    return data["kid"]


def verify_dispatch(token: str, keyring: Keyring, *, now: float) -> DispatchClaims:
    """Shape, signature (by key id), kind, expiry and spec integrity of a dispatch token: the
    spec hash is recomputed from the signed spec. Raises :class:`TokenInvalid` with a reason."""
    payload = _verified_payload(token, keyring)
    try:
        claims = DispatchClaims.model_validate_json(payload)
    except ValidationError:
        raise TokenInvalid("malformed", "dispatch token claims are malformed") from None
    if now >= claims.exp:
        raise TokenInvalid("expired", "dispatch token has expired")
    if claims.spec.spec_hash() != claims.spec_hash:
        raise TokenInvalid("spec_mismatch", "dispatch token's spec does not match its spec hash")
    if (claims.kind == "deliver") != (claims.deliver_sha is not None):
        raise TokenInvalid("malformed", "a delivery token names exactly one commit, a run token none")
    if claims.kind == "run" and (claims.provenance, claims.deliver_base, claims.deliver_diff) != (None, None, None):
        raise TokenInvalid("malformed", "only a delivery token carries provenance and a reviewed diff")
    if (claims.deliver_base is None) != (claims.deliver_diff is None):
        raise TokenInvalid("malformed", "a reviewed diff names both its base and its digest")
    return claims


def verify_lease(token: str, keyring: Keyring) -> LeaseClaims:
    """Shape, signature and kind of a lease (its expiry is the caller's to judge: a worker
    counts it on its own monotonic clock from when it first saw the lease)."""
    payload = _verified_payload(token, keyring)
    try:
        return LeaseClaims.model_validate_json(payload)
    except ValidationError:
        raise TokenInvalid("malformed", "lease claims are malformed") from None
