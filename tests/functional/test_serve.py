"""`intake serve --dev` as a real process: health endpoints, the CLI as its API client, and the
README's walk-through."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.api_harness import Codes
from tests.ports import free_port  # noqa: F401 (imported from here by other tests)

INTAKE = [sys.executable, "-m", "intake"]


def wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


@pytest.fixture
def dev_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env.update(INTAKE_DATA_DIR=str(tmp_path / "d"), INTAKE_PORT=str(free_port()))
    return env


def test_the_cli_talks_to_the_dev_server(dev_env: dict[str, str]) -> None:
    data = Path(dev_env["INTAKE_DATA_DIR"])
    serve = subprocess.Popen(
        [*INTAKE, "serve", "--dev"], env=dev_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        base = f"http://127.0.0.1:{dev_env['INTAKE_PORT']}"
        assert wait_http(f"{base}/healthz", serve) == {"status": "ok"}
        assert wait_http(f"{base}/readyz", serve)["redis"] == "up"
        pid = (data / "redis" / "redis.pid").read_text()
        assert (data / "intake.sock").stat().st_mode & 0o777 == 0o666  # any local user may connect

        filed = subprocess.run(
            [*INTAKE, "idea", "rotate the staging TLS cert", "--as", "erin", "--json"],
            env=dev_env, capture_output=True, text=True, timeout=60,
        )
        assert filed.returncode == 0, filed.stderr
        idea_id = json.loads(filed.stdout)["id"]
        shown = subprocess.run(
            [*INTAKE, "show", idea_id, "--json"], env=dev_env, capture_output=True, text=True, timeout=60
        )
        assert json.loads(shown.stdout)["text"] == "rotate the staging TLS cert"
        assert json.loads(shown.stdout)["requester"] == "cli:erin"
        # The CLI used the server's API: the same Redis, still running after the CLI left.
        assert (data / "redis" / "redis.pid").read_text() == pid
        assert wait_http(f"{base}/readyz", serve)["redis"] == "up"
        verified = subprocess.run([*INTAKE, "audit", "verify", "--json"], env=dev_env, capture_output=True, text=True)
        # dev mode's people (the admin, erin and her token), the dev worker's registration and key, then the idea
        assert verified.returncode == 0 and json.loads(verified.stdout)["events"] == 6
    finally:
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=30)  # waits and closes the pipe
    assert not (data / "redis" / "redis.sock").exists()  # serve was the last user; Redis stopped
    assert not (data / "intake.sock").exists()
    assert (data / "policy.toml").exists() and (data / "keys" / "broker_ed25519.pem").exists()


def test_quick_start_runs_an_idea_to_a_pushed_branch(dev_env: dict[str, str]) -> None:
    """The README's walk-through against a real `intake serve --dev`: enrol an approver, file an
    idea, promote it with a code; the embedded worker pushes the demo agent's branch."""
    import pyotp

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*INTAKE, *args], env=dev_env, capture_output=True, text=True, timeout=60)

    data = Path(dev_env["INTAKE_DATA_DIR"])
    serve = subprocess.Popen(
        [*INTAKE, "serve", "--dev"], env=dev_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_http(f"http://127.0.0.1:{dev_env['INTAKE_PORT']}/readyz", serve)
        added = cli("approver", "add", "alice", "--name", "Alice", "--groups", "platform", "--json")
        assert added.returncode == 0, added.stderr
        codes = Codes(pyotp.parse_uri(json.loads(added.stdout)["otpauth_uri"]))
        assert cli("approver", "confirm", "alice", "--code", codes.next()).returncode == 0
        # erin asks over TCP with the token dev mode made for her
        token = (data / "dev-erin.token").read_text().strip()
        filed = subprocess.run(
            [*INTAKE, "idea", "Document how to run the tests", "--json"], capture_output=True, text=True, timeout=60,
            env={**dev_env, "INTAKE_URL": f"http://127.0.0.1:{dev_env['INTAKE_PORT']}", "INTAKE_TOKEN": token},
        )
        idea = json.loads(filed.stdout)
        assert idea["requester"] == "cli:erin"
        # erin's token was made for her by dev mode, not by her: it files ideas and nothing more.
        enrol = subprocess.run(
            [*INTAKE, "approver", "enrol", "erin"], capture_output=True, text=True, timeout=60,
            env={**dev_env, "INTAKE_URL": f"http://127.0.0.1:{dev_env['INTAKE_PORT']}", "INTAKE_TOKEN": token},
        )
        assert enrol.returncode == 1 and "only files ideas" in enrol.stderr, enrol.stderr
        promoted = cli("promote", idea["id"], "--repo", "acme/web", "--change-type", "docs",
                       "--code", codes.next(), "--json")
        assert promoted.returncode == 0, promoted.stderr
        task_id = json.loads(promoted.stdout)["task"]
        deadline = time.monotonic() + 60
        while True:
            shown = json.loads(cli("show", task_id, "--json").stdout)
            if shown["state"] in ("succeeded", "failed", "blocked"):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"gave up waiting: task still {shown['state']}")
            time.sleep(0.3)
        assert shown["state"] == "succeeded", shown
        branch, commit = shown["result"]["branch"], shown["result"]["commit"]
        assert branch == f"intake/{task_id}"
        bare = data / "repos" / "acme" / "web.git"
        refs = subprocess.run(["git", "--git-dir", str(bare), "show-ref"], capture_output=True, text=True).stdout
        assert f"{commit} refs/heads/{branch}" in refs
        assert cli("audit", "verify").returncode == 0
    finally:
        serve.send_signal(signal.SIGINT)
        out, _ = serve.communicate(timeout=60)
    assert serve.returncode == 0, out[-2000:]
    assert not (data / "redis" / "redis.sock").exists()


