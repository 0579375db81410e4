"""The one place that starts agent and check processes: under bubblewrap as an unprivileged user.

A :class:`Sandbox` in mode ``"bwrap"`` runs a program with ``/usr/bin/bwrap`` as a dedicated host
user (``agent_user``, never root, never the worker's own uid) in new user, pid, ipc, uts, mount
and (unless the repo opts into ``network = "host"``) network namespaces. Inside it sees:

* the system read-only: ``/usr`` and the ``/bin``, ``/lib*`` links, and a handful of ``/etc``
  files programs need (passwd, group, hosts, TLS certificates, alternatives; ``resolv.conf``
  only with the host's network);
* a fresh ``/proc`` (only its own pids) and ``/dev``;
* the work tree read-write at ``/work``, a fresh HOME read-write at ``/home/agent`` and a fresh
  ``/tmp`` (directories of the run, next to HOME), an inputs
  directory (the prompt file) read-only at ``/intake``, and any read-only paths the agent
  configuration names (an agent's own install);
* exactly the environment it is given (passed through bwrap's own environment rather than
  ``--setenv``, so that no secret lands in an argv that every local user can read).

Nothing else: not the worker's config, credential files, keys, data dir or Redis socket, which
are simply never mounted. The work tree, HOME and ``/tmp`` are chowned to the agent user before the
run and back to the worker after it, once every process of the sandbox is gone, so the worker
never reads files the agent could still change.

Starting bwrap as another user needs root or ``CAP_SETUID`` + ``CAP_SETGID`` (+ ``CAP_CHOWN``
and ``CAP_FOWNER`` for the chowns: the worker's systemd unit, ``AmbientCapabilities=CAP_SETUID
CAP_SETGID CAP_CHOWN CAP_FOWNER`` and ``User=intake``), ``setpriv``, plus unprivileged user
namespaces in the kernel.

Whatever ends the run (the program exits, the timeout, ``should_stop()``, an exception), the
sandbox's pid namespace is killed: SIGKILL to its pid 1 makes the kernel kill every process in
it, ``setsid`` and double-forked grandchildren included. :meth:`Sandbox.run` returns only once
no process of that namespace is left (it raises :class:`SandboxError` if one is).

Network: ``"none"`` (an empty network namespace), ``"egress"`` (the same empty namespace plus the
filtering proxy of :mod:`workers.egress`, reached through its unix socket bind-mounted at
``/run/intake-egress.sock`` and a ``socat`` forwarder on the sandbox's own ``127.0.0.1:3128``;
``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` point there) or ``"host"`` (the host's network: the
explicit opt-out, recorded on every run).

Limits (:class:`RunLimits`), each of which **stops** the run with a reason
(:attr:`AgentResult.limit`) rather than truncating: output past ``max_output_bytes``; disk past
``max_disk_bytes`` (HOME and ``/tmp`` are directories of the run, not memory, so the work tree,
HOME and ``/tmp`` are all on the run's disk: the kernel caps every single file at the bound
(``RLIMIT_FSIZE``) and the worker measures the three trees every poll); processes past
``max_processes`` (``RLIMIT_NPROC`` of the agent user, which the kernel enforces at fork; the
worker stops the run when the agent user's process count reaches it).

Killing works without ``CAP_KILL``: a root worker SIGKILLs the namespace's init itself; a worker
that is not root may not signal another user's process, so a helper that becomes the agent user
(:func:`kill_as`, through ``setpriv``) does it. The worker then waits on a pidfd of that init,
which becomes readable only once the namespace is empty. Bubblewrap is started through
``prlimit`` (the process and file-size caps) and ``setpriv``, which drops every inheritable and
ambient capability: bubblewrap refuses to run with capabilities it was not installed setuid for.

Mode ``"none"`` is the explicit opt-out: the program runs as the worker's own user in its own
process group (killed whole at the end), with none of the isolation above.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import json
import os
import pwd
import resource
import selectors
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from intake.core.errors import IntakeError

from .egress import PROXY_PORT, EgressProxy, Resolver, Rule

BWRAP = "/usr/bin/bwrap"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
WORKDIR_INSIDE = "/work"
HOME_INSIDE = "/home/agent"
INPUTS_INSIDE = "/intake"

Mode = Literal["bwrap", "none"]
Network = Literal["none", "egress", "host"]
SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"
SOCAT = "/usr/bin/socat"
EGRESS_SOCKET_INSIDE = "/run/intake-egress.sock"
TMP_INSIDE = "/tmp"

_CHUNK = 65536
_DRAIN_S = 2.0  # after the kill, how long to wait for the last output
_START_S = 30.0  # how long bwrap may take to set the sandbox up
_GONE_S = 5.0  # how long the kernel may take to empty a killed pid namespace
# /etc entries programs need to run (user names, DNS, TLS, Debian's alternatives links); not the
# rest of /etc, which can hold host secrets (shadow, ssh host keys, service configs).
_ETC = ("passwd", "group", "nsswitch.conf", "hosts", "resolv.conf", "host.conf", "localtime",
        "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "ssl", "ca-certificates", "pki",
        "alternatives", "mime.types")
_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


class SandboxError(IntakeError):
    """The sandbox cannot be used or did not start (the message is one line)."""


@dataclass(frozen=True)
class AgentResult:
    """How a sandboxed run ended.

    ``exit_code`` is the main process's exit status (negative: killed by that signal), or
    ``None`` when the run was cut short (``timed_out`` or ``stopped``). ``output_tail`` is the
    last bytes of combined stdout and stderr, decoded with replacement characters.
    """

    exit_code: int | None
    timed_out: bool
    stopped: bool
    output_tail: str
    output_truncated: bool
    #: Which limit stopped the run ("output", "disk", "processes"), with ``limit_reason``.
    limit: str | None = None
    limit_reason: str | None = None
    #: The egress proxy's facts for this run (see :meth:`workers.egress.EgressProxy.summary`).
    egress: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """True when the program finished by itself with exit status 0."""
        return self.exit_code == 0 and not self.timed_out and not self.stopped and self.limit is None


@dataclass(frozen=True)
class RunLimits:
    """What one sandboxed run may use beyond time and output (see the module docstring)."""

    max_disk_bytes: int = 1024 * 1024 * 1024
    max_processes: int = 256


class _Tail:
    """Keeps the last ``cap`` bytes of a stream and counts the rest."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.total = 0
        self.buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.buf += chunk
        if len(self.buf) > self.cap:
            del self.buf[: len(self.buf) - self.cap]

    def text(self) -> str:
        return self.buf.decode("utf-8", "replace")


