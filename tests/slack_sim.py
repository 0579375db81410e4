"""Local stand-ins for Slack: a Web API simulator and a Socket Mode websocket server.

Both bind 127.0.0.1 on an ephemeral port and run in the test's event loop.

* :class:`SlackSim` answers ``/api/<method>`` the way ``slack_sdk``'s ``AsyncWebClient``
  expects (point the client's ``base_url`` at :attr:`SlackSim.base_url`), records every call,
  and can be told to fail the next call to a method, answer slowly, hold an answer until the
  test lets it go, rate-limit (429 with Retry-After) or be down altogether (for outbox tests).
  It keeps each channel's top-level messages (with their ``metadata``) for
  ``conversations.history`` and ``chat.delete``, and :meth:`SlackSim.cards_of` counts the cards
  it really posted for an idea.
* :class:`SocketModeServer` speaks Slack's Socket Mode framing: it greets each connection with
  ``hello``, pushes envelopes (``{"envelope_id", "type", "payload", ...}``) and collects the
  acks the client sends back (``{"envelope_id", "payload"?}``).

Attach the socket server to the sim (``SlackSim(socket_server=...)``) and
``apps.connections.open`` hands out its URL, so bolt's ``AsyncSocketModeHandler`` connects
through the same path it uses against Slack.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import WSMsgType, web

HOST = "127.0.0.1"
BOT_USER_ID = "UBOT00001"
BOT_ID = "BBOT00001"
TEAM_ID = "T00000001"
APP_ID = "A00000001"

_VALID_TOKEN_PREFIXES = ("xoxb-", "xoxp-", "xapp-")
_POLL = 0.02


@dataclass
class Call:
    """One Web API call as the sim received it.

    ``params`` merges the query string, a form body and a JSON body (JSON values keep their
    types, e.g. ``blocks`` stays a list). ``token`` is the bearer token (or ``token`` param).
    """

    method: str
    params: dict[str, Any]
    headers: dict[str, str]
    token: str = ""
    http_method: str = "POST"


@dataclass
class Hold:
    """The next call to a method is carried out, then its answer waits for :meth:`release`."""

    reached: asyncio.Event
    released: asyncio.Event
    skip: int = 0

    def release(self) -> None:
        self.released.set()


@dataclass
class _Failure:
    error: str
    status: int
    remaining: int
    retry_after: int


async def _wait_until(
    predicate: Callable[[], bool], timeout: float, describe: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(describe())
        await asyncio.sleep(_POLL)


async def _start_site(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


class _LocalServer:
    """``async with``: start on entry, stop on exit (both servers below)."""

    async def start(self) -> Self:
        raise TypeError(f"{type(self).__name__} must define start()")

    async def stop(self) -> None:
        raise TypeError(f"{type(self).__name__} must define stop()")

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class SlackSim(_LocalServer):
    """Slack Web API simulator (``POST``/``GET /api/<method>``) on 127.0.0.1."""

    def __init__(self, *, socket_server: SocketModeServer | None = None) -> None:
        self.calls: list[Call] = []
        self.socket_server = socket_server
        self._failures: dict[str, _Failure] = {}
        self._responses: dict[str, Callable[[Call], dict[str, Any]]] = {}
        self._last_micros = 0
        self._holds: dict[str, Hold] = {}
        self._delays: dict[str, float] = {}
        self._ratelimits: dict[str, tuple[int, int]] = {}
        self._ratelimit_seen: dict[str, int] = {}
        self.down = False
        #: Every top-level message really posted, in order (deleted ones included).
        self.posted: list[dict[str, Any]] = []
        #: channel -> its top-level messages still there, oldest first.
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.deleted: list[str] = []
        self._runner: web.AppRunner | None = None
        self._port = 0

    # lifecycle -----------------------------------------------------------------------------

    async def start(self) -> SlackSim:
        """Start listening; returns self."""
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._handle)
        self._runner, self._port = await _start_site(app)
        return self

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        """Pass as ``AsyncWebClient(base_url=...)``; ends with ``/api/`` like Slack's."""
        if not self._port:
            raise RuntimeError("SlackSim is not started")
        return f"http://{HOST}:{self._port}/api/"

    # test controls -------------------------------------------------------------------------

    def calls_to(self, method: str) -> list[Call]:
        """All recorded calls to ``method`` (e.g. ``"chat.postMessage"``), oldest first."""
        return [c for c in self.calls if c.method == method]

    async def wait_for(self, method: str, count: int = 1, timeout: float = 5.0) -> list[Call]:
        """Wait until ``method`` has been called at least ``count`` times; return those calls.

        Raises:
            AssertionError: not enough calls within ``timeout`` seconds.
        """
        await _wait_until(
            lambda: len(self.calls_to(method)) >= count,
            timeout,
            lambda: (
                f"expected >= {count} call(s) to {method} within {timeout}s, "
                f"got {len(self.calls_to(method))}; all calls: {[c.method for c in self.calls]}"
            ),
        )
        return self.calls_to(method)

    def fail_next(
        self,
        method: str,
        *,
        error: str = "internal_error",
        status: int = 200,
        count: int = 1,
        retry_after: int = 1,
    ) -> None:
        """Make the next ``count`` calls to ``method`` answer ``{"ok": false, "error": error}``.

        ``status`` is the HTTP status (Slack uses 200 for most errors, 429 for
        ``ratelimited``); with 429 a ``Retry-After: retry_after`` header is sent. Failed calls
        are still recorded.
        """
        self._failures[method] = _Failure(error, status, count, retry_after)

    def set_response(
        self, method: str, response: dict[str, Any] | Callable[[Call], dict[str, Any]]
    ) -> None:
        """Replace the canned answer for ``method`` with a dict or a function of the call."""
        self._responses[method] = response if callable(response) else (lambda _call: response)

    def hold(self, method: str, *, after: int = 0) -> Hold:
        """Carry out the next call to ``method`` (after ``after`` more), then keep its answer
        until ``release()`` (``reached`` is set while it waits): a crash between Slack's
        answer and the record."""
        hold = Hold(asyncio.Event(), asyncio.Event(), after)
        self._holds[method] = hold
        return hold

    def slow(self, method: str, seconds: float) -> None:
        """Answer every call to ``method`` ``seconds`` late (after carrying it out); 0 stops."""
        self._delays[method] = seconds

    def rate_limit(self, method: str, every: int, retry_after: int = 1) -> None:
        """Refuse every ``every``-th call to ``method`` with 429 and ``Retry-After``; 0 stops."""
        self._ratelimits[method] = (every, retry_after)
        self._ratelimit_seen[method] = 0

    def outage(self, down: bool) -> None:
        """While down, every call is refused with HTTP 503 and nothing is carried out."""
        self.down = down

    def add_message(self, channel: str, text: str, metadata: dict[str, Any] | None = None) -> str:
        """Put a top-level message from our bot straight into ``channel`` (as if posted
        earlier); returns its ts."""
        message: dict[str, Any] = {"type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID,
                                   "ts": self.next_ts(), "text": text}
        if metadata is not None:
            message["metadata"] = metadata
        self.posted.append(message)
        self.history.setdefault(channel, []).append(message)
        return str(message["ts"])

    def cards_of(self, idea_id: str) -> list[dict[str, Any]]:
        """The top-level messages really posted whose metadata names ``idea_id``."""
        return [m for m in self.posted
                if (m.get("metadata") or {}).get("event_payload", {}).get("idea_id") == idea_id]

    def next_ts(self) -> str:
        """A fresh, strictly increasing message timestamp like ``1700000000.000100``: the time
        now, as Slack stamps messages (``conversations.history``'s ``oldest`` compares with it)."""
        self._last_micros = max(self._last_micros + 100, int(time.time() * 1_000_000))
        micros = self._last_micros
        return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"

    # request handling ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                body = await request.json()
                if isinstance(body, dict):
                    params.update(body)
            else:
                form = await request.post()
                params.update({k: v for k, v in form.items() if isinstance(v, str)})
        auth = request.headers.get("Authorization", "")
        # slack_sdk sends the token as a bearer header; Slack also accepts a token parameter.
        body_token = str(params.pop("token", ""))
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else body_token
        call = Call(method, params, dict(request.headers), token, request.method)
        self.calls.append(call)

        if not token.startswith(_VALID_TOKEN_PREFIXES):
            return web.json_response({"ok": False, "error": "invalid_auth"})
        # Like Slack: only app-level tokens open Socket Mode connections, and they do nothing
        # else.
        if (method == "apps.connections.open") != token.startswith("xapp-"):
            return web.json_response({"ok": False, "error": "not_allowed_token_type"})

        if self.down:
            return web.json_response({"ok": False, "error": "service_unavailable"}, status=503)
        if method in self._ratelimits and self._ratelimits[method][0] > 0:
            every, retry_after = self._ratelimits[method]
            self._ratelimit_seen[method] += 1
            if self._ratelimit_seen[method] % every == 0:
                return web.json_response({"ok": False, "error": "ratelimited"}, status=429,
                                         headers={"Retry-After": str(retry_after)})
        failure = self._failures.get(method)
        if failure is not None:
            failure.remaining -= 1
            if failure.remaining <= 0:
                del self._failures[method]
            headers = {"Retry-After": str(failure.retry_after)} if failure.status == 429 else None
            return web.json_response(
                {"ok": False, "error": failure.error}, status=failure.status, headers=headers
            )

        custom = self._responses.get(method)
        data = custom(call) if custom is not None else self._canned(call)
        if (hold := self._holds.get(method)) is not None:
            if hold.skip > 0:
                hold.skip -= 1
            else:
                del self._holds[method]
                hold.reached.set()
                await hold.released.wait()
        if self._delays.get(method):
            await asyncio.sleep(self._delays[method])
        return web.json_response(data)

    def _canned(self, call: Call) -> dict[str, Any]:
        p = call.params
        channel = p.get("channel", "C00000001")
        if call.method == "auth.test":
            return {
                "ok": True,
                "url": "https://sim.slack.example/",
                "team": "Sim Team",
                "user": "intake",
                "team_id": TEAM_ID,
                "user_id": BOT_USER_ID,
                "bot_id": BOT_ID,
                "is_enterprise_install": False,
            }
        if call.method == "chat.postMessage":
            ts = self.next_ts()
            message = {"type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID, "ts": ts,
                       "text": p.get("text", "")}
            if "blocks" in p:
                message["blocks"] = p["blocks"]
            if "thread_ts" in p:
                message["thread_ts"] = p["thread_ts"]
            else:
                if isinstance(p.get("metadata"), dict):
                    message["metadata"] = p["metadata"]
                self.posted.append(message)
                self.history.setdefault(channel, []).append(message)
            return {"ok": True, "channel": channel, "ts": ts, "message": message}
        if call.method == "chat.delete":
            kept = [m for m in self.history.get(channel, []) if m["ts"] != p.get("ts")]
            if len(kept) == len(self.history.get(channel, [])):
                return {"ok": False, "error": "message_not_found"}
            self.history[channel] = kept
            self.deleted.append(str(p.get("ts")))
            return {"ok": True, "channel": channel, "ts": p.get("ts")}
        if call.method == "conversations.history":
            return self._history(p)
        if call.method == "chat.update":
            ts = p.get("ts", "")
            return {"ok": True, "channel": channel, "ts": ts, "text": p.get("text", ""),
                    "message": {"type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID,
                                "text": p.get("text", ""), "blocks": p.get("blocks", [])}}
        if call.method == "chat.postEphemeral":
            return {"ok": True, "message_ts": self.next_ts()}
        if call.method in ("views.open", "views.update", "views.push"):
            view = p.get("view", {})
            if isinstance(view, str):
                view = json.loads(view)
            view_id = p.get("view_id") or "V" + uuid.uuid4().hex[:10].upper()
            return {"ok": True, "view": {**view, "id": view_id, "team_id": TEAM_ID,
                                         "app_id": APP_ID, "bot_id": BOT_ID,
                                         "hash": uuid.uuid4().hex[:20]}}
        if call.method == "conversations.info":
            return {"ok": True, "channel": {"id": channel, "name": "intake-sim",
                                            "is_channel": True, "is_private": False,
                                            "is_archived": False}}
        if call.method == "users.info":
            user = p.get("user", "U00000000")
            return {"ok": True, "user": {"id": user, "team_id": TEAM_ID, "name": user.lower(),
                                         "deleted": False, "is_bot": False,
                                         "profile": {"display_name": user.lower(),
                                                     "real_name": user.lower()}}}
        if call.method == "apps.connections.open":
            if self.socket_server is None:
                return {"ok": False, "error": "sim_no_socket_server"}
            return {"ok": True, "url": self.socket_server.ws_url}
        # Like bolt's own mock server: unknown methods succeed, so tests only script what
        # they care about.
        return {"ok": True}


    def _history(self, p: dict[str, Any]) -> dict[str, Any]:
        """Newest first, ``oldest``/``limit``/``cursor`` as Slack does; metadata only when
        ``include_all_metadata`` is set."""
        oldest = float(p.get("oldest") or 0)
        limit = int(p.get("limit") or 100)
        start = int(p.get("cursor") or 0)
        with_metadata = str(p.get("include_all_metadata", "")).lower() in ("1", "true")
        messages = [m for m in reversed(self.history.get(p.get("channel", ""), [])) if float(m["ts"]) > oldest]
        page = messages[start:start + limit]
        if not with_metadata:
            page = [{k: v for k, v in m.items() if k != "metadata"} for m in page]
        more = start + limit < len(messages)
        return {"ok": True, "messages": page, "has_more": more,
                "response_metadata": {"next_cursor": str(start + limit) if more else ""}}


