"""The console's listing indexes of ideas and tasks (issue 23): which index keys a record belongs to.

A record is listed under one index per facet value it has (``state``, ``requester``, ``repo``, …)
plus ``all``; each index is a sorted set of :func:`intake.protocol.keyspace.index_member` members
(``<created time>|<id>``), read newest first with the last member seen as the cursor, so a page
costs the same at any history length. The store writes them in the same MULTI as the record
(:meth:`intake.storage.store.Store.write_idea`, :meth:`~intake.storage.store.Store.write_task`, the
capture script); :func:`backfill` indexes records written before the indexes existed.

They are hints, never authority: anyone who can write Redis can add or remove members. The
console re-reads every record it lists and matches each filter against the record (and, for the
facts the ledger holds, against the sealed history), so a planted member only costs a look-up.
"""

from __future__ import annotations

from typing import Any

import redis

from intake.audit.log import AuditLog
from intake.core.models import IDEA_PENDING, Idea, IdeaState, Task, TaskState
from intake.protocol.keyspace import Keys, index_member

#: Pseudo-state of ideas still waiting for promotion (captured or awaiting approval).
PENDING = "pending"
#: Records indexed per sweep by :func:`backfill` (bounded work each time).
BACKFILL_BATCH = 1000


def idea_facets(keys: Keys, idea: Idea, task: Task | None = None) -> set[str]:
    """Every index ``idea`` belongs to; ``task`` (its task, at promotion) adds who promoted it,
    the repo and the tier."""
    found = {keys.index("idea", "all"), keys.index("idea", "state", idea.state.value),
             keys.index("idea", "channel", idea.channel.value), keys.index("idea", "requester", idea.requester)}
    if idea.state in IDEA_PENDING:
        found.add(keys.index("idea", "state", PENDING))
    if task is not None:
        found |= {keys.index("idea", "repo", task.spec.repo), keys.index("idea", "tier", task.risk_tier)}
        if task.approvals:
            found.add(keys.index("idea", "approver", task.approvals[0].approver))
    return found


def other_idea_states(keys: Keys, idea: Idea) -> set[str]:
    """The state indexes ``idea`` is not in now (removed on every write: a state only moves on)."""
    states = [s.value for s in IdeaState] + [PENDING]
    return {keys.index("idea", "state", s) for s in states} - idea_facets(keys, idea)


def task_facets(keys: Keys, task: Task) -> set[str]:
    """Every index ``task`` belongs to: all, state, repo, requester, tier, each approver."""
    found = {keys.index("task", "all"), keys.index("task", "state", task.state.value),
             keys.index("task", "repo", task.spec.repo), keys.index("task", "requester", task.requester),
             keys.index("task", "tier", task.risk_tier)}
    found |= {keys.index("task", "approver", a.approver) for a in (*task.approvals, *task.result_approvals)}
    return found


def other_task_states(keys: Keys, task: Task) -> set[str]:
    return {keys.index("task", "state", s.value) for s in TaskState} - task_facets(keys, task)


def queue_idea(pipe: Any, keys: Keys, idea: Idea, task: Task | None = None) -> None:
    """Queue ``idea``'s index writes on ``pipe`` (the record's own MULTI)."""
    member = index_member(idea.created_at, idea.id)
    for key in idea_facets(keys, idea, task):
        pipe.zadd(key, {member: 0})
    for key in other_idea_states(keys, idea):
        pipe.zrem(key, member)


def queue_task(pipe: Any, keys: Keys, task: Task, before: Task | None = None) -> None:
    """Queue ``task``'s index writes on ``pipe``; ``before`` (the record as read) lets facets
    it no longer has go (an amendment's new repo, tier, approvals)."""
    member = index_member(task.created_at, task.id)
    now = task_facets(keys, task)
    for key in now:
        pipe.zadd(key, {member: 0})
    for key in other_task_states(keys, task) | ((task_facets(keys, before) - now) if before else set()):
        pipe.zrem(key, member)


def backfill(client: redis.Redis, keys: Keys, audit: AuditLog, batch: int = BACKFILL_BATCH) -> int | None:
    """Index up to ``batch`` records written before the indexes existed: ideas, then tasks
    (oldest first), then the audit entries still in Redis, resuming where the last call stopped.
    Idempotent (``ZADD`` of what the record says) and bounded; returns how many it looked at,
    or None once everything is indexed (then it costs one ``GET``). The clocks call it every
    sweep (:func:`intake.app.sweep`). A promoted idea gets its task's facets in the task pass."""
    done = client.get(keys.index_backfill)
    if done == "done":
        return None
    kind, _, where = (done or "idea:0").partition(":")
    if kind == "audit":
        after = audit.index_entries(where, batch)
        client.set(keys.index_backfill, "done" if after is None else f"audit:{after}")
        return batch
    offset = int(where) if where.isdigit() else 0
    source, record_key = (keys.ideas, keys.idea) if kind == "idea" else (keys.tasks, keys.task)
    ids = client.zrange(source, offset, offset + batch - 1)
    raws = client.mget([record_key(i) for i in ids]) if ids else []
    records: list[Any] = []
    for raw in raws:
        try:
            records.append(None if raw is None else (Idea if kind == "idea" else Task).model_validate_json(raw))
        except ValueError:
            records.append(None)  # unreadable: nothing to index (the console shows what reads)
    tasks = [r for r in records if isinstance(r, Task)]
    ideas = client.mget([keys.idea(t.spec.idea_id) for t in tasks]) if tasks else []
    pipe = client.pipeline(transaction=True)
    for record in records:
        if isinstance(record, Idea):
            queue_idea(pipe, keys, record)
        elif isinstance(record, Task):
            queue_task(pipe, keys, record)
    for task, idea_raw in zip(tasks, ideas, strict=True):
        try:
            idea = Idea.model_validate_json(idea_raw) if idea_raw is not None else None
        except ValueError:
            idea = None
        if idea is not None and idea.task_id == task.id:
            queue_idea(pipe, keys, idea, task)
    if len(ids) < batch:
        pipe.set(keys.index_backfill, "task:0" if kind == "idea" else "audit:")
    else:
        pipe.set(keys.index_backfill, f"{kind}:{offset + len(ids)}")
    pipe.execute()
    return len(ids)
