"""The one job a broker hands a worker through RQ: its function name and its arguments.

RQ stores a function name and pickled arguments by default; both are code-execution paths for
anyone who can write Redis (DESIGN.md boundary 6). intake jobs are JSON, name exactly
:data:`ENTRY_POINT` and carry exactly :data:`JOB_KWARGS`; the worker refuses anything else
(:mod:`intake.workers.jobs`).
"""

from __future__ import annotations

#: The one function a worker will run. Kept as a string: the broker never imports worker code.
ENTRY_POINT = "intake.workers.entry.run_task"
#: Exactly these keyword arguments, and no positional ones.
JOB_KWARGS = frozenset({"task_id", "token"})

#: Failed and refused jobs are evidence: a week, not RQ's default year.
FAILURE_TTL_S = 7 * 86400
