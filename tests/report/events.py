"""Writing sealed history the way the broker does (the real Store and AuditLog), for figures
tests that need events of issue 11's other parts (dependency deltas, provenance) before those
parts exist in this tree: the shapes are the data contracts they will write."""

from __future__ import annotations

import secrets
from typing import Any

from intake.core.models import canonical_json
from intake.protocol.reports import report_mac
from intake.storage.store import Store


def emit(store: Store, actor: str, action: str, subject: str, **data: Any) -> None:
    """One broker event in its own MULTI, then sealed."""
    pipe = store.r.pipeline(transaction=True)
    store.emit(pipe, actor, action, subject, **data)
    pipe.execute()
    store.audit.seal_pending()


def settle(store: Store, task_id: str, state: str, result: dict[str, Any], *, worker: str = "w1",
           run: str | None = None, generation: int = 1, **data: Any) -> str:
    """A worker's MAC'd ``report.result`` copied in as evidence, and the broker's ``task.<state>``
    for that run in the same MULTI (what ReportProcessor does). Returns the run id."""
    run = run or secrets.token_hex(8)
    body = canonical_json({"w": worker, "g": generation, "action": "report.result", "task": task_id, "at": store.clock(),
                           "rid": secrets.token_hex(8),
                           "data": {"attempt": 1, "run": run, "state": state, "result": result}}).decode()
    pipe = store.r.pipeline(transaction=True)
    store.audit.append_report(pipe, {"r": body, "m": report_mac(store.audit.worker_key(worker, generation), body)})
    store.emit(pipe, "system", f"task.{state}", task_id, attempt=1, run=run, worker=worker, **data)
    pipe.execute()
    store.audit.seal_pending()
    return run
