"""Logs carry ids and outcomes, never bodies, codes, tokens or secrets: a real `intake serve`
logging JSON at DEBUG is driven with secrets in every part of its requests, and the captured
log is grepped for them."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydantic import SecretStr

from intake.core.logs import REDACTED, configure_logging
from intake.core.settings import Settings
from tests.ports import free_port

INTAKE = [sys.executable, "-m", "intake"]


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_serve_logs_json_without_bodies_codes_or_tokens(tmp_path: Path) -> None:
    data, port, log_path = tmp_path / "d", free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env.update(INTAKE_DATA_DIR=str(data), INTAKE_PORT=str(port), INTAKE_LOG_FORMAT="json", INTAKE_LOG_LEVEL="debug")
    with log_path.open("w") as log:
        serve = subprocess.Popen([*INTAKE, "serve", "--dev"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if serve.poll() is not None:
                pytest.fail(f"serve exited: {log_path.read_text()}")
            try:
                urllib.request.urlopen(f"{base}/readyz", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("serve did not get ready")
                time.sleep(0.1)
        token = (data / "dev-erin.token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        body = json.dumps({"text": "BODY-MARKER-rotate the prod DB password hunter2xyz"}).encode()
        assert _post(f"{base}/api/v1/ideas?api_key=QUERY-MARKER-s3cr3t", body, auth) in (200, 201)
        # A code in a body, a refused one; a forged token; garbage JSON; a Slack request.
        assert _post(f"{base}/api/v1/ideas/I-000000000000/promote",
                     json.dumps({"repo": "acme/web", "change_type": "docs", "code": "CODE-MARKER-77"}).encode(),
                     auth) >= 400
        assert _post(f"{base}/api/v1/ideas", body, {**auth, "Authorization": "Bearer FORGED-MARKER-tok"}) == 401
        assert _post(f"{base}/api/v1/ideas", b'{"text": "JSON-MARKER', auth) == 400
        _post(f"{base}/slack/events", b"token=SLACK-MARKER&command=%2Fintake", {"X-Slack-Signature": "v0=SIG-MARKER"})
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=60)

    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])
    # The requests were logged (the test would see them): method, path and status only.
    access = [line["msg"] for line in lines if line["logger"] == "aiohttp.access"]
    assert any(m.startswith("POST /api/v1/ideas 401 ") for m in access), access
    assert any(m.startswith("POST /api/v1/ideas/{id}/promote 4") for m in access), access  # the route, not its values
    secrets = [token, "BODY-MARKER", "hunter2xyz", "QUERY-MARKER", "CODE-MARKER", "FORGED-MARKER", "JSON-MARKER",
               "SLACK-MARKER", "SIG-MARKER", *(p.read_text().strip() for p in (data / "keys").glob("redis-*.pass"))]
    for secret in secrets:
        assert secret not in text, f"{secret[:12]}… is in the log"


def test_known_secrets_and_their_shapes_are_redacted(settings: Settings) -> None:
    with_secrets = settings.model_copy(update={
        "slack_bot_token": SecretStr("xoxb-1111-2222-abcdef"), "slack_signing_secret": SecretStr("8f14e45fceea167a5a36"),
        "log_format": "text", "log_level": "DEBUG"})
    out = io.StringIO()
    handler = configure_logging(with_secrets, stream=out)
    try:
        log = logging.getLogger("intake.test")
        log.info("signing secret %s", "8f14e45fceea167a5a36")
        log.info("a token shaped like Slack's: xoxp-9-9-zz and a header Bearer abc.def")
        log.info("redis at redis://intake-broker:pw-Very-Secret@host:6379/0")
        try:
            raise ValueError("xoxb-1111-2222-abcdef")
        except ValueError:
            log.exception("failed")
    finally:
        logging.getLogger().removeHandler(handler)
    text = out.getvalue()
    for secret in ("8f14e45fceea167a5a36", "xoxp-9-9-zz", "abc.def", "pw-Very-Secret", "xoxb-1111"):
        assert secret not in text
    assert text.count(REDACTED) == 6  # four lines, and the traceback's source line and message
    assert "ValueError" in text  # the traceback is kept, scrubbed


def test_log_settings_are_validated(settings: Settings) -> None:
    from intake.core.errors import ConfigError
    from intake.core.settings import load_settings

    assert load_settings(_env_file=None, log_format="JSON", log_level="warning").log_level == "WARNING"
    with pytest.raises(ConfigError, match="^INTAKE_LOG_FORMAT: "):
        load_settings(_env_file=None, log_format="xml")


def test_a_bad_format_string_does_not_raise() -> None:
    """The redactor formats each record itself; a record whose arguments do not fit its format
    is still logged (as its format), never raised out of the log call."""
    from intake.core.logs import Redactor

    record = logging.LogRecord("intake.test", logging.WARNING, __file__, 1, "two %s %s", ("one",), None)
    assert Redactor([]).filter(record) is True
    assert record.getMessage() == "two %s %s (unformattable arguments)"