class SocketModeServer(_LocalServer):
    """A Socket Mode websocket endpoint (``ws://127.0.0.1:PORT/link``)."""

    def __init__(self) -> None:
        self.connections_total = 0
        #: Non-ack JSON messages clients sent (rare; kept for debugging).
        self.messages: list[dict[str, Any]] = []
        self._acks: dict[str, dict[str, Any]] = {}
        self._open: list[web.WebSocketResponse] = []
        self._runner: web.AppRunner | None = None
        self._port = 0

    async def start(self) -> SocketModeServer:
        """Start listening; returns self."""
        app = web.Application()
        app.router.add_get("/link", self._handle_ws)
        self._runner, self._port = await _start_site(app)
        return self

    async def stop(self) -> None:
        """Close every connection (code 1001) and stop listening."""
        for ws in list(self._open):
            await ws.close(code=1001, message=b"server stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def ws_url(self) -> str:
        """The URL ``apps.connections.open`` should return."""
        if not self._port:
            raise RuntimeError("SocketModeServer is not started")
        return f"ws://{HOST}:{self._port}/link"

    @property
    def open_connections(self) -> int:
        return len(self._open)

    async def wait_connected(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until at least ``count`` connections have been made in total."""
        await _wait_until(
            lambda: self.connections_total >= count and bool(self._open),
            timeout,
            lambda: f"expected {count} socket mode connection(s) within {timeout}s, "
            f"got {self.connections_total}",
        )

    async def _handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        # autoping answers the client's heartbeat pings; a short close timeout keeps teardown
        # fast when the peer has already gone.
        ws = web.WebSocketResponse(autoping=True, timeout=1.0)
        await ws.prepare(request)
        self.connections_total += 1
        self._open.append(ws)
        try:
            await ws.send_json(
                {
                    "type": "hello",
                    "num_connections": len(self._open),
                    "debug_info": {
                        "host": "applink-sim",
                        "build_number": 1,
                        "approximate_connection_time": 18060,
                    },
                    "connection_info": {"app_id": APP_ID},
                }
            )
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    self.messages.append({"unparsed": msg.data})
                    continue
                if isinstance(data, dict) and "envelope_id" in data:
                    self._acks[str(data["envelope_id"])] = data
                else:
                    self.messages.append(data)
        finally:
            self._open.remove(ws)
        return ws

    async def send_envelope(
        self,
        type_: str,
        payload: dict[str, Any],
        retry_attempt: int = 0,
        retry_reason: str = "",
        *,
        accepts_response_payload: bool | None = None,
        timeout: float = 5.0,
    ) -> str:
        """Push one envelope to the newest connection and return its ``envelope_id``.

        ``type_`` is ``events_api``, ``slash_commands`` or ``interactive``. As Slack does,
        ``retry_attempt``/``retry_reason`` are always present on ``events_api`` envelopes and
        ``accepts_response_payload`` is true for commands and interactions.
        """
        await self.wait_connected(timeout=timeout)
        envelope_id = str(uuid.uuid4())
        if accepts_response_payload is None:
            accepts_response_payload = type_ != "events_api"
        envelope: dict[str, Any] = {
            "envelope_id": envelope_id,
            "type": type_,
            "payload": payload,
            "accepts_response_payload": accepts_response_payload,
        }
        if type_ == "events_api" or retry_attempt:
            envelope["retry_attempt"] = retry_attempt
            envelope["retry_reason"] = retry_reason
        await self._open[-1].send_json(envelope)
        return envelope_id

    async def send_disconnect(self, reason: str = "refresh_requested") -> None:
        """Ask the client to reconnect, as Slack does before recycling a connection."""
        await self.wait_connected()
        await self._open[-1].send_json(
            {"type": "disconnect", "reason": reason, "debug_info": {"host": "applink-sim"}}
        )

    def ack_for(self, envelope_id: str) -> dict[str, Any] | None:
        """The ack received for ``envelope_id`` so far, or None."""
        return self._acks.get(envelope_id)

    async def wait_ack(self, envelope_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """Wait for the client's ack of ``envelope_id``: ``{"envelope_id", "payload"?}``.

        Raises:
            AssertionError: no ack within ``timeout`` seconds (bolt acks only when the
                listener's response status is 200).
        """
        await _wait_until(
            lambda: envelope_id in self._acks,
            timeout,
            lambda: f"no ack for envelope {envelope_id} within {timeout}s; "
            f"acked: {sorted(self._acks)}",
        )
        return self._acks[envelope_id]