async def _serve_with_slack(env: dict[str, str], sim_url: str, token: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *INTAKE, "serve", "--dev", env={**env, "SLACK_SIGNING_SECRET": "sim-signing-secret",
                                        "SLACK_BOT_TOKEN": token, "SLACK_API_URL": sim_url},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


async def test_a_token_slack_refuses_stops_serve_with_one_line_before_anything_starts(
        dev_env: dict[str, str]) -> None:
    from tests.slack_sim import SlackSim

    async with SlackSim() as sim:
        sim.set_response("auth.test", {"ok": False, "error": "invalid_auth"})
        token = "xoxb-0000-not-a-real-token"
        serve = await _serve_with_slack(dev_env, sim.base_url, token)
        out, _ = await asyncio.wait_for(serve.communicate(), 90)
        text = out.decode()
        assert serve.returncode not in (0, None), text
        assert "SLACK_BOT_TOKEN: Slack refused it (auth.test: invalid_auth)" in text
        assert "Slack on" not in text and "serving on" not in text and "Traceback" not in text
        assert token not in text
        assert len(sim.calls_to("auth.test")) == 1
        assert not (Path(dev_env["INTAKE_DATA_DIR"]) / "intake.sock").exists()


async def test_slack_on_names_the_bot_slack_accepted(dev_env: dict[str, str]) -> None:
    from tests.slack_sim import SlackSim

    async with SlackSim() as sim:
        serve = await _serve_with_slack(dev_env, sim.base_url, "xoxb-0000-sim")
        try:
            lines = []
            while not any("serving on" in line for line in lines):
                line = await asyncio.wait_for(serve.stdout.readline(), 90)  # type: ignore[union-attr]
                assert line, "serve exited: " + "".join(lines)
                lines.append(line.decode())
            (slack,) = [line for line in lines if "Slack" in line]
            assert "Slack on: HTTP (POST /slack/events) as " in slack and "Sim Team" in slack
        finally:
            serve.terminate()
            await asyncio.wait_for(serve.wait(), 60)
