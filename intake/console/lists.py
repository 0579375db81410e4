"""The console's three lists (ideas, tasks, audit): which index a page reads, how each candidate
is re-read, and what decides that it matches (:mod:`intake.console.listing` does the paging).

What decides a match is never the index. For a task: the broker's verified ledger (state, tier,
requester, repo, approvers, promotion time all come from sealed history; a record that disagrees
is shown with the disagreement). For an idea: the record, whose requester, channel, text and
capture time its MAC covers (a record failing its MAC matches none of those filters); its state
is the record's (ideas are not in the ledger); who promoted it, the repo and tier come from the
ledger's fact of its task. For an audit entry: the entry itself, judged again with the audit key
(only genuine entries match a filter; the unfiltered list shows every entry with its verdict).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from intake.audit.archive import ArchiveBroken, read_segment
from intake.audit.index import entry_kind, entry_subjects, entry_time, entry_view
from intake.audit.ledger import Ledger, TaskFact
from intake.audit.log import OK
from intake.console.listing import (
    PER_PAGE,
    Filters,
    IndexSource,
    Page,
    Row,
    Source,
    StreamSource,
    has,
    pick,
    scan,
    time_bounds,
)
from intake.core.models import IDEA_PENDING, Idea, Task
from intake.protocol.keyspace import index_member
from intake.runtime import Broker
from intake.storage.indexes import PENDING
from intake.storage.store import idea_fields

IDEA_FILTERS = ("q", "state", "channel", "requester", "repo", "approver", "tier", "since", "until")
TASK_FILTERS = ("q", "state", "repo", "requester", "approver", "tier", "since", "until")
AUDIT_FILTERS = ("q", "actor", "action", "subject", "since", "until")
_WHOLE_ID = re.compile(r"[IT]-[0-9a-f]{12}")


class _One(Source[Any]):
    """A search for one whole id: that record alone, whatever its age (one GET)."""

    def __init__(self, member: str, load: Callable[[list[str]], list[Any]]) -> None:
        self.member, self.load = member, load

    def count(self) -> int:
        return 1

    def fetch(self, upper: str | None, lower: str | None, newer: bool, n: int) -> list[tuple[str, Any]]:
        if upper is not None or lower is not None:
            return []
        return [(self.member, self.load([self.member.partition("|")[2]])[0])]


def _load(broker: Broker, key: Callable[[str], str], model: type[Any]) -> Callable[[list[str]], list[Any]]:
    def load(ids: list[str]) -> list[Any]:
        if not ids:
            return []
        out: list[Any] = []
        for raw in broker.client.mget([key(i) for i in ids]):
            try:
                out.append(None if raw is None else model.model_validate_json(raw))
            except ValueError:
                out.append(None)  # unreadable in storage: nothing to show
        return out

    return load


def _source(broker: Broker, f: Filters, kind: str, facets: list[tuple[str, str]], load: Callable[[list[str]], list[Any]],
            extra: bool) -> tuple[Source[Any], str, bool]:
    """The source of a page: a whole id searched (``q``) is read directly; otherwise the smallest
    index of the filters given. ``extra``: something besides the index decides (a search)."""
    q = f.get("q") or ""
    if _WHOLE_ID.fullmatch(q) and q[0] == kind[0].upper():
        return _One(index_member(0, q), load), "id", False
    name, key, only = pick(broker.client, [(n, broker.store.keys.index(kind, n, v)) for n, v in facets],
                           ("all", broker.store.keys.index(kind, "all")))
    lo, hi = time_bounds(f)
    return IndexSource(broker.client, key, load, lo, hi), name, only and not extra


# -- ideas ------------------------------------------------------------------------------------
def ideas_page(broker: Broker, f: Filters) -> Page[Idea]:
    ledger = broker.ledger.follow(seal=False)
    facets = [(n, f.values[n]) for n in ("state", "channel", "requester", "repo", "approver", "tier") if f.get(n)]
    source, index, exact = _source(broker, f, "idea", facets, _load(broker, broker.store.keys.idea, Idea),
                                   extra=bool(f.get("q")))

    def accept(idea: Idea) -> Row[Idea] | None:
        intact = broker.audit.record_ok("idea", idea_fields(idea), idea.mac)
        fact = _promoted(ledger, idea)
        wanted = {
            "state": lambda v: idea.state in IDEA_PENDING if v == PENDING else idea.state.value == v,
            "channel": lambda v: intact and idea.channel.value == v,
            "requester": lambda v: intact and idea.requester == v,
            "repo": lambda v: fact is not None and fact.repo == v,
            "tier": lambda v: fact is not None and fact.tier == v,
            "approver": lambda v: fact is not None and fact.promoted_by == v,
            "q": lambda v: any(has(x, v) for x in (idea.id, idea.title, idea.text, idea.requester)),
        }
        if not all(check(f.values[n]) for n, check in wanted.items() if f.get(n)):
            return None
        if (f.get("since") or f.get("until")) and not (intact and f.in_time(idea.created_at)):
            return None
        return Row("", idea, "" if intact else "this record fails its MAC: it was changed in storage")

    return scan(source, f, accept, exact=exact, index=index)


def _promoted(ledger: Ledger, idea: Idea) -> TaskFact | None:
    """The ledger's fact of the task ``idea`` was promoted into, when sealed history says so."""
    fact = ledger.task(idea.task_id) if idea.task_id else None
    return fact if fact is not None and fact.idea == idea.id else None


