"""Slack mrkdwn helpers for untrusted text.

Slack treats exactly three characters as control characters in mrkdwn: ``&``, ``<`` and ``>``.
Every ``<…>`` control sequence (``<@U…>`` mentions, ``<!channel>``, ``<!subteam^…>``,
``<!date^…>``, ``<url|label>`` links) needs a literal ``<``, so escaping these three makes
untrusted text inert. mrkdwn has no backslash escape, so ``*``, ``_``, ``~`` and backticks
still format; that changes how text looks, never what it does.
"""

from __future__ import annotations

import re

# fullmatch + explicit ASCII classes: ``$`` would accept a trailing newline, and ``\w``/``\d``
# would accept non-ASCII letters and digits.
_USER_ID = re.compile(r"[UW][A-Z0-9]{8,}")


def escape(text: str) -> str:
    """Escape ``text`` for a Slack mrkdwn text object.

    ``&`` is replaced first so the entities produced for ``<`` and ``>`` are not escaped
    again, and an attacker's pre-escaped ``&lt;`` becomes ``&amp;lt;`` (shown literally).
    Nothing is ever unescaped.
    """
    if not isinstance(text, str):
        raise TypeError(f"escape() needs str, not {type(text).__name__}")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def is_user_id(value: object) -> bool:
    """True if ``value`` is a well-formed Slack user id (``U…``/``W…``, 9+ upper-case chars)."""
    return isinstance(value, str) and _USER_ID.fullmatch(value) is not None


def mention(user_id: str) -> str:
    """Build a ``<@U…>`` mention from a validated Slack user id.

    This is the only way broker-authored mrkdwn may contain ``<``: the id is checked against
    ``^[UW][A-Z0-9]{8,}$`` so nothing else can ride along inside the brackets.

    Raises:
        ValueError: ``user_id`` is not a well-formed Slack user id.
    """
    if not is_user_id(user_id):
        raise ValueError("not a Slack user id")
    return f"<@{user_id}>"
