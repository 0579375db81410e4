"""Property tests at every channel's edge: hypothesis generates malformed input (random bytes,
non-object JSON, and real payload shapes with parts replaced by arbitrary JSON), signs it the
way the sender would so it reaches the parser, and posts it to the real app. Whatever it sends:
never a 5xx, and a refused request writes nothing."""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from aiohttp import web
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from intake.app import create_app
from intake.channels.gitlab import sign_standard_webhook
from intake.channels.slack.verify import compute_signature
from intake.channels.webhooks import sign_hmac_sha256
from intake.core.settings import Settings, load_settings
from tests.functional.slack_harness import SIGNING_SECRET
from tests.functional.webhook_harness import GITHUB_SECRET, GITLAB_SIGNING, GITLAB_TOKEN, JIRA_SECRET, vector
from tests.slack_sim import SlackSim

PROPERTY = hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """``base`` with one to three of its values (at any depth) replaced by arbitrary JSON."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        node = data
        while isinstance(node, (dict, list)) and node:
            key: Any = draw(st.sampled_from(sorted(node))) if isinstance(node, dict) else draw(
                st.integers(0, len(node) - 1))
            child = node[key]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                node = child
                continue
            node[key] = draw(json_values)
            break
    return data


def bodies(*bases: Any) -> st.SearchStrategy[bytes]:
    shaped = st.sampled_from(bases).flatmap(mutated).map(lambda d: json.dumps(d).encode())
    return st.one_of(shaped, st.binary(max_size=300), json_values.map(lambda d: json.dumps(d).encode()))


FOLLOW_UPS = frozenset({"idea.announced", "card.posting", "card.duplicate", "outbox.dropped"})


def _action(fields: dict[str, str]) -> str | None:
    try:
        return json.loads(fields.get("e", "")).get("action")
    except (ValueError, AttributeError):
        return None


@dataclass
class Edge:
    port: int
    rclient: redis.Redis

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("POST", path, body=body, headers=headers)
        status = conn.getresponse().status
        conn.close()
        return status

    def written(self) -> tuple[int, int, int]:
        r = self.rclient
        # The Slack notifier's follow-ups to an earlier capture (its card) land whenever they
        # land: they are not this request's writes.
        events = [f for _, f in r.xrange("intake:audit")]
        return (len(r.keys("intake:idea:*")), len(r.keys("intake:delivery:*")),
                sum(1 for f in events if _action(f) not in FOLLOW_UPS))

    def check(self, path: str, body: bytes, headers: dict[str, str], *, captured_ok: tuple[int, ...]) -> None:
        """The property: no 5xx; unless the request was one that captures, nothing written."""
        before = self.written()
        status = self.post(path, body, headers)
        assert status < 500, status
        if status not in captured_ok:
            assert self.written() == before, status


@contextmanager
def serving(base: Settings, rclient: redis.Redis) -> Iterator[Edge]:
    """The real app with Slack (against a simulator) and every webhook on, in its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    sim = SlackSim()
    run(sim.start())
    assert base.redis_url is not None
    settings = load_settings(
        _env_file=None, data_dir=base.data_dir, redis_url=base.redis_url.get_secret_value(),
        policy=base.policy_path, SLACK_BOT_TOKEN="xoxb-test", SLACK_SIGNING_SECRET=SIGNING_SECRET,
        SLACK_API_URL=sim.base_url, github_webhook_secret=GITHUB_SECRET, gitlab_webhook_token=GITLAB_TOKEN,
        gitlab_signing_token=GITLAB_SIGNING, jira_webhook_secret=JIRA_SECRET,
    )
    runner = web.AppRunner(create_app(settings))
    run(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    run(site.start())
    try:
        yield Edge(site._server.sockets[0].getsockname()[1], rclient)  # type: ignore[union-attr]
    finally:
        run(runner.cleanup())
        run(sim.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture
def edge(settings: Settings, rclient: redis.Redis) -> Iterator[Edge]:
    with serving(settings, rclient) as running:
        yield running


GITHUB_BASES = [vector("github/issues_opened.json"), vector("github/issue_comment_created.json"),
                vector("github/issues_labeled.json")]


def test_github_parser_never_fails_open(edge: Edge) -> None:
    @PROPERTY
    @given(body=bodies(*GITHUB_BASES), event=st.sampled_from(["issues", "issue_comment", "ping", "push", "x y"]),
           delivery=header_text)
    def prop(body: bytes, event: str, delivery: str) -> None:
        edge.check("/webhooks/github", body, {
            "Content-Type": "application/json", "X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": sign_hmac_sha256(GITHUB_SECRET, body)}, captured_ok=(202,))

    prop()


def test_gitlab_parser_never_fails_open(edge: Edge) -> None:
    @PROPERTY
    @given(body=bodies(vector("gitlab/issue_open.json"), vector("gitlab/note_issue.json")),
           event=st.sampled_from(["Issue Hook", "Note Hook", "Push Hook", ""]), key=header_text)
    def prop(body: bytes, event: str, key: str) -> None:
        stamp = str(int(time.time()))
        webhook_id = key or "id"
        edge.check("/webhooks/gitlab", body, {
            "Content-Type": "application/json", "X-Gitlab-Event": event, "X-Gitlab-Token": GITLAB_TOKEN,
            "Idempotency-Key": key, "webhook-id": webhook_id, "webhook-timestamp": stamp,
            "webhook-signature": sign_standard_webhook(GITLAB_SIGNING, webhook_id, stamp, body)},
            captured_ok=(202,))

    prop()


def test_jira_parser_never_fails_open(edge: Edge) -> None:
    @PROPERTY
    @given(body=bodies(vector("jira/issue_created.json"), vector("jira/comment_created.json")), ident=header_text)
    def prop(body: bytes, ident: str) -> None:
        edge.check("/webhooks/jira", body, {
            "Content-Type": "application/json", "X-Atlassian-Webhook-Identifier": ident,
            "X-Hub-Signature": sign_hmac_sha256(JIRA_SECRET, body)}, captured_ok=(202,))

    prop()


SLACK_EVENT = {"type": "event_callback", "team_id": "T00000001", "api_app_id": "A00000001", "event_id": "Ev1",
               "event": {"type": "app_mention", "user": "UERIN00001", "text": "<@UBOT00001> hi",
                         "channel": "C0GENERAL1", "ts": "1.0"}}
SLACK_PAYLOADS = [
    {"type": "block_actions", "user": {"id": "UERIN00001"}, "team": {"id": "T00000001"}, "trigger_id": "t.1",
     "channel": {"id": "C0APPROVALS"}, "actions": [{"action_id": "intake_promote", "value": "I-0123456789ab"}]},
    {"type": "view_submission", "user": {"id": "UERIN00001"}, "view": {
        "callback_id": "intake_promote_submit", "private_metadata": "{\"idea\": \"I-0123456789ab\"}",
        "state": {"values": {"code": {"code": {"type": "plain_text_input", "value": "123456"}}}}}},
    {"type": "message_action", "callback_id": "intake_send", "trigger_id": "t.2", "user": {"id": "UERIN00001"},
     "team": {"id": "T00000001"}, "channel": {"id": "C0GENERAL1"},
     "message": {"type": "message", "user": "UERIN00001", "text": "hi", "ts": "1.0"}},
]
SLACK_FORM_KEYS = st.sampled_from(["command", "text", "user_id", "trigger_id", "team_id", "channel_id", "x"])


def slack_bodies() -> st.SearchStrategy[tuple[bytes, str]]:
    form = "application/x-www-form-urlencoded"
    commands = st.dictionaries(SLACK_FORM_KEYS, st.text(max_size=30), max_size=6).map(
        lambda d: (urllib.parse.urlencode(d).encode(), form))
    payloads = st.sampled_from(SLACK_PAYLOADS).flatmap(mutated).map(
        lambda d: (urllib.parse.urlencode({"payload": json.dumps(d)}).encode(), form))
    events = mutated(SLACK_EVENT).map(lambda d: (json.dumps(d).encode(), "application/json"))
    raw = st.tuples(st.binary(max_size=200), st.sampled_from([form, "application/json", "text/plain"]))
    return st.one_of(commands, payloads, events, raw)


def test_slack_parsers_never_fail_open(edge: Edge) -> None:
    empty_actions = {**SLACK_PAYLOADS[0], "actions": []}  # found by hypothesis: bolt read actions[0] (a 500)

    @PROPERTY
    @given(sent=slack_bodies())
    @example(sent=(urllib.parse.urlencode({"payload": json.dumps(empty_actions)}).encode(),
                   "application/x-www-form-urlencoded"))
    def prop(sent: tuple[bytes, str]) -> None:
        body, ctype = sent
        ts = str(int(time.time()))
        edge.check("/slack/events", body, {
            "Content-Type": ctype, "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": compute_signature(body=body, timestamp=ts, signing_secret=SIGNING_SECRET)},
            captured_ok=(200,))  # Slack's answers are 200 whether or not an idea was captured

    prop()
