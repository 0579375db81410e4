"""Replicas and Redis faults with real processes: two ``intake serve`` on one Redis whose sealer
holder is paused and then killed mid-burst, and one serve whose embedded Redis is SIGKILLed
mid-burst. Requests are signed ``/intake`` slash commands, as Slack sends them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis

from intake.audit.log import AuditLog
from intake.channels.slack.verify import compute_signature
from intake.core.redis_conn import EmbeddedRedis, make_client
from intake.core.settings import Settings
from intake.protocol.keyfiles import load_secret
from tests.api_harness import link_os_user
from tests.functional.test_serve import free_port, wait_http
from tests.slack_sim import SlackSim

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
CAPTURED = re.compile(r"Captured as idea `(I-[A-Za-z0-9]+)`.*")


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def serve_env(settings: Settings, sim: SlackSim, *, embedded: bool) -> dict[str, str]:
    keys = settings.keys
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env.update(
        INTAKE_PORT=str(free_port()), INTAKE_POLICY=str(settings.policy_path), INTAKE_SWEEP_INTERVAL="1",
        INTAKE_SIGNING_KEY=str(keys["signing"]), INTAKE_PUBLIC_KEY=str(keys["public"]),
        INTAKE_AUDIT_KEY=str(keys["audit"]), INTAKE_SECRETS_KEY=str(keys["secrets"]),
        INTAKE_CONSOLE_KEY=str(keys["console"]), SLACK_SIGNING_SECRET=SECRET, SLACK_BOT_TOKEN="xoxb-test",
        SLACK_API_URL=sim.base_url, INTAKE_SLACK_RATE="500",
    )
    if not embedded:
        env["INTAKE_REDIS_URL"] = settings.redis_url.get_secret_value()  # type: ignore[union-attr]
    return env


def start_serve(env: dict[str, str], data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**env, "INTAKE_DATA_DIR": str(data_dir)}
    out = open(log, "wb")  # noqa: SIM115 - the process owns it
    proc = subprocess.Popen([sys.executable, "-m", "intake", "serve"], env=env, cwd=data_dir.parent,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    proc.port = int(env["INTAKE_PORT"])  # type: ignore[attr-defined]
    proc.data_dir = data_dir  # type: ignore[attr-defined]
    wait_http(f"http://127.0.0.1:{env['INTAKE_PORT']}/readyz", proc)  # type: ignore[arg-type]
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def signed(trigger: str, text: str) -> tuple[bytes, dict[str, str]]:
    body = urllib.parse.urlencode({
        "token": "x", "team_id": "T00000001", "channel_id": "C0GENERAL1", "user_id": "UERIN00001",
        "command": "/intake", "text": text, "response_url": "https://hooks.slack.invalid/1", "trigger_id": trigger,
    }).encode()
    ts = str(int(time.time()))
    return body, {"Content-Type": "application/x-www-form-urlencoded", "X-Slack-Request-Timestamp": ts,
                  "X-Slack-Signature": compute_signature(body=body, timestamp=ts, signing_secret=SECRET)}


async def command(http: aiohttp.ClientSession, port: int, trigger: str, text: str) -> tuple[int, str | None]:
    """Send one signed /intake; (status, idea id). Slack gives up after 3 s: so does this client
    (a timeout raises and fails the test)."""
    body, headers = signed(trigger, text)
    async with http.post(f"http://127.0.0.1:{port}/slack/events", data=body, headers=headers,
                         timeout=aiohttp.ClientTimeout(total=3)) as resp:
        raw = await resp.text()
        if resp.status != 200:
            return resp.status, None
        found = CAPTURED.fullmatch(json.loads(raw)["text"])
        assert found, raw
        return 200, found[1]


async def deliver(http: aiohttp.ClientSession, ports: list[int], trigger: str, text: str) -> str:
    """Deliver one /intake the way Slack does: a timeout (3 s), a refused connection or a 5xx is
    retried with the same trigger, here to the next replica in ``ports``. Returns the idea id;
    fails only after 10 tries (a loaded machine may be slow; capture must stay idempotent)."""
    for attempt in range(10):
        try:
            status, idea = await command(http, ports[attempt % len(ports)], trigger, text)
        except (TimeoutError, aiohttp.ClientConnectionError):
            continue
        if status == 200 and idea is not None:
            return idea
    pytest.fail(f"{trigger} was not captured after 10 deliveries")


@pytest.fixture
async def sim() -> AsyncIterator[SlackSim]:
    server = SlackSim()
    await server.start()
    yield server
    await server.stop()


def holder_pid(r: redis.Redis, prefix: str = "intake") -> int | None:
    raw = r.get(f"{prefix}:audit:sealer")
    return int(raw.split(" ")[1].split(":")[1]) if raw else None


def captures(audit: AuditLog) -> dict[str, int]:
    """How many times each idea's capture is on the log."""
    counts: dict[str, int] = {}
    for _id, fields in audit.r.xrange(audit.stream):
        event = json.loads(fields["e"])
        if event.get("action") == "idea.captured":
            counts[event["subject"]] = counts.get(event["subject"], 0) + 1
    return counts


