"""The leading-indicator figures, computed from the sealed audit log alone.

Redis can be written by anyone who reaches it (DESIGN.md, *Authority*), so nothing here reads a
task record, a counter or a cache. A :class:`Timeline` follows the sealed chain with
:meth:`AuditLog.follow` (every seal checked against the previous one, every verdict against its
entry) and keeps only entries sealed ``ok``:

- broker events (``idea.*``, ``task.*``, ``run.stopped``, ``mfa.refused``, ``provenance.issued``),
  each applied once by its unique ``eid`` (a verbatim copy of a genuine event is a replay, and
  counts for nothing);
- a worker's ``report.result``, copied onto the log as evidence, only once the broker's own
  sealed ``task.<state>`` event for that very run follows it: that is what the broker accepted,
  and where a result's gate reasons and dependency delta come from.

:func:`compute_figures` folds what the timeline holds over a window into one :class:`Figures`;
the CLI (``intake report``, through the API), the HTML report and the console dashboard all show
that one object. Label values that come from results (licenses) are bounded in length and number;
every renderer escapes them for its surface.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import BaseModel, Field

from intake.audit.ledger import Ledger
from intake.audit.log import OK, REPLAY, Anomaly, AuditLog, Head, SealedEntry
from intake.core.errors import IntakeError, InvalidInput
from intake.core.models import AuditEvent, sha256_hex
from intake.core.policy import Policy
from intake.operations.indicators.credentials import CREDENTIAL_EVENTS, CredentialFigures, credential_figures
from intake.operations.indicators.spread import Spread, spread
from intake.operations.metrics import gate_kind
from intake.storage.store import Store, default_title, idea_fields

#: Outcomes of a task, as ``task.<outcome>`` events.
OUTCOMES = ("succeeded", "blocked", "failed", "revoked", "denied", "expired")
#: States a run's result is settled into (the evidence before them is that run's result).
_SETTLED = frozenset({"delivering", "awaiting_result_approval", "succeeded", "blocked", "failed"})
# Task events the figures follow (queued and running: whether a revoke caught a run live).
_TASK_EVENTS = frozenset({"created", "amended", "queued", "running", "delivery_started", *_SETTLED, *OUTCOMES})
_WANTED = frozenset({"idea.captured", "idea.promoted", "run.stopped", "mfa.refused", "provenance.issued",
                     *CREDENTIAL_EVENTS})
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: ``--by``: the length of one period of the trend.
PERIODS = {"day": 86400, "week": 7 * 86400}
MAX_PERIODS = 400
_RELATIVE = re.compile(r"([1-9][0-9]{0,5})([smhdw])")
_TAG = re.compile(r"[a-z][a-z0-9_]{0,39}")
_LICENSE = re.compile(r"[A-Za-z0-9.+:() -]{1,80}")
MAX_LABELS = 12  # more distinct licenses than this are summed as "other"
NOTABLE_LIMIT = 50


def parse_since(text: str, now: float) -> float:
    """``--since``: ``7d``, ``24h``, ``30m``, ``90s``, ``2w`` back from ``now``, or an ISO date or
    date-time (UTC unless it names a zone). Returns a Unix time; InvalidInput when malformed."""
    if found := _RELATIVE.fullmatch(text):
        return now - int(found.group(1)) * _UNITS[found.group(2)]
    try:
        if text != text.strip():
            raise ValueError("surrounding whitespace")
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"--since: {text[:40]!r} is neither a span (7d, 24h, 30m) nor an ISO date") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# -- the figures -------------------------------------------------------------------------------
class Segment(BaseModel):
    """Change-risk segmentation: what happened to changes of one risk tier and change type."""

    tier: str
    change_type: str
    created: int = 0
    succeeded: int = 0
    blocked: int = 0
    failed: int = 0
    revoked: int = 0
    denied: int = 0
    expired: int = 0


class RepoDependencies(BaseModel):
    """Dependency risk posture of one repo: packages agents added or bumped in delivered changes,
    how many of those carry an integrity hash (pinned), how many had no known license, and
    denylist findings on blocked changes. ``trend``: packages added or bumped per period."""

    repo: str
    added: int = 0
    bumped: int = 0
    pinned: int = 0
    unknown_licenses: int = 0
    denylist_hits: int = 0
    trend: list[int] = Field(default_factory=list)


class Period(BaseModel):
    """One period of the trend (``--by``): each indicator's value and its change from the
    period before (None for the first period, or when either value is missing)."""

    since: float
    until: float
    values: dict[str, float | None] = Field(default_factory=dict)
    change: dict[str, float | None] = Field(default_factory=dict)


class ProvenanceFigures(BaseModel):
    delivered: int = 0
    verified: int = 0  # delivered changes with a sealed provenance.issued for the delivered commit
    share: float | None = None


class DependencyFigures(BaseModel):
    """Dependency posture: deltas of delivered changes; denials from blocked ones."""

    changes: int = 0  # delivered changes whose delta is not empty
    added: int = 0
    removed: int = 0
    upgraded: int = 0
    downgraded: int = 0
    bumped: int = 0  # upgraded + downgraded
    denied: int = 0  # dependency gate reasons on blocked changes
    licenses: dict[str, int] = Field(default_factory=dict)  # of added and bumped packages
    with_sbom: int = 0
    sbom_coverage: float | None = None


class Notable(BaseModel):
    """A blocked or revoked change, for the report's table. ``title`` is the first line of the
    idea's text only when its record's MAC holds and its text hashes to the sealed capture."""

    task: str
    idea: str
    tier: str
    change_type: str
    outcome: str
    at: float
    reasons: list[str] = Field(default_factory=list)
    title: str | None = None


class AuditFigures(BaseModel):
    entries: int = 0  # sealed entries walked
    rejected: int = 0  # sealed as not genuine (forged or malformed): counted for nothing
    replayed: int = 0  # genuine copies of earlier entries: counted once
    broken: list[str] = Field(default_factory=list)  # breaks in the chain


class Figures(BaseModel):
    """Every figure of the report over ``[since, until)`` (``until`` None: up to the log's end)."""

    since: float
    until: float | None = None
    generated_at: float
    ideas: int = 0
    promoted: int = 0
    created: int = 0
    delivered: int = 0
    blocked: int = 0
    failed: int = 0
    revoked: int = 0
    denied: int = 0
    expired: int = 0
    refused_egress: int = 0  # egress requests refused by the sandbox's proxy, from accepted results
    refused_egress_by_repo: dict[str, int] = Field(default_factory=dict)  # the same, per repo
    segments: list[Segment] = Field(default_factory=list)
    provenance: ProvenanceFigures = Field(default_factory=ProvenanceFigures)
    dependencies: DependencyFigures = Field(default_factory=DependencyFigures)
    repos: list[RepoDependencies] = Field(default_factory=list)
    time_to_promote: Spread = Field(default_factory=Spread)
    time_to_deliver: Spread = Field(default_factory=Spread)
    revoke_to_stop: Spread = Field(default_factory=Spread)
    mfa_failures: dict[str, int] = Field(default_factory=dict)
    gate_blocks: dict[str, int] = Field(default_factory=dict)
    notable: list[Notable] = Field(default_factory=list)
    audit: AuditFigures = Field(default_factory=AuditFigures)
    by: str | None = None  # the trend's period (``day``, ``week``), None: no trend
    periods: list[Period] = Field(default_factory=list)
    credentials: CredentialFigures = Field(default_factory=CredentialFigures)


# -- following the sealed chain ----------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    """One sealed, genuine event the figures use; ``result`` is the run result the broker
    accepted with it (a ``task.<state>`` event right after that run's evidence)."""

    at: float
    action: str
    subject: str
    data: dict[str, Any]
    result: dict[str, Any] | None = None


@dataclass
class Timeline:
    """The sealed chain, followed incrementally, reduced to the facts the figures need."""

    audit: AuditLog
    store: Store | None = None  # for verified idea titles only; None: no titles
    facts: list[Fact] = field(default_factory=list)
    entries: int = 0
    rejected: int = 0
    replayed: int = 0
    broken: list[str] = field(default_factory=list)
    first_at: float | None = None  # the first genuine broker event: the log's (and its keys') start
    _cursor: Head | None = None
    _seen: set[str] = field(default_factory=set)
    _evidence: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def follow(self) -> Timeline:
        """Seal what is pending (sealing is deterministic: any broker process may), then take
        in every entry sealed since the last call."""
        with self._lock:
            try:
                self.audit.seal_pending()
            except IntakeError:
                pass  # a break: follow() below reports it
            self._cursor = self.audit.follow(self._cursor, self._entry, self._anomaly)
            return self

    def _anomaly(self, anomaly: Anomaly) -> None:
        if anomaly.fatal and anomaly.message not in self.broken:
            self.broken.append(anomaly.message)

    def _entry(self, sealed: SealedEntry) -> None:
        self.entries += 1
        if sealed.verdict == REPLAY:  # a genuine entry's copy, recognised by the sealer
            self.replayed += 1
            return
        if sealed.verdict != OK:
            self.rejected += 1
            return
        if sealed.event is not None:
            self._broker_event(sealed.event)
        elif sealed.fields.get("k") == "w":
            self._worker_evidence(sealed.fields.get("e", ""))

    def _once(self, unique: str) -> bool:
        if not unique or unique in self._seen:
            self.replayed += 1
            return False
        self._seen.add(unique)
        return True

    def _worker_evidence(self, body: str) -> None:
        try:
            report = json.loads(body)
        except ValueError:
            return
        if not isinstance(report, dict):
            return
        if report.get("action") != "report.result" or not self._once(f"r:{report.get('rid', '')}"):
            return
        data = report.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("result"), dict):
            return
        task, run = report.get("task"), data.get("run")
        if isinstance(task, str) and isinstance(run, str) and run:
            self._evidence[(task, run)] = data["result"]

    def _broker_event(self, ev: AuditEvent) -> None:
        if not self._once(f"e:{ev.eid}"):
            return
        if self.first_at is None:
            self.first_at = ev.at
        kind, _, what = ev.action.partition(".")
        if ev.action not in _WANTED and not (kind == "task" and what in _TASK_EVENTS):
            return
        result = None
        if kind == "task" and what in _SETTLED and isinstance(ev.data.get("run"), str):
            # The broker settled this very run: the evidence it copied in just before is accepted.
            result = self._evidence.pop((ev.subject, ev.data["run"]), None)
        self.facts.append(Fact(ev.at, ev.action, ev.subject, dict(ev.data), result))

    def snapshot(self) -> tuple[list[Fact], AuditFigures]:
        with self._lock:
            return list(self.facts), AuditFigures(entries=self.entries, rejected=self.rejected,
                                                  replayed=self.replayed, broken=list(self.broken))

    def verified_title(self, idea_id: str, text_sha256: str) -> str | None:
        """The idea's first line, if its record is intact (MAC) and is the text that was sealed."""
        if self.store is None or not idea_id:
            return None
        try:
            idea = self.store.get_idea(idea_id)
        except (IntakeError, ValueError):
            return None
        if not self.audit.record_ok("idea", idea_fields(idea), idea.mac or ""):
            return None
        if not text_sha256 or sha256_hex(idea.text.encode()) != text_sha256:
            return None
        return default_title(idea.text)


class _Signer(Protocol):
    kid: str


class FigureSources(Protocol):
    """What the broker's figures read (:class:`intake.runtime.Broker` is one)."""

    store: Store

    @property
    def ledger(self) -> Ledger: ...

    @property
    def timeline(self) -> Timeline: ...

    @property
    def policy(self) -> Policy: ...

    @property
    def signer(self) -> _Signer: ...


def parse_by(text: str | None) -> str | None:
    """``--by``: ``day`` or ``week`` (or nothing: no trend); InvalidInput otherwise."""
    if text in (None, ""):
        return None
    if text not in PERIODS:
        raise InvalidInput(f"--by: {str(text)[:20]!r} is not one of {', '.join(PERIODS)}")
    return text


def broker_figures(broker: FigureSources, since: str, by: str | None = None) -> Figures:
    """The figures since ``since`` (as :func:`parse_since` reads it) on the broker's own
    timeline, with the trend ``by`` period and credential hygiene under the policy's maximum
    ages; a break the broker's ledger found (it re-walks the whole chain now and then, so
    history rewritten behind the timeline's cursor shows too) is reported as broken."""
    now = broker.store.clock()
    start, period = parse_since(since, now), parse_by(by)
    fig = report_figures(broker.timeline.follow(), start, now=now, by=period,
                         max_ages=broker.policy.credentials.max_ages(), signing_kid=broker.signer.kid)
    halted = broker.ledger.follow().halted
    if halted is not None and halted not in fig.audit.broken:
        fig.audit.broken.append(halted)
    return fig


def report_figures(timeline: Timeline, since: float, *, now: float, by: str | None = None,
                   max_ages: dict[str, int] | None = None, signing_kid: str | None = None) -> Figures:
    """The whole report: the figures over ``[since, now]``, each indicator per period (``by``,
    periods of :data:`PERIODS` from ``since``, the last one ending at ``now``) with its change
    from the period before, each repo's dependency trend, and credential hygiene at ``now``."""
    fig = compute_figures(timeline, since, now=now)
    facts, _ = timeline.snapshot()
    fig.credentials = credential_figures(facts, first_at=timeline.first_at, since=since, now=now,
                                         max_ages=max_ages or {}, signing_kid=signing_kid)
    if by is None:
        return fig
    step = PERIODS[by]
    count = max(1, -(-int(now - since) // step))
    if count > MAX_PERIODS:
        raise InvalidInput(f"--by: {count} {by}s from --since; at most {MAX_PERIODS} periods")
    fig.by = by
    trends: dict[str, list[int]] = {r.repo: [] for r in fig.repos}
    for i in range(count):
        start, last = since + i * step, i == count - 1
        end = now if last else start + step
        part = compute_figures(timeline, start, now=now, until=None if last else end)
        for repo, trend in trends.items():
            own = next((r for r in part.repos if r.repo == repo), None)
            trend.append(own.added + own.bumped if own else 0)
        fig.periods.append(Period(since=start, until=end, values=period_values(part)))
    reasons = sorted({k for p in fig.periods for k in p.values if k.startswith("blocks:")})
    before: dict[str, float | None] = {}
    for i, period in enumerate(fig.periods):
        for k in reasons:  # every period names every block reason (0 where none)
            period.values.setdefault(k, 0)
        period.change = {k: None if i == 0 or v is None or before.get(k) is None else v - before[k]  # type: ignore[operator]
                         for k, v in period.values.items()}
        before = period.values
    for r in fig.repos:
        r.trend = trends[r.repo]
    return fig


#: The trend's indicators, in order: key, label, unit (``%`` a fraction, ``s`` seconds). Block
#: reasons follow as ``blocks:<reason>``.
INDICATORS = (
    ("ideas", "ideas", ""), ("promoted", "promotions", ""), ("delivered", "deliveries", ""),
    ("blocked", "blocked", ""), ("refused_egress", "refused egress", ""),
    ("provenance_share", "verified provenance", "%"),
    ("promote_p50", "time to promote p50", "s"), ("promote_p90", "time to promote p90", "s"),
    ("deliver_p50", "time to deliver p50", "s"), ("deliver_p90", "time to deliver p90", "s"),
    ("revoke_to_stop", "mean revoke to stop", "s"),
    ("deps_changed", "packages added or bumped", ""), ("deps_pinned", "of them pinned with a hash", ""),
    ("deps_unknown_license", "of them with no known license", ""), ("denylist_hits", "denylist hits", ""),
)


def period_values(fig: Figures) -> dict[str, float | None]:
    """One period's indicator values (see :data:`INDICATORS`), block reasons as ``blocks:<reason>``."""
    repos = fig.repos
    values: dict[str, float | None] = {
        "ideas": fig.ideas, "promoted": fig.promoted, "delivered": fig.delivered, "blocked": fig.blocked,
        "refused_egress": fig.refused_egress, "provenance_share": fig.provenance.share,
        "promote_p50": fig.time_to_promote.p50, "promote_p90": fig.time_to_promote.p90,
        "deliver_p50": fig.time_to_deliver.p50, "deliver_p90": fig.time_to_deliver.p90,
        "revoke_to_stop": fig.revoke_to_stop.mean,
        "deps_changed": sum(r.added + r.bumped for r in repos), "deps_pinned": sum(r.pinned for r in repos),
        "deps_unknown_license": sum(r.unknown_licenses for r in repos),
        "denylist_hits": sum(r.denylist_hits for r in repos),
    }
    values.update({f"blocks:{k}": v for k, v in fig.gate_blocks.items()})
    return values


# -- folding the facts over a window -----------------------------------------------------------
@dataclass
class _Task:
    tier: str = "unknown"
    change_type: str = "unknown"
    repo: str = "unknown"
    idea: str = ""
    created_at: float | None = None
    running: bool = False
    revoked_at: float | None = None
    result: dict[str, Any] = field(default_factory=dict)


def _tag(value: object) -> str:
    """A reason tag as a label, or ``other`` when it is not one of ours."""
    return value if isinstance(value, str) and _TAG.fullmatch(value) else "other"


def _license(value: object) -> str:
    if value is None or value == "":
        return "unknown"
    return value if isinstance(value, str) and _LICENSE.fullmatch(value) else "other"


def _gate_reasons(result: dict[str, Any]) -> list[str]:
    gates = result.get("gates")
    return [str(g) for g in gates] if isinstance(gates, list) else []


def _block_labels(result: dict[str, Any]) -> list[str]:
    """What blocked a change: each gate finding, or its failed required checks."""
    labels = [gate_kind(g) for g in _gate_reasons(result)]
    if labels:
        return labels
    checks = result.get("checks")
    if isinstance(checks, list) and any(isinstance(c, dict) and c.get("ok") is False for c in checks):
        return ["required_check"]
    return ["other"]


def _capped(counts: Counter[str]) -> dict[str, int]:
    """The ``MAX_LABELS`` biggest, the rest summed as ``other``."""
    top = counts.most_common(MAX_LABELS)
    rest = sum(counts.values()) - sum(n for _, n in top)
    out = dict(top)
    if rest:
        out["other"] = out.get("other", 0) + rest
    return dict(sorted(out.items()))


def _delta(result: dict[str, Any]) -> list[dict[str, Any]]:
    deps = result.get("dependencies")
    delta = deps.get("delta") if isinstance(deps, dict) else None
    return [d for d in delta if isinstance(d, dict)] if isinstance(delta, list) else []


def _has_sbom(result: dict[str, Any]) -> bool:
    deps = result.get("dependencies")
    return isinstance(deps, dict) and bool(deps.get("sbom_sha256") or deps.get("sbom"))


def compute_figures(timeline: Timeline, since: float, *, now: float, until: float | None = None) -> Figures:
    """The figures over ``[since, until)`` from what ``timeline`` has followed (call its
    :meth:`~Timeline.follow` first). Durations whose start lies before the window count when
    their end lies inside it."""
    facts, audit = timeline.snapshot()
    fig = Figures(since=since, until=until, generated_at=now, audit=audit)

    def inside(at: float) -> bool:
        return at >= since and (until is None or at < until)

    tasks: defaultdict[str, _Task] = defaultdict(_Task)
    captured: dict[str, tuple[float, str]] = {}
    segments: dict[tuple[str, str], Segment] = {}
    issued = {(str(f.data.get("task") or f.subject), str(f.data.get("commit", "")))
              for f in facts if f.action == "provenance.issued"}
    to_promote: list[float] = []
    to_deliver: list[float] = []
    to_stop: list[float] = []
    mfa: Counter[str] = Counter()
    gates: Counter[str] = Counter()
    licenses: Counter[str] = Counter()
    deps = fig.dependencies

    def segment(t: _Task) -> Segment:
        key = (t.tier, t.change_type)
        if key not in segments:
            segments[key] = Segment(tier=t.tier, change_type=t.change_type)
        return segments[key]

    for f in facts:
        kind, _, what = f.action.partition(".")
        if f.action == "idea.captured":
            captured[f.subject] = (f.at, str(f.data.get("text_sha256", "")))
            fig.ideas += inside(f.at)
        elif f.action == "idea.promoted":
            if inside(f.at):
                fig.promoted += 1
                if f.subject in captured:
                    to_promote.append(max(f.at - captured[f.subject][0], 0.0))
        elif f.action == "mfa.refused":
            if inside(f.at):
                mfa[_tag(f.data.get("reason"))] += 1
        elif f.action == "run.stopped":
            t = tasks[f.subject]
            if t.revoked_at is not None:
                if inside(t.revoked_at):
                    to_stop.append(max(f.at - t.revoked_at, 0.0))
                t.revoked_at = None
        elif kind == "task":
            t = tasks[f.subject]
            if what in ("created", "amended"):
                t.tier = str(f.data.get("tier") or "unknown")
                t.change_type = str(f.data.get("change_type") or "unknown")
                t.repo = str(f.data.get("repo") or t.repo)[:200]
            if what == "created":
                t.idea, t.created_at = str(f.data.get("idea", "")), f.at
                if inside(f.at):
                    fig.created += 1
                    segment(t).created += 1
            if f.result is not None:
                t.result = {**t.result, **f.result}
            if what in OUTCOMES:
                if what == "revoked" and t.running:
                    t.revoked_at = f.at  # a running task: the time until its run stops
                if inside(f.at):
                    _outcome(fig, segment(t), what)
                    _settle(fig, f, t, what, issued, to_deliver, gates, licenses, timeline, captured)
            t.running = what == "running"
    fig.segments = [segments[k] for k in sorted(segments)]
    fig.time_to_promote, fig.time_to_deliver = spread(to_promote), spread(to_deliver)
    fig.revoke_to_stop = spread(to_stop)
    fig.mfa_failures, fig.gate_blocks = dict(sorted(mfa.items())), dict(sorted(gates.items()))
    fig.refused_egress_by_repo = _capped(Counter(fig.refused_egress_by_repo))
    deps.licenses = _capped(licenses)
    deps.bumped = deps.upgraded + deps.downgraded
    deps.sbom_coverage = deps.with_sbom / deps.changes if deps.changes else None
    prov = fig.provenance
    prov.share = prov.verified / prov.delivered if prov.delivered else None
    fig.repos = sorted(fig.repos, key=lambda r: r.repo)
    fig.notable = fig.notable[-NOTABLE_LIMIT:]
    return fig


_COUNTER = {"succeeded": "delivered", "blocked": "blocked", "failed": "failed", "revoked": "revoked",
            "denied": "denied", "expired": "expired"}


def _outcome(fig: Figures, seg: Segment, what: str) -> None:
    setattr(fig, _COUNTER[what], getattr(fig, _COUNTER[what]) + 1)
    setattr(seg, what, getattr(seg, what) + 1)


def _settle(fig: Figures, f: Fact, t: _Task, what: str, issued: set[tuple[str, str]], to_deliver: list[float],
            gates: Counter[str], licenses: Counter[str], timeline: Timeline,
            captured: dict[str, tuple[float, str]]) -> None:
    """Fold one outcome inside the window: delivery, provenance, dependencies, gates, notables."""
    deps = fig.dependencies
    refused = _refused_egress(t.result) if what in ("succeeded", "blocked", "failed") else 0
    fig.refused_egress += refused
    if refused:
        fig.refused_egress_by_repo[t.repo] = fig.refused_egress_by_repo.get(t.repo, 0) + refused
    repo = _repo(fig, t.repo) if what in ("succeeded", "blocked") else None
    if what == "succeeded":
        fig.provenance.delivered += 1
        fig.provenance.verified += (f.subject, str(f.data.get("commit", ""))) in issued
        if t.created_at is not None:
            to_deliver.append(max(f.at - t.created_at, 0.0))
        delta = _delta(t.result)
        if delta:
            deps.changes += 1
            deps.with_sbom += _has_sbom(t.result)
        for d in delta:
            change = d.get("change")
            if change in ("added", "removed", "upgraded", "downgraded"):
                setattr(deps, str(change), getattr(deps, str(change)) + 1)
                if change != "removed":
                    licenses[_license(d.get("license"))] += 1
                    _posture(repo, d)
        return
    if what not in ("blocked", "revoked"):
        return
    reasons: list[str] = []
    if what == "blocked":
        for label in _block_labels(t.result):
            gates[label] += 1
        deps.denied += sum(1 for g in _gate_reasons(t.result) if g.startswith("dependency:"))
        if repo is not None:
            repo.denylist_hits += sum(1 for g in _gate_reasons(t.result) if g.startswith("dependency:")
                                      and "denylist" in g)
        reasons = _gate_reasons(t.result)[:10]
    if isinstance(f.data.get("reason"), str) and f.data["reason"] and not reasons:
        reasons = [f.data["reason"]]
    idea_sha = captured.get(t.idea, (0.0, ""))[1]
    fig.notable.append(Notable(task=f.subject, idea=t.idea, tier=t.tier, change_type=t.change_type, outcome=what,
                               at=f.at, reasons=[r[:300] for r in reasons],
                               title=timeline.verified_title(t.idea, idea_sha)))


def _repo(fig: Figures, name: str) -> RepoDependencies:
    found = next((r for r in fig.repos if r.repo == name), None)
    if found is None:
        found = RepoDependencies(repo=name)
        fig.repos.append(found)
    return found


def _posture(repo: RepoDependencies | None, d: dict[str, Any]) -> None:
    """One added or bumped package of a delivered change, in its repo's posture."""
    if repo is None:
        return
    if d.get("change") == "added":
        repo.added += 1
    else:
        repo.bumped += 1
    repo.pinned += bool(isinstance(d.get("integrity"), str) and d["integrity"])
    repo.unknown_licenses += _license(d.get("license")) == "unknown"


def _refused_egress(result: dict[str, Any]) -> int:
    """Egress the sandbox's proxy refused, as a run's accepted result reports it: a list of
    requests (each ``refused`` true, or a ``verdict``/``decision`` of ``refused``/``denied``), or a
    summary with a ``refused`` count or list. Anything else counts 0."""
    egress = result.get("egress")
    if isinstance(egress, dict):
        refused = egress.get("refused")
        if isinstance(refused, bool):
            return int(refused)
        if isinstance(refused, int):
            return max(refused, 0)
        if isinstance(refused, list):
            return len(refused)
        egress = egress.get("requests")
    if not isinstance(egress, list):
        return 0
    return sum(1 for e in egress if isinstance(e, dict) and (
        e.get("refused") is True or e.get("allowed") is False
        or e.get("verdict") in ("refused", "denied") or e.get("decision") in ("refused", "denied")))
