"""Issue 20: one admin, holding every secret the CLI, API and console give them, cannot make a
second approval count. alice is the only admin; carol is the second person ("one from
security"). alice tries every path to carol's factor, or to acting as carol, and each is refused.
Also: anonymous sign-in failures never lock an approver's own step-up, and sign-in answers are the
same for ids that exist and ids that do not."""

from __future__ import annotations

import functools
import getpass
import http.client
import http.cookiejar
import json
import re
import urllib.error
import urllib.parse
import urllib.request

import pytest
import redis

from intake.api.callers import ApiTokens
from intake.cli.client import ApiClient, ApiError
from intake.core.models import Channel
from intake.core.settings import Settings
from intake.people.registry import People
from intake.runtime import open_broker
from tests.api_harness import RunningBroker, enrol
from tests.factories import draft

ME = f"os:{getpass.getuser()}"


class _FromSource(urllib.request.HTTPHandler):
    """Connections from a chosen loopback address (127.0.0.0/8 is all ours): another source."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(http.client.HTTPConnection, source_address=(self.source, 0)), req)


class Console:
    """A bare browser for the console over HTTP: a cookie jar, the CSRF token, the Origin header."""

    def __init__(self, base: str, origin: str, source: str = "127.0.0.1") -> None:
        self.base, self.origin = base, origin
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _FromSource(source))
        self._csrf: str | None = None

    def get(self, path: str) -> tuple[int, str]:
        try:
            with self.opener.open(self.base + path, timeout=30) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def csrf(self) -> str:
        if self._csrf is not None:
            return self._csrf
        _, page = self.get("/console/signin")
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found, "no CSRF token on the sign-in page"
        self._csrf = found.group(1)
        return self._csrf

    def post(self, path: str, form: dict[str, str] | None = None, body: dict[str, str] | None = None,
             ) -> tuple[int, str]:
        headers = {"Origin": self.origin}
        if body is not None:
            data = json.dumps(body).encode()
            headers |= {"Content-Type": "application/json", "X-CSRF-Token": self.csrf()}
        else:
            data = urllib.parse.urlencode({**(form or {}), "csrf": self.csrf()}).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method="POST")
        try:
            with self.opener.open(req, timeout=30) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def _refused(call: object, *args: object) -> ApiError:
    with pytest.raises(ApiError) as err:
        call(*args)  # type: ignore[operator]
    assert err.value.status in (403, 404), (err.value.status, err.value.reason)
    return err.value


def test_one_admin_cannot_hold_or_use_a_second_persons_factor(api: RunningBroker, settings: Settings,
                                                             rclient: redis.Redis) -> None:
    codes = enrol(settings, {"alice": ("platform", (ME,))})
    admin = ApiClient(api.socket_url)

    # Invite: the answer carries no secret, and no secret exists yet for anyone to read.
    invited = admin.call("POST", "/approvers", {"id": "carol", "name": "Carol", "groups": ["security"],
                                                "code": codes["alice"].next()})
    assert invited == {"id": "carol", "invited": True, "confirmed": False}
    with open_broker(settings) as broker:
        assert broker.approvers.get("carol").secret_enc == ""

    # Enrolment as carol from alice's own channel: refused (the socket says alice).
    assert _refused(admin.call, "POST", "/approvers/carol/enrol", {}).reason == "forbidden"
    # Confirm as carol, directly or relayed: refused, whatever the code.
    assert _refused(admin.call, "POST", "/approvers/carol/confirm", {"code": "123456"}).reason == "forbidden"
    assert _refused(admin.call, "POST", "/approvers/carol/confirm",
                    {"code": "123456", "on_behalf_of": "carol"}).reason == "relay_refused"

    # An admin-minted token for carol: it files ideas and does nothing with power.
    minted = admin.call("POST", "/people/carol/tokens", {"code": codes["alice"].next()})
    assert minted["scope"] == "ideas"
    as_carol = ApiClient(api.tcp_url, minted["token"])
    assert as_carol.call("GET", "/me")["person"] == "carol"
    for path, body in [("/approvers/carol/enrol", {}), ("/approvers/carol/confirm", {"code": "123456"}),
                       ("/approvers/carol/reset", {"code": "123456"}), ("/people/carol/tokens", {"code": "1"})]:
        assert _refused(as_carol.call, "POST", path, body).reason == "token_scope", path

    # Reset by the admin: a revoke, no new secret in the answer.
    with open_broker(settings) as broker:  # fresh codes for alice: her two are spent
        other = broker.store.capture(draft(channel=Channel.CLI, requester="cli:erin", text="fix rounding"))[0]
        People(broker.store).upsert("erin", name="Erin", actor="test:setup")
    idea_id = other.id
    totp = codes["alice"].totp

    def alice_code(_: int) -> str:
        """alice's current code, made usable again (test setup: a code works once, and waiting
        for the next step would make this test slow; alice is entitled to her own codes)."""
        rclient.delete("intake:totp:last:alice")
        return totp.now()

    reset = admin.call("POST", "/approvers/carol/reset", {"code": alice_code(2)})
    assert reset == {"id": "carol", "revoked": True, "confirmed": False}
    # Remove and invite again: still no secret for the admin.
    admin.call("DELETE", "/approvers/carol")
    again = admin.call("POST", "/approvers", {"id": "carol", "name": "Carol", "groups": ["security"],
                                              "code": alice_code(3)})
    assert "otpauth_uri" not in again

    # Relaying carol's approval (with any code, even one alice made up): refused before any check.
    task_id = "T-0123456789ab"  # refused before any lookup: the relay itself is the refusal
    for path, body in [(f"/ideas/{idea_id}/promote", {"repo": "acme/payments", "change_type": "bugfix",
                                                      "code": "123456", "on_behalf_of": "carol"}),
                       (f"/tasks/{task_id}/approve", {"code": "123456", "on_behalf_of": "carol"}),
                       (f"/tasks/{task_id}/accept", {"code": "123456", "sha": "a" * 40, "diff_sha256": "b" * 64,
                                                     "on_behalf_of": "carol"}),
                       (f"/tasks/{task_id}/amend", {"code": "123456", "repo": "acme/web", "on_behalf_of": "carol"})]:
        assert _refused(admin.call, "POST", path, body).reason == "relay_refused"
    assert _refused(as_carol.call, "POST", f"/ideas/{idea_id}/promote",
                    {"repo": "acme/payments", "change_type": "bugfix", "code": "123456"}).reason == "token_scope"

    # The console: signing in as carol fails exactly as for a stranger's id; passkey registration
    # needs a session, which alice cannot get as carol.
    console = Console(api.tcp_url, settings.console_origin)
    status, page = console.post("/console/signin", {"approver": "carol", "code": alice_code(4)})
    assert status == 403 and "sign-in failed" in page
    status, _ = console.post("/console/passkeys/options", body={})
    assert status in (302, 303, 401, 403)
    status, page = console.get("/console/ideas")
    assert "Sign in" in page  # still signed out

    # After every attempt: carol has no secret, no confirmation, no approval anywhere.
    with open_broker(settings) as broker:
        assert broker.approvers.get("carol").secret_enc == "" and not broker.approvers.get("carol").confirmed
        assert "carol" not in {a.approver for t in broker.store.recent_tasks() for a in t.approvals}
    events = [json.loads(e[1]["e"]) for e in rclient.xrange("intake:audit")]
    assert not [e for e in events if e["action"] in ("approver.confirmed", "approver.enrolling")
                and e["subject"] == "carol"]


def test_an_admin_made_token_never_outranks_its_scope_even_when_edited(api: RunningBroker, settings: Settings,
                                                                       rclient: redis.Redis) -> None:
    """Someone with the keyspace flips an ideas token's scope to power: the MAC no longer holds."""
    enrol(settings, {"alice": ("platform", (ME,))})
    with open_broker(settings) as broker:
        People(broker.store).upsert("erin", name="Erin", actor="test:setup")
        made, token = ApiTokens(broker.store, People(broker.store)).create("erin", actor="admin", scope="ideas")
    record = json.loads(rclient.hget("intake:apitokens", made))
    record["scope"] = "power"
    rclient.hset("intake:apitokens", made, json.dumps(record))
    with pytest.raises(ApiError) as err:
        ApiClient(api.tcp_url, token).call("GET", "/me")
    assert err.value.status == 401


