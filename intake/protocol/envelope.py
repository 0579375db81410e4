"""The provenance envelope: an in-toto Statement v1 in a DSSE envelope, signed with Ed25519.

The broker signs (:mod:`intake.tasks.provenance` builds the statement from the sealed log); the
worker attaches the envelope as a git note on :data:`NOTES_REF` and embeds it in the pull
request; anyone with the public key opens it with :func:`open_envelope`. DSSE is small enough to
implement exactly (:func:`pae`, tested against the spec's example); nothing here parses anything
before its signature is checked.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography.exceptions import InvalidSignature

from intake.core.errors import IntakeError, TokenInvalid
from intake.core.models import canonical_json, sha256_hex
from intake.protocol.tokens import Keyring, Signer

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://intake.dev/delivery/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
NOTES_REF = "refs/notes/intake"
#: An envelope is a few KB (the prompt is in it only as a hash); anything larger is not ours.
MAX_ENVELOPE_BYTES = 256 * 1024


class ProvenanceInvalid(IntakeError):
    """An envelope or statement that does not verify; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


# -- DSSE ------------------------------------------------------------------------------------
def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP
    body``, lengths as ASCII decimal byte counts. The signature covers exactly these bytes."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object) -> bytes:
    """Strict standard base64: only the canonical encoding of the bytes is accepted."""
    if not isinstance(text, str):
        raise ValueError("not a string")
    data = base64.b64decode(text, validate=True)
    if _b64(data) != text:
        raise ValueError("non-canonical base64")
    return data


def sign_statement(signer: Signer, statement: dict[str, Any]) -> str:
    """The DSSE envelope (canonical JSON text) of ``statement``, signed by ``signer``."""
    payload = canonical_json(statement)
    signature = signer.sign_bytes(pae(PAYLOAD_TYPE, payload))
    envelope = {"payload": _b64(payload), "payloadType": PAYLOAD_TYPE,
                "signatures": [{"keyid": signer.kid, "sig": _b64(signature)}]}
    return canonical_json(envelope).decode()


def open_envelope(raw: str | bytes, keyring: Keyring) -> tuple[dict[str, Any], str]:
    """Verify a DSSE envelope with the public keys alone and return (statement, kid).

    Exactly the three envelope fields, the in-toto payload type, one signature by a key of
    ``keyring`` over the PAE of the payload; only then is the payload parsed, and it must be an
    in-toto Statement v1 of :data:`PREDICATE_TYPE`. Raises :class:`ProvenanceInvalid`."""
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ProvenanceInvalid("malformed", "the envelope is too large")
    try:
        envelope = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProvenanceInvalid("malformed", "the envelope is not JSON") from None
    if not isinstance(envelope, dict) or set(envelope) != {"payload", "payloadType", "signatures"}:
        raise ProvenanceInvalid("malformed", "the envelope is not a DSSE envelope")
    if envelope["payloadType"] != PAYLOAD_TYPE:
        raise ProvenanceInvalid("payload_type", f"the payload type is not {PAYLOAD_TYPE}")
    sigs = envelope["signatures"]
    if (not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict)
            or set(sigs[0]) != {"keyid", "sig"} or not isinstance(sigs[0]["keyid"], str)):
        raise ProvenanceInvalid("malformed", "the envelope must hold exactly one signature with a keyid")
    kid = sigs[0]["keyid"]
    try:
        payload, signature = _unb64(envelope["payload"]), _unb64(sigs[0]["sig"])
    except (ValueError, binascii.Error):
        raise ProvenanceInvalid("malformed", "the envelope's payload or signature is not base64") from None
    try:
        keyring.get(kid).verify(signature, pae(PAYLOAD_TYPE, payload))
    except TokenInvalid:
        raise ProvenanceInvalid("unknown_key", f"the envelope is signed with key {kid[:16]!r}, "
                                               "which is not in the broker's public keyring") from None
    except InvalidSignature:
        raise ProvenanceInvalid("bad_signature", "the envelope's signature does not verify") from None
    try:
        statement = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProvenanceInvalid("malformed", "the signed payload is not JSON") from None
    if (not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE
            or statement.get("predicateType") != PREDICATE_TYPE or not isinstance(statement.get("subject"), list)
            or not isinstance(statement.get("predicate"), dict)):
        raise ProvenanceInvalid("malformed", "the payload is not an intake delivery statement")
    return statement, kid


def subject_commit(statement: dict[str, Any]) -> str | None:
    """The ``gitCommit`` digest the statement's subject names (None if none)."""
    for item in statement.get("subject", []):
        digest = item.get("digest") if isinstance(item, dict) else None
        if isinstance(digest, dict) and isinstance(digest.get("gitCommit"), str):
            return str(digest["gitCommit"])
    return None


def digest_of(text: str | bytes) -> str:
    return sha256_hex(text.encode() if isinstance(text, str) else text)


def pull_request_provenance(envelope: str) -> str:
    """The pull request body's provenance section: where the note is, how to verify, and the
    envelope itself (base64 and canonical JSON only: nothing in it renders as markup)."""
    if not envelope:
        return ""
    return (f"\nProvenance: a DSSE-signed in-toto statement (`{PREDICATE_TYPE}`) in the git note "
            f"`{NOTES_REF}` on the head commit, envelope sha256 `{digest_of(envelope)}`. "
            "Check it with `intake provenance verify <commit>`.\n\n"
            f"<details><summary>provenance envelope</summary>\n\n```json\n{envelope}\n```\n</details>\n")
