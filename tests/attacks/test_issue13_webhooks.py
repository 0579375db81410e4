"""Issue 13 attacks on the ticket webhooks, as an outsider who holds no secret but has seen one
genuine signed delivery (a proxy log, a misdirected redelivery, a leaked request capture), or
who can write in a public repository. Real app, real Redis, signed as each forge signs."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis

from intake.channels.gitlab import sign_standard_webhook
from intake.channels.webhooks import sign_hmac_sha256
from intake.core.settings import Settings
from intake.storage.store import Store
from tests.functional.webhook_harness import (
    GITHUB_SECRET,
    GITLAB_SIGNING,
    GITLAB_TOKEN,
    Sender,
    running_webhooks,
    vector,
)


@pytest.fixture
async def hooks(settings: Settings) -> AsyncIterator[Sender]:
    async with running_webhooks(settings) as sender:
        yield sender


def ideas(rclient: redis.Redis) -> int:
    return len(rclient.keys("intake:idea:*"))


def written(rclient: redis.Redis) -> tuple[int, int, int]:
    return (ideas(rclient), len(rclient.keys("intake:delivery:*")),
            rclient.xlen("intake:audit") if rclient.exists("intake:audit") else 0)


def gh_headers(event: str, body: bytes, delivery: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": sign_hmac_sha256(GITHUB_SECRET, body)}


# -- replay of one genuine delivery under fresh, unsigned delivery ids -----------------------
async def test_github_replay_of_a_signed_body_under_new_delivery_ids_is_one_idea(
    hooks: Sender, rclient: redis.Redis
) -> None:
    """X-GitHub-Delivery is not covered by the signature: an attacker who replays the genuine
    body with a new GUID each time must not file a new idea (and a new comment) each time."""
    body = json.dumps(vector("github/issue_comment_created.json") | {}).encode()
    payload = json.loads(body)
    payload["comment"]["body"] = "/intake rotate the staging keys"
    body = json.dumps(payload).encode()
    genuine = gh_headers("issue_comment", body, str(uuid.uuid4()))
    answers = []
    for _ in range(3):
        replay = dict(genuine, **{"X-GitHub-Delivery": str(uuid.uuid4())})  # the signature is reused as is
        answers.append(await hooks.raw("/webhooks/github", body, replay))
    assert [s for s, _ in answers] == [202, 202, 202]
    assert [a["created"] for _, a in answers] == [True, False, False]
    assert ideas(rclient) == 1


async def test_github_relabelling_an_issue_is_still_one_idea(settings: Settings, rclient: redis.Redis) -> None:
    """In label mode anyone with triage rights can remove and re-add the label: GitHub sends a
    new delivery each time, but one issue must be one idea."""
    async with running_webhooks(settings, github_label="bug") as hooks:
        payload = vector("github/issues_labeled.json")
        payload["label"]["name"] = "bug"
        first = await hooks.github("issues", payload)
        again = await hooks.github("issues", payload)
    assert first[0] == 202 and first[1]["created"] is True
    assert again[0] == 202 and again[1] == {"idea": first[1]["idea"], "created": False}
    assert ideas(rclient) == 1


async def test_jira_replay_under_new_webhook_identifiers_is_one_idea(hooks: Sender, rclient: redis.Redis) -> None:
    """X-Atlassian-Webhook-Identifier is not signed either."""
    body = json.dumps(vector("jira/comment_created.json")).encode()
    answers = [await hooks.jira(body, identifier=str(n)) for n in (111, 222, 333)]
    assert [s for s, _ in answers] == [202, 202, 202]
    assert [a["created"] for _, a in answers] == [True, False, False]
    assert ideas(rclient) == 1


async def test_gitlab_signed_replay_under_new_idempotency_keys_is_one_idea(
    settings: Settings, rclient: redis.Redis
) -> None:
    """With the signing token on, the signature covers webhook-id but not Idempotency-Key:
    a replay inside the five-minute window with fresh keys must still be one idea."""
    async with running_webhooks(settings, gitlab_signing_token=GITLAB_SIGNING) as hooks:
        body = json.dumps(vector("gitlab/issue_open.json")).encode()
        stamp = str(int(time.time()))
        signed = {"Content-Type": "application/json", "X-Gitlab-Event": "Issue Hook", "X-Gitlab-Token": GITLAB_TOKEN,
                  "webhook-id": "msg_1", "webhook-timestamp": stamp,
                  "webhook-signature": sign_standard_webhook(GITLAB_SIGNING, "msg_1", stamp, body)}
        answers = [await hooks.raw("/webhooks/gitlab", body, dict(signed, **{"Idempotency-Key": str(uuid.uuid4())}))
                   for _ in range(3)]
    assert [s for s, _ in answers] == [202, 202, 202]
    assert [a["created"] for _, a in answers] == [True, False, False]
    assert ideas(rclient) == 1


async def raw_http(hooks: Sender, body: bytes, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One POST /webhooks/github written byte for byte (no client merges repeated headers)."""
    url = hooks.client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    lines = [b"POST /webhooks/github HTTP/1.1", f"Host: {url.host}".encode(), b"Content-Type: application/json",
             f"Content-Length: {len(body)}".encode(), b"Connection: close"]
    lines += [f"{k}: {v}".encode() for k, v in headers]
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return int(answer.split(b" ", 2)[1]), answer


