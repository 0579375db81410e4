"""What the task modules use of the broker's runtime handle, as a :class:`~typing.Protocol`.

:class:`intake.runtime.Broker` satisfies it; the task modules name this instead of importing the
runtime (which imports them), so the layers stay one-way.
"""

from __future__ import annotations

from typing import Any, Protocol

import redis

from intake.audit.ledger import Ledger, TaskFact
from intake.audit.log import AuditLog
from intake.core.models import Task
from intake.core.policy import Policy
from intake.core.settings import Settings
from intake.protocol.tokens import Keyring, Signer
from intake.storage.outage import RedisOutage
from intake.storage.store import Store
from intake.tasks.promotion import Gatekeeper


class Dispatching(Protocol):
    """The dispatcher's part that applying workers' reports needs (:class:`~intake.tasks.dispatch.Dispatcher`)."""

    def tamper(self, task_id: str, why: str, **data: Any) -> None: ...

    def on_queued(self, task: Task) -> None: ...

    def lease_ok(self, fact: TaskFact) -> bool: ...

    def write_lease(self, worker: str, task_id: str, attempt: int, run: str, status: str = "granted",
                    reason: str = "") -> None: ...


class BrokerHandle(Protocol):
    """The broker's Redis, audit log, store, policy, ledger and keys, opened together."""

    settings: Settings
    url: str
    client: redis.Redis
    audit: AuditLog
    store: Store
    outage: RedisOutage

    @property
    def policy(self) -> Policy: ...

    @property
    def ledger(self) -> Ledger: ...

    @property
    def signer(self) -> Signer: ...

    @property
    def keyring(self) -> Keyring: ...

    @property
    def gatekeeper(self) -> Gatekeeper: ...

    @property
    def dispatcher(self) -> Dispatching: ...
