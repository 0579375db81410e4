"""The email channel end to end: smtplib against the real listener in the real app, a real
Redis, a second aiosmtpd as the reply relay, DKIM checked by dkimpy against fixed DNS records."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import smtplib
import ssl
import zipfile
from pathlib import Path

import pytest
import redis

from intake.channels.slack.notifier import card_blocks
from intake.core.errors import ConfigError
from intake.core.settings import Settings, load_settings
from intake.people.registry import People
from intake.runtime import open_broker
from tests.api_harness import enrol
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

FOOTBALL = "joe@football.example.com"


def ideas(settings: Settings) -> list:
    with open_broker(settings) as broker:
        return broker.store.recent_ideas()


def audit_len(r: redis.Redis) -> int:
    return r.xlen("intake:audit")


def test_rfc8463_message_is_captured_once_with_verdict_pass(settings: Settings, tmp_path: Path) -> None:
    with Relay() as relay, running_mail(email_settings(settings, tmp_path, smtp_relay=relay.address),
                                        rfc8463_resolver()) as smtp:
        code, text = smtp.send(rfc8463_message())
        assert code == 250, text
        again = smtp.send(rfc8463_message())  # an MTA resending the same message
        assert again[0] == 250
        [envelope] = relay.wait_for(1)
    [idea] = ideas(settings)
    assert idea.id in text and idea.id in again[1]
    assert idea.requester == f"email:{FOOTBALL}"
    assert idea.title == "Is dinner ready?"
    assert "Are you hungry yet?" in idea.text
    assert idea.provenance["dkim"] == "pass"
    assert idea.provenance["dkim_domain"] == "football.example.com"
    assert idea.provenance["dkim_selector"] in ("brisbane", "test")
    assert idea.delivery_id == f"{FOOTBALL} <20030712040037.46341.5F8J@football.example.com>"
    sent = rfc8463_message()
    sent += b"" if sent.endswith(b"\r\n") else b"\r\n"  # smtplib ends the data with a line break
    assert idea.raw_sha256 == hashlib.sha256(sent).hexdigest()  # the message as received
    # The verdict is on the card, escaped like every other provenance value.
    card = json.dumps(card_blocks(idea, None))
    assert "dkim: pass" in card and "dkim_domain: football.example.com" in card
    # One reply, to the verified sender, naming the idea, sent with the null envelope sender.
    assert envelope.rcpt_tos == [FOOTBALL] and envelope.mail_from in ("<>", "")
    reply = envelope.content.decode()
    assert idea.id in reply and "In-Reply-To: <20030712040037.46341.5F8J@football.example.com>" in reply
    assert "Auto-Submitted: auto-replied" in reply


def test_verified_sender_resolves_to_their_person_and_a_forged_one_does_not(settings: Settings,
                                                                           tmp_path: Path) -> None:
    with open_broker(settings) as broker:
        People(broker.store).upsert("joe", name="Joe", identities=(f"email:{FOOTBALL}",), actor="test:setup")
        broker.audit.seal_pending()
    forged = rfc8463_message().replace(b"Are you hungry", b"Are you thirsty")  # body changed: DKIM fails
    with running_mail(email_settings(settings, tmp_path, unverified="flag"), rfc8463_resolver()) as smtp:
        assert smtp.send(rfc8463_message())[0] == 250
        assert smtp.send(forged.replace(b"5F8J@", b"5F8K@"))[0] == 250
    with open_broker(settings) as broker:
        people = People(broker.store)
        by_text = {("thirsty" in i.text): i for i in broker.store.recent_ideas()}
        assert people.resolve(by_text[False].requester) == "joe"
        assert by_text[True].requester == f"unverified-email:{FOOTBALL}"
        assert people.resolve(by_text[True].requester) is None


@pytest.mark.parametrize("unverified", ["refuse", "flag"])
def test_from_changed_fails_dkim_and_policy_decides(settings: Settings, tmp_path: Path, rclient: redis.Redis,
                                                    unverified: str) -> None:
    changed = rfc8463_message().replace(b"From: Joe SixPack <joe@football.example.com>",
                                        b"From: Joe SixPack <ceo@football.example.com>")
    with Relay() as relay, running_mail(email_settings(settings, tmp_path, unverified=unverified,
                                                       smtp_relay=relay.address), rfc8463_resolver()) as smtp:
        before = audit_len(rclient)
        code, text = smtp.send(changed)
        if unverified == "refuse":
            assert code == 550 and text.startswith("5.7.1"), text
            assert audit_len(rclient) == before and ideas(settings) == []
            assert rclient.keys("intake:delivery:*") == []
        else:
            assert code == 250, text
            [idea] = ideas(settings)
            assert idea.provenance["dkim"] == "fail" and "UNVERIFIED" in idea.provenance["flag"]
            assert idea.requester == "unverified-email:ceo@football.example.com"
            assert "UNVERIFIED" in json.dumps(card_blocks(idea, None))
        # A forged From never gets an acknowledgement (that would be backscatter).
        assert smtp.send(rfc8463_message())[0] == 250
        relay.wait_for(1)
        assert [e.rcpt_tos for e in relay.received] == [[FOOTBALL]]


def test_a_26_mb_message_is_refused_at_data_and_by_size(settings: Settings, tmp_path: Path,
                                                        rclient: redis.Redis) -> None:
    line = b"x" * 76 + b"\r\n"
    big = mail("a@example.net", "") + line * (26 * 1024 * 1024 // len(line))
    with running_mail(email_settings(settings, tmp_path, unverified="flag"), RecordResolver()) as smtp:
        before = audit_len(rclient)
        with smtp.smtp() as client:
            client.ehlo()
            assert client.has_extn("size") and int(client.esmtp_features["size"]) == 25 * 1024 * 1024
            assert client.mail("a@example.net", [f"SIZE={len(big)}"])[0] == 552  # declared: refused at MAIL
            client.rset()
            assert client.mail("a@example.net")[0] == 250
            assert client.rcpt(RECIPIENT)[0] == 250
            code, _ = client.data(big)  # undeclared: read to the end, kept no further than the cap
            assert code == 552
            # The session is still usable: a normal message right after is captured.
            assert client.mail("a@example.net")[0] == 250 and client.rcpt(RECIPIENT)[0] == 250
            assert client.data(mail("a@example.net", "small one"))[0] == 250
    [idea] = ideas(settings)
    assert idea.text == "small one" and audit_len(rclient) == before + 1


def test_rcpt_outside_the_allowlist_is_refused(settings: Settings, tmp_path: Path, rclient: redis.Redis) -> None:
    with running_mail(email_settings(settings, tmp_path, unverified="flag"), RecordResolver()) as smtp:
        for rcpt in ("root@example.com", "intake@example.com.evil.net", "INTAKE@example.org", "<>"):
            code, _ = smtp.send(mail("a@example.net", "hi"), rcpt=rcpt)
            assert code in (550, 553, 501), (rcpt, code)
        with pytest.raises(smtplib.SMTPRecipientsRefused), smtp.smtp() as client:
            client.sendmail("a@example.net", ["postmaster@example.com"], mail("a@example.net", "hi"))
        # The allowlisted address, in any case, is accepted.
        assert smtp.send(mail("a@example.net", "hi"), rcpt="Intake@Example.com")[0] == 250
    assert len(ideas(settings)) == 1


def zip_bomb() -> bytes:
    """64 MB of zeros in a zip of a few tens of kilobytes: harmless unless someone unpacks it."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.bin", b"\0" * (64 * 1024 * 1024))
    return out.getvalue()


