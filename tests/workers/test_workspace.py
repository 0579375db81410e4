"""Workspace and run_git against real git repositories made in a temp dir."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from intake.core.policy import Dependencies
from intake.workers.agents import DemoAgent, build_prompt
from intake.workers.deps.gate import check_dependency_change
from intake.workers.gates import run_gates
from intake.workers.sandbox import Sandbox
from intake.workers.snapshot import SnapshotError, blob_id
from intake.workers.workspace import ChangedFile, GitError, Workspace, run_git


def git(cwd: Path, *args: str) -> str:
    """Plain git for setting up fixtures, independent of the code under test."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(cwd),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Fixture",
        "GIT_AUTHOR_EMAIL": "fixture@example.invalid",
        "GIT_COMMITTER_NAME": "Fixture",
        "GIT_COMMITTER_EMAIL": "fixture@example.invalid",
    }
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class Remote:
    """A bare repository with two commits on main (the first tagged v1)."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "remote.git"
        git(root, "init", "--quiet", "--bare", "--initial-branch=main", str(self.bare))
        scratch = root / "scratch"
        git(root, "clone", "--quiet", str(self.bare), str(scratch))
        git(scratch, "checkout", "--quiet", "-b", "main")
        write(scratch, "README.md", "hello\n")
        write(scratch, "src/app.py", "print('v1')\n")
        write(scratch, "docs/old.md", "old docs\n" * 20)
        write(scratch, "payments/keys/k.pem", "not a real key\n")
        git(scratch, "add", "-A")
        git(scratch, "commit", "--quiet", "-m", "first")
        git(scratch, "tag", "v1")
        self.v1 = git(scratch, "rev-parse", "HEAD")
        write(scratch, "src/app.py", "print('v2')\n")
        git(scratch, "commit", "--quiet", "-am", "second")
        self.main = git(scratch, "rev-parse", "HEAD")
        git(scratch, "push", "--quiet", "origin", "main", "v1")

    def ref(self, name: str) -> str | None:
        result = subprocess.run(
            ["git", "--git-dir", str(self.bare), "show-ref", "--hash", name],
            capture_output=True, text=True,
        )
        return result.stdout.strip() or None


def private_git_dir(tmp_dirs: Path) -> Path:
    """Find the workspace's git directory the way a same-uid agent could."""
    (git_dir,) = [p / "git" for p in tmp_dirs.iterdir() if p.name.startswith("intake-git-")]
    return git_dir


@pytest.fixture
def tmp_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Workspaces make their directories with tempfile; keep them where the test can see them.
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    return Remote(tmp_path)


@pytest.fixture
def ws(remote: Remote, tmp_dirs: Path) -> Iterator[Workspace]:
    with Workspace.clone(str(remote.bare), "main", None) as workspace:
        yield workspace


# -- clone ----------------------------------------------------------------------------------


def test_clone_checks_out_base_and_keeps_git_dir_out_of_the_work_tree(
    remote: Remote, tmp_dirs: Path
) -> None:
    with Workspace.clone(str(remote.bare), "main", None) as ws:
        assert ws.base_sha == ws.head == remote.main
        assert (ws.path / "src/app.py").read_text() == "print('v2')\n"
        assert ws.path.name.startswith("intake-ws-")
        # The agent gets files only: no .git to read or rewrite.
        assert not (ws.path / ".git").exists()
        created = sorted(p.name.split("-")[1] for p in tmp_dirs.iterdir())
        assert created == ["git", "ws"]
    assert list(tmp_dirs.iterdir()) == []


@pytest.mark.parametrize("use_sha", [False, True], ids=["tag", "sha"])
def test_clone_at_tag_or_sha(remote: Remote, tmp_dirs: Path, use_sha: bool) -> None:
    with Workspace.clone(str(remote.bare), remote.v1 if use_sha else "v1", None) as ws:
        assert ws.base_sha == remote.v1
        assert (ws.path / "src/app.py").read_text() == "print('v1')\n"


