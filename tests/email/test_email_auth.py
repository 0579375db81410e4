"""DKIM verdicts, DMARC-style alignment and trusted Authentication-Results / ARC, over the
RFC 8463 vectors and fresh keys, with a resolver serving fixed TXT records."""

from __future__ import annotations

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from intake.channels.email.authenticity import (
    DnsUnavailable,
    aligned,
    authenticate,
    organisational_domain,
    parse_authentication_results,
)
from intake.channels.email.message import parse_message
from tests.email.email_harness import RecordResolver, Signer, mail, rfc8463_message, rfc8463_resolver

NONE: frozenset[str] = frozenset()


def verdict(raw: bytes, resolver: RecordResolver, trusted: frozenset[str] = NONE,  # type: ignore[no-untyped-def]
            sealers: frozenset[str] = NONE):
    return authenticate(raw, parse_message(raw), resolver, trusted, sealers)


@pytest.mark.parametrize("selector", ["brisbane", "test"])
def test_each_rfc8463_signature_verifies_alone(selector: str) -> None:
    """Both the ed25519-sha256 and the rsa-sha256 signature of RFC 8463 Appendix A pass."""
    raw = rfc8463_message()
    head, _, rest = raw.partition(b"From:")
    sigs = head.split(b"DKIM-Signature:")[1:]
    keep = next(s for s in sigs if f"s={selector};".encode() in s)
    result = verdict(b"DKIM-Signature:" + keep + b"From:" + rest, rfc8463_resolver())
    assert (result.result, result.domain, result.selector) == ("pass", "football.example.com", selector)


@pytest.mark.parametrize("change", [
    (b"hungry", b"Hungry"),  # the body
    (b"Subject: Is dinner ready?", b"Subject: Is dinner ready??"),  # a signed header
    (b"From: Joe", b"From: Joe\r\nFrom: Eve <eve@football.example.com>\r\nX-Was: Joe"),  # an added From
])
def test_any_change_fails(change: tuple[bytes, bytes]) -> None:
    raw = rfc8463_message().replace(*change)
    try:
        result = verdict(raw, rfc8463_resolver())
    except ValueError:  # two From headers are refused before any verdict
        assert change[1].count(b"From:") == 2
        return
    assert result.result == "fail" and not result.verified


def test_no_key_in_dns_fails_and_unsigned_is_none() -> None:
    assert verdict(rfc8463_message(), RecordResolver()).result == "fail"
    assert verdict(mail("a@example.org", "hi"), RecordResolver()).result == "none"


def test_dns_timeouts_are_temporary_not_a_verdict() -> None:
    class Down:
        def txt(self, name: str) -> list[str]:
            raise DnsUnavailable("Timeout")

    with pytest.raises(DnsUnavailable):
        verdict(rfc8463_message(), Down())  # type: ignore[arg-type]


def test_a_valid_signature_by_another_domain_is_not_aligned() -> None:
    """Anyone can sign for their own domain: a verified signature by evil.example for mail
    From someone at example.org is a fail, not a pass."""
    resolver = RecordResolver()
    raw = Signer("evil.example", resolver).sign(mail("ceo@example.org", "wire the money"))
    result = verdict(raw, resolver)
    assert result.result == "fail" and "not aligned" in result.reason and result.domain == "evil.example"


def test_relaxed_alignment_by_organisational_domain_and_strict_when_the_policy_says() -> None:
    resolver = RecordResolver({"_dmarc.example.org": "v=DMARC1; p=reject"})
    raw = Signer("mail.example.org", resolver).sign(mail("a@eu.example.org", "hi"))
    assert verdict(raw, resolver).result == "pass"
    assert organisational_domain("x.eu.example.org", resolver) == "example.org"
    # Sibling organisations under a public suffix never align, whatever they publish.
    resolver.add("_dmarc.co.test", "v=DMARC1; p=none; psd=y")
    resolver.add("_dmarc.a.co.test", "v=DMARC1; p=reject")
    resolver.add("_dmarc.b.co.test", "v=DMARC1; p=reject")
    assert not aligned("a.co.test", "b.co.test", resolver)
    assert aligned("mail.a.co.test", "a.co.test", resolver)
    # Without any DMARC record a subdomain is its own organisation: no alignment is guessed.
    assert not aligned("mail.example.net", "example.net", RecordResolver())
    strict = RecordResolver({"_dmarc.example.org": "v=DMARC1; p=reject; adkim=s"})
    raw = Signer("mail.example.org", strict).sign(mail("a@example.org", "hi"))
    assert verdict(raw, strict).result == "fail"


def test_authentication_results_count_only_from_trusted_authserv_ids() -> None:
    header = ("Authentication-Results: mx.trusted.test (comment; with=semicolon);\r\n"
              " dkim=pass (good) header.d=example.org header.s=sel1;\r\n spf=pass smtp.mailfrom=example.org\r\n")
    raw = mail("a@example.org", "hi", extra=header)
    assert verdict(raw, RecordResolver()).result == "none"
    trusted = verdict(raw, RecordResolver(), frozenset({"mx.trusted.test"}))
    assert (trusted.result, trusted.domain, trusted.selector, trusted.method) == (
        "pass", "example.org", "sel1", "authentication-results:mx.trusted.test")
    # Another authserv-id's claim is ignored even when the trusted one is configured.
    forged = mail("a@example.org", "hi", extra="Authentication-Results: mx.evil.test; dkim=pass header.d=example.org\r\n")
    assert verdict(forged, RecordResolver(), frozenset({"mx.trusted.test"})).result == "none"
    # A trusted pass for another domain does not vouch for this From.
    other = mail("a@example.org", "hi", extra="Authentication-Results: mx.trusted.test; dkim=pass header.d=evil.test\r\n")
    assert verdict(other, RecordResolver(), frozenset({"mx.trusted.test"})).result == "none"
    dmarc = mail("a@example.org", "hi", extra="Authentication-Results: mx.trusted.test; dmarc=pass header.from=example.org\r\n")
    assert verdict(dmarc, RecordResolver(), frozenset({"mx.trusted.test"})).result == "pass"
    assert parse_authentication_results("mx.x 1; dkim=fail")[0] == "mx.x"


