"""A hostile command agent (our own script) run by a real worker under bubblewrap: what it can
reach, what survives it, and the required checks after it. Skipped only where /usr/bin/bwrap is
missing (CI installs it)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from intake.core.models import TaskState
from intake.core.redis_conn import redis_server_binary
from intake.protocol.tokens import verify_lease
from intake.runtime import EXAMPLE_POLICY
from intake.workers.rundirs import RunRoot
from intake.workers.sandbox import Sandbox, SandboxError
from tests.conftest import FakeClock
from tests.workers.harness import Rig, git_refs, git_show, make_rig, pids_with, rig, wait_for  # noqa: F401

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="bubblewrap is not installed")

PROBE = r"""
import json, os, socket, sys
report = {}
def can_read(path):
    try:
        with open(path, "rb") as handle:
            handle.read(1)
        return "read"
    except OSError as exc:
        return type(exc).__name__
for name, path in json.loads(sys.argv[1]).items():
    report[name] = can_read(path)
report["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
report["worker_cmdline"] = can_read("/proc/%d/cmdline" % int(sys.argv[2]))
def connect(family, address):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(address)
        return "connected"
    except OSError as exc:
        return type(exc).__name__
    finally:
        s.close()
report["redis_unix"] = connect(socket.AF_UNIX, sys.argv[3])
report["redis_tcp"] = connect(socket.AF_INET, ("127.0.0.1", int(sys.argv[4])))
report["listener_tcp"] = connect(socket.AF_INET, ("127.0.0.1", int(sys.argv[5])))
print("REPORT " + json.dumps(report))
sys.exit(1)
"""


@pytest.fixture
def tcp_redis(tmp_path: Path) -> Iterator[int]:
    """A second real redis-server, on TCP 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    wait_for(lambda: _pings(client), 10, "the TCP redis-server")
    yield port
    client.close()
    proc.terminate()
    proc.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_a_hostile_agent_reaches_no_worker_file_no_redis_no_process_and_no_network(
        rig: Rig, tcp_redis: int, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = rig.tmp / "git-token"
    secret_file.write_text("file-credential-5150\n")
    secret_file.chmod(0o600)
    monkeypatch.setenv("FORGE_TOKEN", "forge-token-8080")
    task = rig.promote()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        config = rig.config(repos={"acme/web": {"forge": {"api_url": "http://127.0.0.1:9", "repository": "acme/web",
                                                          "token": {"file": str(secret_file)}}}})
        # Another config of this worker's, in the same directory as the one it runs with.
        targets = {"config": str(config), "config_dir": str(rig.tmp),
                   "credential_file": str(secret_file),
                   "data_dir": str(rig.settings.worker_key_path("test")),
                   **{f"key_{name}": str(path) for name, path in rig.settings.keys.items()}}
        sock = (rig.settings.redis_url.get_secret_value() if rig.settings.redis_url else "").removeprefix("unix://")
        argv = ["python3", "-c", PROBE, json.dumps(targets), str(os.getpid()), sock, str(tcp_redis),
                str(listener.getsockname()[1])]
        rig.work(rig.config(agent={"type": "command", "argv": argv},
                            repos={"acme/web": {"forge": {"api_url": "http://127.0.0.1:9", "repository": "acme/web",
                                                          "token": {"file": str(secret_file)}}}}))
    ended = rig.task(task.id)
    assert ended.state is TaskState.FAILED, ended.reason
    tail = (ended.result or {})["output_tail"]
    report = json.loads(tail.split("REPORT ", 1)[1])
    for name in targets:
        assert report[name] == "FileNotFoundError", (name, report[name])  # not even there
    assert "file-credential-5150" not in tail
    assert report["pids"] == [1, 2]  # bwrap's init and the agent: no host process in sight
    assert report["worker_cmdline"] == "FileNotFoundError"
    assert report["redis_unix"] == "FileNotFoundError"
    assert report["redis_tcp"] != "connected" and report["listener_tcp"] != "connected"
    assert ended.result is not None and ended.result["sandbox"] == "bwrap" and ended.result["network"] == "none"
    assert rig.events("task.failed")[-1]["data"]["sandbox"] == "bwrap"


GRANDCHILD = ("setsid python3 -c 'import time\nopen(\"docs/grandchild-up.md\", \"w\").write(\"up\")\nwhile True: time.sleep(0.1)' "
              "{marker} >/dev/null 2>&1 < /dev/null &")


def grandchild_agent(marker: str, then: str) -> dict[str, object]:
    """An agent that starts a setsid grandchild (``marker`` in its argv), waits until it runs, then ``then``."""
    script = GRANDCHILD.format(marker=marker) + " while [ ! -e docs/grandchild-up.md ]; do sleep 0.05; done; " + then
    return {"type": "command", "argv": ["/bin/sh", "-c", script]}


@pytest.fixture
def short_rig(tmp_path: Path, redis_server: str, rclient: redis.Redis, clock: FakeClock) -> Iterator[Rig]:
    text = EXAMPLE_POLICY.read_text().replace('run_timeout = "30m"', 'run_timeout = "2s"')
    made = make_rig(tmp_path, redis_server, rclient, clock, policy_text=text)
    yield made
    made.close()


def test_a_setsid_grandchild_is_gone_after_a_normal_exit(rig: Rig) -> None:
    marker = f"gc-{secrets.token_hex(8)}"
    task = rig.promote()
    rig.work(rig.config(agent=grandchild_agent(marker, "echo done > docs/done.md; exit 0")))
    ended = rig.task(task.id)
    assert ended.state is TaskState.SUCCEEDED, ended.reason
    assert "docs/grandchild-up.md" in (ended.result or {})["files"]  # it did run
    assert pids_with(marker) == []


def test_a_setsid_grandchild_is_gone_after_a_timeout(short_rig: Rig) -> None:
    marker = f"gc-{secrets.token_hex(8)}"
    task = short_rig.promote()
    seen: list[int] = []
    watcher = threading.Thread(target=lambda: seen.extend(wait_for(lambda: pids_with(marker), 20, "the grandchild")))
    watcher.start()
    short_rig.work(short_rig.config(agent=grandchild_agent(marker, "exec sleep 60")))
    watcher.join(timeout=30)
    assert short_rig.task(task.id).reason == "the agent timed out after 2s"
    assert seen and pids_with(marker) == []


def test_a_setsid_grandchild_is_gone_after_a_revocation(rig: Rig) -> None:
    marker = f"gc-{secrets.token_hex(8)}"
    task = rig.promote()

    def revoke_when_running() -> None:
        wait_for(lambda: pids_with(marker), 20, "the grandchild")
        lease_key = rig.store.keys.lease(rig.fact(task.id).worker, task.id)  # the running worker's
        rig.broker.gatekeeper.revoke(task.id, identity="cli:bob", is_approver=True, reason="stop")
        # The stop is pushed at once (a signed refusal on the run's lease key, which the worker
        # polls every 0.25 s), not left for the next heartbeat's answer.
        lease = verify_lease(rig.r.get(lease_key), rig.broker.keyring)
        stops.append(lease.status)

    stops: list[str] = []
    helper = threading.Thread(target=revoke_when_running)
    helper.start()
    rig.work(rig.config(agent=grandchild_agent(marker, "exec sleep 60")))
    helper.join(timeout=30)
    assert rig.task(task.id).state is TaskState.REVOKED
    assert pids_with(marker) == []
    assert stops == ["revoked"]


def test_nothing_an_agent_starts_reaches_a_later_task(rig: Rig) -> None:
    """The first agent leaves a setsid helper that would write into any work tree it can find
    and read any askpass pipe; by the time the second task runs it is gone, and the second
    task's tree holds only what its own agent wrote."""
    marker = f"gc-{secrets.token_hex(8)}"
    first, second = rig.promote(), rig.promote()
    snoop = ("setsid sh -c 'while :; do for d in /tmp/intake-runs/*/*/intake-ws-*; do "
             "echo pwned > \"$d/docs/pwned.md\" 2>/dev/null; done; sleep 0.05; done' " + marker + " &")
    agent = {"type": "command", "argv": ["/bin/sh", "-c",
                                         f'if [ ! -e docs/first ]; then {snoop} fi; echo "$INTAKE_TASK_ID" > docs/me.md']}
    rig.work(rig.config(agent=agent))
    assert pids_with(marker) == []
    for task in (first, second):
        done = rig.task(task.id)
        assert done.state is TaskState.SUCCEEDED, done.reason
        assert (done.result or {})["files"] == ["docs/me.md"]
        assert git_show(rig.bare("acme/web"), f"intake/{task.id}", "docs/me.md") == f"{task.id}\n"


def test_the_agent_gets_a_throwaway_git_of_its_own(rig: Rig) -> None:
    task = rig.promote()
    script = ("git status --porcelain > /tmp/s; git log --format=%H -1 >> /tmp/s; "
              "git remote >> /tmp/s; ls .git/hooks 2>/dev/null | wc -l >> /tmp/s; "
              "echo x > docs/x.md; git add -A && git commit -qm 'agent commit' && echo committed >> /tmp/s; "
              "git config --local remote.origin.url https://evil.example/x.git; cp /tmp/s docs/status.md")
    rig.work(rig.config(agent={"type": "command", "argv": ["/bin/sh", "-c", script]}))
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED, done.reason
    base = git_refs(rig.bare("acme/web"))["refs/heads/main"]
    status = git_show(rig.bare("acme/web"), f"intake/{task.id}", "docs/status.md").splitlines()
    assert status == [base, "0", "committed"]  # clean tree at the base commit, no remote, no hooks
    # The worker's commit sits on the base, made from its own git directory, not the agent's.
    parent = subprocess.run(["git", "--git-dir", str(rig.bare("acme/web")), "rev-parse", f"intake/{task.id}^"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert parent == base


def test_a_failing_required_check_blocks_the_task_and_nothing_is_pushed(rig: Rig) -> None:
    task = rig.promote()
    rig.work(rig.config(agent={"type": "command", "argv": ["/bin/sh", "-c", ": > docs/empty.md"]}))
    ended = rig.task(task.id)
    assert ended.state is TaskState.BLOCKED
    assert ended.reason == "blocked by required checks: docs/no-empty-markdown exited 1"
    result = ended.result or {}
    assert result["pushed"] is False
    [check] = result["checks"]
    assert check["name"] == "docs/no-empty-markdown" and check["ok"] is False and check["exit_code"] == 1
    assert "empty: ./docs/empty.md" in check["tail"]
    assert set(git_refs(rig.bare("acme/web"))) == {"refs/heads/main"}


def test_a_check_has_no_network_and_cannot_change_what_is_pushed(tmp_path: Path, redis_server: str,
                                                                 rclient: redis.Redis, clock: FakeClock) -> None:
    text = EXAMPLE_POLICY.read_text().replace(
        'name = "docs/no-empty-markdown"',
        'name = "net"\nargv = ["python3", "-c", "import socket,sys; s=socket.socket(); s.settimeout(1); '
        'sys.exit(0 if s.connect_ex((\'127.0.0.1\', 9)) else 3)"]\ntimeout = "1m"\n'
        '[[repos.checks]]\nname = "writer"\nargv = ["sh", "-c", "echo changed > README.md"]\ntimeout = "1m"\n'
        '[[repos.checks]]\nname = "docs/no-empty-markdown"', 1)
    made = make_rig(tmp_path, redis_server, rclient, clock, policy_text=text)
    try:
        task = made.promote()
        made.work(made.config(repos={"acme/web": {"network": "host"}}))
        done = made.task(task.id)
        assert done.state is TaskState.SUCCEEDED, done.reason
        assert [c["name"] for c in (done.result or {})["checks"]] == ["net", "writer", "docs/no-empty-markdown"]
        assert (done.result or {})["network"] == "host"  # the agent's; checks never get it
        assert git_show(made.bare("acme/web"), f"intake/{task.id}", "README.md") == "# seed\n"
    finally:
        made.close()


def test_the_readme_real_agent_config_runs_a_stand_in_of_the_same_shape(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: ``argv = ["/opt/aider/bin/aider", "--yes-always", "--no-auto-commits", "--message-file",
    "{prompt_file}"]``, ``ro_paths = ["/opt/aider"]``, ``agent_env = { ANTHROPIC_API_KEY = … }``."""
    install = Path(tempfile.mkdtemp(prefix="aider-stand-in-"))
    try:
        install.chmod(0o755)
        (install / "bin").mkdir(mode=0o755)
        stand_in = install / "bin" / "aider"
        stand_in.write_text(
            "#!/usr/bin/python3\nimport os, sys\n"
            "args = sys.argv[1:]\n"
            "assert args[:3] == ['--yes-always', '--no-auto-commits', '--message-file'], args\n"
            "prompt = open(args[3]).read()\n"
            "assert 'UNTRUSTED-REQUEST' in prompt\n"
            "print('key=' + os.environ['ANTHROPIC_API_KEY'])\n"
            "open('docs/aider.md', 'w').write('edited by the stand-in\\n')\n")
        stand_in.chmod(0o755)
        key_file = rig.tmp / "anthropic.key"
        key_file.write_text("sk-ant-test-1234567\n")
        key_file.chmod(0o600)
        task = rig.promote()
        agent = {"type": "command", "argv": [str(stand_in), "--yes-always", "--no-auto-commits", "--message-file",
                                             "{prompt_file}"], "ro_paths": [str(install)]}
        rig.work(rig.config(agent=agent, repos={"acme/web": {"network": "host",
                                                             "agent_env": {"ANTHROPIC_API_KEY": {"file": str(key_file)}}}}))
        done = rig.task(task.id)
        assert done.state is TaskState.SUCCEEDED, (done.reason, (done.result or {}).get("output_tail"))
        assert (done.result or {})["output_tail"] == "key=***\n"  # redacted
        assert (done.result or {})["files"] == ["docs/aider.md"]
    finally:
        subprocess.run(["rm", "-rf", str(install)], check=True)


# -- the sandbox on its own --------------------------------------------------------------------


def test_the_sandbox_refuses_root_unknown_users_and_a_missing_bwrap() -> None:
    with pytest.raises(SandboxError, match="is root"):
        Sandbox(agent_user="root").check()
    with pytest.raises(SandboxError, match="does not exist"):
        Sandbox(agent_user="no-such-user-xyz").check()
    with pytest.raises(SandboxError, match="bubblewrap not found"):
        Sandbox(bwrap="/nonexistent/bwrap").check()
    Sandbox().check()


def test_files_come_back_to_the_worker_after_the_run() -> None:
    root = RunRoot(f"unit-{secrets.token_hex(4)}")
    try:
        with root.run() as run:
            work, home = RunRoot.private(run, "work"), RunRoot.private(run, "home")
            result = Sandbox().run(["sh", "-c", "id -u; echo x > made; mkdir d; ln -s /etc/passwd d/link"],
                                   workdir=work, home=home, env={}, timeout_s=30, max_output_bytes=1000)
            assert result.ok and result.output_tail.strip() != str(os.getuid())
            for path in (work, work / "made", work / "d", home):
                assert path.lstat().st_uid == os.getuid()
            assert (work / "d" / "link").lstat().st_uid == os.getuid()
    finally:
        subprocess.run(["rm", "-rf", str(root.path)], check=True)


def test_leftovers_of_a_dead_run_are_swept_but_not_a_live_run() -> None:
    name = f"unit-{secrets.token_hex(4)}"
    code = ("import sys, time; from intake.workers.rundirs import RunRoot\n"
            f"with RunRoot({name!r}).run() as run:\n"
            "    (run / 'x').write_text('x'); print(run, flush=True); time.sleep(60)\n")
    dead = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert dead.stdout is not None and live.stdout is not None
        dead_run, live_run = Path(dead.stdout.readline().strip()), Path(live.stdout.readline().strip())
        dead.kill()
        dead.wait(timeout=10)
        assert dead_run.exists()
        assert RunRoot(name).sweep() == 1
        assert not dead_run.exists() and live_run.exists()
    finally:
        for proc in (dead, live):
            proc.kill()
            proc.wait(timeout=10)
        subprocess.run(["rm", "-rf", str(RunRoot(name).path)], check=True)


def test_a_worker_refuses_to_start_without_a_usable_sandbox_and_warns_when_it_is_off(rig: Rig) -> None:
    missing_user = rig.spawn(rig.config(agent_user="no-such-agent"), burst=True)
    assert missing_user.wait(timeout=60) != 0
    assert "agent user 'no-such-agent' does not exist" in rig.worker_log()
    readable = rig.config()
    readable.chmod(0o644)
    assert rig.spawn(readable, burst=True).wait(timeout=60) != 0
    assert "is readable by the agent user intake-agent (chmod 600 it)" in rig.worker_log()
    task = rig.promote()
    off = rig.spawn(rig.config(sandbox="none"), burst=True)
    assert off.wait(timeout=60) == 0, rig.worker_log()
    assert 'sandbox = "none": agents and checks run as this worker\'s own user' in rig.worker_log()
    rig.drain()  # the result is applied and its delivery job enqueued: a second burst delivers it
    assert rig.spawn(rig.config(sandbox="none"), burst=True).wait(timeout=60) == 0, rig.worker_log()
    rig.drain()
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED and (done.result or {})["sandbox"] == "none"
    assert rig.events("task.succeeded")[-1]["data"]["sandbox"] == "none"


def test_a_sandbox_left_running_by_a_dead_run_is_killed_by_the_sweep() -> None:
    """A worker SIGKILLed while bubblewrap is still starting can leave the sandbox running (its
    --die-with-parent not yet in force). The run recorded the sandbox's pid namespace; the next
    sweep kills everything still in it."""
    name = f"unit-{secrets.token_hex(4)}"
    code = ("import sys, time; from intake.workers.rundirs import RunRoot\n"
            f"with RunRoot({name!r}).run() as run:\n"
            "    print(run, flush=True); time.sleep(60)\n")
    dead = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert dead.stdout is not None
    run = Path(dead.stdout.readline().strip())
    # The survivor: a sandbox whose launcher is gone (started detached, as the race leaves it).
    box = subprocess.Popen(["bwrap", "--unshare-user", "--unshare-pid", "--ro-bind", "/usr", "/usr",
                            "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
                            "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--", "/bin/sleep", "60"],
                           user="intake-agent", group="intake-agent", extra_groups=[], start_new_session=True)
    try:
        inode = wait_for(lambda: next((os.readlink(f"/proc/{c}/ns/pid")[5:-1] for c in _children(box.pid)), None),
                         10, "the sandbox to start")
        (run / "sandboxes").write_text(f"{inode}\n")
        dead.kill()
        dead.wait(timeout=10)
        assert RunRoot(name).sweep() == 1
        wait_for(lambda: box.poll() is not None or not _children(box.pid), 10, "the leftover sandbox to be killed")
        assert not any(os.readlink(f"/proc/{p}/ns/pid") == f"pid:[{inode}]"
                       for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/ns/pid"))
    finally:
        box.kill()
        box.wait(timeout=10)
        dead.kill()
        subprocess.run(["rm", "-rf", str(RunRoot(name).path)], check=False)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
