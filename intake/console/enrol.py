"""One-time approver enrolment links.

An admin enrols a person (an unconfirmed approver, whose secret nobody has seen) and gets a link
``/console/enrol/<token>``. Only the SHA-256 of the token is stored, with a TTL. Opening the link
shows a confirm page (link previewers that fetch it do nothing); pressing *Show my code* reveals
a fresh secret once, as a QR code, and the person confirms it with one valid code, after which
the link is gone. A second reveal is refused: whoever saw the secret first is the only one who
could confirm it, and the admin can issue a new link.
"""

from __future__ import annotations

import json
import secrets

from intake.errors import NotFound, Refused
from intake.models import sha256_hex
from intake.store import Pipe, Store

LINK_TTL_S = 24 * 3600


class EnrolLinks:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _key(self, token: str) -> str:
        return self.store.keys.enrol_link(sha256_hex(token.encode()))

    def create(self, approver_id: str, *, actor: str) -> str:
        """A fresh link token for ``approver_id`` (returned once; only its hash is kept)."""
        token = secrets.token_urlsafe(32)
        key = self._key(token)

        def build(pipe: Pipe) -> None:
            pipe.multi()
            pipe.set(key, json.dumps({"approver": approver_id, "revealed": False}), ex=LINK_TTL_S)
            self.store.emit(pipe, actor, "approver.enrolment_link", approver_id, ttl_s=LINK_TTL_S)

        self.store.transact([key], build)
        return token

    def peek(self, token: str) -> dict[str, object]:
        raw = self.store.r.get(self._key(token)) if 10 <= len(token) <= 100 else None
        if raw is None:
            raise NotFound("this enrolment link is unknown, used or expired; ask an admin for a new one")
        return dict(json.loads(raw))

    def reveal(self, token: str) -> str:
        """Mark the link revealed (once) and return its approver id."""
        key = self._key(token)

        def build(pipe: Pipe) -> str:
            raw = pipe.get(key)
            if raw is None:
                raise NotFound("this enrolment link is unknown, used or expired; ask an admin for a new one")
            record = json.loads(raw)
            if record.get("revealed"):
                raise Refused("link_used", "this link's code was already shown; ask an admin for a new link")
            pipe.multi()
            pipe.set(key, json.dumps({**record, "revealed": True}), keepttl=True)
            return str(record["approver"])

        return self.store.transact([key], build)

    def finish(self, token: str) -> None:
        self.store.r.delete(self._key(token))
