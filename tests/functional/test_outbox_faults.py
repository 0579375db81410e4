"""Idea cards posted exactly once, and delayed but never dropped, through the faults an operator
meets: real ``intake serve`` processes on one Redis against the Slack simulator, a serve
SIGKILLed between Slack's answer and the record, two serves with a slow and rate-limiting Slack,
a 150 s Slack outage; then what a Redis writer can and cannot do to a card reservation.

"Posted once" is judged by the simulator: exactly one message really posted per idea."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from intake.app import METRICS_PORT
from intake.channels.slack.cards import CardReservations, card_metadata
from intake.core.models import Idea
from intake.core.redis_conn import make_client
from intake.core.settings import Settings
from intake.storage.store import Store
from tests.factories import draft
from tests.functional.slack_harness import APPROVALS, REQUESTER, running_app
from tests.functional.test_serve import free_port
from tests.slack_sim import SlackSim

GROUP = "slack-notifier"


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` (keeping the simulator's loop running) until it is truthy."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)
    return result


class Serve:
    """One ``intake serve`` process with Slack on, its output in a log file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.proc = subprocess.Popen([sys.executable, "-m", "intake", "serve"], env=env, cwd=log.parent,
                                     stdin=subprocess.DEVNULL, stdout=log.open("a"), stderr=subprocess.STDOUT)

    async def ready(self) -> None:
        url = f"http://127.0.0.1:{self.env['INTAKE_PORT']}/readyz"
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"serve exited early: {self.log.read_text()}")
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return
                except (TimeoutError, aiohttp.ClientError):  # not up yet, or slow to answer
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"serve never became ready: {self.log.read_text()}")
                await asyncio.sleep(0.1)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    async def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            await asyncio.to_thread(self.proc.wait, 30)


@pytest.fixture
async def sim() -> AsyncIterator[SlackSim]:
    async with SlackSim() as running:
        yield running