# -- tasks ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskTruth:
    """What sealed history says of a task (None: nothing; the record alone is not believed)."""

    state: str | None
    tier: str | None
    requester: str | None
    repo: str | None
    approvers: frozenset[str]
    created_at: float | None


def task_truth(ledger: Ledger, task: Task) -> TaskTruth:
    fact = ledger.task(task.id)
    if fact is None:
        return TaskTruth(None, None, None, None, frozenset(), None)
    spec_ok = task.spec.spec_hash() == fact.spec_hash
    repo = fact.repo or (task.spec.repo if spec_ok else None)
    created = fact.created_at if fact.created_at is not None else (task.created_at if spec_ok else None)
    return TaskTruth(fact.state.value, fact.tier, fact.requester, repo,
                     frozenset(a.approver for a in (*fact.approvals, *fact.result_approvals)), created)


def tasks_page(broker: Broker, f: Filters) -> Page[Task]:
    ledger = broker.ledger.follow(seal=False)
    facets = [(n, f.values[n]) for n in ("state", "repo", "requester", "approver", "tier") if f.get(n)]
    source, index, exact = _source(broker, f, "task", facets, _load(broker, broker.store.keys.task, Task),
                                   extra=bool(f.get("q")))

    def accept(task: Task) -> Row[Task] | None:
        truth = task_truth(ledger, task)
        wanted = {
            "state": lambda v: truth.state == v,
            "repo": lambda v: truth.repo == v,
            "requester": lambda v: truth.requester == v,
            "tier": lambda v: truth.tier == v,
            "approver": lambda v: v in truth.approvers,
            "q": lambda v: any(has(x, v) for x in (task.id, task.spec.prompt, task.idea_id, task.requester)),
        }
        if not all(check(f.values[n]) for n, check in wanted.items() if f.get(n)):
            return None
        if (f.get("since") or f.get("until")) and not f.in_time(truth.created_at):
            return None
        return Row("", task, ledger.tampered(task) or "")

    return scan(source, f, accept, exact=exact, index=index)


# -- audit ------------------------------------------------------------------------------------
def _entry(broker: Broker, stream_id: str, fields: dict[str, str], stored: str | None) -> dict[str, Any]:
    """An audit entry as a row: what it says, its seal's position and verdict, and whether it is
    genuine (sealed ok and its MAC holds now)."""
    view = entry_view(fields)
    seq, verdict = None, "not yet sealed"
    if stored:
        parts = stored.split(" ")
        if len(parts) == 3 and parts[0].isdigit():
            seq, verdict = int(parts[0]), parts[2]
        else:
            verdict = "malformed seal"
    judged = broker.audit.judge(fields)
    return {**view, "id": stream_id, "seq": seq, "verdict": verdict if judged == OK else judged,
            "verified": verdict == OK and judged == OK, "time": entry_time(stream_id)}


def _audit_load(broker: Broker) -> Callable[[list[str]], list[dict[str, Any] | None]]:
    def load(ids: list[str]) -> list[dict[str, Any] | None]:
        if not ids:
            return []
        pipe = broker.client.pipeline(transaction=False)
        for sid in ids:
            pipe.xrange(broker.audit.stream, sid, sid)
        pipe.hmget(broker.audit.seals, ids)
        *found, seals = pipe.execute()
        return [_entry(broker, sid, got[0][1], seal) if got else None
                for sid, got, seal in zip(ids, found, seals, strict=True)]

    return load


def action_facet(action: str) -> tuple[str, str]:
    """``task`` or ``task.`` filters by kind; anything else is one action exactly."""
    bare = action.rstrip(".")
    return ("kind", bare) if "." not in bare else ("action", bare)


