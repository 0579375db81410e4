"""The Slack simulator and Socket Mode server, driven by the real slack_sdk and slack_bolt."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from tests.slack_sim import BOT_USER_ID, SlackSim, SocketModeServer

STEP = 5.0  # upper bound for any single wait in these tests


@pytest.fixture
async def sim() -> AsyncIterator[SlackSim]:
    async with SocketModeServer() as server, SlackSim(socket_server=server) as s:
        yield s


# -- Web API -------------------------------------------------------------------------------


async def test_web_client_calls_are_answered_and_recorded(sim: SlackSim) -> None:
    assert sim.base_url.startswith("http://127.0.0.1:") and sim.base_url.endswith("/api/")
    client = AsyncWebClient(token="xoxb-test", base_url=sim.base_url)

    auth = await client.auth_test()
    assert (auth["user_id"], auth["bot_id"]) == (BOT_USER_ID, "BBOT00001")
    assert auth["team_id"] == "T00000001"

    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "hi"}}]
    before = int(time.time())
    first = await client.chat_postMessage(
        channel="C0123", text="hi", blocks=blocks, unfurl_links=False
    )
    second = await client.chat_postMessage(channel="C0123", text="again", thread_ts=first["ts"])
    assert first["channel"] == "C0123"
    assert re.fullmatch(r"[0-9]{10}\.[0-9]{6}", first["ts"]) and float(first["ts"]) >= before  # stamped now
    assert float(second["ts"]) > float(first["ts"])
    assert second["message"]["thread_ts"] == first["ts"]

    calls = await sim.wait_for("chat.postMessage", count=2)
    assert calls[0].params["channel"] == "C0123"
    assert calls[0].params["blocks"] == blocks  # JSON body keeps structure
    assert calls[0].params["unfurl_links"] is False
    assert calls[0].token == "xoxb-test"
    assert "token" not in calls[0].params
    assert calls[1].params["thread_ts"] == first["ts"]

    user = await client.users_info(user="U024BE7LH")  # a GET with query parameters
    assert user["user"]["id"] == "U024BE7LH"
    assert sim.calls_to("users.info")[0].http_method == "GET"
    assert [c.method for c in sim.calls] == [
        "auth.test",
        "chat.postMessage",
        "chat.postMessage",
        "users.info",
    ]


async def test_views_and_updates(sim: SlackSim) -> None:
    client = AsyncWebClient(token="xoxb-test", base_url=sim.base_url)
    view = {
        "type": "modal",
        "callback_id": "cb",
        "title": {"type": "plain_text", "text": "T"},
        "blocks": [],
    }
    opened = await client.views_open(trigger_id="123.456", view=view)
    assert opened["view"]["callback_id"] == "cb" and opened["view"]["id"].startswith("V")
    await client.views_update(view_id=opened["view"]["id"], view=view)
    updated = await client.chat_update(channel="C1", ts="1700000000.000100", text="new")
    assert updated["ts"] == "1700000000.000100"
    eph = await client.chat_postEphemeral(channel="C1", user="U024BE7LH", text="only you")
    assert eph["message_ts"]
    info = await client.conversations_info(channel="C1")
    assert info["channel"]["id"] == "C1"
    assert sim.calls_to("views.update")[0].params["view_id"] == opened["view"]["id"]


async def test_bad_token_is_invalid_auth(sim: SlackSim) -> None:
    client = AsyncWebClient(token="bogus", base_url=sim.base_url)
    with pytest.raises(SlackApiError) as info:
        await client.auth_test()
    assert info.value.response["error"] == "invalid_auth"


async def test_connections_open_needs_app_token(sim: SlackSim) -> None:
    client = AsyncWebClient(token="xoxb-test", base_url=sim.base_url)
    opened = await client.apps_connections_open(app_token="xapp-1-test")
    assert opened["url"] == sim.socket_server.ws_url  # type: ignore[union-attr]
    with pytest.raises(SlackApiError) as info:
        await client.apps_connections_open(app_token="xoxb-test")
    assert info.value.response["error"] == "not_allowed_token_type"
    with pytest.raises(SlackApiError):
        await AsyncWebClient(token="xapp-1-test", base_url=sim.base_url).auth_test()


async def test_fail_next_then_recover(sim: SlackSim) -> None:
    client = AsyncWebClient(token="xoxb-test", base_url=sim.base_url)
    sim.fail_next("chat.postMessage", error="ratelimited", status=429, retry_after=2)
    with pytest.raises(SlackApiError) as info:
        await client.chat_postMessage(channel="C1", text="x")
    assert info.value.response.status_code == 429
    assert info.value.response["error"] == "ratelimited"
    assert info.value.response.headers["Retry-After"] == "2"

    sim.fail_next("chat.update", error="message_not_found", count=2)
    for _ in range(2):
        with pytest.raises(SlackApiError):
            await client.chat_update(channel="C1", ts="1.2", text="x")
    assert (await client.chat_update(channel="C1", ts="1.2", text="x"))["ok"]
    assert (await client.chat_postMessage(channel="C1", text="x"))["ok"]
    assert len(sim.calls_to("chat.postMessage")) == 2  # failed calls are recorded too


async def test_set_response(sim: SlackSim) -> None:
    client = AsyncWebClient(token="xoxb-test", base_url=sim.base_url)
    sim.set_response(
        "users.info", lambda call: {"ok": True, "user": {"id": call.params["user"], "is_bot": True}}
    )
    assert (await client.users_info(user="U024BE7LH"))["user"]["is_bot"] is True


async def test_wait_for_times_out_with_a_useful_message(sim: SlackSim) -> None:
    with pytest.raises(AssertionError, match=r"chat\.postMessage.*got 0"):
        await sim.wait_for("chat.postMessage", timeout=0.1)


# -- Socket Mode through bolt --------------------------------------------------------------


@dataclass
class Seen:
    commands: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[dict[str, Any], list[str] | None]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Bolt:
    app: AsyncApp
    handler: AsyncSocketModeHandler
    server: SocketModeServer
    sim: SlackSim
    seen: Seen


async def _settle() -> None:
    """Let tasks cancelled by close() finish, so nothing is left pending at loop teardown."""
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    if others:
        await asyncio.wait(others, timeout=STEP)


@pytest.fixture(params=[False, True], ids=["ack-first", "process-before-response"])
async def bolt(sim: SlackSim, request: pytest.FixtureRequest) -> AsyncIterator[Bolt]:
    app = AsyncApp(
        client=AsyncWebClient(token="xoxb-test", base_url=sim.base_url),
        signing_secret="unused-in-socket-mode",
        process_before_response=request.param,
    )
    seen = Seen()

    @app.command("/intake")
    async def on_command(ack: Any, command: dict[str, Any]) -> None:
        seen.commands.append(command)
        if command["text"] == "boom":
            raise RuntimeError("listener failed")
        await ack(text="Captured as an idea")

    @app.event("app_mention")
    async def on_mention(event: dict[str, Any], request: Any) -> None:
        seen.events.append((event, request.headers.get("x-slack-retry-num")))
        if event["text"] == "slow":
            await seen.gate.wait()

    handler = AsyncSocketModeHandler(app, "xapp-1-test")
    server = sim.socket_server
    assert server is not None
    try:
        await asyncio.wait_for(handler.connect_async(), STEP)
        await server.wait_connected()
        yield Bolt(app, handler, server, sim, seen)
    finally:
        seen.gate.set()
        await handler.close_async()
        await _settle()


def mention_payload(text: str) -> dict[str, Any]:
    return {
        "type": "event_callback",
        "team_id": "T00000001",
        "api_app_id": "A00000001",
        "event_id": "Ev0001",
        "event_time": 1700000000,
        "event": {
            "type": "app_mention",
            "user": "U024BE7LH",
            "text": text,
            "channel": "C0123",
            "ts": "1.1",
        },
    }


def command_payload(text: str) -> dict[str, Any]:
    return {
        "token": "legacy-verification-token",
        "team_id": "T00000001",
        "channel_id": "C0123",
        "user_id": "U024BE7LH",
        "command": "/intake",
        "text": text,
        "response_url": "https://hooks.slack.com/commands/T00000001/1/abc",
        "trigger_id": "123.456.abc",
    }


async def test_socket_mode_command_is_run_and_acked(bolt: Bolt) -> None:
    # The client fetched its URL from the sim, as it would from Slack.
    assert bolt.sim.calls_to("apps.connections.open")[0].token == "xapp-1-test"

    payload = command_payload("add a health check")
    envelope_id = await bolt.server.send_envelope("slash_commands", payload)
    ack = await bolt.server.wait_ack(envelope_id, timeout=STEP)
    assert ack["envelope_id"] == envelope_id
    assert ack["payload"] == {"text": "Captured as an idea"}
    assert [c["text"] for c in bolt.seen.commands] == ["add a health check"]
    await bolt.sim.wait_for("auth.test")  # bolt's single-workspace authorize


async def test_socket_mode_failed_listener_is_not_acked(bolt: Bolt) -> None:
    # Bolt acks an envelope only when its response status is 200; a listener that raises
    # before ack() yields a 500, so Slack would redeliver.
    envelope_id = await bolt.server.send_envelope("slash_commands", command_payload("boom"))
    with pytest.raises(AssertionError, match="no ack"):
        await bolt.server.wait_ack(envelope_id, timeout=0.5)
    assert len(bolt.seen.commands) == 1


async def test_socket_mode_event_ack_timing(bolt: Bolt) -> None:
    envelope_id = await bolt.server.send_envelope("events_api", mention_payload("slow"))
    for _ in range(int(STEP / 0.02)):
        if bolt.seen.events:
            break
        await asyncio.sleep(0.02)
    assert bolt.seen.events, "listener did not start"
    if bolt.app.process_before_response:
        # The ack waits for the listener: safe to store first, then ack.
        with pytest.raises(AssertionError, match="no ack"):
            await bolt.server.wait_ack(envelope_id, timeout=0.3)
        bolt.seen.gate.set()
    else:
        # Events are auto-acknowledged before the listener body has finished.
        await bolt.server.wait_ack(envelope_id, timeout=STEP)
        bolt.seen.gate.set()
    assert (await bolt.server.wait_ack(envelope_id, timeout=STEP)) == {"envelope_id": envelope_id}


async def test_socket_mode_event_retry_headers(bolt: Bolt) -> None:
    event = mention_payload("hi")
    first = await bolt.server.send_envelope("events_api", event)
    retry = await bolt.server.send_envelope(
        "events_api", event, retry_attempt=1, retry_reason="timeout"
    )
    assert (await bolt.server.wait_ack(first, timeout=STEP)) == {"envelope_id": first}
    assert (await bolt.server.wait_ack(retry, timeout=STEP)) == {"envelope_id": retry}
    for _ in range(int(STEP / 0.02)):
        if len(bolt.seen.events) == 2:
            break
        await asyncio.sleep(0.02)
    # A first delivery carries retry_attempt 0, which bolt turns into x-slack-retry-num "0"
    # (over HTTP Slack omits the header): a retry is num >= 1, not "header present".
    assert sorted(h for _, h in bolt.seen.events) == [["0"], ["1"]]


async def test_socket_mode_reconnects_on_disconnect(bolt: Bolt) -> None:
    await bolt.server.send_disconnect()
    await bolt.server.wait_connected(count=2, timeout=STEP)
    assert len(bolt.sim.calls_to("apps.connections.open")) == 2
    payload = command_payload("after reconnect")
    envelope_id = await bolt.server.send_envelope("slash_commands", payload)
    assert (await bolt.server.wait_ack(envelope_id, timeout=STEP))["envelope_id"] == envelope_id
