"""Console sessions: an AES-GCM encrypted, HttpOnly, SameSite=Strict cookie, checked against Redis.

The cookie holds a session id, the session's CSRF token, the signed-in approver (or none, before
sign-in) and an expiry, sealed with the console key (``keys/console.key``, never in Redis); a
cookie edited by the browser or written by anyone without the key does not open. A signed-in
session also has a Redis key that must still name the same approver, so signing out (or removing
the approver's sessions) ends it at once. Signing in always starts a new session id and CSRF
token, so a token planted before sign-in is worthless after it.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

COOKIE = "intake_console"
SESSION_TTL_S = 8 * 3600
_AAD = b"intake-console-session-v1"


@dataclass(frozen=True)
class Session:
    sid: str
    csrf: str
    who: str | None
    exp: float

    def csrf_ok(self, token: str | None) -> bool:
        """The request's CSRF token is this session's (constant-time)."""
        return bool(token) and hmac.compare_digest(self.csrf.encode(), str(token).encode())

    def signed_in(self, who: str, now: float) -> Session:
        return replace(fresh(now), who=who)


def fresh(now: float) -> Session:
    """A new anonymous session: new id, new CSRF token."""
    return Session(sid=secrets.token_urlsafe(18), csrf=secrets.token_urlsafe(32), who=None, exp=now + SESSION_TTL_S)


class SessionBox:
    """Seals and opens session cookies with the console key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, session: Session) -> str:
        nonce = secrets.token_bytes(12)
        body = json.dumps({"sid": session.sid, "csrf": session.csrf, "who": session.who, "exp": session.exp})
        sealed = self._aead.encrypt(nonce, body.encode(), _AAD)
        return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, cookie: str | None, now: float) -> Session | None:
        """The session in ``cookie``, or None when it is missing, altered or expired."""
        if not cookie or len(cookie) > 1024:
            return None
        try:
            raw = base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4))
            data = json.loads(self._aead.decrypt(raw[:12], raw[12:], _AAD))
            session = Session(sid=str(data["sid"]), csrf=str(data["csrf"]),
                              who=data["who"] if isinstance(data["who"], str) else None, exp=float(data["exp"]))
        except (InvalidTag, ValueError, KeyError, TypeError):
            return None
        return session if session.exp > now else None
