"""Credential hygiene, from sealed events only: every credential intake issues or holds, its age
and last rotation against the policy's ``[credentials]`` maximum, and how long rotations and
revocations took to take effect.

What each kind is and where its dates come from (all broker events sealed ``ok``):

- ``signing_key``: one row per key id in the keyring. ``keys.rotated`` (``new_kid``, ``old_kid``)
  starts a rotation, ``keys.retired`` (``kid``) of the old key ends it: the rotation took as long
  as tokens of the old key still verified. A key in use before the first rotation on the log
  (and the broker's own key when the log holds no rotation) dates from the log's first entry.
- ``audit_key``, ``secrets_key``: intake has no rotation for them; they are as old as the log's
  first entry (a new audit key would break the chain; a new secrets key every enrolment).
- ``worker_key``: ``worker.key_issued`` (``generation``). A new generation while an older one
  was live is a rotation: the broker refuses the old key from that event on, and the rotation is
  done when the worker is back at work on the new one (the first broker event naming it as the
  ``worker``). ``worker.key_revoked`` is a revocation: it takes effect when no run the worker held
  at the revoke is live any more (the run settled, was stopped, or was abandoned when its lease
  lapsed), at once when it held none.
- ``api_token``: ``api_token.created`` / ``api_token.revoked`` (the record goes in the revoking
  transaction, so a revocation takes effect at once). A person's token revoked after they got a
  newer one is a rotation, from the newer one's creation to the revoke.
- ``factor``: an approver's TOTP enrolment (``approver.added``/``reset`` start a generation,
  ``approver.confirmed`` makes it live; a reset is a rotation, done at the confirmation;
  ``approver.removed`` is a revocation, at once: approvals of that generation stop counting in
  the same event) and their passkeys (``passkey.registered``).
- ``external``: credentials intake does not issue (``slack-bot``, ``forge-token``, …), with the
  date an operator last declared a rotation (``credentials.rotated``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, Field

from intake.operations.indicators.spread import Spread, spread


class Fact(Protocol):
    """One sealed, genuine broker event (:class:`intake.operations.indicators.figures.Fact`)."""

    @property
    def at(self) -> float: ...

    @property
    def action(self) -> str: ...

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> dict[str, Any]: ...

#: Broker events this module reads (the timeline keeps them).
CREDENTIAL_EVENTS = frozenset({
    "keys.rotated", "keys.retired", "worker.key_issued", "worker.key_revoked", "api_token.created",
    "api_token.revoked", "approver.added", "approver.confirmed", "approver.reset", "approver.removed",
    "passkey.registered", "credentials.rotated", "job.refused", "run.stopped",
})


class Credential(BaseModel):
    """One live credential: ``since`` it was issued (None: not on the log), its age at the
    report's end, the last rotation of it, and whether it is past the policy's maximum."""

    kind: str
    name: str
    detail: str = ""
    since: float | None = None
    age: float | None = None
    last_rotation: float | None = None
    max_age: int
    overdue: bool = False


class Rotation(BaseModel):
    """A new generation issued (``started``) and the old one out of service (``finished``)."""

    kind: str
    name: str
    old: str
    new: str
    started: float
    finished: float | None = None
    seconds: float | None = None


class Revocation(BaseModel):
    """A credential revoked (``at``) and the moment it took effect (``effective``): ``how`` says
    what ended it (``at_once``, ``no_live_lease``), ``pending`` while a run it held is live."""

    kind: str
    name: str
    at: float
    effective: float | None = None
    seconds: float | None = None
    how: str = "pending"


class CredentialFigures(BaseModel):
    credentials: list[Credential] = Field(default_factory=list)
    overdue: int = 0
    rotations: list[Rotation] = Field(default_factory=list)
    revocations: list[Revocation] = Field(default_factory=list)
    time_to_rotate: Spread = Field(default_factory=Spread)
    time_to_revoke: Spread = Field(default_factory=Spread)


@dataclass
class _Live:
    since: float | None
    detail: str = ""
    last_rotation: float | None = None


@dataclass
class _Fold:
    """Credential state while the facts are walked in order."""

    start: float | None
    live: dict[tuple[str, str], _Live] = field(default_factory=dict)
    rotations: list[Rotation] = field(default_factory=list)
    revocations: list[Revocation] = field(default_factory=list)
    worker_rotations: dict[str, Rotation] = field(default_factory=dict)  # waiting for the worker's return
    factor_rotations: dict[str, Rotation] = field(default_factory=dict)  # waiting for the confirmation
    pending_factor: dict[str, tuple[int, float]] = field(default_factory=dict)  # approver -> (generation, at)
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # token id -> (person, created)
    held: dict[str, str] = field(default_factory=dict)  # task -> worker whose run is live
    revoking: list[tuple[Revocation, set[str]]] = field(default_factory=list)  # waiting for runs to end

    def finish(self, rot: Rotation, at: float) -> None:
        rot.finished, rot.seconds = at, max(at - rot.started, 0.0)

    def effective(self, rev: Revocation, at: float, how: str) -> None:
        rev.effective, rev.seconds, rev.how = at, max(at - rev.at, 0.0), how


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _apply(s: _Fold, f: Fact) -> None:  # noqa: C901 - one event kind per branch
    a, d, subject = f.action, f.data, f.subject
    worker = _str(d.get("worker"))
    if worker and worker in s.worker_rotations:
        # The worker's first report the broker accepted since the new key: it is at work on it.
        s.finish(s.worker_rotations.pop(worker), f.at)
    if a.startswith("task.") or a == "run.stopped":
        if a in ("task.running", "task.delivery_started") and worker:
            s.held[subject] = worker
        elif subject in s.held:
            del s.held[subject]
            for rev, tasks in list(s.revoking):
                tasks.discard(subject)
                if not tasks:
                    s.effective(rev, f.at, "no_live_lease")
                    s.revoking.remove((rev, tasks))
        return
    if a == "keys.rotated":
        new, old = _str(d.get("new_kid")), _str(d.get("old_kid"))
        if old and ("signing_key", old) not in s.live:
            s.live[("signing_key", old)] = _Live(s.start, "signing key")
        for (kind, _), live in s.live.items():
            if kind == "signing_key":
                live.last_rotation = f.at
        s.live[("signing_key", new)] = _Live(f.at, "signing key (current)", f.at)
        if old in s.live and old != new:
            s.live[("signing_key", old)].detail = "signing key (verifies only)"
        s.rotations.append(Rotation(kind="signing_key", name="broker", old=old, new=new, started=f.at))
    elif a == "keys.retired":
        kid = _str(d.get("kid"))
        s.live.pop(("signing_key", kid), None)
        for rot in s.rotations:
            if rot.kind == "signing_key" and rot.old == kid and rot.finished is None:
                s.finish(rot, f.at)
    elif a == "worker.key_issued":
        gen = d.get("generation")
        old = s.live.get(("worker_key", subject))
        s.live[("worker_key", subject)] = _Live(f.at, f"generation {gen}", f.at if old else None)
        if old is not None:
            rot = Rotation(kind="worker_key", name=subject, old=old.detail, new=f"generation {gen}", started=f.at)
            s.rotations.append(rot)
            s.worker_rotations[subject] = rot
    elif a == "worker.key_revoked":
        s.live.pop(("worker_key", subject), None)
        s.worker_rotations.pop(subject, None)
        rev = Revocation(kind="worker_key", name=subject, at=f.at)
        s.revocations.append(rev)
        runs = {t for t, w in s.held.items() if w == subject}
        if runs:
            s.revoking.append((rev, runs))
        else:
            s.effective(rev, f.at, "at_once")
    elif a == "api_token.created":
        token = _str(d.get("token"))
        s.tokens[token] = (subject, f.at)
        s.live[("api_token", token)] = _Live(f.at, f"person {subject}")
    elif a == "api_token.revoked":
        token = _str(d.get("token"))
        person, created = s.tokens.pop(token, (subject, None))
        s.live.pop(("api_token", token), None)
        rev = Revocation(kind="api_token", name=token, at=f.at)
        s.effective(rev, f.at, "at_once")
        s.revocations.append(rev)
        newer = [(at, t) for t, (p, at) in s.tokens.items() if p == person and created is not None and at > created]
        if newer:
            at, new = min(newer)
            rot = Rotation(kind="api_token", name=person, old=token, new=new, started=at)
            s.finish(rot, f.at)
            s.rotations.append(rot)
            s.live[("api_token", new)].last_rotation = f.at
    elif a in ("approver.added", "approver.reset"):
        gen = int(d.get("generation") or 0) if isinstance(d.get("generation"), int) else 0
        old = s.live.pop(("factor", subject), None)
        s.pending_factor[subject] = (gen, f.at)
        if a == "approver.reset":
            rot = Rotation(kind="factor", name=subject, old=old.detail if old else "totp", new=f"totp generation {gen}",
                           started=f.at)
            s.rotations.append(rot)
            s.factor_rotations[subject] = rot
    elif a == "approver.confirmed":
        gen, issued = s.pending_factor.pop(subject, (0, f.at))
        rot = s.factor_rotations.pop(subject, None)
        if rot is not None:
            s.finish(rot, f.at)
        s.live[("factor", subject)] = _Live(f.at, f"totp generation {gen}" if gen else "totp",
                                            f.at if rot is not None else None)
    elif a == "approver.removed":
        s.pending_factor.pop(subject, None)
        s.factor_rotations.pop(subject, None)
        for key in [k for k in s.live if k[0] == "factor" and (k[1] == subject or k[1].startswith(subject + " "))]:
            del s.live[key]
        rev = Revocation(kind="factor", name=subject, at=f.at)
        s.effective(rev, f.at, "at_once")
        s.revocations.append(rev)
    elif a == "passkey.registered":
        s.live[("factor", f"{subject} passkey {_str(d.get('credential'))[:16]}")] = _Live(f.at, "passkey")
    elif a == "credentials.rotated":
        s.live[("external", subject)] = _Live(f.at, "rotation declared", f.at)


def credential_figures(facts: list[Fact], *, first_at: float | None, since: float, now: float,
                       max_ages: dict[str, int], signing_kid: str | None = None) -> CredentialFigures:
    """The credentials live at ``now`` with their ages, and the rotations and revocations that
    took effect in ``[since, now]`` (or are still under way), from ``facts`` in log order."""
    s = _Fold(start=first_at)
    for f in facts:
        if f.at > now:
            continue  # stamped after the report's end (another broker's clock ahead of ours)
        if f.action in CREDENTIAL_EVENTS or f.action.startswith("task."):
            _apply(s, f)
    if first_at is not None:
        if not any(kind == "signing_key" for kind, _ in s.live):
            s.live[("signing_key", signing_kid or "unknown")] = _Live(first_at, "signing key (current)")
        s.live[("audit_key", "audit")] = _Live(first_at, "never rotated")
        s.live[("secrets_key", "secrets")] = _Live(first_at, "never rotated")
    out = CredentialFigures()
    for (kind, name), live in sorted(s.live.items()):
        age = None if live.since is None else max(now - live.since, 0.0)
        limit = max_ages.get(kind, max_ages.get("default", 90 * 86400))
        out.credentials.append(Credential(kind=kind, name=name, detail=live.detail, since=live.since, age=age,
                                          last_rotation=live.last_rotation, max_age=limit,
                                          overdue=age is not None and age > limit))
    out.overdue = sum(c.overdue for c in out.credentials)

    def shown(end: float | None) -> bool:
        return end is None or since <= end <= now

    out.rotations = [r for r in s.rotations if shown(r.finished)]
    out.revocations = [r for r in s.revocations if shown(r.effective)]
    out.time_to_rotate = spread([r.seconds for r in out.rotations if r.seconds is not None])
    out.time_to_revoke = spread([r.seconds for r in out.revocations if r.seconds is not None])
    return out
