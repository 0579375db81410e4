"""A result's review: the diff an approver is shown before accepting it (issue 20).

The worker makes the unified diff of the quarantined commit against the base from its own
objects and reports its SHA-256; the broker stores the text (:meth:`Store.put_review`) and seals
the digest with the result. Every surface shows the review from here: :func:`load_review` gives
the text only when it still hashes to the digest the sealed history names (Redis is a cache),
and :func:`split_files` cuts it per file, marking the files under the repo's privileged paths.
The text is untrusted (the agent wrote it): surfaces escape it, nothing here interprets it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from intake.core.policy import Policy
from intake.storage.store import Store

# "diff --git a/<path> b/<path>" (git quotes a path with unusual bytes: "a/..." in C quoting)
_HEADER = re.compile(r'diff --git (?:"a/(?P<qa>(?:[^"\\]|\\.)*)"|a/(?P<a>\S+)) (?:"b/(?P<qb>(?:[^"\\]|\\.)*)"|b/(?P<b>\S+))')


@dataclass(frozen=True)
class Review:
    """The reviewed diff of a result: ``sha256`` as sealed, ``diff`` the text (None when the
    stored copy is missing or no longer hashes to ``sha256``), and the worker's summary."""

    task_id: str
    sha256: str
    diff: str | None
    truncated: bool = False
    size: int = 0
    stat: str = ""
    binary: tuple[str, ...] = ()


@dataclass
class FileDiff:
    path: str
    privileged: bool
    lines: list[tuple[str, str]] = field(default_factory=list)  # (kind: add|del|hunk|meta|ctx, text)


def load_review(store: Store, task_id: str, sha256: str | None, summary: dict[str, object] | None) -> Review | None:
    """The review of ``task_id``'s result whose digest is ``sha256`` (from the sealed history)."""
    if not sha256:
        return None
    info = summary if isinstance(summary, dict) else {}
    binary = info.get("binary")
    size = info.get("bytes")
    return Review(task_id=task_id, sha256=sha256, diff=store.get_review(task_id, sha256),
                  truncated=info.get("truncated") is True, size=size if isinstance(size, int) else 0,
                  stat=str(info.get("stat", "")),
                  binary=tuple(str(b) for b in binary) if isinstance(binary, list) else ())


def _path(match: re.Match[str]) -> str:
    return match.group("b") or match.group("qb") or match.group("a") or match.group("qa") or ""


def split_files(diff: str, policy: Policy, repo_name: str) -> list[FileDiff]:
    """The diff cut per file, each marked ``privileged`` when the repo's policy lists its path."""
    repo = policy.find_repo(repo_name)
    files: list[FileDiff] = []
    current: FileDiff | None = None
    for line in diff.split("\n"):
        header = _HEADER.match(line)
        if header:
            path = _path(header)
            current = FileDiff(path, bool(repo and repo.privileged_paths and repo.touches_privileged([path])))
            files.append(current)
        if current is None:
            current = FileDiff("", False)
            files.append(current)
        if header or line.startswith(("index ", "--- ", "+++ ", "new file", "deleted file", "old mode",
                                      "new mode", "similarity", "Binary files")):
            kind = "meta"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = "ctx"
        current.lines.append((kind, line))
    return files


def privileged_files(review: Review | None, policy: Policy, repo_name: str) -> list[str]:
    """The reviewed files under the repo's privileged paths."""
    if review is None or review.diff is None:
        return []
    return [f.path for f in split_files(review.diff, policy, repo_name) if f.privileged]
