"""Checking the bot token with Slack's ``auth.test`` before saying "Slack on".

A token Slack refuses (revoked, mistyped, another workspace's) is a configuration error: the
broker would take requests and then fail to post every card. A Slack that cannot be reached is
not: cards wait in the outbox until it answers, so start-up goes on and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError

from intake.core.errors import ConfigError
from intake.core.settings import Settings

#: auth.test errors that mean the token itself is bad (https://docs.slack.dev/reference/methods/auth.test).
REFUSED = frozenset({"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
                     "no_permission", "org_login_required", "ekm_access_denied", "missing_scope",
                     "not_allowed_token_type", "team_access_not_granted"})


@dataclass(frozen=True)
class BotIdentity:
    """Who the token is: the bot user and the workspace, as Slack says."""

    user_id: str
    team_id: str
    team: str


class SlackUnreachable(Exception):
    """Slack did not answer auth.test (network, 5xx, rate limit): the token is unverified."""


def auth_test(settings: Settings, *, timeout: float = 5.0) -> BotIdentity:
    """Call ``auth.test`` with SLACK_BOT_TOKEN (SLACK_API_URL honoured).

    Raises :class:`ConfigError` (one line naming the variable and Slack's error code) when Slack
    refuses the token, :class:`SlackUnreachable` when Slack could not be asked. The token never
    appears in either message."""
    if settings.slack_bot_token is None:
        raise ConfigError("SLACK_BOT_TOKEN: not set")
    kwargs = {"base_url": settings.slack_api_url} if settings.slack_api_url else {}
    client = WebClient(token=settings.slack_bot_token.get_secret_value(), timeout=int(max(1, timeout)), **kwargs)
    try:
        resp = client.auth_test()
    except SlackApiError as exc:
        error = str(exc.response.get("error", "unknown")) if exc.response is not None else "unknown"
        status = exc.response.status_code if exc.response is not None else 0
        if error in REFUSED or status in (401, 403):
            raise ConfigError(f"SLACK_BOT_TOKEN: Slack refused it (auth.test: {error})") from None
        raise SlackUnreachable(f"auth.test answered {status} {error}") from None
    except (SlackClientError, OSError, ValueError) as exc:
        raise SlackUnreachable(f"auth.test failed: {type(exc).__name__}") from None
    return BotIdentity(user_id=str(resp.get("user_id", "")), team_id=str(resp.get("team_id", "")),
                       team=str(resp.get("team", "")))
