"""What the gates compare, held where the agent cannot rewrite it (DESIGN.md boundary 7).

The agent can reach the work tree, and may reach git objects (its own throwaway ``.git``, or,
as the same uid, the worker's object store). Git does not re-hash objects it reads, so a base
blob rewritten in place (``objects/ab/cdef…`` replaced by other content) would make
``git cat-file`` show the gates whatever the agent likes: say, a ``requirements.txt`` "before"
that already lists the dependency it adds. So:

* :func:`parse_ls_tree` turns ``git ls-tree -r`` of the base, run before the agent starts, into
  a :class:`Tree` the worker keeps in memory: path -> mode and object id.
* :func:`verified_blob` checks every blob read back by id against that id (``blob <len>\\0…``
  hashed with the repository's object format), so a tampered object is an error, never data.
* :func:`scan_work_tree` reads the agent's result from the *files* (the worker hashes them
  itself) after the agent has ended; no index, ref, tree or object the agent could have
  written is consulted. :func:`diff` compares the two trees.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from intake.core.errors import IntakeError

MODE_FILE = "100644"
MODE_EXEC = "100755"
MODE_LINK = "120000"
MODE_GITLINK = "160000"
#: A file larger than this is not read into the worker (the gates refuse it).
MAX_FILE_BYTES = 64 * 1024 * 1024
#: At most this many bytes of new content are held for one change: the worker keeps every new
#: blob in memory, and sparse files cost the agent nothing (the gates refuse the rest).
MAX_CHANGE_BYTES = 128 * 1024 * 1024


class SnapshotError(IntakeError):
    """A tree or object did not verify; the run must stop rather than gate on it."""


Status = Literal["A", "M", "D", "R"]


@dataclass(frozen=True)
class ChangedFile:
    """One path changed between the base commit and the worker's commit.

    ``status`` is ``A``dded, ``M``odified (content, mode or type), ``D``eleted or ``R``enamed;
    for a rename ``old_path`` is the path it had at the base.
    """

    path: str
    status: Status
    old_path: str | None = None


@dataclass(frozen=True)
class Entry:
    """One tree entry: its git mode and object id (a gitlink's id is its commit)."""

    mode: str
    oid: str


Tree = dict[str, Entry]


def blob_id(data: bytes, object_format: str = "sha1") -> str:
    """The git object id of a blob holding ``data`` (``sha1`` or ``sha256`` repositories)."""
    if object_format not in {"sha1", "sha256"}:
        raise SnapshotError(f"unknown git object format: {object_format!r}")
    digest = hashlib.new(object_format)
    digest.update(b"blob %d\0" % len(data))
    digest.update(data)
    return digest.hexdigest()


def verified_blob(data: bytes, oid: str, object_format: str) -> bytes:
    """``data`` if it hashes to ``oid``; otherwise :class:`SnapshotError` (tampered object)."""
    if blob_id(data, object_format) != oid:
        raise SnapshotError(f"git object {oid} does not match its id; the object store was tampered with")
    return data


def parse_ls_tree(out: bytes) -> Tree:
    """Parse ``git ls-tree -r -z --full-tree`` output (``<mode> <type> <oid>\\t<path>\\0``)."""
    tree: Tree = {}
    for record in filter(None, out.split(b"\0")):
        meta, sep, raw_path = record.partition(b"\t")
        parts = meta.split(b" ")
        if not sep or len(parts) != 3:
            raise SnapshotError("unexpected git ls-tree output")
        tree[os.fsdecode(raw_path)] = Entry(parts[0].decode(), parts[2].decode())
    return tree


@dataclass
class Scan:
    """The agent's result as read by the worker from the work tree.

    ``tree`` holds every committable entry; ``contents`` the bytes of each entry whose id is
    not in the base (what must be written as new blobs and what the gates read); ``refused``
    reasons for entries that cannot be committed at all (embedded repositories, special files,
    oversized files), which are left out of ``tree``.
    """

    tree: Tree = field(default_factory=dict)
    contents: dict[str, bytes] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


def _walk(root: Path, gitlinks: set[str], rel: str = "") -> Iterable[tuple[str, os.stat_result]]:
    """Every entry under ``root`` as (repository path, lstat), never following a symlink.
    Directories that hold a ``.git`` (embedded repositories) or sit where the base has a
    gitlink (an unpopulated submodule) are yielded and not entered."""
    with os.scandir(root / rel if rel else root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = f"{rel}/{entry.name}" if rel else entry.name
            if not rel and entry.name == ".git":
                continue  # the agent's own throwaway repository, never part of the change
            info = entry.stat(follow_symlinks=False)
            nested = path in gitlinks or os.path.lexists(os.path.join(entry.path, ".git"))
            if stat.S_ISDIR(info.st_mode) and not nested:
                yield from _walk(root, gitlinks, path)
            else:
                yield path, info


def _read(root: Path, path: str, info: os.stat_result) -> bytes:
    """A regular file's bytes, refusing anything that is no longer the file ``lstat`` saw."""
    fd = os.open(root / path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(now.st_mode):
            raise SnapshotError(f"file changed while the worker read it: {path!r}")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)


def scan_work_tree(
    root: Path, base: Mapping[str, Entry], object_format: str,
    ignored: Callable[[list[str]], set[str]],
) -> Scan:
    """Read the work tree at ``root`` as git would commit it with ``git add --all`` on top of
    ``base``: ignored paths (``ignored`` answers from the tree's ignore rules) are left out
    unless the base tracks them. Modes as git records them (executable bit, symlink). A base
    gitlink stays as it was if its directory is still there."""
    try:
        return _scan(root, base, object_format, ignored)
    except OSError as exc:  # say an unreadable file left by the agent, not a worker crash
        raise SnapshotError(f"cannot read the work tree: {exc.strerror}: {exc.filename!r}") from None


def _scan(
    root: Path, base: Mapping[str, Entry], object_format: str,
    ignored: Callable[[list[str]], set[str]],
) -> Scan:
    found = list(_walk(root, {p for p, e in base.items() if e.mode == MODE_GITLINK}))
    candidates = [p for p, _ in found if p not in base]
    skip = ignored(candidates) if candidates else set()
    scan = Scan()
    held = 0
    for path, info in found:
        if path in skip:
            continue
        mode = info.st_mode
        if stat.S_ISDIR(mode):
            if base.get(path, Entry("", "")).mode == MODE_GITLINK:
                scan.tree[path] = base[path]
            else:
                scan.refused.append(f"embedded repository (gitlink) not allowed: {path}")
            continue
        if stat.S_ISLNK(mode):
            data, git_mode = os.fsencode(os.readlink(root / path)), MODE_LINK
        elif stat.S_ISREG(mode):
            data = _read(root, path, info)
            git_mode = MODE_EXEC if mode & stat.S_IXUSR else MODE_FILE
            if len(data) > MAX_FILE_BYTES:
                scan.refused.append(f"file too large: {path}")
                continue
        else:
            scan.refused.append(f"special file not allowed: {path}")
            continue
        oid = blob_id(data, object_format)
        old = base.get(path)
        if old is None or old.oid != oid:
            if held + len(data) > MAX_CHANGE_BYTES:
                scan.refused.append(f"change too large: {path}")
                continue
            held += len(data)
            scan.contents[path] = data
        scan.tree[path] = Entry(git_mode, oid)
    return scan


def diff(base: Mapping[str, Entry], head: Mapping[str, Entry]) -> list[ChangedFile]:
    """The changes from ``base`` to ``head``, sorted by path. A deleted path whose exact
    entry (same mode and id) reappears under one new path is a rename."""
    added = [p for p in head if p not in base]
    deleted = [p for p in base if p not in head]
    changes = [ChangedFile(p, "M") for p in head if p in base and head[p] != base[p]]
    by_entry: dict[Entry, list[str]] = {}
    for path in deleted:
        by_entry.setdefault(base[path], []).append(path)
    for path in added:
        sources = by_entry.get(head[path])
        if sources:
            changes.append(ChangedFile(path, "R", sources.pop(0)))
        else:
            changes.append(ChangedFile(path, "A"))
    renamed = {c.old_path for c in changes if c.status == "R"}
    changes += [ChangedFile(p, "D") for p in deleted if p not in renamed]
    return sorted(changes, key=lambda c: c.path)