def _scrub(page: str) -> str:
    """A response without its nonces (the CSRF token)."""
    return re.sub(r'(name="csrf(?:-token)?" (?:value|content)=)"[^"]+"', r"\1", page)


def test_anonymous_wrong_signins_never_lock_the_approver(api: RunningBroker, settings: Settings,
                                                         rclient: redis.Redis) -> None:
    """1,000 wrong sign-ins for alice by a stranger: the stranger is throttled; alice's own step-up
    (an approval over her own channel) and her own sign-in from her own address still work."""
    codes = enrol(settings, {"alice": ("platform", (ME,))})
    stranger = Console(api.tcp_url, settings.console_origin, source="127.0.0.1")
    answers = {}
    for i in range(1000):
        status, page = stranger.post("/console/signin", {"approver": "alice", "code": f"{i:06d}"})
        answers[status] = answers.get(status, 0) + 1
    assert set(answers) == {403} and sum(answers.values()) == 1000
    assert "too many failed sign-ins" in page  # the stranger's source is throttled
    assert rclient.zcard("intake:totp:fail:alice") == 0  # nothing counted on alice herself
    with open_broker(settings) as broker:
        assert not broker.approvers.is_locked("alice")
        idea = broker.store.capture(draft(channel=Channel.CLI, requester="cli:erin", text="docs please"))[0]
    decided = ApiClient(api.socket_url).call("POST", f"/ideas/{idea.id}/promote",
                                             {"repo": "acme/web", "change_type": "docs", "code": codes["alice"].next()})
    assert decided["approvers"] == ["alice"]
    mine = Console(api.tcp_url, settings.console_origin, source="127.0.0.2")
    status, page = mine.post("/console/signin", {"approver": "alice", "code": codes["alice"].next()})
    assert status == 200 and "Sign in" not in page.split("<main", 1)[-1][:400], page[:300]


