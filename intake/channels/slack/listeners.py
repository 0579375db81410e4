"""Slack listeners: file ideas, and approve in-channel with step-up MFA.

Channels only ever create ideas: ``/intake <text>``, an @mention and the "Send to intake"
message shortcut all normalise into one :class:`IdeaDraft` (requester = the Slack user id of
the words' author, never a display name; ``filed_by`` = who sent them in) and capture it durably *before* Slack is acknowledged (the app runs with
``process_before_response``), idempotently on Slack's delivery ids.

Promote, Approve and Deny buttons open modals; every submission goes through the same
:class:`~intake.tasks.promotion.Gatekeeper` the CLI uses, so the clicking user must be a registered,
confirmed, eligible approver with a fresh code. Anyone else gets an ephemeral refusal and nothing
changes. Refusals show on the modal field they concern.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from intake.channels.slack import render
from intake.channels.slack.modals import ModalRefused, open_reference, seal_reference
from intake.core.errors import IntakeError, Refused
from intake.core.models import Approver, Channel, Idea, IdeaDraft, is_id, sha256_hex
from intake.runtime import Broker
from intake.text.mrkdwn import escape, is_user_id
from intake.text.normalise import decode_slack

log = logging.getLogger("intake.channels.slack")

HELP = (
    "*intake* turns requests into agent work, only after an approver with a fresh code agrees.\n"
    "`/intake <what you need>`: file an idea\n"
    "`/intake status I-… | T-…`: where an idea or task stands\n"
    "`/intake revoke T-… [reason]`: stop a task (requester or approver)\n"
    "You can also @mention the app, or use *Send to intake* on any message."
)
_SUBCOMMAND = re.compile(r"^(status|revoke)\s+([IT]-[0-9a-f]{12})(?:\s+(.*))?$", re.DOTALL)
_LEADING_MENTION = re.compile(r"^\s*<@[UW][A-Z0-9]+>\s*")
# Which modal field a refusal belongs on (Slack shows errors under input blocks).
_FIELD = {"repo_not_allowed": "repo", "change_type_not_allowed": "change_type", "wrong_group": "repo"}


def _command_delivery(command: dict[str, Any], request: Any) -> str:
    """A slash command's delivery id, unique per workspace and user: Slack's trigger id, or,
    when a request carries none, the hash of its signed body (so two people's commands never
    share one id, while a retry of the same request still does)."""
    sender = f"cmd:{command.get('team_id', '')}:{command.get('user_id', '')}"
    trigger = str(command.get("trigger_id") or "")
    return f"{sender}:{trigger}" if trigger else f"{sender}:raw:{_raw_hash(request)}"


def _raw_hash(request: Any) -> str:
    raw = request if isinstance(request, str) else (getattr(request, "raw_body", "") or "")
    return sha256_hex(raw.encode())


class SlackIntake:
    """The listeners, bound to one broker."""

    def __init__(self, broker: Broker, capture: Callable[[IdeaDraft], Awaitable[tuple[Idea, bool]]]) -> None:
        self.broker = broker
        self.capture = capture  # durable, group-committed capture (intake.storage.capture_queue)

    def register(self, app: AsyncApp) -> None:
        app.command("/intake")(self.on_command)
        app.event("app_mention")(self.on_mention)
        app.shortcut("intake_send")(self.on_shortcut)
        app.action("intake_promote")(self.on_promote_button)
        app.action("intake_approve")(self.on_approve_button)
        app.action("intake_accept")(self.on_accept_button)
        app.action("intake_deny")(self.on_deny_button)
        app.action("intake_passkey_link")(self.on_link_button)
        app.action("intake_review_link")(self.on_link_button)
        app.view("intake_promote_submit")(self.on_promote_submit)
        app.view("intake_approve_submit")(self.on_approve_submit)
        app.view("intake_accept_submit")(self.on_accept_submit)
        app.view("intake_deny_submit")(self.on_deny_submit)

    # -- shared ----------------------------------------------------------------------------
    async def _capture(
        self, *, user: str, delivery_id: str, text: str, provenance: dict[str, str], request: Any,
        author: str | None = None,
    ) -> tuple[Idea | None, bool, str]:
        """Durably capture an idea; returns (idea, created, message for the filer). ``author``
        is who wrote the words when ``user`` only sent them in (the message shortcut)."""
        try:
            draft = IdeaDraft(
                channel=Channel.SLACK, requester=f"slack:{author or user}", filed_by=f"slack:{user}",
                delivery_id=delivery_id, text=text,
                provenance={k: v for k, v in provenance.items() if v}, raw_sha256=_raw_hash(request),
            )
            idea, created = await self.capture(draft)
        except IntakeError as exc:
            return None, False, f"Not captured: {escape(str(exc))}"
        except ValueError:
            return None, False, "Not captured: the request was malformed"
        return idea, created, f"Captured as idea `{idea.id}`. An approver will review it."

    async def _ephemeral(self, client: AsyncWebClient, channel: str | None, user: str, text: str) -> None:
        """Best effort: a lost ephemeral note must not fail the request it answers."""
        if not channel:
            return
        try:
            await client.chat_postEphemeral(channel=channel, user=user, text=text)
        except SlackApiError as exc:
            log.info("ephemeral reply failed: %s", exc.response.get("error"))

    async def _approver(self, user: str) -> Approver | None:
        """The registered, confirmed approver behind this Slack user, or None."""
        try:
            approver = await asyncio.to_thread(self.broker.approvers.by_slack_user, user)
        except Refused:
            return None
        return approver if approver.confirmed else None

    async def _refuse_button(self, client: AsyncWebClient, body: dict[str, Any], user: str, subject: str) -> None:
        await asyncio.to_thread(
            self.broker.store.audit.record, f"slack:{user}", "approval.refused", subject, reason="not_approver", via="slack"
        )
        channel = (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id")
        await self._ephemeral(client, channel, user,
                              "Only registered, confirmed intake approvers can do that. Nothing was changed.")

    # -- filing ----------------------------------------------------------------------------
    async def on_command(self, ack: Any, command: dict[str, Any], request: Any) -> None:
        await ack(text=await self.command_reply(command, request))

    async def command_reply(self, command: dict[str, Any], request: Any) -> str:
        """Handle ``/intake …`` and return the (ephemeral) reply: help, status, revoke, or a
        durable capture. Shared by the bolt listener and the HTTP fast path."""
        user = command.get("user_id", "")
        text = decode_slack(str(command.get("text") or "")).strip()
        if not is_user_id(user):
            return "intake: this request has no valid Slack user"
        if text in ("", "help"):
            return HELP
        if match := _SUBCOMMAND.match(text):
            verb, ident, rest = match.groups()
            if verb == "status":
                return await self._status(user, ident)
            return await self._revoke(user, ident, (rest or "").strip() or "revoked from Slack")
        _, _, reply = await self._capture(
            user=user, delivery_id=_command_delivery(command, request), text=text, request=request,
            provenance={"via": "slash_command", "channel_id": command.get("channel_id", ""),
                        "team_id": command.get("team_id", "")},
        )
        return reply

    async def on_mention(self, event: dict[str, Any], body: dict[str, Any], client: AsyncWebClient,
                         request: Any) -> None:
        user = event.get("user", "")
        if event.get("bot_id") or not is_user_id(user):
            return  # bots (including ourselves) cannot file ideas
        text = decode_slack(_LEADING_MENTION.sub("", str(event.get("text") or ""), count=1))
        channel = event.get("channel")
        if not text.strip():
            await self._ephemeral(client, channel, user, HELP)
            return
        delivery = body.get("event_id") or f"{channel}:{event.get('ts')}"
        idea, created, reply = await self._capture(
            user=user, delivery_id=f"ev:{body.get('team_id') or ''}:{delivery}", text=text, request=request,
            provenance={"via": "app_mention", "channel_id": channel or "", "message_ts": event.get("ts") or "",
                        "team_id": body.get("team_id") or ""},
        )
        if created or idea is None:  # a retry of a delivery we already answered stays quiet
            await self._ephemeral(client, channel, user, reply)

    async def on_shortcut(self, ack: Any, shortcut: dict[str, Any], client: AsyncWebClient, request: Any) -> None:
        user = (shortcut.get("user") or {}).get("id", "")
        message = shortcut.get("message") or {}
        channel = (shortcut.get("channel") or {}).get("id", "")
        if not is_user_id(user):
            await ack()
            return
        # The requester is whoever wrote the words (the message's author); the presser is only
        # who filed it. A bot's message has no person behind it: then the presser is the requester.
        author = message.get("user") or ""
        idea, created, reply = await self._capture(
            user=user, delivery_id=f"sc:{channel}:{message.get('ts')}:{user}", text=decode_slack(str(message.get("text") or "")),
            request=request, author=author if is_user_id(author) else None,
            provenance={"via": "message_shortcut", "channel_id": channel, "message_ts": message.get("ts") or "",
                        "message_author": message.get("user") or message.get("bot_id") or "unknown",
                        "team_id": (shortcut.get("team") or {}).get("id", "")},
        )
        await ack()
        await self._ephemeral(client, channel, user, reply)

    async def _status(self, user: str, ident: str) -> str:
        store = self.broker.store
        try:
            if ident.startswith("T-"):
                task = await asyncio.to_thread(store.get_task, ident)
                requester, state = task.requester, task.state.value
                extra = (f" · {task.spec.repo} {task.spec.change_type} · {len(task.approvals)} of "
                         f"{task.required} approvals" + (f" · {escape(task.reason)}" if task.reason else ""))
            else:
                idea = await asyncio.to_thread(store.get_idea, ident)
                requester, state = idea.requester, idea.state.value
                extra = f" · task `{idea.task_id}`" if idea.task_id else ""
        except IntakeError:
            return f"No idea or task `{ident}`."
        if requester != f"slack:{user}" and await self._approver(user) is None:
            return "Only the requester or an approver can see that."
        return f"`{ident}` is *{state}*{extra}"

    async def _revoke(self, user: str, ident: str, reason: str) -> str:
        if not is_id(ident, "T"):
            return "Only tasks (`T-…`) can be revoked; deny an idea from its card."
        is_approver = await self._approver(user) is not None
        try:
            await asyncio.to_thread(
                self.broker.gatekeeper.revoke, ident, identity=f"slack:{user}", is_approver=is_approver, reason=reason
            )
        except IntakeError as exc:
            return f"Not revoked: {escape(str(exc))}"
        return f"`{ident}` revoked."

    # -- buttons ---------------------------------------------------------------------------
    async def _pressed(self, ack: Any, body: dict[str, Any], client: AsyncWebClient, subject: str,
                       load: Callable[[str], Any] | None, verb: str) -> tuple[str, Any] | None:
        """Ack a button, then check the presser is a confirmed approver and load ``subject``.
        Returns (user, loaded) or None after telling the presser why not (nothing changes)."""
        await ack()
        user = body["user"]["id"]
        if await self._approver(user) is None:
            await self._refuse_button(client, body, user, subject)
            return None
        if load is None:
            return user, None
        try:
            return user, await asyncio.to_thread(load, subject)
        except IntakeError as exc:
            channel = (body.get("channel") or {}).get("id")
            await self._ephemeral(client, channel, user, f"Cannot {verb}: {escape(str(exc))}")
            return None

    async def on_link_button(self, ack: Any) -> None:
        """A link button (Approve with passkey): Slack opens the URL; the click only needs an ack."""
        await ack()

    async def on_promote_button(self, ack: Any, body: dict[str, Any], action: dict[str, Any],
                                client: AsyncWebClient) -> None:
        idea_id = str(action.get("value", ""))
        pressed = await self._pressed(ack, body, client, idea_id, self.broker.store.get_idea, "promote")
        if pressed is None:
            return
        policy = self.broker.policy
        view = render.promote_modal(
            idea_id=idea_id, repos=[r.name for r in policy.repos], change_types=sorted(policy.change_types),
            private_metadata=self._reference(body, "promote", subject=idea_id), text=pressed[1].text,
        )
        await client.views_open(trigger_id=body["trigger_id"], view=view)

    async def on_approve_button(self, ack: Any, body: dict[str, Any], action: dict[str, Any],
                                client: AsyncWebClient) -> None:
        task_id, _, spec_hash = str(action.get("value", "")).partition("|")
        pressed = await self._pressed(ack, body, client, task_id, self.broker.store.get_task, "approve")
        if pressed is None:
            return
        task = pressed[1]
        summary = f"{task.spec.repo} · {task.spec.change_type} · {task.required} approvals needed\n\n{task.spec.prompt}"
        view = render.approve_modal(
            task_id=task_id, summary=summary, spec_hash=spec_hash,
            private_metadata=self._reference(body, "approve", subject=task_id, spec_hash=spec_hash),
        )
        await client.views_open(trigger_id=body["trigger_id"], view=view)

    async def on_accept_button(self, ack: Any, body: dict[str, Any], action: dict[str, Any],
                               client: AsyncWebClient) -> None:
        """The result card's "Accept result": the modal shows the result's facts for the commit
        the card named; the submission goes through :meth:`Gatekeeper.accept` with that sha."""
        task_id, _, sha = str(action.get("value", "")).partition("|")
        pressed = await self._pressed(ack, body, client, task_id, self.broker.store.get_task, "accept")
        if pressed is None:
            return
        result = pressed[1].result or {}
        summary = (f"{pressed[1].spec.repo} · {pressed[1].spec.change_type} · "
                   f"{result.get('files_changed', 0)} files, +{result.get('additions', 0)} / "
                   f"-{result.get('deletions', 0)}\n" + "\n".join(str(f) for f in result.get("files") or []))
        view = render.accept_modal(task_id=task_id, sha=sha, summary=summary,
                                   private_metadata=self._reference(body, "accept", subject=task_id, sha=sha))
        await client.views_open(trigger_id=body["trigger_id"], view=view)

    async def on_deny_button(self, ack: Any, body: dict[str, Any], action: dict[str, Any],
                             client: AsyncWebClient) -> None:
        subject = str(action.get("value", ""))
        if await self._pressed(ack, body, client, subject, None, "deny") is None:
            return
        view = render.deny_modal(subject_id=subject, private_metadata=self._reference(body, "deny", subject=subject))
        await client.views_open(trigger_id=body["trigger_id"], view=view)

    # -- modal submissions -----------------------------------------------------------------
    @staticmethod
    def _values(view: dict[str, Any]) -> dict[str, Any]:
        """Each input's value (select: the chosen option's value) by block id."""
        out: dict[str, Any] = {}
        for block_id, actions in ((view.get("state") or {}).get("values") or {}).items():
            for element in actions.values():
                selected = element.get("selected_option")
                out[block_id] = selected.get("value") if selected else element.get("value")
        return out

    def _reference(self, body: dict[str, Any], kind: str, **ref: str) -> str:
        """The MAC'd reference a modal opened from this button press carries (see
        :mod:`intake.channels.slack.modals`): bound to the presser and the card."""
        container = body.get("container") or {}
        card = f"{container.get('channel_id') or (body.get('channel') or {}).get('id') or ''}/" \
               f"{container.get('message_ts') or ''}"
        return seal_reference(self.broker.store.audit, kind=kind, opener=body["user"]["id"], card=card[:64],
                              now=self.broker.store.clock(), **ref)

    async def _submit(self, ack: Any, body: dict[str, Any], view: dict[str, Any], kind: str, field: str,
                      call: Callable[[Approver, dict[str, str], dict[str, Any]], Any],
                      fields: dict[str, str] | None = None) -> None:
        """Run one gatekept call for the submitting user on the modal's verified reference.
        A reference the broker did not write for this user, and a submitter who is not (or no
        longer) a confirmed approver, are refused on the modal and audited; the gatekeeper's
        refusals go back onto the modal, under ``field`` or the input block ``fields`` names."""
        user = body["user"]["id"]
        audit = self.broker.store.audit
        try:
            ref = open_reference(audit, view.get("private_metadata"), kind=kind, submitter=user,
                                 now=self.broker.store.clock())
        except ModalRefused as exc:
            await asyncio.to_thread(audit.record, f"slack:{user}", "approval.refused", "slack:modal",
                                    reason=exc.reason, via="slack", act=kind)
            await ack(response_action="errors", errors={field: str(exc)[:150]})
            return
        approver = await self._approver(user)
        if approver is None:
            await asyncio.to_thread(audit.record, f"slack:{user}", "approval.refused", ref["subject"],
                                    reason="not_approver", via="slack", act=kind)
            await ack(response_action="errors",
                      errors={field: "Only registered, confirmed intake approvers can do that. Nothing was changed."})
            return
        try:
            await asyncio.to_thread(call, approver, ref, self._values(view))
        except Refused as exc:
            await ack(response_action="errors", errors={(fields or {}).get(exc.reason, field): str(exc)[:150]})
            return
        except IntakeError as exc:
            await ack(response_action="errors", errors={field: str(exc)[:150]})
            return
        await ack()

    async def on_promote_submit(self, ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        await self._submit(ack, body, view, "promote", "code", lambda approver, ref, values: self.broker.gatekeeper.promote(
            ref["subject"], repo=values.get("repo") or "", change_type=values.get("change_type") or "",
            approver_id=approver.id, code=(values.get("code") or "").strip(), via="slack",
            note=values.get("note") or "",
        ), _FIELD)

    async def on_approve_submit(self, ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        await self._submit(ack, body, view, "approve", "code", lambda approver, ref, values: self.broker.gatekeeper.approve(
            ref["subject"], approver_id=approver.id, code=(values.get("code") or "").strip(),
            spec_hash=ref.get("spec_hash", ""), via="slack",
        ))

    async def on_accept_submit(self, ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        await self._submit(ack, body, view, "accept", "code", lambda approver, ref, values: self.broker.gatekeeper.accept(
            ref["subject"], approver_id=approver.id, code=(values.get("code") or "").strip(),
            sha=ref.get("sha", ""), via="slack",
        ))

    async def on_deny_submit(self, ack: Any, body: dict[str, Any], view: dict[str, Any]) -> None:
        await self._submit(ack, body, view, "deny", "reason", lambda approver, ref, values: self.broker.gatekeeper.deny(
            ref["subject"], approver_id=approver.id, reason=values.get("reason") or "",
        ))