def audit_page(broker: Broker, f: Filters) -> Page[dict[str, Any]]:
    facets = []
    if f.get("actor"):
        facets.append(("actor", f.values["actor"]))
    if f.get("action"):
        facets.append(action_facet(f.values["action"]))
    if f.get("subject"):
        facets.append(("subject", f.values["subject"]))
    elif _WHOLE_ID.fullmatch(f.get("q") or ""):  # a whole id searched: the entries about it
        facets.append(("subject", f.values["q"]))
    if not facets:  # the stream itself, newest first: every entry, genuine or not, with its verdict
        source: Source[Any] = _SealedStream(broker, f.since_ts(), f.until_ts())
        index, exact = "all", not f.get("q")
    else:
        name, key, only = pick(broker.client, [(n, broker.store.keys.index("audit", n, v)) for n, v in facets],
                               ("all", ""))
        lo, hi = time_bounds(f)
        source, index, exact = IndexSource(broker.client, key, _audit_load(broker), lo, hi), name, only and not f.get("q")

    def accept(e: dict[str, Any]) -> Row[dict[str, Any]] | None:
        if facets and not e["verified"]:
            return None  # a filter lists genuine entries only
        action = str(e.get("action") or "")
        if f.get("actor") and e.get("actor") != f.values["actor"]:
            return None
        if f.get("action"):
            kind, value = action_facet(f.values["action"])
            if (entry_kind(action) if kind == "kind" else action) != value:
                return None
        if f.get("subject") and f.values["subject"] not in entry_subjects(e):
            return None
        if (f.get("since") or f.get("until")) and not f.in_time(e["time"]):
            return None
        if (q := f.get("q")) and not any(has(x, q) for x in (e.get("subject"), action, e.get("actor"),
                                                               json.dumps(e.get("data"), ensure_ascii=False))):
            return None
        doubt = "" if e["verified"] else ("not sealed yet" if e["verdict"] == "not yet sealed" else
                                          f"not genuine: {e['verdict']}")
        return Row("", e, doubt)

    return scan(source, f, accept, exact=exact, index=index)


class _SealedStream(StreamSource[Any]):
    """The audit stream with each fetched entry's seal read in the same round trip."""

    def __init__(self, broker: Broker, since: float | None, until: float | None) -> None:
        super().__init__(broker.client, broker.audit.stream, lambda sid, fields: (sid, fields), since, until)
        self.broker = broker

    def fetch(self, upper: str | None, lower: str | None, newer: bool, n: int) -> list[tuple[str, Any]]:
        got = super().fetch(upper, lower, newer, n)
        if not got:
            return []
        seals = self.broker.client.hmget(self.broker.audit.seals, [sid for _, (sid, _f) in got])
        return [(member, _entry(self.broker, sid, fields, seal))
                for (member, (sid, fields)), seal in zip(got, seals, strict=True)]


@dataclass(frozen=True)
class Coverage:
    """Which part of the audit log the list covers, and where the rest is."""

    first_seq: int | None  # the oldest sealed entry still in Redis
    first_time: float | None
    archived_through: int  # the last entry moved to the archive (0: none)
    segments: int
    archive_dir: str


def audit_coverage(broker: Broker) -> Coverage:
    first = broker.client.xrange(broker.audit.stream, "-", "+", count=1)
    seq = None
    when = None
    if first:
        stored = broker.client.hget(broker.audit.seals, first[0][0])
        if stored and stored.split(" ")[0].isdigit():
            seq = int(stored.split(" ")[0])
        when = entry_time(first[0][0])
    archive = broker.audit.archive
    segments = archive.segments() if archive is not None else []
    return Coverage(seq, when, segments[-1][1] if segments else 0, len(segments),
                    str(broker.settings.audit_archive or ""))



@dataclass(frozen=True)
class ArchivePage:
    """One page of archived audit entries, by sealed position (newest first)."""

    rows: list[Row[dict[str, Any]]]
    segment: str
    first: int  # the segment's first and last positions
    last: int
    archived: int  # the last archived position
    older: int | None  # ``to`` of the older page
    newer: int | None
    error: str | None = None


def archive_page(broker: Broker, to: int | None) -> ArchivePage | None:
    """Up to a page of archived entries ending at position ``to`` (default: the newest archived),
    read from the one segment that holds it: a view costs one segment (at most
    :data:`intake.audit.archive.SEGMENT_MAX` lines) and no Redis, whatever the archive's size.
    Each entry's MAC is checked again; the seal chain across segments is ``intake audit verify``'s."""
    archive = broker.audit.archive
    segments = archive.segments() if archive is not None else []
    if archive is None or not segments:
        return None
    archived = segments[-1][1]
    to = archived if to is None or not 1 <= to <= archived else to
    found = next((s for s in segments if s[0] <= to <= s[1]), None)
    if found is None:
        return ArchivePage([], "", 0, 0, archived, None, None, f"no segment holds entry #{to} (a segment is missing)")
    first, last, name = found
    low = max(first, to - PER_PAGE + 1)
    try:
        lines = [line for line in read_segment(archive.store.read(name), name) if low <= line["seq"] <= to]
    except ArchiveBroken as exc:
        return ArchivePage([], name, first, last, archived, None, None, str(exc))
    rows = []
    for line in reversed(lines):
        fields = {str(k): str(v) for k, v in line["f"].items()}
        genuine = line.get("verdict") == OK and broker.audit.judge(fields) == OK
        item = {**entry_view(fields), "id": line.get("id"), "seq": line["seq"], "verified": genuine,
                "time": entry_time(str(line.get("id", "0-0")))}
        rows.append(Row("", item, "" if genuine else f"not genuine: {line.get('verdict')}"))
    return ArchivePage(rows, name, first, last, archived, low - 1 if low > 1 else None,
                       min(to + PER_PAGE, archived) if to < archived else None)