@pytest.fixture
def two_serves(settings: Settings, sim: SlackSim, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = serve_env(settings, sim, embedded=False)
    procs = []
    try:
        for n in (1, 2):
            procs.append(start_serve({**env, "INTAKE_PORT": str(free_port())}, tmp_path / f"serve{n}",
                                     tmp_path / f"serve{n}.log"))
        yield procs
    finally:
        for proc in procs:
            stop(proc)


async def test_two_replicas_one_sealer_fenced_and_taken_over_mid_burst(
        settings: Settings, rclient: redis.Redis, two_serves: list[subprocess.Popen[bytes]], tmp_path: Path) -> None:
    audit = AuditLog(rclient, load_secret(settings, "audit"), settings.key_prefix,
                     checkpoint=settings.keys["audit"].parent / "audit.checkpoint")
    by_pid = {proc.pid: proc for proc in two_serves}
    first = by_pid[wait_until(lambda: holder_pid(rclient), "a serve to take the sealer lease")]  # type: ignore[index]
    other = next(p for p in two_serves if p is not first)
    ideas: dict[str, str] = {}
    async with aiohttp.ClientSession() as http:
        # Fencing: the holder is paused past its lease; the other takes over and seals; the old
        # holder resumes and finds itself fenced off.
        os.kill(first.pid, signal.SIGSTOP)
        await asyncio.to_thread(wait_until, lambda: holder_pid(rclient) == other.pid, "the takeover", 60)
        for i in range(5):
            ideas[f"trig.stop{i}"] = await deliver(http, [other.port], f"trig.stop{i}", f"while paused {i}")
        os.kill(first.pid, signal.SIGCONT)
        await asyncio.to_thread(wait_until, lambda: "lease lost" in (tmp_path / "serve1.log").read_text()
                                + (tmp_path / "serve2.log").read_text(), "the old holder to notice it lost the lease")
        assert holder_pid(rclient) == other.pid

        # A burst over both; the holder (now `other`) is SIGKILLed in the middle of it.
        triggers = [f"trig.burst{i:03d}" for i in range(60)]
        sem = asyncio.Semaphore(6)

        async def one(i: int, trigger: str) -> None:
            target = (first, other)[i % 2]
            async with sem:
                if i == 30:
                    other.kill()
                # The killed replica refuses: Slack retries, and the retry reaches the survivor.
                ideas[trigger] = await deliver(http, [target.port, first.port], trigger, f"burst {i}")

        await asyncio.gather(*(one(i, t) for i, t in enumerate(triggers)))
        other.wait(timeout=10)
        # A retry of everything changes nothing: capture is idempotent on the delivery id.
        for trigger in triggers[::7]:
            assert await deliver(http, [first.port], trigger, "again") == ideas[trigger]

    await asyncio.to_thread(wait_until, lambda: holder_pid(rclient) == first.pid, "the survivor to take the lease", 60)
    await asyncio.to_thread(wait_until, lambda: audit.verify().unsealed == 0, "every event to be sealed")
    report = audit.verify()
    assert report.anomalies == ()
    assert rclient.hlen(audit.seals) == rclient.xlen(audit.stream) == report.events
    counts = captures(audit)
    assert len(set(ideas.values())) == len(ideas) == 65
    assert {counts[idea] for idea in ideas.values()} == {1}  # each event once, each sealed once
    env = {"INTAKE_DATA_DIR": str(first.data_dir), "PATH": os.environ["PATH"]}  # type: ignore[attr-defined]
    link_os_user(settings)  # the CLI reads as the OS user, who must be a person
    verify = subprocess.run([sys.executable, "-m", "intake", "audit", "verify"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr


async def test_redis_sigkilled_mid_burst_quick_503s_one_line_and_recovery(
        settings: Settings, sim: SlackSim, tmp_path: Path) -> None:
    env = serve_env(settings, sim, embedded=True)
    log = tmp_path / "serve.log"
    serve = start_serve(env, settings.data_dir, log)
    embedded = EmbeddedRedis(settings.data_dir)
    try:
        pid = int((settings.data_dir / "redis" / "redis.pid").read_text())
        statuses: dict[str, list[int]] = {}
        ideas: dict[str, str] = {}
        async with aiohttp.ClientSession() as http:
            async def burst(start: int, count: int) -> None:
                async def one(i: int) -> None:
                    status, idea = await command(http, serve.port, f"trig.r{i:04d}", f"idea {i}")  # type: ignore[attr-defined]
                    statuses.setdefault(f"trig.r{i:04d}", []).append(status)
                    if idea:
                        ideas[f"trig.r{i:04d}"] = idea
                await asyncio.gather(*(one(i) for i in range(start, start + count)))

            await burst(0, 20)
            os.kill(pid, signal.SIGKILL)
            n = 20
            # Keep sending while it is down: every answer is a 503 or a 200 inside the 3 s
            # client timeout, until serve has restarted Redis and captures again.
            deadline = time.monotonic() + 60
            while True:
                await burst(n, 5)
                n += 5
                recent = [statuses[f"trig.r{i:04d}"][-1] for i in range(n - 5, n)]
                if any(s == 503 for v in statuses.values() for s in v) and recent == [200] * 5:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"serve did not recover: {recent}")
                await asyncio.sleep(0.1)
            assert {s for v in statuses.values() for s in v} <= {200, 503}
            # Slack retries what got a 503; nothing answered 200 is filed twice.
            for trigger in sorted(statuses):
                status, idea = await command(http, serve.port, trigger, "retry")  # type: ignore[attr-defined]
                assert status == 200
                assert ideas.setdefault(trigger, idea) == idea  # type: ignore[arg-type]
        assert int((settings.data_dir / "redis" / "redis.pid").read_text()) != pid  # a new server
        client = make_client(embedded.url_for("broker"))
        audit = AuditLog(client, load_secret(settings, "audit"), settings.key_prefix,
                         checkpoint=settings.keys["audit"].parent / "audit.checkpoint")
        counts = captures(audit)
        assert len(set(ideas.values())) == len(ideas) == n
        assert {counts[idea] for idea in ideas.values()} == {1}
        await asyncio.to_thread(wait_until, lambda: audit.verify().unsealed == 0, "sealing to catch up")
        assert audit.verify().anomalies == ()
        client.close()
    finally:
        stop(serve)
    text = log.read_text()
    assert "Traceback" not in text, text
    ours = [line for line in text.splitlines() if " aiohttp.access: " not in line]
    outage = [line for line in ours if "Redis" in line or "WARNING" in line or "ERROR" in line]
    assert any("Redis unavailable" in line for line in outage), text
    assert any("restarted it" in line for line in outage), text
    assert len(outage) <= 8, "\n".join(outage)  # one outage, a handful of lines: not one per request


async def test_an_edge_serve_captures_while_a_full_serve_seals_and_posts_its_cards(
        settings: Settings, rclient: redis.Redis, sim: SlackSim, tmp_path: Path) -> None:
    """`intake serve --edge` only answers requests: the full serve on the same Redis holds the
    sealer lease, seals what the edge appended and posts each card once; with the full serve
    gone the edge still captures, and what it appends waits for the next full serve to seal it."""
    audit = AuditLog(rclient, load_secret(settings, "audit"), settings.key_prefix,
                     checkpoint=settings.audit_checkpoint)
    env = serve_env(settings, sim, embedded=False)
    edge = start_serve({**env, "INTAKE_EDGE": "1"}, tmp_path / "edge", tmp_path / "edge.log")
    full = None
    try:
        full = start_serve({**env, "INTAKE_PORT": str(free_port())}, tmp_path / "full", tmp_path / "full.log")
        wait_until(lambda: holder_pid(rclient) == full.pid, "the full serve to take the sealer lease")
        ideas = []
        async with aiohttp.ClientSession() as http:
            for i in range(8):
                status, idea = await command(http, edge.port, f"trig.edge{i}", f"through the edge {i}")
                assert status == 200
                ideas.append(idea)
            await asyncio.to_thread(wait_until, lambda: audit.verify().unsealed == 0, "the full serve to seal")
            await asyncio.to_thread(wait_until, lambda: all(sim.cards_of(i) for i in ideas), "every card")
            assert all(len(sim.cards_of(i)) == 1 for i in ideas), "each card posted once, by the full serve"
            assert holder_pid(rclient) == full.pid, "the edge never took the lease from the full serve"
            stop(full)
            full = None
            status, late = await command(http, edge.port, "trig.edge-late", "while no full serve runs")
            assert status == 200 and late not in ideas
        assert audit.verify().unsealed >= 1, "an edge leaves sealing to a full serve"
        full = start_serve({**env, "INTAKE_PORT": str(free_port())}, tmp_path / "full", tmp_path / "full2.log")
        await asyncio.to_thread(wait_until, lambda: audit.verify().unsealed == 0, "a new full serve to seal it")
        assert audit.verify().anomalies == ()
        assert b"edge: answering requests only" in (tmp_path / "edge.log").read_bytes()
        assert b"Traceback" not in (tmp_path / "edge.log").read_bytes()
    finally:
        if full is not None:
            stop(full)
        stop(edge)
