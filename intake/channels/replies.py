"""Replies back to where an idea came from (a GitHub comment, a GitLab note, a Jira comment, the
acknowledgement mail), delivered through the outbox.

A first capture appends ``idea.captured`` to the audit stream in the same transaction as the idea
(:mod:`intake.storage.store`), so the reply is queued the moment the idea exists: no capture
answers its client with a reply still only in memory. :class:`ReplyOutbox` is a consumer of that
stream (group :data:`GROUP`, :class:`intake.storage.outbox.Outbox`: leases, retries with
exponential backoff and jitter, ``outbox.dropped`` audited once an event is past
``INTAKE_OUTBOX_MAX_AGE``), like the Slack follow-ups. Each channel that replies gives a
:data:`Send` for its ideas, built from the stored idea and the channel's settings; a reply that
went out is marked sent before the event is acknowledged, so a redelivery (a crash, a Redis blip
after the send) does not send it again.

A :class:`Reply` is one POST to a forge's API (URL under its configured API base, its auth
header, a JSON body); :func:`post_reply` sends it with aiohttp. Redirects are not followed (they
would carry the token elsewhere), the answer is not read beyond its status, and failures are
logged as one line with the channel and status, never the token or the URL's query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from intake.core.errors import IntakeError
from intake.core.models import Idea
from intake.core.settings import Settings
from intake.runtime import Broker
from intake.storage.outage import OUTAGE_ERRORS
from intake.storage.outbox import Delivery, Outbox

log = logging.getLogger("intake.channels.replies")

GROUP = "channel-replies"


@dataclass(frozen=True)
class Reply:
    """One POST to a forge's API. ``headers`` holds the credential: never log it."""

    url: str
    json: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict, repr=False)


class ReplyFailed(Exception):
    """A reply that did not go out and may later: ``error`` is a tag for the log and the audit
    (a status or an exception type, never a body, URL or token)."""

    def __init__(self, error: str, retry_after: float | None = None) -> None:
        self.error, self.retry_after = error, retry_after
        super().__init__(error)


#: A channel's reply to one of its ideas: True when it was sent, False when there is nothing to
#: send (no token configured, a sender not to answer); :class:`ReplyFailed` to try again later.
Send = Callable[[Idea], Awaitable[bool]]


def reply_text(idea_id: str) -> str:
    return (f"intake captured this as idea {idea_id}. An approver will review it; "
            "nothing runs unless they promote it.")


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    try:
        return min(max(float(resp.headers.get("Retry-After", "")), 0.0), 3600.0)
    except ValueError:
        return None


async def post_reply(session: aiohttp.ClientSession, reply: Reply, *, channel: str) -> None:
    """Send ``reply``; :class:`ReplyFailed` unless the forge answers 2xx."""
    try:
        async with session.post(reply.url, json=reply.json, headers=reply.headers, allow_redirects=False) as resp:
            if not 200 <= resp.status < 300:
                log.warning("%s reply failed status=%s", channel, resp.status)
                raise ReplyFailed(f"status_{resp.status}", _retry_after(resp) if resp.status in (429, 503) else None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("%s reply failed: %s", channel, type(exc).__name__)
        raise ReplyFailed(type(exc).__name__) from None


class ReplyOutbox:
    """Delivers channel replies from the outbox (module doc)."""

    def __init__(self, broker: Broker, outbox: Outbox, senders: Mapping[str, Send]) -> None:
        self.broker = broker
        self.outbox = outbox
        self.senders = senders
        self._sent_ttl_s = int(2 * outbox.max_age_s) + 3600

    def _sent_key(self, idea_id: str) -> str:
        return f"{self.broker.store.keys.p}:replies:sent:{idea_id}"

    async def run(self, stop: asyncio.Event, *, block_ms: int = 500) -> None:
        """Deliver until ``stop`` is set; a Redis fault backs off and carries on."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.outbox.ensure_group, "$")
                for delivery in await asyncio.to_thread(self.outbox.fetch, 20, block_ms):
                    await self.deliver(delivery)
            except OUTAGE_ERRORS as exc:
                self.broker.outage.failed(exc, "the reply outbox")
                await asyncio.sleep(1)
            except Exception as exc:
                log.warning("reply outbox loop fault: %s; retrying", type(exc).__name__)
                await asyncio.sleep(1)

    async def deliver(self, delivery: Delivery) -> None:
        event = delivery.event
        send, idea = None, None
        if event.action == "idea.captured":
            try:
                idea = await asyncio.to_thread(self.broker.store.get_idea, event.subject)
            except IntakeError:  # gone, or its record fails its MAC: nothing to answer
                idea = None
            send = self.senders.get(idea.channel.value) if idea is not None else None
        if send is None or idea is None:
            await asyncio.to_thread(self.outbox.ack, delivery)
            return
        key = self._sent_key(idea.id)
        if await asyncio.to_thread(self.broker.client.exists, key):
            await asyncio.to_thread(self.outbox.ack, delivery)  # sent before; only the ack was lost
            return
        try:
            sent = await send(idea)
        except ReplyFailed as exc:
            await asyncio.to_thread(self.outbox.failed, delivery, exc.error, retry_after=exc.retry_after)
            return
        except Exception as exc:  # a bug or an unexpected transport error: retried like any failure
            log.warning("%s reply of %s failed: %s", idea.channel.value, idea.id, type(exc).__name__)
            await asyncio.to_thread(self.outbox.failed, delivery, type(exc).__name__)
            return
        if sent:
            await asyncio.to_thread(self.broker.client.set, key, "1", ex=self._sent_ttl_s)
            log.info("%s reply sent: idea=%s", idea.channel.value, idea.id)
        await asyncio.to_thread(self.outbox.ack, delivery)


def reply_outbox_for(settings: Settings, broker: Broker, senders: Mapping[str, Send]) -> ReplyOutbox:
    outbox = Outbox(broker.audit, GROUP, retry_ms=settings.outbox_retry_ms, retry_cap_s=settings.outbox_retry_cap,
                    max_age_s=settings.outbox_max_age, lease_s=settings.outbox_lease)
    return ReplyOutbox(broker, outbox, senders)


#: Builds a channel's :data:`Send` from the reply session (None: the channel sends no replies).
SenderFactory = Callable[[aiohttp.ClientSession], "tuple[str, Send] | None"]


def mount_replies(app: web.Application, settings: Settings, broker_key: web.AppKey[Broker],
                  factories: list[SenderFactory]) -> None:
    """Run the reply outbox for the app's lifetime (not on an edge serve: the full serves on the
    same Redis deliver), with one HTTP session for the forges' APIs."""
    if settings.edge or not factories:
        return

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(5.0, settings.outbox_lease / 4)))
        senders = dict(s for f in factories if (s := f(session)) is not None)
        stop = asyncio.Event()
        task = None
        if senders:
            replies = reply_outbox_for(settings, app[broker_key], senders)
            # Created before anything is served, at the stream's end: every capture from now on
            # is answered, and replies sent before this version (in memory) are not sent again.
            await asyncio.to_thread(replies.outbox.ensure_group, "$")
            task = asyncio.create_task(replies.run(stop), name="reply-outbox")
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(task, timeout=5)
            await session.close()

    app.cleanup_ctx.append(ctx)
