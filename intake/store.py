"""Ideas and tasks in Redis, under one key prefix.

Every state change runs in :meth:`Store.transact`: WATCH the keys it read, check the transition,
then MULTI the write *and its audit event* together. Either both land or neither does; an illegal
transition raises before MULTI and writes nothing. Values are JSON parsed back through the models
on every read: Redis is storage, never authority.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis

from intake.audit import AuditLog, event
from intake.errors import IllegalTransition, IntakeError, InvalidInput, NotFound
from intake.models import (
    IDEA_PENDING,
    IDEA_TRANSITIONS,
    TASK_OPEN,
    TASK_TRANSITIONS,
    AuditEvent,
    Idea,
    IdeaDraft,
    IdeaState,
    Task,
    TaskState,
    is_id,
    new_id,
    sha256_hex,
)

T = TypeVar("T")
Pipe = redis.client.Pipeline
Clock = Callable[[], float]


class Keys:
    """Every Redis key intake uses, built in one place."""

    def __init__(self, prefix: str) -> None:
        self.p = prefix

    def idea(self, idea_id: str) -> str:
        return f"{self.p}:idea:{idea_id}"

    def task(self, task_id: str) -> str:
        return f"{self.p}:task:{task_id}"

    def delivery(self, channel: str, delivery_id: str) -> str:
        # Hashed: delivery ids come from outside and may hold anything.
        return f"{self.p}:delivery:{channel}:{sha256_hex(delivery_id.encode())[:40]}"

    @property
    def ideas(self) -> str:
        return f"{self.p}:ideas"

    @property
    def ideas_pending(self) -> str:
        return f"{self.p}:ideas:pending"

    @property
    def tasks(self) -> str:
        return f"{self.p}:tasks"

    @property
    def tasks_open(self) -> str:
        return f"{self.p}:tasks:open"

    def nonce(self, nonce: str) -> str:
        return f"{self.p}:nonce:{nonce}"

    @property
    def freeze(self) -> str:
        return f"{self.p}:freeze"

    def approver(self, approver_id: str) -> str:
        return f"{self.p}:approver:{approver_id}"

    @property
    def approvers(self) -> str:
        return f"{self.p}:approvers"

    def totp_last_step(self, approver_id: str) -> str:
        return f"{self.p}:totp:last:{approver_id}"

    def totp_failures(self, approver_id: str) -> str:
        return f"{self.p}:totp:fail:{approver_id}"

    def totp_lock(self, approver_id: str) -> str:
        return f"{self.p}:totp:lock:{approver_id}"


def default_title(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= 80 else first[:79] + "…"


class Store:
    """Ideas and tasks: capture, read, list and every state transition, each with its audit event."""

    def __init__(
        self,
        client: redis.Redis,
        audit: AuditLog,
        *,
        prefix: str,
        max_text_bytes: int = 16 * 1024,
        clock: Clock = time.time,
    ) -> None:
        self.r = client
        self.audit = audit
        self.keys = Keys(prefix)
        self.max_text_bytes = max_text_bytes
        self.clock = clock

    # -- transactions ----------------------------------------------------------------------
    def transact(self, watch: Iterable[str], build: Callable[[Pipe], T], *, attempts: int = 100) -> T:
        """Run ``build`` under WATCH; it reads through ``pipe``, raises to abort, or calls
        ``pipe.multi()`` and queues its writes and audit events. Retries on a concurrent write,
        then seals the audit events it appended."""
        keys = list(watch)
        for _ in range(attempts):
            with self.r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*keys)
                    result = build(pipe)
                    if pipe.explicit_transaction:
                        pipe.execute()
                    break
                except redis.WatchError:
                    continue
        else:
            raise IntakeError("too many concurrent changes to the same record; try again")
        self.audit.seal_pending()
        return result

    def emit(self, pipe: Pipe, actor: str, action: str, subject: str, **data: Any) -> AuditEvent:
        """Queue an audit event on a MULTI pipeline (stamped with the store's clock)."""
        ev = event(actor, action, subject, at=self.clock(), **data)
        self.audit.append(pipe, ev)
        return ev

    # -- reading ---------------------------------------------------------------------------
    def read_idea(self, conn: redis.Redis | Pipe, idea_id: str) -> Idea:
        if not is_id(idea_id, "I"):
            raise InvalidInput(f"not an idea id: {idea_id!r} (ids look like I-3f9a1c2b7d0e)")
        raw = conn.get(self.keys.idea(idea_id))
        if raw is None:
            raise NotFound(f"no idea {idea_id}")
        return Idea.model_validate_json(raw)

    def read_task(self, conn: redis.Redis | Pipe, task_id: str) -> Task:
        if not is_id(task_id, "T"):
            raise InvalidInput(f"not a task id: {task_id!r} (ids look like T-3f9a1c2b7d0e)")
        raw = conn.get(self.keys.task(task_id))
        if raw is None:
            raise NotFound(f"no task {task_id}")
        return Task.model_validate_json(raw)

    def get_idea(self, idea_id: str) -> Idea:
        return self.read_idea(self.r, idea_id)

    def get_task(self, task_id: str) -> Task:
        return self.read_task(self.r, task_id)

    def _many(self, keys: list[str], model: type[T]) -> list[T]:
        if not keys:
            return []
        return [model.model_validate_json(raw) for raw in self.r.mget(keys) if raw]  # type: ignore[attr-defined]

    def pending_ideas(self) -> list[Idea]:
        """Ideas still waiting for promotion, oldest first: O(pending), not O(all)."""
        ids = self.r.zrange(self.keys.ideas_pending, 0, -1)
        return self._many([self.keys.idea(i) for i in ids], Idea)

    def recent_ideas(self, limit: int = 100) -> list[Idea]:
        ids = self.r.zrevrange(self.keys.ideas, 0, limit - 1)
        return self._many([self.keys.idea(i) for i in ids], Idea)

    def open_tasks(self) -> list[Task]:
        ids = self.r.zrange(self.keys.tasks_open, 0, -1)
        return self._many([self.keys.task(i) for i in ids], Task)

    def recent_tasks(self, limit: int = 100) -> list[Task]:
        ids = self.r.zrevrange(self.keys.tasks, 0, limit - 1)
        return self._many([self.keys.task(i) for i in ids], Task)

    # -- writing ---------------------------------------------------------------------------
    def write_idea(self, pipe: Pipe, idea: Idea) -> None:
        pipe.set(self.keys.idea(idea.id), idea.model_dump_json())
        if idea.state in IDEA_PENDING:
            pipe.zadd(self.keys.ideas_pending, {idea.id: idea.created_at})
        else:
            pipe.zrem(self.keys.ideas_pending, idea.id)

    def write_task(self, pipe: Pipe, task: Task) -> None:
        pipe.set(self.keys.task(task.id), task.model_dump_json())
        pipe.zadd(self.keys.tasks, {task.id: task.created_at}, nx=True)
        if task.state in TASK_OPEN:
            pipe.zadd(self.keys.tasks_open, {task.id: task.created_at})
        else:
            pipe.zrem(self.keys.tasks_open, task.id)

    def check_idea_move(self, idea: Idea, to: IdeaState) -> None:
        if to not in IDEA_TRANSITIONS.get(idea.state, frozenset()):
            raise IllegalTransition("idea", idea.id, idea.state.value, to.value)

    def check_task_move(self, task: Task, to: TaskState) -> None:
        if to not in TASK_TRANSITIONS.get(task.state, frozenset()):
            raise IllegalTransition("task", task.id, task.state.value, to.value)

    # -- capture ---------------------------------------------------------------------------
    def capture(self, draft: IdeaDraft, *, ttl_s: int | None = None) -> tuple[Idea, bool]:
        """Store an untrusted idea durably; idempotent on (channel, delivery id).

        Returns ``(idea, created)``. The same delivery again returns the first idea and writes
        nothing (no second audit event). Empty or oversize text is refused, never truncated.
        """
        if not draft.text.strip():
            raise InvalidInput("idea text is empty")
        size = len(draft.text.encode())
        if size > self.max_text_bytes:
            raise InvalidInput(
                f"idea text is {size} bytes; the limit is {self.max_text_bytes} (INTAKE_MAX_TEXT_BYTES)"
            )
        dkey = self.keys.delivery(draft.channel.value, draft.delivery_id)

        def build(pipe: Pipe) -> tuple[Idea, bool]:
            existing = pipe.get(dkey)
            if existing is not None:
                return self.read_idea(pipe, existing), False
            now = self.clock()
            text_hash = sha256_hex(draft.text.encode())
            idea = Idea(
                id=new_id("I"),
                channel=draft.channel,
                requester=draft.requester,
                delivery_id=draft.delivery_id,
                title=draft.title or default_title(draft.text),
                text=draft.text,
                provenance=draft.provenance,
                raw_sha256=draft.raw_sha256 or text_hash,
                state=IdeaState.CAPTURED,
                created_at=now,
                updated_at=now,
                expires_at=now + ttl_s if ttl_s else None,
            )
            pipe.multi()
            pipe.set(dkey, idea.id)
            pipe.zadd(self.keys.ideas, {idea.id: now})
            self.write_idea(pipe, idea)
            self.emit(
                pipe,
                draft.requester,
                "idea.captured",
                idea.id,
                channel=draft.channel.value,
                text_sha256=text_hash,
                bytes=size,
            )
            return idea, True

        return self.transact([dkey], build)

    # -- simple transitions ----------------------------------------------------------------
    def move_idea(
        self,
        idea_id: str,
        to: IdeaState,
        *,
        actor: str,
        reason: str | None = None,
        check: Callable[[Idea], None] | None = None,
        **data: Any,
    ) -> Idea:
        """Move an idea to ``to`` (audited as ``idea.<to>``); ``check`` may refuse first."""

        def build(pipe: Pipe) -> Idea:
            idea = self.read_idea(pipe, idea_id)
            if check is not None:
                check(idea)
            self.check_idea_move(idea, to)
            moved = idea.model_copy(update={"state": to, "updated_at": self.clock(), "reason": reason})
            pipe.multi()
            self.write_idea(pipe, moved)
            extra = {"reason": reason} if reason else {}
            self.emit(pipe, actor, f"idea.{to.value}", idea_id, **extra, **data)
            return moved

        return self.transact([self.keys.idea(idea_id)], build)

    def move_task(
        self,
        task_id: str,
        to: TaskState,
        *,
        actor: str,
        reason: str | None = None,
        update: dict[str, Any] | None = None,
        check: Callable[[Task], None] | None = None,
        also: Callable[[Pipe, Task], None] | None = None,
        **data: Any,
    ) -> Task:
        """Move a task to ``to`` (audited as ``task.<to>``).

        ``check`` may refuse before anything is written; ``also`` queues further writes in the
        same MULTI (e.g. burning a nonce on revocation).
        """

        def build(pipe: Pipe) -> Task:
            task = self.read_task(pipe, task_id)
            if check is not None:
                check(task)
            self.check_task_move(task, to)
            changes: dict[str, Any] = {"state": to, "updated_at": self.clock(), **(update or {})}
            if reason is not None:
                changes["reason"] = reason
            moved = task.model_copy(update=changes)
            pipe.multi()
            self.write_task(pipe, moved)
            if also is not None:
                also(pipe, moved)
            extra = {"reason": reason} if reason else {}
            self.emit(pipe, actor, f"task.{to.value}", task_id, **extra, **data)
            return moved

        return self.transact([self.keys.task(task_id)], build)