@dataclass(frozen=True)
class View:
    """Where the sandboxed program sees its work tree, HOME and inputs directory."""

    workdir: str
    home: str
    inputs: str | None


def safe_path(value: str | None) -> str:
    """``value`` (a PATH) with relative entries dropped: they would resolve inside the work
    tree, i.e. to files the repository or the agent controls."""
    entries = [e for e in (value or SAFE_PATH).split(os.pathsep) if os.path.isabs(e)]
    return os.pathsep.join(entries) or SAFE_PATH


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """``chown -R`` without following symlinks (a link in the tree must not hand the owner a
    file outside it). Raises :class:`SandboxError` (one line) on any failure, never skips.

    A worker that is not root can list only directories it owns: giving the tree away goes
    bottom-up (each directory is listed while still the worker's), taking it back top-down
    (each directory is the worker's again, and searchable by it, before it is listed)."""
    def fail(exc: OSError) -> None:
        raise SandboxError(f"cannot chown {exc.filename}: {exc.strerror}")

    try:
        if uid == os.getuid():
            os.chown(root, uid, gid, follow_symlinks=False)
            _searchable(str(root))
            for top, dirs, files in os.walk(root, followlinks=False, onerror=fail):
                for name in (*dirs, *files):
                    os.chown(os.path.join(top, name), uid, gid, follow_symlinks=False)
                for name in dirs:
                    _searchable(os.path.join(top, name))
        else:
            for top, dirs, files in os.walk(root, topdown=False, followlinks=False, onerror=fail):
                for name in (*dirs, *files):
                    os.chown(os.path.join(top, name), uid, gid, follow_symlinks=False)
            os.chown(root, uid, gid, follow_symlinks=False)
    except OSError as exc:
        fail(exc)


def _searchable(path: str) -> None:
    """Give the (now worker-owned) directory ``path`` owner rwx: the agent may have taken it away."""
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode) and info.st_mode & 0o700 != 0o700:
        os.chmod(path, stat.S_IMODE(info.st_mode) | 0o700)


