"""Starting the Slack channel logs no bolt warning: bolt reads SLACK_BOT_TOKEN from the
environment even when given a client, and warned on every start that the token is unused."""

from __future__ import annotations

import logging
import secrets

import pytest
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

import intake.channels.slack.transport  # noqa: F401  (installs the filter, as serve does by importing it)


async def test_no_client_given_warning_at_start(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-0000-env")
    with caplog.at_level(logging.WARNING, logger="slack_bolt"):
        AsyncApp(client=AsyncWebClient(token="xoxb-0000-env"), signing_secret=secrets.token_hex(32),
                 process_before_response=True)
        assert not [r for r in caplog.records if r.name.startswith("slack_bolt")], caplog.text
        # Only that one line is dropped: bolt's other warnings still reach the log.
        logging.getLogger("slack_bolt.AsyncApp").warning("Unhandled request")
    assert "Unhandled request" in caplog.text
