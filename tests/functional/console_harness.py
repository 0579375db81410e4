"""Run the real intake app on 127.0.0.1 in a background thread, for browser-driven tests.

The console origin is ``http://localhost:<port>`` (browsers refuse an IP address as a WebAuthn
RP id); Chromium resolves ``localhost`` to the loopback address the server binds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyotp
from aiohttp import web

from intake.app import BROKER, SETTINGS, create_app
from intake.core.settings import Settings, load_settings
from intake.runtime import EXAMPLE_POLICY, Broker, open_broker
from tests.factories import previous_step_code
from tests.functional.test_serve import free_port

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def console_policy(tmp: Path, extra: str = "") -> Path:
    """The example policy (alice is its admin), plus ``extra`` TOML."""
    path = tmp / "policy.toml"
    path.write_text(EXAMPLE_POLICY.read_text() + extra)
    return path


def console_settings(base: Settings, port: int, policy: Path) -> Settings:
    assert base.redis_url is not None
    return load_settings(_env_file=None, data_dir=base.data_dir, redis_url=base.redis_url.get_secret_value(),
                         policy=policy, port=port, console_origin=f"http://localhost:{port}", sweep_interval=60)


def enrol(settings: Settings, *names: str) -> dict[str, pyotp.TOTP]:
    """Confirmed approvers; each confirmed with the previous step's code, so "now" and the next
    step stay free for the test (two fresh codes each)."""
    totps = {}
    with open_broker(settings) as broker:
        for name in names:
            broker.approvers.add(broker.policy, name, name=name.title(),
                                             groups=broker.policy.groups_of(name), slack_user=None,
                                             email=None, actor="cli:root")
            enrolment = broker.approvers.enrol(name, actor=f"approver:{name}")
            totps[name] = pyotp.parse_uri(enrolment.otpauth_uri)
            broker.approvers.confirm(name, previous_step_code(totps[name]), actor=f"approver:{name}")
    return totps


def code_now(totp: pyotp.TOTP) -> str:
    return totp.now()


def code_next(totp: pyotp.TOTP) -> str:
    return totp.at(time.time() + 30)


@dataclass
class Running:
    url: str
    app: web.Application

    @property
    def broker(self) -> Broker:
        return self.app[BROKER]

    @property
    def settings(self) -> Settings:
        return self.app[SETTINGS]


@contextmanager
def serve(settings: Settings) -> Iterator[Running]:
    """The app from ``create_app`` on 127.0.0.1:``settings.port`` until the block ends."""
    loop = asyncio.new_event_loop()
    app = create_app(settings)
    runner = web.AppRunner(app)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", settings.port).start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="console-server", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise RuntimeError("the console server did not start")
    try:
        yield Running(settings.console_origin, app)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


__all__ = ["CHROMIUM_ARGS", "Running", "code_next", "code_now", "console_policy", "console_settings", "enrol",
           "free_port", "serve"]
