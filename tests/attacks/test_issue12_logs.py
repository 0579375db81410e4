"""Issue 12 attacks on the logs: someone who reads the broker's logs (a log shipper, a shared
journal, a support bundle) must not learn a secret from them.

A real ``intake serve --dev`` is fed requests whose paths carry secrets, and the redactor is fed
every secret setting the broker holds.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydantic import SecretStr

from intake.core.logs import REDACTED, configure_logging
from intake.core.settings import Settings
from tests.ports import free_port
from tests.test_logs import INTAKE


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=20) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_access_log_never_shows_an_enrolment_link_token(tmp_path: Path) -> None:
    """The enrolment link ``/console/enrol/<token>`` is a bearer secret (whoever opens it first
    reveals the approver's TOTP secret). The access log must name the route, not the token."""
    data, port, log_path = tmp_path / "d", free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env.update(INTAKE_DATA_DIR=str(data), INTAKE_PORT=str(port), INTAKE_LOG_FORMAT="text", INTAKE_LOG_LEVEL="info")
    token = "ENROLTOKEN" + secrets.token_urlsafe(16)
    with log_path.open("w") as log:
        serve = subprocess.Popen([*INTAKE, "serve", "--dev"], env=env, stdout=log, stderr=log)
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
        assert _get(f"{base}/console/enrol/{token}") == 404  # unknown link: the route still ran
        assert _get(f"{base}/console/enrol/{token}x/reveal") in (404, 405)
        assert _get(f"{base}/nowhere/{token}") == 404
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=60)
    text = log_path.read_text()
    assert "GET /console/enrol/{token} 404" in text, text  # the request is on the record, by route
    assert token not in text


def test_every_secret_setting_is_redacted(settings: Settings) -> None:
    """The redactor's promise is every secret the settings hold, not only Slack's and Redis's:
    the forge and tracker tokens and webhook secrets too (a library's error message or a
    traceback's locals line may carry them)."""
    values = {name: SecretStr(f"{name.upper()}-{secrets.token_hex(8)}") for name, field in Settings.model_fields.items()
              if field.annotation == SecretStr | None and name != "redis_url"}
    assert {"github_token", "gitlab_token", "jira_token", "github_webhook_secret", "gitlab_webhook_token",
            "gitlab_signing_token", "jira_webhook_secret"} <= set(values)
    out = io.StringIO()
    handler = configure_logging(settings.model_copy(update={**values, "log_format": "json", "log_level": "DEBUG"}),
                                stream=out)
    try:
        for value in values.values():
            logging.getLogger("intake.test").warning("request failed: %s", value.get_secret_value())
    finally:
        logging.getLogger().removeHandler(handler)
    text = out.getvalue()
    leaked = [name for name, value in values.items() if value.get_secret_value() in text]
    assert leaked == [] and text.count(REDACTED) == len(values)
