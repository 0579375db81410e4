"""Issue 10, attacked: one person with two identities, callers nobody linked, malformed
requests. Each test is an attempt through the real API (the broker's app on TCP and its unix
socket, a real Redis); it asserts the refusal."""

from __future__ import annotations

import getpass
import json

import pytest
import redis

from intake.api.callers import ApiTokens
from intake.cli.client import ApiClient, ApiError
from intake.core.models import Channel, IdeaDraft
from intake.core.settings import Settings
from intake.people.registry import People
from intake.runtime import open_broker
from tests.api_harness import RunningBroker, enrol, post

ME = f"os:{getpass.getuser()}"


def audit_len(r: redis.Redis) -> int:
    return r.xlen("intake:audit")


def slack_idea(settings: Settings, author: str, text: str) -> str:
    """An idea as the Slack channel captures it after verifying the event: ``author`` wrote it."""
    with open_broker(settings) as broker:
        idea, _ = broker.store.capture(IdeaDraft(channel=Channel.SLACK, requester=f"slack:{author}",
                                                 delivery_id=f"Ev-{author}-{len(text)}", text=text))
        broker.audit.seal_pending()
    return idea.id


@pytest.mark.parametrize("body", [b'{"text": ' + b"[" * 30000 + b"]" * 30000 + b"}",
                                  b"[" * 60000, b'{"text": "x", "title": ' + b'{"a":' * 9000 + b"1" + b"}" * 9000 + b"}"])
def test_deeply_nested_json_is_a_400_not_a_500(api: RunningBroker, rclient: redis.Redis, body: bytes) -> None:
    """A body under the size limit but nested past the decoder's recursion limit."""
    before = audit_len(rclient)
    status, answer = post(api.socket_url, "/ideas", body)
    assert status == 400, (status, answer[:200])
    assert json.loads(answer)["error"] == "bad_json"
    assert audit_len(rclient) == before


def test_tcp_without_a_token_cannot_use_power_even_from_localhost(api: RunningBroker, settings: Settings,
                                                                   rclient: redis.Redis) -> None:
    """127.0.0.1 over TCP is not the socket: no peer uid is believed, no header stands in for one."""
    codes = enrol(settings, {"alice": ("platform", (ME,))})
    idea = ApiClient(api.socket_url).call("POST", "/ideas", {"text": "x", "requester": "erin"})
    before = audit_len(rclient)
    for headers_token in (None, "alice", "Bearer itk_" + "a" * 43):
        status, answer = post(api.tcp_url, f"/ideas/{idea['id']}/promote",
                              json.dumps({"repo": "acme/web", "change_type": "docs",
                                          "code": codes["alice"].next() if headers_token is None else "1"}).encode(),
                              headers_token)
        assert status == 401, answer
    assert audit_len(rclient) == before


@pytest.mark.parametrize("name", ["alice\n", "Alice", "alice ", "\uff41lice", "al\u0131ce", "alice\u200b"])
def test_filing_under_a_variant_of_an_approvers_name_is_refused_or_is_still_them(
        api: RunningBroker, settings: Settings, name: str) -> None:
    """bob (an approver) files an idea "as" a look-alike of alice's id: either the name is not an
    id at all, or it is alice's and bob is still the filer; bob cannot approve it alone."""
    codes = enrol(settings, {"bob": ("platform", (ME,)), "alice": ("platform", ())})
    bob = ApiClient(api.socket_url)
    try:
        idea = bob.call("POST", "/ideas", {"text": "rename the flag", "requester": name})
    except ApiError as err:
        assert err.status == 400 and err.reason == "invalid_input"
        return
    assert idea["filed_by"] == ME
    with pytest.raises(ApiError) as err:
        bob.call("POST", f"/ideas/{idea['id']}/promote", {"repo": "acme/web", "change_type": "docs",
                                                          "code": codes["bob"].next()})
    assert err.value.reason == "self_approval"


def test_an_identity_of_someone_else_cannot_be_linked_to_me(api: RunningBroker, settings: Settings) -> None:
    """alice (admin) tries to take bob's Slack id (or a case variant of his email) as her own."""
    codes = enrol(settings, {"alice": ("platform", (ME,)),
                             "bob": ("platform", ("slack:UBOB000001", "email:bob@acme.test"))})
    alice = ApiClient(api.socket_url)
    for ident in ("slack:UBOB000001", "email:BOB@Acme.Test"):
        with pytest.raises(ApiError) as err:
            alice.call("POST", "/people/alice/links", {"identity": ident, "code": codes["alice"].next()})
        assert err.value.status == 400 and "already linked to bob" in str(err.value)


