"""Issue 22 attacks on the console: hostile ids and paths, a cross-site POST aimed at a
signed-in victim, the dev-mode origins, and hidden characters on every page that shows text."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pyotp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from intake.app import BROKER, create_app
from intake.console.session import COOKIE
from intake.core.models import Channel
from intake.core.settings import Settings, load_settings
from intake.operations.indicators.figures import Timeline, compute_figures
from intake.operations.indicators.render import render_html
from intake.runtime import Broker
from tests.factories import draft, previous_step_code
from tests.report.events import emit, settle

HIDDEN = "approve\u202eevil\u200bnow\u2066x\u2069"
SHOWN = "approve⟨U+202E⟩evil⟨U+200B⟩now⟨U+2066⟩x⟨U+2069⟩"
RAW = ("\u202e", "\u200b", "\u2066", "\u2069")
HEADERS = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff",
           "X-Frame-Options": "DENY"}


def console_settings(settings: Settings, **extra: object) -> Settings:
    assert settings.redis_url is not None
    return load_settings(_env_file=None, data_dir=settings.data_dir, redis_url=settings.redis_url.get_secret_value(),
                         policy=settings.policy_path, sweep_interval=3600, **extra)


def assert_headers(resp: aiohttp.ClientResponse) -> None:
    for name, value in HEADERS.items():
        assert value in resp.headers.get(name, ""), (resp.status, name, resp.headers.get(name))


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf-token" content="([^"]+)"', page)
    assert found, page[:300]
    return found.group(1)


class Console:
    def __init__(self, client: TestClient, broker: Broker) -> None:
        self.client, self.broker = client, broker

    async def sign_in(self, who: str = "alice") -> str:
        """Enrol ``who`` and sign in with a code; the signed-in page's CSRF token."""
        self.broker.approvers.add(self.broker.policy, who, name=who.title(),
                                  groups=self.broker.policy.groups_of(who), slack_user=None, email=None,
                                  actor="test:setup")
        enrolment = self.broker.approvers.enrol(who, actor=f"approver:{who}")
        totp = pyotp.parse_uri(enrolment.otpauth_uri)
        self.broker.approvers.confirm(who, previous_step_code(totp), actor=f"approver:{who}")
        page = await (await self.client.get("/console/signin")).text()
        resp = await self.client.post("/console/signin", data={"csrf": csrf_of(page), "approver": who,
                                                               "code": totp.now()})
        assert resp.status == 200 and str(resp.url).endswith("/console/ideas"), resp.status
        return csrf_of(await resp.text())


@pytest.fixture
async def console(settings: Settings) -> AsyncIterator[Console]:
    app = create_app(console_settings(settings))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield Console(client, app[BROKER])


@pytest.mark.parametrize("path", [
    "/console/ideas/I-000000000000", "/console/ideas/I-zzzz", "/console/ideas/%00", "/console/ideas/..%2f..",
    "/console/ideas/" + "I" * 5000, "/console/tasks/T-000000000000", "/console/tasks/<script>",
    "/console/tasks/%E2%80%AE", "/console/enrol/nope", "/console/nope", "/console/ideas/I-000000000000/x",
])
async def test_an_unknown_or_hostile_id_is_a_4xx_page_under_the_security_headers(console: Console, path: str) -> None:
    await console.sign_in()
    resp = await console.client.get(path, allow_redirects=False)
    body = await resp.text()
    assert 400 <= resp.status < 500, (path, resp.status, body[:200])
    assert_headers(resp)
    assert "Traceback" not in body and "<script>" not in body


async def test_an_unknown_idea_is_a_404_page(console: Console) -> None:
    await console.sign_in()
    for path in ("/console/ideas/I-000000000000", "/console/tasks/T-000000000000"):
        resp = await console.client.get(path)
        assert resp.status == 404 and resp.content_type == "text/html"
        assert 'id="status">404' in await resp.text()
        assert_headers(resp)
    # An action on an unknown id as well (the handler re-renders the page it came from).
    csrf = csrf_of(await (await console.client.get("/console/ideas")).text())
    resp = await console.client.post("/console/ideas/I-000000000000/promote", data={"csrf": csrf, "code": "1"})
    assert resp.status == 404
    assert_headers(resp)


async def test_a_refused_cross_site_post_leaves_the_victims_cookie_alone(console: Console) -> None:
    """evil.example auto-submits a form at the console: the browser sends no SameSite=Strict
    cookie, the broker refuses the POST, and must not answer with a fresh anonymous session
    (that would sign the victim out)."""
    await console.sign_in()
    jar = console.client.session.cookie_jar
    for forged in ({"Origin": "https://evil.example", "Cookie": ""}, {"Origin": "https://evil.example"}, {}):
        resp = await console.client.post("/console/freeze", data={"reason": "csrf"}, headers=forged)
        assert resp.status == 403
        assert COOKIE not in resp.cookies and "Set-Cookie" not in resp.headers, forged
    # An unauthenticated POST (no cookie at all) is refused the same way.
    async with aiohttp.ClientSession() as stranger:
        resp = await stranger.post(f"{console.client.make_url('/console/thaw')}", data={"code": "1"})
        assert resp.status == 403 and "Set-Cookie" not in resp.headers
    assert console.broker.gatekeeper.frozen() is None
    # The victim is still signed in.
    assert [c.key for c in jar if c.key == COOKIE]
    page = await console.client.get("/console/ideas", allow_redirects=False)
    assert page.status == 200 and 'id="who">alice' in await page.text()


