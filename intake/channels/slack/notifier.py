"""Slack follow-ups from the outbox: idea cards, in-place card updates and thread messages.

Each handler acts on the subject's *current* state, so a redelivered event is harmless: an update
re-renders what is true now, and a card is posted only while the idea has none, under a
reservation that makes it once across crashes and replicas (:mod:`intake.channels.slack.cards`).
Every Slack call is cut off at a quarter of the outbox lease, so nothing this consumer started is
still running when another one may take the delivery over. All text that came from a channel is
escaped by the templates; mentions are built only from validated ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from intake.channels.slack import render
from intake.channels.slack.cards import UNCERTAIN, CardReservations, card_metadata, find_posted_card
from intake.core.models import IDEA_PENDING, AuditEvent, Idea, Task, TaskState
from intake.runtime import Broker
from intake.storage.outage import OUTAGE_ERRORS
from intake.storage.outbox import Delivery, Outbox
from intake.text.mrkdwn import is_user_id

log = logging.getLogger("intake.channels.slack.notifier")

GROUP = "slack-notifier"
_TASK_STATES = {s.value for s in TaskState}
# Task events the requester is told about (mentioned in the thread).
_TELL_REQUESTER = {"queued", "running", "succeeded", "failed", "blocked", "revoked", "expired", "denied",
                   "awaiting_result_approval"}
#: Task events that are the broker's own plumbing, not news for the thread: a dispatch token
#: minted and a delivery attempt claimed change neither the card nor the task's state (the
#: thread would say "queued" or "delivering" a second time), and each would spend two paced
#: Slack calls that the next real change then waits behind.
_PLUMBING = {"task.created", "task.dispatched", "task.delivery_started"}
#: The events on which a run's quarantined result is shown as a result card.
_RESULT_EVENTS = {"task.awaiting_result_approval", "task.delivering"}
# How far before the idea's capture a card of it may be stamped (clock skew between hosts).
_CARD_SKEW_S = 300.0

T = TypeVar("T")


class CardBusy(Exception):
    """Another consumer holds the idea's card reservation: try again in ``wait_s``."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"card reserved for {wait_s:.1f}s")
        self.wait_s = wait_s


def retry_after_of(exc: SlackApiError) -> float | None:
    """The Retry-After seconds of a 429 answer (1 when absent or unreadable), else None."""
    if exc.response.status_code != 429:
        return None
    try:
        return min(max(float(exc.response.headers.get("Retry-After", 1)), 0.0), 3600.0)
    except (TypeError, ValueError):
        return 1.0


def slack_user_of(identity: str) -> str | None:
    """The Slack user id in a ``slack:U…`` identity, if it is a valid one."""
    kind, _, ident = identity.partition(":")
    return ident if kind == "slack" and is_user_id(ident) else None


def state_line(idea: Idea, task: Task | None) -> str:
    if task is None:
        if idea.state in IDEA_PENDING:
            return "awaiting promotion by an approver"
        return f"{idea.state.value}" + (f": {idea.reason}" if idea.reason else "")
    if task.state is TaskState.AWAITING_APPROVALS:
        names = ", ".join(a.approver for a in task.approvals) or "nobody yet"
        egress = ", ".join(task.spec.egress) if task.spec.egress else "none (no network)"
        return (f"{len(task.approvals)} of {task.required} approvals by {names} · {task.spec.repo} "
                f"{task.spec.change_type} · egress: {egress}")
    line = f"task {task.id} {task.state.value} · {task.spec.repo} {task.spec.change_type}"
    return line + (f": {task.reason}" if task.reason else "")


def requester_label(idea: Idea) -> str:
    """The requester as shown: a forge id with the login it had when it wrote (issue 20: the id
    is who it is; the login, which can be renamed, is only a reminder)."""
    login = idea.provenance.get("login") or idea.provenance.get("username")
    if idea.requester.startswith(("github:id:", "gitlab:id:")) and isinstance(login, str) and login:
        return f"{idea.requester} ({login})"
    return idea.requester


