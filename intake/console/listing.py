"""Search, filters and keyset pages for the console's lists (ideas, tasks, audit), over all history.

Filters come from the query string and are validated whole (``re.fullmatch``); a bad value is
ignored, never echoed into a query. A page is read from one listing index (the broker keeps them
at write time: :mod:`intake.storage.indexes`, :mod:`intake.audit.index`): the index of the most
selective filter given (the smallest, by ``ZCARD``), newest first, from a cursor (the last member
shown: ``after``, or the first: ``before``), so a page costs the same few Redis commands whatever
the history's length. Further filters and the free-text search are checked on each record read;
such a page looks at no more than :data:`SCAN_BUDGET` candidates and then says how far it got and
offers to go on (free text has no index: a bounded scan, newest first, is the honest answer).

Index membership is never proof. Every candidate is re-read and every filter matched on what is
read (:mod:`intake.console.views` decides with the ledger's facts where it holds them), so a
member a Redis writer planted or left behind only costs a look-up.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import urlencode

import redis

from intake.audit.index import entry_member
from intake.protocol.keyspace import index_time, member_id

PER_PAGE = 25
#: Candidates one page view may look at when filters beyond the index (or a search) apply.
SCAN_BUDGET = 1000
#: Candidates read per round trip while scanning.
BATCH = 100
T = TypeVar("T")

_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_FIELDS = {
    "q": r"[^\x00-\x1f\x7f]{1,100}",
    "state": r"[a-z_]{1,40}",
    "channel": r"[a-z]{1,20}",
    "repo": r"[A-Za-z0-9._/-]{1,200}",
    "requester": r"[^\s\x00-\x1f\x7f]{1,200}",
    "approver": r"[a-z0-9._-]{1,40}",
    "tier": r"[A-Za-z0-9_-]{1,60}",
    "actor": r"[^\s\x00-\x1f\x7f]{1,200}",
    "action": r"[a-z0-9._]{1,80}",
    "subject": r"[^\s\x00-\x1f\x7f]{1,200}",
    "since": rf"[0-9]{{1,4}}[hd]|{_DATE}",
    "until": _DATE,
    "after": r"[0-9]{16}\|[A-Za-z0-9-]{1,40}",
    "before": r"[0-9]{16}\|[A-Za-z0-9-]{1,40}",
}
_CURSORS = ("after", "before")


def _day(text: str) -> float | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class Filters:
    """The valid filters of one request, and where its page starts."""

    values: dict[str, str] = field(default_factory=dict)
    #: Defaults the request set to ``any`` (kept in the pager's links, or the default returns).
    cleared: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, query: Mapping[str, str], allowed: Iterable[str], defaults: Mapping[str, str] | None = None
              ) -> Filters:
        values = dict(defaults or {})
        cleared = set()
        for name in (*allowed, *_CURSORS):
            raw = query.get(name)
            if raw is None:
                continue
            raw = raw.strip()
            if raw == "" or raw == "any":
                if values.pop(name, None) is not None:
                    cleared.add(name)
            elif re.fullmatch(_FIELDS[name], raw) and (name not in ("since", "until") or raw[-1] in "hd"
                                                       or _day(raw) is not None):
                values[name] = raw
        return cls(values, frozenset(cleared))

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def since_ts(self, now: float | None = None) -> float | None:
        raw = self.values.get("since")
        if raw is None:
            return None
        if raw[-1] in "hd":
            return (now or time.time()) - int(raw[:-1]) * (3600 if raw.endswith("h") else 86400)
        return _day(raw)

    def until_ts(self) -> float | None:
        """The end of the ``until`` day (exclusive), or None."""
        day = _day(self.values.get("until", ""))
        return None if day is None else day + 86400

    def in_time(self, ts: float | None) -> bool:
        since, until = self.since_ts(), self.until_ts()
        if ts is None:
            return since is None and until is None
        return (since is None or ts >= since) and (until is None or ts < until)

    @property
    def filtering(self) -> dict[str, str]:
        """The filters proper (no cursor)."""
        return {k: v for k, v in self.values.items() if k not in _CURSORS}

    def query(self, **change: str | None) -> str:
        """This view's query string with ``change`` applied (a cursor for the pager)."""
        merged = {**dict.fromkeys(sorted(self.cleared), "any"), **self.filtering,
                  **{k: v for k, v in change.items() if v}}
        return urlencode(merged)


@dataclass
class Row(Generic[T]):
    member: str  # the index member it was found by: the cursor
    item: T
    doubt: str = ""  # how its record disagrees with the sealed history ('' when it agrees)


@dataclass
class Page(Generic[T]):
    """One page of a list and what the pager needs."""

    rows: list[Row[T]]
    newer: str | None  # cursor for the newer page (None: this is the newest)
    older: str | None  # cursor for the older page (None: nothing older)
    looked: int  # candidates read
    total: int  # members of the index read (within the time range)
    exact: bool  # every candidate matched by the index's own facet: ``total`` is the count
    cut: str | None = None  # the budget ran out here: go on searching older from this cursor
    index: str = ""  # which filter's index the page came from

    @property
    def items(self) -> list[T]:
        return [r.item for r in self.rows]


class Source(Generic[T]):
    """Where candidates come from, newest first, by member."""

    def count(self) -> int:
        raise NotImplementedError

    def fetch(self, upper: str | None, lower: str | None, newer: bool, n: int) -> list[tuple[str, T | None]]:
        """Up to ``n`` (member, record or None) strictly between ``lower`` and ``upper``
        (members; None: unbounded), newest first (oldest first when ``newer``)."""
        raise NotImplementedError


