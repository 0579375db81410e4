"""A local fake of GitHub's "create a pull request" endpoint (aiohttp on 127.0.0.1, own thread)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web


class FakeForge:
    """Records every call; answers 201 with an ``html_url`` (or ``status`` if set otherwise)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = 201
        self.redirect_to: str | None = None
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _pulls(self, request: web.Request) -> web.Response:
        self.calls.append({
            "path": request.path,
            "authorization": request.headers.get("Authorization"),
            "json": await request.json(),
        })
        if self.redirect_to:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        if self.status != 201:
            return web.json_response({"message": "Validation Failed"}, status=self.status)
        number = len(self.calls)
        owner, repo = request.match_info["owner"], request.match_info["repo"]
        return web.json_response({"number": number, "html_url": f"https://forge.test/{owner}/{repo}/pull/{number}"},
                                 status=201)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/repos/{owner}/{repo}/pulls", self._pulls)
        app.router.add_post("/elsewhere", self._pulls)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> FakeForge:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def fake_forge() -> Iterator[FakeForge]:
    forge = FakeForge().start()
    yield forge
    forge.stop()