def test_an_approver_cannot_approve_their_slack_words_through_their_os_identity(
        api: RunningBroker, settings: Settings) -> None:
    """alice wrote the message in Slack; she approves over the socket, as os:<her user>."""
    codes = enrol(settings, {"alice": ("platform", (ME, "slack:UALICE0001"))})
    idea_id = slack_idea(settings, "UALICE0001", "ship the docs")
    with pytest.raises(ApiError) as err:
        ApiClient(api.socket_url).call("POST", f"/ideas/{idea_id}/promote",
                                       {"repo": "acme/web", "change_type": "docs", "code": codes["alice"].next()})
    assert err.value.reason == "self_approval"


def test_a_non_approver_cannot_deny_or_revoke_someone_elses_work(api: RunningBroker, settings: Settings,
                                                                 rclient: redis.Redis) -> None:
    """erin has a token and no approver record: she tries to end frank's idea and task."""
    codes = enrol(settings, {"alice": ("platform", (ME,)), "bob": ("platform", ())})
    admin = ApiClient(api.socket_url)
    for who in ("erin", "frank"):
        admin.call("POST", "/people", {"id": who, "name": who.title(), "code": codes["alice"].next()})
    idea = admin.call("POST", "/ideas", {"text": "frank's idea", "requester": "frank"})
    # alice's two codes are spent: mint erin's token as the API would (test setup)
    with open_broker(settings) as broker:
        _, token = ApiTokens(broker.store, People(broker.store)).create("erin", actor="test:setup", scope="power")
        state = broker.store.get_idea(idea["id"]).state
    erin = ApiClient(api.tcp_url, token)
    with pytest.raises(ApiError) as err:
        erin.call("POST", f"/ideas/{idea['id']}/deny", {"reason": "mine now"})
    assert err.value.status == 403
    with pytest.raises(ApiError) as err:
        erin.call("POST", f"/ideas/{idea['id']}/deny", {"reason": "as bob", "on_behalf_of": "bob"})
    assert err.value.status == 403 and err.value.reason == "forbidden"
    with pytest.raises(ApiError) as err:
        erin.call("POST", "/freeze", {"reason": "stop everything"})
    assert err.value.status == 403
    assert rclient.zcard("intake:ideas") == 1
    with open_broker(settings) as broker:
        assert broker.store.get_idea(idea["id"]).state == state


def test_a_token_of_a_person_whose_record_was_deleted_is_refused(api: RunningBroker, settings: Settings,
                                                                 rclient: redis.Redis) -> None:
    """Someone with the keyspace deletes erin's record (or swaps in another one): her token stops."""
    enrol(settings, {"alice": ("platform", (ME,))})
    with open_broker(settings) as broker:
        People(broker.store).upsert("erin", name="Erin", actor="test:setup")
        _, token = ApiTokens(broker.store, People(broker.store)).create("erin", actor="test:setup", scope="ideas")
    erin = ApiClient(api.tcp_url, token)
    assert erin.call("GET", "/me")["person"] == "erin"
    alice_record = rclient.get("intake:person:alice")
    rclient.set("intake:person:erin", alice_record)  # a valid MAC, but for another id
    with pytest.raises(ApiError) as err:
        erin.call("GET", "/me")
    assert err.value.status == 401
    rclient.delete("intake:person:erin")
    with pytest.raises(ApiError) as err:
        erin.call("GET", "/me")
    assert err.value.status == 401


def test_unlinking_my_own_identity_does_not_make_my_words_someone_elses(api: RunningBroker, settings: Settings,
                                                                         rclient: redis.Redis) -> None:
    """alice (admin and approver) wrote an idea in Slack. Unlinking needs no code (it "takes
    power away"), so she unlinks her Slack id from herself and then promotes her own words on
    a one-approval tier."""
    codes = enrol(settings, {"alice": ("platform", (ME, "slack:UALICE0001"))})
    idea_id = slack_idea(settings, "UALICE0001", "ship my own docs")
    alice = ApiClient(api.socket_url)
    try:
        alice.call("DELETE", "/people/alice/links/slack:UALICE0001")
    except ApiError as err:  # refusing the unlink also holds the line
        assert err.status in (400, 403)
    with pytest.raises(ApiError) as err:
        alice.call("POST", f"/ideas/{idea_id}/promote", {"repo": "acme/web", "change_type": "docs",
                                                         "code": codes["alice"].next()})
    assert err.value.reason == "self_approval"


async def test_deeply_nested_json_to_the_console_is_a_4xx_not_a_500(settings: Settings) -> None:
    """The console's pre-sign-in passkey options endpoint reads JSON: nested past the decoder's
    depth, it is refused, never a 500 with a traceback."""
    import re

    from aiohttp.test_utils import TestClient, TestServer

    from intake.app import create_app

    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as client:
        page = await (await client.get("/console/signin")).text()  # a session and its CSRF token
        token = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        resp = await client.post("/console/signin/options", data=b"[" * 20_000 + b"]" * 20_000,
                                 headers={"Content-Type": "application/json", "Origin": settings.console_origin,
                                          "X-CSRF-Token": token})
    assert resp.status == 400, resp.status  # reached the parser, and refused it
