"""The acknowledgement mail: "captured as I-…", sent through the configured relay.

Only DKIM-verified senders get one (replying to a forged From is backscatter), and never a
sender that is itself automated (RFC 3834: ``Auto-Submitted``, bulk ``Precedence``, mailing
lists, the null sender), so two robots cannot loop. The reply quotes nothing the sender wrote
except the subject, which is a header value and cannot carry a line break.

The listener decides at capture whether a message is answered and records it in the idea's
provenance (``ack_from``: the allowlisted address it was sent to); the mail itself goes out
through the reply outbox (:mod:`intake.channels.replies`), so a relay outage delays the
acknowledgement, retried with backoff, and never loses it.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from intake.channels.email.message import ParsedMail
from intake.channels.replies import ReplyFailed, Send, SenderFactory
from intake.core.models import Channel, Idea

# An address as the parser stores it (lower-cased, no display name, no line break).
_ADDRESS = re.compile(r"[^\s<>@,;\x00-\x1f\x7f]{1,64}@[a-z0-9.-]{1,253}")


def wants_reply(mail: ParsedMail, envelope_from: str) -> bool:
    """Whether this sender may be answered without risking a mail loop (RFC 3834 §2)."""
    if not envelope_from or envelope_from == "<>":
        return False
    if mail.header("Auto-Submitted").strip().lower() not in ("", "no"):
        return False
    if mail.header("Precedence").strip().lower() in ("bulk", "junk", "list"):
        return False
    return not mail.header("List-Id")


def build_reply(*, to_addr: str, subject: str, message_id: str, sender: str, idea_id: str,
                created: bool) -> EmailMessage:
    """The reply to the message ``message_id`` from ``to_addr`` about ``subject``, from
    ``sender`` (our allowlisted address)."""
    reply = EmailMessage()
    reply["From"] = sender
    reply["To"] = to_addr
    subject = re.sub(r"[\x00-\x1f\x7f]", " ", subject)[:150]
    reply["Subject"] = f"Re: {subject}" if subject else f"intake: captured as {idea_id}"
    reply["Date"] = formatdate(usegmt=True)
    reply["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    reply["In-Reply-To"] = f"<{message_id}>"
    reply["References"] = f"<{message_id}>"
    reply["Auto-Submitted"] = "auto-replied"
    reply.set_content(
        (f"Your request was captured as idea {idea_id}.\n" if created
         else f"This message was captured before, as idea {idea_id}.\n")
        + "An approver will review it; you will hear back when it becomes a task.\n\n"
        "Mail only ever files ideas: nothing in a message can approve or run anything.\n"
    )
    return reply


def send_reply(relay: str, reply: EmailMessage, *, timeout: float = 30.0) -> None:
    """Hand ``reply`` to the relay (``host:port``) with the null envelope sender, so a bounce
    of the acknowledgement never comes back to the listener (RFC 3834 §4)."""
    host, _, port = relay.rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=timeout) as smtp:
        smtp.ehlo_or_helo_if_needed()
        if smtp.has_extn("starttls"):
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        smtp.send_message(reply, from_addr="<>", to_addrs=[str(reply["To"])])


def email_sender(relay: str | None) -> SenderFactory:
    """The reply outbox's sender for email ideas: the acknowledgement their capture asked for
    (``ack_from`` in the provenance), through ``relay``; nothing when no relay is configured."""

    def make(session: object) -> tuple[str, Send] | None:
        if relay is None:
            return None

        async def send(idea: Idea) -> bool:
            sender, to_addr = idea.provenance.get("ack_from"), idea.provenance.get("from", "")
            message_id = idea.provenance.get("message_id", "")
            if not sender or not _ADDRESS.fullmatch(to_addr) or not _ADDRESS.fullmatch(sender):
                return False
            message = build_reply(to_addr=to_addr, subject=idea.title, message_id=message_id, sender=sender,
                                  idea_id=idea.id, created=True)
            try:
                await asyncio.to_thread(send_reply, relay, message)
            except (OSError, smtplib.SMTPException) as exc:
                raise ReplyFailed(type(exc).__name__) from None
            return True

        return Channel.EMAIL.value, send

    return make