def test_clone_with_unknown_ref_fails_and_leaves_nothing(remote: Remote, tmp_dirs: Path) -> None:
    with pytest.raises(GitError, match="base ref not found"):
        Workspace.clone(str(remote.bare), "no-such-branch", None)
    assert list(tmp_dirs.iterdir()) == []


@pytest.mark.parametrize("ref", ["--upload-pack=touch /tmp/x", "main two", ""])
def test_clone_refuses_option_like_or_odd_refs(remote: Remote, tmp_dirs: Path, ref: str) -> None:
    with pytest.raises(GitError, match="invalid base ref"):
        Workspace.clone(str(remote.bare), ref, None)


def test_clone_refuses_credentials_in_url_and_credentials_without_https(
    remote: Remote, tmp_dirs: Path
) -> None:
    with pytest.raises(GitError, match="embedded") as excinfo:
        Workspace.clone("https://user:hunter2@example.invalid/r.git", "main", None)
    assert "hunter2" not in str(excinfo.value)
    with pytest.raises(GitError, match="only sent over https"):
        Workspace.clone(str(remote.bare), "main", "tok-123456")
    with pytest.raises(GitError, match="only sent over https"):
        Workspace.clone("http://example.invalid/r.git", "main", "tok-123456")
    assert list(tmp_dirs.iterdir()) == []


# -- commit and diff ------------------------------------------------------------------------


def test_commit_all_and_changed_files(ws: Workspace, remote: Remote, tmp_dirs: Path) -> None:
    ws.create_branch("intake/T-1")
    write(ws.path, "src/app.py", "print('v3')\n")
    write(ws.path, "src/new.py", "x = 1\n")
    (ws.path / "README.md").unlink()
    (ws.path / "docs/old.md").rename(ws.path / "docs/moved.md")

    sha = ws.commit_all("intake: T-1")

    assert sha is not None and ws.head == sha
    assert sorted(ws.changed_files(), key=lambda c: c.path) == [
        ChangedFile("README.md", "D"),
        ChangedFile("docs/moved.md", "R", "docs/old.md"),
        ChangedFile("src/app.py", "M"),
        ChangedFile("src/new.py", "A"),
    ]
    # One commit on top of the base, by the agent identity, on the task branch.
    log = git(remote.bare.parent / "scratch", "--git-dir", str(private_git_dir(tmp_dirs)), "log",
              "--format=%H %P %an <%ae> %s", "-1", "refs/heads/intake/T-1")
    assert log == f"{sha} {remote.main} intake-agent <agent@intake.invalid> intake: T-1"
    assert ws.read_base("src/app.py") == "print('v2')\n"
    assert ws.read_head("src/app.py") == "print('v3')\n"
    assert ws.read_head("docs/moved.md") == "old docs\n" * 20
    assert ws.read_head("README.md") is None
    assert ws.read_base("src/new.py") is None
    assert ws.read_head("src") is None  # a directory is not a file


def test_commit_all_without_changes_returns_none(ws: Workspace) -> None:
    ws.create_branch("intake/T-2")
    assert ws.commit_all("nothing") is None
    assert ws.changed_files() == []
    write(ws.path, "a.txt", "a\n")
    first = ws.commit_all("one")
    assert first is not None
    assert ws.commit_all("again") is None
    assert ws.head == first


def test_second_commit_builds_on_the_first(ws: Workspace) -> None:
    ws.create_branch("intake/T-3")
    write(ws.path, "a.txt", "a\n")
    ws.commit_all("one")
    (ws.path / "a.txt").unlink()
    write(ws.path, "b.txt", "b\n")
    assert ws.commit_all("two") is not None
    # Net change against the base: a.txt never existed there.
    assert ws.changed_files() == [ChangedFile("b.txt", "A")]


def test_reads_know_only_recorded_paths(ws: Workspace) -> None:
    for path in ("../x", "./README.md", "/etc/passwd", "", "src", "README.md/x"):
        assert ws.read_base(path) is None and ws.read_head(path) is None