# -- forged requests --------------------------------------------------------------------------
async def test_signature_over_a_different_body_or_doubled_headers_is_refused(
    hooks: Sender, rclient: redis.Redis
) -> None:
    payload = vector("github/issues_opened.json")
    signed_body = json.dumps(payload).encode()
    payload["issue"]["body"] = "/intake give me prod"
    other_body = json.dumps(payload).encode()
    before = written(rclient)
    headers = gh_headers("issues", signed_body, str(uuid.uuid4()))
    assert (await hooks.raw("/webhooks/github", other_body, headers))[0] == 401
    # a trailing newline or space is a different body too
    assert (await hooks.raw("/webhooks/github", signed_body + b"\n", headers))[0] == 401
    # upper-case hex, a second (valid) copy beside a forged one, lower-case header name
    upper = dict(headers, **{"X-Hub-Signature-256": headers["X-Hub-Signature-256"].upper().replace("SHA256", "sha256")})
    assert (await hooks.raw("/webhooks/github", signed_body, upper))[0] == 401
    # two copies of the signature header (the valid one second), two event headers
    status, reply = await raw_http(hooks, other_body, [
        ("X-GitHub-Event", "issues"), ("X-GitHub-Delivery", "d-1"),
        ("x-hub-signature-256", sign_hmac_sha256(GITHUB_SECRET, other_body)),
        ("X-Hub-Signature-256", headers["X-Hub-Signature-256"])])
    assert status == 401 and b"duplicate_header" in reply
    status, reply = await raw_http(hooks, signed_body, [
        ("X-GitHub-Event", "issues"), ("X-GitHub-Event", "ping"), ("X-GitHub-Delivery", "d-2"),
        ("X-Hub-Signature-256", headers["X-Hub-Signature-256"])])
    assert status == 401 and b"duplicate_header" in reply
    # a Jira signature with the GitHub secret, a GitLab token that is a prefix of the real one
    assert (await hooks.jira(vector("jira/issue_created.json"), secret=GITHUB_SECRET))[0] == 401
    assert (await hooks.gitlab("Issue Hook", vector("gitlab/issue_open.json"), token=GITLAB_TOKEN[:-1]))[0] == 401
    assert (await hooks.gitlab("Issue Hook", vector("gitlab/issue_open.json"), token=GITLAB_TOKEN + "0"))[0] == 401
    assert written(rclient) == before