def _can_setuid() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    caps = next((line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), "0")
    effective = int(caps, 16)
    return bool(effective & (1 << 6)) and bool(effective & (1 << 7))  # CAP_SETGID, CAP_SETUID


@dataclass(frozen=True)
class Sandbox:
    """How agents and checks are run; see the module docstring.

    ``egress`` is the allowlist of a ``network = "egress"`` sandbox. ``resolver`` replaces the
    egress proxy's resolver; only tests set it (no configuration can), to make a name resolve
    to an address of their choosing.
    """

    mode: Mode = "bwrap"
    agent_user: str = "intake-agent"
    network: Network = "none"
    bwrap: str = BWRAP
    term_grace_s: float = 3.0  # mode "none" only: SIGTERM, then SIGKILL after this
    egress: tuple[Rule, ...] = ()
    resolver: Resolver | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("bwrap", "none"):
            raise ValueError(f"sandbox mode must be 'bwrap' or 'none', not {self.mode!r}")
        if self.network not in ("none", "egress", "host"):
            raise ValueError(f"network must be 'none', 'egress' or 'host', not {self.network!r}")
        if self.network == "egress" and self.mode == "none":
            raise SandboxError('network = "egress" needs the bwrap sandbox (an unsandboxed program '
                             "would reach the host's network directly)")

    def with_network(self, network: Network, egress: tuple[Rule, ...] = ()) -> Sandbox:
        return replace(self, network=network, egress=tuple(egress) if network == "egress" else ())

    # -- can it run here --------------------------------------------------------------------
    def user(self) -> pwd.struct_passwd:
        """The agent user's passwd entry, or :class:`SandboxError` if it may not be used."""
        try:
            entry = pwd.getpwnam(self.agent_user)
        except KeyError:
            raise SandboxError(f"agent user {self.agent_user!r} does not exist "
                               "(create it: useradd --system --no-create-home intake-agent)") from None
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise SandboxError(f"agent user {self.agent_user!r} is root; use an unprivileged user")
        if entry.pw_uid in {os.getuid(), os.geteuid()}:
            raise SandboxError(f"agent user {self.agent_user!r} is the worker's own user; "
                               "use a dedicated one")
        return entry

    def check(self) -> None:
        """Raise :class:`SandboxError` (one line) unless this sandbox can run programs here."""
        if self.mode == "none":
            return
        if not (os.path.isfile(self.bwrap) and os.access(self.bwrap, os.X_OK)):
            raise SandboxError(f"bubblewrap not found at {self.bwrap} (apt-get install bubblewrap), "
                               'or set sandbox = "none" in the worker config to run agents unsandboxed')
        for tool in (SETPRIV, PRLIMIT):
            if not os.access(tool, os.X_OK):
                raise SandboxError(f"{tool} not found (apt-get install util-linux)")
        if self.network == "egress" and not os.access(SOCAT, os.X_OK):
            raise SandboxError(f"socat not found at {SOCAT} (apt-get install socat); it bridges the "
                               "egress proxy into the sandbox")
        self.user()
        if not _can_setuid():
            raise SandboxError("the worker cannot start processes as the agent user: run it as root "
                               "or with CAP_SETUID and CAP_SETGID")

    # -- paths ------------------------------------------------------------------------------
    def view(self, workdir: Path, home: Path, inputs: Path | None = None) -> View:
        """The paths the program sees for these host directories."""
        if self.mode == "none":
            return View(str(workdir), str(home), str(inputs) if inputs is not None else None)
        return View(WORKDIR_INSIDE, HOME_INSIDE, INPUTS_INSIDE if inputs is not None else None)

    def _bwrap_argv(self, argv: Sequence[str], workdir: Path, home: Path, tmp: Path, inputs: Path | None,
                    ro_paths: Sequence[Path], info_fd: int, socket: Path | None) -> list[str]:
        args = [self.bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session",
                "--hostname", "intake-sandbox", "--ro-bind", "/usr", "/usr"]
        if self.network != "host":
            args.append("--unshare-net")  # loopback only: no route, no DNS, no UDP or raw sockets out
        for name in _ROOT_LINKS:
            host = Path("/") / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                args += ["--ro-bind", str(host), f"/{name}"]
        args += ["--dir", "/etc"]
        for name in _ETC:
            if self.network != "host" and name in {"resolv.conf", "host.conf"}:
                continue  # no resolver inside: names are the egress proxy's to resolve
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        # /tmp is a directory of the run (on disk, measured), not a tmpfs in the host's memory.
        args += ["--proc", "/proc", "--dev", "/dev", "--bind", str(tmp), TMP_INSIDE,
                 "--bind", str(workdir), WORKDIR_INSIDE, "--bind", str(home), HOME_INSIDE]
        if inputs is not None:
            args += ["--ro-bind", str(inputs), INPUTS_INSIDE]
        for path in ro_paths:
            args += ["--ro-bind", str(path), str(path)]
        if socket is not None:
            args += ["--ro-bind", str(socket), EGRESS_SOCKET_INSIDE]
            argv = ["/bin/sh", "-c", _FORWARDER, "intake-egress", *argv]
        args += ["--chdir", WORKDIR_INSIDE, "--info-fd", str(info_fd), "--", *argv]
        return args

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        workdir: Path,
        home: Path,
        env: Mapping[str, str],
        stdin: bytes | None = None,
        timeout_s: float,
        max_output_bytes: int,
        should_stop: Callable[[], bool] | None = None,
        poll_interval: float = 0.25,
        inputs: Path | None = None,
        ro_paths: Sequence[Path] = (),
        limits: RunLimits | None = None,
    ) -> AgentResult:
        """Run ``argv`` in the sandbox until it exits, times out, hits a limit or
        ``should_stop()`` is true.

        ``env`` is the program's whole environment (``PATH`` is cleaned of relative entries;
        ``HOME`` and ``TMPDIR`` are set to the sandbox's, and the proxy variables for
        ``network = "egress"``). ``stdin`` is written to its standard input. ``should_stop`` is
        called about every ``poll_interval`` seconds. ``inputs`` is a directory of files the
        program may read (mounted read-only), ``ro_paths`` extra read-only paths (mounted at
        the same place). Raises :class:`SandboxError` if the program cannot be started or a
        process of it survives the kill.
        """
        if timeout_s <= 0 or max_output_bytes <= 0 or poll_interval <= 0:
            raise ValueError("timeout_s, max_output_bytes and poll_interval must be positive")
        limits = limits or RunLimits()
        workdir = Path(workdir).resolve(strict=True)
        home = Path(home).resolve(strict=True)
        view = self.view(workdir, home, inputs)
        child_env = {**env, "PATH": safe_path(env.get("PATH")), "HOME": view.home, "TMPDIR": "/tmp"}
        if self.mode == "none":
            child_env["TMPDIR"] = view.home
            return _Run(self, None, list(argv), workdir, child_env, limits).go(
                stdin, timeout_s, max_output_bytes, should_stop, poll_interval)
        self.check()
        user = self.user()
        tmp = _sibling(home, "tmp", 0o700)
        proxy = None
        if self.network == "egress":
            url = f"http://127.0.0.1:{PROXY_PORT}"
            for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy"):
                child_env[name] = url
            child_env["NO_PROXY"] = child_env["no_proxy"] = ""
            proxy = EgressProxy(self.egress, _sibling(home, "egress", 0o711) / "proxy.sock",
                                resolver=self.resolver)
            try:
                proxy.start()
            except OSError as exc:
                raise SandboxError(str(exc)) from None
        try:
            for tree in (workdir, home, tmp):
                chown_tree(tree, user.pw_uid, user.pw_gid)
            result = _Run(self, user, list(argv), workdir, child_env, limits, home=home, tmp=tmp,
                          inputs=inputs, ro_paths=tuple(ro_paths),
                          socket=proxy.socket_path if proxy else None).go(
                stdin, timeout_s, max_output_bytes, should_stop, poll_interval)
        finally:
            if proxy is not None:
                proxy.stop()
        # Reached only once the namespace is empty (on any error the caller throws the
        # directories away unread): take the files back, so nothing the agent started can
        # change them while the worker reads them.
        for tree in (workdir, home, tmp):
            chown_tree(tree, os.getuid(), os.getgid())
        if proxy is not None:
            result = replace(result, egress=proxy.summary())
        return result


