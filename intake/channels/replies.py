"""Replies back to a ticket (a GitHub comment, a GitLab note, a Jira comment) with the idea id.

A :class:`Reply` is built by the channel (URL under its configured API base, its auth header,
a JSON body); :func:`post_reply` sends it with aiohttp. Redirects are not followed (they would
carry the token elsewhere), the answer is not read beyond its status, and failures are logged as
one line with the channel and status, never the token or the URL's query.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp

log = logging.getLogger("intake.channels.replies")


@dataclass(frozen=True)
class Reply:
    """One POST to a forge's API. ``headers`` holds the credential: never log it."""

    url: str
    json: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict, repr=False)


async def post_reply(session: aiohttp.ClientSession, reply: Reply, *, channel: str) -> bool:
    """Send ``reply``; True on a 2xx. Best effort: a lost reply never undoes the capture."""
    try:
        async with session.post(reply.url, json=reply.json, headers=reply.headers, allow_redirects=False) as resp:
            ok = 200 <= resp.status < 300
            if not ok:
                log.warning("%s reply failed status=%s", channel, resp.status)
            return ok
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("%s reply failed: %s", channel, type(exc).__name__)
        return False
