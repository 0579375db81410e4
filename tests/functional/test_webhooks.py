"""GitHub, GitLab and Jira webhooks end to end: the real app, real example payloads signed as
each forge signs them, a forge fake on 127.0.0.1 for the replies, and real Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator

import pytest
import redis

from intake.channels.webhooks import sign_hmac_sha256
from intake.core.models import Channel
from intake.core.settings import Settings
from intake.storage.store import Store
from tests.functional.webhook_harness import (
    GITHUB_SECRET,
    GITLAB_SIGNING,
    Sender,
    running_webhooks,
    vector,
)


@pytest.fixture
async def hooks(settings: Settings) -> AsyncIterator[Sender]:
    async with running_webhooks(settings) as sender:
        yield sender


def written(rclient: redis.Redis) -> tuple[int, int, int]:
    """Ideas, delivery claims and audit events: what a refused request must not change."""
    return (len(rclient.keys("intake:idea:*")), len(rclient.keys("intake:delivery:*")),
            rclient.xlen("intake:audit") if rclient.exists("intake:audit") else 0)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


def comment(text: str) -> dict:
    payload = vector("github/issue_comment_created.json")
    payload["comment"]["body"] = text
    return payload


# -- one idea per delivery, the author recorded, a reply posted ---------------------------------
async def test_github_issue_three_redeliveries_one_idea_and_one_reply(hooks: Sender, store: Store) -> None:
    payload = vector("github/issues_opened.json")
    answers = [await hooks.github("issues", payload, delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958")
               for _ in range(3)]
    assert [status for status, _ in answers] == [202, 202, 202]
    assert [a["created"] for _, a in answers] == [True, False, False]
    idea_id = answers[0][1]["idea"]
    assert {a["idea"] for _, a in answers} == {idea_id}
    idea = store.get_idea(idea_id)
    assert idea.channel is Channel.GITHUB and idea.requester == "github:id:21031067"
    assert idea.title == "Spelling error in the README file"
    assert idea.text.startswith("Spelling error in the README file\n\nIt looks like you accidently spelled")
    assert idea.provenance["author_association"] == "OWNER" and idea.provenance["login"] == "Codertocat"
    assert idea.provenance["repo"] == "Codertocat/Hello-World" and idea.provenance["issue"] == "1"
    calls = await hooks.forge.wait_for(1)
    assert calls[0]["path"] == "/repos/Codertocat/Hello-World/issues/1/comments"
    assert calls[0]["headers"]["Authorization"] == "Bearer ghp_test"
    assert idea_id in calls[0]["json"]["body"]
    await asyncio.sleep(0.2)  # a redelivery must not comment again
    assert len(hooks.forge.calls) == 1


async def test_github_comment_ping_and_ignored_events(hooks: Sender, store: Store, rclient: redis.Redis) -> None:
    status, answer = await hooks.github("ping", vector("github/ping.json"))
    assert status == 200 and answer == {"ignored": "pong"}
    before = written(rclient)
    assert (await hooks.github("issue_comment", comment("Thanks, looks good")))[1] == {"ignored": "no /intake command"}
    assert (await hooks.github("issue_comment", comment("/intakefoo bar")))[1] == {"ignored": "no /intake command"}
    assert (await hooks.github("push", {"ref": "refs/heads/main"}))[1] == {"ignored": "event push"}
    assert written(rclient) == before
    status, answer = await hooks.github("issue_comment", comment("/intake bump the   README links\nplease"))
    assert status == 202
    idea = store.get_idea(answer["idea"])
    assert idea.text == "bump the   README links\nplease" and idea.requester == "github:id:21031067"
    assert idea.provenance["via"] == "issue_comment" and idea.provenance["author_association"] == "OWNER"
    await hooks.forge.wait_for(1)


async def test_a_forge_identity_cannot_approve_by_comment(hooks: Sender, store: Store) -> None:
    status, answer = await hooks.github("issue_comment", comment("/intake approve T-0123456789ab 123456"))
    assert status == 202
    idea = store.get_idea(answer["idea"])
    assert idea.text == "approve T-0123456789ab 123456" and idea.task_id is None  # only ever an idea
    assert store.recent_tasks() == []


async def test_github_label_mode_takes_only_the_label(settings: Settings, store: Store) -> None:
    async with running_webhooks(settings, github_label="bug") as hooks:
        assert (await hooks.github("issues", vector("github/issues_opened.json")))[1] == {"ignored": "issues.opened"}
        status, answer = await hooks.github("issues", vector("github/issues_labeled.json"))
        assert status == 202 and store.get_idea(answer["idea"]).requester == "github:id:21031067"


async def test_gitlab_issue_and_note_each_one_idea_with_a_note_back(hooks: Sender, store: Store) -> None:
    answers = [await hooks.gitlab("Issue Hook", vector("gitlab/issue_open.json"), key="idem-1") for _ in range(3)]
    assert [s for s, _ in answers] == [202] * 3 and [a["created"] for _, a in answers] == [True, False, False]
    idea = store.get_idea(answers[0][1]["idea"])
    assert idea.channel is Channel.GITLAB and idea.requester == "gitlab:id:1"
    assert idea.text == "New API: create/update/delete file\n\nCreate new API for manipulations with repository"
    assert idea.provenance["project"] == "gitlabhq/gitlab-test" and idea.provenance["issue"] == "23"
    note = vector("gitlab/note_issue.json")
    note["object_attributes"]["note"] = "/intake add an API for tags"
    status, answer = await hooks.gitlab("Note Hook", note)
    assert status == 202 and store.get_idea(answer["idea"]).text == "add an API for tags"
    calls = await hooks.forge.wait_for(2)
    paths = sorted(c["path"] for c in calls)
    assert paths == ["/api/v4/projects/1/issues/23/notes", "/api/v4/projects/5/issues/17/notes"]
    assert all(c["headers"]["PRIVATE-TOKEN"] == "glpat-test" for c in calls)
    assert {answers[0][1]["idea"], answer["idea"]} == {c["json"]["body"].split()[5].rstrip(".") for c in calls}


async def test_gitlab_confidential_and_other_notes_are_ignored(hooks: Sender, rclient: redis.Redis) -> None:
    before = written(rclient)
    secret_issue = vector("gitlab/issue_open.json")
    secret_issue["object_attributes"]["confidential"] = True
    assert (await hooks.gitlab("Issue Hook", secret_issue))[1] == {"ignored": "confidential"}
    assert (await hooks.gitlab("Note Hook", vector("gitlab/note_issue.json")))[1] == {"ignored": "no /intake command"}
    assert (await hooks.gitlab("Push Hook", {"object_kind": "push"}))[1] == {"ignored": "event"}
    assert written(rclient) == before


async def test_jira_issue_and_comment_each_one_idea_with_a_comment_back(hooks: Sender, store: Store) -> None:
    answers = [await hooks.jira(vector("jira/issue_created.json"), identifier="4242") for _ in range(3)]
    assert [a["created"] for _, a in answers] == [True, False, False]
    idea = store.get_idea(answers[0][1]["idea"])
    assert idea.channel is Channel.JIRA and idea.requester == "jira:5b10a2844c20165700ede21g"
    assert idea.text == "Upgrade the build image\n\nThe CI image still runs Python 3.10; move it to 3.12."
    status, answer = await hooks.jira(vector("jira/comment_created.json"))
    assert status == 202
    commented = store.get_idea(answer["idea"])
    assert commented.text == "add a retry to the flaky deploy step"
    assert commented.requester == "jira:5b10ac8d82e05b22cc7d4ef5"
    calls = await hooks.forge.wait_for(2)
    assert {c["path"] for c in calls} == {"/rest/api/2/issue/TEST-2/comment"}
    assert calls[0]["headers"]["Authorization"] == "Basic " + base64.b64encode(b"bot@example.com:jt").decode()


async def test_delivery_ids_are_namespaced_per_sender_and_channel(hooks: Sender, store: Store) -> None:
    same = "1234"
    a = vector("github/issues_opened.json")
    b = vector("github/issues_opened.json")
    b["repository"]["id"], b["repository"]["full_name"] = 99, "someone/else"
    first = (await hooks.github("issues", a, delivery=same))[1]["idea"]
    second = (await hooks.github("issues", b, delivery=same))[1]["idea"]
    third = (await hooks.jira(vector("jira/issue_created.json"), identifier=same))[1]["idea"]
    assert len({first, second, third}) == 3


# -- refusals: 4xx, nothing written, no traceback ------------------------------------------------
async def test_forged_or_missing_signatures_are_401_and_write_nothing(
    hooks: Sender, rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = written(rclient)
    gh = vector("github/issues_opened.json")
    body = json.dumps(gh).encode()
    statuses = [
        (await hooks.github("issues", gh, secret="not-the-secret-at-all"))[0],
        (await hooks.github("issues", gh, headers={"X-Hub-Signature-256": ""}))[0],
        (await hooks.github("issues", gh, headers={"X-Hub-Signature-256": "sha1=" + "0" * 40}))[0],
        (await hooks.raw("/webhooks/github", body, {"Content-Type": "application/json", "X-GitHub-Event": "issues",
                                                   "X-GitHub-Delivery": "d1"}))[0],
        (await hooks.github("issues", body + b" ", headers={"X-Hub-Signature-256": sign_hmac_sha256(GITHUB_SECRET, body)}))[0],
        (await hooks.gitlab("Issue Hook", vector("gitlab/issue_open.json"), token="wrong-token"))[0],
        (await hooks.gitlab("Issue Hook", vector("gitlab/issue_open.json"), token="é"))[0],
        (await hooks.raw("/webhooks/gitlab", b"{}", {"Content-Type": "application/json",
                                                    "X-Gitlab-Event": "Issue Hook"}))[0],
        (await hooks.jira(vector("jira/issue_created.json"), secret="wrong-secret-wrong"))[0],
        (await hooks.raw("/webhooks/jira", b"{}", {"Content-Type": "application/json"}))[0],
    ]
    assert statuses == [401] * len(statuses)
    assert written(rclient) == before
    no_tracebacks(caplog)


async def test_oversized_wrong_type_and_malformed_are_4xx_never_5xx(
    settings: Settings, rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_webhooks(settings, webhook_max_body=4096) as hooks:
        before = written(rclient)
        gh = vector("github/issues_opened.json")
        no_issue = {k: v for k, v in gh.items() if k != "issue"}
        bad_number = json.loads(json.dumps(gh))
        bad_number["issue"]["number"] = "1; DROP"
        bot_login = json.loads(json.dumps(gh))
        bot_login["issue"]["user"]["login"] = "evil\nlogin"
        cases = {
            "oversized": await hooks.github("issues", b"{" + b" " * 5000 + b"}"),
            "wrong content type": await hooks.github("issues", gh, headers={"Content-Type": "text/plain"}),
            "form encoded": await hooks.github("issues", b"payload=%7B%7D",
                                               headers={"Content-Type": "application/x-www-form-urlencoded"}),
            "not json": await hooks.github("issues", b"{\"action\": "),
            "not an object": await hooks.github("issues", b"[1, 2]"),
            "not utf-8": await hooks.github("issues", b"{\"a\": \"\xff\"}"),
            "deep nesting": await hooks.github("issues", b"[" * 3000 + b"]" * 3000),
            "no issue": await hooks.github("issues", no_issue),
            "number a string": await hooks.github("issues", bad_number),
            "login with a newline": await hooks.github("issues", bot_login),
            "delivery id with spaces": await hooks.github("issues", gh, delivery="a b c"),
            "no headers at all": await hooks.raw("/webhooks/github", b"{}", {}),
            "gitlab no key": await hooks.gitlab("Issue Hook", vector("gitlab/issue_open.json"),
                                                headers={"Idempotency-Key": "", "X-Gitlab-Event-UUID": ""}),
            "jira description a dict": await hooks.jira({**vector("jira/issue_created.json"), "issue": {
                "id": "1", "key": "T-1", "fields": {"summary": "x", "description": {"type": "doc"}}}}),
        }
        statuses = {name: status for name, (status, _) in cases.items()}
        assert all(400 <= s < 500 for s in statuses.values()), statuses
        assert statuses["oversized"] == 413 and statuses["wrong content type"] == 415
        assert written(rclient) == before
    no_tracebacks(caplog)


async def test_gitlab_signing_token_is_required_and_fresh_when_configured(
    settings: Settings, rclient: redis.Redis, store: Store
) -> None:
    async with running_webhooks(settings, gitlab_signing_token=GITLAB_SIGNING) as hooks:
        issue = vector("gitlab/issue_open.json")
        before = written(rclient)
        assert (await hooks.gitlab("Issue Hook", issue))[0] == 401  # token alone is not enough now
        assert (await hooks.gitlab("Issue Hook", issue, signing="whsec_" + "A" * 43 + "="))[0] == 401
        assert (await hooks.gitlab("Issue Hook", issue, signing=GITLAB_SIGNING,
                                   stamp=int(time.time()) - 301))[0] == 401
        assert written(rclient) == before
        status, answer = await hooks.gitlab("Issue Hook", issue, signing=GITLAB_SIGNING)
        assert status == 202 and store.get_idea(answer["idea"]).requester == "gitlab:id:1"


async def test_an_idea_of_only_invisible_characters_is_refused(hooks: Sender, rclient: redis.Redis) -> None:
    before = written(rclient)
    status, answer = await hooks.github("issue_comment", comment("/intake \u200b\u200b\u202e"))
    assert status == 422 and "nothing visible" in answer["error"]
    assert written(rclient) == before


async def test_a_client_hanging_up_mid_body_is_quiet(
    hooks: Sender, rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = written(rclient)
    server = hooks.client.server
    for path in ("/webhooks/github", "/webhooks/gitlab", "/webhooks/jira"):
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 9000\r\n\r\n{\"action\":".encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    assert (await hooks.github("issues", b"{}", secret="wrong-wrong-wrong"))[0] == 401
    await asyncio.sleep(0.1)
    assert written(rclient) == before
    no_tracebacks(caplog)


async def test_a_linked_forge_login_is_the_person_who_cannot_approve_it(settings: Settings) -> None:
    """Issue 20: alice is linked by her GitHub numeric id; she renames her login and files an
    issue: still alice, refused as self-approval. A login can no longer be linked at all."""
    from intake.core.errors import Refused
    from intake.runtime import open_broker
    from tests.api_harness import enrol

    codes = enrol(settings, {"alice": ("platform", ("github:id:21031067",))})
    payload = vector("github/issues_opened.json")
    payload["issue"]["user"]["login"] = "alice-renamed"  # she renamed her login; the id stays
    async with running_webhooks(settings) as hooks:
        status, answer = await hooks.github("issues", payload)
        assert status == 202
    with open_broker(settings) as broker:
        with pytest.raises(Refused) as refused:
            broker.gatekeeper.promote(answer["idea"], repo="acme/web", change_type="docs", approver_id="alice",
                                      code=codes["alice"].next())
        assert refused.value.reason == "self_approval"
        assert broker.store.get_idea(answer["idea"]).task_id is None
        assert broker.store.get_idea(answer["idea"]).provenance["login"] == "alice-renamed"
        from intake.core.errors import InvalidInput
        from intake.people.registry import People
        with pytest.raises(InvalidInput, match="numeric id"):
            People(broker.store).upsert("alice", name=None, identities=("github:alice-renamed",), actor="t",
                                        create=False)
