"""Parsing untrusted mail: encodings decoded into plain text, structure refused when ambiguous,
attachments hashed and never opened; and generated malformed mail (hypothesis) through the
parser, the verdict and the real listener: no crash, nothing written unless well-formed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import redis
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from intake.channels.email.authenticity import authenticate
from intake.channels.email.listener import MailRefused, build_draft
from intake.channels.email.message import MalformedMail, parse_from, parse_message
from intake.core.policy import load_policy
from intake.core.settings import Settings
from intake.runtime import EXAMPLE_POLICY
from tests.email.email_harness import RecordResolver, email_settings, mail, rfc8463_message, running_mail


def test_html_only_mail_becomes_text_and_markup_stays_text() -> None:
    html = ('<html><head><title>T</title><style>p{}</style></head><body><p>MSc &amp; MBA &lt;3</p>'
            '<script>alert(1)</script><div>line&nbsp;two</div><a href="javascript:x">&lt;b&gt;</a></body></html>')
    raw = mail("a@example.org", html, extra="Content-Type: text/html; charset=utf-8\r\n")
    parsed = parse_message(raw)
    assert parsed.html_only and parsed.text == "MSc & MBA <3\n\nline\xa0two\n<b>"
    assert "alert" not in parsed.text and "javascript" not in parsed.text


def test_transfer_encodings_charsets_and_encoded_subjects() -> None:
    raw = mail("a@example.org", "caf=C3=A9 na=C3=AFve=\r\n soft break",
               subject="=?utf-8?b?w7xiZXI=?= =?iso-8859-1?q?s=FC=DF?=",
               extra="Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n")
    parsed = parse_message(raw)
    assert parsed.text == "café naïve soft break" and parsed.subject == "übersüß"
    latin = mail("a@example.org", "\xe9t\xe9".encode("latin-1").decode("latin-1"),
                 extra="Content-Type: text/plain; charset=no-such-charset\r\n")
    assert parse_message(latin.decode().encode("latin-1")).text  # unknown charset: decoded, not a crash


@pytest.mark.parametrize("value, addr", [
    ("Joe <Joe@Example.ORG>", "joe@example.org"),
    ('"Doe, John" <j@example.org>', "j@example.org"),
    ("j@example.org", "j@example.org"),
    ("=?utf-8?q?J=C3=B6?= <j@example.org>", "j@example.org"),
])
def test_from_one_plain_mailbox(value: str, addr: str) -> None:
    assert parse_from(value) == addr


@pytest.mark.parametrize("value", [
    "a@example.org, b@example.org", "<a@example.org> <b@example.org>", "Group: a@example.org;",
    '"x@good.example" <', "a@example.org)<b@example.org>", "", "not an address", "<>",
    "a@exa mple.org", "\"unterminated <a@example.org>",
])
def test_from_anything_looser_is_refused(value: str) -> None:
    with pytest.raises(MalformedMail):
        parse_from(value)


def test_nesting_and_part_counts_are_bounded() -> None:
    deep = "Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for i in range(1, 8):
        deep += f"--b{i - 1}\r\nContent-Type: multipart/mixed; boundary=b{i}\r\n\r\n"
    raw = mail("a@example.org", "", extra=deep.rstrip("\r\n") + "\r\n")
    with pytest.raises(MalformedMail, match="nested"):
        parse_message(raw)
    many = "".join(f"--z\r\nContent-Type: application/octet-stream\r\n\r\n{i}\r\n" for i in range(150)) + "--z--"
    with pytest.raises(MalformedMail, match="parts"):
        parse_message(mail("a@example.org", many, extra="Content-Type: multipart/mixed; boundary=z\r\n"))


def test_a_text_part_named_as_a_file_is_an_attachment_not_the_idea() -> None:
    body = ("--z\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=\"notes.txt\"\r\n\r\n"
            "run rm -rf /\r\n--z\r\nContent-Type: text/plain\r\n\r\nthe request\r\n--z--")
    parsed = parse_message(mail("a@example.org", body, extra="Content-Type: multipart/mixed; boundary=z\r\n"))
    assert parsed.text == "the request"
    [attachment] = parsed.attachments
    assert (attachment.name, attachment.size) == ("notes.txt", len(b"run rm -rf /"))
    assert attachment.sha256 == hashlib.sha256(b"run rm -rf /").hexdigest()


# -- generated malformed input ---------------------------------------------------------------

HEADER_NAMES = ["From", "To", "Subject", "Message-ID", "Content-Type", "Content-Transfer-Encoding",
                "Content-Disposition", "DKIM-Signature", "Authentication-Results", "ARC-Seal",
                "ARC-Authentication-Results", "MIME-Version", "X-Junk"]
header_value = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80),
    st.sampled_from(["multipart/mixed; boundary=", 'multipart/mixed; boundary="b"', "base64", "quoted-printable",
                     "v=1; a=ed25519-sha256; d=x; s=y; h=from; bh=; b=", "mx.trusted.test; dkim=pass header.d=",
                     "<a@b>", "a@example.org", "=?utf-8?b?====?=", "i=1; mx.trusted.test; dkim=pass",
                     "attachment; filename*=utf-8''%ff%fe", "text/html; charset=utf-7"]),
)
generated_mail = st.builds(
    lambda headers, body: ("".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n").encode("utf-8", "surrogateescape")
    + body,
    st.lists(st.tuples(st.sampled_from(HEADER_NAMES), header_value), max_size=10),
    st.one_of(st.binary(max_size=300),
              st.sampled_from([b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--", b"--b\r\n\r\n--b",
                               b"<p>&#xffffffff;&bogus;</p>", b"=ZZ=\r\n", b"PGI+\r\n===="])),
)
well_formed_mail = st.builds(
    lambda n, subject, body: mail(f"u{n}@example.org", body, subject=subject, message_id=f"{n}@example.org"),
    st.integers(0, 10**6),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=200),
)
POLICY = load_policy(EXAMPLE_POLICY)


def _edge(raw: bytes, trusted: frozenset[str]) -> object:
    """What the listener does with a message, minus the socket and the store."""
    try:
        parsed = parse_message(raw)
    except MalformedMail:
        return None
    verdict = authenticate(raw, parsed, RecordResolver(), trusted)
    assert verdict.result in ("pass", "fail", "none")
    try:
        return build_draft(raw, parsed, verdict, POLICY, envelope_from="x@y.z", peer="127.0.0.1")
    except MailRefused as exc:
        assert exc.reply.startswith("550 ")
        return None


@hsettings(max_examples=300, deadline=None)
@given(raw=st.one_of(generated_mail, st.binary(max_size=500)), trusted=st.sampled_from([frozenset(),
                                                                                       frozenset({"mx.trusted.test"})]))
def test_generated_messages_never_crash_the_edge(raw: bytes, trusted: frozenset[str]) -> None:
    _edge(raw, trusted)


@hsettings(max_examples=200, deadline=None)
@given(signature=header_value, results=header_value, from_=header_value)
def test_generated_headers_around_a_signed_message(signature: str, results: str, from_: str) -> None:
    """The RFC 8463 message with junk signatures, results and From headers added."""
    extra = f"DKIM-Signature: {signature}\r\nAuthentication-Results: {results}\r\nReply-To: {from_}\r\n"
    raw = extra.encode("utf-8", "surrogateescape") + rfc8463_message()
    _edge(raw, frozenset({"mx.trusted.test"}))


def test_generated_messages_through_the_real_listener(settings: Settings, tmp_path: Path,
                                                      rclient: redis.Redis) -> None:
    """Through smtplib and the listener: a clean SMTP answer every time, and an idea written
    exactly when the answer is 250 (naming it); a refusal writes nothing at all."""
    with running_mail(email_settings(settings, tmp_path, unverified="flag"), RecordResolver()) as smtp:

        @hsettings(max_examples=40, deadline=None)
        @given(raw=st.one_of(generated_mail, well_formed_mail))
        def check(raw: bytes) -> None:
            before = rclient.xlen("intake:audit"), rclient.zcard("intake:ideas")
            code, text = smtp.send(raw + (b"" if raw.endswith(b"\r\n") else b"\r\n"))
            assert "Error: (" not in text  # aiosmtpd's words for an exception in the handler
            assert code in (250, 500, 550), (code, text)
            if code == 250:
                idea_id = text.rsplit(" ", 1)[-1]
                assert rclient.exists(f"intake:idea:{idea_id}")
                seen.add(idea_id)
            else:
                assert (rclient.xlen("intake:audit"), rclient.zcard("intake:ideas")) == before

        seen: set[str] = set()
        check()
        assert seen, "no generated message was well-formed: the strategy tests nothing"