def card_blocks(idea: Idea, task: Task | None, console_origin: str | None = None) -> list[dict[str, Any]]:
    """The card for an idea and its task as they are now; with ``console_origin``, a link
    button opens the same action (promote the idea, approve the task) in the web console."""
    source = idea.channel.value
    if channel_id := idea.provenance.get("channel_id"):
        source += f" {channel_id}"
    approving = task is not None and task.state is TaskState.AWAITING_APPROVALS
    link = None
    if console_origin and (approving or (task is None and idea.state in IDEA_PENDING)):
        link = f"{console_origin}/console/tasks/{task.id}" if approving and task else f"{console_origin}/console/ideas/{idea.id}"
    return render.idea_card(
        idea_id=idea.id,
        requester_slack_id=slack_user_of(idea.requester),
        requester_label=requester_label(idea),
        source_channel=source,
        provenance=idea.provenance,
        text=idea.text,
        title=idea.title,
        state_line=state_line(idea, task),
        spec_hash_short=task.spec_hash[:12] if task else None,
        buttons=idea.state in IDEA_PENDING or approving,
        task_id=task.id if approving and task else None,
        spec_hash=task.spec_hash if approving and task else None,
        passkey_url=link,
    )


class Pacer:
    """A token bucket for Slack Web API calls: ``rate`` per second, bursts of ``burst``; a 429's
    Retry-After pauses it. Keeps a burst of ideas from flooding Slack (and the broker's CPU)."""

    def __init__(self, rate: float, burst: int = 10) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._paused_until = 0.0

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if now >= self._paused_until and self._tokens >= 1:
                self._tokens -= 1
                return
            wait = max(self._paused_until - now, (1 - self._tokens) / self.rate)
            await asyncio.sleep(wait)

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)


