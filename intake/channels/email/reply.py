"""The acknowledgement mail: "captured as I-…", sent through the configured relay.

Only DKIM-verified senders get one (replying to a forged From is backscatter), and never a
sender that is itself automated (RFC 3834: ``Auto-Submitted``, bulk ``Precedence``, mailing
lists, the null sender), so two robots cannot loop. The reply quotes nothing the sender wrote
except the subject, which is a header value and cannot carry a line break.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from intake.channels.email.message import ParsedMail


def wants_reply(mail: ParsedMail, envelope_from: str) -> bool:
    """Whether this sender may be answered without risking a mail loop (RFC 3834 §2)."""
    if not envelope_from or envelope_from == "<>":
        return False
    if mail.header("Auto-Submitted").strip().lower() not in ("", "no"):
        return False
    if mail.header("Precedence").strip().lower() in ("bulk", "junk", "list"):
        return False
    return not mail.header("List-Id")


def build_reply(mail: ParsedMail, *, sender: str, idea_id: str, created: bool) -> EmailMessage:
    """The reply to ``mail`` from ``sender`` (our allowlisted address)."""
    reply = EmailMessage()
    reply["From"] = sender
    reply["To"] = mail.from_addr
    subject = re.sub(r"[\x00-\x1f\x7f]", " ", mail.subject)[:150]
    reply["Subject"] = f"Re: {subject}" if subject else f"intake: captured as {idea_id}"
    reply["Date"] = formatdate(usegmt=True)
    reply["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2])
    reply["In-Reply-To"] = f"<{mail.message_id}>"
    reply["References"] = f"<{mail.message_id}>"
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
