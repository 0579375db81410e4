"""Where a worker's runs keep their temporary directories: one run root per worker.

``$TMPDIR/intake-runs/<worker name>/`` holds one directory per run (the work tree, the agent's
HOME, its inputs, the worker's private git directory). Each run holds an ``flock`` on its
``<run>.lock`` file while it lives, so :meth:`RunRoot.sweep`, called when a worker starts,
removes exactly what runs killed with SIGKILL left behind (files, and any sandbox still running
in a pid namespace the run recorded), and never a run of another live worker that shares the
name.

Modes: the root and every run directory are ``0711`` (the agent user may pass through them to
reach its own, chowned work tree and HOME when bubblewrap mounts them, but may not list them, so
it cannot find another run); the worker's private parts inside are ``0700``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .sandbox import SANDBOX_RECORD, chown_tree, kill_namespaces


class RunRoot:
    """The run root of one worker (see the module docstring)."""

    def __init__(self, worker: str, base: Path | None = None) -> None:
        self.path = (base or Path(tempfile.gettempdir())) / "intake-runs" / worker
        for directory in (self.path.parent, self.path):
            directory.mkdir(mode=0o711, exist_ok=True)
            info = directory.lstat()
            if directory.is_symlink() or info.st_uid != os.geteuid():
                raise OSError(f"run root {directory} is not a directory owned by this user")
            os.chmod(directory, 0o711)

    def sweep(self, agent: pwd.struct_passwd | None = None) -> int:
        """Remove what dead runs left; returns how many runs were removed. ``agent``: the
        sandbox's agent user (a worker that is not root kills its leftovers as that user, and
        takes its files back before removing them)."""
        removed = 0
        for lock in self.path.glob("*.lock"):
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run
                kill_namespaces(lock.with_suffix("") / SANDBOX_RECORD, agent)  # what it left running
                if agent is not None and lock.with_suffix("").is_dir():
                    chown_tree(lock.with_suffix(""), os.getuid(), os.getgid())
                shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
                lock.unlink(missing_ok=True)
                removed += 1
            finally:
                os.close(fd)
        # A run directory is made only after its lock: one without a lock is debris.
        for entry in self.path.iterdir():
            if entry.suffix != ".lock" and not entry.with_name(entry.name + ".lock").exists():
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    @contextlib.contextmanager
    def run(self) -> Iterator[Path]:
        """A fresh run directory, locked while the block runs and removed after it."""
        name = secrets.token_hex(8)
        lock = self.path / f"{name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            path = self.path / name
            path.mkdir(mode=0o711)
            os.chmod(path, 0o711)
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)
                lock.unlink(missing_ok=True)
        finally:
            os.close(fd)

    @staticmethod
    def private(run: Path, name: str) -> Path:
        """A ``0700`` directory of the run that only the worker may enter."""
        path = run / name
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)
        return path