class SlackNotifier:
    """Consumes the outbox and keeps Slack in step with the store."""

    def __init__(self, broker: Broker, client: AsyncWebClient, outbox: Outbox, pacer: Pacer | None = None) -> None:
        self.broker = broker
        self.client = client
        self.outbox = outbox
        self.pacer = pacer or Pacer(5.0)
        self.call_timeout = outbox.lease_s / 4
        # An in-flight mark lives as long as its event may still be retried.
        self.cards = CardReservations(broker.client, broker.settings.key_prefix, lease_s=outbox.lease_s,
                                      inflight_ttl_s=2 * outbox.max_age_s)
        self._bot_user: str | None = None

    async def _call(self, call: Awaitable[T]) -> T:
        """One Slack call, cut off well inside the lease (module doc)."""
        return await asyncio.wait_for(call, self.call_timeout)

    async def bot_user(self) -> str:
        """Our bot's user id (``auth.test``, asked once): only its messages are cards."""
        if self._bot_user is None:
            self._bot_user = str((await self._call(self.client.auth_test()))["user_id"])
        return self._bot_user

    async def run(self, stop: asyncio.Event, *, block_ms: int = 500) -> None:
        """Deliver until ``stop`` is set. Failures stay pending and are retried later; a Redis
        fault anywhere in the loop backs off and carries on (the notifier never dies)."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.outbox.ensure_group)
                await asyncio.to_thread(self.outbox.probe)  # notices Slack's recovery within seconds
                deliveries = await asyncio.to_thread(self.outbox.fetch, self.pacer.burst, block_ms)
                # Start deliveries only in the first third of their lease, so each one ends
                # while it is still ours; the rest go back for anyone to take.
                deadline = time.monotonic() + self.outbox.lease_s / 3
                for n, delivery in enumerate(deliveries):
                    if time.monotonic() > deadline:
                        await asyncio.to_thread(self.outbox.hand_back, deliveries[n:])
                        break
                    await self.deliver(delivery)
            except OUTAGE_ERRORS as exc:  # cards wait in the outbox; noted once per outage
                self.broker.outage.failed(exc, "the Slack outbox")
                await asyncio.sleep(1)
            except Exception as exc:
                log.warning("outbox loop fault: %s; retrying", type(exc).__name__)
                await asyncio.sleep(1)

    async def deliver(self, delivery: Delivery) -> None:
        try:
            await self.handle(delivery.event)
        except CardBusy as busy:  # another consumer is posting this card right now
            await asyncio.to_thread(self.outbox.later, delivery, busy.wait_s)
            return
        except SlackApiError as exc:
            retry_after = retry_after_of(exc)
            if retry_after is not None:  # Slack says slow down: everyone waits
                self.pacer.pause(retry_after)
            log.warning("slack delivery of %s %s failed: %s", delivery.event.action,
                        delivery.event.subject, exc.response.get("error"))
            await asyncio.to_thread(self.outbox.failed, delivery, str(exc.response.get("error")),
                                    retry_after=retry_after)
            return
        except Exception as exc:
            log.warning("slack delivery of %s %s failed: %s", delivery.event.action,
                        delivery.event.subject, type(exc).__name__)
            await asyncio.to_thread(self.outbox.failed, delivery, type(exc).__name__)
            return
        await asyncio.to_thread(self.outbox.ack, delivery)

    async def handle(self, event: AuditEvent) -> None:
        store = self.broker.store
        action = event.action
        if action == "idea.captured":
            await self.post_card(await asyncio.to_thread(store.get_idea, event.subject))
        elif action in {"idea.promoted", "idea.denied", "idea.expired", "idea.withdrawn", "idea.escalated"}:
            idea = await asyncio.to_thread(store.get_idea, event.subject)
            await self.refresh(idea, event)
        elif action == "approval.recorded" or (action.startswith("task.") and action not in _PLUMBING):
            task = await asyncio.to_thread(store.get_task, event.subject)
            idea = await asyncio.to_thread(store.get_idea, task.idea_id)
            await self.refresh(idea, event, task)

    async def post_card(self, idea: Idea) -> None:
        """Post the idea's card once (module doc of :mod:`intake.channels.slack.cards`)."""
        if idea.card is not None or idea.state not in IDEA_PENDING:
            return  # already posted, or nothing left to approve
        channel = self.broker.policy.approvals_channel
        await self.pacer.take()
        token = secrets.token_hex(8)
        got = await asyncio.to_thread(self.cards.reserve, idea.id, token)
        if got < 0:
            raise CardBusy(-got / 1000)
        if got == UNCERTAIN:  # an earlier post may have landed: look before posting again
            try:
                found = await self._call(find_posted_card(
                    self.client, channel, idea.id, bot_user=await self.bot_user(),
                    oldest=idea.created_at - _CARD_SKEW_S,
                ))
            except BaseException:
                await asyncio.to_thread(self.cards.release, idea.id, token)  # nothing of ours in flight
                raise
            if found:
                log.info("card of %s was already posted; recording it", idea.id)
                for card in found:
                    await self._record_card(idea.id, card)
                await asyncio.to_thread(self.cards.release, idea.id, token)
                return
        # On the sealed log before Slack hears of it: however Redis is rewritten, every post
        # that was ever attempted shows (README, "Delivery guarantees").
        await asyncio.to_thread(self.broker.audit.record, "system", "card.posting", idea.id,
                                channel=channel, attempt=token, looked=got == UNCERTAIN)
        try:
            resp = await self._call(self.client.chat_postMessage(
                channel=channel,
                blocks=card_blocks(idea, None, self.broker.settings.console_origin),
                text=render.fallback_text(f"New idea {idea.id}: {idea.title}"),
                metadata=card_metadata(idea.id),
                unfurl_links=False,
                unfurl_media=False,
            ))
        except SlackApiError as exc:
            if exc.response.status_code < 500:  # Slack refused it: no card was made
                await asyncio.to_thread(self.cards.not_posted, idea.id, token)
            else:  # a server error may come after the post: keep the mark, look next time
                await asyncio.to_thread(self.cards.release, idea.id, token)
            raise
        # Timeouts, lost connections and crashes leave the lock to expire and the mark set.
        await self._record_card(idea.id, {"channel": str(resp["channel"]), "ts": str(resp["ts"])})
        await asyncio.to_thread(self.cards.release, idea.id, token)

    async def _record_card(self, idea_id: str, card: dict[str, str]) -> None:
        """Record ``card`` as the idea's; if another card was recorded first, this one is a
        duplicate (only possible when the reservation was tampered with): delete it from
        Slack and audit ``card.duplicate``."""
        announced = await asyncio.to_thread(self.broker.store.announce, idea_id, card)
        if announced.card == card or announced.card is None:
            return
        log.error("a second card was posted for %s; deleting it", idea_id)
        deleted = False
        with contextlib.suppress(SlackApiError, TimeoutError):
            await self._call(self.client.chat_delete(channel=card["channel"], ts=card["ts"]))
            deleted = True
        await asyncio.to_thread(
            self.broker.audit.record, "system", "card.duplicate", idea_id,
            channel=card["channel"], kept_ts=announced.card["ts"], duplicate_ts=card["ts"], deleted=deleted,
        )

    async def refresh(self, idea: Idea, event: AuditEvent, task: Task | None = None) -> None:
        if idea.card is None:
            return  # the card was never posted (Slack off at the time): nothing to update
        if task is None and idea.task_id:
            task = await asyncio.to_thread(self.broker.store.get_task, idea.task_id)
        channel, ts = idea.card["channel"], idea.card["ts"]
        await self.pacer.take()
        await self._call(self.client.chat_update(
            channel=channel, ts=ts, blocks=card_blocks(idea, task, self.broker.settings.console_origin),
            text=render.fallback_text(f"Idea {idea.id}: {state_line(idea, task)}"),
        ))
        state, detail, notify, link = self._thread_update(idea, task, event)
        if task is not None and task.result and event.action in _RESULT_EVENTS and "attempt" in event.data:
            # The run's own result event (not an acceptance): the card with the facts.
            blocks = render.result_card(task_id=task.id, result=task.result,
                                        console_origin=self.broker.settings.console_origin,
                                        waiting=event.action == "task.awaiting_result_approval")
        else:
            blocks = render.status_message(subject_id=event.subject, state=state, detail=detail, link=link,
                                           notify=notify)
        await self.pacer.take()
        await self._call(self.client.chat_postMessage(
            channel=channel, thread_ts=ts, blocks=blocks,
            text=render.fallback_text(f"{event.subject} is now {state}"),
            unfurl_links=False, unfurl_media=False,
        ))

    def _thread_update(
        self, idea: Idea, task: Task | None, event: AuditEvent
    ) -> tuple[str, str, tuple[str, ...], str | None]:
        """(state word, detail, users to mention, link) for one event."""
        who = event.actor.partition(":")[2] or event.actor
        requester = slack_user_of(idea.requester)
        action = event.action
        if action == "idea.escalated":
            return ("waiting", f"nobody has acted on this idea for {self.broker.policy.escalation.after // 60} min",
                    self._escalation_users(), None)
        if action == "approval.recorded":
            return ("approved", f"approved by {who} ({event.data.get('count')} of {event.data.get('required')})", (), None)
        if action == "idea.promoted":
            return ("promoted", f"promoted by {who} to task {idea.task_id}", (), None)
        if action.startswith("idea."):
            notify = (requester,) if requester else ()
            return (idea.state.value, idea.reason or "", notify, None)
        state = action.partition(".")[2]
        if state not in _TASK_STATES and state != "amended":
            state = task.state.value if task else state
        detail, link = "", None
        if task is not None:
            detail = task.reason or ""
            if state == "amended":
                detail = f"spec changed to {task.spec.repo} {task.spec.change_type} ({task.spec_hash[:12]}); approvals start over"
            if task.result:
                detail = " · ".join(f"{k}: {task.result[k]}" for k in ("branch", "commit") if task.result.get(k)) or detail
                link = task.result.get("pr_url") or None
        notify = (requester,) if requester and state in _TELL_REQUESTER else ()
        return (state, detail, notify, link)

    def _escalation_users(self) -> tuple[str, ...]:
        policy = self.broker.policy
        members = policy.groups[policy.escalation.group].members
        found = []
        for approver in self.broker.approvers.all():
            if approver.id in members and approver.slack_user and is_user_id(approver.slack_user):
                found.append(approver.slack_user)
        return tuple(found)

