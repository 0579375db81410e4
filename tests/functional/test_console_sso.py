"""Console single sign-on against a real OpenID Connect provider (panva's oidc-provider on node,
installed by the fixture into a cache dir, listening on 127.0.0.1), driven by Chromium: SSO signs
in the person linked to ``oidc:<issuer>#<sub>``; a power action still needs a fresh code. And
the relying party's own checks: state bound to the browser, issuer, audience, nonce."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from intake.console.sso import Flow, OidcClient, identity_for
from intake.core.errors import ConfigError, Refused
from intake.core.settings import Settings, load_settings
from intake.people.registry import People
from tests.functional.console_harness import (
    CHROMIUM_ARGS,
    Running,
    code_next,
    console_policy,
    enrol,
    free_port,
    serve,
)
from tests.functional.test_console import CHROMIUM, file_idea

OIDC_PROVIDER = "oidc-provider@8.8.1"
CLIENT_ID, CLIENT_SECRET = "intake-console", "test-only-client-secret-0123456789"
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def oidc_modules() -> Path:
    """node_modules with oidc-provider, installed once per machine into a cache dir (npm)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "intake-tests" / OIDC_PROVIDER
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # xdist workers: one installs, the others wait
        if not (cache / "node_modules" / "oidc-provider" / "package.json").is_file():
            npm = shutil.which("npm")
            assert npm and shutil.which("node"), "node 20+ and npm are needed for the OIDC provider"
            done = subprocess.run([npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--silent",
                                   OIDC_PROVIDER], capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr
    return cache / "node_modules"


@pytest.fixture
def provider(oidc_modules: Path, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A running provider whose one client redirects to a console on a port chosen here:
    (issuer, console port)."""
    port = free_port()
    run = tmp_path / "oidc"
    run.mkdir()
    shutil.copy(HERE / "oidc" / "provider.mjs", run / "provider.mjs")
    (run / "node_modules").symlink_to(oidc_modules)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CLIENT_ID": CLIENT_ID, "CLIENT_SECRET": CLIENT_SECRET,
           "REDIRECT_URI": f"http://localhost:{port}/console/sso/callback"}
    proc = subprocess.Popen([shutil.which("node") or "node", "provider.mjs"], cwd=run, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until it listens (or exits: then it is empty)
        assert line, "the OIDC provider did not start"
        yield json.loads(line)["issuer"], port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _settings(base: Settings, port: int, tmp: Path, issuer: str) -> Settings:
    assert base.redis_url is not None
    return load_settings(_env_file=None, data_dir=base.data_dir, redis_url=base.redis_url.get_secret_value(),
                         policy=console_policy(tmp), port=port, console_origin=f"http://localhost:{port}",
                         sweep_interval=60, oidc_issuer=issuer, oidc_client_id=CLIENT_ID,
                         oidc_client_secret=CLIENT_SECRET)


@pytest.fixture
def app(settings: Settings, tmp_path: Path, provider: tuple[str, int]) -> Iterator[Running]:
    issuer, port = provider
    with serve(_settings(settings, port, tmp_path, issuer)) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _sso_sign_in(page, app: Running, login: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{app.url}/console/signin")
    page.click("#sso")
    page.wait_for_url(re.compile(r"http://127\.0\.0\.1:\d+/interaction/.*"))
    page.fill("input[name=login]", login)
    page.fill("input[name=password]", "anything")  # dev interactions accept any password
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"http://127\.0\.0\.1:\d+/interaction/.*"))
    page.click("button[type=submit]")  # consent: "Continue"


def test_sso_signs_in_the_linked_person_and_power_still_needs_a_fresh_code(app: Running, browser: Browser) -> None:
    totps = enrol(app.settings, "alice")
    issuer = app.settings.oidc_issuer
    assert issuer
    People(app.broker.store).upsert("alice", name=None, identities=(identity_for(issuer, "alice-at-idp"),),
                                    actor="cli:root", create=False)
    idea_id = file_idea(app)
    context = browser.new_context()
    context.set_default_timeout(15_000)
    page = context.new_page()
    _sso_sign_in(page, app, "alice-at-idp")
    page.wait_for_url(f"{app.url}/console/ideas")
    assert page.text_content("#who") == "alice"
    session_cookie = [c for c in context.cookies() if c["name"] == "intake_console"]
    assert session_cookie and session_cookie[0]["sameSite"] == "Strict" and session_cookie[0]["httpOnly"]
    assert not [c for c in context.cookies() if c["name"] == "intake_sso"], "the flow cookie is spent"
    signed = [e for e in app.broker.audit.export() if e["action"] == "console.signed_in"]
    assert signed and signed[-1]["actor"] == "approver:alice"

    # A power action after SSO: no code, refused and nothing written; with a fresh code, done.
    page.goto(f"{app.url}/console/ideas/{idea_id}")
    page.select_option("#promote select[name=repo]", "acme/web")
    page.select_option("#promote select[name=change_type]", "docs")
    page.click("#promote .totp-submit")
    assert page.locator("#error").is_visible()
    assert app.broker.store.get_idea(idea_id).state.value != "promoted"
    page.select_option("#promote select[name=repo]", "acme/web")
    page.select_option("#promote select[name=change_type]", "docs")
    page.fill("#promote input[name=code]", code_next(totps["alice"]))
    page.click("#promote .totp-submit")
    page.wait_for_url(re.compile(r".*/console/tasks/T-[0-9a-f]{12}\?done=promoted"))
    context.close()


def test_an_unlinked_subject_is_not_signed_in(app: Running, browser: Browser) -> None:
    enrol(app.settings, "alice")
    context = browser.new_context()
    context.set_default_timeout(15_000)
    page = context.new_page()
    _sso_sign_in(page, app, "mallory")
    page.wait_for_url(re.compile(r".*/console/sso/callback.*"))
    assert "is linked to nobody" in (page.text_content("#error") or "")
    page.goto(f"{app.url}/console/ideas")
    page.wait_for_url(f"{app.url}/console/signin")
    context.close()


def _get(url: str, cookie: str | None = None) -> tuple[int, dict[str, str], str]:
    """One GET without following redirects (urllib's opener would follow them)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""),
                 headers={"Cookie": cookie} if cookie else {})
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders() if k.lower() != "set-cookie"}, resp.read().decode()
    cookies = "; ".join(v.split(";", 1)[0] for k, v in resp.getheaders() if k.lower() == "set-cookie")
    out[1]["set-cookie"] = cookies
    conn.close()
    return out


def test_a_callback_not_started_in_this_browser_is_refused(app: Running) -> None:
    """Login CSRF: the attacker starts a sign-in, and sends the victim's browser to the callback
    with the attacker's state. Without the flow cookie that state was sealed in, or with a cookie
    for another state, it is refused before any code is exchanged, and nobody is signed in."""
    enrol(app.settings, "alice")
    status, headers, _ = _get(f"{app.url}/console/sso/start")
    assert status == 303 and headers["location"].startswith(app.settings.oidc_issuer or "?")
    query = dict(p.split("=", 1) for p in headers["location"].split("?", 1)[1].split("&"))
    assert query["code_challenge_method"] == "S256" and query["nonce"] and query["state"] != query["nonce"]
    attacker_cookie = headers["set-cookie"]
    assert "intake_sso=" in attacker_cookie
    callback = f"{app.url}/console/sso/callback?code=stolen-or-made-up&state={query['state']}"
    status, _, body = _get(callback)  # the victim: no flow cookie
    assert status == 403 and "not started in this browser" in body
    _, other, _ = _get(f"{app.url}/console/sso/start")  # a flow cookie, but for another state
    status, _, body = _get(callback, other["set-cookie"])
    assert status == 403 and "not started in this browser" in body
    assert not [e for e in app.broker.audit.export() if e["action"] == "console.signed_in"]


def _client(issuer: str = "https://idp.example.com") -> OidcClient:
    settings = load_settings(_env_file=None, oidc_issuer=issuer, oidc_client_id=CLIENT_ID,
                             oidc_client_secret=CLIENT_SECRET, console_origin="https://intake.example.com")
    return OidcClient(settings, os.urandom(32))


@pytest.mark.parametrize("change,reason", [
    ({"iss": "https://evil.example.com"}, "iss"), ({"aud": "another-client"}, "aud"),
    ({"nonce": "replayed"}, "nonce"), ({"exp": int(time.time()) - 3600}, "exp"),
    ({"aud": [CLIENT_ID, "another-client"]}, "several clients"),
    ({"sub": None}, "sub"),
])
def test_id_token_claims_are_checked(change: dict[str, object], reason: str) -> None:
    client = _client()
    flow = Flow(state="s", nonce="n-1", verifier="v" * 64, exp=time.time() + 60)
    now = int(time.time())
    good = {"iss": "https://idp.example.com", "aud": CLIENT_ID, "sub": "248289761001", "nonce": "n-1",
            "iat": now, "exp": now + 300}
    assert client._check_claims(good, flow) == "248289761001"
    bad = {k: v for k, v in {**good, **change}.items() if v is not None}
    with pytest.raises(Refused) as refused:
        client._check_claims(bad, flow)
    assert refused.value.reason == "sso_token", refused.value


def test_the_flow_cookie_is_sealed_and_bound_to_its_state() -> None:
    client = _client()
    flow = client.new_flow()
    cookie = client.seal(flow)
    assert client.open(cookie, flow.state) == flow
    for bad_cookie, state in ((cookie, "other-state"), (cookie[:-2] + "AA", flow.state), (None, flow.state),
                              (_client().seal(flow), flow.state)):  # sealed with another console key
        with pytest.raises(Refused):
            client.open(bad_cookie, state)
    assert len(flow.verifier) >= 43 and flow.state != flow.nonce


def test_sso_settings_go_together_and_the_issuer_must_be_https_off_the_loopback() -> None:
    with pytest.raises(ConfigError, match="^INTAKE_OIDC_ISSUER, INTAKE_OIDC_CLIENT_ID and INTAKE_OIDC_CLIENT_SECRET go"):
        load_settings(_env_file=None, oidc_issuer="https://idp.example.com")
    with pytest.raises(ConfigError, match="issuer URL"):
        load_settings(_env_file=None, oidc_issuer="http://idp.example.com", oidc_client_id="c",
                      oidc_client_secret="s")
