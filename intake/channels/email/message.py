"""Parsing an untrusted RFC 5322 message into what intake records: pure functions, no I/O.

Only the structure is read. Headers are parsed with the standard library's header parser; the
body is split on MIME boundaries here, one container level at a time, so a part that is not a
``multipart/*`` container of the message itself is never parsed: attachments (including
``message/rfc822`` parts and nested multiparts marked as attachments) are only transfer-decoded
(base64, quoted-printable) and hashed. Nothing is decompressed, unpacked or rendered.

The text of the idea is the first ``text/plain`` body part, else the first ``text/html`` one
turned into plain text (tags dropped, entities decoded, scripts and styles skipped), else the
subject. Whatever went wrong, a malformed message raises :class:`MalformedMail`.
"""

from __future__ import annotations

import codecs
import email.errors
import hashlib
import re
from dataclasses import dataclass, field
from email import policy as email_policy
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from html.parser import HTMLParser

from intake.people.registry import IDENTITY_KINDS

MAX_DEPTH = 5  # nested multipart containers
MAX_PARTS = 100  # leaf parts in one message
MAX_NAME = 100  # characters of an attachment's file name kept
_ADDR = IDENTITY_KINDS["email"]
# One mailbox, as RFC 5322 writes it for a person: an optional display name (quoted, or plain
# words) and the address in angle brackets, or the bare address. Groups, lists and anything
# looser are refused rather than guessed at (parsers that guess disagree with DKIM verifiers).
_MAILBOX = re.compile(
    r'\s*(?:(?:"(?:[^"\\\r\n]|\\.){0,200}"|[^"<>,;:@()\\\r\n]{0,200})\s*<(?P<a1>[^<>\s]{3,254})>'
    r"|(?P<a2>[^<>\s\",;:()]{3,254}))\s*"
)
_MSGID = re.compile(r"\s*<(?P<id>[\x21-\x3b\x3d\x3f-\x7e]{1,250})>\s*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class MalformedMail(ValueError):
    """The message cannot be read as mail intake accepts; ``str()`` says why, for the sender."""


@dataclass(frozen=True)
class Attachment:
    """What is recorded of an attachment: never its content."""

    name: str
    content_type: str
    size: int
    sha256: str

    def describe(self) -> str:
        return f"{self.name or '(unnamed)'} ({self.content_type}, {self.size} bytes) sha256:{self.sha256}"


@dataclass(frozen=True)
class ParsedMail:
    """The parts of one message that intake uses."""

    from_addr: str  # lower-cased
    message_id: str  # without the angle brackets
    subject: str
    text: str
    headers: list[tuple[str, str]]  # every top-level header, in order (name, unfolded value)
    attachments: list[Attachment] = field(default_factory=list)
    html_only: bool = False

    @property
    def from_domain(self) -> str:
        return self.from_addr.rpartition("@")[2]

    def header(self, name: str) -> str:
        """The first header called ``name`` (case-insensitive), or ''."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), "")


_PARSER = BytesParser(policy=email_policy.compat32)


def _headers_only(raw: bytes) -> Message:
    """Headers parsed; the body left as one opaque payload (never parsed as MIME)."""
    return _PARSER.parsebytes(raw, headersonly=True)


def _unfold(value: object) -> str:
    return re.sub(r"\r?\n[ \t]", " ", str(value)).strip()


def _single(msg: Message, name: str, *, required: bool) -> str:
    values = msg.get_all(name) or []
    if len(values) > 1:
        raise MalformedMail(f"more than one {name} header")
    if not values:
        if required:
            raise MalformedMail(f"no {name} header")
        return ""
    return _unfold(values[0])


def parse_from(value: str) -> str:
    """The one address of a ``From`` header, lower-cased, or MalformedMail."""
    match = _MAILBOX.fullmatch(value)
    addr = (match.group("a1") or match.group("a2") or "").lower() if match else ""
    if not re.fullmatch(_ADDR, addr):
        raise MalformedMail("the From header must hold exactly one plain address")
    return addr


def parse_message_id(value: str) -> str:
    match = _MSGID.fullmatch(value)
    if match is None:
        raise MalformedMail("the Message-ID header is malformed")
    return match.group("id")


def decode_subject(value: str) -> str:
    """RFC 2047 encoded words decoded; control characters become spaces; capped at 200."""
    try:
        text = str(make_header(decode_header(value)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        text = value
    return _CONTROL.sub(" ", text).strip()[:200]


class _HtmlText(HTMLParser):
    """Text content of an HTML body: tags dropped, block ends as line breaks."""

    _SKIP = frozenset({"script", "style", "head", "title", "template", "noscript"})
    _BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
                        "blockquote", "pre", "table", "ul", "ol", "hr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.out.append(data)


def html_to_text(html: str) -> str:
    """Plain text of an HTML mail body; the result is text, never markup to be trusted."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(parser.out).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _decoded(part: Message) -> bytes:
    """The part's transfer-decoded bytes (base64, quoted-printable); its content unparsed."""
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _text_of(part: Message) -> str:
    charset = part.get_content_charset() or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    return _decoded(part).decode(charset, errors="replace")


def _boundary_parts(body: bytes, boundary: str) -> list[bytes]:
    """The parts of a multipart body (RFC 2046 §5.1.1), preamble and epilogue dropped."""
    delimiter = b"--" + boundary.encode("ascii", "surrogateescape")
    parts: list[bytes] = []
    current: list[bytes] | None = None
    for line in body.split(b"\n"):  # lines keep their CR: a part's bytes are as transmitted
        stripped = line.rstrip(b" \t\r")
        if stripped == delimiter + b"--":
            break
        if stripped == delimiter:
            if current is not None:
                parts.append(_part_bytes(current))
            current = []
        elif current is not None:
            current.append(line)
    if current is not None:
        parts.append(_part_bytes(current))
    return parts


def _part_bytes(lines: list[bytes]) -> bytes:
    # The line break before a delimiter belongs to the delimiter (RFC 2046 §5.1.1).
    joined = b"\n".join(lines)
    return joined[:-1] if joined.endswith(b"\r") else joined


@dataclass
class _Walk:
    plain: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    leaves: int = 0


def _walk(part: Message, body: bytes, depth: int, found: _Walk) -> None:
    ctype = part.get_content_type()
    disposition = part.get_content_disposition()
    filename = part.get_filename()
    if ctype.startswith("multipart/") and disposition != "attachment":
        boundary = part.get_boundary()
        if not boundary or len(boundary) > 70:
            raise MalformedMail("a multipart part has no usable boundary")
        if depth >= MAX_DEPTH:
            raise MalformedMail(f"MIME parts are nested more than {MAX_DEPTH} deep")
        for chunk in _boundary_parts(body, boundary):
            sub = _headers_only(chunk)
            _walk(sub, _body_bytes(sub), depth + 1, found)
        return
    found.leaves += 1
    if found.leaves > MAX_PARTS:
        raise MalformedMail(f"more than {MAX_PARTS} MIME parts")
    if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
        if ctype == "text/plain" and found.plain is None:
            found.plain = _text_of(part)
            return
        if ctype == "text/html" and found.html is None:
            found.html = _text_of(part)
            return
    data = _decoded(part)
    name = _CONTROL.sub(" ", str(filename or "")).strip()[:MAX_NAME]
    found.attachments.append(Attachment(name, ctype, len(data), hashlib.sha256(data).hexdigest()))


def _body_bytes(msg: Message) -> bytes:
    """A container's body bytes as received. RFC 2046 §5.1: a multipart is never
    transfer-encoded beyond 7bit/8bit/binary, so anything else is malformed."""
    if not msg.get_content_type().startswith("multipart/"):
        return b""
    if str(msg.get("Content-Transfer-Encoding", "7bit")).strip().lower() not in ("7bit", "8bit", "binary"):
        raise MalformedMail("a multipart part is transfer-encoded")
    return _decoded(msg)


def parse_message(raw: bytes) -> ParsedMail:
    """Read one message (as received at DATA) or raise :class:`MalformedMail`.

    Requires exactly one From header holding one address and exactly one Message-ID; at most
    one Subject. Line endings may be CRLF or LF."""
    try:
        return _parse(raw)
    except MalformedMail:
        raise
    except (email.errors.MessageError, LookupError, UnicodeError, ValueError, TypeError, IndexError,
            AttributeError, RecursionError) as exc:
        # The standard library's header helpers raise these on hostile input; translated here.
        raise MalformedMail(f"the message could not be parsed ({type(exc).__name__})") from None


def _parse(raw: bytes) -> ParsedMail:
    if not raw.strip():
        raise MalformedMail("the message is empty")
    msg = _headers_only(raw)
    if msg.defects and any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect) for d in msg.defects):
        raise MalformedMail("the header section is malformed")
    headers = [(str(k), _unfold(v)) for k, v in msg.items()]
    if not headers:
        raise MalformedMail("the message has no headers")
    from_addr = parse_from(_single(msg, "From", required=True))
    message_id = parse_message_id(_single(msg, "Message-ID", required=True))
    subject = decode_subject(_single(msg, "Subject", required=False))
    found = _Walk()
    _walk(msg, _body_bytes(msg), 0, found)
    html_only = found.plain is None and found.html is not None
    if found.plain is not None:
        text = found.plain
    elif found.html is not None:
        text = html_to_text(found.html)
    else:
        text = ""
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip() or subject
    return ParsedMail(from_addr=from_addr, message_id=message_id, subject=subject, text=text,
                      headers=headers, attachments=found.attachments, html_only=html_only)
