"""DSSE envelopes of intake's provenance: the PAE of the DSSE spec, signing and opening with
the broker's Ed25519 key, and every way an envelope can be malformed or re-signed."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from intake.protocol.envelope import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    ProvenanceInvalid,
    open_envelope,
    pae,
    sign_statement,
)
from intake.protocol.tokens import Keyring, Signer
from intake.tasks.provenance import compare

STATEMENT = {"_type": STATEMENT_TYPE, "predicateType": PREDICATE_TYPE,
             "subject": [{"name": "acme/web", "digest": {"gitCommit": "a" * 40}}],
             "predicate": {"approvals": [{"person": "alice"}]}}


def test_pae_matches_the_dsse_spec_example() -> None:
    # DSSE protocol.md: PAE("http://example.com/HelloWorld", "hello world")
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world")
    # Lengths are byte counts, not characters; an empty body is "0 " and nothing.
    assert pae("t\u00e9", b"") == "DSSEv1 3 t\u00e9 0 ".encode()


def test_sign_then_open_with_the_public_key_alone() -> None:
    signer = Signer(Ed25519PrivateKey.generate())
    envelope = sign_statement(signer, STATEMENT)
    data = json.loads(envelope)
    assert data["payloadType"] == PAYLOAD_TYPE and data["signatures"][0]["keyid"] == signer.kid
    # The signature is over the PAE of the payload bytes, as any DSSE verifier checks it.
    signer.public_key().verify(base64.b64decode(data["signatures"][0]["sig"]),
                               pae(PAYLOAD_TYPE, base64.b64decode(data["payload"])))
    statement, kid = open_envelope(envelope, Keyring.of(signer.public_key()))
    assert statement == STATEMENT and kid == signer.kid


def test_another_key_or_a_changed_envelope_is_refused() -> None:
    signer, other = Signer(Ed25519PrivateKey.generate()), Signer(Ed25519PrivateKey.generate())
    keyring = Keyring.of(signer.public_key())
    with pytest.raises(ProvenanceInvalid) as unknown:
        open_envelope(sign_statement(other, STATEMENT), keyring)
    assert unknown.value.reason == "unknown_key"
    # A forger who knows our kid still cannot sign under it.
    forged = json.loads(sign_statement(other, STATEMENT))
    forged["signatures"][0]["keyid"] = signer.kid
    with pytest.raises(ProvenanceInvalid) as bad:
        open_envelope(json.dumps(forged), keyring)
    assert bad.value.reason == "bad_signature"
    good = json.loads(sign_statement(signer, STATEMENT))
    cases = {
        "payload_type": {**good, "payloadType": "application/json"},
        "two signatures": {**good, "signatures": good["signatures"] * 2},
        "extra field": {**good, "note": "x"},
        "whitespace in base64": {**good, "payload": good["payload"] + "\n"},
        "other payload": {**good, "payload": base64.b64encode(json.dumps(STATEMENT).encode() + b" ").decode()},
    }
    for what, envelope in cases.items():
        with pytest.raises(ProvenanceInvalid):
            open_envelope(json.dumps(envelope), keyring)
            pytest.fail(what)
    # A validly signed payload that is not an intake statement.
    with pytest.raises(ProvenanceInvalid) as wrong:
        open_envelope(sign_statement(signer, {**STATEMENT, "predicateType": "https://slsa.dev/provenance/v1"}),
                      keyring)
    assert wrong.value.reason == "malformed"
    with pytest.raises(ProvenanceInvalid):
        open_envelope(b"\xff" * 10, keyring)


def test_compare_names_each_disagreeing_fact() -> None:
    theirs = {**STATEMENT, "predicate": {"approvals": [{"person": "alice"}, {"person": "carol"}]}}
    ours = {**STATEMENT, "predicate": {"approvals": [{"person": "alice"}, {"person": "mallory"}]}}
    assert compare(theirs, theirs) == []
    [line] = compare(ours, theirs)
    assert line.startswith("predicate.approvals[1].person") and "mallory" in line and "carol" in line
    assert compare(STATEMENT, theirs) == [
        'predicate.approvals[1].person: missing; the sealed audit log says "carol"']
