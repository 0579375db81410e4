"""Each idea's Slack card posted once: a reservation in Redis, and Slack itself as the witness.

``chat.postMessage`` is not idempotent, and the card is the one follow-up that must not repeat.
Around every post:

1. :meth:`CardReservations.reserve` takes the idea's **lock** (``SET NX PX lease``) and, in the
   same Lua call, marks a post **in flight** and says whether an earlier one was left in flight.
   A second replica (or a redelivery while Slack is slow) finds the lock held and waits.
2. If an earlier post's outcome is unknown (its process died or its call timed out between Slack's
   answer and the record), :func:`find_posted_card` looks for the card in the approvals channel's
   history: every card carries message ``metadata`` naming its idea, and only messages from our
   own bot count. Found: that card is recorded, nothing is posted.
3. Slack answered with an error: nothing was posted, the in-flight mark is cleared. Slack answered
   with a card: it is recorded (``Store.announce``) and the lock released. Anything else (timeout,
   connection lost, crash) leaves the lock to expire and the mark in place, so the next try looks
   before it posts.

The lock outlives every call made under it (at most three, each cut off at a quarter of the
lease), so a card is posted once as long as Slack finishes or abandons a request within the
lease. Against someone who can write Redis: deleting or rewriting the lock or the mark can make a second post happen,
but not unseen: every post is preceded by a sealed ``card.posting`` audit event, and a second
card that Slack answered for finds the idea already has one when it is recorded, is deleted from
Slack, and ``card.duplicate`` is audited with both messages (see the README).
"""

from __future__ import annotations

from typing import Any

import redis
from slack_sdk.web.async_client import AsyncWebClient

#: Message metadata event type on idea cards (``event_payload`` is ``{"idea_id": …}``).
CARD_EVENT = "intake_idea_card"

FREE, UNCERTAIN = 1, 2

# KEYS: lock, inflight; ARGV: token, lease_ms, inflight_ttl_s. Returns FREE or UNCERTAIN when the
# lock is ours, else minus the lock's remaining milliseconds.
_RESERVE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return -math.max(redis.call('PTTL', KEYS[1]), 1)
end
local earlier = redis.call('EXISTS', KEYS[2])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
return 1 + earlier
"""
# KEYS: lock; ARGV: token. Release only our own lock.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def card_metadata(idea_id: str) -> dict[str, Any]:
    """The ``metadata`` posted with an idea's card (how a crashed post is found again)."""
    return {"event_type": CARD_EVENT, "event_payload": {"idea_id": idea_id}}


class CardReservations:
    """The per-idea card locks and in-flight marks under ``prefix``."""

    def __init__(self, client: redis.Redis, prefix: str, *, lease_s: float, inflight_ttl_s: float) -> None:
        self.r = client
        self.prefix = prefix
        self.lease_ms = max(int(lease_s * 1000), 1)
        self.inflight_ttl_s = max(int(inflight_ttl_s), 1)
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)

    def lock_key(self, idea_id: str) -> str:
        return f"{self.prefix}:card:{idea_id}:lock"

    def inflight_key(self, idea_id: str) -> str:
        return f"{self.prefix}:card:{idea_id}:inflight"

    def reserve(self, idea_id: str, token: str) -> int:
        """:data:`FREE` or :data:`UNCERTAIN` (an earlier post may have landed: look first) when
        the lock is now held by ``token``; otherwise minus the milliseconds it stays taken."""
        return int(self._reserve(keys=[self.lock_key(idea_id), self.inflight_key(idea_id)],
                                 args=[token, self.lease_ms, self.inflight_ttl_s]))

    def not_posted(self, idea_id: str, token: str) -> None:
        """Slack refused the post (it answered with an error): nothing is in flight any more."""
        self.r.delete(self.inflight_key(idea_id))
        self.release(idea_id, token)

    def release(self, idea_id: str, token: str) -> None:
        self._release(keys=[self.lock_key(idea_id)], args=[token])


def parse_card_owner(message: dict[str, Any], bot_user: str) -> str | None:
    """The idea id a channel message is the card of, or None. Only messages our own bot posted
    count (any app can attach metadata to its own messages)."""
    if message.get("user") != bot_user or message.get("thread_ts") not in (None, message.get("ts")):
        return None
    metadata = message.get("metadata")
    if not isinstance(metadata, dict) or metadata.get("event_type") != CARD_EVENT:
        return None
    payload = metadata.get("event_payload")
    idea_id = payload.get("idea_id") if isinstance(payload, dict) else None
    return idea_id if isinstance(idea_id, str) else None


async def find_posted_card(
    client: AsyncWebClient, channel: str, idea_id: str, *, bot_user: str, oldest: float, max_pages: int = 20
) -> list[dict[str, str]]:
    """Every card for ``idea_id`` our bot posted in ``channel`` since ``oldest`` (a Unix time),
    oldest first, as ``{"channel", "ts"}``."""
    found: list[dict[str, str]] = []
    cursor = None
    for _ in range(max_pages):
        resp = await client.conversations_history(channel=channel, oldest=f"{oldest:.6f}", limit=200,
                                                  include_all_metadata=True, cursor=cursor)
        for message in resp.get("messages") or []:
            if isinstance(message, dict) and parse_card_owner(message, bot_user) == idea_id:
                found.append({"channel": channel, "ts": str(message["ts"])})
        cursor = (resp.get("response_metadata") or {}).get("next_cursor")
        if not resp.get("has_more") or not cursor:
            break
    return sorted(found, key=lambda card: float(card["ts"]))
