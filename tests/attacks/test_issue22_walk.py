"""Issue 22: a Hypothesis-driven walk of every API and console route of the real app, signed in
as an admin approver, with hostile ids in every path parameter and hostile bodies (any JSON, the
route's own fields with arbitrary values, random bytes, other content types). Whatever is sent:
never a 5xx, and every console answer carries the security headers."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest
from aiohttp import web
from aiohttp.web_urldispatcher import PrefixedSubAppResource
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from intake.api.callers import ApiTokens
from intake.api.routes import PREFIX, ROUTES
from intake.app import create_app
from intake.core.settings import Settings
from intake.people.registry import People
from intake.runtime import open_broker
from tests.api_harness import Codes, RunningBroker, enrol, running_broker
from tests.factories import draft

WALK = hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.function_scoped_fixture])
FIELDS = ["text", "title", "delivery_id", "requester", "repo", "change_type", "code", "note", "on_behalf_of",
          "spec_hash", "sha", "reason", "id", "name", "groups", "slack_user", "email", "identities", "identity",
          "approver", "csrf", "credential", "challenge_id", "since", "action", "subject"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
CONTENT_TYPES = ["application/json", "application/json; charset=utf-16", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]


def console_routes(settings: Settings) -> list[tuple[str, str]]:
    """(method, path template) of every console route, read from the real app's router (the
    sub-application's routes carry the /console prefix)."""
    app = create_app(settings)
    out = []
    for resource in app.router.resources():
        if isinstance(resource, PrefixedSubAppResource) and resource.canonical == "/console":
            sub: web.Application = resource.get_info()["app"]
            for route in sub.router.routes():
                # /console/events is a Server-Sent Events stream (it ends after STREAM_S, not per
                # request); tests/functional/test_console_daily.py drives it.
                if route.method != "HEAD" and route.resource is not None and "static" not in route.resource.canonical \
                        and route.resource.canonical != "/console/events":
                    out.append((route.method, route.resource.canonical))
    return sorted(set(out))


@pytest.fixture
def running(settings: Settings) -> Iterator[tuple[RunningBroker, dict[str, Any]]]:
    """The real app, an admin approver (alice) with an API token, and one idea and one task."""
    codes = enrol(settings, {"alice": ("platform", ())})["alice"]
    with open_broker(settings) as broker:
        token = ApiTokens(broker.store, People(broker.store)).create("alice", actor="test:setup", scope="power")[1]
        idea, _ = broker.store.capture(draft(text="walk me"))
        other, _ = broker.store.capture(draft(text="promote me"))
        task = broker.gatekeeper.promote(other.id, repo="acme/web", change_type="docs", approver_id="alice",
                                         code=codes.next()).task
        broker.audit.seal_pending()
    with running_broker(settings) as api:
        yield api, {"token": token, "codes": codes, "idea": idea.id, "task": task.id}


def ids(known: dict[str, Any]) -> st.SearchStrategy[str]:
    fixed = [known["idea"], known["task"], "I-000000000000", "T-000000000000", "I-", "T", "alice", "tok-000000000000",
             "", ".", "..", "%", "\x00", "\u202e", "I-" + "a" * 300, "<script>", "slack:U1", "os:root"]
    return st.one_of(st.sampled_from(fixed), st.text(max_size=40))


def bodies() -> st.SearchStrategy[bytes]:
    shaped = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).map(lambda d: json.dumps(d).encode())
    form = st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=30), max_size=6).map(
        lambda d: urlencode(d).encode())
    return st.one_of(shaped, form, json_values.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200))


def request(url: str, method: str, path: str, body: bytes | None, headers: dict[str, str]
            ) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    out = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return out


def fill(template: str, draw_id: Any) -> str:
    return re.sub(r"\{[a-z_]+\}", lambda _: quote(draw_id(), safe="") or "x", template)