class IndexSource(Source[T]):
    """Candidates from one listing index; ``load`` re-reads the records (one round trip)."""

    def __init__(self, client: redis.Redis, key: str, load: Callable[[list[str]], list[T | None]],
                 lo: str | None, hi: str | None) -> None:
        self.r, self.key, self.load = client, key, load
        self.lo, self.hi = lo, hi  # time bounds as member prefixes (inclusive / exclusive)

    def count(self) -> int:
        return int(self.r.zlexcount(self.key, f"[{self.lo}" if self.lo else "-", f"({self.hi}" if self.hi else "+"))

    def fetch(self, upper: str | None, lower: str | None, newer: bool, n: int) -> list[tuple[str, T | None]]:
        top = min(x for x in (upper, self.hi) if x) if (upper or self.hi) else None
        bottom = max(x for x in (lower, self.lo) if x) if (lower or self.lo) else None
        hi_b = f"({top}" if top else "+"
        lo_b = ("(" if bottom == lower else "[") + bottom if bottom else "-"
        if newer:
            members = self.r.zrangebylex(self.key, lo_b, hi_b, start=0, num=n)
        else:
            members = self.r.zrevrangebylex(self.key, hi_b, lo_b, start=0, num=n)
        members = [str(m) for m in members]
        ids = [member_id(m) for m in members]
        records = self.load([i for i in ids if i])
        found = iter(records)
        return [(m, next(found) if i else None) for m, i in zip(members, ids, strict=True)]


class StreamSource(Source[T]):
    """Candidates straight from the audit stream (no filter needs an index): ``make`` turns an
    entry into what the page shows."""

    def __init__(self, client: redis.Redis, stream: str, make: Callable[[str, dict[str, str]], T],
                 lo: float | None, hi: float | None) -> None:
        self.r, self.stream, self.make = client, stream, make
        self.lo = f"{int(lo * 1000)}-0" if lo is not None else None
        self.hi = f"({int(hi * 1000)}-0" if hi is not None else None

    def count(self) -> int:
        return int(self.r.xlen(self.stream))

    @staticmethod
    def _id(member: str | None) -> str | None:
        return member_id(member) if member else None

    def fetch(self, upper: str | None, lower: str | None, newer: bool, n: int) -> list[tuple[str, T | None]]:
        up = f"({self._id(upper)}" if upper else (self.hi or "+")
        down = f"({self._id(lower)}" if lower else (self.lo or "-")
        if upper and self.hi:  # both bound: the tighter (a crafted cursor never widens the range)
            up = min(up, self.hi, key=lambda b: tuple(int(x) for x in b.lstrip("(").split("-")))
        if newer:
            entries = self.r.xrange(self.stream, down, up, count=n)
        else:
            entries = self.r.xrevrange(self.stream, up, down, count=n)
        return [(entry_member(sid), self.make(sid, fields)) for sid, fields in entries]


def time_bounds(f: Filters) -> tuple[str | None, str | None]:
    since, until = f.since_ts(), f.until_ts()
    return (index_time(since) if since is not None else None, index_time(until) if until is not None else None)


def scan(source: Source[T], f: Filters, accept: Callable[[T], Row[T] | None], *, exact: bool,
         per: int = PER_PAGE, budget: int = SCAN_BUDGET, index: str = "") -> Page[T]:
    """One page from ``source``: candidates in order from the cursor, each re-read and kept when
    ``accept`` returns its row. ``exact``: the index alone decides membership (no post-filter),
    so the page reads ``per + 1`` candidates at most and ``total`` is the count."""
    newer = f.get("before") is not None
    cursor = f.get("before") or f.get("after")
    rows: list[Row[T]] = []
    looked, last, more = 0, cursor, True
    while more and len(rows) < per and looked < budget:
        want = min(per - len(rows) + 1 if exact else BATCH, budget - looked)
        batch = source.fetch(None if newer else last, last if newer else None, newer, want)
        more = len(batch) == want
        for member, record in batch:
            if len(rows) >= per:
                more = True  # a candidate is left over: there may be more
                break
            looked, last = looked + 1, member
            row = accept(record) if record is not None else None
            if row is not None:
                row.member = member
                rows.append(row)
    cut = last if (more and len(rows) < per) else None  # the budget ran out before the page filled
    total = source.count()
    if newer:
        rows.reverse()
        return Page(rows, rows[0].member if (rows and more) else None, rows[-1].member if rows else None,
                    looked, total, exact, None, index)
    older = rows[-1].member if (rows and more and cut is None) else None
    return Page(rows, rows[0].member if (rows and cursor) else None, older, looked, total, exact, cut, index)


def pick(client: redis.Redis, keys: Sequence[tuple[str, str]], fallback: tuple[str, str]) -> tuple[str, str, bool]:
    """The smallest of the filters' indexes (name, key) and whether it is the only filter;
    ``fallback`` (the list's ``all`` index) when there is none."""
    if not keys:
        return fallback[0], fallback[1], True
    if len(keys) == 1:
        return keys[0][0], keys[0][1], True
    pipe = client.pipeline(transaction=False)
    for _, key in keys:
        pipe.zcard(key)
    sizes = pipe.execute()
    name, key = min(zip(keys, sizes, strict=True), key=lambda pair: int(pair[1]))[0]
    return name, key, False


def has(text: Any, needle: str) -> bool:
    return needle.casefold() in str(text or "").casefold()