def test_signin_answers_are_the_same_for_known_and_unknown_ids(api: RunningBroker, settings: Settings) -> None:
    enrol(settings, {"alice": ("platform", (ME,)), "carol": ("security", ())})
    known = Console(api.tcp_url, settings.console_origin, source="127.0.0.3")
    unknown = Console(api.tcp_url, settings.console_origin, source="127.0.0.4")
    for code in ("000000", "12345", ""):
        a = known.post("/console/signin", {"approver": "carol", "code": code})
        b = unknown.post("/console/signin", {"approver": "zed", "code": code})
        assert a[0] == b[0] == 403
        assert _scrub(a[1]).replace("carol", "ID") == _scrub(b[1]).replace("zed", "ID")
    # An invited id that never enrolled answers the same too.
    ApiClient(api.socket_url).call("DELETE", "/approvers/carol")
    a = known.post("/console/signin", {"approver": "carol", "code": "000000"})
    b = unknown.post("/console/signin", {"approver": "zed", "code": "000000"})
    assert _scrub(a[1]).replace("carol", "ID") == _scrub(b[1]).replace("zed", "ID")
    # Passkey options: the same but for the random challenge.
    status_a, opts_a = known.post("/console/signin/options", body={"approver": "alice"})
    status_b, opts_b = unknown.post("/console/signin/options", body={"approver": "zed"})
    assert status_a == status_b == 200
    ja, jb = json.loads(opts_a), json.loads(opts_b)
    for j in (ja, jb):
        j.pop("challenge_id")
        j["options"].pop("challenge")
    assert ja == jb
