"""Slack end to end: the real app, signed requests or Socket Mode, a Slack API simulator."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pyotp
import pytest
import redis

from intake.core.models import Channel, IdeaState, TaskState
from intake.core.settings import Settings, load_settings
from intake.runtime import EXAMPLE_POLICY
from intake.storage.store import Store
from tests.factories import draft
from tests.functional.slack_harness import (
    APPROVALS,
    REQUESTER,
    SLACK_USERS,
    STRANGER,
    SlackDriver,
    enrol_approvers,
    running_app,
)


@pytest.fixture(params=["http", "socket"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def totps(settings: Settings) -> dict[str, pyotp.TOTP]:
    return enrol_approvers(settings)


@pytest.fixture
async def slack(settings: Settings, transport: str, totps: dict) -> AsyncIterator[SlackDriver]:
    async with running_app(settings, transport) as driver:
        yield driver


def idea_id_from(reply: dict) -> str:
    text = reply["text"]
    assert "Captured as idea `I-" in text, text
    return text.split("`")[1]


async def wait_state(store: Store, get, want, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        current = get()
        if current.state == want:
            return current
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting: still {current.state}, wanted {want}")
        await asyncio.sleep(0.02)


def mrkdwn_texts(node) -> list[str]:  # type: ignore[no-untyped-def]
    """Every mrkdwn text object in a Block Kit tree (plain_text is never parsed by Slack)."""
    if isinstance(node, dict):
        found = [node["text"]] if node.get("type") == "mrkdwn" else []
        return found + [t for v in node.values() for t in mrkdwn_texts(v)]
    if isinstance(node, list):
        return [t for v in node for t in mrkdwn_texts(v)]
    return []


def blocks_text(call) -> str:  # type: ignore[no-untyped-def]
    blocks = call.params.get("blocks")
    return blocks if isinstance(blocks, str) else json.dumps(blocks)


# -- transport authentication -------------------------------------------------------------------
async def test_forged_stale_and_malformed_requests_write_nothing(
    settings: Settings, totps: dict, rclient: redis.Redis
) -> None:
    events_before = rclient.xlen("intake:audit")  # the approvers' enrolment
    async with running_app(settings, "http") as slack:
        body = b"command=%2Fintake&text=deploy+now&user_id=UERIN00001&trigger_id=t1&team_id=T1&channel_id=C1"
        form = "application/x-www-form-urlencoded"
        now = int(time.time())
        cases = [
            await slack.post_signed(body, form, secret="not-the-secret"),
            await slack.post_signed(body, form, timestamp=str(now - 301)),
            await slack.post_signed(body, form, timestamp=str(now + 301)),
            await slack.post_signed(body, form, timestamp="1e9"),
            await slack.post_signed(body, form, timestamp="9" * 5000),
            await slack.post_signed(b"x" * (settings.slack_max_body + 1), form),
        ]
        tampered = await slack.client.post("/slack/events", data=body + b"x", headers={
            "Content-Type": form, "X-Slack-Request-Timestamp": str(now),
            "X-Slack-Signature": "v0=" + "0" * 64})
        missing = await slack.client.post("/slack/events", data=body, headers={"Content-Type": form})
        assert [status for status, _ in cases] == [401] * len(cases)
        assert tampered.status == 401 and missing.status == 401
        assert cases[0][1] == {"error": "invalid request"}
    assert rclient.keys("intake:idea:*") == [] and rclient.xlen("intake:audit") == events_before


# -- filing -------------------------------------------------------------------------------------
async def test_command_files_idea_and_card_renders_inert(slack: SlackDriver, store: Store) -> None:
    hostile = "Fix <!channel> typo & see <https://evil.example|https://github.com/acme/web> <@UALICE0001>"
    reply = await slack.command(REQUESTER, hostile, trigger_id="trig.same")
    idea_id = idea_id_from(reply)
    again = await slack.command(REQUESTER, hostile, trigger_id="trig.same")  # Slack resending
    assert idea_id_from(again) == idea_id
    idea = store.get_idea(idea_id)
    assert idea.text == hostile and idea.requester == f"slack:{REQUESTER}" and idea.channel is Channel.SLACK
    card = (await slack.sim.wait_for("chat.postMessage"))[0]
    assert card.params["channel"] == APPROVALS
    rendered = "\n".join(mrkdwn_texts(json.loads(blocks_text(card))))
    assert "&lt;!channel&gt;" in rendered and "<!channel>" not in rendered
    assert "<https://evil.example" not in rendered and "&lt;@UALICE0001&gt;" in rendered
    assert "<@UALICE0001>" not in rendered and f"<@{REQUESTER}>" in rendered  # only broker-built mentions
    announced = await wait_state(store, lambda: store.get_idea(idea_id), IdeaState.AWAITING_APPROVAL)
    assert announced.card is not None and announced.card["channel"] == APPROVALS


async def test_mention_retries_create_one_idea(slack: SlackDriver, store: Store) -> None:
    await slack.mention(REQUESTER, "please bump pytest", event_id="Ev0RETRY1")
    await slack.mention(REQUESTER, "please bump pytest", event_id="Ev0RETRY1", retry=1)
    await slack.mention(REQUESTER, "please bump pytest", event_id="Ev0RETRY1", retry=2)
    ideas = store.recent_ideas()
    assert len(ideas) == 1 and ideas[0].text == "please bump pytest"
    ephemerals = await slack.sim.wait_for("chat.postEphemeral")
    assert len(ephemerals) == 1 and ideas[0].id in ephemerals[0].params["text"]


async def test_message_shortcut_makes_the_author_the_requester(slack: SlackDriver, store: Store) -> None:
    await slack.shortcut(REQUESTER, "UAUTHOR001", "the login page 500s on empty passwords", "1700.1")
    await slack.shortcut(REQUESTER, "UAUTHOR001", "the login page 500s on empty passwords", "1700.1")
    (idea,) = store.recent_ideas()
    assert idea.requester == "slack:UAUTHOR001" and idea.filed_by == f"slack:{REQUESTER}"
    assert idea.provenance["message_author"] == "UAUTHOR001" and idea.provenance["via"] == "message_shortcut"


async def test_a_colleague_shortcutting_alices_message_does_not_let_alice_approve_it(
    slack: SlackDriver, store: Store, totps: dict[str, pyotp.TOTP]
) -> None:
    """The standard tier needs one approval: if alice could promote her own words because a
    colleague sent them in, she would approve herself alone."""
    await slack.shortcut(REQUESTER, SLACK_USERS["alice"], "please add me to the deploy group", "1700.2")
    (idea,) = store.recent_ideas()
    assert idea.requester == f"slack:{SLACK_USERS['alice']}"
    await slack.press(SLACK_USERS["alice"], "intake_promote", idea.id)
    view = await slack.opened_view(1)
    answer = await slack.submit(SLACK_USERS["alice"], view,
                                {"repo": "acme/web", "change_type": "docs", "code": totps["alice"].now()})
    assert answer["response_action"] == "errors" and "your own request" in answer["errors"]["code"]
    assert store.get_idea(idea.id).state is not IdeaState.PROMOTED
    refusals = [e for e in store.audit.export() if e["action"] == "approval.refused"]
    assert [e["data"]["reason"] for e in refusals] == ["self_approval"]


async def test_help_and_empty(slack: SlackDriver, store: Store) -> None:
    reply = await slack.command(REQUESTER, "help")
    assert "/intake <what you need>" in reply["text"]
    assert store.recent_ideas() == []


# -- approving -------------------------------------------------------------------------------------
async def test_non_approver_pressing_promote_changes_nothing(slack: SlackDriver, store: Store) -> None:
    idea_id = idea_id_from(await slack.command(REQUESTER, "rotate the keys"))
    await slack.sim.wait_for("chat.postMessage")
    before = await wait_state(store, lambda: store.get_idea(idea_id), IdeaState.AWAITING_APPROVAL)
    await slack.press(STRANGER, "intake_promote", idea_id)
    refusal = (await slack.sim.wait_for("chat.postEphemeral"))[-1]
    assert refusal.params["user"] == STRANGER and "Nothing was changed" in refusal.params["text"]
    assert slack.sim.calls_to("views.open") == []
    assert store.get_idea(idea_id) == before
    assert [e["data"]["reason"] for e in store.audit.export() if e["action"] == "approval.refused"] == ["not_approver"]


async def test_wrong_and_replayed_codes_show_on_the_modal(
    slack: SlackDriver, store: Store, totps: dict[str, pyotp.TOTP]
) -> None:
    first = idea_id_from(await slack.command(REQUESTER, "document the retry flag"))
    second = idea_id_from(await slack.command(REQUESTER, "document the timeout flag"))
    await slack.press(SLACK_USERS["alice"], "intake_promote", first)
    view = await slack.opened_view(1)
    assert view["callback_id"] == "intake_promote_submit"
    good = totps["alice"].now()
    wrong = "000000" if good != "000000" else "111111"
    answer = await slack.submit(SLACK_USERS["alice"], view, {"repo": "acme/web", "change_type": "docs", "code": wrong})
    assert answer["response_action"] == "errors" and "not valid" in answer["errors"]["code"]
    ok = await slack.submit(SLACK_USERS["alice"], view, {"repo": "acme/web", "change_type": "docs", "code": good})
    assert ok.get("response_action") is None
    assert store.get_idea(first).state is IdeaState.PROMOTED
    await slack.press(SLACK_USERS["alice"], "intake_promote", second)
    view2 = await slack.opened_view(2)
    replay = await slack.submit(SLACK_USERS["alice"], view2, {"repo": "acme/web", "change_type": "docs", "code": good})
    assert "already used" in replay["errors"]["code"]
    assert store.get_idea(second).state is not IdeaState.PROMOTED


async def test_two_approver_flow_from_the_card(slack: SlackDriver, store: Store, totps: dict[str, pyotp.TOTP]) -> None:
    idea_id = idea_id_from(await slack.command(REQUESTER, "fix rounding in payments/fees.py"))
    await slack.sim.wait_for("chat.postMessage")
    await wait_state(store, lambda: store.get_idea(idea_id), IdeaState.AWAITING_APPROVAL)
    await slack.press(SLACK_USERS["alice"], "intake_promote", idea_id)
    view = await slack.opened_view(1)
    ok = await slack.submit(SLACK_USERS["alice"], view,
                            {"repo": "acme/payments", "change_type": "bugfix", "code": totps["alice"].now(), "note": "ok"})
    assert ok.get("response_action") is None, ok
    task_id = store.get_idea(idea_id).task_id
    assert task_id
    update = (await slack.sim.wait_for("chat.update"))[-1]
    assert "1 of 2 approvals by alice" in blocks_text(update) and "intake_approve" in blocks_text(update)
    approve_value = next(e["value"] for b in json.loads(blocks_text(update)) if b["type"] == "actions"
                         for e in b["elements"] if e["action_id"] == "intake_approve")
    assert approve_value == f"{task_id}|{store.get_task(task_id).spec_hash}"

    # bob is platform: the last slot must be security, and the modal says so.
    await slack.press(SLACK_USERS["bob"], "intake_approve", approve_value)
    bob_view = await slack.opened_view(2)
    refused = await slack.submit(SLACK_USERS["bob"], bob_view, {"code": totps["bob"].now()})
    assert "needs an approval from security" in refused["errors"]["code"]
    await slack.press(SLACK_USERS["carol"], "intake_approve", approve_value)
    carol_view = await slack.opened_view(3)
    done = await slack.submit(SLACK_USERS["carol"], carol_view, {"code": totps["carol"].now()})
    assert done.get("response_action") is None, done
    task = store.get_task(task_id)
    assert task.state is TaskState.QUEUED and [a.via for a in task.approvals] == ["slack", "slack"]

    async def thread_says(word: str) -> None:
        import asyncio

        for _ in range(250):
            thread = [c for c in slack.sim.calls_to("chat.postMessage") if c.params.get("thread_ts")]
            if any(word in blocks_text(c) for c in thread):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no thread message saying {word!r}")

    await thread_says("*queued*")
    queued_msg = [c for c in slack.sim.calls_to("chat.postMessage") if "*queued*" in blocks_text(c)][-1]
    assert f"<@{REQUESTER}>" in blocks_text(queued_msg)  # the requester is told

    status = await slack.command(REQUESTER, f"status {task_id}")
    assert "*queued*" in status["text"]
    assert "Only the requester" in (await slack.command(STRANGER, f"status {task_id}"))["text"]
    assert "Not revoked" in (await slack.command(STRANGER, f"revoke {task_id} mine now"))["text"]
    assert "revoked" in (await slack.command(REQUESTER, f"revoke {task_id} not needed"))["text"]
    assert store.get_task(task_id).state is TaskState.REVOKED
    await thread_says("*revoked*")
    # The dispatch token minted for the queued task (task.dispatched, before the revoke in the
    # outbox's order) is the broker's plumbing: it is not posted as a second "queued" (issue 21:
    # each post costs paced Slack calls that the next real change waits behind).
    assert any(e["action"] == "task.dispatched" and e["subject"] == task_id for e in store.audit.export())
    thread = [c for c in slack.sim.calls_to("chat.postMessage") if c.params.get("thread_ts")]
    assert len([c for c in thread if "*queued*" in blocks_text(c)]) == 1


async def test_deny_from_the_card(slack: SlackDriver, store: Store) -> None:
    idea_id = idea_id_from(await slack.command(REQUESTER, "delete the audit log"))
    await slack.press(SLACK_USERS["dave"], "intake_deny", idea_id)
    view = await slack.opened_view(1)
    assert view["callback_id"] == "intake_deny_submit"
    empty = await slack.submit(SLACK_USERS["dave"], view, {"reason": "  "})
    assert empty["response_action"] == "errors" and "reason" in empty["errors"]
    assert (await slack.submit(SLACK_USERS["dave"], view, {"reason": "no"})).get("response_action") is None
    assert store.get_idea(idea_id).state is IdeaState.DENIED


# -- outbox and escalation ------------------------------------------------------------------------
async def test_outbox_recovers_a_crash_between_capture_and_card(
    settings: Settings, totps: dict, store: Store, rclient: redis.Redis
) -> None:
    # Captured, then the process died: one consumer read the event and never acknowledged it.
    idea, _ = store.capture(draft(requester=f"slack:{REQUESTER}", text="captured before the crash"))
    rclient.xgroup_create("intake:audit", "slack-notifier", id="0", mkstream=True)
    delivered = rclient.xreadgroup("slack-notifier", "crashed-broker", {"intake:audit": ">"})
    assert delivered and rclient.xpending("intake:audit", "slack-notifier")["pending"] >= 1
    async with running_app(settings, "http") as slack:
        slack.sim.fail_next("chat.postMessage", error="internal_error", status=500)
        await wait_state(store, lambda: store.get_idea(idea.id), IdeaState.AWAITING_APPROVAL, timeout=10)
        posted = [c for c in slack.sim.calls_to("chat.postMessage") if idea.id in blocks_text(c)]
        assert len(posted) == 2  # the failed try, then the one that landed
    assert rclient.xpending("intake:audit", "slack-notifier")["pending"] == 0


async def test_escalation_pings_the_group_once(
    settings: Settings, totps: dict, store: Store, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(EXAMPLE_POLICY.read_text().replace('after = "4h"', 'after = "1s"'))
    fast = load_settings(_env_file=None, data_dir=settings.data_dir, redis_url=settings.redis_url,
                         policy=policy)
    async with running_app(fast, "http") as slack:
        idea_id = idea_id_from(await slack.command(REQUESTER, "nobody looks at this"))
        import asyncio

        for _ in range(300):
            pings = [c for c in slack.sim.calls_to("chat.postMessage") if "*waiting*" in blocks_text(c)]
            if pings:
                break
            await asyncio.sleep(0.02)
        assert len(pings) == 1, "no escalation"
        text = blocks_text(pings[0])
        assert f"<@{SLACK_USERS['alice']}>" in text and f"<@{SLACK_USERS['bob']}>" in text
        assert f"<@{SLACK_USERS['carol']}>" not in text
        await asyncio.sleep(0.5)  # several more sweeps: still one ping
        assert len([c for c in slack.sim.calls_to("chat.postMessage") if "*waiting*" in blocks_text(c)]) == 1
        assert store.get_idea(idea_id).escalated_at is not None


async def test_result_card_and_accept_from_slack(slack: SlackDriver, store: Store,
                                                 totps: dict[str, pyotp.TOTP]) -> None:
    """A privileged task's quarantined result is posted as a result card in the thread (by the
    outbox, on the broker's result event); "Accept result" opens a modal whose code goes through
    Gatekeeper.accept, bound to the card's commit."""
    import asyncio

    idea_id = idea_id_from(await slack.command(REQUESTER, "document the payments retry job"))
    await slack.sim.wait_for("chat.postMessage")
    await wait_state(store, lambda: store.get_idea(idea_id), IdeaState.AWAITING_APPROVAL)
    await slack.press(SLACK_USERS["alice"], "intake_promote", idea_id)
    view = await slack.opened_view(1)
    await slack.submit(SLACK_USERS["alice"], view, {"repo": "acme/payments", "change_type": "docs",
                                                   "code": totps["alice"].now(), "note": ""})
    task_id = store.get_idea(idea_id).task_id
    assert task_id
    approve_value = f"{task_id}|{store.get_task(task_id).spec_hash}"
    await slack.press(SLACK_USERS["carol"], "intake_approve", approve_value)
    await slack.submit(SLACK_USERS["carol"], await slack.opened_view(2), {"code": totps["carol"].now()})
    assert store.get_task(task_id).state is TaskState.QUEUED
    # What the broker's report processor writes when a worker's run passes its gates.
    sha = "c" * 40
    store.move_task(task_id, TaskState.RUNNING, actor="system", attempt=1, run="r" * 32, nonce="n")
    result = {"commit": sha, "files": ["docs/retry.md"], "files_changed": 1, "additions": 3, "deletions": 0,
              "gates": "passed", "checks": [{"name": "docs/no-empty-markdown", "ok": True}]}
    store.move_task(task_id, TaskState.AWAITING_RESULT_APPROVAL, actor="system", update={"result": result},
                    attempt=1, run="r" * 32, commit=sha,
                    rule={"approvals": 1, "groups": ["security"], "require": {}})
    card = None
    for _ in range(250):
        card = next((c for c in slack.sim.calls_to("chat.postMessage")
                     if c.params.get("thread_ts") and "intake_accept" in blocks_text(c)), None)
        if card is not None:
            break
        await asyncio.sleep(0.02)
    assert card is not None, "no result card in the thread"
    assert "cccccccccccc" in blocks_text(card) and "+3 / -0" in blocks_text(card)
    await slack.press(SLACK_USERS["bob"], "intake_accept", f"{task_id}|{sha}")
    refused = await slack.submit(SLACK_USERS["bob"], await slack.opened_view(3), {"code": totps["bob"].now()})
    assert "security" in refused["errors"]["code"]  # the result needs a security approver
    await slack.press(SLACK_USERS["dave"], "intake_accept", f"{task_id}|{sha}")
    accept_view = await slack.opened_view(4)
    assert accept_view["callback_id"] == "intake_accept_submit"
    done = await slack.submit(SLACK_USERS["dave"], accept_view, {"code": totps["dave"].now()})
    assert done.get("response_action") is None, done
    task = store.get_task(task_id)
    assert task.state is TaskState.DELIVERING and [(a.approver, a.sha, a.via) for a in task.result_approvals] == [
        ("dave", sha, "slack")]