@pytest.mark.parametrize("name", ["bad..name", "-x", "@{-1}", "a b", "HEAD", "x.lock", "a:b", ""])
def test_create_branch_validates_names(ws: Workspace, name: str) -> None:
    with pytest.raises(GitError, match="invalid branch name"):
        ws.create_branch(name)


def test_create_branch_refuses_an_existing_branch(ws: Workspace) -> None:
    # The clone made a local "main".
    with pytest.raises(GitError, match="update-ref"):
        ws.create_branch("main")


# -- push -----------------------------------------------------------------------------------


def test_push_creates_exactly_the_task_branch(ws: Workspace, remote: Remote) -> None:
    ws.create_branch("intake/T-4")
    write(ws.path, "docs/new.md", "new\n")
    sha = ws.commit_all("intake: T-4")
    assert ws.push("intake/T-4") == sha
    assert remote.ref("refs/heads/intake/T-4") == sha
    assert remote.ref("refs/heads/main") == remote.main


def test_push_refuses_other_branches_and_empty_branches(ws: Workspace, remote: Remote) -> None:
    with pytest.raises(GitError, match="only the task branch"):
        ws.push("main")
    ws.create_branch("intake/T-5")
    with pytest.raises(GitError, match="no commits"):
        ws.push("intake/T-5")
    write(ws.path, "x.txt", "x\n")
    ws.commit_all("x")
    with pytest.raises(GitError, match="only the task branch"):
        ws.push("main")
    assert remote.ref("refs/heads/intake/T-5") is None
    assert remote.ref("refs/heads/main") == remote.main


def test_push_never_forces(remote: Remote, tmp_dirs: Path) -> None:
    with Workspace.clone(str(remote.bare), "main", None) as first:
        first.create_branch("intake/T-6")
        write(first.path, "a.txt", "first\n")
        first.commit_all("a")
        pushed = first.push("intake/T-6")
    with Workspace.clone(str(remote.bare), "main", None) as second:
        second.create_branch("intake/T-6")
        write(second.path, "a.txt", "second\n")
        second.commit_all("b")
        with pytest.raises(GitError, match="git push failed"):
            second.push("intake/T-6")
    assert remote.ref("refs/heads/intake/T-6") == pushed


# -- what an agent can and cannot do to the worker's git -------------------------------------


def test_a_git_dir_written_into_the_work_tree_is_inert(ws: Workspace, tmp_path: Path) -> None:
    marker = tmp_path / "hook-ran"
    hooks = tmp_path / "evil-hooks"
    hooks.mkdir()
    for hook in ("pre-commit", "pre-push", "post-commit", "reference-transaction"):
        script = hooks / hook
        script.write_text(f"#!/bin/sh\ntouch {marker}\n")
        script.chmod(0o755)
    write(ws.path, ".git/config", f"[core]\n\thooksPath = {hooks}\n")
    write(ws.path, "docs/change.md", "change\n")
    ws.create_branch("intake/T-7")
    ws.commit_all("c")
    ws.push("intake/T-7")
    assert not marker.exists()
    assert ws.changed_files() == [ChangedFile("docs/change.md", "A")]


def test_tampering_with_the_private_git_dir_stops_the_worker(
    ws: Workspace, tmp_dirs: Path, remote: Remote
) -> None:
    # A same-uid agent can find the git directory; it must not be able to plant a hook or
    # repoint the remote.
    with (private_git_dir(tmp_dirs) / "config").open("a") as handle:
        handle.write('[remote "origin"]\n\tpushurl = /tmp/elsewhere.git\n')
    write(ws.path, "docs/change.md", "change\n")
    with pytest.raises(GitError, match="modified outside the worker"):
        ws.commit_all("c")
    assert remote.ref("refs/heads/intake/T-8") is None


