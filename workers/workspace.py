"""A git workspace for one agent run: clone, branch, commit, diff and push, with real git.

Security notes (DESIGN.md boundary 7):

* git always runs from an argv list with a minimal environment (:func:`run_git`): no user or
  system git config, no terminal prompts, a fixed identity.
* A repository credential never appears in a URL, an argv, an environment or a file. For each
  remote command git gets a fresh ``GIT_ASKPASS`` script in a private 0700 directory, and the
  script reads the token from a pipe whose read end only that git process tree inherits
  (``pass_fds``): nothing another process could read, and nothing left once the command ends.
* The agent edits the *work tree only*. The worker's git directory lives in a separate private
  directory; the ``.git`` the agent finds in its work tree (:meth:`Workspace.give_agent_git`) is
  a throwaway copy (the base commit, no remote, no hooks, no credentials) that the worker never
  reads. The worker's git directory's config, hooks and info files are fingerprinted after the
  clone and checked before every later git command, as a second line for ``sandbox = "none"``
  where the agent runs as the worker's own user.
* What gets pushed is decided by the worker, not by refs on disk: :meth:`Workspace.commit_all`
  writes one commit whose parent is the commit the worker last made (starting at the base), from
  a fresh index, and :meth:`Workspace.push` pushes that exact sha to the exact URL that was
  cloned, never forced. History the agent might have written into the object store is neither
  committed on top of nor pushed.
* What the gates see is not read back through git after the agent ran (workers/snapshot.py):
  the base tree is recorded in memory before the agent starts and its blobs are re-hashed on
  every read; the result is read from the work tree's files by the worker, and committed from
  exactly that reading (blobs written with ``--no-filters``, a fresh index built from the
  recorded entries, never ``read-tree``/``add`` over objects the agent could have rewritten).

Real isolation of a hostile agent is :mod:`workers.sandbox`'s job; these measures also keep a
same-uid agent (``sandbox = "none"``) from turning the worker's own git commands against it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from intake.core.errors import IntakeError
from intake.protocol.envelope import NOTES_REF

from .deps.files import is_dependency_file
from .snapshot import (
    MODE_EXEC,
    MODE_FILE,
    MODE_GITLINK,
    MODE_LINK,
    ChangedFile,
    Scan,
    Tree,
    diff,
    parse_ls_tree,
    scan_work_tree,
    verified_blob,
)

NOTE_PUSH_TRIES = 3
#: Who writes the provenance note (the worker, never the agent).
WORKER_IDENTITY = {"GIT_AUTHOR_NAME": "intake-worker", "GIT_AUTHOR_EMAIL": "worker@intake.invalid",
                   "GIT_COMMITTER_NAME": "intake-worker", "GIT_COMMITTER_EMAIL": "worker@intake.invalid"}
AGENT_NAME = "intake-agent"
AGENT_EMAIL = "agent@intake.invalid"
TOKEN_FD_ENV = "INTAKE_GIT_TOKEN_FD"
USERNAME_ENV = "INTAKE_GIT_USERNAME"

# Options given to every git invocation. They override anything a repository config could say
# (command-line -c wins), as a second line behind the config fingerprint.
_HARDENING = (
    "-c", "core.hooksPath=/dev/null",  # no hooks run, ever (commit, push, checkout)
    "-c", "core.fsmonitor=false",  # fsmonitor is a command git would execute
    "-c", "credential.helper=",  # an empty value clears helpers: only our askpass answers
    "-c", "protocol.ext.allow=never",  # ext:: URLs run arbitrary commands
    "-c", "submodule.recurse=false",
)

# Files in the git directory that decide what git executes or where it talks to.
_PROTECTED = ("config", "hooks", "info", "objects/info/alternates", "commondir", "worktrees")

_ASKPASS_SCRIPT = f"""#!/bin/sh
# Git asks for a user name and then for a password; the token only ever travels through a pipe
# this git process inherited, never in argv, a URL, an environment or this file.
case "$1" in
  Username*) printf '%s\\n' "${USERNAME_ENV}" ;;
  *) exec cat "/dev/fd/${TOKEN_FD_ENV}" ;;
