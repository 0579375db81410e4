"""Opening a pull request for a pushed branch, in the shape of GitHub's REST API.

``POST {api_url}/repos/{owner}/{repo}/pulls`` with ``{"title", "head", "base", "body", "draft"}`` and a
bearer token. Redirects are not followed (a redirect would carry the token to wherever it
points), responses are read up to a small bound, and errors are one line without the token.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from intake.core.errors import IntakeError

_MAX_RESPONSE = 1024 * 1024


class ForgeError(IntakeError):
    """The forge call failed; the message is one line and never holds the token."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises HTTPError for the 3xx


def create_pull_request(
    *,
    api_url: str,
    repository: str,
    token: str,
    title: str,
    head: str,
    base: str,
    body: str,
    draft: bool = False,
    timeout: float = 30.0,
) -> str:
    """Open a pull request (a draft when ``draft``) and return its ``html_url``. Raises
    :class:`ForgeError`."""
    owner, _, name = repository.partition("/")
    url = f"{api_url.rstrip('/')}/repos/{quote(owner, safe='')}/{quote(name, safe='')}/pulls"
    payload = json.dumps({"title": title, "head": head, "base": base, "body": body, "draft": draft}).encode()
    request = urllib.request.Request(
        url,
        data=payload,
        method="POST",
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "Content-Type": "application/json",
            "User-Agent": "intake-worker",
            "X-GitHub-Api-Version": "2022-11-28",
        },
    )
    opener = urllib.request.build_opener(_NoRedirect())
    try:
        with opener.open(request, timeout=timeout) as response:
            raw = response.read(_MAX_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the open response
        raise ForgeError(f"pull request not created: the forge answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ForgeError(f"pull request not created: cannot reach the forge ({type(exc).__name__})") from None
    if len(raw) > _MAX_RESPONSE:
        raise ForgeError("pull request not created: the forge's answer is too large")
    try:
        html_url = json.loads(raw).get("html_url")
    except (ValueError, AttributeError):
        html_url = None
    if not isinstance(html_url, str) or not html_url.startswith(("https://", "http://")):
        raise ForgeError("pull request created but the forge did not say where (no html_url)")
    return html_url
