"""The person registry: strict identities, one owner per identity, MAC'd records, audited changes."""

from __future__ import annotations

import json

import pytest

from intake.core.errors import InvalidInput
from intake.people.registry import People, bootstrap_admin, parse_identity, parse_person_id
from intake.storage.store import Store


@pytest.fixture
def people(store: Store) -> People:
    return People(store)


@pytest.mark.parametrize("raw", ["os:alice\n", "cli:alice\n", "slack:U0ALICE001\n", "os:", "alice",
                                 "email:alice", "github:-x", "os:Alice Smith", "carrier:pigeon"])
def test_identities_are_validated_whole(raw: str) -> None:
    with pytest.raises(InvalidInput):
        parse_identity(raw)


def test_identities_are_normalised() -> None:
    assert parse_identity("email:Alice@Example.COM") == "email:alice@example.com"
    assert parse_identity("github:Alice-GH") == "github:alice-gh"
    assert parse_identity("slack:U0ALICE001") == "slack:U0ALICE001"
    with pytest.raises(InvalidInput):
        parse_identity("slack:u0alice001")  # Slack ids are case-sensitive: not folded
    with pytest.raises(InvalidInput):
        parse_person_id("alice\n")


def test_link_resolve_unlink_and_one_owner(people: People, store: Store) -> None:
    people.upsert("alice", name="Alice", identities=("os:alice", "email:Alice@acme.test"), actor="test")
    assert people.resolve("email:ALICE@acme.test") == "alice"
    assert people.resolve("cli:alice") == "alice"  # every person answers to cli:<id>
    assert people.resolve("os:bob") is None
    people.upsert("bob", name="Bob", actor="test")
    with pytest.raises(InvalidInput, match="already linked to alice"):
        people.upsert("bob", name=None, identities=("os:alice",), actor="test", create=False)
    people.unlink("alice", "os:alice", actor="test")
    assert people.resolve("os:alice") is None
    people.upsert("bob", name=None, identities=("os:alice",), actor="test", create=False)
    assert people.resolve("os:alice") == "bob"
    actions = [e["action"] for e in store.audit.export()]
    assert actions == ["person.added", "person.added", "person.unlinked", "person.linked"]


def test_a_redis_writer_cannot_link_an_identity(people: People, store: Store) -> None:
    """Someone with the keyspace points os:mallory at alice in the index, then edits alice's
    record to list it: neither is believed (the record's MAC no longer holds)."""
    people.upsert("alice", name="Alice", identities=("os:alice",), actor="test")
    store.r.hset(f"{store.keys.p}:people:identity", "os:mallory", "alice")
    assert people.resolve("os:mallory") is None
    key = f"{store.keys.p}:person:alice"
    raw = json.loads(store.r.get(key))
    raw["identities"].append("os:mallory")
    store.r.set(key, json.dumps(raw))
    assert people.resolve("os:mallory") is None and people.resolve("os:alice") is None


def test_bootstrap_admin_only_once(people: People) -> None:
    with pytest.raises(InvalidInput, match="not in the policy"):
        bootstrap_admin(people, ("alice",), "mallory", name="M", os_user="root", actor="test")
    bootstrap_admin(people, ("alice",), "alice", name="Alice", os_user="root", actor="test")
    assert people.resolve("os:root") == "alice"
    with pytest.raises(InvalidInput, match="an admin already exists"):
        bootstrap_admin(people, ("alice", "bob"), "bob", name="Bob", os_user="bob", actor="test")
