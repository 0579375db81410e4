"""The CLI talks only to an intake broker, and says where it tried: a foreign HTTP server on
loopback (one that even answers in the broker's own error format) is refused before any token is
sent; a closed port and refused credentials name the URL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from intake.api import identity
from intake.cli.client import ApiClient, ApiError
from tests.api_harness import RunningBroker

TOKEN = "itk_" + "Q" * 43  # a token the foreign server must never see


class _Foreign(BaseHTTPRequestHandler):
    """Answers every request with a plausible JSON body, as another service on :8080 might; it
    records the headers it was sent."""

    seen: list[dict[str, str]] = []

    def _answer(self) -> None:
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        status, body = (401, {"error": "unauthenticated", "message": "send Authorization: Bearer <token>"}) \
            if "unauth" in self.server.mode else (200, {"id": "I-000000000000", "created": True, "title": "x"})  # type: ignore[attr-defined]
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(params=["unauth", "ok"])
def foreign(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[dict[str, str]], int]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    server.mode = request.param  # type: ignore[attr-defined]
    _Foreign.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Foreign.seen, 401 if request.param == "unauth" else 200
    finally:
        server.shutdown()
        server.server_close()


def _cli(tmp_path: Path, url: str, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env.update(INTAKE_URL=url, INTAKE_DATA_DIR=str(tmp_path / "d"))
    if token:
        env["INTAKE_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "intake", *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_foreign_server_is_refused_by_url_and_never_sees_the_token(
        tmp_path: Path, foreign: tuple[str, list[dict[str, str]], int]) -> None:
    url, seen, status = foreign
    for args in (("list",), ("idea", "hello")):
        done = _cli(tmp_path, url, *args)
        assert done.returncode != 0
        assert done.stderr.strip() == (f"intake: {url} answered HTTP {status} "
                                       f"but is not an intake broker (no {identity.HEADER} header); refusing to "
                                       "talk to it: check INTAKE_URL"), done.stderr
    assert seen, "the CLI did ask (the identity route), so the refusal came from its answer"
    assert all("authorization" not in headers for headers in seen), "the token went to a foreign server"
    assert all(TOKEN not in json.dumps(headers) for headers in seen)


def test_without_a_token_a_foreign_answer_is_still_refused(
        tmp_path: Path, foreign: tuple[str, list[dict[str, str]], int]) -> None:
    url, _, _ = foreign
    done = _cli(tmp_path, url, "list", token=None)
    assert done.returncode != 0 and f"intake: {url} answered HTTP" in done.stderr
    assert "is not an intake broker" in done.stderr


def test_a_closed_port_names_the_url(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        done = _cli(tmp_path, url, "list")
    assert done.returncode != 0
    assert done.stderr.strip() == (f"intake: cannot reach the broker at {url} (ConnectionRefusedError); "
                                   "is `intake serve` running? (INTAKE_URL)")


def test_the_real_broker_identifies_itself_and_a_refused_token_names_its_url(api: RunningBroker) -> None:
    client = ApiClient(api.tcp_url, TOKEN)
    with pytest.raises(ApiError) as refused:
        client.call("GET", "/me")
    assert refused.value.status == 401
    assert str(refused.value).startswith(f"the broker at {api.tcp_url} did not accept the credentials: ")
    # The identity route needs no credentials, and every answer (a 404 too) carries the header.
    status, _, raw = ApiClient(api.tcp_url).request("GET", identity.PATH)
    assert status == 200 and json.loads(raw) == identity.SERVICE
    status, _, _ = ApiClient(api.socket_url).request("GET", "/no-such-route")
    assert status == 404  # it got here, so the 404 carried the header too
