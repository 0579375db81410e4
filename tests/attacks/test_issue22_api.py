"""Issue 22 attacks on the API's edges: two Authorization headers, bodies that are not UTF-8
JSON, an unlinked OS user on the local socket reading what it should not."""

from __future__ import annotations

import getpass
import http.client
import json
from urllib.parse import urlsplit

import pytest
import redis

from intake.cli.client import UnixConnection
from intake.core.settings import Settings
from intake.people.registry import People
from intake.runtime import open_broker
from tests.api_harness import RunningBroker, link_os_user
from tests.factories import draft

ME = f"os:{getpass.getuser()}"


def state(r: redis.Redis) -> tuple[int, int]:
    return r.xlen("intake:audit"), r.zcard("intake:ideas")


def send(url: str, method: str, path: str, body: bytes | None = None,
         headers: list[tuple[str, str]] | None = None) -> tuple[int, dict]:
    """A raw request with headers exactly as given (repeats kept), on the socket or over TCP."""
    parts = urlsplit(url)
    conn: http.client.HTTPConnection = (UnixConnection(parts.path, 30) if parts.scheme == "unix"
                                        else http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30))
    conn.putrequest(method, "/api/v1" + path, skip_accept_encoding=True)
    for name, value in headers or []:
        conn.putheader(name, value)
    conn.putheader("Content-Length", str(len(body or b"")))
    conn.endheaders(body)
    resp = conn.getresponse()
    status, raw = resp.status, resp.read()
    conn.close()
    return status, json.loads(raw) if raw else {}


def token_for(settings: Settings, person: str) -> str:
    from intake.api.callers import ApiTokens

    with open_broker(settings) as broker:
        people = People(broker.store)
        people.upsert(person, name=person.title(), identities=(), actor="test:setup")
        return ApiTokens(broker.store, people).create(person, actor="test:setup", scope="power")[1]


def test_two_authorization_headers_are_a_400_whatever_their_order(api: RunningBroker, settings: Settings,
                                                                  rclient: redis.Redis) -> None:
    """A proxy and a client each add a header, or a smuggler adds one: never guess which counts."""
    good = token_for(settings, "erin")
    body = json.dumps({"text": "hello"}).encode()
    for pair in ([good, "itk_" + "A" * 43], ["itk_" + "A" * 43, good], [good, good]):
        before = state(rclient)
        headers = [("Content-Type", "application/json")] + [("Authorization", f"Bearer {t}") for t in pair]
        status, answer = send(api.tcp_url, "POST", "/ideas", body, headers)
        assert (status, answer["error"]) == (400, "bad_request"), answer
        assert state(rclient) == before
        status, answer = send(api.tcp_url, "GET", "/me", None, headers[1:])
        assert status == 400
    # One header still works.
    status, answer = send(api.tcp_url, "GET", "/me", None, [("Authorization", f"Bearer {good}")])
    assert status == 200 and answer["person"] == "erin"


@pytest.mark.parametrize("ctype,body", [
    (None, b'{"text": "hello"}'),
    ("text/plain", b'{"text": "hello"}'),
    ("application/x-www-form-urlencoded", b'{"text": "hello"}'),
    ("multipart/form-data; boundary=x", b'{"text": "hello"}'),
    ("application/json; charset=utf-16", '{"text": "hello"}'.encode("utf-16")),
    ("application/json; charset=latin-1", '{"text": "h\xe9llo"}'.encode("latin-1")),
    ("application/jsonp", b'{"text": "hello"}'),
])
def test_a_body_that_is_not_application_json_is_415(api: RunningBroker, settings: Settings, rclient: redis.Redis,
                                                      ctype: str | None, body: bytes) -> None:
    """A cross-site form (text/plain, urlencoded, multipart: no preflight) or another charset is
    refused before anything is parsed or written."""
    good = token_for(settings, "erin")
    before = state(rclient)
    headers = [("Authorization", f"Bearer {good}")] + ([("Content-Type", ctype)] if ctype else [])
    status, answer = send(api.tcp_url, "POST", "/ideas", body, headers)
    assert (status, answer["error"]) == (415, "unsupported_media_type"), answer
    assert state(rclient) == before


@pytest.mark.parametrize("body", ['{"text": "hello"}'.encode("utf-16"), '{"text": "hello"}'.encode("utf-32"),
                                  b'\xef\xbb\xbf{"text": "hello"}', b'{"text": "h\xe9llo"}'])
def test_json_that_is_not_utf8_is_400_even_when_labelled_json(api: RunningBroker, settings: Settings,
                                                               rclient: redis.Redis, body: bytes) -> None:
    """json.loads on bytes sniffs UTF-16/32; the API does not: UTF-8 (no BOM) only."""
    good = token_for(settings, "erin")
    before = state(rclient)
    status, answer = send(api.tcp_url, "POST", "/ideas", body,
                          [("Authorization", f"Bearer {good}"), ("Content-Type", "application/json")])
    assert (status, answer["error"]) == (400, "bad_json"), answer
    assert state(rclient) == before
    status, _ = send(api.tcp_url, "POST", "/ideas", '{"text": "h\xe9llo"}'.encode(),
                     [("Authorization", f"Bearer {good}"), ("Content-Type", "application/json; charset=UTF-8")])
    assert status == 200


READS = ["/ideas", "/ideas?all=1", "/ideas/{idea}", "/tasks?all=1", "/ids/I-", "/audit/export", "/audit/verify",
         "/approvers", "/people", "/people/alice", "/report", "/provenance?ref=x"]


def test_an_unlinked_os_user_on_the_socket_reads_nothing(api: RunningBroker, settings: Settings,
                                                        rclient: redis.Redis) -> None:
    """Any local account that can reach the socket is ``os:<name>``: unless an admin linked it to
    a person, it reads no idea, task, approver, person or audit entry (it may still ask who it
    is, and file an idea as the CLI channel)."""
    with open_broker(settings) as broker:
        idea, _ = broker.store.capture(draft(text="the secret plan"))
    for path in READS:
        status, answer = send(api.socket_url, "GET", path.format(idea=idea.id))
        assert (status, answer.get("error")) == (403, "not_linked"), (path, answer)
        assert "secret plan" not in json.dumps(answer)
    status, me = send(api.socket_url, "GET", "/me")
    assert status == 200 and me["identity"] == ME and me["person"] is None
    # Once linked to a person, the same OS user reads.
    link_os_user(settings)
    status, answer = send(api.socket_url, "GET", f"/ideas/{idea.id}")
    assert status == 200 and answer["text"] == "the secret plan"
