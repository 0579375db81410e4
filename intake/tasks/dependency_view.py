"""The dependency delta and SBOM of a task result, summarised for ``intake show`` and the
console task page. The result came from a worker: every field is checked for shape here and
shown escaped by the caller (terminal ``safe``, autoescaped HTML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: At most this many delta entries are listed; the counts cover them all.
MAX_LISTED = 50
CHANGES = ("added", "upgraded", "downgraded", "changed", "removed")


@dataclass(frozen=True)
class DependencySummary:
    """Counts per kind of change, the listed entries, the SBOM's size and digest, and the
    ``dependency:`` reasons among the gate reasons."""

    counts: dict[str, int]
    entries: list[dict[str, str]]
    components: int
    sbom_sha256: str | None
    blocked: list[str] = field(default_factory=list)

    @property
    def headline(self) -> str:
        changes = ", ".join(f"{n} {kind}" for kind, n in self.counts.items() if n) or "no dependency changes"
        digest = f", sha256 {self.sbom_sha256[:16]}…" if self.sbom_sha256 else ""
        return f"{changes}; SBOM: {self.components} component(s){digest}"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def entry_line(entry: dict[str, str]) -> str:
    """``upgraded npm:axios 1.7.8 -> 1.7.9 (MIT)``."""
    versions = " -> ".join(v for v in (entry["before"], entry["after"]) if v) or "version not pinned"
    license = f" ({entry['license']})" if entry["license"] else ""
    return f"{entry['change']} {entry['ecosystem']}:{entry['name']} {versions}{license}"


def summarize_dependencies(result: dict[str, Any] | None) -> DependencySummary | None:
    """The summary of ``result["dependencies"]``, or ``None`` when the result has none."""
    deps = (result or {}).get("dependencies")
    if not isinstance(deps, dict):
        return None
    delta = deps.get("delta") if isinstance(deps.get("delta"), list) else []
    entries = [{k: _text(e.get(k)) for k in ("ecosystem", "name", "before", "after", "change", "license")}
               for e in delta if isinstance(e, dict)]
    counts = {kind: sum(1 for e in entries if e["change"] == kind) for kind in CHANGES}
    sbom = deps.get("sbom") if isinstance(deps.get("sbom"), dict) else {}
    components = sbom.get("components") if isinstance(sbom.get("components"), list) else []
    gates = (result or {}).get("gates")
    blocked = [g for g in gates if isinstance(g, str) and g.startswith("dependency: ")] if isinstance(gates, list) else []
    digest = deps.get("sbom_sha256")
    return DependencySummary(counts, entries[:MAX_LISTED], len(components),
                             digest if isinstance(digest, str) else None, blocked)