esac
"""

_HEX_SHA = re.compile(r"^[0-9a-f]{7,64}$")
_FULL_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_QUARANTINE_REF = re.compile(r"refs/intake/T-[0-9a-f]{12}")
#: How a review's diff is taken (as a bare repository: the agent's ``.gitattributes`` cannot
#: hide lines with ``-diff`` or run a textconv).
_REVIEW_DIFF = ("--bare", "diff", "--no-color", "--no-ext-diff", "--no-textconv", "--no-renames")
#: Where a delivery keeps the remote's provenance notes ref while it adds its own note.
_FETCHED_NOTES = "refs/intake-fetched/notes"
_USERINFO = re.compile(r"://[^/@\s]*@")


class GitError(IntakeError):
    """A git command failed; the message is one line and never contains a credential."""


#: The largest diff a review carries (bytes of UTF-8); a result report must stay under
#: MAX_REPORT_BYTES, and JSON escaping can triple hostile text.
REVIEW_CAP_BYTES = 48 * 1024


def _scrub(text: str, secret: str | None) -> str:
    """Remove anything credential-shaped from a message: the token and URL user info."""
    if secret is not None and len(secret) >= 4:
        text = text.replace(secret, "***")
    return _USERINFO.sub("://***@", text)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # git forks helpers (remote-https, pack-objects, ssh): kill the whole group, not just git.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _run(
    args: list[str], cwd: Path, env: Mapping[str, str], timeout: float, stdin: bytes | None = None,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run git and return the completed process whatever its exit code."""
    subcommand = args[0] if args else "(none)"
    with tempfile.TemporaryDirectory(prefix="intake-home-") as home:
        full_env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "GIT_AUTHOR_NAME": AGENT_NAME,
            "GIT_AUTHOR_EMAIL": AGENT_EMAIL,
            "GIT_COMMITTER_NAME": AGENT_NAME,
            "GIT_COMMITTER_EMAIL": AGENT_EMAIL,
            "LC_ALL": "C",
            **env,
            # These always win over the caller: no prompts, no user or system config.
            "GIT_TERMINAL_PROMPT": "0",
            # refs/replace would let whoever writes the git dir swap the objects the gates
            # compare (a base blob or commit) without changing any ref the fingerprint sees.
            "GIT_NO_REPLACE_OBJECTS": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "HOME": home,
        }
        try:
            proc = subprocess.Popen(
                ["git", *_HARDENING, *args],
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        except FileNotFoundError as exc:
            raise GitError("git executable not found on PATH") from exc
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            raise GitError(f"git {subcommand} timed out after {timeout:g}s") from None
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_git(
    args: list[str], cwd: Path, env: Mapping[str, str], timeout: float = 120, *,
    stdin: bytes | None = None, pass_fds: tuple[int, ...] = (), secret: str | None = None,
) -> str:
    """Run ``git <args>`` in ``cwd`` and return its stdout (UTF-8, undecodable bytes replaced).

    The environment is ``env`` plus a fixed minimum: ``PATH`` from this process, a fresh empty
    ``HOME`` (so no ``~/.gitconfig``), ``GIT_CONFIG_NOSYSTEM=1``, ``GIT_TERMINAL_PROMPT=0`` and
    the ``intake-agent`` identity. Nothing else of ``os.environ`` reaches git.

    ``pass_fds`` are inherited by git (the askpass pipe); ``secret`` is scrubbed from errors.
    Raises :class:`GitError` naming the subcommand and the last line of stderr on a non-zero
    exit or a timeout (the whole process group is killed then). ``stdin`` is fed to git.
    """
    result = _run(args, cwd, env, timeout, stdin, pass_fds)
    if result.returncode != 0:
        subcommand = args[0] if args else "(none)"
        detail = _last_line(result.stderr.decode("utf-8", "replace"))
        message = f"git {subcommand} failed (exit {result.returncode})"
        raise GitError(_scrub(f"{message}: {detail}" if detail else message, secret))
    return result.stdout.decode("utf-8", "replace")


def _fingerprint(git_dir: Path) -> str:
    """A hash over the git directory files that control what git executes or talks to."""
    digest = hashlib.sha256()
    for name in _PROTECTED:
        root = git_dir / name
        paths = [root] if not root.is_dir() else sorted(root.rglob("*"))
        digest.update(f"{name}\0{root.exists()}\0".encode())
        for path in paths:
            if not path.exists() and not path.is_symlink():
                continue
            info = path.lstat()
            digest.update(f"{path.relative_to(git_dir)}\0{info.st_mode}\0".encode())
            if stat.S_ISREG(info.st_mode):
                digest.update(path.read_bytes())
            elif stat.S_ISLNK(info.st_mode):
                digest.update(os.readlink(path).encode())
    return digest.hexdigest()


def _check_ref_arg(value: str, what: str) -> None:
    # Anything starting with "-" would be read by git as an option.
    if not value or value.startswith("-") or any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise GitError(f"invalid {what}: {value!r}")


def _is_local(url: str) -> bool:
    return "://" not in url and not re.match(r"^[\w.-]+@[\w.-]+:", url)


class Workspace:
    """A private clone of one repository for one task run. Use :meth:`clone` to make one.

    ``path`` is the work tree handed to the agent. ``base_sha`` is the commit ``base_ref``
    resolved to; ``head`` is the commit the worker last made (``base_sha`` until then).
    ``base`` is the base commit's tree, recorded when the clone was made (before any agent).
    """

    def __init__(
        self,
        *,
        path: Path,
        private_dir: Path,
        url: str,
        credential: str | None,
        username: str,
        ca_file: Path | None = None,
    ) -> None:
        self.path = path
        self.url = url
        self.base_sha = ""
        self.head = ""
        self.branch: str | None = None
        self._private = private_dir
        self._git_dir = private_dir / "git"
        self._credential = credential
        self._username = username
        self._ca_file = ca_file
        self._fingerprint: str | None = None
        self._commits = 0
        self.object_format = "sha1"
        self.base: Tree = {}
        self._head_tree: Tree = {}
        self._scan = Scan()
        self._base_manifests: dict[str, bytes] = {}

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def clone(
        cls,
        url: str,
        base_ref: str,
        credential: str | None,
        *,
        username: str = "x-access-token",
        ca_file: Path | None = None,
        timeout: float = 300,
        root: Path | None = None,
    ) -> Workspace:
        """Clone ``url`` and check out ``base_ref`` (a branch, a tag or a commit sha).

        ``credential`` is a token for an ``https://`` URL (sent as the password, with
        ``username``), or ``None`` for repositories that need none (local paths, ``file://``).
        Credentials embedded in the URL are refused, so that they never reach argv or logs.
        ``ca_file`` is a PEM bundle to trust for https (a self-hosted forge's private CA).
        ``root`` is the directory (a run's, see :mod:`workers.rundirs`) to make the work tree
        and the private git directory in.
        """
        _check_ref_arg(base_ref, "base ref")
        ws = cls._empty(url, credential, username=username, ca_file=ca_file, root=root)
        try:
            ws._clone(base_ref, timeout)
        except BaseException:
            ws.cleanup()
            raise
        return ws

    @classmethod
    def for_delivery(
        cls,
        url: str,
        credential: str | None,
        *,
        object_format: str = "sha1",
        username: str = "x-access-token",
        ca_file: Path | None = None,
        root: Path | None = None,
    ) -> Workspace:
        """An empty private git directory for a delivery (:meth:`deliver`), with no clone and
        no checkout: a delivery runs no agent and needs only the quarantined commit, which
        :meth:`deliver` fetches (with the provenance notes) in one round trip. The URL and
        credential rules are :meth:`clone`'s."""
        ws = cls._empty(url, credential, username=username, ca_file=ca_file, root=root)
        try:
            os.chmod(ws._private, 0o700)
            run_git(["init", "--quiet", "--bare", "--template=", f"--object-format={object_format}",
                     str(ws._git_dir)], cwd=ws._private, env={})
            ws.object_format = object_format
            ws._fingerprint = _fingerprint(ws._git_dir)
        except BaseException:
            ws.cleanup()
            raise
        return ws

    @classmethod
    def _empty(cls, url: str, credential: str | None, *, username: str, ca_file: Path | None,
               root: Path | None) -> Workspace:
        """A workspace with its directories made and nothing in them, after checking ``url``."""
        _check_ref_arg(url, "repository URL")
        parts = urlsplit(url) if "://" in url else None
        if parts is not None and (parts.username or parts.password):
            raise GitError("credentials must not be embedded in the repository URL")
        if credential is not None and (parts is None or parts.scheme != "https"):
            raise GitError("a repository credential is only sent over https")
        if _is_local(url):
            url = str(Path(url).resolve())
        path = Path(tempfile.mkdtemp(prefix="intake-ws-", dir=root))
        private = Path(tempfile.mkdtemp(prefix="intake-git-", dir=root))
        return cls(path=path, private_dir=private, url=url, credential=credential,
                   username=username, ca_file=ca_file)

    def _clone(self, base_ref: str, timeout: float) -> None:
        os.chmod(self._private, 0o700)
        with self._remote() as (env, fds):
            run_git(
                [
                    "clone", "--quiet", "--no-checkout", "--no-hardlinks", "--template=",
                    f"--separate-git-dir={self._git_dir}", "--", self.url, str(self.path),
                ],
                cwd=self._private, env=env, timeout=timeout, pass_fds=fds, secret=self._credential,
            )
        # The work tree must not point at the git directory: git is always told where it is.
        (self.path / ".git").unlink()
        self._fingerprint = _fingerprint(self._git_dir)
        self.base_sha = self._resolve_base(base_ref)
        self.head = self.base_sha
        self._git(["checkout", "--quiet", "--detach", self.base_sha])
        # The trusted record of the base, taken before any agent runs (workers/snapshot.py).
        self.object_format = self._git(["rev-parse", "--show-object-format"]).strip()
        listing = self._git_result(["ls-tree", "-r", "-z", "--full-tree", self.base_sha])
        if listing.returncode != 0:
            raise GitError("git ls-tree of the base commit failed")
        self.base = parse_ls_tree(listing.stdout)
        self._head_tree = dict(self.base)
        # The manifests and lockfiles the dependency gate compares are held in memory from now on, so even
        # a base object rewritten in place (which :meth:`_blob` would refuse) cannot keep the
        # gate from seeing the real "before".
        self._base_manifests = {
            path: self._blob(entry.oid) for path, entry in self.base.items()
            if entry.mode in {MODE_FILE, MODE_EXEC} and is_dependency_file(path)
        }

    def _resolve_base(self, base_ref: str) -> str:
        candidates = [f"refs/remotes/origin/{base_ref}", f"refs/tags/{base_ref}"]
        if _HEX_SHA.match(base_ref):
            candidates.append(base_ref)
        for candidate in candidates:
            result = self._git_result(
                ["rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"]
            )
            if result.returncode == 0:
                return result.stdout.decode().strip()
        raise GitError(f"base ref not found in the repository: {base_ref!r}")

    # -- git plumbing -----------------------------------------------------------------------

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"GIT_DIR": str(self._git_dir), "GIT_WORK_TREE": str(self.path), **(extra or {})}

    @contextlib.contextmanager
    def _remote(self) -> Iterator[tuple[dict[str, str], tuple[int, ...]]]:
        """The environment and inherited fds for a command that talks to the remote.

        With a credential: a fresh askpass script for each remote command (clone, push), in a
        new private directory, and a pipe holding the token whose read end only git inherits.
        """
        env = {"GIT_SSL_CAINFO": str(self._ca_file)} if self._ca_file is not None else {}
        if self._credential is None:
            yield env, ()
            return
        fresh = Path(tempfile.mkdtemp(prefix="askpass-", dir=self._private))
        askpass = fresh / "askpass"
        fd = os.open(askpass, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "w") as handle:
            handle.write(_ASKPASS_SCRIPT)
        read_end, write_end = os.pipe()
        try:
            data = (self._credential + "\n").encode()
            if len(data) > 4096:  # well under any pipe buffer: the write never blocks
                raise GitError("the repository credential is too long")
            os.write(write_end, data)
            os.close(write_end)
            write_end = -1
            yield {**env, "GIT_ASKPASS": str(askpass), TOKEN_FD_ENV: str(read_end),
                   USERNAME_ENV: self._username}, (read_end,)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
            shutil.rmtree(fresh, ignore_errors=True)

    def _verify_git_dir(self) -> None:
        if self._fingerprint is not None and _fingerprint(self._git_dir) != self._fingerprint:
            raise GitError(
                "the workspace git directory was modified outside the worker; refusing to continue"
            )

    def _git(
        self, args: list[str], extra_env: Mapping[str, str] | None = None, timeout: float = 120,
        stdin: bytes | None = None,
    ) -> str:
        self._verify_git_dir()
        return run_git(args, cwd=self.path, env=self._env(extra_env), timeout=timeout, stdin=stdin,
                       secret=self._credential)

    def _git_result(
        self, args: list[str], stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        self._verify_git_dir()
        return _run(args, cwd=self.path, env=self._env(), timeout=120, stdin=stdin)

    def _blob(self, oid: str) -> bytes:
        """A blob's bytes from the worker's object store, verified against ``oid``."""
        _check_ref_arg(oid, "object id")
        result = self._git_result(["cat-file", "blob", oid])
        if result.returncode != 0:
            raise GitError(f"git cat-file failed for object {oid}")
        return verified_blob(result.stdout, oid, self.object_format)

    def _ignored(self, paths: list[str]) -> set[str]:
        """Which of ``paths`` the work tree's ignore rules exclude (as ``git add`` would)."""
        # --no-index: the index file is not the worker's to trust after the agent ran.
        result = self._git_result(["check-ignore", "--no-index", "-z", "--stdin"],
                                  b"\0".join(os.fsencode(p) for p in paths) + b"\0")
        if result.returncode not in {0, 1}:  # 1: nothing is ignored
            raise GitError("git check-ignore failed")
        return {os.fsdecode(p) for p in result.stdout.split(b"\0") if p}

    # -- the worker's operations ------------------------------------------------------------

    def create_branch(self, name: str) -> None:
        """Create branch ``name`` at :attr:`head`; later commits go on it. It must be new."""
        _check_ref_arg(name, "branch name")
        if "@{" in name or name in {"@", "HEAD"}:
            raise GitError(f"invalid branch name: {name!r}")
        try:
            checked = self._git(["check-ref-format", "--branch", name]).strip()
        except GitError:
            raise GitError(f"invalid branch name: {name!r}") from None
        if checked != name:
            raise GitError(f"invalid branch name: {name!r}")
        # An all-zero old value makes update-ref refuse to overwrite an existing branch.
        self._git(["update-ref", f"refs/heads/{name}", self.head, "0" * len(self.head)])
        self._git(["symbolic-ref", "HEAD", f"refs/heads/{name}"])
        self.branch = name

    def commit_all(self, message: str) -> str | None:
        """Commit the whole work tree (additions, changes, deletions) on top of :attr:`head`.

        Returns the new commit sha, or ``None`` when the tree is unchanged. The work tree is
        read by the worker (:func:`~workers.snapshot.scan_work_tree`) and exactly that reading
        is committed: new blobs are written from the bytes read and verified, the index is
        built from scratch from the recorded entries, and the parent is :attr:`head`. Nothing
        the agent did to the index, HEAD, refs or objects ends up in the commit or the gates.
        Embedded repositories, special and oversized files are left out and reported by
        :meth:`special_entries`.
        """
        self._verify_git_dir()
        scan = scan_work_tree(self.path, self.base, self.object_format, self._ignored)
        self._scan = scan
        if scan.tree == self._head_tree:
            return None
        for path, data in scan.contents.items():
            oid = scan.tree[path].oid
            written = self._git(["hash-object", "-w", "--no-filters", "--stdin"], stdin=data).strip()
            if written != oid:
                raise GitError(f"git stored {path!r} under an unexpected id")
            # git keeps an object it already has, so one the agent planted under this id
            # survives the write: read it back (verified), or the push would carry it.
            self._blob(oid)
        self._commits += 1
        index = {"GIT_INDEX_FILE": str(self._private / f"index-{self._commits}")}
        records = b"".join(
            f"{entry.mode} {entry.oid}\t".encode() + os.fsencode(path) + b"\0"
            for path, entry in sorted(scan.tree.items())
        )
        try:
            self._git(["update-index", "--add", "-z", "--index-info"], index, stdin=records)
            tree = self._git(["write-tree"], index).strip()
        finally:
            Path(index["GIT_INDEX_FILE"]).unlink(missing_ok=True)
        sha = self._git(["commit-tree", tree, "-p", self.head, "-m", message]).strip()
        ref = f"refs/heads/{self.branch}" if self.branch else "HEAD"
        self._git(["update-ref", "--no-deref", ref, sha, self.head])
        self.head = sha
        self._head_tree = scan.tree
        return sha

    def changed_files(self) -> list[ChangedFile]:
        """Paths that differ between the recorded base and :attr:`head` (exact renames paired),
        from the worker's own records, not from git's view of the object store."""
        return diff(self.base, self._head_tree)

    def special_entries(self) -> list[str]:
        """Reasons for symlinks and embedded repositories among the changes, and for files the
        last :meth:`commit_all` could not commit: a link can expose a blocked path
        (``docs/keys -> ../payments/keys``) or anything on the machine, and none of these is a
        change an agent needs to make."""
        reasons = []
        for change in self.changed_files():
            mode = self._head_tree[change.path].mode if change.status != "D" else ""
            if mode == MODE_LINK:
                reasons.append(f"symlink not allowed: {change.path}")
            elif mode == MODE_GITLINK:
                reasons.append(f"embedded repository (gitlink) not allowed: {change.path}")
        return reasons + self._scan.refused

    def read_base(self, path: str) -> str | None:
        """The text of regular file ``path`` in the recorded base, or ``None`` if absent (or a
        directory, link or submodule). Manifests come from memory (read at clone time); other
        files are read by their recorded id and re-hashed, so a tampered object raises
        :class:`~workers.snapshot.SnapshotError`."""
        entry = self.base.get(path)
        if entry is None or entry.mode not in {MODE_FILE, MODE_EXEC}:
            return None
        data = self._base_manifests.get(path)
        return (data if data is not None else self._blob(entry.oid)).decode("utf-8", "replace")

    def read_head(self, path: str) -> str | None:
        """The text of regular file ``path`` as the worker read it for :attr:`head`, or ``None``."""
        entry = self._head_tree.get(path)
        if entry is None or entry.mode not in {MODE_FILE, MODE_EXEC}:
            return None
        data = self._scan.contents.get(path)
        return (data if data is not None else self._blob(entry.oid)).decode("utf-8", "replace")

    def push(self, branch: str) -> str:
        """Push :attr:`head` to ``refs/heads/<branch>`` on the cloned URL; return the sha.

        Only the branch made by :meth:`create_branch` can be pushed, and never with force: an
        existing remote branch that is not an ancestor makes git refuse.
        """
        if self.branch is None or branch != self.branch:
            raise GitError(f"refusing to push {branch!r}: only the task branch may be pushed")
        if self.head == self.base_sha:
            raise GitError(f"refusing to push {branch!r}: it has no commits")
        self._verify_git_dir()
        with self._remote() as (env, fds):
            run_git(
                ["push", "--quiet", "--no-verify", "--", self.url, f"{self.head}:refs/heads/{branch}"],
                cwd=self.path, env=self._env(env), timeout=300, pass_fds=fds, secret=self._credential,
            )
        return self.head

    def quarantine(self, ref: str) -> str:
        """Push :attr:`head` to the non-branch ref ``ref`` (``refs/intake/<task id>``); return
        the sha. Forge CI does not run on such refs, so nobody's pipeline (with its secrets)
        runs the agent's code before a human let it become a branch. A later attempt of the
        same task replaces the ref (forced): the broker binds delivery to one sha anyway."""
        if not ref.startswith("refs/intake/") or not _QUARANTINE_REF.fullmatch(ref):
            raise GitError(f"refusing to push {ref!r}: not a quarantine ref")
        if self.head == self.base_sha:
            raise GitError(f"refusing to push {ref!r}: it has no commits")
        self._verify_git_dir()
        with self._remote() as (env, fds):
            run_git(
                ["push", "--quiet", "--no-verify", "--", self.url, f"+{self.head}:{ref}"],
                cwd=self.path, env=self._env(env), timeout=300, pass_fds=fds, secret=self._credential,
            )
        return self.head

    def numstat(self) -> tuple[int, int]:
        """(lines added, lines removed) between the base and :attr:`head`, from the worker's
        own objects (binary files count as nothing)."""
        self._verify_git_dir()
        # As a bare repository: with a work tree git reads .gitattributes from the agent's
        # files (even one an ignore rule kept out of the commit), and "* -diff" there would
        # make every file count as binary, i.e. as nothing, on the result card.
        out = run_git(["--bare", "diff", "--numstat", "--no-renames", "-z", self.base_sha, self.head],
                      cwd=self._private, env={"GIT_DIR": str(self._git_dir)})
        added = removed = 0
        for record in out.split("\0"):
            parts = record.split("\t")
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
                added, removed = added + int(parts[0]), removed + int(parts[1])
        return added, removed

    def review(self, cap: int = REVIEW_CAP_BYTES, base: str | None = None) -> dict[str, Any]:
        """The result as an approver reviews it: the unified diff of :attr:`head` against the
        base, from the worker's own objects (as a bare repository, like :meth:`numstat`, so the
        agent's ``.gitattributes`` cannot hide lines with ``-diff`` or run a textconv), with the
        ``--stat`` summary and the binary files named. Bounded: a diff over ``cap`` bytes is cut
        at a line end and the review says so (``truncated``, ``bytes``); the stat still covers
        everything. ``sha256`` is over exactly the ``diff`` text returned (what is shown), and
        is what a result approval binds to. ``base`` (default :attr:`base_sha`) is the commit the
        diff is taken from: a delivery recomputes the run's review from the run's base."""
        base = base or self.base_sha
        diff, truncated, size = self._review_diff(base, cap)
        bare = {"GIT_DIR": str(self._git_dir)}
        summary = run_git([*_REVIEW_DIFF, "--stat=120,100", base, self.head], cwd=self._private, env=bare)
        numstat = run_git([*_REVIEW_DIFF, "--numstat", "-z", base, self.head], cwd=self._private, env=bare)
        binary = sorted(r.split("\t", 2)[2] for r in numstat.split("\0")
                        if r.startswith("-\t-\t") and r.count("\t") >= 2)[:200]
        return {"diff": diff, "sha256": hashlib.sha256(diff.encode()).hexdigest(), "truncated": truncated,
                "bytes": size, "stat": summary[-8000:], "binary": binary}

    def _review_diff(self, base: str, cap: int = REVIEW_CAP_BYTES) -> tuple[str, bool, int]:
        """(the review's diff text, whether it was cut, the full diff's size in bytes): the part
        of :meth:`review` that its ``sha256`` is over, and all a delivery's check needs."""
        self._verify_git_dir()
        bare = {"GIT_DIR": str(self._git_dir)}
        full = run_git([*_REVIEW_DIFF, "--full-index", base, self.head], cwd=self._private, env=bare)
        raw = full.encode()
        diff, truncated, limit = full, False, cap
        # Bound by the encoded size too: control characters escape to six bytes in JSON.
        while len(diff.encode()) > limit or len(json.dumps(diff)) > 2 * REVIEW_CAP_BYTES:
            if truncated:
                limit //= 2
            cut = raw[:limit]
            cut = cut[:cut.rfind(b"\n") + 1] if b"\n" in cut else cut
            diff, truncated = cut.decode("utf-8", "ignore"), True
        if truncated:
            diff += (f"\n[review truncated: the diff is {len(raw)} bytes; only the first {len(diff.encode())} are "
                     "shown. The stat covers every file.]\n")
        return diff, truncated, len(raw)

    def tree_of(self, sha: str) -> str:
        """The tree id of commit ``sha`` in the worker's own objects."""
        _check_ref_arg(sha, "commit")
        return self._git(["rev-parse", "--verify", "--quiet", f"{sha}^{{tree}}"]).strip()

    def deliver(self, ref: str, sha: str, branch: str, note: str | None = None,
                reviewed: tuple[str, str] | None = None, base_ref: str | None = None) -> str:
        """Fetch the quarantined commit from ``ref`` on the remote, check it is exactly ``sha``
        (the one the approvers accepted), and push it to ``refs/heads/<branch>`` (never forced:
        an existing branch elsewhere makes git refuse). With ``note`` (the broker's signed
        provenance) the note goes on ``refs/notes/intake`` for ``sha`` and is pushed with the
        branch in one atomic push; the remote's notes come in the same fetch as the commit.
        Returns the sha. Works on a clone and on :meth:`for_delivery`'s empty directory.

        With ``reviewed`` = (base, diff SHA-256), the diff the approvers were shown is checked
        to be this commit's (see :meth:`_check_reviewed`) before anything is pushed; an empty
        directory then fetches the remote's branches and tags too (as a clone would) and
        resolves ``base_ref``, the base branch that check needs."""
        if not _QUARANTINE_REF.fullmatch(ref) or not _FULL_SHA.fullmatch(sha):
            raise GitError("refusing to deliver: not a quarantine ref and a full commit sha")
        if reviewed is not None and not (_FULL_SHA.fullmatch(reviewed[0]) and _SHA256.fullmatch(reviewed[1])):
            raise GitError("refusing to deliver: the reviewed diff is not a base commit and a sha256")
        specs = [f"+{ref}:refs/intake-fetched/head"]
        if note is not None:  # (a fresh workspace holds no notes refs of its own yet)
            specs.append(f"+{NOTES_REF}*:{_FETCHED_NOTES}*")  # a glob: no error when there are none
        resolve = reviewed is not None and not self.base_sha
        if resolve:
            if base_ref is None:
                raise GitError("refusing to deliver: no base branch to check the reviewed diff against")
            _check_ref_arg(base_ref, "base ref")
            specs += ["+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"]
        self._fetch(specs)
        if resolve and base_ref is not None:
            self.base_sha = self._resolve_base(base_ref)
        fetched = self._git(["rev-parse", "--verify", "--quiet", "refs/intake-fetched/head^{commit}"]).strip()
        if fetched != sha:
            raise GitError(f"the quarantined commit is {fetched[:12] or 'missing'}, not the accepted {sha[:12]}")
        self.head = sha
        if reviewed is not None:
            self._check_reviewed(*reviewed)
        self.create_branch(branch)  # at the accepted commit; refuses an existing branch
        if note is None:
            return self.push(branch)
        for attempt in range(NOTE_PUSH_TRIES):
            try:
                return self._push_with_note(branch, note, fetch=attempt > 0)
            except GitError:
                if attempt == NOTE_PUSH_TRIES - 1:
                    raise
                # another delivery moved the notes ref meanwhile: fetch it again
        raise AssertionError("unreachable")

    def _check_reviewed(self, base: str, diff_sha256: str) -> None:
        """Refuse unless the diff from ``base`` to :attr:`head`, recomputed here from the
        fetched objects exactly as the run worker computed its review, hashes to
        ``diff_sha256``, and ``base`` is real history of the base branch (an ancestor of both
        the branch's tip and the commit). The diff and the commit both come from the run's
        worker; without this a worker could show approvers one diff and quarantine another
        commit, or pick a base of its own making so that a small diff hides a large change."""
        for descendant, what in ((self.base_sha, "the base branch"), (self.head, "the commit")):
            found = self._git_result(["merge-base", "--is-ancestor", base, descendant])
            if found.returncode != 0:
                raise GitError(f"refusing to deliver: the reviewed diff's base {base[:12]} is not in the history "
                               f"of {what}")
        recomputed = hashlib.sha256(self._review_diff(base)[0].encode()).hexdigest()
        if not hmac.compare_digest(recomputed, diff_sha256):
            raise GitError(f"refusing to deliver: commit {self.head[:12]}'s diff (sha256 {recomputed[:12]}) is not "
                           f"the reviewed one (sha256 {diff_sha256[:12]})")

    def _fetch(self, specs: list[str]) -> None:
        with self._remote() as (env, fds):
            # No FETCH_HEAD and no background maintenance: nothing reads them in a directory
            # removed right after the push, and each is another process in the delivery hop.
            run_git(["fetch", "--quiet", "--no-tags", "--no-write-fetch-head", "--no-auto-maintenance",
                     "--", self.url, *specs],
                    cwd=self.path, env=self._env(env), timeout=300, pass_fds=fds, secret=self._credential)
        self._fingerprint = _fingerprint(self._git_dir)  # the fetch was ours

    def _push_with_note(self, branch: str, note: str, *, fetch: bool) -> str:
        """The remote's notes ref (if any; fetched again when ``fetch``) plus our note for
        :attr:`head`, pushed atomically with the branch; the note is the exact bytes given (a
        blob, no clean-up)."""
        if fetch:
            self._git_result(["update-ref", "-d", _FETCHED_NOTES])  # absent is fine
            self._fetch([f"+{NOTES_REF}*:{_FETCHED_NOTES}*"])
        remote_notes = self._git_result(["rev-parse", "--verify", "--quiet", f"{_FETCHED_NOTES}^{{commit}}"])
        if remote_notes.returncode == 0:
            self._git(["update-ref", NOTES_REF, remote_notes.stdout.decode().strip()])
        elif fetch:
            self._git_result(["update-ref", "-d", NOTES_REF])  # our note of the failed try
        blob = self._git(["hash-object", "-w", "--stdin"], stdin=note.encode()).strip()
        self._git(["notes", f"--ref={NOTES_REF}", "add", "--force", "-C", blob, self.head], WORKER_IDENTITY)
        with self._remote() as (env, fds):
            run_git(
                ["push", "--quiet", "--atomic", "--no-verify", "--", self.url,
                 f"{self.head}:refs/heads/{branch}", f"{NOTES_REF}:{NOTES_REF}"],
                cwd=self.path, env=self._env(env), timeout=300, pass_fds=fds, secret=self._credential,
            )
        return self.head

    def give_agent_git(self) -> None:
        """Put a throwaway ``.git`` of the agent's own into the work tree: a copy of the base
        commit on the task branch, with no remote, no hooks, no credentials and its own config
        (an identity, so git-based agents can commit). The worker never reads it: the change is
        computed from the worker's private git directory, and git never adds a ``.git``."""
        agent_git = self.path / ".git"
        if agent_git.exists() or agent_git.is_symlink():
            raise GitError("the work tree already has a .git")
        self._verify_git_dir()
        run_git(["clone", "--quiet", "--bare", "--no-hardlinks", "--template=", "--",
                 str(self._git_dir), str(agent_git)], cwd=self._private, env={})
        env = {"GIT_DIR": str(agent_git), "GIT_WORK_TREE": str(self.path)}
        run_git(["remote", "remove", "origin"], cwd=self.path, env=env)
        for key, value in (("core.bare", "false"), ("user.name", AGENT_NAME),
                           ("user.email", AGENT_EMAIL)):
            run_git(["config", key, value], cwd=self.path, env=env)
        branch = self.branch or "intake"
        run_git(["update-ref", f"refs/heads/{branch}", self.base_sha], cwd=self.path, env=env)
        run_git(["symbolic-ref", "HEAD", f"refs/heads/{branch}"], cwd=self.path, env=env)
        run_git(["read-tree", self.base_sha], cwd=self.path, env=env)

    def export(self, rev: str, dest: Path) -> None:
        """Write the tree of ``rev`` (``HEAD``: :attr:`head`) into the empty directory ``dest``,
        from the worker's own objects, with no ``.git`` (what a required check runs on)."""
        rev = self.head if rev == "HEAD" else rev
        _check_ref_arg(rev, "revision")
        index = {"GIT_INDEX_FILE": str(self._private / "index-export")}
        try:
            self._git(["read-tree", rev], index)
            self._verify_git_dir()
            run_git(["checkout-index", "--all", "--force"], cwd=dest,
                    env={"GIT_DIR": str(self._git_dir), "GIT_WORK_TREE": str(dest), **index})
        finally:
            Path(index["GIT_INDEX_FILE"]).unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Remove the work tree and the private git directory (safe to call twice)."""
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self._private, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()
