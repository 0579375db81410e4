"""Private files written safely: atomically, with their mode from the start, never half-written."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from intake.core.errors import ConfigError


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically (temp file, fsync, rename) with ``mode``; its folder 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_or_create_secret_text(path: Path) -> str:
    """A random text secret kept in ``path`` (mode 0600): read it, or create it on first use.

    Used for the embedded Redis users' passwords. Callers serialise creation (the embedded
    Redis's start lock); a file readable by group or others is refused like any private key.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        write_atomic(path, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
        st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError(f"{path} is readable by group or others (chmod 600 it)")
    text = path.read_text(encoding="utf-8").strip()
    if len(text) < 16 or not text.isascii() or not text.isprintable() or " " in text:
        raise ConfigError(f"{path} does not hold a password (delete it to generate a new one)")
    return text
