"""The API's edges, as an attacker would try them: no token, a forged or tampered token,
malformed bodies, a non-admin using admin powers, a relayed action, a token's whole life."""

from __future__ import annotations

import getpass
import json
from urllib.parse import urlsplit

import pytest
import redis

from intake.cli.client import ApiClient, ApiError, UnixConnection
from intake.core.models import Channel
from intake.core.settings import Settings
from intake.runtime import open_broker
from tests.api_harness import RunningBroker, enrol, post
from tests.factories import draft

ME = f"os:{getpass.getuser()}"


def state(r: redis.Redis) -> tuple[int, int]:
    """How much was written: audit entries and ideas."""
    return r.xlen("intake:audit"), r.zcard("intake:ideas")


def raw_post(api: RunningBroker, path: str, body: bytes, token: str | None = None) -> tuple[int, dict]:
    status, raw = post(api.tcp_url, path, body, token)
    return status, json.loads(raw)


@pytest.mark.parametrize("token", [None, "itk_" + "A" * 43, "itk_short", "Bearer", "x" * 5000])
def test_missing_or_forged_token_is_401_and_writes_nothing(api: RunningBroker, rclient: redis.Redis,
                                                           token: str | None) -> None:
    before = state(rclient)
    status, data = raw_post(api, "/ideas", json.dumps({"text": "hello"}).encode(), token)
    assert status == 401 and data["error"] == "unauthenticated"
    assert state(rclient) == before


@pytest.mark.parametrize("body", [b"{nope", b"[1, 2]", b"\xff\xfe", b'{"text": "x", "admin": true}',
                                  b'{"text": 7}', b'{"text": "' + b"x" * 70000 + b'"}'])
def test_malformed_bodies_are_400_and_write_nothing(api: RunningBroker, rclient: redis.Redis, body: bytes) -> None:
    before = state(rclient)
    status, answer = _socket_post(api, "/ideas", body)
    assert status == 413 if len(body) > 65536 else status == 400, answer
    assert status == 413 or json.loads(answer)["error"] in ("bad_json", "invalid_input")
    assert state(rclient) == before


