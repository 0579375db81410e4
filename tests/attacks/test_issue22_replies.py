"""Issue 22: replies to tickets and acknowledgement mails go through the outbox. A forge or mail
relay that is down when the idea is captured gets the reply after the outage, exactly once (a
redelivery of the event, or a second replica, never sends it again); an event past its max age is
given up and audited."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import redis

from intake.core.settings import Settings
from intake.storage.store import Store
from tests.email.email_harness import Relay, Signer, email_settings, mail, running_mail
from tests.functional.webhook_harness import running_webhooks, vector
from tests.ports import free_port

FAST = {"outbox_retry_ms": 50, "outbox_retry_cap": 0.3}


def audited(rclient: redis.Redis, action: str) -> list[dict]:
    return [json.loads(f["e"]) for _, f in rclient.xrange("intake:audit") if "e" in f
            and json.loads(f["e"]).get("action") == action]


def caught_up(rclient: redis.Redis, group: str = "channel-replies") -> bool:
    """The group has read the whole stream and has nothing pending."""
    [info] = [g for g in rclient.xinfo_groups("intake:audit") if g["name"] == group]
    last = rclient.xinfo_stream("intake:audit")["last-generated-id"]
    return info["last-delivered-id"] == last and rclient.xpending("intake:audit", group)["pending"] == 0


async def until(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return found


@pytest.mark.parametrize("forge", ["github", "gitlab", "jira"])
async def test_a_forge_outage_during_capture_delays_the_reply_and_it_is_posted_once(
        settings: Settings, store: Store, rclient: redis.Redis, forge: str) -> None:
    async with running_webhooks(settings, **FAST) as hooks:
        hooks.forge.outage = True
        if forge == "github":
            status, answer = await hooks.github("issues", vector("github/issues_opened.json"))
        elif forge == "gitlab":
            status, answer = await hooks.gitlab("Issue Hook", vector("gitlab/issue_open.json"))
        else:
            status, answer = await hooks.jira(vector("jira/issue_created.json"))
        assert status == 202 and answer["created"] is True, answer
        # The capture was acknowledged at once; the forge refuses reply after reply meanwhile.
        await until(lambda: hooks.forge.refused >= 3, 15, "three refused reply attempts")
        assert hooks.forge.calls == []
        hooks.forge.outage = False
        calls = await hooks.forge.wait_for(1, timeout=15)
        assert answer["idea"] in calls[0]["json"]["body"]
        # Nothing more: the event is acknowledged, and a redelivery of it finds the reply sent.
        group = "channel-replies"
        await until(lambda: rclient.xpending(store.audit.stream, group)["pending"] == 0, 10, "the ack")
        rclient.xgroup_setid(store.audit.stream, group, "0")  # replay the whole stream to the group
        await until(lambda: caught_up(rclient, group), 10, "the replay")
        assert len(hooks.forge.calls) == 1
    assert audited(rclient, "outbox.dropped") == []


async def test_a_reply_the_forge_never_takes_is_given_up_and_audited(settings: Settings, rclient: redis.Redis) -> None:
    async with running_webhooks(settings, outbox_max_age=1, **FAST) as hooks:
        hooks.forge.outage = True
        status, answer = await hooks.github("issues", vector("github/issues_opened.json"))
        assert status == 202
        dropped = await until(lambda: audited(rclient, "outbox.dropped"), 20, "the outbox to give up")
        assert dropped[0]["subject"] == answer["idea"] and dropped[0]["data"]["group"] == "channel-replies"
        assert dropped[0]["data"]["error"] == "status_503"
        assert "ghp_test" not in json.dumps(dropped)


def test_a_relay_outage_during_capture_delays_the_acknowledgement_and_it_is_sent_once(
        settings: Settings, tmp_path: Path, rclient: redis.Redis) -> None:
    """The relay is down (connection refused) when a verified mail is captured; the 250 comes
    at once, and the acknowledgement arrives once the relay is up, exactly once."""
    from tests.email.email_harness import RecordResolver

    port = free_port()
    resolver = RecordResolver()
    signer = Signer("sender.example", resolver)
    configured = email_settings(settings, tmp_path, smtp_relay=f"127.0.0.1:{port}", **FAST)
    with running_mail(configured, resolver) as smtp:
        message = signer.sign(mail("ann@sender.example", "please fix the docs", message_id="m-outage@sender.example"))
        code, text = smtp.send(message, sender="ann@sender.example")
        assert code == 250, text
        deadline = time.monotonic() + 15
        while not any(json.loads(v)["n"] >= 2 for v in rclient.hgetall("intake:outbox:channel-replies:tries").values()):
            assert time.monotonic() < deadline, "no two failed attempts against the dead relay"
            time.sleep(0.02)
        with Relay(port=port) as relay:
            [envelope] = relay.wait_for(1)
            assert envelope.rcpt_tos == ["ann@sender.example"] and "m-outage@sender.example" in envelope.content.decode()
            deadline = time.monotonic() + 10
            while rclient.xpending("intake:audit", "channel-replies")["pending"]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # A resend of the same message is the same idea: no second acknowledgement.
            assert smtp.send(message, sender="ann@sender.example")[0] == 250
            rclient.xgroup_setid("intake:audit", "channel-replies", "0")
            deadline = time.monotonic() + 10
            while not caught_up(rclient):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert len(relay.received) == 1
    assert audited(rclient, "outbox.dropped") == []
