"""The broker's JSON API under ``/api/v1``: the only way to use power.

Every handler first establishes the caller (:func:`intake.api.callers.identify`), then parses a
small pydantic body (unknown fields refused), then calls the same broker code as every channel.
Rules, beyond what the gatekeeper checks:

- Actions that grant power (promote, approve, amend, thaw, approver enrolment, confirm, reset,
  unlock, people and token management) need a fresh step-up code in the request: the acting
  approver's for approvals, the admin's own for admin actions.
- Actions that only take power away (deny, revoke, freeze, removing an approver, unlinking an
  identity, revoking a token) need an authenticated caller with the role, no code.
- Nobody acts as someone else. ``on_behalf_of`` is refused on every action that grants power
  (promote, approve, accept, amend, confirm): a relay would let one person hold and use another
  person's factor. An admin may still relay a *deny* (it only takes power away), audited.
- A token an admin made for someone else (scope ``ideas``) reads and files ideas and nothing
  more (:data:`IDEAS_SCOPE`); power needs the local socket or a token the person made themselves.
- Enrolment is the person's own act: an admin invites (``POST /approvers``, no secret in the
  answer), the person enrols (``POST /approvers/{id}/enrol``, only as themselves) and confirms.
- Errors are ``{"error": reason, "message": …}`` with a 4xx; bodies and codes are never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from intake.api import identity as broker_identity
from intake.api.callers import ApiTokens, Caller, Unauthenticated, identify
from intake.channels.cli import cli_draft
from intake.core.errors import AuditBroken, IllegalTransition, IntakeError, InvalidInput, NotFound, Refused
from intake.core.ids import KIND_NAMES, parse_id_prefix
from intake.core.models import APPROVER_ID_RE, Idea, Task
from intake.operations.indicators.figures import broker_figures
from intake.people.registry import People, parse_identity, parse_person_id
from intake.runtime import Broker
from intake.storage.outage import OUTAGE_ERRORS
from intake.tasks.review import load_review, privileged_files

PREFIX = "/api/v1"
#: Names of credentials intake does not issue (``slack-bot``, ``slack-signing``, ``forge-token``).
EXTERNAL_CREDENTIAL = r"[a-z][a-z0-9-]{1,39}"
log = logging.getLogger("intake.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=20000)


class IdeaBody(_Body):
    text: str
    title: str = Field("", max_length=200)
    delivery_id: str | None = Field(None, min_length=1, max_length=256)
    requester: str | None = Field(None, max_length=60)


class PromoteBody(_Body):
    repo: str = Field(max_length=200)
    change_type: str = Field(max_length=60)
    code: str = Field(max_length=20)
    note: str = Field("", max_length=2000)
    on_behalf_of: str | None = None


class ApproveBody(_Body):
    code: str = Field(max_length=20)
    spec_hash: str | None = Field(None, max_length=64)
    note: str = Field("", max_length=2000)
    on_behalf_of: str | None = None


class AcceptBody(_Body):
    code: str = Field(max_length=20)
    sha: str = Field(pattern=r"^[0-9a-f]{40}([0-9a-f]{24})?$")
    diff_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # the reviewed diff (GET .../review)
    note: str = Field("", max_length=2000)
    on_behalf_of: str | None = None


class AmendBody(_Body):
    code: str = Field(max_length=20)
    repo: str | None = Field(None, max_length=200)
    change_type: str | None = Field(None, max_length=60)
    on_behalf_of: str | None = None


class ReasonBody(_Body):
    reason: str = Field(max_length=2000)
    on_behalf_of: str | None = None


class CodeBody(_Body):
    code: str = Field(max_length=20)
    on_behalf_of: str | None = None  # refused: see _refuse_relay


class EmptyBody(_Body):
    pass


class ApproverBody(_Body):
    id: str = Field(pattern=APPROVER_ID_RE)
    name: str = Field(min_length=1, max_length=100)
    groups: list[str] = Field(max_length=20)
    slack_user: str | None = None
    email: str | None = Field(None, max_length=254)
    code: str | None = Field(None, max_length=20)


class PersonBody(_Body):
    id: str
    name: str = Field(min_length=1, max_length=100)
    identities: list[str] = Field(default_factory=list, max_length=50)
    code: str = Field(max_length=20)


class CodeOnlyBody(_Body):
    code: str = Field(max_length=20)


class LinkBody(_Body):
    identity: str = Field(max_length=300)
    code: str = Field(max_length=20)


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": reason, "message": message}, status=status)


def idea_json(idea: Idea) -> dict[str, Any]:
    return idea.model_dump(mode="json", exclude={"mac"})


def task_json(task: Task) -> dict[str, Any]:
    """A task for display."""
    data = task.model_dump(mode="json")  # tokens never sit on a task record
    data["approvals_count"] = len(task.approvals)
    return data


class Api:
    """The handlers, bound to the app's broker (looked up per request, as it opens at start)."""

    def __init__(self, broker: Callable[[web.Request], Broker]) -> None:
        self._broker = broker

    # -- plumbing --------------------------------------------------------------------------
    def route(self, work: Callable[[Broker, Caller, web.Request, dict[str, Any]], Any],
              body: bool = False, linked: bool = False) -> Handler:
        """Wrap ``work(broker, caller, request, body)``: authenticate first (one
        ``Authorization`` header at most: two are a 400, never a guess at which one counts),
        refuse a caller who is nobody when ``linked`` (reads: an OS user on the socket that no
        person is linked to reads nothing), parse the JSON body (``application/json`` in UTF-8
        only: a form post or a UTF-16 body is refused, not sniffed), run the (blocking) broker
        code in a thread, and translate errors into 4xx JSON."""

        async def handler(request: web.Request) -> web.StreamResponse:
            if len(request.headers.getall("Authorization", [])) > 1:
                return _error(400, "bad_request", "send at most one Authorization header")
            broker = self._broker(request)
            people, tokens = People(broker.store), ApiTokens(broker.store, People(broker.store))
            try:
                caller = await asyncio.to_thread(identify, request, people, tokens)
            except Unauthenticated as exc:
                return _error(401, "unauthenticated", str(exc))
            if caller.scope != "power" and work.__name__ not in IDEAS_SCOPE:
                return _error(403, "token_scope", "this token was made by an admin and only files ideas; "
                                                  "make your own token (intake token create YOU) for this")
            if linked and caller.person is None:
                return _error(403, "not_linked", f"{caller.identity} is not linked to a person in intake, so it "
                                                 "reads nothing; an admin can link it (intake person link ID IDENTITY)")
            data: dict[str, Any] = {}
            if body:
                if request.content_type != "application/json" or (request.charset or "utf-8").lower() != "utf-8":
                    return _error(415, "unsupported_media_type",
                                  "send the body as Content-Type: application/json in UTF-8")
                try:
                    data = json.loads((await request.read()).decode("utf-8") or "null")
                except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the decoder's depth
                    return _error(400, "bad_json", "the request body is not JSON")
                if not isinstance(data, dict):
                    return _error(400, "bad_json", "the request body must be a JSON object")
            try:
                result = await asyncio.to_thread(work, broker, caller, request, data)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "body"
                return _error(400, "invalid_input", f"{where}: {first['msg']}")
            except InvalidInput as exc:
                return _error(400, "invalid_input", str(exc))
            except NotFound as exc:
                return _error(404, "not_found", str(exc))
            except Refused as exc:
                return _error(429 if exc.reason == "throttled" else 403, exc.reason, str(exc))
            except IllegalTransition as exc:
                return _error(409, "illegal_transition", str(exc))
            except AuditBroken as exc:
                return web.json_response({"ok": False, "event": exc.event_id, "error": "audit_broken",
                                          "message": str(exc)}, status=409)
            except IntakeError as exc:
                return _error(409, "conflict", str(exc))
            except OUTAGE_ERRORS:
                raise  # Redis is down or stalled: the app's outage middleware answers 503
            except Exception as exc:  # a bug, not bad input: say so without the body or a trace
                log.error("api %s %s failed: %s", request.method, request.path, type(exc).__name__)
                return _error(500, "internal", "internal error; the broker's log names it")
            if isinstance(result, web.StreamResponse):
                return result
            return web.json_response(result, dumps=lambda d: json.dumps(d, ensure_ascii=True, sort_keys=True))

        return handler

    @staticmethod
    def _person(caller: Caller) -> str:
        if caller.person is None:
            raise Refused("not_linked", f"{caller.identity} is not linked to a person in intake; "
                                        "an admin can link it (intake person link ID IDENTITY)")
        return caller.person

    @staticmethod
    def _refuse_relay(broker: Broker, caller: Caller, on_behalf_of: str | None, action: str, subject: str) -> None:
        """Refuse ``on_behalf_of`` naming anyone but the caller on an action that grants power:
        an approval counts as a distinct person only when that person made it (audited)."""
        if on_behalf_of is None or on_behalf_of == caller.person:
            return
        broker.store.audit.record(caller.actor, "approval.refused", subject, reason="relay_refused", act=action)
        raise Refused("relay_refused", "nobody approves for someone else: each person acts with their own "
                                       "factor through their own channel (on_behalf_of is only for deny)")

    def _acting(self, broker: Broker, caller: Caller, on_behalf_of: str | None, action: str, subject: str) -> str:
        """The person an action is for: the caller, or (for an admin) ``on_behalf_of``, audited."""
        me = self._person(caller)
        if on_behalf_of is None or on_behalf_of == me:
            return me
        target = parse_person_id(on_behalf_of)
        if not broker.policy.is_admin(me):
            raise Refused("forbidden", "only an admin may act on behalf of someone else")
        if self._own_subject(broker, me, subject):
            # A relay is the admin's act too: never for work the admin asked for or filed.
            broker.store.audit.record(caller.actor, "approval.refused", subject, reason="self_approval",
                                      relayed_for=target, act=action)
            raise Refused("self_approval", "you cannot relay an approval of your own request")
        broker.store.audit.record(caller.actor, "api.on_behalf_of", subject, person=target, act=action)
        return target

    @staticmethod
    def _own_subject(broker: Broker, person: str, subject: str) -> bool:
        """Whether ``subject`` (an idea, or a task's idea) is ``person``'s own words or filing."""
        try:
            idea_id = broker.store.get_task(subject).idea_id if subject.startswith("T-") else subject
            idea = broker.store.get_idea(idea_id)
        except (NotFound, InvalidInput):
            return False
        return broker.gatekeeper.own_work(person, idea)

    def _admin(self, broker: Broker, caller: Caller) -> str:
        me = self._person(caller)
        if not broker.policy.is_admin(me):
            raise Refused("forbidden", "only an admin (the policy's [admins]) may do that")
        return me

    def _admin_stepup(self, broker: Broker, caller: Caller, code: str | None, purpose: str, subject: str) -> str:
        """An admin with their own fresh code (admin actions that grant power)."""
        me = self._admin(broker, caller)
        if not code:
            raise InvalidInput("code: this action needs your fresh authenticator code")
        approver = broker.approvers.active(me)
        broker.approvers.check_code(approver, code, purpose=purpose, subject=subject)
        return me

    # -- reads -----------------------------------------------------------------------------
    def me(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        person = People(broker.store).find(caller.person) if caller.person else None
        approver = None
        if caller.person:
            try:
                approver = broker.approvers.get(caller.person)
            except Refused:
                approver = None
        return {"identity": caller.identity, "via": caller.via, "person": caller.person,
                "identities": list(person.identities) if person else [],
                "admin": broker.policy.is_admin(caller.person),
                "approver": bool(approver), "confirmed": bool(approver and approver.confirmed)}

    @staticmethod
    def _limit(request: web.Request) -> int:
        raw = request.query.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= 10000:
            raise InvalidInput("limit: a whole number from 1 to 10000")
        return int(raw)

    def ideas(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        limit, store = self._limit(request), broker.store
        items = store.recent_ideas(limit) if request.query.get("all") == "1" else store.pending_ideas()[:limit]
        return [idea_json(i) for i in items]

    def idea(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        return idea_json(broker.store.get_idea(request.match_info["id"]))

    def tasks(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        limit, store = self._limit(request), broker.store
        items = store.recent_tasks(limit) if request.query.get("all") == "1" else store.open_tasks()[:limit]
        return [task_json(t) for t in items]

    def task(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        return task_json(broker.store.get_task(request.match_info["id"]))

    def review(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        """The diff a task's result is reviewed by (issue 20), as the sealed history names it."""
        task = broker.store.get_task(request.match_info["id"])
        fact = broker.ledger.follow().task(task.id)
        found = load_review(broker.store, task.id, fact.result_diff if fact else None, (task.result or {}).get("review"))
        if found is None:
            raise NotFound(f"task {task.id} has no reviewed result")
        if found.diff is None:
            raise Refused("review_unavailable", f"task {task.id}'s stored diff is missing or does not match its "
                                                "sealed digest")
        return {"task": task.id, "commit": fact.result_commit if fact else None, "sha256": found.sha256,
                "diff": found.diff, "truncated": found.truncated, "bytes": found.size, "stat": found.stat,
                "binary": list(found.binary), "privileged": privileged_files(found, broker.policy, task.spec.repo)}

    def resolve_id(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        """The one idea or task id a typed prefix names (any case; an ``I-`` prefix searches
        ideas only, ``T-`` tasks only). 404 when none, 409 ``ambiguous`` with the count."""
        prefix = parse_id_prefix(request.match_info["prefix"])
        ids, count = broker.store.ids_with_prefix(prefix)
        kind = KIND_NAMES[prefix[0]]
        if count == 0:
            raise NotFound(f"no {kind} id starts with {prefix}")
        if count > 1:
            return web.json_response({"error": "ambiguous", "candidates": count,
                                      "message": f"{prefix} is ambiguous: {count} {kind}s start with it "
                                                 "(type more of the id)"}, status=409)
        return {"id": ids[0]}

    def audit_verify(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        """Every anomaly in the chain (not only the first); 409 when sealed history was changed."""
        try:
            broker.audit.seal_pending()  # what was appended before this call is verified sealed
            report = broker.audit.verify(broker.keyring.keys)
            broken: AuditBroken | None = None
        except AuditBroken as exc:
            report, broken = exc.report, exc  # type: ignore[assignment]
        body: dict[str, Any] = {
            "ok": broken is None, "events": report.events if report else None,
            "unsealed": report.unsealed if report else None,
            "anomalies": [a.as_json() for a in report.anomalies] if report else [],
            "ledger": broker.ledger.follow().halted,
        }
        if broken is not None:
            body.update(error="audit_broken", event=broken.event_id, message=str(broken))
            return web.json_response(body, status=409)
        return body

    def audit_export(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        broker.audit.seal_pending()  # what was appended before this call is exported sealed
        lines = "".join(json.dumps(r, ensure_ascii=True, sort_keys=True) + "\n" for r in broker.audit.export())
        return web.Response(text=lines, content_type="application/x-ndjson")

    def provenance(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        """A delivered commit's stored envelope and what the sealed log says of it; with
        ``?tree_size=N`` (the size of the tree head a note carries) also the consistency proof
        from that tree to the broker's current one."""
        from intake.tasks.provenance import lookup

        raw_size = request.query.get("tree_size")
        if raw_size is not None and not re.fullmatch(r"[1-9][0-9]{0,12}", raw_size):
            raise InvalidInput("tree_size must be a positive integer")
        return lookup(broker, request.query.get("ref", ""), int(raw_size) if raw_size is not None else None)

    def report(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        """The leading-indicator figures over ``?since=`` (default 7d), per ``?by=`` period (day,
        week) when asked, from sealed history only."""
        return broker_figures(broker, request.query.get("since", "7d"), request.query.get("by")).model_dump(mode="json")

    # -- filing ----------------------------------------------------------------------------
    def file_idea(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        """An idea from the CLI channel: filed by the verified caller; ``requester`` names
        someone else as the author (``intake idea --as NAME``), and the filer is still recorded."""
        body = IdeaBody.model_validate(data)
        draft = cli_draft(filer=caller.identity, via=caller.via, text=body.text, title=body.title,
                          author=body.requester, delivery_id=body.delivery_id)
        captured, created = broker.store.capture(draft, ttl_s=broker.policy.clocks.idea_ttl)
        return {**idea_json(captured), "created": created}

    # -- power -----------------------------------------------------------------------------
    def promote(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        body = PromoteBody.model_validate(data)
        subject = request.match_info["id"]
        self._refuse_relay(broker, caller, body.on_behalf_of, "promote", subject)
        who = self._person(caller)
        return broker.gatekeeper.promote(subject, repo=body.repo, change_type=body.change_type, approver_id=who,
                                         code=body.code, note=body.note, via="api").as_json()

    def approve(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        body = ApproveBody.model_validate(data)
        subject = request.match_info["id"]
        self._refuse_relay(broker, caller, body.on_behalf_of, "approve", subject)
        who = self._person(caller)
        return broker.gatekeeper.approve(subject, approver_id=who, code=body.code, spec_hash=body.spec_hash,
                                         note=body.note, via="api").as_json()

    def accept(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        """Approve a task's quarantined result (its commit sha), with a fresh code."""
        body = AcceptBody.model_validate(data)
        subject = request.match_info["id"]
        self._refuse_relay(broker, caller, body.on_behalf_of, "accept", subject)
        who = self._person(caller)
        task = broker.gatekeeper.accept(subject, approver_id=who, code=body.code, sha=body.sha, note=body.note,
                                        via="api", diff_sha256=body.diff_sha256).task
        return {"task": task.id, "status": task.state.value, "sha": body.sha,
                "result_approvals": [a.approver for a in task.result_approvals]}

    def deny(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        body = ReasonBody.model_validate(data)
        subject = request.match_info["id"]
        who = self._acting(broker, caller, body.on_behalf_of, "deny", subject)
        ended = broker.gatekeeper.deny(subject, approver_id=who, reason=body.reason)
        return {"id": ended.id, "state": ended.state.value}

    def amend(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        body = AmendBody.model_validate(data)
        subject = request.match_info["id"]
        if body.repo is None and body.change_type is None:
            raise InvalidInput("amend: give repo and/or change_type")
        self._refuse_relay(broker, caller, body.on_behalf_of, "amend", subject)
        who = self._person(caller)
        approver = broker.approvers.active(who)
        broker.approvers.check_code(approver, body.code, purpose="amend", subject=subject)
        return task_json(broker.gatekeeper.amend(subject, approver_id=who, repo=body.repo,
                                                 change_type=body.change_type))

    def revoke(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        body = ReasonBody.model_validate(data)
        subject = request.match_info["id"]
        if body.on_behalf_of is not None:
            raise InvalidInput("on_behalf_of: revoke acts as the caller")
        is_approver = False
        if caller.person:
            try:
                is_approver = broker.approvers.active(caller.person) is not None
            except Refused:
                is_approver = False
        task = broker.gatekeeper.revoke(subject, identity=caller.identity, person=caller.person,
                                        is_approver=is_approver, reason=body.reason)
        return {"id": task.id, "state": task.state.value}

    def freeze(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        """The kill switch: any admin or confirmed approver, no code (stopping is always safe)."""
        body = ReasonBody.model_validate(data)
        broker.gatekeeper.freeze(by=self._person(caller), actor=caller.actor, reason=body.reason)
        return {"frozen": True}

    def thaw(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        body = CodeBody.model_validate(data)
        self._admin_stepup(broker, caller, body.code, "thaw", "broker")
        broker.gatekeeper.thaw(actor=caller.actor)
        return {"frozen": False}

    # -- approvers -------------------------------------------------------------------------
    def approvers(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        return [{"id": a.id, "name": a.name, "groups": list(broker.policy.groups_of(a.id)),
                 "slack_user": a.slack_user, "email": a.email, "confirmed": a.confirmed,
                 "locked": broker.approvers.is_locked(a.id)} for a in broker.approvers.all()]

    def approver_add(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        """Invite an approver: an admin with their own code. The answer carries no secret,
        except when the admin invites *themselves* (their own channel: the socket as their OS
        user, or their own token), which enrols them at once. Bootstrap: while no admin has a
        confirmed authenticator, an admin may invite themselves without a code."""
        body = ApproverBody.model_validate(data)
        me = self._admin(broker, caller)
        bootstrap = body.id == me and not any(
            a.confirmed and broker.policy.is_admin(a.id) for a in broker.approvers.all())
        if not bootstrap:
            self._admin_stepup(broker, caller, body.code, "approver.add", body.id)
        invited = broker.approvers.add(broker.policy, body.id, name=body.name, groups=tuple(body.groups),
                                       slack_user=body.slack_user, email=body.email, actor=caller.actor)
        if invited.id == me:
            enrolment = broker.approvers.enrol(me, actor=caller.actor)
            return {"id": me, "otpauth_uri": enrolment.otpauth_uri, "confirmed": False}
        return {"id": invited.id, "invited": True, "confirmed": False}

    def _as_self(self, caller: Caller, target: str, what: str) -> None:
        if caller.person != target:
            raise Refused("forbidden", f"only {target} themselves can {what} (from their own OS account, "
                                       "their own token, or a one-time link sent to them)")

    def approver_enrol(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        """The person enrols their own authenticator (invited or reset; not yet confirmed): a
        fresh secret, shown once, to them alone."""
        EmptyBody.model_validate(data)
        target = parse_person_id(request.match_info["id"])
        self._as_self(caller, target, "enrol their authenticator")
        enrolment = broker.approvers.enrol(target, actor=caller.actor)
        return {"id": target, "otpauth_uri": enrolment.otpauth_uri, "confirmed": False}

    def approver_confirm(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        """The enrollee proves one code (that code is the step-up); only as themselves."""
        body = CodeBody.model_validate(data)
        target = parse_person_id(request.match_info["id"])
        self._refuse_relay(broker, caller, body.on_behalf_of, "approver.confirm", target)
        self._as_self(caller, target, "confirm their authenticator")
        broker.approvers.confirm(target, body.code, actor=f"approver:{target}")
        return {"id": target, "confirmed": True}

    def approver_reset(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        """Yourself, with your own code: your factors are revoked and you enrol anew (the new
        secret is in the answer). An admin, with their own code, for someone else: a revoke
        only; that person enrols again themselves."""
        body = CodeBody.model_validate(data)
        target = parse_person_id(request.match_info["id"])
        self._refuse_relay(broker, caller, body.on_behalf_of, "approver.reset", target)
        if caller.person == target:
            approver = broker.approvers.active(target)
            broker.approvers.check_code(approver, body.code, purpose="approver.reset", subject=target)
            broker.approvers.reset(target, actor=caller.actor)
            enrolment = broker.approvers.enrol(target, actor=caller.actor)
            return {"id": target, "otpauth_uri": enrolment.otpauth_uri, "confirmed": False}
        self._admin_stepup(broker, caller, body.code, "approver.reset", target)
        broker.approvers.reset(target, actor=caller.actor)
        return {"id": target, "revoked": True, "confirmed": False}

    def approver_unlock(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        body = CodeBody.model_validate(data)
        target = parse_person_id(request.match_info["id"])
        self._admin_stepup(broker, caller, body.code, "approver.unlock", target)
        broker.approvers.unlock(target, actor=caller.actor)
        return {"id": target, "locked": False}

    def approver_remove(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        target = parse_person_id(request.match_info["id"])
        self._admin(broker, caller)
        broker.approvers.remove(target, actor=caller.actor)
        return {"id": target, "removed": True}

    # -- people and tokens -----------------------------------------------------------------
    def people(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        self._admin(broker, caller)  # who is linked to what is for admins
        return [p.model_dump(mode="json", exclude={"mac"}) for p in People(broker.store).all()]

    def person(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        found = People(broker.store).get(request.match_info["id"])
        if found.id != caller.person:
            self._admin(broker, caller)
        tokens = ApiTokens(broker.store, People(broker.store)).listing(found.id)
        return {**found.model_dump(mode="json", exclude={"mac"}), "tokens": tokens,
                "admin": broker.policy.is_admin(found.id)}

    def person_add(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        body = PersonBody.model_validate(data)
        pid = parse_person_id(body.id)
        self._admin_stepup(broker, caller, body.code, "person.add", pid)
        people = People(broker.store)
        if people.find(pid) is not None:
            raise InvalidInput(f"person {pid} already exists (use `intake person link`)")
        added = people.upsert(pid, name=body.name, identities=tuple(body.identities), actor=caller.actor)
        return added.model_dump(mode="json", exclude={"mac"})

    def person_link(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        body = LinkBody.model_validate(data)
        pid = parse_person_id(request.match_info["id"])
        identity = parse_identity(body.identity)
        self._admin_stepup(broker, caller, body.code, "person.link", pid)
        linked = People(broker.store).upsert(pid, name=None, identities=(identity,), actor=caller.actor,
                                             create=False)
        return linked.model_dump(mode="json", exclude={"mac"})

    def person_unlink(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        pid = parse_person_id(request.match_info["id"])
        self._admin(broker, caller)
        unlinked = People(broker.store).unlink(pid, request.match_info["identity"], actor=caller.actor)
        return unlinked.model_dump(mode="json", exclude={"mac"})

    def token_create(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        """Your own token, with your own code: scope ``power``. An admin's token for someone
        else, with the admin's code: scope ``ideas`` (reads and filing ideas only)."""
        body = CodeBody.model_validate(data)
        pid = parse_person_id(request.match_info["id"])
        if caller.person == pid:
            approver = broker.approvers.active(pid)
            broker.approvers.check_code(approver, body.code, purpose="api_token.create", subject=pid)
            scope = "power"
        else:
            self._admin_stepup(broker, caller, body.code, "api_token.create", pid)
            scope = "ideas"
        token_id, token = ApiTokens(broker.store, People(broker.store)).create(pid, actor=caller.actor, scope=scope)
        return {"id": token_id, "person": pid, "token": token, "scope": scope}

    def credential_rotated(self, broker: Broker, caller: Caller, request: web.Request, data: dict[str, Any]) -> Any:
        """An operator declares that a credential intake does not issue (a Slack token, a forge
        token) was rotated: admins, with their own code; a sealed ``credentials.rotated`` event
        the report dates that credential's age from."""
        body = CodeOnlyBody.model_validate(data)
        name = request.match_info["name"]
        if not re.fullmatch(EXTERNAL_CREDENTIAL, name):
            raise InvalidInput(f"{name[:60]!r} is not a credential name (a-z, 0-9 and '-', e.g. slack-bot)")
        self._admin_stepup(broker, caller, body.code, "credentials.rotated", name)
        broker.store.audit.record(caller.actor, "credentials.rotated", name)
        broker.store.audit.seal_pending()
        return {"name": name, "rotated": True}

    def token_revoke(self, broker: Broker, caller: Caller, request: web.Request, _: dict[str, Any]) -> Any:
        self._admin(broker, caller)
        person = ApiTokens(broker.store, People(broker.store)).revoke(request.match_info["token"], actor=caller.actor)
        return {"id": request.match_info["token"], "person": person, "revoked": True}


# (method, path under /api/v1, handler, takes a JSON body)
ROUTES: tuple[tuple[str, str, str, bool], ...] = (
    ("GET", "/me", "me", False),
    ("GET", "/ideas", "ideas", False),
    ("POST", "/ideas", "file_idea", True),
    ("GET", "/ideas/{id}", "idea", False),
    ("POST", "/ideas/{id}/promote", "promote", True),
    ("POST", "/ideas/{id}/deny", "deny", True),
    ("GET", "/ids/{prefix}", "resolve_id", False),
    ("GET", "/tasks", "tasks", False),
    ("GET", "/tasks/{id}", "task", False),
    ("GET", "/tasks/{id}/review", "review", False),
    ("POST", "/tasks/{id}/approve", "approve", True),
    ("POST", "/tasks/{id}/accept", "accept", True),
    ("POST", "/tasks/{id}/deny", "deny", True),
    ("POST", "/tasks/{id}/amend", "amend", True),
    ("POST", "/tasks/{id}/revoke", "revoke", True),
    ("POST", "/freeze", "freeze", True),
    ("POST", "/thaw", "thaw", True),
    ("GET", "/approvers", "approvers", False),
    ("POST", "/approvers", "approver_add", True),
    ("POST", "/approvers/{id}/enrol", "approver_enrol", True),
    ("POST", "/approvers/{id}/confirm", "approver_confirm", True),
    ("POST", "/approvers/{id}/reset", "approver_reset", True),
    ("POST", "/approvers/{id}/unlock", "approver_unlock", True),
    ("DELETE", "/approvers/{id}", "approver_remove", False),
    ("GET", "/people", "people", False),
    ("POST", "/people", "person_add", True),
    ("GET", "/people/{id}", "person", False),
    ("POST", "/people/{id}/links", "person_link", True),
    ("DELETE", "/people/{id}/links/{identity}", "person_unlink", False),
    ("POST", "/people/{id}/tokens", "token_create", True),
    ("DELETE", "/tokens/{token}", "token_revoke", False),
    ("POST", "/credentials/{name}/rotated", "credential_rotated", True),
    ("GET", "/audit/verify", "audit_verify", False),
    ("GET", "/audit/export", "audit_export", False),
    ("GET", "/provenance", "provenance", False),
    ("GET", "/report", "report", False),
)


# What a token of scope "ideas" (made by an admin for someone else) may call: reads, filing.
IDEAS_SCOPE = frozenset({"me", "ideas", "file_idea", "idea", "resolve_id", "tasks", "task", "review", "approvers",
                         "person", "audit_verify", "audit_export", "provenance", "report"})


async def _identity(request: web.Request) -> web.Response:
    """Unauthenticated: who answers here (the CLI asks before it sends a token)."""
    return web.json_response(broker_identity.SERVICE)


async def _mark_api_response(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == PREFIX or request.path.startswith(PREFIX + "/"):
        response.headers[broker_identity.HEADER] = broker_identity.VALUE


def mount_api(app: web.Application, broker: Callable[[web.Request], Broker]) -> None:
    """Add every ``/api/v1`` route to ``app``; every response under it names the service
    (:mod:`intake.api.identity`), whichever layer produced it."""
    api = Api(broker)
    app.on_response_prepare.append(_mark_api_response)
    app.router.add_get(PREFIX + broker_identity.PATH, _identity)
    for method, path, name, takes_body in ROUTES:
        # Every read but "who am I" is for a person: an unlinked OS user on the socket is nobody.
        reads = method == "GET" and name != "me"
        app.router.add_route(method, PREFIX + path, api.route(getattr(api, name), body=takes_body, linked=reads))
