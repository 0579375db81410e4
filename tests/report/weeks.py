"""A scripted twelve weeks of history, written through the real Store and AuditLog with a
controlled clock (tests/conftest.py FakeClock): ideas captured and promoted, changes delivered
(some with dependency deltas, provenance and refused egress), blocked by gates, revoked while
running, refused step-ups; and the credentials' life: an API token left to age, a worker key
issued and rotated, the signing key rotated and the old key retired, a worker key revoked while
its run was live, an API token replaced, an external credential's rotation declared.

It records only what it did and when (``Weeks``), never an expected figure: the tests count the
sealed log themselves."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from intake.api.callers import ApiTokens
from intake.audit.log import AuditLog
from intake.core.settings import Settings
from intake.operations.keys import retire_signing, rotate_signing
from intake.people.registry import People
from intake.protocol.keyfiles import load_secret
from intake.runtime import Broker
from intake.storage.store import Store
from intake.tasks.worker_reports import issue_worker_key, revoke_worker_key
from tests.conftest import FakeClock
from tests.factories import draft
from tests.report.events import emit, settle

HOUR, DAY, WEEK = 3600, 86400, 7 * 86400
WEEKS = 12
REPOS = ("acme/web", "acme/payments")


@dataclass
class Weeks:
    """When the scenario started and what it did to credentials (ids and times)."""

    start: float
    old_token: str = ""
    worker_rotation: tuple[float, float] = (0.0, 0.0)  # new generation issued, worker back at work
    signing_rotation: tuple[str, str, float, float] = ("", "", 0.0, 0.0)  # new, old, rotated, retired
    revoked_worker: tuple[float, float] = (0.0, 0.0)  # key revoked, its live run ended
    token_rotation: tuple[str, str, float, float] = ("", "", 0.0, 0.0)  # old, new, created, old revoked
    tasks: list[str] = field(default_factory=list)


def weeks_broker(settings: Settings, rclient: redis.Redis, clock: FakeClock) -> Broker:
    """A broker handle whose store and audit log stamp events with ``clock``."""
    audit = AuditLog(rclient, load_secret(settings, "audit"), settings.key_prefix,
                     checkpoint=settings.audit_checkpoint, clock=clock)
    store = Store(rclient, audit, prefix=settings.key_prefix, max_text_bytes=settings.max_text_bytes, clock=clock)
    assert settings.redis_url is not None
    return Broker(settings, settings.redis_url.get_secret_value(), rclient, audit, store)


def delta(*entries: tuple[str, str, str | None, str | None]) -> dict[str, Any]:
    """A dependency delta: (name, change, license, integrity)."""
    return {"delta": [{"ecosystem": "pypi", "name": n, "before": None if c == "added" else "1.0", "after": "2.0",
                       "change": c, "license": lic, "integrity": integ} for n, c, lic, integ in entries]}


def run_weeks(broker: Broker, clock: FakeClock) -> Weeks:
    """Twelve weeks, starting an hour into the window ``--since 12w`` will show (so every event
    falls well inside its week however long the test takes to ask), ending days before now."""
    clock.now = float(int(time.time())) - WEEKS * WEEK + HOUR
    w = Weeks(start=clock.now)
    store = broker.store
    people = People(store)
    people.upsert("carol", name="Carol", identities=("cli:carol",), actor="test:setup")
    people.upsert("dave", name="Dave", identities=("cli:dave",), actor="test:setup")
    tokens = ApiTokens(store, people)
    w.old_token, _ = tokens.create("carol", actor="person:alice", scope="ideas")  # never rotated: ages past 30 days
    issue_worker_key(broker, "w1", actor="os:intake")
    generation = 1
    n = 0
    for week in range(WEEKS):
        clock.now = w.start + week * WEEK
        ideas = [store.capture(draft(text=f"Week {week} idea {i}"))[0] for i in range(1 + week % 3)]
        task, repo = "", REPOS[week % 2]
        if week % 4 == 3:
            emit(store, "approver:bob", "mfa.refused", "bob", reason="invalid")  # a quiet week: nothing promoted
        else:
            n += 1
            task = f"T-{n:012x}"
            promote_and_settle(store, clock, week, task, ideas[0].id, repo, generation)
            w.tasks.append(task)
        if week == 5:  # the worker's key rotated; the worker is back at work three hours later
            clock.advance(HOUR)
            issued = clock.now
            generation, _ = issue_worker_key(broker, "w1", actor="os:intake")
            clock.advance(3 * HOUR)
            n += 1
            extra = f"T-{n:012x}"
            emit(store, "approver:bob", "task.created", extra, idea=ideas[0].id, repo=repo, change_type="docs",
                 tier="standard", spec_hash="0" * 64)
            emit(store, "system", "task.running", extra, attempt=1, run=f"r{n:015d}", worker="w1")
            w.worker_rotation = (issued, clock.now)
            settle(store, extra, "failed", {"gates": []}, run=f"r{n:015d}", generation=generation)
        if week == 6:  # the signing key rotated; the old one retired two days later
            clock.advance(HOUR)
            rotated = clock.now
            new, old, _ = rotate_signing(broker, actor="os:intake")
            clock.advance(2 * DAY)
            retire_signing(broker, old, actor="os:intake")
            w.signing_rotation = (new, old, rotated, clock.now)
        if week == 7:  # a second worker's key revoked while its run is live; the run ends 90 s later
            issue_worker_key(broker, "w2", actor="os:intake")
            n += 1
            held = f"T-{n:012x}"
            emit(store, "approver:bob", "task.created", held, idea=ideas[0].id, repo=repo, change_type="docs",
                 tier="standard", spec_hash="0" * 64)
            emit(store, "system", "task.running", held, attempt=1, run=f"r{n:015d}", worker="w2")
            clock.advance(HOUR)
            revoked = clock.now
            revoke_worker_key(broker, "w2", actor="os:intake")
            clock.advance(90)
            emit(store, "system", "task.failed", held, abandoned=True, attempt=1)
            w.revoked_worker = (revoked, clock.now)
        if week == 8:
            first, _ = tokens.create("dave", actor="person:alice", scope="ideas")
            clock.advance(DAY)
            created = clock.now
            second, _ = tokens.create("dave", actor="person:alice", scope="ideas")
            clock.advance(DAY)
            tokens.revoke(first, actor="person:alice")
            w.token_rotation = (first, second, created, clock.now)
        if week == 10:
            broker.audit.record("person:alice", "credentials.rotated", "slack-bot")
    store.audit.seal_pending()
    return w


def promote_and_settle(store: Store, clock: FakeClock, week: int, task: str, idea: str, repo: str,
                       generation: int) -> None:
    """One promoted change: delivered, blocked or revoked while running, by the week."""
    run = f"r{task[2:]:0>15}"
    clock.advance(HOUR * (1 + week))  # time to promote grows week by week
    emit(store, "approver:bob", "idea.promoted", idea, task=task, via="cli")
    emit(store, "approver:bob", "task.created", task, idea=idea, repo=repo, change_type="docs",
         tier="standard", spec_hash="0" * 64)
    emit(store, "system", "task.running", task, attempt=1, run=run, worker="w1")
    clock.advance(2 * HOUR)
    outcome = ("succeeded", "blocked", "revoked")[week % 3]
    if outcome == "succeeded":
        commit = f"{week + 1:040x}"
        result = {"commit": commit, "gates": [], "egress": [
            {"host": "pypi.org", "refused": False}, *([{"host": "evil.example", "refused": True}] * (week % 2 + 1))],
            "dependencies": delta((f"pkg{week}", "added", None if week == 9 else "MIT", "sha256:ab"),
                                  (f"lib{week}", "upgraded", "BSD-3-Clause", None))}
        settle(store, task, "delivering", result, run=run, generation=generation, commit=commit)
        clock.advance(HOUR)
        emit(store, "system", "task.succeeded", task, commit=commit)
        if week % 6 == 0:
            emit(store, "system", "provenance.issued", task, task=task, commit=commit, envelope_sha256="e" * 64)
    elif outcome == "blocked":
        gates = ["blocked path: .github/workflows/x.yml"]
        if week == 4:
            gates.append("dependency: denylisted package: npm:event-stream")
        settle(store, task, "blocked", {"gates": gates, "egress": {"refused": 2}}, run=run, generation=generation)
    else:
        emit(store, "cli:bob", "task.revoked", task, reason="wrong repo")
        clock.advance(4 + week)
        emit(store, "system", "run.stopped", task, worker="w1", why="revoked")