def _sibling(home: Path, name: str, mode: int) -> Path:
    """A fresh directory next to ``home`` (in the run directory) for the sandbox's ``name``."""
    path = home.parent / f"{home.name}-{name}"
    path.mkdir(mode=mode)
    os.chmod(path, mode)
    return path


# Runs inside the sandbox, as the agent, before the agent: bridge 127.0.0.1:3128 to the proxy's
# unix socket, wait until it listens (read from the namespace's own /proc/net/tcp, so the wait
# makes no connection the proxy would record), then become the agent.
_FORWARDER = (
    f"{SOCAT} TCP-LISTEN:{PROXY_PORT},bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:{EGRESS_SOCKET_INSIDE}"
    " </dev/null >/dev/null 2>&1 &\n"
    "i=0\n"
    f"until grep -q ':{PROXY_PORT:04X} 00000000:0000 0A' /proc/net/tcp; do\n"
    "  i=$((i+1)); if [ $i -gt 1000 ]; then echo 'intake-sandbox: the egress forwarder did not start' >&2;"
    " exit 125; fi; sleep 0.01\n"
    "done\n"
    'exec "$@"\n'
)



_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux SIGKILL the child when the worker dies (mode "none")."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the worker died before prctl took effect
            os._exit(1)

    return preexec