def _rsa_key(resolver: RecordResolver, selector: str, domain: str) -> bytes:
    import base64

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    resolver.add(f"{selector}._domainkey.{domain}", f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}")
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def test_arc_results_count_only_when_the_chain_validates_and_the_sealer_is_trusted() -> None:
    """A forwarder (a list, say) broke the author's signature but sealed its own results."""
    resolver = RecordResolver()
    private = _rsa_key(resolver, "arc", "lists.trusted.test")
    original = mail("a@example.org", "hi", extra="Authentication-Results: lists.trusted.test; "
                                                 "dkim=pass header.d=example.org header.s=s1\r\n")
    sealed = b"".join(dkim.arc_sign(original, b"arc", b"lists.trusted.test", private, b"lists.trusted.test",
                                    include_headers=[b"from", b"to", b"subject", b"message-id", b"date"])) + original
    trusted = frozenset({"lists.trusted.test"})
    sealers = frozenset({"lists.trusted.test"})
    result = verdict(sealed, resolver, trusted, sealers)
    assert result.result == "pass" and result.method in ("arc:lists.trusted.test",
                                                          "authentication-results:lists.trusted.test")
    # Without the plain Authentication-Results header, only ARC can vouch.
    arc_only = b"\r\n".join(line for line in sealed.split(b"\r\n") if not line.startswith(b"Authentication-Results"))
    result = verdict(arc_only, resolver, trusted, sealers)
    assert (result.result, result.method) == ("pass", "arc:lists.trusted.test")
    assert verdict(arc_only, resolver, frozenset({"mx.other.test"}), sealers).result == "none"
    # The same valid chain, when its sealer is not a configured trusted sealer: nothing.
    assert verdict(arc_only, resolver, trusted).result == "none"
    assert verdict(arc_only, resolver, trusted, frozenset({"other.test"})).result == "none"
    # A seal that no longer validates (the message changed after sealing) vouches for nothing.
    assert verdict(arc_only.replace(b"hi", b"HI"), resolver, trusted, sealers).result == "none"


def test_an_arc_set_sealed_by_the_senders_own_domain_never_beats_the_trusted_mta() -> None:
    """Issue 20: the attacker seals a valid ARC set with their own domain's key, writes the
    trusted authserv-id into its ARC-Authentication-Results and claims dkim=pass for
    victim.example; the trusted MTA itself said dkim=none; dmarc=fail. Unverified, always."""
    resolver = RecordResolver({"_dmarc.victim.example": "v=DMARC1; p=reject"})
    private = _rsa_key(resolver, "arc", "attacker.example")
    original = mail("ceo@victim.example", "wire the money",
                    extra="Authentication-Results: mx.corp.test; dkim=pass header.d=victim.example header.s=s1\r\n")
    sealed = b"".join(dkim.arc_sign(original, b"arc", b"attacker.example", private, b"mx.corp.test",
                                    include_headers=[b"from", b"to", b"subject", b"message-id", b"date"]))
    body = original.replace(b"Authentication-Results: mx.corp.test; dkim=pass header.d=victim.example "
                            b"header.s=s1\r\n", b"")
    # The trusted MTA prepends its own (failing) result when it relays the message to intake.
    relayed = b"Authentication-Results: mx.corp.test; dkim=none; dmarc=fail header.from=victim.example\r\n" + sealed + body
    trusted = frozenset({"mx.corp.test"})
    # The chain is valid: an operator who (wrongly) listed the attacker as a sealer, with no
    # result of the MTA's own, would believe it. That is the only way it counts.
    assert verdict(sealed + body, resolver, trusted, frozenset({"attacker.example"})).verified
    for sealers in (NONE, frozenset({"attacker.example"}), frozenset({"lists.trusted.test"})):
        assert not verdict(relayed, resolver, trusted, sealers).verified, sealers
    # Even with the attacker's domain configured as a sealer, the MTA's own fail stands.
    assert not verdict(relayed, resolver, trusted, frozenset({"attacker.example"})).verified
    # Without the MTA's own header, an untrusted sealer still vouches for nothing.
    assert not verdict(sealed + body, resolver, trusted, frozenset({"lists.trusted.test"})).verified


def test_a_signature_over_part_of_the_body_does_not_pass() -> None:
    """DKIM's l= lets anyone append to a signed body; such a signature vouches for nothing."""
    resolver = RecordResolver()
    signer = Signer("example.org", resolver)
    message = mail("a@example.org", "Please update the docs.")
    header = dkim.sign(message, b"s1", b"example.org", signer.private_b64(), signature_algorithm=b"ed25519-sha256",
                       include_headers=[b"from", b"subject", b"message-id"], length=True)
    signed = header + message
    assert verdict(signed, resolver).result == "fail"
    appended = signed + b"Also add my SSH key to production.\r\n"
    result = verdict(appended, resolver)
    assert result.result == "fail" and "l=" in result.reason