def test_agent_moving_refs_does_not_change_what_is_committed(
    ws: Workspace, remote: Remote, tmp_dirs: Path
) -> None:
    ws.create_branch("intake/T-9")
    # Someone points the branch and HEAD at the old tagged commit behind the worker's back.
    git_dir = str(private_git_dir(tmp_dirs))
    git(remote.bare.parent, "--git-dir", git_dir, "update-ref", "HEAD", remote.v1)
    write(ws.path, "docs/x.md", "x\n")
    with pytest.raises(GitError, match="update-ref"):
        ws.commit_all("c")
    assert ws.head == ws.base_sha


# -- run_git --------------------------------------------------------------------------------


def test_run_git_error_is_one_line_with_subcommand(tmp_path: Path) -> None:
    with pytest.raises(GitError) as excinfo:
        run_git(["rev-parse", "--verify", "nope"], cwd=tmp_path, env={})
    message = str(excinfo.value)
    assert message.startswith("git rev-parse failed (exit 128): fatal:")
    assert "\n" not in message


def test_run_git_ignores_user_config_and_the_callers_environment(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[alias]\n\tzz = status\n")
    monkeypatch.setenv("HOME", str(home))
    # With this process's environment git would use the alias...
    subprocess.run(["git", "zz"], cwd=tmp_path / "scratch", check=True, capture_output=True)
    monkeypatch.setenv("GIT_DIR", str(remote.bare))  # ...and this would redirect it.
    with pytest.raises(GitError, match="git zz failed"):
        run_git(["zz"], cwd=tmp_path / "scratch", env={})
    top = run_git(["rev-parse", "--show-toplevel"], cwd=tmp_path / "scratch", env={})
    assert top.strip() == str(tmp_path / "scratch")
    ident = run_git(["var", "GIT_AUTHOR_IDENT"], cwd=tmp_path / "scratch", env={})
    assert ident.startswith("intake-agent <agent@intake.invalid>")


def test_run_git_timeout_kills_git(tmp_path: Path) -> None:
    # A server that accepts connections and never answers: the TLS handshake hangs.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with pytest.raises(GitError, match=r"git ls-remote timed out after 0\.5s"):
            run_git(["ls-remote", f"https://127.0.0.1:{port}/r.git"], cwd=tmp_path, env={},
                    timeout=0.5)


# -- credentials over https -----------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_credential_goes_through_askpass_only(tmp_path: Path, tmp_dirs: Path) -> None:
    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            seen.append((self.path, auth))
            if auth is None:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
            else:
                self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    cert, key = _self_signed(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = "tok-5f3c1e9a7b"
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}/org/repo.git"
        with pytest.raises(GitError) as excinfo:
            Workspace.clone(url, "main", token, ca_file=cert)
    finally:
        server.shutdown()
        server.server_close()
    assert token not in str(excinfo.value)
    assert seen and all(token not in path for path, _ in seen)
    sent = [base64.b64decode(a.split()[1]).decode() for _, a in seen if a]
    assert sent == [f"x-access-token:{token}"]
    assert list(tmp_dirs.iterdir()) == []  # the askpass directory is gone too


# -- the building blocks together -----------------------------------------------------------


def test_demo_agent_change_passes_the_gates_and_is_pushed(ws: Workspace, remote: Remote) -> None:
    prompt = build_prompt("Please document the intake flow.", task_id="T-10", repo="acme/app",
                          change_type="docs", allowed_paths=["docs/**"],
                          blocked_paths=["payments/keys/**"])
    result = DemoAgent().run(Sandbox("none"), workdir=ws.path, home=ws.path, inputs=ws.path, prompt=prompt,
                             env={"INTAKE_TASK_ID": "T-10"}, timeout_s=60, max_output_bytes=4096)
    assert result.ok
    ws.create_branch("intake/T-10")
    assert ws.commit_all("intake: T-10") is not None
    changed = ws.changed_files()
    assert changed == [ChangedFile("docs/intake/T-10.md", "A")]
    reasons = run_gates(
        changed=changed, branch="intake/T-10", branch_prefix="intake",
        change_type="docs", change_type_paths=["docs/**", "**/*.md"], allowed_paths=["docs/**"], blocked_paths=["payments/keys/**"],
    )
    assert reasons == []
    assert remote.ref("refs/heads/intake/T-10") is None
    ws.push("intake/T-10")
    assert remote.ref("refs/heads/intake/T-10") == ws.head


def test_gates_see_a_blocked_change_and_a_new_dependency(ws: Workspace) -> None:
    ws.create_branch("intake/T-11")
    (ws.path / "payments/keys/k.pem").unlink()
    write(ws.path, "docs/requirements.txt", "requests==2.32.0\n")
    ws.commit_all("c")
    changed = ws.changed_files()
    deps = check_dependency_change(changed, ws.read_base, ws.read_head,
                                   Dependencies.model_validate({"allow": ["pypi:attrs"]}))
    reasons = run_gates(
        changed=changed, branch="intake/T-11", branch_prefix="intake",
        change_type="dependency-bump", change_type_paths=["**"], allowed_paths=["docs/**"], blocked_paths=["payments/keys/**"],
        dependency_reasons=deps.reasons,
    )
    assert reasons == [
        "blocked path: payments/keys/k.pem",
        "dependency: unlisted package: pypi:requests 2.32.0",
    ]


# -- the gates' view is the worker's own ----------------------------------------------------


def _rewrite_object(git_dir: Path, oid: str, content: bytes) -> None:
    """What a same-uid agent can do: replace a loose object's bytes in place."""
    import zlib

    obj = git_dir / "objects" / oid[:2] / oid[2:]
    obj.parent.mkdir(parents=True, exist_ok=True)
    tmp = obj.with_name(obj.name + ".new")
    tmp.write_bytes(zlib.compress(b"blob %d\0" % len(content) + content))
    os.replace(tmp, obj)


def test_a_rewritten_base_object_is_refused_not_believed(ws: Workspace, tmp_dirs: Path) -> None:
    oid = ws.base["src/app.py"].oid
    _rewrite_object(private_git_dir(tmp_dirs), oid, b"print('planted')\n")
    with pytest.raises(SnapshotError, match="does not match its id"):
        ws.read_base("src/app.py")


def test_an_object_planted_under_the_results_id_is_detected(ws: Workspace, tmp_dirs: Path) -> None:
    content = b"x = 1\n"
    # The agent knows what it will write, so it can plant other bytes under that id first.
    _rewrite_object(private_git_dir(tmp_dirs), blob_id(content), b"import os; os.system('id')\n")
    write(ws.path, "src/new.py", content.decode())
    ws.create_branch("intake/T-12")
    with pytest.raises(SnapshotError, match="tampered"):
        ws.commit_all("c")
    assert ws.head == ws.base_sha


def test_the_scan_follows_git_add_semantics(ws: Workspace) -> None:
    write(ws.path, ".gitignore", "build/\n*.log\n")
    write(ws.path, "build/out.bin", "junk\n")
    write(ws.path, "debug.log", "junk\n")
    write(ws.path, "payments/keys/k.pem", "not a real key, changed\n")
    (ws.path / "src/app.py").chmod(0o755)
    write(ws.path, ".git/HEAD", "ref: refs/heads/agent\n")  # the agent's own throwaway repo
    ws.create_branch("intake/T-13")
    assert ws.commit_all("c") is not None
    assert ws.changed_files() == [
        ChangedFile(".gitignore", "A"),
        ChangedFile("payments/keys/k.pem", "M"),
        ChangedFile("src/app.py", "M"),  # a mode change is a change
    ]
    # Tracked at the base, it stays tracked even when a new ignore rule covers it.
    write(ws.path, ".gitignore", "build/\n*.log\n*.pem\n")
    assert ws.commit_all("d") is not None
    assert ChangedFile("payments/keys/k.pem", "M") in ws.changed_files()
    assert ws.read_head("payments/keys/k.pem") == "not a real key, changed\n"
