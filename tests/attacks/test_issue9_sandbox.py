"""Issue 9 attacks on the sandbox itself: a hostile program run by :class:`Sandbox` under real
bubblewrap as the agent user tries the ways out the brief lists (inherited fds, abstract unix
sockets, /sys and /dev, capabilities and setuid, hardlinks, symlinks for the chown-back step).
Each test asserts the refusal."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from intake.workers.rundirs import RunRoot
from intake.workers.sandbox import Sandbox

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="bubblewrap is not installed")

PROBE = r"""
import json, os, socket, sys
report = {}
report["fds"] = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
def connect_abstract(name):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect("\0" + name)
        return "connected"
    except OSError as exc:
        return type(exc).__name__
    finally:
        s.close()
report["abstract"] = connect_abstract(sys.argv[1])
report["sys"] = os.path.exists("/sys/kernel")
report["dev"] = sorted(os.listdir("/dev"))
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
report["capeff"] = status["CapEff"].strip()
report["capbnd"] = status["CapBnd"].strip()
report["nonewprivs"] = status["NoNewPrivs"].strip()
report["uid"] = os.getuid()
def attempt(fn):
    try:
        fn()
        return "done"
    except OSError as exc:
        return type(exc).__name__
report["write_usr"] = attempt(lambda: open("/usr/intake-attack", "w"))
report["hardlink_etc"] = attempt(lambda: os.link("/etc/passwd", "/work/passwd-link"))
report["shadow"] = attempt(lambda: open("/etc/shadow", "rb").read(1))
report["mount"] = os.system("mount -t tmpfs x /tmp 2>/dev/null")
# A symlink to a host file (as the worker sees the host) and to a host directory: the chown
# back after the run must not follow either.
os.symlink(sys.argv[2], "/work/to-host-file")
os.symlink(os.path.dirname(sys.argv[2]), "/work/to-host-dir")
print("REPORT " + json.dumps(report))
"""


@pytest.fixture
def run_dirs() -> Iterator[tuple[Path, Path]]:
    root = RunRoot(f"attack9-{secrets.token_hex(4)}")
    try:
        with root.run() as run:
            yield RunRoot.private(run, "work"), RunRoot.private(run, "home")
    finally:
        subprocess.run(["rm", "-rf", str(root.path)], check=True)


def test_a_hostile_program_finds_no_inherited_fd_no_abstract_socket_no_caps_and_no_way_to_chown(
        run_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    work, home = run_dirs
    name = f"intake-attack9-{secrets.token_hex(6)}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(1)
    target = tmp_path / "host-secret"
    target.write_text("host secret\n")
    target.chmod(0o600)
    # Owned by somebody else: a chown back that followed the link would make it the worker's.
    os.chown(target, 12345, 12345)
    try:
        result = Sandbox().run(["python3", "-c", PROBE, name, str(target)], workdir=work, home=home,
                               env={}, timeout_s=30, max_output_bytes=10000)
    finally:
        listener.close()
    assert result.ok, result.output_tail
    report = json.loads(result.output_tail.split("REPORT ", 1)[1])
    # stdin, stdout, stderr and the directory listing itself: not bwrap's info-fd, nothing else.
    assert report["fds"] == [0, 1, 2, 3], report["fds"]
    assert report["abstract"] != "connected"  # abstract sockets live in the network namespace
    assert report["sys"] is False
    assert set(report["dev"]) <= {"console", "core", "fd", "full", "mqueue", "null", "ptmx", "pts", "random",
                                  "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"}, report["dev"]
    assert int(report["capeff"], 16) == 0 and int(report["capbnd"], 16) == 0
    assert report["nonewprivs"] == "1"  # setuid binaries in /usr cannot raise privileges
    assert report["uid"] != 0
    assert report["write_usr"] != "done"
    assert report["hardlink_etc"] != "done"
    assert report["shadow"] == "FileNotFoundError"
    assert report["mount"] != 0
    # The chown back did not follow the links: the host file and its directory keep their owner.
    assert target.stat().st_uid == 12345 and target.stat().st_mode & 0o777 == 0o600
    assert tmp_path.stat().st_uid == os.getuid()
    assert (work / "to-host-file").lstat().st_uid == os.getuid()
    assert target.read_text() == "host secret\n"
