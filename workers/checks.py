"""Required checks: the policy's ``[[repos.checks]]``, run on the agent's result before anything
leaves the worker (DESIGN.md boundary 7).

Each check runs on a fresh export of the worker's own commit (from its private objects, never
from the agent's work tree or ``.git``), in the sandbox with the network off, without the
agent's secrets, under the check's own timeout. The check's tree is thrown away afterwards, so
nothing a check writes reaches the pushed commit. A failing or timed-out check blocks the task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from intake.core.models import TaskSpec

from .rundirs import RunRoot
from .sandbox import RunLimits, Sandbox
from .workspace import Workspace

#: How much of a check's output is kept in the result.
CHECK_TAIL_CHARS = 2000
POLL_INTERVAL_S = 0.25


def _redact(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def run_checks(sandbox: Sandbox, ws: Workspace, run_dir: Path, spec: TaskSpec, env: Mapping[str, str],
               should_stop: Callable[[], bool], secrets: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Run every required check of ``spec`` on :attr:`Workspace.head`; return one outcome per
    check that ran: ``{name, ok, exit_code, timed_out, tail}``. Stops early (with the checks
    so far) once ``should_stop()`` is true: the caller sees that and settles nothing."""
    offline = sandbox.with_network("none")
    outcomes: list[dict[str, Any]] = []
    for i, check in enumerate(spec.required_checks):
        if should_stop():
            break
        tree = RunRoot.private(run_dir, f"check-{i}")
        ws.export("HEAD", tree)
        ran = offline.run(list(check.argv), workdir=tree, home=RunRoot.private(run_dir, f"check-{i}-home"),
                          env=env, timeout_s=check.timeout_s, max_output_bytes=spec.limits.max_output_bytes,
                          should_stop=should_stop, poll_interval=POLL_INTERVAL_S,
                          limits=RunLimits(spec.limits.max_disk_bytes, spec.limits.max_processes))
        if ran.stopped:
            break
        outcome = {"name": check.name, "ok": ran.ok, "exit_code": ran.exit_code, "timed_out": ran.timed_out,
                   "tail": _redact(ran.output_tail, secrets)[-CHECK_TAIL_CHARS:]}
        if ran.limit_reason is not None:
            outcome["limit"] = ran.limit_reason
        outcomes.append(outcome)
    return outcomes


def describe_failure(outcome: Mapping[str, Any]) -> str:
    """``"ci/test exited 1"`` or ``"ci/test timed out"``."""
    if outcome["timed_out"]:
        return f"{outcome['name']} timed out"
    if outcome.get("limit"):
        return f"{outcome['name']} stopped: {outcome['limit']}"
    return f"{outcome['name']} exited {outcome['exit_code']}"
