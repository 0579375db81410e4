"""People, not ids: one person, one intake id, many linked identities.

A person is the unit the no-self-approval rule compares. Each has one intake id (the approver
id format; an approver id *is* a person id) and identities on the channels: ``slack:U…``,
``email:addr`` (lower-cased), ``github:id:<n>``, ``gitlab:id:<n>``, ``jira:accountId``,
``os:username`` and ``cli:<id>``. An identity belongs to at most one person.

Forge identities are the platform's **numeric user id** (``github:id:1234``), never the login:
a login can be renamed (and a freed login taken by someone else), the id cannot. The login is
kept beside it as provenance, for display only. Links made before this (``github:<login>``)
still parse, so old records and old ideas keep their meaning, but a new link must be the id
form, and webhooks only ever produce it (migration: ``intake person link ID github:id:<n>``,
the id from ``GET https://api.github.com/users/<login>``, then unlink the login form).

Email addresses are compared per the policy's ``[identities]`` (see :func:`canonical_identity`):
case-insensitive, and with a ``+tag`` subaddress stripped where the domain is declared to use it,
so an alias of a linked mailbox is that person.

Records are MAC'd with the broker's record key (like ideas and approvals), so a person edited in
Redis, or an index entry pointing an identity at someone else, is not believed. Every change
commits with its audit event in one transaction.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field

from intake.core.errors import InvalidInput, NotFound, Refused
from intake.core.models import APPROVER_ID_RE, _Model
from intake.storage.store import Pipe, Store

# Each kind's value, checked with re.fullmatch (so a trailing newline never passes).
IDENTITY_KINDS: dict[str, str] = {
    "slack": r"[UW][A-Z0-9]{8,20}",
    "email": r"[a-z0-9._%+-]{1,64}@[a-z0-9-]{1,63}(\.[a-z0-9-]{1,63})+",
    # id:<n> is the immutable user id; a bare login is the legacy (pre-issue-20) form.
    "github": r"id:[0-9]{1,20}|[a-z0-9](?:[a-z0-9-]{0,38})",
    "gitlab": r"id:[0-9]{1,20}|[a-z0-9_][a-z0-9_.-]{0,254}",
    "jira": r"[A-Za-z0-9:_-]{1,128}",
    "os": r"[a-z_][a-z0-9_.-]{0,31}",
    "cli": r"[a-z][a-z0-9_.-]{0,39}",
    # OpenID Connect: the issuer URL exactly as the provider states it, '#', the subject
    # (oidc:https://idp.example.com#248289761001): console single sign-on, intake/console/sso.py.
    "oidc": r"https?://[A-Za-z0-9.:\[\]_~%/-]{1,253}#[\x21-\x7e]{1,255}",
}
# Logins and mail addresses are case-insensitive on their platforms; ids are not.
_FOLD = {"email", "github", "gitlab"}
_PERSON_ID = re.compile(APPROVER_ID_RE.strip("^$"))


def parse_person_id(value: str) -> str:
    """A person id as typed, or InvalidInput (``'alice\\n'`` is not ``'alice'``)."""
    if not isinstance(value, str) or not _PERSON_ID.fullmatch(value):
        raise InvalidInput(f"{value!r} is not a valid person id (a-z, 0-9, '.', '_', '-'; up to 40)")
    return value


def parse_identity(value: str) -> str:
    """Normalise ``kind:value`` (case-folding where the platform does) or raise InvalidInput."""
    kind, sep, rest = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not sep or kind not in IDENTITY_KINDS:
        raise InvalidInput(f"{value!r} is not an identity (one of {', '.join(k + ':…' for k in IDENTITY_KINDS)})")
    if kind in _FOLD:
        rest = rest.lower()
    if not re.fullmatch(IDENTITY_KINDS[kind], rest):
        raise InvalidInput(f"{value!r} is not a valid {kind} identity")
    return f"{kind}:{rest}"


_FORGES = ("github", "gitlab")


def canonical_identity(identity: str, subaddress_domains: frozenset[str] = frozenset()) -> str:
    """The form of ``identity`` that names its owner: an email address with its ``+tag``
    removed when its domain is one of ``subaddress_domains`` (the policy declares which mail
    systems deliver ``alice+x@`` to ``alice@``); anything else unchanged."""
    kind, _, rest = identity.partition(":")
    if kind != "email" or not subaddress_domains:
        return identity
    local, _, domain = rest.rpartition("@")
    if domain in subaddress_domains and "+" in local:
        local = local.split("+", 1)[0]
        if local:
            return f"email:{local}@{domain}"
    return identity


def parse_link(value: str) -> str:
    """An identity as a *new* link: as :func:`parse_identity`, and a forge identity must be the
    numeric id form (``github:id:1234``); a login is refused, as it can be renamed."""
    ident = parse_identity(value)
    kind, _, rest = ident.partition(":")
    if kind in _FORGES and not rest.startswith("id:"):
        raise InvalidInput(f"{value!r}: link the {kind} user's numeric id ({kind}:id:<n>), not a login, "
                           "which its owner can rename")
    return ident


class Person(_Model):
    id: str = Field(pattern=APPROVER_ID_RE)
    name: str = Field(min_length=1, max_length=100)
    identities: tuple[str, ...] = ()
    # Identities once linked and since unlinked: still this person's words for the
    # no-self-approval rule (unlinking must not make one's own request someone else's).
    former: tuple[str, ...] = ()
    created_at: float
    mac: str = ""

    def ever(self) -> frozenset[str]:
        """Every identity this person has, or ever had."""
        return frozenset(self.identities) | frozenset(self.former)


def person_fields(person: Person) -> dict[str, Any]:
    """What a person's MAC covers: everything but the MAC itself."""
    return {"id": person.id, "name": person.name, "identities": sorted(person.identities),
            "former": sorted(person.former), "created_at": person.created_at}


