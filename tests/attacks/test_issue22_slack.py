"""Issue 22 attacks on Slack modals: a submission's idea/task reference is the broker's own
(MAC'd, bound to the opener and the card), never ``private_metadata`` as sent; a stranger's
submission, another user's modal and an approver removed while the modal was open are refused
on the modal and audited."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pyotp
import pytest

from intake.core.models import IDEA_PENDING, IdeaState
from intake.core.settings import Settings
from intake.runtime import open_broker
from intake.storage.store import Store
from tests.functional.slack_harness import REQUESTER, SLACK_USERS, STRANGER, SlackDriver, enrol_approvers, running_app

ALICE, BOB = SLACK_USERS["alice"], SLACK_USERS["bob"]


@pytest.fixture
def totps(settings: Settings) -> dict[str, pyotp.TOTP]:
    return enrol_approvers(settings)


@pytest.fixture
async def slack(settings: Settings, totps: dict) -> AsyncIterator[SlackDriver]:
    async with running_app(settings, "http") as driver:
        yield driver


async def file(slack: SlackDriver, text: str) -> str:
    reply = await slack.command(REQUESTER, text)
    return str(reply["text"]).split("`")[1]


def refusals(store: Store) -> list[tuple[str, str, str]]:
    return [(e["actor"], e["subject"], e["data"]["reason"]) for e in store.audit.export()
            if e["action"] == "approval.refused"]


def promote_values(code: str) -> dict[str, str]:
    return {"repo": "acme/web", "change_type": "docs", "code": code}


async def test_a_hand_made_or_edited_reference_is_refused_and_audited(slack: SlackDriver, store: Store,
                                                                      totps: dict[str, pyotp.TOTP]) -> None:
    """Alice opens Promote on one idea; a submission naming another idea (the old plain
    ``{"idea": …}`` metadata, or the broker's reference with the subject swapped) acts on
    nothing."""
    opened, target = await file(slack, "document the retry flag"), await file(slack, "delete the prod db")
    await slack.press(ALICE, "intake_promote", opened)
    view = await slack.opened_view(1)
    sealed = json.loads(view["private_metadata"])
    assert sealed["r"]["ref"] == {"subject": opened} and sealed["r"]["opener"] == ALICE
    swapped = {**sealed, "r": {**sealed["r"], "ref": {"subject": target}}}
    for metadata in (json.dumps({"idea": target}), json.dumps(swapped), "", "{", json.dumps([1]),
                     json.dumps({**sealed, "r": {**sealed["r"], "kind": "deny"}})):
        answer = await slack.submit(ALICE, {**view, "private_metadata": metadata}, promote_values(totps["alice"].now()))
        assert answer["response_action"] == "errors" and "not opened by intake" in answer["errors"]["code"], answer
    assert store.get_idea(target).state in IDEA_PENDING
    assert store.get_idea(opened).state in IDEA_PENDING
    assert refusals(store) == [(f"slack:{ALICE}", "slack:modal", "forged_modal")] * 6
    # The reference as the broker wrote it still works for its opener.
    ok = await slack.submit(ALICE, view, promote_values(totps["alice"].now()))
    assert ok.get("response_action") is None and store.get_idea(opened).state is IdeaState.PROMOTED


async def test_a_modal_submitted_by_someone_other_than_its_opener_is_refused(slack: SlackDriver, store: Store,
                                                                              totps: dict[str, pyotp.TOTP]) -> None:
    """Bob (an approver himself) or a stranger replays the modal Alice opened: refused."""
    idea = await file(slack, "rotate the keys")
    await slack.press(ALICE, "intake_promote", idea)
    view = await slack.opened_view(1)
    for user, code in ((BOB, totps["bob"].now()), (STRANGER, "123456")):
        answer = await slack.submit(user, view, promote_values(code))
        assert answer["response_action"] == "errors" and "opened by someone else" in answer["errors"]["code"]
    assert store.get_idea(idea).state in IDEA_PENDING
    assert refusals(store) == [(f"slack:{BOB}", "slack:modal", "wrong_opener"),
                               (f"slack:{STRANGER}", "slack:modal", "wrong_opener")]


async def test_an_approver_removed_while_the_modal_was_open_is_refused_and_audited(
        slack: SlackDriver, store: Store, settings: Settings, totps: dict[str, pyotp.TOTP]) -> None:
    idea = await file(slack, "ship the feature")
    await slack.press(BOB, "intake_promote", idea)
    view = await slack.opened_view(1)
    with open_broker(settings) as broker:
        broker.approvers.remove("bob", actor="cli:root")
    answer = await slack.submit(BOB, view, promote_values(totps["bob"].now()))
    assert answer["response_action"] == "errors" and "Nothing was changed" in answer["errors"]["code"]
    assert store.get_idea(idea).state in IDEA_PENDING
    assert refusals(store) == [(f"slack:{BOB}", idea, "not_approver")]


async def test_every_kind_of_modal_carries_a_sealed_reference(slack: SlackDriver, store: Store) -> None:
    idea = await file(slack, "fix the docs")
    await slack.press(ALICE, "intake_deny", idea)
    view = await slack.opened_view(1)
    sealed = json.loads(view["private_metadata"])
    assert sealed["r"]["kind"] == "deny" and sealed["r"]["ref"] == {"subject": idea} and len(sealed["mac"]) == 64
    assert sealed["r"]["card"].endswith("/1.0")  # the card's channel and message ts
    # A deny modal's reference does not promote (nor the other way round).
    promote_view = {**view, "callback_id": "intake_promote_submit"}
    answer = await slack.submit(ALICE, promote_view, promote_values("123456"))
    assert "not opened by intake" in answer["errors"]["code"]
    assert (await slack.submit(ALICE, view, {"reason": "no"})).get("response_action") is None
    assert store.get_idea(idea).state is IdeaState.DENIED
