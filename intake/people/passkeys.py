"""Passkeys (WebAuthn) as a phishing-resistant step-up, per approver, beside TOTP.

**Registration.** A signed-in approver asks for creation options; the challenge is random, held
in Redis for :data:`CHALLENGE_TTL_S` and usable once. The browser's attestation is verified
(origin, RP id, challenge) by the ``webauthn`` package, and the credential's public key and
sign count are stored in the approver's passkey hash, MAC'd with the broker's record key (a
credential written into Redis by anyone else is ignored) and audited.

**Assertion bound to one action.** The challenge of an assertion is never a bare random value:

    challenge = SHA-256("intake-passkey-v1" | nonce | canonical[approver, action, subject, bound])

where ``nonce`` is 32 random bytes the broker keeps (single use, short TTL), ``action`` is what is
being done (``promote``, ``approve``, ``signin``, ``thaw``), ``subject`` the idea or task id, and
``bound`` the spec hash (or result SHA) being approved. The verifier recomputes the challenge from
what is being approved *now*, so an assertion made for one spec hash cannot approve another, nor
another task, nor the same one twice; editing the stored challenge record in Redis does not help,
because the signed challenge commits to the original values. Origin, RP id, user presence and the
sign count (a counter that goes backwards means a cloned authenticator) are checked too.

Every refusal is audited as ``mfa.refused`` with a ``passkey_*`` reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import webauthn
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url, options_to_json
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from intake.core.errors import Refused
from intake.core.models import Approver, canonical_json
from intake.storage.store import Pipe, Store

CHALLENGE_TTL_S = 120
MAX_PASSKEYS = 10
_DOMAIN = b"intake-passkey-v1"


@dataclass(frozen=True)
class PasskeyProof:
    """A WebAuthn assertion (the browser's ``PublicKeyCredential`` JSON) answering the
    challenge the broker issued as ``challenge_id``. Step-up input beside a TOTP code."""

    challenge_id: str
    credential: dict[str, Any]


@dataclass(frozen=True)
class StoredPasskey:
    id: str  # the credential id, base64url
    public_key: str  # COSE key, base64url
    sign_count: int
    created_at: float
    mac: str = ""

    def fields(self, approver_id: str) -> dict[str, Any]:
        return {"approver": approver_id, "id": self.id, "public_key": self.public_key,
                "sign_count": self.sign_count, "created_at": self.created_at}


def rp_id_of(origin: str) -> str:
    """The WebAuthn relying-party id for a console origin: its host."""
    return urlsplit(origin).hostname or ""


def bound_challenge(nonce: bytes, approver_id: str, action: str, subject: str, bound: str) -> bytes:
    """The challenge an assertion must sign for ``action`` on ``subject`` at ``bound``."""
    return hashlib.sha256(_DOMAIN + b"|" + nonce + b"|" + canonical_json([approver_id, action, subject, bound])).digest()


class Passkeys:
    """Registration and verification of approvers' passkeys (see the module docstring)."""

    def __init__(self, store: Store, *, origin: str, rp_name: str = "intake") -> None:
        self.store = store
        self.origin = origin
        self.rp_id = rp_id_of(origin)
        self.rp_name = rp_name

    # -- stored credentials ----------------------------------------------------------------
    def list(self, approver_id: str) -> list[StoredPasskey]:
        """The approver's passkeys whose MAC holds (anything else in the hash is ignored)."""
        raw = self.store.r.hgetall(self.store.keys.passkeys(approver_id))
        found = [self._parse(approver_id, value) for value in raw.values()]
        return sorted((p for p in found if p is not None), key=lambda p: p.created_at)

    def _parse(self, approver_id: str, raw: str | None) -> StoredPasskey | None:
        if raw is None:
            return None
        try:
            passkey = StoredPasskey(**json.loads(raw))
        except (TypeError, ValueError):
            return None
        if not self.store.audit.record_ok("passkey", passkey.fields(approver_id), passkey.mac):
            return None
        return passkey

    def _sealed(self, approver_id: str, passkey: StoredPasskey) -> str:
        """The stored JSON of ``passkey`` with a fresh MAC (the sign count is covered too)."""
        mac = self.store.audit.record_mac("passkey", passkey.fields(approver_id))
        return json.dumps({"id": passkey.id, "public_key": passkey.public_key, "sign_count": passkey.sign_count,
                           "created_at": passkey.created_at, "mac": mac})

    def forget(self, pipe: Pipe, approver_id: str) -> None:
        """Drop every passkey of an approver, in the caller's MULTI (removal, re-enrolment)."""
        pipe.delete(self.store.keys.passkeys(approver_id))

    # -- challenges ------------------------------------------------------------------------
    def _issue(self, record: dict[str, Any]) -> tuple[str, bytes]:
        challenge_id = secrets.token_urlsafe(18)
        nonce = secrets.token_bytes(32)
        record = {**record, "nonce": base64.b64encode(nonce).decode()}
        self.store.r.set(self.store.keys.passkey_challenge(challenge_id), json.dumps(record), ex=CHALLENGE_TTL_S)
        return challenge_id, nonce

    def _take(self, approver: Approver, challenge_id: str, kind: str, action: str, subject: str) -> dict[str, Any]:
        """The challenge record, consumed (GETDEL: of two uses, one wins), or Refused."""
        if not isinstance(challenge_id, str) or not 1 <= len(challenge_id) <= 64:
            raise self._refuse(approver, "passkey_challenge_unknown", action, subject)
        raw = self.store.r.getdel(self.store.keys.passkey_challenge(challenge_id))
        record = json.loads(raw) if raw else None
        if not isinstance(record, dict) or record.get("kind") != kind:
            raise self._refuse(approver, "passkey_challenge_unknown", action, subject)
        return record

    def _refuse(self, approver: Approver, reason: str, action: str, subject: str) -> Refused:
        self.store.audit.record(f"approver:{approver.id}", "mfa.refused", subject, reason=reason,
                                purpose=action, factor="passkey")
        messages = {
            "passkey_challenge_unknown": "that passkey challenge expired or was already used; try again",
            "passkey_challenge_mismatch": "that passkey assertion was made for something else; review it again",
            "passkey_unknown_credential": "that passkey is not registered for you",
            "passkey_invalid": "the passkey assertion did not verify",
            "passkey_limit": f"you already have {MAX_PASSKEYS} passkeys; remove one first",
        }
        return Refused(reason, messages[reason])

    # -- registration ----------------------------------------------------------------------
    def registration_options(self, approver: Approver) -> tuple[str, dict[str, Any]]:
        """``(challenge_id, PublicKeyCredentialCreationOptions as JSON)`` for the browser."""
        challenge_id, nonce = self._issue({"kind": "register", "approver": approver.id})
        options = webauthn.generate_registration_options(
            rp_id=self.rp_id, rp_name=self.rp_name, user_name=approver.id, user_display_name=approver.name,
            user_id=hashlib.sha256(b"intake-user|" + approver.id.encode()).digest()[:16],
            challenge=nonce,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED,
                user_verification=UserVerificationRequirement.REQUIRED,
            ),
            exclude_credentials=[PublicKeyCredentialDescriptor(id=base64url_to_bytes(p.id))
                                 for p in self.list(approver.id)],
        )
        return challenge_id, json.loads(options_to_json(options))

    def register(self, approver: Approver, challenge_id: str, credential: dict[str, Any], *, actor: str) -> StoredPasskey:
        """Verify an attestation against the challenge issued to this approver and store it."""
        record = self._take(approver, challenge_id, "register", "passkey_register", approver.id)
        if record.get("approver") != approver.id:
            raise self._refuse(approver, "passkey_challenge_mismatch", "passkey_register", approver.id)
        if len(self.list(approver.id)) >= MAX_PASSKEYS:
            raise self._refuse(approver, "passkey_limit", "passkey_register", approver.id)
        try:
            verified = webauthn.verify_registration_response(
                credential=credential, expected_challenge=base64.b64decode(record["nonce"]),
                expected_rp_id=self.rp_id, expected_origin=self.origin, require_user_verification=True,
            )
        except (WebAuthnException, ValueError, KeyError, TypeError):
            raise self._refuse(approver, "passkey_invalid", "passkey_register", approver.id) from None
        passkey = StoredPasskey(
            id=bytes_to_base64url(verified.credential_id),
            public_key=bytes_to_base64url(verified.credential_public_key),
            sign_count=verified.sign_count, created_at=self.store.clock(),
        )
        key = self.store.keys.passkeys(approver.id)

        def build(pipe: Pipe) -> None:
            pipe.multi()
            pipe.hset(key, passkey.id, self._sealed(approver.id, passkey))
            self.store.emit(pipe, actor, "passkey.registered", approver.id, credential=passkey.id[:16])

        self.store.transact([key], build)
        return passkey

    # -- assertion -------------------------------------------------------------------------
    def assertion_options(self, approver: Approver, *, action: str, subject: str, bound: str = "") -> tuple[str, dict[str, Any]]:
        """``(challenge_id, PublicKeyCredentialRequestOptions as JSON)`` whose challenge names
        ``action`` on ``subject`` at ``bound`` (see the module docstring)."""
        challenge_id, nonce = self._issue({"kind": "assert", "approver": approver.id, "action": action,
                                          "subject": subject, "bound": bound})
        options = webauthn.generate_authentication_options(
            rp_id=self.rp_id,
            challenge=bound_challenge(nonce, approver.id, action, subject, bound),
            allow_credentials=[PublicKeyCredentialDescriptor(id=base64url_to_bytes(p.id))
                               for p in self.list(approver.id)],
            user_verification=UserVerificationRequirement.REQUIRED,
        )
        return challenge_id, json.loads(options_to_json(options))

    def signin_options(self, approver_id: str) -> tuple[str, dict[str, Any]]:
        """Sign-in options for a typed id, whether or not it is an approver: no
        ``allowCredentials`` (the authenticator offers its discoverable credential), so the
        answer for a known id and an unknown one differs only in the random challenge."""
        challenge_id, nonce = self._issue({"kind": "assert", "approver": approver_id, "action": "signin",
                                          "subject": approver_id, "bound": ""})
        options = webauthn.generate_authentication_options(
            rp_id=self.rp_id, challenge=bound_challenge(nonce, approver_id, "signin", approver_id, ""),
            user_verification=UserVerificationRequirement.REQUIRED,
        )
        return challenge_id, json.loads(options_to_json(options))

    def verify(self, approver: Approver, proof: PasskeyProof, *, action: str, subject: str, bound: str = "") -> None:
        """Accept ``proof`` once for exactly ``action`` on ``subject`` at ``bound``, or raise
        :class:`Refused` (``passkey_challenge_unknown``, ``passkey_challenge_mismatch``,
        ``passkey_unknown_credential``, ``passkey_invalid``)."""
        record = self._take(approver, proof.challenge_id, "assert", action, subject)
        if (record.get("approver"), record.get("action"), record.get("subject"), record.get("bound")) != (
            approver.id, action, subject, bound
        ):
            raise self._refuse(approver, "passkey_challenge_mismatch", action, subject)
        # Recomputed from what is approved now, not read back from Redis.
        expected = bound_challenge(base64.b64decode(record["nonce"]), approver.id, action, subject, bound)
        cred_id = proof.credential.get("id") if isinstance(proof.credential, dict) else None
        key = self.store.keys.passkeys(approver.id)
        stored = self._parse(approver.id, self.store.r.hget(key, cred_id)) if isinstance(cred_id, str) else None
        if stored is None:
            raise self._refuse(approver, "passkey_unknown_credential", action, subject)
        try:
            verified = webauthn.verify_authentication_response(
                credential=proof.credential, expected_challenge=expected, expected_rp_id=self.rp_id,
                expected_origin=self.origin, credential_public_key=base64url_to_bytes(stored.public_key),
                credential_current_sign_count=stored.sign_count, require_user_verification=True,
            )
        except (WebAuthnException, ValueError, KeyError, TypeError):
            raise self._refuse(approver, "passkey_invalid", action, subject) from None
        updated = StoredPasskey(stored.id, stored.public_key, verified.new_sign_count, stored.created_at)

        def build(pipe: Pipe) -> None:
            if self._parse(approver.id, pipe.hget(key, stored.id)) != stored:
                raise self._refuse(approver, "passkey_invalid", action, subject)  # used concurrently
            pipe.multi()
            pipe.hset(key, stored.id, self._sealed(approver.id, updated))

        self.store.transact([key], build)
