"""Issue 13: a signed Slack interactivity body whose view has no ``type`` (found by the edge
property test): slack-bolt indexes ``view["type"]`` while matching listeners and answered 500
with a traceback; the edge's shape check refuses it first."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest

from intake.channels.slack.parse import FORM, SlackBodyError, parse_slack_body


@pytest.mark.parametrize("view", [{}, {"type": None}, {"type": 3}, {"type": ["modal"]}])
def test_a_view_without_a_string_type_is_refused_before_bolt(view: dict) -> None:
    payload = {"type": "view_submission", "user": {"id": ""}, "view": view | {"callback_id": "intake_promote_submit"}}
    with pytest.raises(SlackBodyError) as refused:
        parse_slack_body(FORM, urlencode({"payload": json.dumps(payload)}).encode())
    assert refused.value.status == 400 and refused.value.reason == "payload_view_type"


def test_a_view_with_its_type_still_passes() -> None:
    payload = {"type": "view_submission", "user": {"id": "UERIN00001"}, "view": {"type": "modal", "state": {}}}
    parse_slack_body(FORM, urlencode({"payload": json.dumps(payload)}).encode())
