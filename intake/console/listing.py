"""Search, filters and pagination for the console's lists (ideas, tasks, audit).

Filters come from the query string and are validated whole (``re.fullmatch``); a bad value is
ignored, never echoed into a query. They apply to the most recent :data:`WINDOW` records of
each list (a console view, not an archive search: `intake audit export` is that).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlencode

from intake.core.models import IDEA_PENDING

WINDOW = 1000
PER_PAGE = 25
T = TypeVar("T")

_FIELDS = {
    "q": r"[^\x00-\x1f\x7f]{1,100}",
    "state": r"[a-z_]{1,40}",
    "repo": r"[A-Za-z0-9._/-]{1,200}",
    "requester": r"[^\s\x00-\x1f\x7f]{1,200}",
    "approver": r"[a-z0-9._-]{1,40}",
    "tier": r"[A-Za-z0-9_-]{1,60}",
    "actor": r"[^\s\x00-\x1f\x7f]{1,200}",
    "action": r"[a-z0-9._]{1,80}",
    "since": r"[0-9]{1,4}[hd]",
}


@dataclass(frozen=True)
class Filters:
    """The valid filters of one request, and the page asked for."""

    values: dict[str, str] = field(default_factory=dict)
    page: int = 1

    @classmethod
    def parse(cls, query: Mapping[str, str], allowed: Iterable[str], defaults: Mapping[str, str] | None = None
              ) -> Filters:
        values = dict(defaults or {})
        for name in allowed:
            raw = query.get(name)
            if raw is None:
                continue
            raw = raw.strip()
            if raw == "" or raw == "any":
                values.pop(name, None)
            elif re.fullmatch(_FIELDS[name], raw):
                values[name] = raw
        page_raw = query.get("page", "1")
        page = int(page_raw) if re.fullmatch(r"[0-9]{1,6}", page_raw) else 1
        return cls(values, max(page, 1))

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def since_ts(self, now: float | None = None) -> float | None:
        raw = self.values.get("since")
        if raw is None:
            return None
        return (now or time.time()) - int(raw[:-1]) * (3600 if raw.endswith("h") else 86400)

    def query(self, **change: Any) -> str:
        """This view's query string with ``change`` applied (for pagination links)."""
        merged = {**self.values, "page": str(self.page), **{k: str(v) for k, v in change.items()}}
        return urlencode({k: v for k, v in merged.items() if v})


@dataclass(frozen=True)
class Page:
    items: list[Any]
    page: int
    pages: int
    total: int


def paginate(items: Sequence[T], page: int, per: int = PER_PAGE) -> Page:
    pages = max(1, math.ceil(len(items) / per))
    page = min(page, pages)
    return Page(list(items[(page - 1) * per: page * per]), page, pages, len(items))


def _has(text: Any, needle: str) -> bool:
    return needle.casefold() in str(text or "").casefold()


def match_all(items: Iterable[T], checks: list[Callable[[T], bool]]) -> list[T]:
    return [i for i in items if all(check(i) for check in checks)]


def idea_checks(f: Filters) -> list[Callable[[Any], bool]]:
    checks: list[Callable[[Any], bool]] = []
    if q := f.get("q"):
        checks.append(lambda i: _has(i.id, q) or _has(i.title, q) or _has(i.text, q))
    if state := f.get("state"):  # "pending": every state still waiting for promotion
        checks.append(lambda i: i.state in IDEA_PENDING if state == "pending" else i.state.value == state)
    if requester := f.get("requester"):
        checks.append(lambda i: _has(i.requester, requester))
    if (since := f.since_ts()) is not None:
        checks.append(lambda i: i.created_at >= since)
    return checks


def task_checks(f: Filters) -> list[Callable[[Any], bool]]:
    checks: list[Callable[[Any], bool]] = []
    if q := f.get("q"):
        checks.append(lambda t: _has(t.id, q) or _has(t.spec.prompt, q) or _has(t.idea_id, q))
    if state := f.get("state"):
        checks.append(lambda t: t.state.value == state)
    if repo := f.get("repo"):
        checks.append(lambda t: t.spec.repo == repo)
    if requester := f.get("requester"):
        checks.append(lambda t: _has(t.requester, requester))
    if approver := f.get("approver"):
        checks.append(lambda t: any(a.approver == approver for a in t.approvals))
    if tier := f.get("tier"):
        checks.append(lambda t: t.risk_tier == tier)
    if (since := f.since_ts()) is not None:
        checks.append(lambda t: t.updated_at >= since)
    return checks


def event_checks(f: Filters) -> list[Callable[[dict[str, Any]], bool]]:
    checks: list[Callable[[dict[str, Any]], bool]] = []
    if q := f.get("q"):
        checks.append(lambda e: _has(e.get("subject"), q) or _has(e.get("action"), q) or _has(e.get("actor"), q))
    if actor := f.get("actor"):
        checks.append(lambda e: _has(e.get("actor"), actor))
    if action := f.get("action"):
        checks.append(lambda e: str(e.get("action", "")).startswith(action))
    if (since := f.since_ts()) is not None:
        checks.append(lambda e: float(e.get("at") or 0) >= since)
    return checks