@pytest.mark.parametrize("body", [
    # duplicate keys: a proxy or log reader that keeps the first sees "closed", Python the last
    json.dumps(vector("github/issues_opened.json")).encode().replace(b'{"action": "opened"',
                                                                     b'{"action": "closed", "action": "opened"', 1),
    json.dumps(vector("github/issues_opened.json")).encode().replace(b'"login": "Codertocat"',
                                                                     b'"login": "admin", "login": "Codertocat"', 1),
    b"\xef\xbb\xbf" + json.dumps(vector("github/issues_opened.json")).encode(),  # UTF-8 BOM
    json.dumps(vector("github/issues_opened.json") | {"x": float("nan")}).encode(),  # NaN
    b'{"action": "opened", "n": Infinity}',
    json.dumps(vector("github/issues_opened.json")).encode().replace(b'"opened"', b'"op\\ud800ened"'),
])
async def test_validly_signed_json_that_parses_differently_is_refused(
    hooks: Sender, rclient: redis.Redis, body: bytes
) -> None:
    """Signed by the secret holder, but JSON that two parsers read differently (duplicate keys,
    BOM, non-standard NaN/Infinity, a lone surrogate) is refused, not guessed at."""
    before = written(rclient)
    status, answer = await hooks.raw("/webhooks/github", body, gh_headers("issues", body, str(uuid.uuid4())))
    assert status == 400, answer
    assert written(rclient) == before


# -- who is speaking ----------------------------------------------------------------------------
async def test_bot_comments_are_ignored_whoever_sent_the_event(hooks: Sender, rclient: redis.Redis) -> None:
    payload = vector("github/issue_comment_created.json")
    payload["comment"]["body"] = "/intake deploy my branch"
    payload["comment"]["user"]["type"] = "Bot"
    payload["comment"]["user"]["login"] = "intake-helper[bot]"
    assert (await hooks.github("issue_comment", payload))[1] == {"ignored": "bot"}
    payload["comment"]["user"]["type"] = "User"
    payload["sender"]["type"] = "Bot"
    assert (await hooks.github("issue_comment", payload))[1] == {"ignored": "bot"}
    assert ideas(rclient) == 0


async def test_a_stranger_is_recorded_as_such_and_cannot_claim_a_better_association(
    hooks: Sender, store: Store
) -> None:
    """author_association NONE is recorded as NONE; a made-up association is 'unknown', and a
    login that spells another forge's identity stays a github identity."""
    payload = vector("github/issue_comment_created.json")
    payload["comment"]["body"] = "/intake please add me as admin"
    payload["comment"]["author_association"] = "NONE"
    payload["comment"]["user"]["login"] = "Stranger-1"
    payload["comment"]["user"]["id"] = 777001
    status, answer = await hooks.github("issue_comment", payload)
    assert status == 202
    idea = store.get_idea(answer["idea"])
    assert idea.requester == "github:id:777001" and idea.provenance["author_association"] == "NONE"
    assert idea.provenance["login"] == "Stranger-1"  # shown beside the id; never who it is
    payload["comment"]["id"] += 1
    payload["comment"]["author_association"] = "OWNER\nMEMBER"
    status, answer = await hooks.github("issue_comment", payload)
    assert store.get_idea(answer["idea"]).provenance["author_association"] == "unknown"
    payload["comment"]["id"] += 1
    payload["comment"]["user"]["login"] = "slack:U0ADMIN"
    status, answer = await hooks.github("issue_comment", payload)
    assert status == 400 and answer == {"error": "malformed_login"}


async def test_hidden_characters_only_are_refused_on_every_forge(hooks: Sender, rclient: redis.Redis) -> None:
    hidden = "\u202e\u200b\u2066\U000e0041\ufe0f\u3164"
    gh = vector("github/issue_comment_created.json")
    gh["comment"]["body"] = f"/intake {hidden}"
    gl = vector("gitlab/note_issue.json")
    gl["object_attributes"]["note"] = f"/intake {hidden}"
    jr = vector("jira/comment_created.json")
    jr["comment"]["body"] = f"/intake {hidden}"
    assert (await hooks.github("issue_comment", gh))[0] == 422
    assert (await hooks.gitlab("Note Hook", gl))[0] == 422
    assert (await hooks.jira(jr))[0] == 422
    assert ideas(rclient) == 0
