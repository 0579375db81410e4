"""Servers under test for bench/slack_capture.py, each run in its own process.

    python -m bench.servers intake|bolt|bare PORT

``intake`` is the real app (create_app) with Slack over HTTP; ``bolt`` is a plain slack-bolt
AsyncApp on aiohttp whose /intake handler only acks; ``bare`` is an aiohttp handler that returns
200. Environment (data dir, Redis URL, Slack settings) comes from the runner.
"""

from __future__ import annotations

import logging
import os
import sys

from aiohttp import web


def bare_app() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/slack/events", handler)
    return app


def bolt_app() -> web.Application:
    from slack_bolt.async_app import AsyncApp
    from slack_sdk.web.async_client import AsyncWebClient

    bolt = AsyncApp(
        client=AsyncWebClient(token=os.environ["SLACK_BOT_TOKEN"], base_url=os.environ["SLACK_API_URL"]),
        signing_secret=os.environ["SLACK_SIGNING_SECRET"],
        process_before_response=True,
    )

    @bolt.command("/intake")
    async def ack_only(ack):  # type: ignore[no-untyped-def]
        await ack(text="ok")

    return bolt.web_app(path="/slack/events")  # bolt's own aiohttp adapter


def intake_app() -> web.Application:
    from intake.app import create_app
    from intake.settings import load_settings

    return create_app(load_settings())


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    sys.setswitchinterval(0.001)  # as `intake serve` does, for every target alike
    logging.basicConfig(level=logging.ERROR)  # refusals are logged at WARNING: keep the bench quiet
    app = {"bare": bare_app, "bolt": bolt_app, "intake": intake_app}[kind]()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
