"""intake.channels.slack.verify: the Slack signature check and the middleware in front of bolt."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from intake.channels.slack.verify import (
    SLACK_RAW_BODY,
    SlackAuthError,
    compute_signature,
    slack_verification_middleware,
    verified_body,
    verify_slack_signature,
)
from tests.conftest import VECTORS


def _vectors(name: str) -> dict:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


V = _vectors("signatures.json")["slack"]
SECRET: str = V["signing_secret"]
TS: str = V["timestamp"]
BODY: bytes = V["body"].encode()
SIG: str = V["signature"]
NOW = float(TS)


def check(**overrides: object) -> None:
    args: dict = {
        "body": BODY,
        "timestamp": TS,
        "signature": SIG,
        "signing_secret": SECRET,
        "now": NOW,
    }
    args.update(overrides)
    verify_slack_signature(**args)


def reason_of(**overrides: object) -> str:
    with pytest.raises(SlackAuthError) as info:
        check(**overrides)
    return info.value.reason


# -- the pure check ------------------------------------------------------------------------


def test_slack_docs_vector_verifies() -> None:
    assert compute_signature(body=BODY, timestamp=TS, signing_secret=SECRET) == SIG
    check()


@pytest.mark.parametrize("skew", [300, -300, 299.9, -299.9, 0])
def test_window_accepts_up_to_300s_both_ways(skew: float) -> None:
    check(now=NOW + skew)


@pytest.mark.parametrize("skew", [301, -301, 300.5, -300.5, 10**9])
def test_window_refuses_past_300s_both_ways(skew: float) -> None:
    assert reason_of(now=NOW + skew) == "stale_timestamp"


def test_replay_window_is_the_vector_window() -> None:
    assert V["replay_window_seconds"] == 300


@pytest.mark.parametrize("index", [0, len(BODY) // 2, len(BODY) - 1])
def test_one_byte_body_change_is_a_mismatch(index: int) -> None:
    tampered = bytearray(BODY)
    tampered[index] ^= 0x01
    assert reason_of(body=bytes(tampered)) == "signature_mismatch"


def test_appended_byte_is_a_mismatch() -> None:
    assert reason_of(body=BODY + b"&") == "signature_mismatch"


def test_wrong_secret_is_a_mismatch() -> None:
    assert reason_of(signing_secret=SECRET[:-1] + "6") == "signature_mismatch"


def test_missing_headers() -> None:
    assert reason_of(timestamp=None) == "missing_timestamp"
    assert reason_of(signature=None) == "missing_signature"
    assert reason_of(timestamp=None, signature=None) == "missing_timestamp"


@pytest.mark.parametrize(
    "ts",
    ["abc", "", "1e9", " 1531420618", "1531420618 ", "1531420618\n", "+1531420618", "-1",
     "1531420618.0", "0x5b47", "١٥٣١٤٢٠٦١٨", "1" * 13, "5" * 5000],
)
def test_malformed_timestamp_is_refused_not_raised(ts: str) -> None:
    assert reason_of(timestamp=ts) == "bad_timestamp"


@pytest.mark.parametrize(
    "sig",
    [
        "",
        SIG.upper(),
        "V0=" + SIG[3:],
        "v0=" + SIG[3:].upper(),
        "v1=" + SIG[3:],
        SIG[:-1],
        SIG + "0",
        SIG + "\n",
        " " + SIG,
        "v0=" + "é" * 64,
        "v0=é" + SIG[4:],
        SIG.replace("a", "ａ", 1),  # full-width letter
        "sha256=" + SIG[3:],
    ],
)
def test_malformed_signature_is_refused_not_raised(sig: str) -> None:
    assert reason_of(signature=sig) == "bad_signature_format"


def test_well_formed_but_wrong_signature() -> None:
    assert reason_of(signature="v0=" + "0" * 64) == "signature_mismatch"


@pytest.mark.parametrize("secret", ["", "   "])
def test_empty_secret_is_a_configuration_error(secret: str) -> None:
    with pytest.raises(ValueError):
        check(signing_secret=secret)
    with pytest.raises(ValueError):
        slack_verification_middleware(secret)


# -- the middleware ------------------------------------------------------------------------

PATH = "/slack/events"
MAX_BODY = 4096


class Recorder:
    """The downstream handler: records what it saw."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def slack(self, request: web.Request) -> web.Response:
        assert verified_body(request) is request[SLACK_RAW_BODY]
        self.bodies.append(verified_body(request))
        return web.json_response({"ok": True})

    async def other(self, request: web.Request) -> web.Response:
        return web.Response(text=await request.text())


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def client(recorder: Recorder) -> AsyncIterator[TestClient]:
    app = web.Application(
        middlewares=[slack_verification_middleware(SECRET, max_body=MAX_BODY, clock=lambda: NOW)]
    )
    app.router.add_post(PATH, recorder.slack)
    app.router.add_post("/other", recorder.other)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


