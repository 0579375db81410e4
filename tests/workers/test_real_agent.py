"""A real, unmodified agent CLI (aider, from PyPI) run by a real worker in the bubblewrap sandbox,
talking to a local OpenAI-compatible model stub on 127.0.0.1 that it reaches only through the
egress allowlist. The worker config is the README's real-agent recipe.

The first run on a machine installs aider into its own venv under
``/var/tmp/intake-tests/aider`` (the agent user must be able to read it; a clean CI machine
installs it once, ~3 minutes, printed), later runs reuse it."""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import json
import os
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from intake.core.models import TaskState
from intake.protocol import envelope as provenance
from tests.workers.test_egress_runs import build  # noqa: F401

pytestmark = [pytest.mark.real_agent,
              pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="bubblewrap is not installed")]

AIDER_HOME = Path("/var/tmp/intake-tests/aider")
NOTE = "docs/aider-note.md"
EDIT = f"{NOTE}\n```markdown\n# Deploy steps\n\nWritten by aider through the intake sandbox.\n```\n"


@pytest.fixture(scope="session")
def aider() -> Path:
    """aider's own venv (installed here once, with the system Python the sandbox can see)."""
    program = AIDER_HOME / "bin" / "aider"
    AIDER_HOME.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(AIDER_HOME.parent, 0o755)
    with open(AIDER_HOME.parent / "install.lock", "w") as lock:  # one installer across test processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (AIDER_HOME / ".installed").exists():
            _install()
    return program


def _install() -> None:
    # In place (a venv's scripts name its path: it cannot be renamed), marked done at the end.
    started = time.monotonic()
    subprocess.run(["rm", "-rf", str(AIDER_HOME)], check=True)
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(AIDER_HOME)], check=True)
    subprocess.run([str(AIDER_HOME / "bin" / "pip"), "install", "-q", "aider-chat"], check=True)
    (AIDER_HOME / ".installed").touch()
    print(f"\ninstalled aider-chat in {time.monotonic() - started:.0f} s")


class ModelStub(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """An OpenAI-compatible ``/v1/chat/completions`` that answers every request with ``EDIT``."""

    daemon_threads = True

    def __init__(self) -> None:
        self.requests: list[dict[str, object]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                owner.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                reply = json.dumps({
                    "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "stub"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": EDIT}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def stub() -> Iterator[ModelStub]:
    server = ModelStub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def aider_agent(aider: Path, port: int) -> dict[str, object]:
    """The README's real-agent recipe: aider, unmodified, in its own read-only install."""
    return {"type": "command", "ro_paths": [str(aider.parent.parent)], "argv": [
        str(aider), "--model", "openai/stub-model", "--openai-api-base", f"http://127.0.0.1:{port}/v1",
        "--edit-format", "whole", "--no-git", "--yes-always", "--no-stream", "--no-pretty", "--no-fancy-input",
        "--no-check-update", "--analytics-disable", "--no-show-model-warnings", "--map-tokens", "0",
        "--no-auto-lint", "--no-suggest-shell-commands", "--no-detect-urls",
        "--chat-history-file", "/tmp/aider.chat.md", "--input-history-file", "/tmp/aider.input",
        "--message-file", "{prompt_file}", NOTE]}


@contextlib.contextmanager
def ticking(rig) -> Iterator[None]:  # noqa: ANN001
    """The rig's clock moves with real time while a long run lasts: the broker's lease renewals
    carry its time, and a renewal at a frozen time is no renewal (a replay) to the worker."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            rig.clock.advance(1.0)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def key_file(tmp: Path) -> Path:
    path = tmp / "model-key"
    path.write_text("sk-test-model-key-7788\n")
    path.chmod(0o600)
    return path


def test_aider_edits_through_the_allowlisted_stub_to_a_delivered_branch_with_provenance(
        build, stub: ModelStub, aider: Path) -> None:  # noqa: F811
    rig = build([f"127.0.0.1:{stub.port}"])
    task = rig.promote(text="Please document the deploy steps")
    config = rig.config(agent=aider_agent(aider, stub.port),
                        repos={"acme/web": {"agent_env": {"OPENAI_API_KEY": {"file": str(key_file(rig.tmp))}}}})
    with ticking(rig):
        rig.work(config)
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED, (done.reason, (done.result or {}).get("output_tail"))
    assert stub.requests and stub.requests[0]["path"] == "/v1/chat/completions"
    assert stub.requests[0]["auth"] == "Bearer sk-test-model-key-7788"
    assert "Please document the deploy steps" in json.dumps(stub.requests[0]["body"])
    sha = done.result["commit"]
    bare = rig.bare("acme/web")
    shown = subprocess.run(["git", "-C", str(bare), "show", f"intake/{task.id}:{NOTE}"], capture_output=True,
                           text=True, check=True).stdout
    assert shown == "# Deploy steps\n\nWritten by aider through the intake sandbox.\n"
    note = subprocess.run(["git", "-C", str(bare), "notes", f"--ref={provenance.NOTES_REF}", "show", sha],
                          capture_output=True, text=True, check=True).stdout
    statement, _ = provenance.open_envelope(note, rig.broker.keyring)
    egress = statement["predicate"]["egress"]
    allowed = [a for a in egress["attempts"] if a["allowed"]]
    assert allowed and {(a["host"], a["port"]) for a in allowed} == {("127.0.0.1", stub.port)}
    assert all(a["reason"] == "not on the allowlist" for a in egress["attempts"] if not a["allowed"])
    assert "sk-test-model-key-7788" not in json.dumps(done.result)


def test_aider_with_the_stub_off_the_allowlist_fails_with_the_refusal_on_the_record(
        build, stub: ModelStub, aider: Path) -> None:  # noqa: F811
    # aider retries a refused model call for a minute; the run's time limit ends it first.
    rig = build(["api.openai.com:443"], run_timeout="45s")
    task = rig.promote(text="Please document the deploy steps")
    config = rig.config(agent=aider_agent(aider, stub.port),
                        repos={"acme/web": {"agent_env": {"OPENAI_API_KEY": {"file": str(key_file(rig.tmp))}}}})
    with ticking(rig):
        rig.work(config)
    done = rig.task(task.id)
    assert done.state is TaskState.FAILED and done.reason == "the agent timed out after 45s", done.reason
    assert stub.requests == []
    refused = [a for a in done.result["egress"]["attempts"] if not a["allowed"]]
    assert ("127.0.0.1", stub.port, "not on the allowlist") in {(a["host"], a["port"], a["reason"]) for a in refused}
