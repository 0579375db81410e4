"""The Slack edge against the real app over HTTP: Slack's entities decoded once, invisible-only
text refused, signed-but-malformed bodies and hang-ups answered with a quiet 4xx, and slash
commands without a trigger id kept apart per user."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator

import pytest
import redis

from intake.core.settings import Settings
from intake.storage.store import Store
from tests.functional.slack_harness import REQUESTER, STRANGER, SlackDriver, enrol_approvers, running_app

FORM = "application/x-www-form-urlencoded"


@pytest.fixture
async def slack(settings: Settings) -> AsyncIterator[SlackDriver]:
    enrol_approvers(settings)
    async with running_app(settings, "http") as driver:
        yield driver


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def written(rclient: redis.Redis) -> tuple[int, int, int]:
    return (len(rclient.keys("intake:idea:*")), len(rclient.keys("intake:delivery:*")),
            rclient.xlen("intake:audit") if rclient.exists("intake:audit") else 0)


def mrkdwn_texts(node) -> list[str]:  # type: ignore[no-untyped-def]
    if isinstance(node, dict):
        found = [node["text"]] if node.get("type") == "mrkdwn" else []
        return found + [t for v in node.values() for t in mrkdwn_texts(v)]
    if isinstance(node, list):
        return [t for v in node for t in mrkdwn_texts(v)]
    return []


async def test_slack_entities_are_decoded_once_and_the_card_escapes_again(slack: SlackDriver, store: Store) -> None:
    # Slack sends a typed "MSc & MBA <3" as "MSc &amp; MBA &lt;3"; a typed "&lt;" as "&amp;lt;".
    reply = await slack.command(REQUESTER, "MSc &amp; MBA &lt;3 &amp;lt;b&amp;gt;")
    idea_id = reply["text"].split("`")[1]
    assert store.get_idea(idea_id).text == "MSc & MBA <3 &lt;b&gt;"
    card = (await slack.sim.wait_for("chat.postMessage"))[0]
    blocks = card.params["blocks"]
    shown = "\n".join(mrkdwn_texts(json.loads(blocks) if isinstance(blocks, str) else blocks))
    assert "MSc &amp; MBA &lt;3 &amp;lt;b&amp;gt;" in shown and "&amp;amp;" not in shown


async def test_an_idea_of_only_invisible_characters_is_refused(slack: SlackDriver, rclient: redis.Redis) -> None:
    before = written(rclient)
    reply = await slack.command(REQUESTER, "\u200b\u200d\u2060\u202e\ufe0f \U000e0041")
    assert reply["text"].startswith("Not captured: idea text has nothing visible"), reply
    assert written(rclient) == before


async def test_hidden_characters_are_kept_and_marked_on_the_card(slack: SlackDriver, store: Store) -> None:
    reply = await slack.command(REQUESTER, "approve\u202e gnissim")
    idea_id = reply["text"].split("`")[1]
    assert store.get_idea(idea_id).text == "approve\u202e gnissim"  # stored as written
    card = (await slack.sim.wait_for("chat.postMessage"))[0]
    blocks = card.params["blocks"]
    shown = "\n".join(mrkdwn_texts(json.loads(blocks) if isinstance(blocks, str) else blocks))
    assert "approve⟨U+202E⟩ gnissim" in shown and "\u202e" not in shown


async def test_commands_without_a_trigger_id_never_share_a_delivery(slack: SlackDriver, store: Store) -> None:
    def body(user: str) -> bytes:
        return urllib.parse.urlencode({"command": "/intake", "text": "rotate the keys", "user_id": user,
                                       "team_id": "T00000001", "channel_id": "C0GENERAL1"}).encode()

    first = await slack.post_signed(body(REQUESTER), FORM)
    second = await slack.post_signed(body(STRANGER), FORM)
    retry = await slack.post_signed(body(REQUESTER), FORM)  # the same request again: the same idea
    ids = [reply[1]["text"].split("`")[1] for reply in (first, second, retry)]
    assert ids[0] != ids[1] and ids[2] == ids[0]
    assert store.get_idea(ids[0]).requester == f"slack:{REQUESTER}"
    assert store.get_idea(ids[1]).requester == f"slack:{STRANGER}"


MALFORMED: list[tuple[str, bytes, str]] = [
    ("not utf-8", b"command=%2Fintake&text=\xff\xfe", FORM),
    ("empty form", b"", FORM),
    ("form with neither command nor payload", b"foo=bar&baz=1", FORM),
    ("payload not json", b"payload=%7Bnot+json", FORM),
    ("payload a json list", b"payload=%5B1%2C2%5D", FORM),
    ("payload without type", b"payload=%7B%22user%22%3A%7B%22id%22%3A%22UERIN00001%22%7D%7D", FORM),
    ("block_actions with a string user", urllib.parse.urlencode({"payload": json.dumps(
        {"type": "block_actions", "user": "UERIN00001", "actions": [{"action_id": "intake_promote"}]})}).encode(), FORM),
    ("view_submission without a view", urllib.parse.urlencode({"payload": json.dumps(
        {"type": "view_submission", "user": {"id": "UERIN00001"}})}).encode(), FORM),
    ("json not json", b"{\"type\": ", "application/json"),
    ("json a list", b"[]", "application/json"),
    ("event_callback with a string event", b'{"type":"event_callback","event":"app_mention"}', "application/json"),
    ("event_callback mention with a list text", json.dumps({"type": "event_callback", "team_id": "T1", "event_id": "Ev1",
     "event": {"type": "app_mention", "user": "UERIN00001", "text": ["x"], "channel": "C1", "ts": "1.0"}}).encode(),
     "application/json"),
    ("url_verification without a challenge", b'{"type":"url_verification"}', "application/json"),
    ("wrong content type", b"command=%2Fintake&text=hi", "text/plain"),
    ("duplicate command keys", b"command=%2Fintake&command=%2Fother&text=hi&user_id=UERIN00001", FORM),
]


async def test_signed_malformed_bodies_get_a_4xx_and_write_nothing(
    slack: SlackDriver, rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = written(rclient)
    statuses = {}
    for name, body, ctype in MALFORMED:
        status, _ = await slack.post_signed(body, ctype)
        statuses[name] = status
    assert all(400 <= s < 500 for s in statuses.values()), statuses
    assert written(rclient) == before
    no_tracebacks(caplog)


async def test_slacks_ssl_check_is_answered(slack: SlackDriver, rclient: redis.Redis) -> None:
    before = written(rclient)
    status, _ = await slack.post_signed(b"ssl_check=1&token=x", FORM)
    assert status == 200 and written(rclient) == before


async def test_a_client_hanging_up_mid_body_is_a_quiet_refusal(
    slack: SlackDriver, rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = written(rclient)
    server = slack.client.server
    for headers in ("Content-Length: 5000\r\n", "Transfer-Encoding: chunked\r\n"):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write((f"POST /slack/events HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\n"
                      f"X-Slack-Request-Timestamp: {int(time.time())}\r\n{headers}\r\n").encode()
                     + (b"400\r\n" if "chunked" in headers else b"") + b"command=%2Fintake&text=")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    # The server notices the hang-up on its next read; a normal request after it shows it has.
    status, _ = await slack.post_signed(b"", FORM, secret="wrong")
    assert status == 401
    await asyncio.sleep(0.1)
    assert written(rclient) == before
    no_tracebacks(caplog)
