"""The SMTP listener (aiosmtpd) that turns mail to an allowlisted address into ideas.

``intake serve`` starts it when ``INTAKE_SMTP_PORT`` is set, on ``INTAKE_SMTP_HOST`` (loopback by
default), in the app's own event loop, opened and closed by a ``cleanup_ctx`` entry. Refusals
happen as early as SMTP allows and nothing is written for them:

- RCPT: any address not in ``INTAKE_SMTP_RECIPIENTS`` (550);
- MAIL ``SIZE=`` over ``INTAKE_SMTP_MAX_BYTES``, and DATA that grows past it while being read
  (552; aiosmtpd stops keeping the bytes once over, so nothing unbounded is buffered);
- end of DATA: malformed mail (550 5.6.0), unverified mail when policy says ``refuse``
  (550 5.7.1), text capture refuses (550 5.6.0); DNS or Redis trouble is temporary (451).

A message is captured durably before the 250 (whose text names the idea), idempotently on
``<From address> <Message-ID>``, so a resend is one idea and one sender cannot collide with
another's Message-ID. The acknowledgement mail goes out afterwards, through the reply outbox
(:mod:`intake.channels.email.reply`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import redis
from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException

from intake.channels.email.authenticity import DnsResolver, DnsUnavailable, TxtResolver, Verdict, authenticate
from intake.channels.email.message import MalformedMail, ParsedMail, parse_message
from intake.channels.email.reply import wants_reply
from intake.core.errors import IntakeError, InvalidInput
from intake.core.models import Channel, Idea, IdeaDraft, sha256_hex
from intake.core.policy import Policy
from intake.core.settings import Settings

log = logging.getLogger("intake.channels.email")

Capture = Callable[[IdeaDraft], Awaitable[tuple[Idea, bool]]]


class MailRefused(Exception):
    """A message intake will not capture; ``reply`` is the SMTP status line."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        super().__init__(reply)


def build_draft(raw: bytes, mail: ParsedMail, verdict: Verdict, policy: Policy, *,
                envelope_from: str, peer: str, ack_from: str | None = None) -> IdeaDraft:
    """The idea draft for an authenticated-as-far-as-possible message, or MailRefused.

    The requester is ``email:<address>`` only when the verdict passed (only then does it
    resolve to a person); otherwise ``unverified-email:<address>``, which is nobody's identity.
    ``ack_from``: the address to acknowledge the capture from (the reply outbox sends it)."""
    if not verdict.verified and policy.channels.email.unverified == "refuse":
        raise MailRefused(f"550 5.7.1 Unverified sender: no aligned DKIM signature ({verdict.reason})")
    provenance = {"via": "smtp", **verdict.provenance()}
    if not verdict.verified:
        provenance["flag"] = "UNVERIFIED sender: the From address is not proven"
    provenance.update({"from": mail.from_addr, "message_id": mail.message_id})
    if envelope_from:
        provenance["envelope_from"] = envelope_from[:254]
    if peer:
        provenance["peer"] = peer
    if ack_from:
        provenance["ack_from"] = ack_from[:254]
    if mail.html_only:
        provenance["body"] = "html, converted to text"
    if mail.attachments:
        provenance["attachments"] = str(len(mail.attachments))
        for i, attachment in enumerate(mail.attachments, 1):
            provenance[f"attachment_{i}"] = attachment.describe()
    kind = "email" if verdict.verified else "unverified-email"
    try:
        return IdeaDraft(
            channel=Channel.EMAIL, requester=f"{kind}:{mail.from_addr}",
            delivery_id=delivery_id(mail), text=mail.text, title=mail.subject,
            provenance=provenance, raw_sha256=sha256_hex(raw),
        )
    except ValueError:
        raise MailRefused("550 5.6.0 The message could not be read as an idea") from None