class People:
    """The person registry in Redis (``<prefix>:person:<id>`` plus an identity index)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        p = store.keys.p
        self._index = f"{p}:people:identity"  # identity -> person id (a hint; the record decides)
        self._ids = f"{p}:people"

    def _key(self, person_id: str) -> str:
        return f"{self.store.keys.p}:person:{person_id}"

    # -- reading ---------------------------------------------------------------------------
    def _read(self, conn: Any, person_id: str) -> Person | None:
        raw = conn.get(self._key(person_id))
        if raw is None:
            return None
        person = Person.model_validate_json(raw)
        if person.id != person_id or not self.store.audit.record_ok("person", person_fields(person), person.mac):
            raise Refused("tampered", f"person {person_id}'s record failed its integrity check")
        return person

    def find(self, person_id: str) -> Person | None:
        return self._read(self.store.r, person_id)

    def get(self, person_id: str) -> Person:
        person = self.find(parse_person_id(person_id))
        if person is None:
            raise NotFound(f"no person {person_id}")
        return person

    def all(self) -> list[Person]:
        found = []
        for pid in sorted(self.store.r.smembers(self._ids)):
            try:
                if (person := self.find(pid)) is not None:
                    found.append(person)
            except Refused:
                continue  # a tampered record is listed by nobody
        return found

    def resolve(self, identity: str) -> str | None:
        """The person this verified identity belongs to, or None when it is linked to nobody.

        The index only says where to look: the person's MAC'd record must list the identity."""
        try:
            ident = parse_identity(identity)
        except InvalidInput:
            return None
        pid = self.store.r.hget(self._index, ident)
        if pid is None:
            return None
        try:
            person = self.find(pid)
        except Refused:
            return None
        return pid if person is not None and ident in person.identities else None

    def persons_of(self, *identities: str, subaddress_domains: frozenset[str] = frozenset()) -> set[str]:
        """Every person behind these identities, each also in its canonical form
        (:func:`canonical_identity`); unlinked ones contribute nothing."""
        found = set()
        for ident in identities:
            if not ident:
                continue
            for form in {ident, canonical_identity(ident, subaddress_domains)}:
                if (pid := self.resolve(form)) is not None:
                    found.add(pid)
        return found

    # -- changes ---------------------------------------------------------------------------
    def _write(self, pipe: Pipe, person: Person) -> Person:
        sealed = person.model_copy(update={
            "identities": tuple(sorted(person.identities)), "former": tuple(sorted(person.former)),
            "mac": self.store.audit.record_mac("person", person_fields(person)),
        })
        pipe.set(self._key(person.id), sealed.model_dump_json())
        pipe.sadd(self._ids, person.id)
        return sealed

    def _claim(self, pipe: Pipe, person_id: str, identity: str) -> None:
        """Refuse an identity already linked to someone else (checked under WATCH)."""
        owner = pipe.hget(self._index, identity)
        if owner is not None and owner != person_id:
            other = self._read(pipe, owner)
            if other is not None and identity in other.identities:
                raise InvalidInput(f"{identity} is already linked to {owner}")

    def upsert(self, person_id: str, *, name: str | None, identities: tuple[str, ...] = (),
               actor: str, create: bool = True) -> Person:
        """Create ``person_id`` (when ``create``) or add ``identities`` to it; audited."""
        parse_person_id(person_id)
        # Every person answers to cli:<their id> (a token caller's identity, `idea --as`).
        links = tuple(dict.fromkeys([f"cli:{person_id}", *(parse_link(i) for i in identities)]))
        key = self._key(person_id)

        def build(pipe: Pipe) -> Person:
            current = self._read(pipe, person_id)
            if current is None and not create:
                raise NotFound(f"no person {person_id}")
            for ident in links:
                self._claim(pipe, person_id, ident)
            if current is None:
                try:
                    person = Person(id=person_id, name=name or person_id, identities=links,
                                    created_at=self.store.clock())
                except ValueError as exc:
                    raise InvalidInput(f"invalid person: {exc.errors()[0]['msg']}") from None  # type: ignore[attr-defined]
                action = "person.added"
            else:
                new = tuple(i for i in links if i not in current.identities)
                if not new and (name is None or name == current.name):
                    return current
                person = current.model_copy(update={"identities": current.identities + new,
                                                    "name": name or current.name})
                action = "person.linked"
            pipe.multi()
            sealed = self._write(pipe, person)
            for ident in links:
                pipe.hset(self._index, ident, person_id)
            self.store.emit(pipe, actor, action, person_id, identities=list(links))
            return sealed

        return self.store.transact([key, self._index], build)

    def unlink(self, person_id: str, identity: str, *, actor: str) -> Person:
        ident = parse_identity(identity)

        def build(pipe: Pipe) -> Person:
            current = self._read(pipe, parse_person_id(person_id))
            if current is None:
                raise NotFound(f"no person {person_id}")
            if ident not in current.identities:
                raise InvalidInput(f"{ident} is not linked to {person_id}")
            pipe.multi()
            sealed = self._write(pipe, current.model_copy(
                update={"identities": tuple(i for i in current.identities if i != ident),
                        "former": tuple(sorted({*current.former, ident}))}))
            pipe.hdel(self._index, ident)
            self.store.emit(pipe, actor, "person.unlinked", person_id, identity=ident)
            return sealed

        return self.store.transact([self._key(person_id), self._index], build)


def bootstrap_admin(people: People, admins: tuple[str, ...], person_id: str, *, name: str,
                    os_user: str, actor: str) -> Person:
    """Create the first admin, linked to ``os:<os_user>``. Refused once any admin the policy
    names exists as a person: after that, admins add people through the API."""
    if person_id not in admins:
        raise InvalidInput(f"{person_id!r} is not in the policy's [admins] members")
    existing = [a for a in admins if people.find(a) is not None]
    if existing:
        raise InvalidInput(f"an admin already exists ({', '.join(existing)}); use the API (intake person …)")
    return people.upsert(person_id, name=name, identities=(f"os:{os_user}",), actor=actor)
