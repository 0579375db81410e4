"""Shape checks on a verified Slack HTTP body, before bolt builds a request from it.

Bolt assumes Slack's shapes: a signed body whose ``payload`` is a JSON list, or whose
``event`` is a string, makes it raise while building its context (a 500 and a traceback). A
signature only proves Slack (or someone with the secret) sent the bytes, not that they are
well-formed, so :func:`parse_slack_body` checks the shapes intake and bolt rely on and refuses
anything else with :class:`SlackBodyError` (a 4xx). Pure functions, no I/O.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from typing import Any

from intake.core.errors import IntakeError

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"

# Interactive payload types that carry a clicking/submitting user, and what else each needs.
_NEEDS: dict[str, tuple[tuple[str, type], ...]] = {
    "block_actions": (("actions", list),),
    "view_submission": (("view", dict),),
    "view_closed": (("view", dict),),
    "message_action": (("message", dict), ("channel", dict)),
    "shortcut": (),
}
# String fields of an Events API event, when present.
_EVENT_STRINGS = ("type", "user", "text", "channel", "ts", "bot_id", "thread_ts")


class SlackBodyError(IntakeError):
    """A verified Slack body has the wrong shape; ``status`` is the HTTP answer (400 or 415)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        self.reason, self.status = reason, status
        super().__init__(f"malformed Slack request: {reason}")


@dataclass(frozen=True)
class SlackBody:
    """A verified body that passed the checks: its text and, for a slash command, its fields."""

    text: str
    command: dict[str, str] | None = None


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise SlackBodyError(f"{what}_not_json") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise SlackBodyError(f"{what}_not_an_object_with_a_type")
    return data


def check_interactive(payload: dict[str, Any]) -> None:
    """An interactivity payload: a known type, a user object with a string id, its parts."""
    kind = payload["type"]
    if kind not in _NEEDS:
        raise SlackBodyError("unknown_payload_type")
    user = payload.get("user")
    if not isinstance(user, dict) or not isinstance(user.get("id"), str):
        raise SlackBodyError("payload_user")
    for key, shape in _NEEDS[kind]:
        if not isinstance(payload.get(key), shape):
            raise SlackBodyError(f"payload_{key}")
    # Non-empty: bolt reads actions[0] of every block_actions payload (an empty list was a 500).
    if kind == "block_actions" and (not payload["actions"] or not all(isinstance(a, dict) for a in payload["actions"])):
        raise SlackBodyError("payload_actions")
    for key in ("team", "container", "channel"):
        if payload.get(key) is not None and not isinstance(payload[key], dict):
            raise SlackBodyError(f"payload_{key}")
    view = payload.get("view")
    if isinstance(view, dict) and not isinstance(view.get("state", {}), dict):
        raise SlackBodyError("payload_view_state")
    if isinstance(view, dict) and not isinstance(view.get("type"), str):  # bolt indexes view["type"]
        raise SlackBodyError("payload_view_type")


def check_event(data: dict[str, Any]) -> None:
    """An Events API body: url_verification with a challenge, or event_callback with an event."""
    if data["type"] == "url_verification":
        if not isinstance(data.get("challenge"), str):
            raise SlackBodyError("challenge")
        return
    if data["type"] != "event_callback":
        raise SlackBodyError("unknown_event_type")
    event = data.get("event")
    if not isinstance(event, dict):
        raise SlackBodyError("event")
    for key in _EVENT_STRINGS:
        if event.get(key) is not None and not isinstance(event[key], str):
            raise SlackBodyError(f"event_{key}")
    for key in ("event_id", "team_id"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise SlackBodyError(key)
    if data.get("authorizations") is not None and not isinstance(data["authorizations"], list):
        raise SlackBodyError("authorizations")


def parse_slack_body(content_type: str, raw: bytes) -> SlackBody:
    """Check a verified body's encoding and shape; a slash command's fields come back parsed.

    Raises:
        SlackBodyError: 415 for a content type Slack never sends, 400 for anything malformed.
    """
    if content_type not in (FORM, JSON):
        raise SlackBodyError("content_type", status=415)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SlackBodyError("not_utf8") from None
    if content_type == JSON:
        check_event(_json_object(text, "body"))
        return SlackBody(text)
    try:
        form = urllib.parse.parse_qs(text, keep_blank_values=True, strict_parsing=bool(text),
                                     errors="strict", max_num_fields=100)
    except (ValueError, UnicodeDecodeError):
        raise SlackBodyError("form") from None
    if any(len(values) > 1 for values in form.values()):
        raise SlackBodyError("repeated_field")  # which copy would bolt use? refuse both
    fields = {key: values[0] for key, values in form.items()}
    if "payload" in fields:
        check_interactive(_json_object(fields["payload"], "payload"))
        return SlackBody(text)
    if fields.get("ssl_check") == "1" and "command" not in fields:
        return SlackBody(text)  # Slack's periodic certificate check; bolt answers it
    if not fields.get("command", "").startswith("/") or not fields.get("user_id"):
        raise SlackBodyError("not_a_command")
    return SlackBody(text, command=fields)