def _status(line: str) -> str:
    """One SMTP reply line: no control characters (no CRLF injection), bounded length."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", line)[:400]


def delivery_id(mail: ParsedMail) -> str:
    """The Message-ID, scoped to the From address (capture scopes it to the channel): one
    sender's resends are one idea, and nobody can take another sender's Message-ID."""
    scoped = f"{mail.from_addr} <{mail.message_id}>"
    return scoped if len(scoped) <= 256 else f"sha256:{sha256_hex(scoped.encode())}"


class EmailHandler:
    """aiosmtpd handler hooks: the allowlist at RCPT, the whole pipeline at end of DATA."""

    def __init__(self, settings: Settings, policy: Callable[[], Policy], capture: Capture,
                 resolver: TxtResolver) -> None:
        self.recipients = frozenset(r for r in settings.smtp_recipients.split(",") if r)
        self.trusted = frozenset(a for a in settings.smtp_trusted_authserv.split(",") if a)
        self.sealers = frozenset(a for a in settings.smtp_arc_sealers.split(",") if a)
        self.trusted_peers = tuple(ipaddress.ip_network(n) for n in settings.smtp_trusted_peers.split(",") if n)
        self.relay = settings.smtp_relay
        self.policy = policy
        self.capture = capture
        self.resolver = resolver

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.strip().lower() not in self.recipients:
            return "550 5.1.1 No such recipient here"
        if address.lower() not in (r.lower() for r in envelope.rcpt_tos):
            envelope.rcpt_tos.append(address.lower())
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        peer = session.peer[0] if isinstance(session.peer, tuple) and session.peer else ""
        envelope_from = envelope.mail_from or ""
        try:
            mail, verdict = await asyncio.to_thread(self._read, raw, self._vouchers(str(peer)))
            # Answer only a verified, non-automated sender, and only when a relay is set.
            ack = envelope.rcpt_tos[0] if (verdict.verified and self.relay and envelope.rcpt_tos
                                           and wants_reply(mail, envelope_from)) else None
            draft = build_draft(raw, mail, verdict, self.policy(), envelope_from=envelope_from, peer=str(peer),
                                ack_from=ack)
            idea, created = await self.capture(draft)
        except MailRefused as exc:
            log.info("email refused: %s", exc.reply[:3])
            return _status(exc.reply)
        except MalformedMail as exc:
            log.info("email refused: malformed")
            return _status(f"550 5.6.0 Malformed message: {exc}")
        except DnsUnavailable:
            log.warning("email deferred: DNS did not answer")
            return "451 4.4.3 DNS is not answering; try again later"
        except InvalidInput as exc:  # capture's refusals (empty or oversize text, ...)
            log.info("email refused by capture: %s", type(exc).__name__)
            return _status(f"550 5.6.0 Not captured: {exc}")
        except (IntakeError, redis.RedisError):  # shutting down, Redis away: the MTA retries
            log.warning("email deferred: Redis unavailable")
            return "451 4.3.0 Temporarily unable to store the message; try again later"
        log.info("email captured: idea=%s created=%s dkim=%s", idea.id, created, verdict.result)
        return f"250 2.0.0 Captured as {idea.id}"

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's hook for an exception in a session. A failed STARTTLS handshake (a client
        offering only TLS 1.1, bytes that are no TLS) is anyone's to cause: one INFO line, and
        aiosmtpd closes the connection. Anything else is ours: logged with its traceback, and
        the client gets a bare 451 (never the exception's text)."""
        if isinstance(error, TLSSetupException):
            cause = error.__cause__
            reason = getattr(cause, "reason", None) or type(cause).__name__
            log.info("email: STARTTLS handshake failed (%s); connection closed", str(reason)[:80])
            return "454 4.7.0 TLS not available"
        log.error("email: SMTP session error", exc_info=error)
        return "451 4.3.0 Temporary server error; try again later"

    def _vouchers(self, peer: str) -> frozenset[str]:
        """The authserv-ids believed on this connection: the trusted ones, only when the peer is
        the trusted MTA (anyone else could write those headers too)."""
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return frozenset()
        return self.trusted if any(address in net for net in self.trusted_peers) else frozenset()

    def _read(self, raw: bytes, trusted: frozenset[str]) -> tuple[ParsedMail, Verdict]:
        """Parse and authenticate (blocking: DNS); runs in a worker thread."""
        mail = parse_message(raw)
        return mail, authenticate(raw, mail, self.resolver, trusted, self.sealers)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The STARTTLS context when ``INTAKE_SMTP_CERT`` and ``INTAKE_SMTP_KEY`` are set."""
    if settings.smtp_cert is None or settings.smtp_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.smtp_cert, settings.smtp_key)
    except (OSError, ssl.SSLError) as exc:
        raise IntakeError(f"INTAKE_SMTP_CERT/INTAKE_SMTP_KEY: cannot load: {exc}") from None
    return context


class EmailListener:
    """The running SMTP server: ``port`` is where it listens (useful with port 0)."""

    def __init__(self, handler: EmailHandler, server: asyncio.base_events.Server) -> None:
        self.handler = handler
        self.server = server

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])


async def start_listener(settings: Settings, policy: Callable[[], Policy], capture: Capture, *,
                         resolver: TxtResolver | None = None) -> EmailListener:
    """Bind and serve SMTP in the running loop."""
    assert settings.smtp_port is not None
    # aiosmtpd logs every command and DATA line at debug: mail bodies never reach our logs.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    handler = EmailHandler(settings, policy, capture, resolver or DnsResolver())
    context = tls_context(settings)
    loop = asyncio.get_running_loop()
    hostname = socket.gethostname()

    def factory() -> SMTP:
        return SMTP(handler, data_size_limit=settings.smtp_max_bytes, enable_SMTPUTF8=True,
                    hostname=hostname, ident="intake", tls_context=context, timeout=60, loop=loop)

    server = await loop.create_server(factory, host=settings.smtp_host, port=settings.smtp_port)
    return EmailListener(handler, server)


async def stop_listener(listener: EmailListener) -> None:
    listener.server.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(listener.server.wait_closed(), timeout=10)


EMAIL_LISTENER = web.AppKey("email_listener", EmailListener)
EMAIL_RESOLVER = web.AppKey("email_resolver", TxtResolver)


def mount_email(app: web.Application, settings: Settings, broker_key: web.AppKey[Any],
                capture_key: web.AppKey[Any]) -> None:
    """Serve SMTP for the app's lifetime when ``INTAKE_SMTP_PORT`` is set. Tests may put a
    :class:`TxtResolver` under :data:`EMAIL_RESOLVER` before the app starts."""
    if settings.smtp_port is None:
        return

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        broker = app[broker_key]
        resolver = app.get(EMAIL_RESOLVER)
        listener = await start_listener(settings, lambda: broker.policy, app[capture_key].capture,
                                        resolver=resolver)
        app[EMAIL_LISTENER] = listener
        log.info("email: SMTP on %s:%s for %s", settings.smtp_host, listener.port, settings.smtp_recipients)
        try:
            yield
        finally:
            await stop_listener(listener)

    app.cleanup_ctx.append(ctx)