def test_every_api_route_with_hostile_ids_and_bodies_is_never_a_5xx(running: tuple[RunningBroker, dict]) -> None:
    api, known = running

    @WALK
    @given(route=st.sampled_from(ROUTES), data=st.data(), body=bodies(),
           ctype=st.sampled_from(CONTENT_TYPES), auth=st.sampled_from(["token", "none", "two", "forged"]),
           query=st.dictionaries(st.sampled_from(["limit", "all", "since", "ref"]), st.text(max_size=20), max_size=2))
    def walk(route: tuple[str, str, str, bool], data: st.DataObject, body: bytes, ctype: str | None, auth: str,
             query: dict[str, str]) -> None:
        method, template, _name, takes_body = route
        path = PREFIX + fill(template, lambda: data.draw(ids(known)))
        if query:
            path += "?" + urlencode(query)
        headers: dict[str, str] = {}
        if ctype:
            headers["Content-Type"] = ctype
        if auth == "token":
            headers["Authorization"] = f"Bearer {known['token']}"
        elif auth == "forged":
            headers["Authorization"] = "Bearer itk_" + "A" * 43
        status, _, answer = request(api.tcp_url, method, path, body if takes_body or method == "POST" else None,
                                    headers)
        assert status < 500, (method, path, status, answer[:300])

    walk()


def sign_in(url: str, codes: Codes) -> tuple[str, str]:
    """Sign alice in on the console: (cookie header, CSRF token)."""
    status, headers, page = request(url, "GET", "/console/signin", None, {})
    cookie = headers["set-cookie"].split(";", 1)[0]
    csrf = re.search(rb'name="csrf-token" content="([^"]+)"', page).group(1).decode()  # type: ignore[union-attr]
    form = urlencode({"csrf": csrf, "approver": "alice", "code": codes.next()}).encode()
    status, headers, _ = request(url, "POST", "/console/signin", form,
                                 {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie})
    assert status == 303, status
    cookie = headers["set-cookie"].split(";", 1)[0]
    status, _, page = request(url, "GET", "/console/ideas", None, {"Cookie": cookie})
    assert status == 200 and b'id="who">alice' in page
    csrf = re.search(rb'name="csrf-token" content="([^"]+)"', page).group(1).decode()  # type: ignore[union-attr]
    return cookie, csrf


def test_every_console_route_with_hostile_ids_and_bodies_is_never_a_5xx(
        settings: Settings, running: tuple[RunningBroker, dict]) -> None:
    api, known = running
    routes = console_routes(settings)
    assert ("GET", "/console/ideas/{idea_id}") in routes and ("POST", "/console/tasks/{task_id}/approve") in routes
    cookie, csrf = sign_in(api.tcp_url, known["codes"])

    @WALK
    @given(route=st.sampled_from(routes), data=st.data(), body=bodies(), ctype=st.sampled_from(CONTENT_TYPES),
           with_csrf=st.booleans(), fields=st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=30), max_size=5),
           origin=st.sampled_from([None, "https://evil.example", "null"]))
    def walk(route: tuple[str, str], data: st.DataObject, body: bytes, ctype: str | None, with_csrf: bool,
             fields: dict[str, str], origin: str | None) -> None:
        method, template = route
        path = fill(template, lambda: data.draw(ids(known)))
        headers = {"Cookie": cookie}
        if origin:
            headers["Origin"] = origin
        sent: bytes | None = None
        if method == "POST":
            if with_csrf:  # a well-formed form with the session's token: reaches the handler
                sent = urlencode({**fields, "csrf": csrf}).encode()
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            else:
                sent = body
                if ctype:
                    headers["Content-Type"] = ctype
        status, answer_headers, answer = request(api.tcp_url, method, path, sent, headers)
        assert status < 500, (method, path, status, answer[:300])
        assert "frame-ancestors 'none'" in answer_headers.get("content-security-policy", ""), (method, path, status)
        assert answer_headers.get("x-content-type-options") == "nosniff", (method, path, status)

    walk()
