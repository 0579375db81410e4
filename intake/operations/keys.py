"""The broker's signing key, rotated and retired on the record: each change to the keyring is a
sealed event (``keys.rotated`` with both key ids, ``keys.retired``), so the report can show how
old each key is and how long a rotation left the old key trusted."""

from __future__ import annotations

import time
from typing import Protocol

from intake.audit.log import AuditLog
from intake.core.settings import Settings
from intake.protocol.keyfiles import retire_public_key, rotate_signing_key


class KeyHolder(Protocol):
    """What key management needs of the broker (:class:`intake.runtime.Broker` is one)."""

    settings: Settings
    audit: AuditLog


def rotate_signing(broker: KeyHolder, *, actor: str) -> tuple[str, str, float]:
    """A new signing key in front of the keyring (the old one still verifies), audited.
    Returns (new key id, old key id, seconds the key files took to write)."""
    started = time.monotonic()
    new, old = rotate_signing_key(broker.settings)
    seconds = round(time.monotonic() - started, 3)
    broker.audit.record(actor, "keys.rotated", "broker", new_kid=new, old_kid=old, seconds=seconds)
    return new, old, seconds


def retire_signing(broker: KeyHolder, kid: str, *, actor: str) -> None:
    """Drop ``kid`` from the keyring (tokens signed with it stop verifying), audited."""
    retire_public_key(broker.settings, kid)
    broker.audit.record(actor, "keys.retired", "broker", kid=kid)
