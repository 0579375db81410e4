"""The broker's real app served from a background thread (TCP on 127.0.0.1 and the data dir's
unix socket), and approvers enrolled with codes left for the test to spend."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import pyotp
from aiohttp import web

from intake.app import create_app
from intake.audit.ledger import Ledger
from intake.cli.client import UnixConnection
from intake.core.settings import Settings
from intake.people.approvers import Approvers, SecretBox
from intake.people.mfa import StepUp
from intake.people.registry import People
from intake.protocol.keyfiles import load_secret
from intake.runtime import open_broker
from intake.serve import listen_unix
from intake.storage.store import Store


@dataclass
class RunningBroker:
    tcp_url: str
    socket_url: str


@contextmanager
def running_broker(settings: Settings) -> Iterator[RunningBroker]:
    """``create_app(settings)`` listening as ``intake serve`` does, until the block ends."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="broker", daemon=True)
    thread.start()
    runner = web.AppRunner(create_app(settings))

    def on_loop(coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    on_loop(runner.setup())
    try:
        tcp = web.TCPSite(runner, "127.0.0.1", 0)
        on_loop(tcp.start())
        port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        sock_path = settings.data_dir / "intake.sock"
        on_loop(web.SockSite(runner, listen_unix(sock_path)).start())
        yield RunningBroker(f"http://127.0.0.1:{port}", f"unix://{sock_path}")
    finally:
        on_loop(runner.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        (settings.data_dir / "intake.sock").unlink(missing_ok=True)


class Codes:
    """A person's next codes: this step's, then the next step's. Both are valid (±1 step)
    whenever the broker checks them, and each is later than the last, so neither is a replay."""

    def __init__(self, totp: pyotp.TOTP) -> None:
        self.totp, self.used = totp, 0

    def next(self) -> str:
        assert self.used < 2, "only two codes per test are safe to use without waiting"
        self.used += 1
        return self.totp.at(time.time() + 30 * (self.used - 1))


def enrol(settings: Settings, people: dict[str, tuple[str, tuple[str, ...]]]) -> dict[str, Codes]:
    """Enrol and confirm approvers directly (test setup, as an operator would through the API),
    linking the given identities. Confirmation spends an hour-old step, leaving fresh codes."""
    from intake.core.policy import load_policy

    out = {}
    with open_broker(settings) as broker:
        past = Store(broker.client, broker.audit, prefix=settings.key_prefix, clock=lambda: time.time() - 3600)
        approvers = Approvers(past, SecretBox(load_secret(settings, "secrets")), StepUp(past), Ledger(past.audit))
        policy = load_policy(settings.policy_path)
        for who, (group, links) in people.items():
            approvers.add(policy, who, name=who.title(), groups=(group,), slack_user=None,
                                      email=None, actor="test:setup")
            enrolment = approvers.enrol(who, actor=f"approver:{who}")
            totp = pyotp.parse_uri(enrolment.otpauth_uri)
            approvers.confirm(who, totp.at(time.time() - 3600), actor=f"approver:{who}")
            if links:
                People(broker.store).upsert(who, name=None, identities=links, actor="test:setup")
            out[who] = Codes(totp)
        broker.audit.seal_pending()
    return out


def link_os_user(settings: Settings, person: str = "operator") -> str:
    """Link the OS user running the tests to ``person`` (created if new): over the socket, an
    unlinked OS user reads nothing. Returns the person id."""
    import getpass

    with open_broker(settings) as broker:
        People(broker.store).upsert(person, name=person.title(), identities=(f"os:{getpass.getuser()}",),
                                    actor="test:setup")
        broker.audit.seal_pending()
    return person


def post(url: str, path: str, body: bytes, token: str | None = None) -> tuple[int, bytes]:
    """A raw POST on the socket (``unix://``) or over TCP, answering (status, body)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        conn: http.client.HTTPConnection = UnixConnection(parts.path, 30)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", "/api/v1" + path, body=body, headers=headers)
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out