#: The file in a run directory listing the pid namespaces of the sandboxes the run started.
SANDBOX_RECORD = "sandboxes"


def kill_namespaces(record: Path, user: pwd.struct_passwd | None = None) -> int:
    """SIGKILL every process still in a pid namespace listed in ``record`` (a dead run's):
    returns how many were found. A namespace whose init is gone is empty, so the inodes cannot
    point at anything else while one of its processes lives. A worker that is not root cannot
    see or signal the agent user's processes: given ``user``, a helper running as that user
    does it (:func:`kill_as`)."""
    try:
        inodes = {int(line) for line in record.read_text(encoding="ascii").split() if line.isdigit()}
    except OSError:
        return 0
    if not inodes:
        return 0
    if os.geteuid() != 0 and user is not None:
        return kill_as(user, sorted(inodes))
    killed = 0
    for inode in inodes:
        for pid in _processes_where(_in_namespace(inode)):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
            except PermissionError:
                raise SandboxError(f"cannot kill process {pid} left by a dead run: permission denied "
                                   "(run the worker as root or with CAP_SETUID and CAP_SETGID)") from None
    return killed


# Run as the agent user (setpriv): SIGKILL every process in the given pid namespaces until none is
# left; prints how many it found. The agent user may read its own processes' /proc entries.
_KILLER = """
import os, sys, time
want = {"pid:[%s]" % n for n in sys.argv[1:]}
found = set()
deadline = time.monotonic() + 5
while True:
    left = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/pid") not in want:
                continue
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            if stat[stat.rfind(")") + 2] in "ZX":
                continue
            os.kill(int(name), 9)
            left.append(int(name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone, or another user's (not in a namespace of ours)
    found.update(left)
    if not left:
        break
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.01)
print(len(found))
"""


