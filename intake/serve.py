"""``intake serve``: validate everything up front, then run the web app until interrupted."""

from __future__ import annotations

import logging
import signal
import sys

import click
from aiohttp import web

from intake.app import SLACK_MODE, create_app
from intake.keys import load_secret
from intake.policy import load_policy
from intake.redis_conn import EmbeddedRedis
from intake.runtime import prepare_dev
from intake.settings import Settings


def run(settings: Settings, *, dev: bool) -> None:
    """Start the broker in the foreground. Fails fast, with one line, on a bad setting."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Redis calls run in worker threads next to a busy event loop; with the default 5 ms GIL
    # switch interval each blocked call can wait that long to resume (a "convoy"), which
    # capped capture throughput. 1 ms keeps them moving (bench/slack_capture.py measures it).
    sys.setswitchinterval(0.001)
    if dev:
        for line in prepare_dev(settings):
            click.echo(f"dev: {line}")
    policy = load_policy(settings.policy_path)
    for purpose in ("audit", "secrets"):
        load_secret(settings, purpose)
    app = create_app(settings, dev=dev)
    click.echo(f"intake: {app[SLACK_MODE].describe()}")
    redis_where = "configured INTAKE_REDIS_URL" if settings.redis_url else f"embedded, {settings.data_dir}/redis"
    click.echo(f"intake: policy {settings.policy_path} ({policy.version_hash[:12]}); redis {redis_where}")
    click.echo(f"intake: serving on http://{settings.host}:{settings.port}  (Ctrl-C to stop)")
    try:
        web.run_app(app, host=settings.host, port=settings.port, print=None)
    finally:
        # A second Ctrl-C can cut the app's own cleanup short; never leave the embedded Redis
        # running with nobody using it. Signals are ignored for this last step.
        if settings.redis_url is None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            EmbeddedRedis(settings.data_dir).stop_if_unused()
