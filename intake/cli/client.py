"""The CLI's side of the API: a small blocking JSON client over the broker's unix socket or TCP.

The CLI holds no broker key. On the socket the kernel tells the broker who the caller is; over
TCP the caller sends ``INTAKE_TOKEN`` as a bearer token (never over the socket, never logged).

Whatever answers must say it is an intake broker (:mod:`intake.api.identity`): over TCP the client
asks the unauthenticated identity route before it sends a token, and every answer must carry the
header; anything else is refused by URL. Every connection or authentication error names the URL.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from intake.api import identity
from intake.core.errors import IntakeError
from intake.core.settings import Settings

DEFAULT_TCP = "http://127.0.0.1:8080"


class ApiError(IntakeError):
    """The broker refused: ``reason`` is its stable tag, ``status`` the HTTP status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status, self.reason = status, reason
        super().__init__(message)


class UnixConnection(http.client.HTTPConnection):
    """HTTP over the broker's unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def broker_url(settings: Settings) -> str:
    """INTAKE_URL, else the data dir's socket when it exists, else the default TCP address."""
    if settings.url:
        return settings.url
    sock = settings.data_dir / "intake.sock"
    return f"unix://{sock}" if sock.exists() else DEFAULT_TCP


class ApiClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("unix", "http", "https") or (parts.scheme != "unix" and not parts.hostname):
            raise IntakeError(f"INTAKE_URL: {url!r} is not unix:///path or http(s)://host:port")
        self.url, self._parts, self._token, self._timeout = url, parts, token, timeout
        self._identified = False

    def _connection(self) -> http.client.HTTPConnection:
        p = self._parts
        if p.scheme == "unix":
            return UnixConnection(p.path, self._timeout)
        cls = http.client.HTTPSConnection if p.scheme == "https" else http.client.HTTPConnection
        return cls(p.hostname or "", p.port, timeout=self._timeout)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                query: dict[str, str] | None = None) -> tuple[int, str, bytes]:
        if not self._identified and self._token and self._parts.scheme != "unix":
            self._exchange("GET", "/api/v1" + identity.PATH, None, {"Accept": "application/json"})
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._token and self._parts.scheme != "unix":
            headers["Authorization"] = f"Bearer {self._token}"
        target = "/api/v1" + path + (f"?{urlencode(query)}" if query else "")
        return self._exchange(method, target, payload, headers)

    def _exchange(self, method: str, target: str, payload: bytes | None,
                  headers: dict[str, str]) -> tuple[int, str, bytes]:
        """One request; refuses an answer without the broker's identity header."""
        conn = self._connection()
        try:
            conn.request(method, target, body=payload, headers=headers)
            resp = conn.getresponse()
            status, ctype, raw = resp.status, resp.getheader("Content-Type") or "", resp.read()
            claimed = resp.getheader(identity.HEADER)
        except (OSError, http.client.HTTPException) as exc:
            raise IntakeError(f"cannot reach the broker at {self.url} ({type(exc).__name__}); "
                              "is `intake serve` running? (INTAKE_URL)") from None
        finally:
            conn.close()
        if claimed != identity.VALUE:
            raise IntakeError(f"{self.url} answered HTTP {status} but is not an intake broker (no "
                              f"{identity.HEADER} header); refusing to talk to it: check INTAKE_URL")
        self._identified = True
        return status, ctype, raw

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> Any:
        """The decoded JSON answer, or :class:`ApiError` carrying the broker's message."""
        status, ctype, raw = self.request(method, path, body, query)
        if not ctype.startswith("application/json"):
            if status >= 400:
                raise ApiError(status, "http_error", f"the broker at {self.url} answered HTTP {status}")
            return raw.decode()
        data = json.loads(raw)
        if status >= 400:
            if isinstance(data, dict) and "error" in data:
                message = str(data.get("message") or data["error"])
                if status == 401:  # which broker refused the credentials matters as much as why
                    message = f"the broker at {self.url} did not accept the credentials: {message}"
                raise ApiError(status, str(data["error"]), message)
            raise ApiError(status, "http_error", f"the broker at {self.url} answered HTTP {status}")
        return data


def seg(value: str) -> str:
    """One path segment, percent-encoded (ids and identities come from the command line)."""
    return quote(value, safe="")