def test_attachments_are_recorded_by_hash_and_never_opened(settings: Settings, tmp_path: Path) -> None:
    import base64

    bomb = zip_bomb()
    bomb_b64 = base64.encodebytes(bomb).decode()
    # A message/rfc822 attachment whose inner MIME is broken (a boundary that never closes, a
    # header with no value): recorded as bytes; parsing it would have found the broken parts.
    inner = ("From: x\nContent-Type: multipart/mixed; boundary=\"in\"\n\n--in\nContent-Type: text/plain\n\n"
             "INNER TEXT approve T-000000000000\n--in\nContent-Type: multipart/mixed; boundary=\n\n--\n")
    body = ("--b1\nContent-Type: text/plain; charset=utf-8\n\nPlease look at the attached.\n"
            "--b1\nContent-Type: application/zip\nContent-Disposition: attachment; filename=\"report.zip\"\n"
            f"Content-Transfer-Encoding: base64\n\n{bomb_b64}"
            "--b1\nContent-Type: message/rfc822\nContent-Disposition: attachment; filename=\"fwd.eml\"\n\n"
            f"{inner}\n--b1--\n")
    message = mail("a@example.net", body, extra='MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="b1"\n')
    with running_mail(email_settings(settings, tmp_path, unverified="flag"), RecordResolver()) as smtp:
        code, text = smtp.send(message)
        assert code == 250, text
    [idea] = ideas(settings)
    assert idea.text == "Please look at the attached."
    assert "INNER TEXT" not in idea.text
    assert idea.provenance["attachments"] == "2"
    assert idea.provenance["attachment_1"] == (
        f"report.zip (application/zip, {len(bomb)} bytes) sha256:{hashlib.sha256(bomb).hexdigest()}")
    inner_bytes = inner.encode().replace(b"\n", b"\r\n")  # as transmitted (SMTP lines are CRLF)
    assert idea.provenance["attachment_2"] == (
        f"fwd.eml (message/rfc822, {len(inner_bytes)} bytes) sha256:{hashlib.sha256(inner_bytes).hexdigest()}")
    assert len(bomb) < 1024 * 1024  # the bomb arrived compressed and stayed so


