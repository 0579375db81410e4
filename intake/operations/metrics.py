"""``/metrics``: the leading indicators, in the Prometheus text format (prometheus-client).

Several broker processes share one Redis, so nothing here counts in process memory what another
process did. Counters and histograms are **derived from the audit stream**: an
:class:`AuditMetrics` follows the stream from a cursor (each scrape reads only what was appended
since the last one), takes only entries whose MAC checks out, and folds them into totals. Every
process that follows the same stream arrives at the same numbers, and a restarted process
re-reads the stream from the start. Gauges (queue depth, outbox lag) are read from Redis at
scrape time. The collector has its own ``CollectorRegistry``; no process-global state.

Label values come from fixed sets in the code (channels, reason tags, tiers, groups), never
from request text, so a hostile idea cannot blow up the series count.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from intake.audit.log import AuditLog
from intake.core.errors import IntakeError
from intake.core.models import AuditEvent, TaskState
from intake.core.policy import Policy
from intake.storage.store import Store


class MetricSources(Protocol):
    """What ``/metrics`` reads: the broker's Redis, audit log, store and policy
    (:class:`intake.runtime.Broker` is one)."""

    client: redis.Redis
    audit: AuditLog
    store: Store

    @property
    def policy(self) -> Policy: ...


PROMOTE_BUCKETS = (60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0, 72 * 3600.0)
STOP_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0)
RUN_OUTCOMES = {"succeeded", "failed", "blocked", "revoked", "expired"}
_PAGE = 1000
LAG_CAP = 10_000  # counting undelivered entries by hand stops here
# Gate reasons start with a fixed phrase (workers/gates.py); anything else is "other".
_GATE_KINDS = (
    ("unsafe path", "unsafe_path"),
    ("blocked path", "blocked_path"),
    ("path outside allowed paths", "outside_allowed_paths"),
    ("path outside the change type's paths", "outside_change_type_paths"),
    ("invalid path pattern", "invalid_spec"),
    ("invalid branch name", "invalid_branch"),
    ("branch ", "branch_prefix"),
    ("build or dependency file changed outside", "build_file"),
    ("build file an agent may not change", "build_file"),
    ("dependency: ", "dependency"),  # every reason of the dependency gate (workers/deps/gate.py)
)
_TAG = re.compile(r"[a-z][a-z0-9_]{0,39}")


def gate_kind(reason: str) -> str:
    """The label for one gate reason line."""
    for prefix, kind in _GATE_KINDS:
        if reason.startswith(prefix):
            return kind
    return "other"


def _tag(value: object) -> str:
    """A reason tag as a label value, or ``other`` when it is not one of ours."""
    return value if isinstance(value, str) and _TAG.fullmatch(value) else "other"


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        for i, le in enumerate(self.buckets):
            if value <= le:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        counts = self.counts or [0] * len(self.buckets)
        pairs = [(str(le), float(c)) for le, c in zip(self.buckets, counts, strict=True)]
        fam = HistogramMetricFamily(name, doc)
        fam.add_metric([], buckets=[*pairs, ("+Inf", float(self.n))], sum_value=self.total)
        return fam


class AuditMetrics(Collector):
    """Folds the MAC-checked audit stream into the broker's indicators (module docstring)."""

    def __init__(self, broker: MetricSources) -> None:
        self.broker = broker
        self._lock = threading.Lock()
        self._cursor = "-"
        self.captured: Counter[str] = Counter()
        self.promotions: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.mfa_failures: Counter[str] = Counter()
        self.runs: Counter[tuple[str, str]] = Counter()
        self.gate_blocks: Counter[str] = Counter()
        self.outbox_dropped: Counter[str] = Counter()
        self.time_to_promote = Histogram(PROMOTE_BUCKETS)
        self.revoke_to_stop = Histogram(STOP_BUCKETS)
        self._captured_at: dict[str, float] = {}
        self._tier_of: dict[str, str] = {}
        self._running: set[str] = set()
        self._revoked_at: dict[str, float] = {}

    # -- following the stream --------------------------------------------------------------
    def update(self) -> None:
        """Read every entry appended since the last call and fold it in."""
        audit = self.broker.audit
        with self._lock:
            while True:
                start = "-" if self._cursor == "-" else f"({self._cursor}"
                batch = audit.r.xrange(audit.stream, start, "+", count=_PAGE)
                for stream_id, fields in batch:
                    self._cursor = stream_id
                    event = audit.parse_entry(fields)
                    if event is not None:  # a forged entry counts for nothing
                        self._fold(event)
                if len(batch) < _PAGE:
                    return

    def _tier(self, repo: object) -> str:
        found = self.broker.policy.find_repo(repo) if isinstance(repo, str) else None
        return found.tier if found else "unknown"

    def _fold(self, ev: AuditEvent) -> None:
        action, subject, data = ev.action, ev.subject, ev.data
        if action == "idea.captured":
            self.captured[_tag(data.get("channel"))] += 1
            self._captured_at[subject] = ev.at
        elif action == "idea.promoted":
            self.promotions[_tag(str(data.get("via", "cli")).replace("+", "_"))] += 1
            if (at := self._captured_at.pop(subject, None)) is not None:
                self.time_to_promote.observe(max(ev.at - at, 0.0))
        elif action in ("idea.denied", "idea.expired", "idea.withdrawn"):
            self._captured_at.pop(subject, None)
        elif action == "approval.refused":
            self.refusals[_tag(data.get("reason"))] += 1
        elif action == "mfa.refused":
            self.mfa_failures[_tag(data.get("reason"))] += 1
        elif action in ("task.created", "task.amended"):
            self._tier_of[subject] = self._tier(data.get("repo"))
        elif action == "task.running":
            self._running.add(subject)
        elif action == "task.queued":
            self._running.discard(subject)  # a retry: queued again
        elif action == "run.stopped" and subject in self._revoked_at:
            self.revoke_to_stop.observe(max(ev.at - self._revoked_at.pop(subject), 0.0))
        elif action == "outbox.dropped":
            self.outbox_dropped[_tag(data.get("group", "").replace("-", "_"))] += 1
        if action.startswith("task.") and (outcome := action[5:]) in RUN_OUTCOMES:
            self.runs[(self._tier_of.get(subject, "unknown"), outcome)] += 1
            if outcome == "revoked" and subject in self._running:
                self._revoked_at[subject] = ev.at  # a running task: time until its run stops
            if outcome == "blocked":
                self._count_gates(subject)
            self._running.discard(subject)

    def _count_gates(self, task_id: str) -> None:
        try:
            result = self.broker.store.get_task(task_id).result or {}
        except IntakeError:
            return
        gates = result.get("gates")
        for reason in gates if isinstance(gates, list) else ["other"]:
            self.gate_blocks[gate_kind(str(reason))] += 1

    # -- gauges read at scrape time --------------------------------------------------------
    def _queue_depth(self) -> Counter[str]:
        depth: Counter[str] = Counter()
        for task in self.broker.store.open_tasks():
            if task.state is TaskState.QUEUED:
                depth[task.queue or "none"] += 1
        return depth

    def _outbox(self) -> list[tuple[str, int]]:
        try:
            groups = self.broker.client.xinfo_groups(self.broker.audit.stream)
        except redis.ResponseError:  # no stream yet
            return []
        out = []
        for g in groups:
            lag = g.get("lag")
            if lag is None:  # Redis before 7, or a lag it cannot tell: count what is past the group
                last = str(g.get("last-delivered-id", "0-0"))
                lag = len(self.broker.client.xrange(self.broker.audit.stream, f"({last}", "+", count=LAG_CAP))
            out.append((str(g["name"]), int(lag) + int(g.get("pending") or 0)))
        return out

    # -- the families ----------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        self.update()
        with self._lock:
            yield _counter("intake_ideas_captured", "Ideas captured, by channel.", ["channel"], self.captured)
            yield _counter("intake_promotions", "Ideas promoted to tasks, by channel and factor.", ["via"],
                           self.promotions)
            yield _counter("intake_refusals", "Refused promotions and approvals, by reason.", ["reason"],
                           self.refusals)
            yield _counter("intake_mfa_failures", "Refused step-ups (TOTP or passkey), by reason.", ["reason"],
                           self.mfa_failures)
            yield self.time_to_promote.family("intake_time_to_promote_seconds",
                                              "From capture to promotion, in seconds.")
            yield _counter("intake_runs", "Finished tasks, by risk tier and outcome.", ["tier", "outcome"],
                           self.runs)
            yield self.revoke_to_stop.family("intake_revoke_to_stop_seconds",
                                             "From revoking a running task to its run stopping, in seconds.")
            yield _counter("intake_gate_blocks", "Gate findings that blocked a result, by kind.", ["reason"],
                           self.gate_blocks)
            yield _counter("intake_outbox_dropped", "Follow-ups given up after every retry, by consumer group.",
                           ["group"], self.outbox_dropped)
        depth = GaugeMetricFamily("intake_queue_depth", "Tasks queued and not yet started, by queue.",
                                  labels=["queue"])
        for queue, n in sorted(self._queue_depth().items()):
            depth.add_metric([queue], n)
        yield depth
        lag = GaugeMetricFamily("intake_outbox_lag_events",
                                "Audit events not yet delivered or acknowledged, by consumer group.",
                                labels=["group"])
        for group, n in self._outbox():
            lag.add_metric([group], n)
        yield lag


def _counter(name: str, doc: str, labels: list[str], values: Counter) -> CounterMetricFamily:  # type: ignore[type-arg]
    fam = CounterMetricFamily(name, doc, labels=labels)
    for key, n in sorted(values.items()):
        fam.add_metric(list(key) if isinstance(key, tuple) else [key], n)
    return fam


def metrics_registry(broker: MetricSources) -> CollectorRegistry:
    """A registry holding only the broker's :class:`AuditMetrics`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AuditMetrics(broker))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text exposition format."""
    return generate_latest(registry)