async def test_dev_mode_accepts_both_loopback_origins_and_nothing_else(settings: Settings) -> None:
    """The banner prints http://127.0.0.1:PORT; the console origin is http://localhost:8080.
    In dev mode a sign-in POST from either loopback origin the browser used is accepted; a
    page at evil.example (or a rebinding name pointing at 127.0.0.1) is still refused."""
    app = create_app(console_settings(settings), dev=False)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        port = client.port
        page = await (await client.get("/console/signin")).text()
        resp = await client.post("/console/signin", data={"csrf": csrf_of(page), "approver": "x", "code": "1"},
                                 headers={"Origin": f"http://127.0.0.1:{port}"})
        assert resp.status == 403 and "CSRF" in await resp.text()  # not dev: only the configured origin
    dev_app = create_app(console_settings(settings), dev=True)
    # No dev worker subprocess for this test: only the console's origins matter.
    [worker] = [c for c in dev_app.cleanup_ctx if getattr(c, "__name__", "") == "_dev_worker_ctx"]
    dev_app.cleanup_ctx.remove(worker)
    async with TestClient(TestServer(dev_app, host="127.0.0.1")) as client:
        port = client.port
        for origin, host, allowed in ((f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", True),
                                      (f"http://localhost:{port}", f"localhost:{port}", True),
                                      ("https://evil.example", f"127.0.0.1:{port}", False),
                                      (f"http://rebind.evil.example:{port}", f"rebind.evil.example:{port}", False)):
            page = await (await client.get("/console/signin", headers={"Host": host})).text()
            resp = await client.post("/console/signin", headers={"Origin": origin, "Host": host},
                                     data={"csrf": csrf_of(page), "approver": "nobody", "code": "123456"})
            text = await resp.text()
            # Allowed: the sign-in form's own refusal (no such approver), not the CSRF wall.
            assert ("CSRF" not in text) is allowed, (origin, resp.status, text[:200])


async def test_hidden_characters_are_markers_on_the_list_and_the_dashboard(console: Console) -> None:
    store = console.broker.store
    idea, _ = store.capture(draft(channel=Channel.CLI, requester="cli:erin", text=HIDDEN + "\nmore",
                                  title=HIDDEN))
    blocked_task = "T-0000000000b1"
    emit(store, "approver:alice", "idea.promoted", idea.id, task=blocked_task, via="cli")
    emit(store, "approver:alice", "task.created", blocked_task, idea=idea.id, repo="acme/web", change_type="docs",
         tier="standard", spec_hash="0" * 64)
    settle(store, blocked_task, "blocked", {"gates": [f"blocked path: docs/{HIDDEN}.md"]})
    await console.sign_in()
    for path in ("/console/ideas", f"/console/ideas/{idea.id}", "/console/dashboard"):
        page = await (await console.client.get(path)).text()
        assert SHOWN in re.sub(r"<[^>]+>", "", page), path  # the idea page styles each marker in a span
        assert not any(ch in page for ch in RAW), (path, [hex(ord(c)) for c in RAW if c in page])


def test_hidden_characters_are_markers_in_the_html_report(store, clock) -> None:  # type: ignore[no-untyped-def]
    idea, _ = store.capture(draft(text=HIDDEN, title=HIDDEN))
    emit(store, "approver:alice", "idea.promoted", idea.id, task="T-0000000000b1", via="cli")
    emit(store, "approver:alice", "task.created", "T-0000000000b1", idea=idea.id, repo="acme/web",
         change_type="docs", tier="standard", spec_hash="0" * 64)
    settle(store, "T-0000000000b1", "blocked", {"gates": [f"blocked path: {HIDDEN}"]})
    page = render_html(compute_figures(Timeline(store.audit, store).follow(), clock.now - 3600, now=clock.now))
    assert SHOWN in page and not any(ch in page for ch in RAW)


def test_the_html_surfaces_share_one_marker_helper() -> None:
    """Both Jinja environments finalize output with intake.text.html.show_hidden."""
    from intake.text.html import show_hidden

    assert show_hidden(HIDDEN) == SHOWN and show_hidden(3) == 3
    root = Path(__file__).resolve().parents[2]
    for module in ("intake/console/__init__.py", "intake/operations/indicators/render.py"):
        assert "finalize=show_hidden" in (root / module).read_text(), module


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")
def test_a_real_browser_signs_in_at_the_banners_127_0_0_1_in_dev_mode(settings: Settings) -> None:
    """The dev banner prints http://127.0.0.1:PORT/console; Chromium signs in there (it sends
    Origin: http://127.0.0.1:PORT, not the configured http://localhost:PORT)."""
    import asyncio
    import threading

    from aiohttp import web
    from playwright.sync_api import sync_playwright

    from tests.functional.console_harness import CHROMIUM_ARGS, code_now, enrol, free_port

    port = free_port()
    configured = console_settings(settings, port=port, console_origin=f"http://localhost:{port}")
    app = create_app(configured, dev=True)
    [worker] = [c for c in app.cleanup_ctx if getattr(c, "__name__", "") == "_dev_worker_ctx"]
    app.cleanup_ctx.remove(worker)  # the console is what is tested, not the embedded worker
    totps = enrol(configured, "alice")
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.set_default_timeout(10_000)
            base = f"http://127.0.0.1:{port}"
            page.goto(f"{base}/console/signin")
            page.fill("#signin input[name=approver]", "alice")
            page.fill("#signin input[name=code]", code_now(totps["alice"]))
            page.click("#signin .totp-submit")
            page.wait_for_url(f"{base}/console/ideas")
            assert page.text_content("#who") == "alice"
            browser.close()
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
