"""Who is calling the API: the kernel's word on the local socket, or a per-person token over TCP.

- On the broker's unix socket the caller is the peer's uid as the kernel reports it
  (``SO_PEERCRED``), mapped to an OS user name, the identity ``os:<name>``, and the person it is
  linked to (if any). Nothing the client sends can change that.
- Over TCP the caller presents ``Authorization: Bearer <token>``. Tokens are 256 bits from
  :mod:`secrets`, shown once, stored only as their SHA-256 in a record MAC'd with the broker's
  record key, revocable, and every change is audited.
- A token has a **scope**. ``power``: the person made it themselves, with their own fresh code,
  so it may do everything they may. ``ideas``: an admin made it for someone else; it reads and
  files ideas, nothing more, so an admin who holds the token they minted for dave still cannot
  confirm, approve, promote or accept as dave. A record without a scope (made before scopes)
  is ``ideas``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pwd
import re
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from intake.core.errors import InvalidInput, NotFound, Refused
from intake.people.registry import People, parse_identity, parse_person_id
from intake.storage.store import Pipe, Store

_TOKEN = re.compile(r"itk_[A-Za-z0-9_-]{43}")
_TOKEN_ID = re.compile(r"tok-[0-9a-f]{12}")


class Unauthenticated(Exception):
    """No verifiable caller: a 401 with nothing written."""


@dataclass(frozen=True)
class Caller:
    """A verified caller. ``identity`` is what the transport proved (``os:<user>`` on the
    socket, ``cli:<person>`` for a token); ``person`` is who that is, when linked."""

    identity: str
    person: str | None
    via: str  # "socket" or "token"
    scope: str = "power"  # "power" (socket, own token) or "ideas" (a token an admin made)

    @property
    def actor(self) -> str:
        return f"person:{self.person}" if self.person else self.identity


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process on the other end of a unix-socket request, from the kernel."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ApiTokens:
    """Per-person API tokens, stored hashed."""

    def __init__(self, store: Store, people: People) -> None:
        self.store = store
        self.people = people
        self._records = f"{store.keys.p}:apitokens"  # token id -> record JSON

    def _by_hash(self, digest: str) -> str:
        return f"{self.store.keys.p}:apitoken:{digest}"

    def _fields(self, rec: dict[str, Any]) -> dict[str, Any]:
        fields = {k: rec[k] for k in ("id", "person", "sha256", "created_at")}
        if "scope" in rec:  # records from before scopes were MAC'd without one (and are "ideas")
            fields["scope"] = rec["scope"]
        return fields

    def create(self, person_id: str, *, actor: str, scope: str) -> tuple[str, str]:
        """A new token for ``person_id``: returns (token id, the token itself, shown once).
        ``scope`` is ``power`` only when the person makes it for themselves (the caller checks)."""
        if scope not in ("power", "ideas"):
            raise InvalidInput(f"scope: {scope!r} is not power or ideas")
        self.people.get(parse_person_id(person_id))
        token = "itk_" + secrets.token_urlsafe(32)
        token_id = f"tok-{secrets.token_hex(6)}"
        rec: dict[str, Any] = {"id": token_id, "person": person_id, "sha256": _sha(token),
                               "created_at": self.store.clock(), "scope": scope}
        rec["mac"] = self.store.audit.record_mac("api_token", self._fields(rec))

        def build(pipe: Pipe) -> None:
            pipe.multi()
            pipe.hset(self._records, token_id, json.dumps(rec))
            pipe.set(self._by_hash(rec["sha256"]), token_id)
            self.store.emit(pipe, actor, "api_token.created", person_id, token=token_id, scope=scope)

        self.store.transact([self._records], build)
        return token_id, token

    def revoke(self, token_id: str, *, actor: str) -> str:
        if not _TOKEN_ID.fullmatch(token_id):
            raise InvalidInput(f"{token_id!r} is not a token id (tok-…)")

        def build(pipe: Pipe) -> str:
            raw = pipe.hget(self._records, token_id)
            if raw is None:
                raise NotFound(f"no token {token_id}")
            rec = json.loads(raw)
            pipe.multi()
            pipe.hdel(self._records, token_id)
            pipe.delete(self._by_hash(str(rec.get("sha256", ""))))
            self.store.emit(pipe, actor, "api_token.revoked", str(rec.get("person", "")), token=token_id)
            return str(rec.get("person", ""))

        return self.store.transact([self._records], build)

    def listing(self, person_id: str | None = None) -> list[dict[str, Any]]:
        rows = [json.loads(raw) for raw in self.store.r.hvals(self._records)]
        return sorted(({**{k: r[k] for k in ("id", "person", "created_at")}, "scope": r.get("scope", "ideas")}
                       for r in rows
                       if person_id is None or r.get("person") == person_id), key=lambda r: r["id"])

    def authenticate(self, token: str) -> tuple[str, str] | None:
        """``(person, scope)`` of a token, or None. Checks the record's MAC and hash, and that
        the person still exists."""
        if not _TOKEN.fullmatch(token):
            return None
        digest = _sha(token)
        token_id = self.store.r.get(self._by_hash(digest))
        raw = self.store.r.hget(self._records, token_id) if token_id else None
        if raw is None:
            return None
        rec = json.loads(raw)
        try:
            fields = self._fields(rec)
        except KeyError:
            return None
        if not (self.store.audit.record_ok("api_token", fields, str(rec.get("mac", "")))
                and hmac.compare_digest(str(rec["sha256"]), digest) and rec["id"] == token_id):
            return None
        person = str(rec["person"])
        scope = "power" if rec.get("scope") == "power" else "ideas"
        try:
            return (person, scope) if self.people.find(person) is not None else None
        except Refused:  # the person's record was edited in Redis: nobody is believed
            return None


def identify(request: web.Request, people: People, tokens: ApiTokens) -> Caller:
    """The verified caller of ``request``, or :class:`Unauthenticated`."""
    uid = peer_uid(request)
    if uid is not None:
        try:
            identity = parse_identity(f"os:{pwd.getpwuid(uid).pw_name}")
        except (KeyError, InvalidInput):
            raise Unauthenticated("your OS user has no usable name") from None
        return Caller(identity, people.resolve(identity), "socket")
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme != "Bearer" or not token:
        raise Unauthenticated("send Authorization: Bearer <token> (or use the broker's local socket)")
    found = tokens.authenticate(token.strip())
    if found is None:
        raise Unauthenticated("the API token is not valid")
    person, scope = found
    return Caller(f"cli:{person}", person, "token", scope)
