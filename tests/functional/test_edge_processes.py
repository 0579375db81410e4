"""`intake serve --edge --processes N` as real processes: every process on the port verifies,
captures and refuses on its own (each connection is traced to the process that accepted it),
each request is captured exactly once, and the processes live and die together."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import redis

from intake.channels.slack.verify import compute_signature
from intake.core.settings import Settings
from tests.functional.test_replicas import CAPTURED, SECRET, captures, serve_env, start_serve, stop, wait_until
from tests.slack_sim import SlackSim

CONNECTIONS = 24  # spread by the kernel's hash over the processes: all on one of two is 2**-23


@pytest.fixture
async def sim() -> AsyncIterator[SlackSim]:
    server = SlackSim()
    await server.start()
    yield server
    await server.stop()


def request(port: int, trigger: str, *, secret: str = SECRET) -> bytes:
    body = urllib.parse.urlencode({
        "token": "x", "team_id": "T00000001", "channel_id": "C0GENERAL1", "user_id": "UERIN00001",
        "command": "/intake", "text": f"file {trigger}", "trigger_id": trigger,
    }).encode()
    ts = str(int(time.time()))
    sig = compute_signature(body=body, timestamp=ts, signing_secret=secret)
    return (f"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
            f"X-Slack-Request-Timestamp: {ts}\r\nX-Slack-Signature: {sig}\r\n\r\n").encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> tuple[int, bytes]:
    writer.write(raw)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return int(head.split(b" ", 2)[1]), await reader.readexactly(length)


def acceptor(pids: list[int], port: int, client_port: int) -> int:
    """The process holding the server side of the connection from ``client_port``."""
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.raddr and conn.raddr.port == client_port:
                return pid
    raise AssertionError(f"no process of {pids} holds the connection from port {client_port}")


def edge_env(settings: Settings, sim: SlackSim, processes: int) -> dict[str, str]:
    return {**serve_env(settings, sim, embedded=False), "INTAKE_EDGE": "1", "INTAKE_EDGE_PROCESSES": str(processes)}


def children_ready(proc: subprocess.Popen[bytes], count: int) -> list[psutil.Process]:
    """The serve's extra processes, once ``count`` are running and each has opened its Redis
    connection pool (its broker is open)."""
    kids = psutil.Process(proc.pid).children()
    return kids if len(kids) == count and all(k.net_connections(kind="unix") for k in kids) else []


async def test_two_edge_processes_each_capture_once_and_each_refuses_forgeries(
        settings: Settings, rclient: redis.Redis, sim: SlackSim, tmp_path: Path) -> None:
    edge = start_serve(edge_env(settings, sim, 2), tmp_path / "edge", tmp_path / "edge.log")
    try:
        port = edge.port  # type: ignore[attr-defined]
        kids = await asyncio.to_thread(wait_until, lambda: children_ready(edge, 1), "the second edge process")
        pids = [edge.pid, kids[0].pid]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]
        owner = {}
        for i, (reader, writer) in enumerate(conns):
            status, body = await exchange(reader, writer, request(port, f"trig.proc{i}"))
            while status == 503:  # the process this connection landed on is still starting
                status, body = await exchange(reader, writer, request(port, f"trig.proc{i}"))
            assert status == 200 and CAPTURED.fullmatch(json.loads(body)["text"]), body
            owner[i] = acceptor(pids, port, writer.get_extra_info("sockname")[1])
        assert set(owner.values()) == set(pids), "both processes accepted connections and captured"

        # A forged signature on every connection, so on every process: refused, nothing written.
        before = (rclient.xlen("intake:audit"), len(rclient.keys("intake:idea:*")))
        for i, (reader, writer) in enumerate(conns):
            status, _ = await exchange(reader, writer, request(port, f"trig.forged{i}", secret="not-the-secret"))
            assert status == 401, (i, owner[i])
        assert (rclient.xlen("intake:audit"), len(rclient.keys("intake:idea:*"))) == before

        # The same genuine requests again, each on another connection: the first ideas, nothing new.
        again = []
        for i, (reader, writer) in enumerate(conns):
            status, body = await exchange(reader, writer, request(port, f"trig.proc{(i + 1) % CONNECTIONS}"))
            assert status == 200
            again.append(CAPTURED.fullmatch(json.loads(body)["text"])[1])  # type: ignore[index]
        for _, writer in conns:
            writer.close()
        counts = captures(_audit(settings, rclient))
        assert len(counts) == CONNECTIONS and set(counts.values()) == {1}, counts
        assert set(again) == set(counts), "a retry of a delivery gets its first idea, whichever process answers"
        assert b"2 processes on this port" in (tmp_path / "edge.log").read_bytes()
    finally:
        stop(edge)
    assert b"Traceback" not in (tmp_path / "edge.log").read_bytes()


def _audit(settings: Settings, rclient: redis.Redis):  # type: ignore[no-untyped-def]
    from intake.audit.log import AuditLog
    from intake.protocol.keyfiles import load_secret

    return AuditLog(rclient, load_secret(settings, "audit"), settings.key_prefix, checkpoint=settings.audit_checkpoint)


async def test_edge_processes_live_and_die_together(settings: Settings, sim: SlackSim, tmp_path: Path) -> None:
    # The parent SIGKILLed (no clean-up of its own): its extra processes stop on their own.
    edge = start_serve(edge_env(settings, sim, 3), tmp_path / "edge", tmp_path / "edge.log")
    kids = await asyncio.to_thread(wait_until, lambda: children_ready(edge, 2), "the extra edge processes")
    edge.kill()
    edge.wait()
    gone = await asyncio.to_thread(psutil.wait_procs, kids, timeout=30)
    assert not gone[1], f"still running after their parent died: {gone[1]}"

    # An extra process dying stops the parent, with one line and a non-zero exit.
    edge = start_serve(edge_env(settings, sim, 2), tmp_path / "edge2", tmp_path / "edge2.log")
    try:
        kids = await asyncio.to_thread(wait_until, lambda: children_ready(edge, 1), "the extra edge process")
        os.kill(kids[0].pid, signal.SIGKILL)
        assert await asyncio.to_thread(edge.wait, 30) != 0
    finally:
        stop(edge)
    log = (tmp_path / "edge2.log").read_bytes()
    assert f"edge process {kids[0].pid} exited (-9); stopping this serve".encode() in log, log
    assert b"Traceback" not in log

    # An extra process stopped cleanly (signalled, as Ctrl-C or a service manager does): the
    # serve stops too, with a zero exit.
    edge = start_serve(edge_env(settings, sim, 2), tmp_path / "edge3", tmp_path / "edge3.log")
    try:
        kids = await asyncio.to_thread(wait_until, lambda: children_ready(edge, 1), "the extra edge process")
        os.kill(kids[0].pid, signal.SIGTERM)
        assert await asyncio.to_thread(edge.wait, 30) == 0
    finally:
        stop(edge)
    log = (tmp_path / "edge3.log").read_bytes()
    assert f"edge process {kids[0].pid} stopped; stopping this serve".encode() in log, log


def test_processes_without_edge_is_one_line_and_a_non_zero_exit(settings: Settings, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env.update(INTAKE_DATA_DIR=str(settings.data_dir), INTAKE_POLICY=str(settings.policy_path))
    done = subprocess.run([sys.executable, "-m", "intake", "serve", "--processes", "2"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "intake: --processes: only an edge (--edge) runs as several processes; start full serves as separate replicas"
    ], done.stderr
