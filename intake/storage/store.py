"""Ideas and tasks in Redis, under one key prefix.

Every state change runs in :meth:`Store.transact`: WATCH the keys it read, check the transition,
then MULTI the write *and its audit event* together. Either both land or neither does; an illegal
transition raises before MULTI and writes nothing. Values are JSON parsed back through the models
on every read: Redis is storage, never authority.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis

from intake.audit.log import AuditLog, event
from intake.core.errors import IllegalTransition, IntakeError, InvalidInput, NotFound
from intake.core.ids import parse_id_prefix
from intake.core.models import (
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
from intake.protocol.keyspace import Keys, index_member
from intake.storage import indexes
from intake.text.normalise import normalise, normalise_title

T = TypeVar("T")

# Capture a batch in one call. Each capture brings 7 + n keys and 8 arguments, in the order
# :meth:`Store.prepare_capture` gives them (n, its number of console listing indexes, is its
# last argument): claim the delivery id, store the idea, index it (its n listing indexes with
# member ARGV[7]) and append its audit event; or, for a delivery seen before (earlier, or earlier
# in this batch), change nothing and name the first idea. One script call per batch, not per
# capture: invoking a script costs Redis more than the writes inside it (bench/slack_capture.py).
# The batch runs atomically, so each capture in it does.
CAPTURE_SCRIPT = """
local out, k, a = {}, 0, 0
while a < #ARGV do
  local n = tonumber(ARGV[a + 8])
  local existing = redis.call('GET', KEYS[k + 1])
  if existing then
    out[#out + 1] = existing
  else
    redis.call('SET', KEYS[k + 1], ARGV[a + 1])
    redis.call('SET', KEYS[k + 2], ARGV[a + 2])
    redis.call('ZADD', KEYS[k + 3], ARGV[a + 3], ARGV[a + 1])
    redis.call('ZADD', KEYS[k + 4], ARGV[a + 3], ARGV[a + 1])
    redis.call('ZADD', KEYS[k + 7], ARGV[a + 3], ARGV[a + 1])
    if ARGV[a + 6] ~= '' then redis.call('ZADD', KEYS[k + 6], ARGV[a + 6], ARGV[a + 1]) end
    redis.call('XADD', KEYS[k + 5], '*', 'e', ARGV[a + 4], 'm', ARGV[a + 5])
    for i = k + 8, k + 7 + n do redis.call('ZADD', KEYS[i], 0, ARGV[a + 7]) end
    out[#out + 1] = false
  end
  k, a = k + 7 + n, a + 8
end
return out
"""
Pipe = redis.client.Pipeline
Clock = Callable[[], float]


def idea_fields(idea: Idea) -> dict[str, Any]:
    """The fields of an idea fixed at capture, which its MAC covers."""
    return {
        "id": idea.id, "channel": idea.channel.value, "requester": idea.requester,
        "filed_by": idea.filed_by or idea.requester, "delivery_id": idea.delivery_id,
        "text": idea.text, "provenance": idea.provenance,
        "raw_sha256": idea.raw_sha256, "created_at": idea.created_at,
    }


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
        self._capture = client.register_script(CAPTURE_SCRIPT)

    # -- transactions ----------------------------------------------------------------------
    def transact(self, watch: Iterable[str], build: Callable[[Pipe], T], *, attempts: int = 100) -> T:
        """Run ``build`` under WATCH; it reads through ``pipe``, raises to abort, or calls
        ``pipe.multi()`` and queues its writes and audit events. Retries on a concurrent write,
        then has the audit events it appended sealed."""
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
        self.audit.kick()
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

    # -- result reviews (issue 20) -------------------------------------------------------------
    def _review_key(self, task_id: str, digest: str) -> str:
        return f"{self.keys.p}:review:{task_id}:{digest}"

    def put_review(self, task_id: str, diff: str) -> str:
        """Store the diff a result is reviewed by, keyed by its SHA-256 (returned). Redis is only
        a cache here: :meth:`get_review` hands back text only when it still hashes to the digest
        the sealed history names."""
        digest = hashlib.sha256(diff.encode()).hexdigest()
        self.r.set(self._review_key(task_id, digest), diff)
        return digest

    def get_review(self, task_id: str, digest: str) -> str | None:
        """The stored diff whose SHA-256 is ``digest``, or None (missing, or altered in Redis)."""
        if not re.fullmatch(r"[0-9a-f]{64}", digest or ""):
            return None
        raw = self.r.get(self._review_key(task_id, digest))
        if raw is None or not hmac.compare_digest(hashlib.sha256(raw.encode()).hexdigest(), digest):
            return None
        return str(raw)

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

    def ideas_due_to_expire(self, now: float) -> list[str]:
        return list(self.r.zrangebyscore(self.keys.ideas_expiry, "-inf", now))

    def ideas_due_to_escalate(self, created_before: float) -> list[str]:
        return list(self.r.zrangebyscore(self.keys.ideas_unescalated, "-inf", created_before))

    def recent_ideas(self, limit: int = 100) -> list[Idea]:
        ids = self.r.zrevrange(self.keys.ideas, 0, limit - 1)
        return self._many([self.keys.idea(i) for i in ids], Idea)

    def open_tasks(self) -> list[Task]:
        ids = self.r.zrange(self.keys.tasks_open, 0, -1)
        return self._many([self.keys.task(i) for i in ids], Task)

    def recent_tasks(self, limit: int = 100) -> list[Task]:
        ids = self.r.zrevrange(self.keys.tasks, 0, limit - 1)
        return self._many([self.keys.task(i) for i in ids], Task)

    def ids_with_prefix(self, prefix: str, limit: int = 10) -> tuple[list[str], int]:
        """Ids of the prefix's own kind (``I-…`` searches ideas only, ``T-…`` tasks only) that
        start with ``prefix`` (parsed by :func:`intake.core.ids.parse_id_prefix`, so it holds no glob
        characters): up to ``limit`` of them, and how many there are."""
        prefix = parse_id_prefix(prefix)
        index = self.keys.ideas if prefix.startswith("I-") else self.keys.tasks
        found = [str(i) for i, _ in self.r.zscan_iter(index, match=f"{prefix}*", count=1000)]
        return sorted(found)[:limit], len(found)

    def backfill_indexes(self, batch: int = indexes.BACKFILL_BATCH) -> int | None:
        """Index a bounded batch of records written before the console's indexes existed
        (:func:`intake.storage.indexes.backfill`); None once all are."""
        return indexes.backfill(self.r, self.keys, self.audit, batch)

    # -- writing ---------------------------------------------------------------------------
    def write_idea(self, pipe: Pipe, idea: Idea, task: Task | None = None) -> None:
        """Store an idea and keep its indexes (pending, expiry, escalation, the console's) in
        step; ``task``: the task it was just promoted into (its repo, tier and promoter)."""
        pipe.set(self.keys.idea(idea.id), idea.model_dump_json())
        indexes.queue_idea(pipe, self.keys, idea, task)
        if idea.state not in IDEA_PENDING:
            for index in (self.keys.ideas_pending, self.keys.ideas_expiry, self.keys.ideas_unescalated):
                pipe.zrem(index, idea.id)
            return
        pipe.zadd(self.keys.ideas_pending, {idea.id: idea.created_at})
        if idea.expires_at is not None:
            pipe.zadd(self.keys.ideas_expiry, {idea.id: idea.expires_at})
        if idea.escalated_at is None:
            pipe.zadd(self.keys.ideas_unescalated, {idea.id: idea.created_at})
        else:
            pipe.zrem(self.keys.ideas_unescalated, idea.id)

    def write_task(self, pipe: Pipe, task: Task, before: Task | None = None) -> None:
        """Store a task and keep its indexes in step; ``before``: the record as read, so the
        console's indexes drop facets it no longer has."""
        pipe.set(self.keys.task(task.id), task.model_dump_json())
        indexes.queue_task(pipe, self.keys, task, before)
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
        result = self.capture_many([draft], ttl_s=ttl_s)[0]
        if isinstance(result, IntakeError):
            raise result
        return result

    def prepare_capture(self, draft: IdeaDraft, ttl_s: int | None) -> tuple[Idea, list[str], list[Any]]:
        """Validate a draft and build its idea, script keys and arguments (no I/O)."""
        # The one normalisation of untrusted text, here so every channel gets it (NFC; text
        # with nothing visible is refused). The channel has already decoded its own encoding.
        text, title = normalise(draft.text), normalise_title(draft.title)
        size = len(text.encode())
        if size > self.max_text_bytes:
            raise InvalidInput(
                f"idea text is {size} bytes; the limit is {self.max_text_bytes} (INTAKE_MAX_TEXT_BYTES)"
            )
        now = self.clock()
        text_hash = sha256_hex(text.encode())
        # model_construct: every field is either from the already-validated draft or computed
        # here, so validating again would only cost time on the hottest path.
        idea = Idea.model_construct(
            id=new_id("I"),
            channel=draft.channel,
            requester=draft.requester,
            filed_by=draft.filed_by or draft.requester,
            delivery_id=draft.delivery_id,
            title=title or default_title(text),
            text=text,
            provenance=draft.provenance,
            raw_sha256=draft.raw_sha256 or text_hash,
            state=IdeaState.CAPTURED,
            created_at=now,
            updated_at=now,
            expires_at=now + ttl_s if ttl_s else None,
            task_id=None,
            reason=None,
            card=None,
            escalated_at=None,
        )
        idea.mac = self.audit.record_mac("idea", idea_fields(idea))
        body, mac = self.audit.seal_fields(event(
            draft.requester, "idea.captured", idea.id, at=now,
            channel=draft.channel.value, text_sha256=text_hash, bytes=size,
            **({"filed_by": draft.filed_by} if draft.filed_by and draft.filed_by != draft.requester else {}),
        ))
        facets = sorted(indexes.idea_facets(self.keys, idea))
        keys = [self.keys.delivery(draft.channel.value, draft.delivery_id), self.keys.idea(idea.id),
                self.keys.ideas, self.keys.ideas_pending, self.audit.stream, self.keys.ideas_expiry,
                self.keys.ideas_unescalated, *facets]
        expires = "" if idea.expires_at is None else idea.expires_at
        return idea, keys, [idea.id, idea.model_dump_json(), now, body, mac, expires,
                            index_member(idea.created_at, idea.id), len(facets)]

    def capture_many(
        self, drafts: list[IdeaDraft], *, ttl_s: int | None = None
    ) -> list[tuple[Idea, bool] | IntakeError]:
        """Capture several ideas in one round trip (group commit); one result per draft, in
        order: ``(idea, created)`` or the refusal for that draft. A draft refused here (empty,
        oversize) never reaches Redis, so it never affects another; the rest are stored by one
        :data:`CAPTURE_SCRIPT` call."""
        results: list[tuple[Idea, bool] | IntakeError] = []
        prepared: list[int] = []
        keys: list[str] = []
        args: list[Any] = []
        for i, draft in enumerate(drafts):
            try:
                idea, its_keys, its_args = self.prepare_capture(draft, ttl_s)
            except IntakeError as exc:
                results.append(exc)
                continue
            results.append((idea, True))
            prepared.append(i)
            keys += its_keys
            args += its_args
        if not prepared:
            return results
        for i, existing in zip(prepared, self._capture(keys=keys, args=args), strict=True):
            if existing is not None:  # a delivery seen before: hand back the first idea
                try:
                    results[i] = (self.get_idea(existing), False)
                except IntakeError as exc:
                    results[i] = exc
        self.audit.kick()
        return results

    def announce(self, idea_id: str, card: dict[str, str]) -> Idea:
        """Record where the idea's card was posted; a captured idea now awaits approval. The
        first card recorded stays: the idea is returned unchanged when it already has one (the
        caller compares, and deals with a second card)."""

        def build(pipe: Pipe) -> Idea:
            idea = self.read_idea(pipe, idea_id)
            if idea.card is not None:
                return idea
            update: dict[str, Any] = {"card": card, "updated_at": self.clock()}
            if idea.state is IdeaState.CAPTURED:
                update["state"] = IdeaState.AWAITING_APPROVAL
            announced = idea.model_copy(update=update)
            pipe.multi()
            self.write_idea(pipe, announced)
            self.emit(pipe, "system", "idea.announced", idea_id, state=announced.state.value, **card)
            return announced

        return self.transact([self.keys.idea(idea_id)], build)

    def mark_escalated(self, idea_id: str, *, due: Callable[[Idea], bool]) -> bool:
        """Flag a pending idea as escalated, once; ``due`` re-checks it under WATCH."""

        def build(pipe: Pipe) -> bool:
            idea = self.read_idea(pipe, idea_id)
            if idea.escalated_at is not None or idea.state not in IDEA_PENDING or not due(idea):
                return False
            pipe.multi()
            self.write_idea(pipe, idea.model_copy(update={"escalated_at": self.clock()}))
            self.emit(pipe, "system", "idea.escalated", idea_id)
            return True

        return self.transact([self.keys.idea(idea_id)], build)

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
        same MULTI (e.g. the worker report that caused the move, as evidence).
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
            self.write_task(pipe, moved, task)
            if also is not None:
                also(pipe, moved)
            extra = {"reason": reason} if reason else {}
            self.emit(pipe, actor, f"task.{to.value}", task_id, **extra, **data)
            return moved

        return self.transact([self.keys.task(task_id)], build)
