"""Drive the real intake app as Slack would, over HTTP (signed requests) or Socket Mode.

The app is :func:`intake.app.create_app` on 127.0.0.1, its Slack Web API client pointed at a
:class:`~tests.slack_sim.SlackSim`. A :class:`SlackDriver` sends one kind of Slack request and
returns what the app acknowledged with, the same way for both transports, so every scenario
runs over both.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pyotp
from aiohttp.test_utils import TestClient, TestServer

from intake.app import create_app
from intake.channels.slack.verify import compute_signature
from intake.core.settings import Settings, load_settings
from intake.runtime import open_broker
from tests.factories import previous_step_code
from tests.slack_sim import SlackSim, SocketModeServer

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
APPROVALS = "C0APPROVALS"
SLACK_USERS = {"alice": "UALICE0001", "bob": "UBOB000001", "carol": "UCAROL0001", "dave": "UDAVE00001"}
REQUESTER = "UERIN00001"
STRANGER = "UMALLORY01"


def slack_settings(base: Settings, sim: SlackSim, transport: str, **overrides: Any) -> Settings:
    extra: dict[str, Any] = {"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_API_URL": sim.base_url}
    if transport == "http":
        extra["SLACK_SIGNING_SECRET"] = SIGNING_SECRET
    else:
        extra["SLACK_APP_TOKEN"] = "xapp-1-test"
    assert base.redis_url is not None
    return load_settings(
        _env_file=None, data_dir=base.data_dir, redis_url=base.redis_url.get_secret_value(),
        **{"policy": base.policy_path, "sweep_interval": 0.1, "outbox_retry_ms": 200, "outbox_retry_cap": 1,
           "outbox_lease": 1.5, "slack_rate": 500, **extra, **overrides},
    )


def enrol_approvers(settings: Settings) -> dict[str, pyotp.TOTP]:
    """alice, bob (platform), carol, dave (security), confirmed, each with a Slack user id."""
    totps = {}
    with open_broker(settings) as broker:
        for name, slack_user in SLACK_USERS.items():
            group = broker.policy.groups_of(name)
            broker.approvers.add(broker.policy, name, name=name.title(), groups=group,
                                             slack_user=slack_user, email=None, actor="cli:root")
            enrolment = broker.approvers.enrol(name, actor=f"approver:{name}")
            totps[name] = pyotp.parse_uri(enrolment.otpauth_uri)
            # The previous step's code: "now" stays free for the test's first approval.
            broker.approvers.confirm(name, previous_step_code(totps[name]), actor=f"approver:{name}")
    return totps


@dataclass
class SlackDriver:
    transport: str
    client: TestClient
    sim: SlackSim
    socket: SocketModeServer | None
    counter: int = field(default=0)

    def _next(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter:06d}"

    # -- sending ---------------------------------------------------------------------------
    async def post_signed(self, body: bytes, content_type: str, headers: dict[str, str] | None = None,
                          *, timestamp: str | None = None, secret: str = SIGNING_SECRET) -> tuple[int, Any]:
        ts = timestamp if timestamp is not None else str(int(time.time()))
        sig = compute_signature(body=body, timestamp=ts, signing_secret=secret)
        all_headers = {"Content-Type": content_type, "X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig}
        all_headers.update(headers or {})
        resp = await self.client.post("/slack/events", data=body, headers=all_headers)
        text = await resp.text()
        try:
            return resp.status, json.loads(text) if text else {}
        except ValueError:
            return resp.status, text

    async def _send(self, kind: str, payload: dict[str, Any], *, retry: int = 0) -> Any:
        if self.transport == "http":
            if kind == "slash_commands":
                body = urllib.parse.urlencode(payload).encode()
                ctype = "application/x-www-form-urlencoded"
            elif kind == "interactive":
                body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
                ctype = "application/x-www-form-urlencoded"
            else:
                body, ctype = json.dumps(payload).encode(), "application/json"
            headers = {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "timeout"} if retry else {}
            status, data = await self.post_signed(body, ctype, headers)
            assert status == 200, (status, data)
            return data
        assert self.socket is not None
        envelope = await self.socket.send_envelope(kind, payload, retry_attempt=retry,
                                                   retry_reason="timeout" if retry else "")
        ack = await self.socket.wait_ack(envelope, timeout=10)
        return ack.get("payload") or {}

    async def command(self, user: str, text: str, *, trigger_id: str | None = None) -> dict[str, Any]:
        payload = {"token": "x", "team_id": "T00000001", "channel_id": "C0GENERAL1", "user_id": user,
                   "command": "/intake", "text": text, "response_url": "https://hooks.slack.invalid/1",
                   "trigger_id": trigger_id or self._next("trig.")}
        data = await self._send("slash_commands", payload)
        return data if isinstance(data, dict) else {"text": data}

    async def mention(self, user: str, text: str, *, event_id: str, retry: int = 0) -> None:
        payload = {"type": "event_callback", "team_id": "T00000001", "api_app_id": "A00000001",
                   "event_id": event_id, "event_time": int(time.time()),
                   "event": {"type": "app_mention", "user": user, "text": f"<@UBOT00001> {text}",
                             "channel": "C0GENERAL1", "ts": f"{time.time():.6f}"}}
        await self._send("events_api", payload, retry=retry)

    async def shortcut(self, user: str, author: str, text: str, ts: str) -> None:
        payload = {"type": "message_action", "callback_id": "intake_send", "trigger_id": self._next("trig."),
                   "user": {"id": user}, "team": {"id": "T00000001"}, "channel": {"id": "C0GENERAL1"},
                   "message": {"type": "message", "user": author, "text": text, "ts": ts}}
        await self._send("interactive", payload)

    async def press(self, user: str, action_id: str, value: str) -> None:
        payload = {"type": "block_actions", "user": {"id": user}, "team": {"id": "T00000001"},
                   "api_app_id": "A00000001", "trigger_id": self._next("trig."),
                   "container": {"type": "message", "channel_id": APPROVALS, "message_ts": "1.0"},
                   "channel": {"id": APPROVALS},
                   "actions": [{"action_id": action_id, "block_id": "idea_actions", "value": value,
                                "type": "button", "action_ts": "1.0"}]}
        await self._send("interactive", payload)

    async def submit(self, user: str, view: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """Submit a modal the app opened, with ``values`` by block id."""
        state: dict[str, Any] = {}
        for block_id, value in values.items():
            if block_id in ("repo", "change_type"):
                state[block_id] = {block_id: {"type": "static_select", "selected_option": {"value": value}}}
            else:
                state[block_id] = {block_id: {"type": "plain_text_input", "value": value}}
        payload = {"type": "view_submission", "user": {"id": user}, "team": {"id": "T00000001"},
                   "api_app_id": "A00000001", "trigger_id": self._next("trig."),
                   "view": {"id": self._next("V"), "type": "modal", "callback_id": view["callback_id"],
                            "private_metadata": view["private_metadata"], "state": {"values": state}}}
        data = await self._send("interactive", payload)
        return data if isinstance(data, dict) else {}

    async def opened_view(self, count: int) -> dict[str, Any]:
        """The view of the ``count``-th views.open call."""
        calls = await self.sim.wait_for("views.open", count=count)
        view = calls[count - 1].params["view"]
        return json.loads(view) if isinstance(view, str) else view


@asynccontextmanager
async def running_app(base: Settings, transport: str, **overrides: Any) -> AsyncIterator[SlackDriver]:
    """The real app with Slack on, against a fresh simulator (and Socket Mode server);
    ``overrides`` are settings (e.g. ``outbox_max_age``)."""
    socket = SocketModeServer() if transport == "socket" else None
    if socket is not None:
        await socket.start()
    sim = SlackSim(socket_server=socket)
    await sim.start()
    settings = slack_settings(base, sim, transport, **overrides)
    server = TestServer(create_app(settings), host="127.0.0.1")
    client = TestClient(server)
    await client.start_server()
    try:
        if socket is not None:
            await socket.wait_connected(timeout=10)
        yield SlackDriver(transport, client, sim, socket)
    finally:
        await client.close()
        await sim.stop()
        if socket is not None:
            await socket.stop()