def kill_as(user: pwd.struct_passwd, inodes: Sequence[int]) -> int:
    """SIGKILL, as ``user``, every process in the pid namespaces ``inodes`` and wait until none
    is left; returns how many there were. Raises :class:`SandboxError` (one line) if that fails."""
    argv = [SETPRIV, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--inh-caps=-all",
            "--ambient-caps=-all", "--", sys.executable, "-I", "-S", "-c", _KILLER, *map(str, inodes)]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=_GONE_S + 5, env={}, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxError(f"cannot kill the sandbox as {user.pw_name}: {type(exc).__name__}") from None
    if done.returncode != 0:
        why = (done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no reason given"])[-1]
        if done.returncode == 3:
            why = "processes of the sandbox survived the kill"
        raise SandboxError(f"cannot kill the sandbox as {user.pw_name}: {why[:200]}")
    return int(done.stdout.strip() or 0)


def _processes_where(match: Callable[[str], bool]) -> list[int]:
    """Live (non-zombie) pids whose /proc entry satisfies ``match(pid_dir)``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].split()[0] in {"Z", "X"}:
            continue
        with contextlib.suppress(OSError):
            if match(entry.path):
                found.append(int(entry.name))
    return found


def _in_namespace(inode: int) -> Callable[[str], bool]:
    want = f"pid:[{inode}]"
    return lambda path: os.readlink(os.path.join(path, "ns", "pid")) == want


def _in_group(pgid: int) -> Callable[[str], bool]:
    def match(path: str) -> bool:
        stat = Path(path, "stat").read_text()
        return stat[stat.rfind(")") + 2 :].split()[2] == str(pgid)
    return match


class _Run:
    """One process run: start, feed stdin, collect output, watch the limits, kill, confirm
    nothing is left."""

    def __init__(self, box: Sandbox, user: pwd.struct_passwd | None, argv: list[str], workdir: Path,
                 env: dict[str, str], limits: RunLimits, *, home: Path | None = None,
                 tmp: Path | None = None, inputs: Path | None = None, ro_paths: tuple[Path, ...] = (),
                 socket: Path | None = None) -> None:
        self.box, self.user, self.argv, self.workdir, self.env = box, user, argv, workdir, env
        self.limits, self.home, self.tmp, self.inputs, self.ro_paths = limits, home, tmp, inputs, ro_paths
        self.socket = socket
        self.ns_inode: int | None = None
        self.init_pidfd: int | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        common = dict(env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT)
        if self.user is None:
            try:
                return subprocess.Popen(self.argv, cwd=self.workdir, start_new_session=True,
                                        preexec_fn=_die_with_parent(os.getpid()), **common)  # type: ignore[call-overload]
            except OSError as exc:
                raise SandboxError(f"could not be started: {self.argv[0]}: {exc.strerror}") from None
        assert self.home is not None and self.tmp is not None
        info_r, info_w = os.pipe()
        try:
            inner = self.box._bwrap_argv(self.argv, self.workdir, self.home, self.tmp, self.inputs,
                                         self.ro_paths, info_w, self.socket)
            # setpriv: become the agent user and drop every inheritable and ambient capability
            # (a worker with ambient capabilities would otherwise hand them to bubblewrap).
            drop = [SETPRIV, f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--clear-groups",
                    "--inh-caps=-all", "--ambient-caps=-all", "--"]
            # prlimit: the agent user's process cap (counted from setpriv's uid change on) and the
            # per-file size cap. Each of the three execs the next: bubblewrap is the worker's own
            # child, so --die-with-parent ties the sandbox to the worker process.
            nproc, fsize = _nproc_limit(self.limits.max_processes), self.limits.max_disk_bytes
            argv = [PRLIMIT, f"--nproc={nproc}:{nproc}", f"--fsize={fsize}:{fsize}", "--", *drop, *inner]
            try:
                proc = subprocess.Popen(  # type: ignore[call-overload]
                    argv, cwd="/", pass_fds=(info_w,), start_new_session=True, **common)
            except OSError as exc:
                raise SandboxError(f"bubblewrap could not be started: {exc.strerror}") from None
            os.close(info_w)
            info_w = -1
            info = self._read_info(info_r, proc)
        finally:
            os.close(info_r)
            if info_w >= 0:
                os.close(info_w)
        if info is None:
            proc.stdin.close()  # type: ignore[union-attr]
            out = proc.stdout.read().decode("utf-8", "replace")  # type: ignore[union-attr]
            proc.wait()
            lines = [ln for ln in out.splitlines() if ln.strip()]
            raise SandboxError(f"the sandbox did not start: {lines[-1] if lines else 'no reason given'}")
        self.ns_inode = int(info["pid-namespace"])
        # On the run's record, so a worker SIGKILLed while bubblewrap was still starting (before
        # its --die-with-parent took hold inside) cannot leave the sandbox running for good: the
        # next start of this worker kills what is still in the namespace (RunRoot.sweep).
        with open(self.home.parent / SANDBOX_RECORD, "a", encoding="ascii") as record:
            record.write(f"{self.ns_inode}\n")
        child = int(info["child-pid"])
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(child)
            # The pid could in theory have been reused already: it is ours only if its parent is
            # bubblewrap (read from /proc/PID/stat, which needs no permission over the agent
            # user's processes). Else the namespace's init is gone.
            if _parent(child) == proc.pid:
                self.init_pidfd = pidfd
            else:
                os.close(pidfd)
        return proc

    @staticmethod
    def _read_info(fd: int, proc: subprocess.Popen[bytes]) -> dict[str, int] | None:
        data = b""
        deadline = time.monotonic() + _START_S
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(deadline - time.monotonic()):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
                with contextlib.suppress(ValueError):
                    parsed = json.loads(data)
                    if isinstance(parsed, dict) and "child-pid" in parsed:
                        return parsed
        if proc.poll() is None and not data:
            proc.kill()
        return None

    def _kill(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill everything the run started and return once nothing of it is left."""
        if self.user is None:
            _kill_group(proc.pid, self.box.term_grace_s)
            return
        assert self.ns_inode is not None
        # SIGKILL to the namespace's init makes the kernel kill every process in it. A root
        # worker signals it directly; a worker with only CAP_SETUID/CAP_SETGID may not signal
        # another user's process, so a helper that becomes the agent user does it.
        try:
            if self.init_pidfd is not None:
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            kill_as(self.user, [self.ns_inode])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            proc.kill()  # bubblewrap itself (the agent user's: a non-root worker relies on kill_as)
        if self.init_pidfd is not None:
            # Readable once the namespace's init has exited, which the kernel lets happen only
            # after every other process of the namespace is gone.
            with selectors.DefaultSelector() as sel:
                sel.register(self.init_pidfd, selectors.EVENT_READ)
                empty = bool(sel.select(_GONE_S))
            os.close(self.init_pidfd)
            self.init_pidfd = None
            if not empty:
                raise SandboxError("processes of the sandbox survived the kill")
            return
        if os.geteuid() != 0:
            kill_as(self.user, [self.ns_inode])  # it waits until the namespace is empty
            return
        deadline = time.monotonic() + _GONE_S
        while _processes_where(_in_namespace(self.ns_inode)):
            if time.monotonic() > deadline:
                raise SandboxError("processes of the sandbox survived the kill")
            time.sleep(0.01)

    def _over_limit(self) -> tuple[str, str] | None:
        """The limit the running sandbox has reached, if any (``(limit, reason)``)."""
        if self.user is None:
            return None
        roots = (self.workdir, self.home, self.tmp)
        used = _disk_usage(roots)  # type: ignore[arg-type]
        if used is None and os.geteuid() != 0:
            # A worker that is not root cannot read the agent's private directories (a cache
            # made 0700): measure them as the agent user.
            used = disk_usage_as(self.user, roots)  # type: ignore[arg-type]
        if used is None:
            return "disk", "the agent made part of its files unreadable to the worker's disk bound"
        if used >= self.limits.max_disk_bytes:
            return "disk", f"the run wrote {used} bytes, reaching limits.max_disk_bytes ({self.limits.max_disk_bytes})"
        count = _processes_of(self.user.pw_uid)
        if count >= self.limits.max_processes:
            return "processes", (f"the agent user ran {count} processes, reaching limits.max_processes "
                                 f"({self.limits.max_processes})")
        return None

    def go(self, stdin: bytes | None, timeout_s: float, cap: int,
           should_stop: Callable[[], bool] | None, poll_interval: float) -> AgentResult:
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        tail = _Tail(cap)
        pending = memoryview(stdin or b"")
        out_fd, in_fd = proc.stdout.fileno(), proc.stdin.fileno()
        os.set_blocking(in_fd, False)
        selector = selectors.DefaultSelector()
        selector.register(out_fd, selectors.EVENT_READ)
        # A pidfd becomes readable when the process exits: the exit is seen at once.
        pidfd = os.pidfd_open(proc.pid)
        selector.register(pidfd, selectors.EVENT_READ)
        if pending:
            selector.register(in_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        timed_out = stopped = False
        limit: tuple[str, str] | None = None
        deadline = time.monotonic() + timeout_s
        next_check = 0.0
        try:
            while not _exited(proc):
                now = time.monotonic()
                if now >= deadline:
                    timed_out = True
                    break
                if now >= next_check:
                    next_check = now + poll_interval
                    if should_stop is not None and should_stop():
                        stopped = True
                        break
                    limit = self._over_limit()
                    if limit is not None:
                        break
                for key, _ in selector.select(min(poll_interval, deadline - now)):
                    if key.fd == pidfd:
                        selector.unregister(pidfd)
                    elif key.fd == out_fd:
                        chunk = os.read(out_fd, _CHUNK)
                        if chunk:
                            tail.feed(chunk)
                        else:
                            selector.unregister(out_fd)
                    else:
                        pending = _feed_stdin(proc, selector, pending)
                if tail.total > cap:
                    limit = ("output", f"the output passed limits.max_output_bytes ({cap})")
                    break
        finally:
            # Also on a normal exit: helpers the program left running must not outlive it.
            self._kill(proc)
            proc.wait()
            if not proc.stdin.closed:
                if in_fd in selector.get_map():
                    selector.unregister(in_fd)
                proc.stdin.close()
            if pidfd in selector.get_map():
                selector.unregister(pidfd)
            os.close(pidfd)
            _drain(selector, out_fd, tail)
            selector.close()
            proc.stdout.close()
        if limit is None and not (timed_out or stopped):
            # A file cut at RLIMIT_FSIZE, or the last writes before the exit.
            limit = self._over_limit() if self.user is not None else None
            if limit is not None and limit[0] == "processes":
                limit = None  # counted after the kill: not this run's
            if limit is None and proc.returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):
                limit = ("disk", f"a file reached limits.max_disk_bytes ({self.limits.max_disk_bytes})")
        if limit is None and tail.total > cap:
            limit = ("output", f"the output passed limits.max_output_bytes ({cap})")
        cut = timed_out or stopped or limit is not None
        return AgentResult(
            exit_code=None if cut else proc.returncode,
            timed_out=timed_out,
            stopped=stopped,
            output_tail=tail.text(),
            output_truncated=tail.total > cap,
            limit=limit[0] if limit else None,
            limit_reason=limit[1] if limit else None,
        )


def _parent(pid: int) -> int | None:
    """``pid``'s parent, from the world-readable /proc/PID/stat (None if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def _nproc_limit(wanted: int) -> int:
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


def _disk_usage(roots):  # type: ignore[no-untyped-def]  # self-contained: also run as a script (_DU)
    """Bytes allocated under ``roots`` (not following links), or None if a directory could not
    be read (the agent can hide a directory from the worker by taking its permissions away)."""
    import os

    total = 0
    stack = [str(r) for r in roots]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as entries:
                for entry in entries:
                    info = entry.stat(follow_symlinks=False)
                    total += info.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return total


#: The same walk as a script, for a helper running as the agent user (:func:`disk_usage_as`).
_DU = inspect.getsource(_disk_usage) + (
    "import sys\nused = _disk_usage(sys.argv[1:])\nsys.exit(3) if used is None else print(used)\n")


def disk_usage_as(user: pwd.struct_passwd, roots: Sequence[Path]) -> int | None:
    """:func:`_disk_usage` measured by a helper running as ``user`` (None if it cannot)."""
    argv = [SETPRIV, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--inh-caps=-all",
            "--ambient-caps=-all", "--", sys.executable, "-I", "-S", "-c", _DU, *map(str, roots)]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=30, env={}, cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        return None
    return int(done.stdout) if done.returncode == 0 and done.stdout.strip().isdigit() else None


def _processes_of(uid: int) -> int:
    """How many live processes have ``uid`` as their real uid (/proc/PID/status is readable by
    everyone)."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/status", encoding="ascii", errors="replace") as handle:
                for line in handle:
                    if line.startswith("Uid:"):
                        count += line.split()[1] == str(uid)
                        break
        except OSError:
            continue
    return count


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child has exited, *without* reaping it: an unreaped child keeps its pid, so
    its process group id cannot be reused by an unrelated process while we still signal it."""
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None and info.si_pid == proc.pid


def _kill_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the whole group, give it ``grace_s`` to go, then SIGKILL what is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _processes_where(_in_group(pgid)):
        time.sleep(0.02)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + max(grace_s, 1.0)
    while time.monotonic() < deadline and _processes_where(_in_group(pgid)):
        time.sleep(0.01)


def _feed_stdin(proc: subprocess.Popen[bytes], selector: selectors.BaseSelector,
                pending: memoryview) -> memoryview:
    assert proc.stdin is not None
    try:
        written = os.write(proc.stdin.fileno(), pending[:_CHUNK])
        pending = pending[written:]
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        pending = pending[:0]  # the program closed stdin; it can read the prompt file instead
    if not pending:
        selector.unregister(proc.stdin.fileno())
        proc.stdin.close()
    return pending


def _drain(selector: selectors.BaseSelector, out_fd: int, tail: _Tail) -> None:
    # Bounded: in mode "none" a process that escaped the group (setsid) could hold the pipe.
    deadline = time.monotonic() + _DRAIN_S
    while out_fd in selector.get_map() and time.monotonic() < deadline:
        if selector.select(deadline - time.monotonic()):
            chunk = os.read(out_fd, _CHUNK)
            if not chunk:
                selector.unregister(out_fd)
            else:
                tail.feed(chunk)

