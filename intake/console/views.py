"""The web console's pages and actions (aiohttp + aiohttp-jinja2, autoescaped templates).

Every action calls the same ``Gatekeeper`` and ``Approvers`` as the CLI and Slack, so the console
adds no rule of its own: it only authenticates the person (session), checks the CSRF token, and
turns a form into a call. Actions that grant power (promote, approve, accept, passkey registration,
thaw, enrolment) need their own fresh step-up; deny, revoke and freeze need only a signed-in approver.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp_jinja2
import qrcode
import qrcode.image.svg
from aiohttp import web
from markupsafe import Markup

from intake.console.enrol import EnrolLinks, send_by_dm
from intake.console.listing import Filters
from intake.console.lists import (
    AUDIT_FILTERS,
    IDEA_FILTERS,
    TASK_FILTERS,
    archive_page,
    audit_coverage,
    audit_page,
    ideas_page,
    tasks_page,
)
from intake.console.session import COOKIE, SESSION_TTL_S, Session, SessionBox, fresh
from intake.console.sso import FLOW_COOKIE, FLOW_PATH, FLOW_TTL_S, OidcClient, identity_for
from intake.core.errors import IntakeError, InvalidInput, NotFound, Refused
from intake.core.models import IDEA_PENDING, Approver, Channel, IdeaState, TaskState
from intake.core.settings import Settings
from intake.operations.indicators.figures import broker_figures
from intake.people.mfa import PERIOD
from intake.people.passkeys import PasskeyProof
from intake.people.registry import People
from intake.runtime import Broker
from intake.storage.outage import OUTAGE_ERRORS
from intake.tasks import provenance
from intake.tasks.dependency_view import summarize_dependencies
from intake.tasks.promotion import accept_bound
from intake.tasks.review import load_review, split_files
from intake.text.html import visible_segments

log = logging.getLogger("intake.console")
DASHBOARD_SINCE = "12w"  # the dashboard's default window: a quarter, week by week

STATIC_DIR = Path(__file__).resolve().parent / "static"
CSP = ("default-src 'self'; script-src 'self'; object-src 'none'; frame-ancestors 'none'; "
       "base-uri 'none'; form-action 'self'")
PUBLIC = ("/console/signin", "/console/enrol/", "/console/static/", "/console/sso/")
SESSION = web.RequestKey("session", Session)
STOPPING = web.AppKey("console_stopping", asyncio.Event)  # set at shutdown: open event streams end
STREAM_S = 60  # one event stream's life; the browser reconnects (bounded work per connection)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_STATUS = {Refused: 403, NotFound: 404, InvalidInput: 400}


def _sse_line(fields: dict[str, str]) -> str:
    """One audit entry as an SSE ``change`` event: its action and subject only."""
    try:
        entry = json.loads(fields.get("e", "{}"))
    except ValueError:
        entry = {}
    data = json.dumps({"action": str(entry.get("action", "")), "subject": str(entry.get("subject", ""))})
    return f"event: change\ndata: {data}\n\n"


def redirect(location: str) -> web.Response:
    """303 See Other: after a POST the browser GETs the result page."""
    return web.Response(status=303, headers={"Location": location})


def _status(exc: IntakeError) -> int:
    return next((code for kind, code in _STATUS.items() if isinstance(exc, kind)), 400)


class Console:
    """Handlers and middlewares of the ``/console`` sub-application."""

    def __init__(self, settings: Settings, broker_key: web.AppKey[Broker], box: SessionBox,
                 sso: OidcClient | None = None, *, dev: bool = False) -> None:
        self.settings = settings
        self.broker_key = broker_key
        self.box = box
        self.sso = sso
        self.dev = dev
        self.secure = settings.console_origin.startswith("https://")

    def broker(self, request: web.Request) -> Broker:
        return request.config_dict[self.broker_key]

    # -- middlewares -----------------------------------------------------------------------
    @web.middleware
    async def headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Security headers on every console response, errors included."""
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on form posts.
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Cache-Control"] = "no-store"
        if isinstance(response, web.HTTPException) and response.status >= 300:
            raise response
        return response

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """An unknown or malformed id, an unknown path, a refusal a handler did not turn into a
        page: an error page (404, 400, 403, ...) under the same headers as every page, never a
        500 with a traceback. A bug is still a 500, logged by type only, with the same page."""
        try:
            return await handler(request)
        except IntakeError as exc:
            return self._error_page(request, _status(exc), str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return self._error_page(request, exc.status, exc.text if exc.status != 404 else "no such page")
        except OUTAGE_ERRORS:
            raise  # the app's outage middleware answers 503
        except Exception as exc:
            log.error("console %s %s failed: %s", request.method, request.path, type(exc).__name__)
            return self._error_page(request, 500, "internal error; the broker's log names it")

    def _error_page(self, request: web.Request, status: int, message: str) -> web.Response:
        reason = web.Response(status=status).reason
        try:
            return self.render(request, "error.html", status=status, code=status, reason=reason, message=message[:500],
                               notice=None)
        except Exception as exc:  # no session or no broker: a plain page, still under the headers
            log.error("console error page failed: %s", type(exc).__name__)
            return web.Response(status=status, text=f"{status} {reason}")

    def origins(self, request: web.Request) -> tuple[str, ...]:
        """The origins a POST may come from: the configured console origin; in dev mode also
        the loopback origin the browser actually used (``http://127.0.0.1:PORT``, or
        ``http://localhost:PORT``, as the banner prints it), so the console works at either.
        A Host that is no loopback name (a DNS-rebinding page) never counts."""
        allowed = (self.settings.console_origin,)
        host = request.host.lower()
        name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if self.dev and name in ("127.0.0.1", "localhost", "[::1]") and port.isdigit():
            allowed += (f"http://{name}:{port}",)
        return allowed

    @web.middleware
    async def sessions(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Open the session (or start an anonymous one), refuse a POST without its CSRF token
        or from another origin before any handler runs, and require sign-in off the public pages."""
        broker = self.broker(request)
        now = broker.store.clock()
        session = self.box.open(request.cookies.get(COOKIE), now)
        if session is not None and session.who is not None and not await asyncio.to_thread(
            self._live, broker, session
        ):
            session = None
        if session is None:
            session = fresh(now)
        request[SESSION] = session
        if request.method == "POST":
            origin = request.headers.get("Origin")
            token = request.headers.get("X-CSRF-Token")
            if token is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
                try:
                    token = str((await request.post()).get("csrf", ""))
                except (ValueError, AssertionError, UnicodeError, web.HTTPException):
                    token = None  # a body that is not the form it claims to be carries no token
            if (origin is not None and origin not in self.origins(request)) or not session.csrf_ok(token):
                # No Set-Cookie on a refusal: a cross-site POST carries no (SameSite=Strict)
                # cookie, and answering it with a fresh session would sign the victim out.
                return web.Response(status=403, text="refused: missing or wrong CSRF token")
        if session.who is None and not request.path.startswith(PUBLIC):
            if request.method == "GET":
                return self._with_cookie(request, redirect("/console/signin"))
            return web.Response(status=403, text="sign in first")
        return self._with_cookie(request, await handler(request))

    def _live(self, broker: Broker, session: Session) -> bool:
        return broker.client.get(broker.store.keys.console_session(session.sid)) == session.who and bool(
            broker.client.exists(broker.store.keys.approver(session.who or ""))
        )

    def _with_cookie(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        session: Session = request[SESSION]
        response.set_cookie(COOKIE, self.box.seal(session), max_age=SESSION_TTL_S, path="/console",
                            httponly=True, samesite="Strict", secure=self.secure)
        return response

    # -- helpers ---------------------------------------------------------------------------
    def render(self, request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
        session: Session = request[SESSION]
        broker = self.broker(request)
        ctx.setdefault("error", None)
        ctx.setdefault("notice", request.query.get("done"))
        ctx.setdefault("next_code_in", self._next_code_in(broker, session.who))
        return aiohttp_jinja2.render_template(
            template, request, {"csrf": session.csrf, "who": session.who, "frozen": broker.gatekeeper.frozen(),
                                "is_admin": self._is_admin(broker, session.who), "sso": self.sso is not None,
                                **ctx}, status=status,
        )

    @staticmethod
    def _next_code_in(broker: Broker, who: str | None) -> int:
        """Seconds until ``who``'s authenticator shows a code they have not used yet (0: now).
        A code works once: right after a TOTP sign-in (or any action) the code on the screen is
        spent, so the page says when the next one is due and console.js holds the code forms
        until then, instead of letting the approver meet "already used"."""
        if who is None:
            return 0
        last = broker.client.get(broker.store.keys.totp_last_step(who))
        if last is None or not str(last).lstrip("-").isdigit():
            return 0
        due = (int(last) + 1) * PERIOD - broker.store.clock()
        return max(0, math.ceil(due))

    @staticmethod
    def _is_admin(broker: Broker, who: str | None) -> bool:
        return who is not None and who in broker.policy.admins.members

    @staticmethod
    def proof(form: Any) -> str | PasskeyProof:
        """The step-up in a form: a passkey assertion when one was made, else the TOTP code."""
        credential = str(form.get("credential", ""))
        if credential:
            try:
                parsed = json.loads(credential)
            except (ValueError, RecursionError):  # RecursionError: nested past the decoder's depth
                raise InvalidInput("the passkey response is not JSON") from None
            if not isinstance(parsed, dict):
                raise InvalidInput("the passkey response is not a credential")
            return PasskeyProof(challenge_id=str(form.get("challenge_id", "")), credential=parsed)
        return str(form.get("code", "")).strip()

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    def me(self, request: web.Request) -> Approver:
        return self.broker(request).approvers.get(request[SESSION].who)

    # -- sign-in ---------------------------------------------------------------------------
    async def signin_page(self, request: web.Request) -> web.Response:
        return self.render(request, "signin.html")

    async def signin(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        approver_id = str(form.get("approver", "")).strip()
        broker = self.broker(request)
        try:
            # One answer for every failure, known id or not (Approvers.signin); failures are
            # throttled per source address, never on the approver.
            approver = await self.call(broker.approvers.signin, approver_id, self.proof(form),
                                       source=request.remote or "unknown")
        except IntakeError as exc:
            return self.render(request, "signin.html", status=403, error=str(exc))
        session = request[SESSION].signed_in(approver.id, broker.store.clock())
        await self.call(broker.client.set, broker.store.keys.console_session(session.sid), approver.id,
                        ex=SESSION_TTL_S)
        await self.call(broker.audit.record, f"approver:{approver.id}", "console.signed_in", approver.id)
        request[SESSION] = session
        return redirect("/console/ideas")

    async def sso_start(self, request: web.Request) -> web.StreamResponse:
        """Send the browser to the identity provider (a GET link: a form POST redirecting to
        another origin would break the CSP's form-action 'self'), with a sealed flow cookie."""
        if self.sso is None:
            raise web.HTTPNotFound()
        flow = self.sso.new_flow()
        try:
            async with aiohttp.ClientSession() as http:
                url = await self.sso.authorization_url(http, flow)
        except IntakeError as exc:
            return self.render(request, "signin.html", status=502, error=str(exc))
        response = redirect(url)
        # Lax, not Strict: the provider's redirect back is a cross-site navigation.
        response.set_cookie(FLOW_COOKIE, self.sso.seal(flow), max_age=FLOW_TTL_S, path=FLOW_PATH,
                            httponly=True, samesite="Lax", secure=self.secure)
        return response

    async def sso_callback(self, request: web.Request) -> web.StreamResponse:
        """The provider's redirect back: state, PKCE exchange, ID token checks (intake/console/sso.py),
        then the person linked to ``oidc:<issuer>#<sub>`` is signed in if they are an active approver."""
        if self.sso is None:
            raise web.HTTPNotFound()
        broker = self.broker(request)
        query = request.query
        try:
            if "error" in query:
                raise Refused("sso_denied", "the identity provider did not sign you in")
            flow = self.sso.open(request.cookies.get(FLOW_COOKIE), query.get("state", ""))
            async with aiohttp.ClientSession() as http:
                sub = await self.sso.subject(http, flow, query.get("code", ""))
            identity = identity_for(self.sso.issuer, sub)
            person = await self.call(People(broker.store).resolve, identity)
            if person is None:
                raise Refused("sso_unlinked", f"{identity} is linked to nobody: ask an admin to "
                                              "`intake person link YOU` it")
            approver = await self.call(broker.approvers.active, person)
        except IntakeError as exc:
            failed = self.render(request, "signin.html", status=403, error=str(exc))
            failed.del_cookie(FLOW_COOKIE, path=FLOW_PATH)
            return failed
        session = request[SESSION].signed_in(approver.id, broker.store.clock())
        await self.call(broker.client.set, broker.store.keys.console_session(session.sid), approver.id,
                        ex=SESSION_TTL_S)
        await self.call(broker.audit.record, f"approver:{approver.id}", "console.signed_in", approver.id,
                        via="oidc", identity=identity)
        request[SESSION] = session
        # A page, not a redirect: the next navigation starts here (same site), so the browser
        # sends the SameSite=Strict session cookie with it.
        done = self.render(request, "sso_done.html", target="/console/ideas")
        done.del_cookie(FLOW_COOKIE, path=FLOW_PATH)
        return done

    async def signin_options(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        broker = self.broker(request)
        approver_id = str(body.get("approver", ""))[:64]
        # The same answer for any id (nothing says whether it exists): see Passkeys.signin_options.
        challenge_id, options = await self.call(broker.approvers.passkeys.signin_options, approver_id)
        return web.json_response({"challenge_id": challenge_id, "options": options})

    async def signout(self, request: web.Request) -> web.StreamResponse:
        broker = self.broker(request)
        session: Session = request[SESSION]
        await self.call(broker.client.delete, broker.store.keys.console_session(session.sid))
        request[SESSION] = fresh(broker.store.clock())
        return redirect("/console/signin")

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise web.HTTPBadRequest(text="expected a JSON object") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="expected a JSON object")
        return body

    # -- ideas -----------------------------------------------------------------------------
    async def home(self, request: web.Request) -> web.StreamResponse:
        return redirect("/console/ideas")

    async def ideas(self, request: web.Request) -> web.Response:
        """Ideas, newest first: pending by default; search, filters, keyset pages over all
        history (intake/console/lists.py)."""
        broker = self.broker(request)
        f = Filters.parse(request.query, IDEA_FILTERS, {"state": "pending"})
        page = await self.call(ideas_page, broker, f)
        return self.render(request, "ideas.html", ideas=page.rows, page=page, filters=f,
                           states=["pending", *(s.value for s in IdeaState)], channels=[c.value for c in Channel],
                           repos=[r.name for r in broker.policy.repos], tiers=list(broker.policy.risk_tiers))

    async def idea(self, request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
        broker = self.broker(request)
        idea = await self.call(broker.store.get_idea, request.match_info["idea_id"])
        repos = [r.name for r in broker.policy.repos]
        return self.render(request, "idea.html", status=status, idea=idea, segments=visible_segments(idea.text),
                           title_segments=visible_segments(idea.title), pending=idea.state in IDEA_PENDING,
                           repos=repos, change_types=list(broker.policy.change_types), error=error)

    async def promote(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        broker = self.broker(request)
        try:
            decision = await self.call(
                broker.gatekeeper.promote, request.match_info["idea_id"], repo=str(form.get("repo", "")),
                change_type=str(form.get("change_type", "")), approver_id=request[SESSION].who,
                code=self.proof(form), via="console",
            )
        except IntakeError as exc:
            return await self.idea(request, error=str(exc), status=_status(exc))
        return redirect(f"/console/tasks/{decision.task.id}?done=promoted")

    async def deny_idea(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        broker = self.broker(request)
        try:
            await self.call(broker.gatekeeper.deny, request.match_info["idea_id"],
                            approver_id=request[SESSION].who, reason=str(form.get("reason", "")))
        except IntakeError as exc:
            return await self.idea(request, error=str(exc), status=_status(exc))
        return redirect(f"/console/ideas/{request.match_info['idea_id']}?done=denied")

    # -- tasks -----------------------------------------------------------------------------
    async def tasks(self, request: web.Request) -> web.Response:
        """Tasks, newest first; search, filters (matched on the ledger's facts), keyset pages."""
        broker = self.broker(request)
        f = Filters.parse(request.query, TASK_FILTERS)
        page = await self.call(tasks_page, broker, f)
        return self.render(request, "tasks.html", tasks=page.rows, page=page, filters=f,
                           states=[s.value for s in TaskState], repos=[r.name for r in broker.policy.repos],
                           tiers=list(broker.policy.risk_tiers))

    async def task(self, request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
        broker = self.broker(request)
        task = await self.call(broker.store.get_task, request.match_info["task_id"])
        idea = await self.call(broker.store.get_idea, task.idea_id)
        tier = broker.policy.risk_tiers.get(task.risk_tier)
        approvals = [{"who": a.approver, "at": a.at, "via": a.via.partition("+")[0],
                      "factor": "passkey" if a.via.endswith("+passkey") else "totp",
                      "current": a.spec_hash == task.spec_hash} for a in task.approvals]
        # The Accept form names the commit the sealed history holds, never the record's copy, and
        # the digest of the diff this page renders (issue 20): no rendered diff, no form.
        accept_sha = await self.call(self._result_commit, broker, task.id) \
            if task.state is TaskState.AWAITING_RESULT_APPROVAL else None
        fact = await self.call(lambda: broker.ledger.follow().task(task.id))
        review = await self.call(load_review, broker.store, task.id, fact.result_diff if fact else None,
                                 (task.result or {}).get("review"))
        review_files = split_files(review.diff, broker.policy, task.spec.repo) if review and review.diff else []
        if accept_sha and fact is not None and fact.result_diff is not None and not review_files:
            accept_sha = None  # the diff cannot be shown (missing or altered in storage): no accept
        provenance = await self.call(self._provenance, broker, task)
        return self.render(
            request, "task.html", status=status, task=task, idea=idea, approvals=approvals, provenance=provenance,
            segments=visible_segments(task.spec.prompt), result=task.result or {},
            dependencies=summarize_dependencies(task.result),
            approvable=task.state is TaskState.AWAITING_APPROVALS, accept_sha=accept_sha,
            review=review, review_files=[(f, [(k, visible_segments(t)) for k, t in f.lines]) for f in review_files],
            accept_diff=review.sha256 if review is not None and review_files else "",
            result_approvals=task.result_approvals,
            # Deny and revoke win over a result waiting for approval too.
            deniable=task.state in (TaskState.AWAITING_APPROVALS, TaskState.QUEUED,
                                    TaskState.AWAITING_RESULT_APPROVAL),
            revocable=task.state in (TaskState.AWAITING_APPROVALS, TaskState.QUEUED, TaskState.RUNNING,
                                     TaskState.AWAITING_RESULT_APPROVAL),
            passkey_only=tier is not None and tier.step_up == "passkey", error=error,
        )

    @staticmethod
    def _provenance(broker: Broker, task: Any) -> dict[str, Any] | None:
        """The delivered commit's signed statement and `intake provenance verify`'s verdict on it
        (signature with the public keyring, subject, every fact against the sealed log)."""
        if not (task.result or {}).get("commit") or task.state is not TaskState.SUCCEEDED:
            return None
        try:
            known = provenance.lookup(broker, task.id)
        except IntakeError:
            return None
        if not known.get("envelope"):
            return {"commit": known["commit"], "statement": None, "failures": ["no stored envelope"]}
        statement, failures = provenance.verify(known["envelope"], broker.keyring, commit=known["commit"],
                                                known=known)
        return {"commit": known["commit"], "statement": statement, "failures": failures}

    async def approve(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        broker = self.broker(request)
        task_id = request.match_info["task_id"]
        try:
            await self.call(broker.gatekeeper.approve, task_id, approver_id=request[SESSION].who,
                            code=self.proof(form), spec_hash=str(form.get("spec_hash", "")) or None, via="console")
        except IntakeError as exc:
            return await self.task(request, error=str(exc), status=_status(exc))
        return redirect(f"/console/tasks/{task_id}?done=approved")

    async def accept(self, request: web.Request) -> web.StreamResponse:
        """Approve a task's result: the commit in the form's ``sha`` field (the Gatekeeper
        checks it is the quarantined commit the sealed history names), with a fresh step-up."""
        form = await request.post()
        broker = self.broker(request)
        task_id = request.match_info["task_id"]
        try:
            await self.call(broker.gatekeeper.accept, task_id, approver_id=request[SESSION].who,
                            code=self.proof(form), sha=str(form.get("sha", "")), via="console",
                            diff_sha256=str(form.get("diff_sha256", "")) or None)
        except IntakeError as exc:
            return await self.task(request, error=str(exc), status=_status(exc))
        return redirect(f"/console/tasks/{task_id}?done=accepted")

    @staticmethod
    def _result_commit(broker: Broker, task_id: str) -> str | None:
        fact = broker.ledger.follow().task(task_id)
        return fact.result_commit if fact is not None else None

    async def deny_task(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        broker = self.broker(request)
        task_id = request.match_info["task_id"]
        try:
            await self.call(broker.gatekeeper.deny, task_id, approver_id=request[SESSION].who,
                            reason=str(form.get("reason", "")))
        except IntakeError as exc:
            return await self.task(request, error=str(exc), status=_status(exc))
        return redirect(f"/console/tasks/{task_id}?done=denied")

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        broker = self.broker(request)
        task_id = request.match_info["task_id"]
        try:
            await self.call(broker.gatekeeper.revoke, task_id, identity=f"approver:{request[SESSION].who}",
                            is_approver=True, reason=str(form.get("reason", "")))
        except IntakeError as exc:
            return await self.task(request, error=str(exc), status=_status(exc))
        return redirect(f"/console/tasks/{task_id}?done=revoked")

    async def stepup_options(self, request: web.Request) -> web.Response:
        """Passkey options for one power action; the challenge names the action, its subject
        and the spec hash it approves (for promote: of the spec the chosen repo and change type
        make now; for accept: the result commit the sealed history names)."""
        body = await self._json(request)
        broker = self.broker(request)
        action, subject = str(body.get("action", "")), str(body.get("subject", ""))
        try:
            approver = await self.call(broker.approvers.active, request[SESSION].who)
            if action == "promote":
                idea = await self.call(broker.store.get_idea, subject)
                spec = broker.gatekeeper.build_spec(idea, str(body.get("repo", "")), str(body.get("change_type", "")))
                bound = spec.spec_hash()
            elif action == "approve":
                task = await self.call(broker.store.get_task, subject)
                bound = task.spec_hash
            elif action == "accept":
                fact = await self.call(lambda: broker.ledger.follow().task(subject))
                if fact is None or not fact.result_commit:
                    raise NotFound(f"the sealed history holds no result for {subject}")
                bound = accept_bound(fact.result_commit, fact.result_diff)
            elif action == "thaw" and subject == "broker":
                bound = ""
            else:
                raise InvalidInput("no passkey step-up for that action")
            challenge_id, options = await self.call(broker.approvers.passkeys.assertion_options, approver,
                                                     action=action, subject=subject, bound=bound)
        except IntakeError as exc:
            return web.json_response({"error": str(exc)}, status=_status(exc))
        return web.json_response({"challenge_id": challenge_id, "options": options, "bound": bound})

    # -- audit -----------------------------------------------------------------------------
    async def audit(self, request: web.Request) -> web.Response:
        """The audit log, newest first, over the entries still in Redis (the page says which range
        that is and where the archived rest is). The status line is the ledger's, which checks each
        entry once as it follows the chain (a full walk is ``intake audit verify``): a page view
        never walks the whole log."""
        broker = self.broker(request)
        ledger = await self.call(lambda: broker.ledger.follow(seal=False))
        if ledger.halted:
            status, ok = f"BROKEN: {ledger.halted}", False
        else:
            seq = ledger.cursor.seq if ledger.cursor else 0
            status, ok = f"verified: {seq} sealed events followed and checked (a full walk: intake audit verify)", True
        f = Filters.parse(request.query, AUDIT_FILTERS)
        page = await self.call(audit_page, broker, f)
        coverage = await self.call(audit_coverage, broker)
        return self.render(request, "audit.html", verify_status=status, verify_ok=ok, events=page.rows, page=page,
                           filters=f, coverage=coverage)

    async def audit_archive(self, request: web.Request) -> web.Response:
        """Archived audit entries by sealed position (``?to=N``: the page ending at #N), one
        segment read per view (intake/console/lists.py)."""
        raw = request.query.get("to", "")
        to = int(raw) if re.fullmatch(r"[0-9]{1,12}", raw) else None
        page = await self.call(archive_page, self.broker(request), to)
        return self.render(request, "audit_archive.html", page=page)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: one ``change`` event (the audit action and subject, never data) per
        audit entry appended after the stream opened; a comment every second keeps it alive and
        notices a closed tab. Pages reload their own ``data-live`` part on each (console.js)."""
        broker = self.broker(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        last = await self.call(lambda: (broker.client.xrevrange(broker.audit.stream, "+", "-", count=1)
                                        or [("0-0", {})])[0][0])
        stopping: asyncio.Event = request.app[STOPPING]
        ends = asyncio.get_running_loop().time() + STREAM_S  # EventSource reconnects by itself
        try:
            await response.write(b"retry: 2000\n\n")
            while not stopping.is_set() and asyncio.get_running_loop().time() < ends:
                batch = await self.call(broker.client.xread, {broker.audit.stream: last}, count=50, block=1000)
                lines = []
                for _stream, entries in batch or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        lines.append(_sse_line(fields))
                await response.write("".join(lines).encode() or b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    # -- approvers and enrolment -----------------------------------------------------------
    async def approvers(self, request: web.Request, error: str | None = None, invited: str | None = None,
                        status: int = 200, sent: str | None = None) -> web.Response:
        approvers = await self.call(self.broker(request).approvers.all)
        return self.render(request, "approvers.html", status=status, approvers=approvers, error=error,
                           invited=invited, sent=sent)

    async def enrol_create(self, request: web.Request) -> web.StreamResponse:
        """An admin invites a person: an unconfirmed approver with no secret, and a one-time
        enrolment link sent to the person's own Slack DM. The admin's own step-up is required
        (enrolment grants power). The link is never shown to the admin: whoever opens it first
        sees the seed, so only a channel the person alone controls may carry it. Without one,
        the person enrols from their own OS account (``intake approver enrol``)."""
        form = await request.post()
        broker = self.broker(request)
        who = request[SESSION].who
        try:
            if not self._is_admin(broker, who):
                raise Refused("not_admin", "only an admin (the policy's [admins]) can enrol approvers")
            admin = await self.call(broker.approvers.active, who)
            approver_id = str(form.get("approver", "")).strip()
            await self.call(broker.approvers.check_stepup, admin, str(form.get("code", "")).strip(),
                            purpose="enrol", subject=approver_id)
            groups = tuple(g for g in str(form.get("groups", "")).replace(" ", "").split(",") if g)
            await self.call(broker.approvers.add, broker.policy, approver_id, name=str(form.get("name", "")).strip(),
                            groups=groups, slack_user=str(form.get("slack_user", "")).strip() or None,
                            email=str(form.get("email", "")).strip() or None, actor=f"approver:{who}")
            slack_user = str(form.get("slack_user", "")).strip()
            if slack_user and self.settings.slack_bot_token is not None:
                token = await self.call(EnrolLinks(broker.store).create, approver_id, actor=f"approver:{who}")
                link = f"{self.settings.console_origin}/console/enrol/{token}"
                if await send_by_dm(self.settings, broker.store, slack_user, approver_id, link,
                                    actor=f"approver:{who}"):
                    return await self.approvers(request, sent=slack_user)
                await self.call(EnrolLinks(broker.store).finish, token)  # never shown: dropped at once
        except IntakeError as exc:
            return await self.approvers(request, error=str(exc), status=_status(exc))
        return await self.approvers(request, invited=approver_id)

    async def enrol_page(self, request: web.Request) -> web.Response:
        broker = self.broker(request)
        try:
            record = await self.call(EnrolLinks(broker.store).peek, request.match_info["token"])
        except IntakeError as exc:
            return self.render(request, "enrol.html", status=404, error=str(exc), stage="gone")
        return self.render(request, "enrol.html", approver=record["approver"], token=request.match_info["token"],
                           stage="used" if record["revealed"] else "start")

    async def enrol_reveal(self, request: web.Request) -> web.Response:
        broker = self.broker(request)
        token = request.match_info["token"]
        try:
            approver_id = await self.call(EnrolLinks(broker.store).reveal, token)
            enrolment = await self.call(broker.approvers.enrol, approver_id, actor="console:enrolment-link")
        except IntakeError as exc:
            return self.render(request, "enrol.html", status=_status(exc), error=str(exc), stage="gone")
        svg = qrcode.make(enrolment.otpauth_uri, image_factory=qrcode.image.svg.SvgPathImage).to_string(encoding="unicode")
        # The SVG is generated here from our own URI (no outside text in it), so it is safe as markup.
        return self.render(request, "enrol.html", stage="reveal", approver=approver_id, token=token,
                           qr=Markup(svg), uri=enrolment.otpauth_uri)

    async def enrol_confirm(self, request: web.Request) -> web.Response:
        form = await request.post()
        broker = self.broker(request)
        token = request.match_info["token"]
        links = EnrolLinks(broker.store)
        try:
            record = await self.call(links.peek, token)
            if not record["revealed"]:
                raise Refused("not_revealed", "show the code first")
            approver_id = str(record["approver"])
            await self.call(broker.approvers.confirm, approver_id, str(form.get("code", "")).strip(),
                            actor=f"approver:{approver_id}")
            await self.call(links.finish, token)
        except IntakeError as exc:
            return self.render(request, "enrol.html", status=_status(exc), error=str(exc), stage="used",
                               token=token, approver=None)
        return self.render(request, "enrol.html", stage="done", approver=approver_id)

    # -- passkeys --------------------------------------------------------------------------
    async def passkeys(self, request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
        broker = self.broker(request)
        mine = await self.call(broker.approvers.passkeys.list, request[SESSION].who)
        return self.render(request, "passkeys.html", status=status, passkeys=mine, error=error)

    async def passkey_options(self, request: web.Request) -> web.Response:
        broker = self.broker(request)
        approver = await self.call(broker.approvers.active, request[SESSION].who)
        challenge_id, options = await self.call(broker.approvers.passkeys.registration_options, approver)
        return web.json_response({"challenge_id": challenge_id, "options": options})

    async def passkey_register(self, request: web.Request) -> web.StreamResponse:
        """Register a passkey: a new factor grants power, so a fresh TOTP code is required."""
        form = await request.post()
        broker = self.broker(request)
        try:
            approver = await self.call(broker.approvers.active, request[SESSION].who)
            await self.call(broker.approvers.check_stepup, approver, str(form.get("code", "")).strip(),
                            purpose="passkey_register", subject=approver.id)
            try:
                credential = json.loads(str(form.get("credential", "")))
            except (ValueError, RecursionError):  # RecursionError: nested past the decoder's depth
                raise InvalidInput("the passkey response is not JSON") from None
            if not isinstance(credential, dict):
                raise InvalidInput("the passkey response is not a credential")
            await self.call(broker.approvers.passkeys.register, approver, str(form.get("challenge_id", "")),
                            credential, actor=f"approver:{approver.id}")
        except IntakeError as exc:
            return await self.passkeys(request, error=str(exc), status=_status(exc))
        return redirect("/console/passkeys?done=registered")

    # -- kill switch -----------------------------------------------------------------------
    async def killswitch(self, request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
        return self.render(request, "killswitch.html", status=status, error=error)

    async def freeze(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        broker = self.broker(request)
        who = request[SESSION].who
        try:
            await self.call(broker.gatekeeper.freeze, by=who, actor=f"approver:{who}",
                            reason=str(form.get("reason", "")))
        except IntakeError as exc:
            return await self.killswitch(request, error=str(exc), status=_status(exc))
        return redirect("/console/killswitch?done=frozen")

    async def thaw(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        broker = self.broker(request)
        who = request[SESSION].who
        try:
            if not self._is_admin(broker, who):
                raise Refused("not_admin", "only an admin (the policy's [admins]) can thaw intake")
            admin = await self.call(broker.approvers.active, who)
            await self.call(broker.approvers.check_stepup, admin, self.proof(form), purpose="thaw", subject="broker")
            await self.call(broker.gatekeeper.thaw, actor=f"approver:{who}")
        except IntakeError as exc:
            return await self.killswitch(request, error=str(exc), status=_status(exc))
        return redirect("/console/killswitch?done=thawed")

    # -- dashboard -------------------------------------------------------------------------
    async def dashboard(self, request: web.Request) -> web.Response:
        """The report's figures, trend and charts (:mod:`intake.operations.indicators`), over
        ``?since=`` (default 12w) per ``?by=`` period (default week)."""
        # Imported here: intake.operations.indicators.render uses this package's SVG helpers (display.py).
        from intake.operations.indicators.render import figures_context

        broker = self.broker(request)
        since = request.query.get("since", DASHBOARD_SINCE)[:40]
        by = request.query.get("by", "week")[:10]
        try:
            fig = await self.call(broker_figures, broker, since, by)
        except IntakeError as exc:
            fig = await self.call(broker_figures, broker, DASHBOARD_SINCE, "week")
            return self.render(request, "dashboard.html", status=400, error=str(exc), since=DASHBOARD_SINCE,
                               by="week", **figures_context(fig))
        return self.render(request, "dashboard.html", since=since, by=by, **figures_context(fig))
