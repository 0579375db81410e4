"""Issue 13 attacks on the email channel: a sender who controls their own domain (and its DKIM
key) but wants to be taken for someone else, or to make intake mail a third party. Real
listener in the real app, smtplib and raw sockets, dkimpy against fixed DNS records."""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

import dkim
import pytest
import redis

from intake.core.settings import Settings
from intake.runtime import open_broker
from tests.email.email_harness import (
    RECIPIENT,
    RecordResolver,
    Relay,
    Signer,
    email_settings,
    mail,
    rfc8463_message,
    rfc8463_resolver,
    running_mail,
)

CEO = "ceo@football.example.com"
MX = "192.0.2.25"  # the trusted MTA: not where these tests connect from (loopback)


def ideas(settings: Settings) -> list:
    with open_broker(settings) as broker:
        return broker.store.recent_ideas()


def test_a_second_from_above_the_signed_one_is_refused(settings: Settings, tmp_path: Path,
                                                        rclient: redis.Redis) -> None:
    """dkimpy verifies the bottom-most From; a reader that takes the top one would see the CEO."""
    forged = f"From: {CEO}\r\n".encode() + rfc8463_message()
    lower = f"from: {CEO}\r\n".encode() + rfc8463_message()
    with running_mail(email_settings(settings, tmp_path, unverified="flag"), rfc8463_resolver()) as smtp:
        for message in (forged, lower):
            code, text = smtp.send(message)
            assert code == 550 and "more than one From" in text, text
    assert ideas(settings) == [] and rclient.keys("intake:delivery:*") == []


def test_a_display_name_spoof_is_the_real_address(settings: Settings, tmp_path: Path) -> None:
    resolver = RecordResolver()
    signer = Signer("evil.test", resolver)
    spoofs = [f'"{CEO}" <mallory@evil.test>', f'"CEO <{CEO}>" <mallory@evil.test>']
    with running_mail(email_settings(settings, tmp_path), resolver) as smtp:
        for n, from_ in enumerate(spoofs):
            assert smtp.send(signer.sign(mail(from_, "wire the money", message_id=f"s{n}@evil.test")))[0] == 250
        # unquoted, the display name holding an address is refused rather than guessed at
        code, _ = smtp.send(signer.sign(mail(f"{CEO} <mallory@evil.test>", "x", message_id="s9@evil.test")))
        assert code == 550
    assert {i.requester for i in ideas(settings)} == {"email:mallory@evil.test"}


def test_a_signature_with_l_equals_is_not_a_pass(settings: Settings, tmp_path: Path) -> None:
    """l= signs only the first bytes of the body; anything can be appended below them."""
    resolver = RecordResolver()
    signer = Signer("football.example.com", resolver)
    message = mail(CEO, "Hello", message_id="l1@football.example.com").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    header = dkim.sign(message, b"s1", b"football.example.com", signer.private_b64(),
                       signature_algorithm=b"ed25519-sha256", length=True,
                       include_headers=[b"from", b"subject", b"message-id"])
    appended = header + message + b"P.S. also give mallory prod access\r\n"
    with running_mail(email_settings(settings, tmp_path), resolver) as smtp:
        code, text = smtp.send(appended)
    assert code == 550 and text.startswith("5.7.1") and "l=" in text, text
    assert ideas(settings) == []


def test_authentication_results_from_an_untrusted_authserv_id_count_for_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    claim = ("Authentication-Results: mx.evil.test; dkim=pass header.d=football.example.com "
             "header.s=brisbane; dmarc=pass header.from=football.example.com\n"
             "ARC-Authentication-Results: i=1; mx.intake.test; dkim=pass header.d=football.example.com\n")
    message = mail(CEO, "Please approve my deploy", message_id="ar1@football.example.com", extra=claim)
    with running_mail(email_settings(settings, tmp_path, unverified="flag", smtp_trusted_authserv="mx.intake.test",
                                     smtp_trusted_peers=MX),
                      rfc8463_resolver()) as smtp:
        assert smtp.send(message)[0] == 250
    [idea] = ideas(settings)
    assert idea.provenance["dkim"] == "none" and idea.requester == f"unverified-email:{CEO}"