def _socket_post(api: RunningBroker, path: str, body: bytes) -> tuple[int, bytes]:
    """A raw POST on the socket (aiohttp itself answers 413 to an oversize body)."""
    conn = UnixConnection(urlsplit(api.socket_url).path, 30)
    conn.request("POST", "/api/v1" + path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def test_token_life_admin_only_with_code(api: RunningBroker, settings: Settings, rclient: redis.Redis) -> None:
    codes = enrol(settings, {"alice": ("platform", (ME,)), "bob": ("platform", ())})
    admin = ApiClient(api.socket_url)
    with pytest.raises(ApiError) as err:
        admin.call("POST", "/people", {"id": "erin", "name": "Erin", "code": "000000"})
    assert err.value.reason == "invalid"
    added = admin.call("POST", "/people", {"id": "erin", "name": "Erin", "identities": ["email:Erin@acme.test"],
                                           "code": codes["alice"].next()})
    assert added["identities"] == ["cli:erin", "email:erin@acme.test"]
    made = admin.call("POST", "/people/erin/tokens", {"code": codes["alice"].next()})
    assert made["token"].startswith("itk_") and made["token"] not in rclient.dump("intake:apitokens").decode("latin-1")

    erin = ApiClient(api.tcp_url, made["token"])
    assert erin.call("GET", "/me") == {"identity": "cli:erin", "via": "token", "person": "erin",
                                       "identities": ["cli:erin", "email:erin@acme.test"], "admin": False,
                                       "approver": False, "confirmed": False}
    filed = erin.call("POST", "/ideas", {"text": "please document the flags"})
    assert filed["requester"] == "cli:erin" == filed["filed_by"]
    for method, path, body in [("POST", "/people", {"id": "mal", "name": "M", "code": "123456"}),
                               ("POST", "/freeze", {"reason": "lol"}),
                               ("DELETE", "/tokens/" + made["id"], None),
                               ("POST", f"/ideas/{filed['id']}/promote",
                                {"repo": "acme/web", "change_type": "docs", "code": "123456", "on_behalf_of": "bob"})]:
        with pytest.raises(ApiError) as err:
            erin.call(method, path, body)
        assert err.value.status == 403, (path, err.value.reason)
    assert admin.call("DELETE", "/tokens/" + made["id"])["revoked"] is True
    with pytest.raises(ApiError) as err:
        erin.call("GET", "/me")
    assert err.value.status == 401
    actions = [json.loads(e[1]["e"])["action"] for e in rclient.xrange("intake:audit")]
    assert "api_token.created" in actions and "api_token.revoked" in actions
    assert made["token"] not in json.dumps([e[1] for e in rclient.xrange("intake:audit")])


def test_a_token_record_edited_in_redis_is_not_believed(api: RunningBroker, settings: Settings,
                                                        rclient: redis.Redis) -> None:
    """Someone with the keyspace re-points erin's token at alice (an admin)."""
    codes = enrol(settings, {"alice": ("platform", (ME,))})
    admin = ApiClient(api.socket_url)
    admin.call("POST", "/people", {"id": "erin", "name": "Erin", "code": codes["alice"].next()})
    made = admin.call("POST", "/people/erin/tokens", {"code": codes["alice"].next()})
    record = json.loads(rclient.hget("intake:apitokens", made["id"]))
    record["person"] = "alice"
    rclient.hset("intake:apitokens", made["id"], json.dumps(record))
    with pytest.raises(ApiError) as err:
        ApiClient(api.tcp_url, made["token"]).call("GET", "/me")
    assert err.value.status == 401


def test_on_behalf_of_never_carries_power(api: RunningBroker, settings: Settings, rclient: redis.Redis) -> None:
    """alice (an admin) holds carol's code: relaying carol's approval is refused all the same
    (an approval counts only when its person made it); relaying a deny still works, audited."""
    codes = enrol(settings, {"alice": ("platform", (ME,)), "carol": ("security", ())})
    admin = ApiClient(api.socket_url)
    with open_broker(settings) as broker:  # erin files one herself, through her own channel
        theirs = broker.store.capture(draft(channel=Channel.CLI, requester="cli:erin", text="fix rounding"))[0]
    with pytest.raises(ApiError) as err:
        admin.call("POST", f"/ideas/{theirs.id}/promote",
                   {"repo": "acme/payments", "change_type": "bugfix", "code": codes["carol"].next(),
                    "on_behalf_of": "carol"})
    assert (err.value.status, err.value.reason) == (403, "relay_refused")
    assert ApiClient(api.socket_url).call("GET", f"/ideas/{theirs.id}")["state"] == theirs.state.value
    denied = admin.call("POST", f"/ideas/{theirs.id}/deny", {"reason": "dup", "on_behalf_of": "carol"})
    assert denied["state"] == "denied"
    events = [json.loads(e[1]["e"]) for e in rclient.xrange("intake:audit")]
    assert [e["data"]["reason"] for e in events if e["action"] == "approval.refused"] == ["relay_refused"]
    assert [e["data"]["act"] for e in events if e["action"] == "api.on_behalf_of"] == ["deny"]


def test_unknown_routes_and_methods_are_4xx(api: RunningBroker) -> None:
    client = ApiClient(api.socket_url)
    for method, path in [("GET", "/nope"), ("PUT", "/ideas"), ("GET", "/ideas/I-nothex"),
                         ("GET", "/tasks/T-000000000000")]:
        status, _, _ = client.request(method, path)
        assert 400 <= status < 500, (method, path, status)


def test_who_is_linked_to_what_is_for_admins(api: RunningBroker, settings: Settings) -> None:
    enrol(settings, {"alice": ("platform", ()), "bob": ("platform", (ME,))})
    bob = ApiClient(api.socket_url)
    assert bob.call("GET", "/people/bob")["identities"] == ["cli:bob", ME]
    for path in ("/people", "/people/alice"):
        with pytest.raises(ApiError) as err:
            bob.call("GET", path)
        assert err.value.reason == "forbidden"
