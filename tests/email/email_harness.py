"""The broker's real app with its SMTP listener on loopback, a second aiosmtpd on loopback as
the reply relay, a DNS resolver that serves fixed TXT records, and signing helpers."""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import pytest
from aiohttp import web
from aiosmtpd.smtp import SMTP
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from intake.app import create_app
from intake.channels.email.listener import EMAIL_LISTENER, EMAIL_RESOLVER
from intake.core.settings import Settings, load_settings
from intake.runtime import EXAMPLE_POLICY

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "email"
RECIPIENT = "intake@example.com"


class RecordResolver:
    """TXT records from a dict (names without the trailing dot); counts lookups."""

    def __init__(self, records: dict[str, str | list[str]] | None = None) -> None:
        self.records: dict[str, list[str]] = {}
        self.lookups: list[str] = []
        for name, value in (records or {}).items():
            self.add(name, value)

    def add(self, name: str, value: str | list[str]) -> None:
        self.records[name.rstrip(".").lower()] = [value] if isinstance(value, str) else list(value)

    def txt(self, name: str) -> list[str]:
        self.lookups.append(name)
        return list(self.records.get(name.rstrip(".").lower(), []))


def rfc8463_resolver() -> RecordResolver:
    """The key records of RFC 8463 Appendix A (tests/vectors/email/rfc8463-dns.json)."""
    data = json.loads((VECTORS / "rfc8463-dns.json").read_text())
    return RecordResolver({k: v for k, v in data.items() if k.endswith("._domainkey.football.example.com.")})


def rfc8463_message() -> bytes:
    """RFC 8463 Appendix A's signed message, with the CRLF line endings it was signed with."""
    return (VECTORS / "rfc8463-signed.eml").read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass
class Signer:
    """A fresh ed25519 DKIM key for ``domain``, published in ``resolver``."""

    domain: str
    resolver: RecordResolver
    selector: str = "s1"
    key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)

    def __post_init__(self) -> None:
        import base64

        public = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.resolver.add(f"{self.selector}._domainkey.{self.domain}",
                          f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}")

    def private_b64(self) -> bytes:
        import base64

        raw = self.key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
        return base64.b64encode(raw)

    def sign(self, message: bytes) -> bytes:
        message = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        header = dkim.sign(message, self.selector.encode(), self.domain.encode(), self.private_b64(),
                           signature_algorithm=b"ed25519-sha256",
                           include_headers=[b"from", b"to", b"subject", b"message-id", b"date"])
        return header + message


def mail(from_: str, body: str, *, message_id: str = "m1@example.net", subject: str = "A request",
         extra: str = "", to: str = RECIPIENT) -> bytes:
    head = f"From: {from_}\nTo: {to}\nSubject: {subject}\nDate: Tue, 01 Dec 2026 10:00:00 +0000\n"
    if message_id:
        head += f"Message-ID: <{message_id}>\n"
    # SMTP lines end in CRLF (smtplib sends bytes as they are).
    return (head + extra + "\n" + body + "\n").replace("\r\n", "\n").replace("\n", "\r\n").encode()


class Relay:
    """A second aiosmtpd on loopback (its own loop and thread) standing in for the outbound
    relay; keeps what it gets."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.received: list[Any] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay", daemon=True)
        self.server: asyncio.base_events.Server | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(envelope)
        return "250 OK"

    def __enter__(self) -> Relay:
        self.thread.start()

        async def start() -> asyncio.base_events.Server:
            return await self.loop.create_server(lambda: SMTP(self, hostname="relay", loop=self.loop),
                                                 host="127.0.0.1", port=self.port)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def wait_for(self, count: int, timeout: float = 15.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"the relay got {len(self.received)} messages, expected {count}")
            time.sleep(0.02)
        return self.received


def email_settings(settings: Settings, tmp_path: Path, *, unverified: str = "refuse", **extra: Any) -> Settings:
    """The test's settings with the SMTP listener on (port 0) and a policy for unverified mail."""
    policy = tmp_path / "policy.toml"
    text = re.sub(r'(?m)^\[channels\.email\]\n(unverified = "[a-z]+"\n)?', "", EXAMPLE_POLICY.read_text())
    policy.write_text(text + f'\n[channels.email]\nunverified = "{unverified}"\n')
    assert settings.redis_url is not None
    return load_settings(_env_file=None, data_dir=settings.data_dir, redis_url=settings.redis_url.get_secret_value(),
                         policy=policy, smtp_port=0, smtp_recipients=RECIPIENT, **extra)


@dataclass
class RunningMail:
    port: int
    app: web.Application

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, timeout=60)

    def send(self, message: bytes, *, sender: str = "sender@example.net",
             rcpt: str = RECIPIENT) -> tuple[int, str]:
        """MAIL, RCPT, DATA without SIZE=; the reply to DATA (or to the first refusal)."""
        with self.smtp() as client:
            client.ehlo()
            code, text = client.mail(sender)
            if code != 250:
                return code, text.decode()
            code, text = client.rcpt(rcpt)
            if code not in (250, 251):
                return code, text.decode()
            code, text = client.data(message)
            return code, text.decode()


@contextmanager
def running_mail(settings: Settings, resolver: RecordResolver) -> Iterator[RunningMail]:
    """``create_app(settings)`` serving SMTP (and HTTP) from a background loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="broker", daemon=True)
    thread.start()
    app = create_app(settings)
    app[EMAIL_RESOLVER] = resolver
    runner = web.AppRunner(app)

    def on_loop(coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    on_loop(runner.setup())
    try:
        yield RunningMail(app[EMAIL_LISTENER].port, app)
    finally:
        on_loop(runner.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