@pytest.fixture
def serve_env(settings: Settings, sim: SlackSim, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """The environment of serve number ``n``: its own data dir and port; the test's keys,
    policy and Redis; Slack at the simulator; the outbox's clocks shortened for a test."""
    keys = settings.keys

    def make(n: int, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
        env.update(
            INTAKE_DATA_DIR=str(tmp_path / f"serve{n}"), INTAKE_PORT=str(free_port()),
            INTAKE_REDIS_URL=settings.redis_url.get_secret_value(),  # type: ignore[union-attr]
            INTAKE_POLICY=str(settings.policy_path), INTAKE_SWEEP_INTERVAL="1",
            INTAKE_SIGNING_KEY=str(keys["signing"]), INTAKE_PUBLIC_KEY=str(keys["public"]),
            INTAKE_AUDIT_KEY=str(keys["audit"]), INTAKE_SECRETS_KEY=str(keys["secrets"]),
            INTAKE_CONSOLE_KEY=str(keys["console"]),
            SLACK_BOT_TOKEN="xoxb-test", SLACK_SIGNING_SECRET="s" * 32, SLACK_API_URL=sim.base_url,
            INTAKE_OUTBOX_RETRY_MS="200", INTAKE_OUTBOX_RETRY_CAP="1", INTAKE_OUTBOX_LEASE="2",
            INTAKE_SLACK_RATE="200",
        )
        env.update(extra)
        return env

    return make


@pytest.fixture
async def serves() -> AsyncIterator[list[Serve]]:
    """Every serve a test starts, stopped at the end."""
    running: list[Serve] = []
    yield running
    for serve in running:
        await serve.stop()


def capture(store: Store, n: int) -> list[Idea]:
    return [store.capture(draft(requester=f"slack:{REQUESTER}", text=f"card number {i}"))[0] for i in range(n)]


def assert_each_card_posted_once(sim: SlackSim, store: Store, ideas: list[Idea]) -> None:
    for idea in ideas:
        posted = sim.cards_of(idea.id)
        assert len(posted) == 1, (idea.id, posted)
        assert store.get_idea(idea.id).card == {"channel": APPROVALS, "ts": posted[0]["ts"]}
    assert sim.deleted == []


def all_carded(store: Store, ideas: list[Idea]) -> bool:
    return all(store.get_idea(i.id).card is not None for i in ideas)


def audited(settings: Settings, rclient: redis.Redis, action: str, subject: str | None = None) -> list[dict]:  # type: ignore[type-arg]
    from intake.audit.log import AuditLog
    from intake.protocol.keyfiles import load_secret

    log = AuditLog(rclient, load_secret(settings, "audit"), settings.key_prefix)
    # verdict ok: MAC-checked genuine (sealed, or about to be by the serving process)
    return [e for e in log.export() if e["action"] == action and e["verdict"] == "ok"
            and (subject is None or e["subject"] == subject)]


async def test_a_serve_killed_between_slacks_answer_and_the_record_posts_each_card_once(
    sim: SlackSim, serve_env: Callable[..., dict[str, str]], serves: list[Serve], store: Store,
    rclient: redis.Redis, tmp_path: Path,
) -> None:
    env = serve_env(1)
    hold = sim.hold("chat.postMessage", after=4)  # the fifth card: posted, its answer held
    serves.append(first := Serve(env, tmp_path / "serve1.log"))
    await first.ready()
    ideas = capture(store, 12)
    await asyncio.wait_for(hold.reached.wait(), 30)
    first.kill()  # Slack has the card; the broker never hears back
    hold.release()
    serves.append(second := Serve(env, tmp_path / "serve1-again.log"))
    await second.ready()
    await until(lambda: all_carded(store, ideas), 60, "every card to be posted")
    assert_each_card_posted_once(sim, store, ideas)
    assert len(sim.calls_to("conversations.history")) >= 1  # the held card was found, not reposted
    # The killed serve's consumer is removed from the group (after two leases idle).
    await until(lambda: len(rclient.xinfo_consumers("intake:audit", GROUP)) == 1, 30,
                "the dead consumer to be removed")


async def test_two_serves_and_a_slow_rate_limiting_slack_post_each_card_once(
    sim: SlackSim, serve_env: Callable[..., dict[str, str]], serves: list[Serve], store: Store, tmp_path: Path,
) -> None:
    sim.slow("chat.postMessage", 0.3)
    sim.rate_limit("chat.postMessage", every=3, retry_after=1)
    for n in (1, 2):
        serves.append(Serve(serve_env(n), tmp_path / f"serve{n}.log"))
    for serve in serves:
        await serve.ready()
    ideas = capture(store, 12)
    await until(lambda: all_carded(store, ideas), 90, "every card to be posted")
    assert_each_card_posted_once(sim, store, ideas)
    assert len(sim.calls_to("chat.postMessage")) > len(sim.posted)  # some were refused with 429


async def test_a_long_slack_outage_delays_cards_and_drops_none(
    sim: SlackSim, serve_env: Callable[..., dict[str, str]], serves: list[Serve], store: Store,
    settings: Settings, rclient: redis.Redis, tmp_path: Path,
) -> None:
    # The old outbox gave up on a card after 20 tries. The outage lasts until every card was
    # tried more than that (fast retries stand in for minutes of real backoff), and longer.
    sim.outage(True)
    serves.append(serve := Serve(serve_env(1, INTAKE_OUTBOX_RETRY_MS="50", INTAKE_OUTBOX_RETRY_CAP="0.2"),
                                 tmp_path / "serve.log"))
    await serve.ready()
    ideas = capture(store, 3)
    await until(lambda: len(sim.calls) >= 3 * 30, 120,
                "the cards to be tried more than 20 times each during the outage")
    # Tried, and tried again all along (after the first 503 each try begins by looking for the card).
    assert sim.posted == []
    assert not any(store.get_idea(i.id).card for i in ideas)
    sim.outage(False)
    await until(lambda: all_carded(store, ideas), 60, "every card to be posted after the outage")
    assert_each_card_posted_once(sim, store, ideas)
    assert audited(settings, rclient, "outbox.dropped") == []


# -- the give-up path, and a Redis writer -------------------------------------------------------------
async def test_an_event_past_its_max_age_is_given_up_audited_and_counted(
    settings: Settings, store: Store, rclient: redis.Redis
) -> None:
    async with running_app(settings, "http", outbox_max_age=1, metrics_port=0) as slack:
        slack.sim.outage(True)
        idea, _ = store.capture(draft(requester=f"slack:{REQUESTER}", text="never carded"))
        dropped = await until(lambda: audited(settings, rclient, "outbox.dropped", idea.id), 30,
                              "the outbox to give up")
        assert dropped[0]["data"]["event_action"] == "idea.captured" and dropped[0]["data"]["attempts"] >= 1
        assert dropped[0]["data"]["error"] == "service_unavailable"
        port = slack.client.server.app[METRICS_PORT]
        async with aiohttp.ClientSession() as scraper:
            metrics = await (await scraper.get(f"http://127.0.0.1:{port}/metrics")).text()
        assert 'intake_outbox_dropped_total{group="slack_notifier"} 1.0' in metrics
    assert "xoxb-test" not in str(dropped)


async def test_deleting_a_reservation_can_cause_a_second_post_but_never_an_unseen_one(
    settings: Settings, store: Store, rclient: redis.Redis, redis_server: str
) -> None:
    async with running_app(settings, "http") as slack:  # lease 1.5 s: a Slack call is cut off after 0.375 s
        hold = slack.sim.hold("chat.postMessage")
        idea, _ = store.capture(draft(requester=f"slack:{REQUESTER}", text="post me twice"))
        await asyncio.wait_for(hold.reached.wait(), 10)
        # The broker's call times out: it does not know whether the card landed, and keeps the
        # reservation. An attacker with a plain Redis client (no keys) deletes it.
        cards = CardReservations(rclient, settings.key_prefix, lease_s=1, inflight_ttl_s=1)
        attacker = make_client(redis_server)
        await until(lambda: rclient.exists(cards.inflight_key(idea.id)), 10, "the post to be in flight")
        await until(lambda: audited(settings, rclient, "card.posting", idea.id), 10, "the posting record")
        while len(slack.sim.calls_to("chat.postMessage")) < 2:
            attacker.delete(cards.lock_key(idea.id), cards.inflight_key(idea.id))
            await asyncio.sleep(0.05)
        hold.release()
        await until(lambda: store.get_idea(idea.id).card, 10, "a card to be recorded")
        assert len(slack.sim.cards_of(idea.id)) == 2  # the attack worked ...
        await until(lambda: len(audited(settings, rclient, "card.posting", idea.id)) == 2, 10,
                    "the second posting record")
        postings = audited(settings, rclient, "card.posting", idea.id)
        # ... in plain sight: two posting records on the audit log for one recorded card
        assert len(postings) == 2 and postings[0]["data"]["attempt"] != postings[1]["data"]["attempt"]
        assert len(audited(settings, rclient, "idea.announced", idea.id)) == 1


async def test_two_cards_found_for_one_idea_keep_the_first_and_delete_the_other(
    settings: Settings, store: Store, rclient: redis.Redis
) -> None:
    async with running_app(settings, "http") as slack:
        slack.sim.outage(True)  # the first post fails with a 503: its outcome counts as unknown
        idea, _ = store.capture(draft(requester=f"slack:{REQUESTER}", text="two cards"))
        await until(lambda: slack.sim.calls_to("chat.postMessage"), 10, "a post to be tried")
        # Slack has two cards of this idea after all (and an impostor's message naming it).
        first = slack.sim.add_message(APPROVALS, "card", card_metadata(idea.id))
        second = slack.sim.add_message(APPROVALS, "card", card_metadata(idea.id))
        slack.sim.history[APPROVALS].append({"type": "message", "user": "UMALLORY01", "ts": slack.sim.next_ts(),
                                             "text": "fake", "metadata": card_metadata(idea.id)})
        slack.sim.outage(False)
        await until(lambda: store.get_idea(idea.id).card, 10, "the card to be recorded")
        assert store.get_idea(idea.id).card == {"channel": APPROVALS, "ts": first}
        await until(lambda: slack.sim.deleted, 10, "the duplicate to be deleted")
        assert slack.sim.deleted == [second]
        duplicate = await until(lambda: audited(settings, rclient, "card.duplicate", idea.id), 10, "the audit")
        assert duplicate[0]["data"] == {"channel": APPROVALS, "kept_ts": first, "duplicate_ts": second,
                                        "deleted": True}
        assert len(slack.sim.cards_of(idea.id)) == 2  # nothing new was posted