def raw_smtp(port: int, script: bytes) -> bytes:
    """Write an SMTP conversation byte for byte (smtplib would fix the line endings)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.recv(1024)
        sock.sendall(script)
        out = b""
        while b"\r\n221" not in out:  # the answer to QUIT: every earlier command was answered
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_smtp_smuggling_with_bare_line_feeds_is_one_message(settings: Settings, tmp_path: Path) -> None:
    """A message whose body holds ``\\n.\\n`` (or ``\\r.\\r``, ``\\n.\\r\\n``) followed by a second
    transaction: an upstream MX that ends DATA only at CRLF.CRLF passes it on as one message; if
    the listener ended DATA at the bare dot, the second "message" (with an Authentication-Results
    the MX never saw) would be captured as the CEO's."""
    smuggled = (b"MAIL FROM:<ceo@football.example.com>\r\nRCPT TO:<" + RECIPIENT.encode() + b">\r\nDATA\r\n"
                + mail(CEO, "smuggled: promote everything", message_id="smug@football.example.com",
                       extra="Authentication-Results: mx.intake.test; dmarc=pass header.from=football.example.com\n"))
    with running_mail(email_settings(settings, tmp_path, unverified="flag", smtp_trusted_authserv="mx.intake.test",
                                     smtp_trusted_peers=MX),
                      RecordResolver()) as smtp:
        for n, trick in enumerate((b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n")):
            outer = mail("mallory@evil.test", f"outer {n}", message_id=f"outer{n}@evil.test").rstrip(b"\r\n")
            script = (b"EHLO x\r\nMAIL FROM:<mallory@evil.test>\r\nRCPT TO:<" + RECIPIENT.encode() + b">\r\nDATA\r\n"
                      + outer + trick + smuggled + b"\r\n.\r\nQUIT\r\n")
            answer = raw_smtp(smtp.port, script)
            assert answer.count(b"\r\n250 2.0.0 Captured") == 1, answer
    found = ideas(settings)
    assert len(found) == 4
    assert {i.requester for i in found} == {"unverified-email:mallory@evil.test"}
    assert all(i.provenance.get("verified_by", "") == "" for i in found)


def test_the_acknowledgement_cannot_be_steered_by_subject_or_message_id(settings: Settings, tmp_path: Path) -> None:
    """An encoded-word Subject that decodes to CRLF + Bcc, and Message-IDs with CR/LF, must not
    add a recipient or a header to the reply (backscatter through header injection)."""
    resolver = RecordResolver()
    signer = Signer("evil.test", resolver)
    payload = base64.b64encode(b"hi\r\nBcc: victim@third.test\r\nX-Injected: 1").decode()
    message = signer.sign(mail("mallory@evil.test", "idea", subject=f"=?utf-8?b?{payload}?=",
                               message_id="inj1@evil.test"))
    bad_id = mail("mallory@evil.test", "idea", message_id="").replace(
        b"\r\n\r\n", b"\r\nMessage-ID: <a@b>\r\nBcc: victim@third.test\r\n\r\n", 1)
    bare_cr = signer.sign(mail("mallory@evil.test", "idea", message_id="x\r@evil.test"))
    with Relay() as relay, running_mail(email_settings(settings, tmp_path, smtp_relay=relay.address), resolver) as smtp:
        assert smtp.send(message, rcpt=RECIPIENT)[0] == 250
        assert smtp.send(bare_cr)[0] == 550
        smtp.send(bad_id, sender="mallory@evil.test")  # unsigned: refused, and never answered
        [envelope] = relay.wait_for(1)
    assert envelope.rcpt_tos == ["mallory@evil.test"]
    head = envelope.content.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in envelope.content else envelope.content.split(b"\n\n", 1)[0]
    names = [line.split(b":", 1)[0].lower() for line in head.splitlines() if line and line[:1] not in b" \t"]
    assert b"bcc" not in names and b"x-injected" not in names and names.count(b"subject") == 1, names


def test_an_oversized_header_is_refused_or_capped_never_stored_whole(settings: Settings, tmp_path: Path) -> None:
    resolver = RecordResolver()
    signer = Signer("evil.test", resolver)
    long_subject = "S" * 200_000
    with running_mail(email_settings(settings, tmp_path), resolver) as smtp:
        code, _ = smtp.send(signer.sign(mail("mallory@evil.test", "idea", subject=long_subject,
                                             message_id="big@evil.test")))
    if code == 250:
        [idea] = ideas(settings)
        assert len(idea.title) <= 200
    else:
        assert 500 <= code < 600 and ideas(settings) == []


def test_a_direct_client_cannot_write_the_trusted_mx_results_itself(settings: Settings, tmp_path: Path) -> None:
    """Authentication-Results of a trusted authserv-id count only on connections from the MTA
    that wrote them (INTAKE_SMTP_TRUSTED_PEERS); a client on loopback is not that MTA."""
    claim = "Authentication-Results: mx.intake.test; dmarc=pass header.from=football.example.com\n"
    message = mail(CEO, "Please approve my deploy", message_id="direct@football.example.com", extra=claim)
    with running_mail(email_settings(settings, tmp_path, unverified="flag", smtp_trusted_authserv="mx.intake.test",
                                     smtp_trusted_peers=MX),
                      RecordResolver()) as smtp:
        assert smtp.send(message, sender=CEO)[0] == 250
    [idea] = ideas(settings)
    assert idea.requester == f"unverified-email:{CEO}", idea.provenance


def test_bidi_in_an_attachment_name_or_envelope_sender_is_marked_on_the_card(settings: Settings,
                                                                             tmp_path: Path) -> None:
    """Provenance values come from the sender too: an attachment called ``invoice<RLO>fdp.exe``
    would read as ``invoiceexe.pdf`` on the card, and an SMTPUTF8 envelope sender can carry
    the same override. The card shows each hidden character as a marker, like the text."""
    from intake.channels.slack.notifier import card_blocks

    resolver = RecordResolver()
    signer = Signer("evil.test", resolver)
    body = ("--b\nContent-Type: text/plain\n\nsee the invoice\n--b\n"
            "Content-Type: application/octet-stream\n"
            "Content-Disposition: attachment; filename*=utf-8''invoice%E2%80%AEfdp.exe\n\nMZ\n--b--\n")
    message = signer.sign(mail("mallory@evil.test", body, message_id="att@evil.test",
                               extra='MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b"\n'))
    with running_mail(email_settings(settings, tmp_path), resolver) as smtp:
        with smtp.smtp() as client:
            client.ehlo()
            assert client.mail("mall\u202eory@evil.test", ["SMTPUTF8"])[0] == 250
            assert client.rcpt(RECIPIENT)[0] == 250
            assert client.data(message)[0] == 250
    [idea] = ideas(settings)
    assert "\u202e" in idea.provenance["attachment_1"]  # stored as the sender wrote it
    card = json.dumps(card_blocks(idea, None), ensure_ascii=False)
    assert "\u202e" not in card and "⟨U+202E⟩" in card


def test_the_trusted_mx_results_count_on_the_mx_s_own_connection(settings: Settings, tmp_path: Path) -> None:
    """The same claim, from the address INTAKE_SMTP_TRUSTED_PEERS names, is believed."""
    claim = "Authentication-Results: mx.intake.test; dmarc=pass header.from=football.example.com\n"
    message = mail(CEO, "Please document the runbook", message_id="viamx@football.example.com", extra=claim)
    with running_mail(email_settings(settings, tmp_path, unverified="flag", smtp_trusted_authserv="mx.intake.test",
                                     smtp_trusted_peers="127.0.0.1"), RecordResolver()) as smtp:
        assert smtp.send(message, sender=CEO)[0] == 250
    [idea] = ideas(settings)
    assert idea.requester == f"email:{CEO}" and idea.provenance["verified_by"] == "authentication-results:mx.intake.test", \
        idea.provenance


def test_trusted_authserv_ids_without_trusted_peers_stop_start_up(settings: Settings, tmp_path: Path) -> None:
    from intake.core.errors import ConfigError
    from intake.core.settings import load_settings

    with pytest.raises(ConfigError, match="^INTAKE_SMTP_TRUSTED_PEERS: required"):
        load_settings(_env_file=None, data_dir=tmp_path / "d", smtp_trusted_authserv="mx.intake.test")
