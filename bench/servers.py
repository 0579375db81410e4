"""Servers under test for bench/slack_capture.py, each run in its own process.

    python -m bench.servers KIND PORT

``intake`` is the real app (create_app) with Slack over HTTP, on the loop `intake serve` runs on
(uvloop) with hiredis; ``bolt`` is a plain slack-bolt AsyncApp on aiohttp whose /intake handler
only acks, on asyncio's own loop as bolt ships; ``bare`` is an aiohttp handler that returns 200.
The other kinds each take one lever away (or give it to bolt), so the runner can report what
each lever is worth in the same run. Environment (data dir, Redis URL, Slack settings) comes
from the runner.
"""

from __future__ import annotations

import asyncio
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
    from intake.core.settings import load_settings

    return create_app(load_settings())


#: kind -> (app factory, runs on uvloop, uses hiredis)
KINDS = {
    "bare": (bare_app, False, True),
    "bolt": (bolt_app, False, True),
    "bolt-uvloop": (bolt_app, True, True),
    "intake": (intake_app, True, True),
    "intake-asyncio": (intake_app, False, True),
    "intake-nohiredis": (intake_app, True, False),
    "intake-full": (intake_app, True, True),
}


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    factory, on_uvloop, hiredis = KINDS[kind]
    if not hiredis:
        sys.modules["hiredis"] = None  # type: ignore[assignment]  # redis-py then uses its Python parser
    sys.setswitchinterval(0.001)  # as `intake serve` does, for every target alike
    logging.basicConfig(level=logging.ERROR)  # refusals are logged at WARNING: keep the bench quiet
    from intake.serve import event_loop

    loop = event_loop() if on_uvloop else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = factory()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
