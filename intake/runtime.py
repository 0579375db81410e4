"""The broker's runtime handle: settings, Redis, audit log, store and policy, opened together.

Both the CLI (one command at a time) and ``intake serve`` (for its lifetime) use
:func:`open_broker`, so there is one way to wire the pieces.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import redis

from intake.audit.archive import Archive, LocalDir
from intake.audit.archiver import archive_due
from intake.audit.ledger import Ledger
from intake.audit.log import AuditLog
from intake.core.errors import ConfigError
from intake.core.policy import Policy, load_policy
from intake.core.redis_conn import open_redis
from intake.core.resources import EXAMPLE_POLICY
from intake.core.settings import Settings
from intake.operations.indicators.figures import Timeline
from intake.people.approvers import Approvers, SecretBox
from intake.people.mfa import StepUp
from intake.people.passkeys import Passkeys
from intake.protocol.keyfiles import ensure_keys, load_public_keys, load_secret, load_signing_key
from intake.protocol.tokens import Keyring, Signer
from intake.storage.outage import RedisOutage
from intake.storage.store import Store
from intake.tasks.promotion import Gatekeeper

if TYPE_CHECKING:
    from intake.tasks.dispatch import Dispatcher


@dataclass
class Broker:
    """The broker's handle. ``url`` is its Redis URL (it may hold a password: no repr)."""

    settings: Settings
    url: str = field(repr=False)
    client: redis.Redis
    audit: AuditLog
    store: Store
    _policy: Policy | None = field(default=None, repr=False)
    outage: RedisOutage = field(default_factory=RedisOutage, repr=False)  # notes Redis faults once
    _signer: tuple[int, Signer] | None = field(default=None, repr=False)

    @property
    def policy(self) -> Policy:
        """The policy file, read and validated on first use."""
        if self._policy is None:
            self._policy = load_policy(self.settings.policy_path)
        return self._policy

    @cached_property
    def ledger(self) -> Ledger:
        """The broker's verified view of the sealed chain (the authority; Redis is a cache)."""
        return Ledger(self.audit)

    def archive_due(self, *, now: float | None = None) -> int:
        """Move sealed entries older than ``INTAKE_AUDIT_HOT`` out of Redis into the archive, each
        segment followed by a signed tree head (:mod:`intake.audit.archive`). Only the sealer
        lease holder archives, and only entries before the newest ledger snapshot (a start
        never needs the archive). Returns how many entries moved."""
        archive = self.audit.archive
        snap = self.ledger.snapshot_at
        if archive is None or snap is None or self.audit.lease.token is None or self.ledger.halted:
            return 0
        return archive_due(archive, self.audit, self.signer, self.keyring.keys, hot_s=self.settings.audit_hot,
                           below_seq=snap.seq, now=now)

    @cached_property
    def timeline(self) -> Timeline:
        """The report's source: the sealed chain followed incrementally (:mod:`intake.operations.indicators`)."""
        return Timeline(self.audit, self.store)

    @property
    def signer(self) -> Signer:
        """The signing key, re-read when its file changes (``intake keys rotate``)."""
        path = self.settings.keys["signing"]
        stamp = path.stat().st_mtime_ns
        if self._signer is None or self._signer[0] != stamp:
            self._signer = (stamp, Signer(load_signing_key(self.settings)))
        return self._signer[1]

    @property
    def keyring(self) -> Keyring:
        return load_public_keys(self.settings.keys["public"])

    @cached_property
    def approvers(self) -> Approvers:
        box = SecretBox(load_secret(self.settings, "secrets"))
        passkeys = Passkeys(self.store, origin=self.settings.console_origin)
        return Approvers(self.store, box, StepUp(self.store), self.ledger, passkeys)

    @cached_property
    def gatekeeper(self) -> Gatekeeper:
        # Queued tasks go to RQ right after their commit; Dispatcher.reconcile catches up on
        # any enqueue that this hook could not do.
        return Gatekeeper(self.store, self.approvers, self.policy, self.ledger,
                          on_queued=self.dispatcher.on_queued, on_revoked=self.dispatcher.on_revoked)

    @cached_property
    def dispatcher(self) -> Dispatcher:
        """Enqueues tasks to RQ and reconciles lost jobs and abandoned runs."""
        from intake.tasks.dispatch import Dispatcher

        return Dispatcher(self)


def prepare_dev(settings: Settings) -> list[str]:
    """Dev mode's first-run setup in the data dir: keys and a copy of the example policy.

    Returns one line per thing it did, for the start-up banner.
    """
    done = []
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if ensure_keys(settings):
        done.append(f"generated keys in {settings.keys['signing'].parent}")
    if not settings.policy_path.exists():
        if not EXAMPLE_POLICY.exists():
            raise ConfigError(f"INTAKE_POLICY: no policy at {settings.policy_path} and no example to copy")
        shutil.copyfile(EXAMPLE_POLICY, settings.policy_path)
        done.append(f"copied {EXAMPLE_POLICY.name} to {settings.policy_path}")
    return done


@contextmanager
def open_broker(settings: Settings) -> Iterator[Broker]:
    """Open Redis and the store on it, for the block's duration. Loads the audit key: this is
    the broker's view (an agent worker uses :func:`open_redis` and its own report key)."""
    # Fail on a missing key before touching Redis.
    audit_key = load_secret(settings, "audit")
    with open_redis(settings) as (url, client):
        broker: Broker | None = None
        try:
            assert settings.audit_archive is not None
            audit = AuditLog(client, audit_key, settings.key_prefix, checkpoint=settings.audit_checkpoint,
                             archive=Archive(LocalDir(settings.audit_archive)), hot_s=settings.audit_hot)
            store = Store(
                client, audit, prefix=settings.key_prefix, max_text_bytes=settings.max_text_bytes
            )
            broker = Broker(settings, url, client, audit, store)
            yield broker
        finally:
            if broker is not None and "dispatcher" in broker.__dict__:
                broker.dispatcher.close()
