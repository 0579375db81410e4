"""requirements.lock: every runtime dependency of pyproject.toml (and the build backend), pinned
exactly, each with sha256 hashes, at versions pyproject accepts; the image installs from it with
--require-hashes. A dependency added to pyproject without re-locking fails here."""

from __future__ import annotations

import re
import tomllib
from typing import NamedTuple

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO_ROOT

LOCK = REPO_ROOT / "requirements.lock"
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>[^\s;\\]+)(?P<marker>\s*;[^\\]*)?")
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


class Pin(NamedTuple):
    """One lock entry: the exact version, its sha256 hashes, and its environment marker ("" when
    it applies everywhere)."""

    version: Version
    hashes: list[str]
    marker: str


def lock_entries(text: str) -> dict[str, Pin]:
    """The lock's requirements by canonical name. Continuation lines are joined; comments
    dropped. Anything that is not `name==version [; marker] --hash=...` is an error."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out: dict[str, Pin] = {}
    for raw in joined.splitlines():
        line = raw.split("#", 1)[0].strip()  # "--hash=sha256:" holds no "#"
        if not line:
            continue
        head, _, hashes = line.partition(" --hash")
        m = PIN.fullmatch(head.strip())
        assert m, f"not an exact pin: {line[:80]}"
        found = HASH.findall("--hash" + hashes) if hashes else []
        out[canonicalize_name(m["name"])] = Pin(Version(m["version"]), found, (m["marker"] or "").strip(" ;"))
    return out


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_every_lock_line_is_an_exact_pin_with_hashes() -> None:
    entries = lock_entries(LOCK.read_text())
    assert len(entries) > 20
    bare = [name for name, pin in entries.items() if not pin.hashes]
    assert not bare, f"pins without --hash: {bare}"


def test_the_lock_covers_every_runtime_dependency_and_the_build_backend_at_accepted_versions() -> None:
    entries = lock_entries(LOCK.read_text())
    project = _pyproject()
    wanted = [Requirement(r) for r in project["project"]["dependencies"]]
    wanted += [Requirement(r) for r in project["build-system"]["requires"]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in entries, f"{req.name} is in pyproject.toml but not in requirements.lock: re-lock"
        version = entries[name].version
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} violates {req.specifier}"
        for extra in req.extras:  # redis[hiredis]: the extra's own packages are locked too
            assert canonicalize_name(extra) in entries, f"{req.name}[{extra}]: {extra} is not locked"
    build_in = [Requirement(line) for line in (REPO_ROOT / "build-requirements.in").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert {str(r) for r in build_in} == set(project["build-system"]["requires"]), \
        "build-requirements.in must equal [build-system] requires"


def test_the_parser_refuses_a_loose_or_unhashed_line() -> None:
    good = "aiohttp==3.9.0 \\\n    --hash=sha256:" + "a" * 64 + "\n"
    assert lock_entries(good)["aiohttp"].hashes
    assert not lock_entries("aiohttp==3.9.0\n")["aiohttp"].hashes, "a pin without hashes is seen as such"
    for loose in ("aiohttp>=3.9 \\\n    --hash=sha256:" + "a" * 64, "-e .", "aiohttp"):
        try:
            lock_entries(loose)
        except AssertionError:
            continue
        raise AssertionError(f"accepted a loose line: {loose!r}")


def test_the_image_installs_only_from_the_hashed_lock() -> None:
    text = re.sub(r"\\\n", " ", (REPO_ROOT / "deploy" / "Dockerfile").read_text())
    runs = [line for line in text.splitlines() if line.startswith("RUN ") and "pip install" in line]
    installs = [seg.strip() for line in runs for seg in line.split("&&") if "pip install" in seg]
    assert any("--require-hashes" in s and "-r requirements.lock" in s and "--no-deps" in s for s in installs)
    for s in installs:  # intake itself: no dependency resolution, no build backend fetched
        if "requirements.lock" not in s:
            assert "--no-deps" in s and "--no-build-isolation" in s, s
    assert "requirements.lock" in (REPO_ROOT / ".dockerignore").read_text(), "the lock is in the build context"
