"""The web console, mounted under ``/console`` (see :mod:`intake.console.views`)."""

from __future__ import annotations

import asyncio

import aiohttp_jinja2
import jinja2
from aiohttp import web

from intake.console.session import SessionBox
from intake.console.sso import OidcClient
from intake.console.views import STATIC_DIR, STOPPING, Console
from intake.core.resources import TEMPLATES_DIR
from intake.core.settings import Settings
from intake.protocol.keyfiles import load_secret
from intake.runtime import Broker
from intake.text.html import show_hidden


def _when(ts: float | None) -> str:
    import datetime as dt

    if ts is None:
        return "—"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def mount_console(app: web.Application, settings: Settings, broker_key: web.AppKey[Broker], *,
                  dev: bool = False) -> None:
    """Add the console sub-application at ``/console``. Loads the console key now, so a
    missing or unreadable key stops the server at start. ``dev``: also accept the loopback
    origin the browser used (see :meth:`Console.origins`)."""
    key = load_secret(settings, "console")
    sso = OidcClient(settings, key) if settings.oidc_issuer else None
    console = Console(settings, broker_key, SessionBox(key), sso, dev=dev)
    sub = web.Application(middlewares=[console.headers, console.sessions, console.errors])
    env = aiohttp_jinja2.setup(
        sub, loader=jinja2.FileSystemLoader(TEMPLATES_DIR / "console"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, finalize=show_hidden,
    )
    env.filters["when"] = _when
    sub[STOPPING] = asyncio.Event()

    async def _stop_streams(_: web.Application) -> None:
        sub[STOPPING].set()

    sub.on_shutdown.append(_stop_streams)
    r = sub.router
    r.add_get("/", console.home)
    r.add_get("/signin", console.signin_page)
    r.add_post("/signin", console.signin)
    r.add_post("/signin/options", console.signin_options)
    r.add_post("/signout", console.signout)
    r.add_get("/sso/start", console.sso_start)
    r.add_get("/sso/callback", console.sso_callback)
    r.add_get("/ideas", console.ideas)
    r.add_get("/ideas/{idea_id}", console.idea)
    r.add_post("/ideas/{idea_id}/promote", console.promote)
    r.add_post("/ideas/{idea_id}/deny", console.deny_idea)
    r.add_get("/tasks", console.tasks)
    r.add_get("/tasks/{task_id}", console.task)
    r.add_post("/tasks/{task_id}/approve", console.approve)
    r.add_post("/tasks/{task_id}/accept", console.accept)
    r.add_post("/tasks/{task_id}/deny", console.deny_task)
    r.add_post("/tasks/{task_id}/revoke", console.revoke)
    r.add_post("/stepup/options", console.stepup_options)
    r.add_get("/audit", console.audit)
    r.add_get("/audit/archive", console.audit_archive)
    r.add_get("/approvers", console.approvers)
    r.add_post("/approvers/enrol", console.enrol_create)
    r.add_get("/enrol/{token}", console.enrol_page)
    r.add_post("/enrol/{token}/reveal", console.enrol_reveal)
    r.add_post("/enrol/{token}/confirm", console.enrol_confirm)
    r.add_get("/passkeys", console.passkeys)
    r.add_post("/passkeys/options", console.passkey_options)
    r.add_post("/passkeys/register", console.passkey_register)
    r.add_get("/killswitch", console.killswitch)
    r.add_post("/freeze", console.freeze)
    r.add_post("/thaw", console.thaw)
    r.add_get("/dashboard", console.dashboard)
    r.add_get("/events", console.events)
    r.add_static("/static/", STATIC_DIR)
    app.add_subapp("/console", sub)
