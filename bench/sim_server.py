"""The Slack Web API simulator in its own process, for the benchmark: python -m bench.sim_server PORT."""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from tests.slack_sim import SlackSim


async def main(port: int) -> None:
    sim = SlackSim()
    app = web.Application()
    app.router.add_route("*", "/api/{method}", sim._handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