def signed_headers(body: bytes, ts: str = TS) -> dict[str, str]:
    return {
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": compute_signature(body=body, timestamp=ts, signing_secret=SECRET),
        "Content-Type": "application/x-www-form-urlencoded",
    }


async def assert_refused(resp, recorder: Recorder) -> None:
    assert resp.status == 401
    assert await resp.json() == {"error": "invalid request"}
    assert recorder.bodies == []


async def test_valid_request_reaches_handler_with_raw_body(
    client: TestClient, recorder: Recorder
) -> None:
    resp = await client.post(PATH, data=BODY, headers=signed_headers(BODY))
    assert resp.status == 200
    assert recorder.bodies == [BODY]


async def test_valid_chunked_request_reaches_handler(
    client: TestClient, recorder: Recorder
) -> None:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(BODY), 50):
            yield BODY[i : i + 50]

    resp = await client.post(PATH, data=gen(), headers=signed_headers(BODY))
    assert resp.status == 200
    assert recorder.bodies == [BODY]


async def test_forged_signature_refused(client: TestClient, recorder: Recorder) -> None:
    headers = signed_headers(BODY)
    headers["X-Slack-Signature"] = "v0=" + "1" * 64
    await assert_refused(await client.post(PATH, data=BODY, headers=headers), recorder)


async def test_tampered_body_refused(client: TestClient, recorder: Recorder) -> None:
    headers = signed_headers(BODY)
    await assert_refused(await client.post(PATH, data=BODY + b"x", headers=headers), recorder)


async def test_stale_request_refused(client: TestClient, recorder: Recorder) -> None:
    old = str(int(NOW) - 301)
    resp = await client.post(PATH, data=BODY, headers=signed_headers(BODY, old))
    await assert_refused(resp, recorder)


async def test_missing_headers_refused(client: TestClient, recorder: Recorder) -> None:
    await assert_refused(await client.post(PATH, data=BODY), recorder)


@pytest.mark.parametrize("ts", ["abc", "", "1e9", "9" * 5000])
async def test_malformed_timestamp_header_refused(
    client: TestClient, recorder: Recorder, ts: str
) -> None:
    headers = signed_headers(BODY)
    headers["X-Slack-Request-Timestamp"] = ts
    await assert_refused(await client.post(PATH, data=BODY, headers=headers), recorder)


async def test_non_ascii_signature_header_refused(client: TestClient, recorder: Recorder) -> None:
    headers = signed_headers(BODY)
    # aiohttp sends header values as latin-1 bytes; the server decodes them back to "é".
    headers["X-Slack-Signature"] = "v0=" + "é" * 64
    await assert_refused(await client.post(PATH, data=BODY, headers=headers), recorder)


async def test_duplicate_signature_header_refused(client: TestClient, recorder: Recorder) -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict(signed_headers(BODY))
    headers.add("X-Slack-Signature", "v0=" + "0" * 64)
    await assert_refused(await client.post(PATH, data=BODY, headers=headers), recorder)


async def test_declared_oversize_refused(client: TestClient, recorder: Recorder) -> None:
    big = b"a" * (MAX_BODY + 1)
    await assert_refused(await client.post(PATH, data=big, headers=signed_headers(big)), recorder)


async def test_body_at_cap_is_accepted(client: TestClient, recorder: Recorder) -> None:
    body = b"a" * MAX_BODY
    resp = await client.post(PATH, data=body, headers=signed_headers(body))
    assert resp.status == 200
    assert recorder.bodies == [body]


async def test_chunked_oversize_without_length_refused(
    client: TestClient, recorder: Recorder
) -> None:
    big = b"a" * (MAX_BODY * 4)

    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    resp = await client.post(PATH, data=gen(), headers=signed_headers(big))
    assert "Content-Length" not in resp.request_info.headers
    assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
    await assert_refused(resp, recorder)


async def test_other_paths_and_methods_pass_through(client: TestClient, recorder: Recorder) -> None:
    resp = await client.post("/other", data=b"unsigned")
    assert resp.status == 200
    assert await resp.text() == "unsigned"
    # GET on the Slack path is not verified; aiohttp answers 405 because only POST is routed.
    resp = await client.get(PATH)
    assert resp.status == 405


async def test_unverified_handler_fails_closed() -> None:
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        verified_body(request)
        return web.Response(text="unreachable")

    app.router.add_post(PATH, handler)
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        resp = await c.post(PATH, data=BODY)
        assert resp.status == 500


async def test_refusal_logs_reason_only(
    client: TestClient, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="intake.channels.slack.verify")
    headers = signed_headers(BODY)
    headers["X-Slack-Signature"] = "v0=" + "2" * 64
    headers["X-Request-Id"] = "req-123"
    await assert_refused(await client.post(PATH, data=BODY, headers=headers), recorder)
    text = caplog.text
    assert "signature_mismatch" in text and "req-123" in text
    for secret_thing in (SECRET, "2" * 64, "xyzz0WbapA4vBCDEFasx0q6G", "team_id"):
        assert secret_thing not in text