def test_missing_or_doubled_headers_are_refused_and_write_nothing(settings: Settings, tmp_path: Path,
                                                                  rclient: redis.Redis) -> None:
    with running_mail(email_settings(settings, tmp_path, unverified="flag"), RecordResolver()) as smtp:
        before = audit_len(rclient)
        for message in (mail("a@example.net", "no id", message_id=""),
                        mail("a@example.net", "two froms", extra="From: b@example.net\n"),
                        mail("a@example.net, b@example.net", "two addresses"),
                        mail("undisclosed-recipients:;", "a group"),
                        mail("a@example.net", "", subject="")):  # nothing to capture
            code, text = smtp.send(message)
            assert code == 550, (message, text)
        assert audit_len(rclient) == before
    assert ideas(settings) == []


def test_email_can_never_approve_anything(settings: Settings, tmp_path: Path) -> None:
    """An approver's own DKIM-verified mail, with a valid fresh code, saying "approve": nothing
    changes but a new (inert) idea."""
    codes = enrol(settings, {"alice": ("platform", ()), "carol": ("security", ("email:carol@example.org",))})
    with open_broker(settings) as broker:
        from intake.core.models import Channel, IdeaDraft

        idea, _ = broker.store.capture(IdeaDraft(channel=Channel.CLI, requester="cli:erin", delivery_id="d1",
                                                 text="Fix the payments docs"))
        decision = broker.gatekeeper.promote(idea.id, repo="acme/payments", change_type="docs",
                                             approver_id="alice", code=codes["alice"].next())
        task_id = decision.task.id
        task_before = broker.store.get_task(task_id)
        broker.audit.seal_pending()
    assert task_before.state.value == "awaiting_approvals" and len(task_before.approvals) == 1
    resolver = RecordResolver()
    signer = Signer("example.org", resolver)
    text = f"approve {task_id} {codes['carol'].next()}\n/intake approve {task_id}\nAPPROVE {task_before.spec_hash}"
    message = signer.sign(mail("Carol <carol@example.org>", text, subject=f"approve {task_id}"))
    with running_mail(email_settings(settings, tmp_path), resolver) as smtp:
        code, reply = smtp.send(message)
        assert code == 250, reply
    with open_broker(settings) as broker:
        task_after = broker.store.get_task(task_id)
        assert task_after.state == task_before.state and task_after.approvals == task_before.approvals
        mailed = [i for i in broker.store.recent_ideas() if i.channel.value == "email"]
        assert [i.provenance["dkim"] for i in mailed] == ["pass"]
        assert mailed[0].requester == "email:carol@example.org" and mailed[0].state.value == "captured"


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1 and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_starttls_when_a_certificate_is_configured(settings: Settings, tmp_path: Path) -> None:
    cert_path, key_path = self_signed(tmp_path)
    with running_mail(email_settings(settings, tmp_path, unverified="flag", smtp_cert=cert_path, smtp_key=key_path),
                      RecordResolver()) as smtp, smtp.smtp() as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=ssl.create_default_context(cafile=str(cert_path)))
        client.ehlo("localhost")
        client.sendmail("a@example.net", [RECIPIENT], mail("a@example.net", "over TLS"))
    assert [i.text for i in ideas(settings)] == ["over TLS"]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize("how", ["tls1.1", "garbage"])
