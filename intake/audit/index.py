"""The console's listing indexes of audit entries (issue 23): which index keys a sealed entry is in.

The sealer adds each entry it seals as genuine (verdict ``ok``) to one index per facet, in the
same fenced script as the seal (:meth:`intake.audit.log.AuditLog._seal_held`): its actor, its kind
(the action up to the first dot: ``task``, ``idea``, ``approval``, …), its action, its subject and
the idea or task its data names. Members are ``<time>|<stream id>``, the time taken from the
stream id (when Redis appended it), so one index reads newest first with the last member as the
cursor. Entries moved to the archive leave their indexes with them (:meth:`AuditLog.drop_archived`).

Hints only: the console re-reads each entry from the stream, judges it again with the audit key
and matches the filter against it, so a member planted by a Redis writer names nothing it shows.
"""

from __future__ import annotations

import json

from intake.core.models import is_id
from intake.protocol.keyspace import Keys, index_member

#: The data fields of an event that name a related idea or task (``idea.promoted`` names its task).
RELATED = ("idea", "task", "idea_id", "task_id")


def entry_time(stream_id: str) -> float:
    """When Redis appended the entry, from its stream id (``<ms>-<n>``), in seconds; within one
    millisecond the sequence part orders entries (up to 999 of them)."""
    ms, _, n = stream_id.partition("-")
    return (int(ms) * 1000 + min(int(n or 0), 999)) / 1_000_000


def entry_member(stream_id: str) -> str:
    return index_member(entry_time(stream_id), stream_id)


def entry_view(fields: dict[str, str]) -> dict[str, object]:
    """An entry's actor, action, subject and data as the console shows them: a broker event as
    written; a worker's report (``k=w``, copied in as evidence) as ``worker:<name>`` acting on
    its task."""
    try:
        record = json.loads(fields.get("e", "{}"))
    except ValueError:
        record = {}
    if not isinstance(record, dict):
        record = {}
    if fields.get("k") == "w":
        return {"at": record.get("at"), "actor": f"worker:{record.get('w')}", "action": record.get("action"),
                "subject": record.get("task"), "data": record.get("data"), "eid": record.get("rid")}
    return record


def entry_subjects(view: dict[str, object]) -> set[str]:
    """The subject and the ideas or tasks the entry's data names."""
    found = {str(view.get("subject") or "")}
    data = view.get("data")
    if isinstance(data, dict):
        found |= {str(data[k]) for k in RELATED if isinstance(data.get(k), str) and
                  (is_id(str(data[k]), "I") or is_id(str(data[k]), "T"))}
    return found - {""}


def entry_kind(action: str) -> str:
    return action.partition(".")[0]


def entry_facets(keys: Keys, fields: dict[str, str]) -> set[str]:
    """Every index a genuine entry belongs to."""
    view = entry_view(fields)
    action = str(view.get("action") or "")
    found = {keys.index("audit", "actor", str(view.get("actor") or "")),
             keys.index("audit", "kind", entry_kind(action)), keys.index("audit", "action", action)}
    found |= {keys.index("audit", "subject", s) for s in entry_subjects(view)}
    return found
