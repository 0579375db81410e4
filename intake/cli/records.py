"""How the CLI shows ideas and tasks (the API's JSON records) on a terminal: tables for lists,
key/value lines and sections for one record, never a Python repr. Pure functions returning
lines; every untrusted string goes through :func:`intake.text.terminal.safe` (via ``fields``/``table``).
"""

from __future__ import annotations

from typing import Any

from intake.text.terminal import fields, safe, table, when


def idea_table(ideas: list[dict[str, Any]]) -> list[str]:
    """``intake list``."""
    rows = [[i["id"], i["state"], i["requester"], i["channel"], when(i["created_at"]), i["title"]] for i in ideas]
    return table(["id", "state", "requester", "channel", "created", "title"], rows)


def task_table(tasks: list[dict[str, Any]]) -> list[str]:
    """``intake list --tasks``."""
    rows = [[t["id"], t["state"], t["spec"]["repo"], t["spec"]["change_type"], f"{len(t['approvals'])}/{t['required']}",
             t["idea_id"], when(t["created_at"])] for t in tasks]
    return table(["id", "state", "repo", "change", "approvals", "idea", "created"], rows)


def untrusted_lines(label: str, text: str) -> list[str]:
    """Channel text under a label that says so, each line behind a bar (never mistaken for ours)."""
    return [f"{label} (untrusted):", *(f"  | {line}" for line in safe(text).splitlines() or [""])]


def idea_lines(idea: dict[str, Any]) -> list[str]:
    """``intake show I-…``: key/value lines, then the untrusted text."""
    filed = idea.get("filed_by") if idea.get("filed_by") not in ("", idea["requester"]) else None
    card = idea.get("card") or {}
    pairs: list[tuple[str, Any]] = [
        ("idea", idea["id"]), ("state", idea["state"]), ("requester", idea["requester"]), ("filed by", filed),
        ("channel", idea["channel"]), ("created", when(idea["created_at"])), ("updated", when(idea["updated_at"])),
        ("expires", when(idea.get("expires_at"))), ("task", idea.get("task_id")), ("reason", idea.get("reason")),
        ("card", f"{card.get('channel')} {card.get('ts')}" if card else None), ("title", idea["title"]),
    ]
    return [*fields((k, v) for k, v in pairs if v not in (None, "", "-")), *untrusted_lines("text", idea["text"])]


def task_lines(task: dict[str, Any]) -> list[str]:
    """``intake show T-…``: key/value lines, the approvals as tables, the spec and result as
    sections, then the untrusted prompt."""
    spec = dict(task["spec"])
    approvals = ", ".join(a["approver"] for a in task["approvals"]) or "none"
    pairs: list[tuple[str, Any]] = [
        ("task", task["id"]), ("state", task["state"]), ("idea", task["idea_id"]), ("requester", task["requester"]),
        ("repo", spec["repo"]), ("change type", spec["change_type"]), ("base ref", spec["base_ref"]),
        ("risk tier", task["risk_tier"]), ("queue", task.get("queue")),
        ("approvals", f"{len(task['approvals'])} of {task['required']} ({approvals})"),
        ("spec hash", task["spec_hash"]), ("policy", spec["policy_version"][:12]), ("attempts", task["attempts"]),
        ("created", when(task["created_at"])), ("updated", when(task["updated_at"])),
        ("window ends", when(task["window_ends_at"]) if task.get("window_ends_at") else None),
        ("reason", task.get("reason")),
    ]
    out = fields((k, v) for k, v in pairs if v not in (None, ""))
    for title, rows in (("approvals", task["approvals"]), ("result approvals", task.get("result_approvals") or [])):
        if rows:
            out.append(f"{title}:")
            cells = [[a["approver"], ",".join(a["groups"]), when(a["at"]), a["via"], (a.get("sha") or "")[:12],
                      a["note"]] for a in rows]
            out += [f"  {line}" for line in table(["approver", "groups", "at", "via", "sha", "note"], cells)]
    prompt = spec.pop("prompt")
    for key in ("repo", "change_type", "base_ref", "policy_version", "idea_id"):
        spec.pop(key)
    out += ["spec:", *fields(((k.replace("_", " "), v) for k, v in spec.items()), indent=2)]
    result = {k: v for k, v in (task.get("result") or {}).items() if k != "dependencies"}
    if result:
        out += ["result:", *fields(((str(k).replace("_", " "), v) for k, v in sorted(result.items())), indent=2)]
    return out + dependency_lines(task.get("result")) + untrusted_lines("prompt", prompt)


def dependency_lines(result: dict[str, Any] | None) -> list[str]:
    """The dependency delta of a gated result, one line each (the SBOM itself: ``show --sbom``)."""
    from intake.tasks.dependency_view import entry_line, summarize_dependencies

    summary = summarize_dependencies(result)
    if summary is None:
        return []
    return [f"dependencies: {safe(summary.headline)}", *(f"  {safe(entry_line(e))}" for e in summary.entries)]