def test_a_failed_starttls_handshake_is_one_quiet_line_and_a_closed_connection(
        settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """Any unauthenticated client can start STARTTLS and fail the handshake (a TLS 1.1 client,
    bytes that are no TLS at all): the broker logs one INFO line, no ERROR, no traceback, and
    the connection is closed; the listener still serves the next client."""
    cert_path, key_path = self_signed(tmp_path)
    caplog.set_level(logging.DEBUG)
    with running_mail(email_settings(settings, tmp_path, unverified="flag", smtp_cert=cert_path, smtp_key=key_path),
                      RecordResolver()) as smtp:
        client = smtp.smtp()
        client.ehlo()
        code, _ = client.docmd("STARTTLS")
        assert code == 220
        watch = client.sock.dup()  # the connection as the server sees it, after the TLS attempt
        if how == "tls1.1":
            old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
            with contextlib.suppress(ssl.SSLError, OSError):
                old.set_ciphers("ALL:@SECLEVEL=0")
            with pytest.raises((ssl.SSLError, OSError)):
                old.wrap_socket(client.sock, server_hostname="localhost")
        else:
            client.sock.sendall(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64)
        watch.settimeout(30)
        with contextlib.suppress(ConnectionResetError):  # closed by the server: EOF, or a reset
            while watch.recv(4096):
                pass
        watch.close()
        client.close()
        # The listener is still up for the next client.
        assert smtp.send(mail("a@example.net", "after the failed handshake"))[0] == 250
    records = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert records == [], [(r.name, r.levelname, r.getMessage()) for r in records]
    failed = [r for r in caplog.records if "STARTTLS" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.INFO, [r.getMessage() for r in failed]


def test_settings_fail_fast(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="INTAKE_SMTP_RECIPIENTS"):
        load_settings(_env_file=None, data_dir=tmp_path, smtp_port=2525)
    with pytest.raises(ConfigError, match="INTAKE_SMTP_CERT"):
        load_settings(_env_file=None, data_dir=tmp_path, smtp_port=2525, smtp_recipients=RECIPIENT,
                      smtp_cert=tmp_path / "c.pem")
    with pytest.raises(ConfigError, match="INTAKE_SMTP_RELAY"):
        load_settings(_env_file=None, data_dir=tmp_path, smtp_relay="relay.example.com")
    with pytest.raises(ConfigError, match="INTAKE_SMTP_RECIPIENTS"):
        load_settings(_env_file=None, data_dir=tmp_path, smtp_recipients="a@b.c, x y@z")


def test_another_sender_reusing_a_message_id_gets_their_own_idea(settings: Settings, tmp_path: Path) -> None:
    """Delivery ids are per sender: a forger who copies joe's Message-ID neither swallows
    joe's mail nor learns his idea id."""
    with running_mail(email_settings(settings, tmp_path, unverified="flag"), rfc8463_resolver()) as smtp:
        code, joes = smtp.send(rfc8463_message())
        assert code == 250
        forged = mail("eve@evil.example", "mine", message_id="20030712040037.46341.5F8J@football.example.com")
        code, eves = smtp.send(forged)
        assert code == 250
    assert joes.rsplit(" ", 1)[-1] != eves.rsplit(" ", 1)[-1]
    assert sorted(i.requester for i in ideas(settings)) == [f"email:{FOOTBALL}", "unverified-email:eve@evil.example"]


def test_an_approver_cannot_promote_what_they_mailed_in(settings: Settings, tmp_path: Path) -> None:
    """Carol's verified mail is carol's request: her Slack or CLI identity cannot approve it."""
    from intake.core.errors import Refused

    codes = enrol(settings, {"carol": ("security", ("email:carol@example.org",))})
    resolver = RecordResolver()
    message = Signer("example.org", resolver).sign(mail("carol@example.org", "Add a docs page"))
    with running_mail(email_settings(settings, tmp_path), resolver) as smtp:
        code, text = smtp.send(message)
        assert code == 250, text
    [idea] = ideas(settings)
    with open_broker(settings) as broker, pytest.raises(Refused) as refused:
        broker.gatekeeper.promote(idea.id, repo="acme/payments", change_type="docs", approver_id="carol",
                                  code=codes["carol"].next())
    assert refused.value.reason == "self_approval"
