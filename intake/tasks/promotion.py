"""Promotion: the only door from an untrusted idea to an executable task.

Every path here (CLI, Slack, the web console) goes through :class:`Gatekeeper`. It checks, in
order, who is asking (a registered, confirmed approver), the idea or task state, the
no-self-approval rule, the policy (repo, change type, groups), and only then the step-up (a TOTP
code, or a passkey assertion bound to the spec hash, through ``Approvers.check_stepup``), so a
refusal for any other reason does not burn the approver's code. The state change, its approvals
and its audit events then commit in one WATCHed transaction. Approvals are counted from the
broker's verified ledger (:mod:`intake.audit.ledger`), never from the copy in Redis; when they satisfy
the risk tier the task is queued, and the dispatcher mints a short-lived dispatch token per attempt.

Refusals raise :class:`Refused` with a stable reason tag, are audited, and change nothing.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from intake.audit.ledger import Ledger
from intake.core.errors import (
    IllegalTransition,
    InvalidInput,
    LedgerHalted,
    NotFound,
    Refused,
)
from intake.core.models import (
    IDEA_PENDING,
    Approval,
    Approver,
    Idea,
    IdeaState,
    Limits,
    RequiredCheck,
    Task,
    TaskSpec,
    TaskState,
    new_id,
)
from intake.core.policy import ApprovalRule, Policy, ResultApprovalRule, RiskTier
from intake.people.approvers import Approvers
from intake.people.passkeys import PasskeyProof
from intake.people.registry import People, canonical_identity
from intake.storage.store import Pipe, Store, idea_fields


@dataclass(frozen=True)
class Decision:
    """The outcome of a promote/approve, as the CLI and Slack report it."""

    task: Task

    def as_json(self) -> dict[str, Any]:
        return {
            "task": self.task.id,
            "status": self.task.state.value,
            "approvals": len(self.task.approvals),
            "required": self.task.required,
            "spec_hash": self.task.spec_hash,
            "approvers": [a.approver for a in self.task.approvals],
        }


def accept_bound(sha: str, diff_sha256: str | None) -> str:
    """What a passkey assertion for a result approval names: the commit, and the reviewed diff's
    digest when the result has one (``<sha>:<digest>``)."""
    return f"{sha}:{diff_sha256}" if diff_sha256 else sha


class Gatekeeper:
    """Promotion, approval, denial, amendment, revocation, the kill switch and the clocks."""

    def __init__(
        self,
        store: Store,
        approvers: Approvers,
        policy: Policy,
        ledger: Ledger,
        *,
        on_queued: Callable[[Task], None] | None = None,
        on_revoked: Callable[[str, str, int, str], None] | None = None,
        people: People | None = None,
    ) -> None:
        self.store = store
        self.people = people or People(store)
        self.approvers = approvers
        self.policy = policy
        self.ledger = ledger
        self.on_queued = on_queued
        self.on_revoked = on_revoked  # (task, worker, attempt, run): tell a live run to stop now

    # -- helpers ---------------------------------------------------------------------------
    def _refuse(self, actor: str, subject: str, reason: str, message: str, **data: Any) -> Refused:
        self.store.audit.record(actor, "approval.refused", subject, reason=reason, **data)
        return Refused(reason, message)

    def _live(self, actor: str, subject: str) -> None:
        """Counting approvals is a power decision: not on a broken chain."""
        try:
            self.ledger.follow().require_live()
        except LedgerHalted as exc:
            raise self._refuse(actor, subject, "ledger_halted", str(exc)) from None

    def _active(self, approver_id: str, subject: str) -> Approver:
        try:
            return self.approvers.active(approver_id)
        except Refused as exc:
            raise self._refuse(f"as:{approver_id}", subject, exc.reason, str(exc)) from None

    def own_work(self, person_id: str, idea: Idea, approver: Approver | None = None) -> bool:
        """True when ``person_id`` wrote these words or sent them in, under any identity linked
        to them now or linked to them before (unlinking one's own identity, or re-linking it to
        a throwaway person, does not make one's words someone else's). Compares persons, not
        strings; an unlinked identity still matches the approver's own registered ids."""
        # issue 20: identities are compared in their canonical form (an email's +tag stripped
        # where the policy's [identities] declares the domain subaddresses), on both sides.
        domains = frozenset(self.policy.identities.email_subaddress_domains)
        raw = {idea.requester, idea.filed_by or idea.requester}
        claimed = raw | {canonical_identity(i, domains) for i in raw}
        if approver is not None and claimed & {canonical_identity(i, domains) for i in approver.identities()}:
            return True
        me = self.people.find(person_id)
        if me is not None and claimed & {canonical_identity(i, domains) for i in me.ever()}:  # also unlinked since
            return True
        return person_id in self.people.persons_of(*claimed, subaddress_domains=domains)

    def _tier(self, spec: TaskSpec) -> tuple[str, RiskTier]:
        repo = self.policy.find_repo(spec.repo)
        assert repo is not None
        return repo.tier, self.policy.risk_tiers[repo.tier]

    def build_spec(self, idea: Idea, repo_name: str, change_type: str) -> TaskSpec:
        """Freeze the idea's text into a spec under the current policy (or refuse)."""
        repo = self.policy.find_repo(repo_name)
        if repo is None:
            raise Refused("repo_not_allowed", f"repo {repo_name!r} is not in the policy")
        if change_type not in repo.change_types:
            raise Refused(
                "change_type_not_allowed",
                f"change type {change_type!r} is not allowed for {repo_name} "
                f"(allowed: {', '.join(repo.change_types)})",
            )
        return TaskSpec(
            idea_id=idea.id,
            prompt=idea.text,
            repo=repo.name,
            base_ref=repo.base_ref,
            change_type=change_type,
            change_type_paths=self.policy.change_types[change_type].paths,
            allowed_paths=repo.allowed_paths,
            blocked_paths=repo.blocked_paths,
            branch_prefix=repo.branch_prefix,
            required_checks=tuple(RequiredCheck(name=c.name, argv=c.argv, timeout_s=c.timeout)
                                  for c in repo.checks),
            limits=Limits(
                run_timeout_s=self.policy.clocks.run_timeout,
                max_output_bytes=self.policy.limits.max_output_bytes,
                max_disk_bytes=self.policy.limits.max_disk_bytes,
                max_processes=self.policy.limits.max_processes,
            ),
            policy_version=self.policy.version_hash,
            egress=repo.egress,
        )

    def approval(self, approver: Approver, spec_hash: str, now: float, via: str, note: str) -> Approval:
        """A new approval by the approver's current enrolment."""
        return Approval(approver=approver.id, groups=self.policy.groups_of(approver.id), spec_hash=spec_hash,
                        at=now, via=via, note=note, generation=approver.generation)

    def valid_approvals(self, task: Task, now: float, *, adding: Approval | None = None) -> list[Approval]:
        """Approvals that still count, from the ledger alone: for the task's current spec hash
        (as the sealed history names it), within the approval validity, by an approver whose
        enrolment is still the one that approved. ``adding`` is the approval being recorded
        now, by an approver this call has just checked. Groups come from the policy."""
        counted = [
            Approval(approver=a.approver, groups=self.policy.groups_of(a.approver), spec_hash=a.spec_hash,
                     at=a.at, via=a.via, generation=a.generation)
            for a in self.ledger.follow().counted_approvals(task.id, now=now,
                                                             validity=self.policy.clocks.approval_validity)
        ]
        if adding is not None and all(a.approver != adding.approver for a in counted):
            counted.append(adding)
        return counted

    @staticmethod
    def satisfied(tier: ApprovalRule, approvals: list[Approval]) -> bool:
        if len({a.approver for a in approvals}) < tier.approvals:
            return False
        return all(sum(g in a.groups for a in approvals) >= n for g, n in tier.require.items())

    @staticmethod
    def fit(tier: ApprovalRule, tier_name: str, approvals: list[Approval], groups: tuple[str, ...]) -> str | None:
        """Why an approver with ``groups`` cannot add an approval now, or None if they can."""
        if not set(groups) & set(tier.groups):
            return f"approvers for {tier_name} work must be in {' or '.join(tier.groups)}"
        after = [a.groups for a in approvals] + [groups]
        slots = tier.approvals - len(after)
        missing = [g for g, n in tier.require.items() if sum(g in gs for gs in after) < n]
        unmet = sum(n - sum(g in gs for gs in after) for g, n in tier.require.items() if g in missing)
        if unmet > max(slots, 0):
            return f"this task still needs an approval from {' and '.join(missing)}"
        return None

    def _queue_if_satisfied(self, task: Task, now: float, adding: Approval | None = None) -> Task:
        _, tier = self._tier(task.spec)
        valid = self.valid_approvals(task, now, adding=adding)
        if not self.satisfied(tier, valid):
            return task
        # The approval window closes when the oldest approval it rests on expires.
        window = min(a.at for a in valid) + self.policy.clocks.approval_validity
        if window <= now:
            return task
        repo = self.policy.find_repo(task.spec.repo)
        assert repo is not None
        return task.model_copy(
            update={"state": TaskState.QUEUED, "window_ends_at": float(window), "queue": self.policy.queue_for(repo)}
        )

    def _after(self, task: Task, previous: TaskState | None = None) -> Task:
        if task.state is TaskState.QUEUED and previous is not TaskState.QUEUED and self.on_queued:
            self.on_queued(task)
        return task

    def _emit_task(self, pipe: Pipe, actor: str, task: Task, **data: Any) -> None:
        if task.state is TaskState.QUEUED:
            self.store.emit(pipe, "system", "task.queued", task.id, queue=task.queue,
                            spec_hash=task.spec_hash, window_ends_at=task.window_ends_at, **data)

    @staticmethod
    def _via(via: str, factor: str) -> str:
        """The channel, plus the factor when it is a passkey (``console+passkey``); the
        approval's MAC covers it, so the factor shown is the factor used."""
        return f"{via}+passkey" if factor == "passkey" else via

    # -- promote / approve -----------------------------------------------------------------
    def promote(
        self, idea_id: str, *, repo: str, change_type: str, approver_id: str, code: str | PasskeyProof,
        via: str = "cli", note: str = "",
    ) -> Decision:
        """Turn a pending idea into a task with its first approval (step-up required: a TOTP
        code, or a passkey assertion for ``promote`` of this idea at the new spec's hash)."""
        actor = f"approver:{approver_id}"
        self._live(actor, idea_id)
        approver = self._active(approver_id, idea_id)
        idea = self.store.get_idea(idea_id)
        self._check_idea_open(idea, actor)
        self._check_idea_intact(idea, actor)
        if self.own_work(approver.id, idea, approver):
            raise self._refuse(actor, idea_id, "self_approval", "you cannot approve your own request")
        try:
            spec = self.build_spec(idea, repo, change_type)
        except Refused as exc:
            raise self._refuse(actor, idea_id, exc.reason, str(exc)) from None
        tier_name, tier = self._tier(spec)
        groups = self.policy.groups_of(approver.id)
        if (why := self.fit(tier, tier_name, [], groups)) is not None:
            raise self._refuse(actor, idea_id, "wrong_group", why)
        factor = self.approvers.check_stepup(approver, code, purpose="promote", subject=idea_id,
                                             bound=spec.spec_hash(), require=tier.step_up)
        via = self._via(via, factor)

        keys = self.store.keys

        def build(pipe: Pipe) -> Task:
            now = self.store.clock()
            current = self.store.read_idea(pipe, idea_id)
            self._check_idea_open(current, actor)
            if current.text != idea.text:
                raise self._refuse(actor, idea_id, "tampered", f"idea {idea_id} changed while it was being promoted")
            task_id = new_id("T")
            approval = self.approval(approver, spec.spec_hash(), now, via, note)
            task = Task(
                id=task_id, idea_id=idea_id, requester=current.requester, spec=spec,
                spec_hash=spec.spec_hash(), state=TaskState.AWAITING_APPROVALS, risk_tier=tier_name,
                required=tier.approvals, approvals=[approval], created_at=now, updated_at=now,
            )
            task = self._queue_if_satisfied(task, now, approval)
            promoted = current.model_copy(update={"state": IdeaState.PROMOTED, "task_id": task.id, "updated_at": now})
            pipe.multi()
            self.store.write_idea(pipe, promoted, task)
            self.store.write_task(pipe, task)
            self.store.emit(pipe, actor, "idea.promoted", idea_id, task=task.id, via=via)
            self.store.emit(pipe, actor, "task.created", task.id, idea=idea_id, repo=spec.repo,
                            change_type=spec.change_type, spec_hash=task.spec_hash,
                            policy_version=spec.policy_version, tier=tier_name, requester=current.requester)
            self.store.emit(pipe, actor, "approval.recorded", task.id, spec_hash=task.spec_hash,
                            groups=list(groups), via=via, count=1, required=tier.approvals,
                            generation=approver.generation)
            self._emit_task(pipe, actor, task)
            return task

        return Decision(self._after(self.store.transact([keys.idea(idea_id)], build)))

    def _check_idea_intact(self, idea: Idea, actor: str) -> None:
        """The idea's text, requester and provenance are what was captured (its MAC holds)."""
        if not self.store.audit.record_ok("idea", idea_fields(idea), idea.mac):
            raise self._refuse(actor, idea.id, "tampered",
                               f"idea {idea.id} failed its integrity check; it was altered in storage")

    def _check_idea_open(self, idea: Idea, actor: str) -> None:
        if idea.state is IdeaState.DENIED:
            raise self._refuse(actor, idea.id, "already_denied", f"idea {idea.id} was denied")
        if idea.state is IdeaState.PROMOTED:
            raise self._refuse(actor, idea.id, "already_promoted", f"idea {idea.id} is already task {idea.task_id}")
        if idea.state not in IDEA_PENDING:
            raise self._refuse(actor, idea.id, f"idea_{idea.state.value}", f"idea {idea.id} is {idea.state.value}")
        if idea.expires_at is not None and idea.expires_at <= self.store.clock():
            self._expire_idea(idea.id)
            raise self._refuse(actor, idea.id, "idea_expired", f"idea {idea.id} expired before it was promoted")

    def approve(
        self, task_id: str, *, approver_id: str, code: str | PasskeyProof, spec_hash: str | None = None,
        via: str = "cli", note: str = "",
    ) -> Decision:
        """Add an approval to the task's current spec hash (step-up required: a TOTP code, or a
        passkey assertion for ``approve`` of this task at its current spec hash)."""
        actor = f"approver:{approver_id}"
        self._live(actor, task_id)
        approver = self._active(approver_id, task_id)
        task = self.store.get_task(task_id)
        idea = self.store.get_idea(task.idea_id)
        self._check_idea_intact(idea, actor)  # the requester and filer we compare are genuine
        groups = self.policy.groups_of(approver.id)
        self._check_approvable(task, idea, approver, groups, spec_hash, actor)
        _, tier = self._tier(task.spec)
        factor = self.approvers.check_stepup(approver, code, purpose="approve", subject=task_id,
                                             bound=task.spec_hash, require=tier.step_up)
        via = self._via(via, factor)

        def build(pipe: Pipe) -> tuple[Task, TaskState]:
            now = self.store.clock()
            current = self.store.read_task(pipe, task_id)
            # Anything may have changed while the code was checked: check it all again.
            self._check_approvable(current, idea, approver, groups, spec_hash or task.spec_hash, actor)
            approval = self.approval(approver, current.spec_hash, now, via, note)
            kept = [a for a in current.approvals if a.spec_hash == current.spec_hash]
            updated = current.model_copy(update={"approvals": [*kept, approval], "updated_at": now})
            updated = self._queue_if_satisfied(updated, now, approval)
            pipe.multi()
            self.store.write_task(pipe, updated, current)
            self.store.emit(pipe, actor, "approval.recorded", task_id, spec_hash=current.spec_hash,
                            groups=list(groups), via=via, count=len(self.valid_approvals(current, now, adding=approval)),
                            required=updated.required, generation=approver.generation)
            self._emit_task(pipe, actor, updated)
            return updated, current.state

        updated, before = self.store.transact([self.store.keys.task(task_id)], build)
        return Decision(self._after(updated, before))

    def _check_approvable(
        self, task: Task, idea: Idea, approver: Approver, groups: tuple[str, ...], spec_hash: str | None,
        actor: str,
    ) -> None:
        if task.state is TaskState.DENIED:
            raise self._refuse(actor, task.id, "already_denied", f"task {task.id} was denied")
        if task.state is not TaskState.AWAITING_APPROVALS:
            raise self._refuse(actor, task.id, "not_awaiting",
                               f"task {task.id} is {task.state.value}; it takes no more approvals")
        if spec_hash is not None and spec_hash != task.spec_hash:
            raise self._refuse(actor, task.id, "stale_spec",
                               f"task {task.id} changed since you saw it (spec {task.spec_hash[:12]}); review it again")
        if (why := self.ledger.follow().tampered(task)) is not None:
            raise self._refuse(actor, task.id, "tampered",
                               f"task {task.id}'s record disagrees with the sealed history ({why}); "
                               "it was altered in storage")
        if task.spec.policy_version != self.policy.version_hash:
            raise self._refuse(actor, task.id, "stale_policy",
                               f"the policy changed since task {task.id} was promoted; amend it first")
        if task.idea_id != idea.id or self.own_work(approver.id, idea, approver):
            raise self._refuse(actor, task.id, "self_approval", "you cannot approve your own request")
        now = self.store.clock()
        valid = self.valid_approvals(task, now)
        if any(a.approver == approver.id for a in valid):
            raise self._refuse(actor, task.id, "already_approved", f"you already approved task {task.id}")
        tier_name, tier = self._tier(task.spec)
        if (why := self.fit(tier, tier_name, valid, groups)) is not None:
            raise self._refuse(actor, task.id, "wrong_group", why)

    # -- the result -------------------------------------------------------------------------
    def result_rule(self, task: Task, paths: list[str], complete: bool) -> ResultApprovalRule | None:
        """The approval a run's result needs before delivery (None: deliver now), from the
        policy: the tier's ``result_approvals``, or, when the change touches one of the repo's
        ``privileged_paths`` (or the path list is incomplete), one whatever the tier."""
        repo = self.policy.find_repo(task.spec.repo)
        if repo is None:
            return ResultApprovalRule(approvals=1, groups=tuple(self.policy.groups))
        _, tier = self._tier(task.spec)
        touches = not complete or repo.touches_privileged(paths)
        return tier.result_rule(bool(repo.privileged_paths) and touches)

    def accept(self, task_id: str, *, approver_id: str, code: str | PasskeyProof, sha: str, via: str = "cli",
               note: str = "", diff_sha256: str | None = None) -> Decision:
        """Approve a task's *result*: the quarantined commit ``sha`` **and** the diff the approver
        was shown (``diff_sha256``), as the sealed history names them (step-up code required,
        never by the requester). An approval for another diff, or for none when the result has
        one, is refused (issue 20: nobody accepts a result blind). When the approvals of that
        commit meet the rule it waits for, the task moves to ``delivering`` and a delivery job
        bound to that sha is dispatched. A new commit needs new approvals; deny and revoke win."""
        actor = f"approver:{approver_id}"
        self._live(actor, task_id)
        approver = self._active(approver_id, task_id)
        task = self.store.get_task(task_id)
        groups = self.policy.groups_of(approver.id)
        self._check_acceptable(task, approver, groups, sha, actor, diff_sha256)
        _, tier = self._tier(task.spec)
        # A passkey assertion names the commit and (issue 20) the reviewed diff's digest.
        factor = self.approvers.check_stepup(approver, code, purpose="accept", subject=task_id,
                                             bound=accept_bound(sha, diff_sha256), require=tier.step_up)
        via = self._via(via, factor)

        def build(pipe: Pipe) -> Task:
            now = self.store.clock()
            current = self.store.read_task(pipe, task_id)
            rule = self._check_acceptable(current, approver, groups, sha, actor, diff_sha256)
            approval = Approval(approver=approver.id, groups=groups, spec_hash=current.spec_hash, at=now, via=via,
                                note=note, generation=approver.generation, sha=sha, diff_sha256=diff_sha256)
            counted = [*self.valid_result_approvals(current), approval]
            done = self.satisfied(rule, counted)
            kept = [a for a in current.result_approvals if a.sha == sha]
            changes: dict[str, Any] = {"result_approvals": [*kept, approval], "updated_at": now}
            if done:
                changes["state"] = TaskState.DELIVERING
            updated = current.model_copy(update=changes)
            pipe.multi()
            self.store.write_task(pipe, updated, current)
            fact = self.ledger.task(task_id)
            self.store.emit(pipe, actor, "result.approved", task_id, sha=sha, spec_hash=current.spec_hash,
                            groups=list(groups), via=via, count=len(counted), required=rule.approvals,
                            generation=approver.generation, diff_sha256=diff_sha256,
                            # bound to the worker whose run produced the commit, too (issue 19)
                            worker=fact.result_worker if fact is not None else None)
            if done:
                self.store.emit(pipe, "system", "task.delivering", task_id, commit=sha)
            return updated

        updated = self.store.transact([self.store.keys.task(task_id)], build)
        self.store.audit.seal_pending()  # the ledger must know before the delivery is dispatched
        if updated.state is TaskState.DELIVERING and self.on_queued:
            self.on_queued(updated)
        return Decision(updated)

    def result_validity(self, task_id: str) -> float:
        """How long a result approval of ``task_id`` counts: the ``validity`` of the rule its
        result waits for (as sealed), else the policy's approval validity (issue 19)."""
        fact = self.ledger.task(task_id)
        validity = (fact.result_rule or {}).get("validity") if fact is not None else None
        if isinstance(validity, int | float) and not isinstance(validity, bool) and validity > 0:
            return float(validity)
        return float(self.policy.clocks.approval_validity)

    def valid_result_approvals(self, task: Task) -> list[Approval]:
        """Approvals of the task's quarantined commit (and of the worker that produced it)
        that count now, from the ledger alone: older than the result validity, they do not."""
        self.ledger.follow()
        counted = self.ledger.counted_result_approvals(task.id, now=self.store.clock(),
                                                       validity=self.result_validity(task.id))
        return [Approval(approver=a.approver, groups=self.policy.groups_of(a.approver), spec_hash=a.spec_hash,
                         at=a.at, via=a.via, generation=a.generation) for a in counted]

    def _check_acceptable(self, task: Task, approver: Approver, groups: tuple[str, ...], sha: str,
                          actor: str, diff_sha256: str | None = None) -> ApprovalRule:
        """The rule the result waits for, if ``approver`` may approve commit ``sha`` now."""
        if task.state is TaskState.DENIED:
            raise self._refuse(actor, task.id, "already_denied", f"task {task.id} was denied")
        if task.state is not TaskState.AWAITING_RESULT_APPROVAL:
            raise self._refuse(actor, task.id, "not_awaiting_result",
                               f"task {task.id} is {task.state.value}; it has no result waiting for approval")
        if (why := self.ledger.follow().tampered(task)) is not None:
            raise self._refuse(actor, task.id, "tampered",
                               f"task {task.id}'s record disagrees with the sealed history ({why}); "
                               "it was altered in storage")
        fact = self.ledger.task(task.id)
        if fact is None or fact.result_commit is None or fact.result_rule is None:
            raise self._refuse(actor, task.id, "tampered", f"the sealed history holds no result for {task.id}")
        if sha != fact.result_commit:
            raise self._refuse(actor, task.id, "wrong_sha",
                               f"task {task.id}'s result is commit {fact.result_commit[:12]}, not {sha[:12]}; "
                               "review the result again", sha=sha[:64])
        # issue 20: bound to the diff the approver was shown, as the sealed history names it
        # (results sealed before diffs were reviewed have none and bind to the commit alone).
        if fact.result_diff is not None and not (
                isinstance(diff_sha256, str) and hmac.compare_digest(diff_sha256, fact.result_diff)):
            reason = "review_required" if not diff_sha256 else "wrong_diff"
            raise self._refuse(actor, task.id, reason,
                               f"task {task.id}'s result is reviewed by its diff (sha256 {fact.result_diff[:12]}); "
                               "open it (console task page, or `intake show TASK --diff`) and accept what you saw")
        idea = self.store.get_idea(task.idea_id)
        self._check_idea_intact(idea, actor)
        if task.idea_id != idea.id or self.own_work(approver.id, idea, approver):
            raise self._refuse(actor, task.id, "self_approval", "you cannot approve the result of your own request")
        if any(a.approver == approver.id for a in self.valid_result_approvals(task)):
            raise self._refuse(actor, task.id, "already_approved", f"you already approved {task.id}'s result")
        rule = ResultApprovalRule.model_validate(fact.result_rule)
        if (why := self.fit(rule, f"{task.risk_tier} result", self.valid_result_approvals(task), groups)) is not None:
            raise self._refuse(actor, task.id, "wrong_group", why)
        return rule

    # -- deny / amend ----------------------------------------------------------------------
    def deny(self, ident: str, *, approver_id: str, reason: str) -> Idea | Task:
        """End an idea or a not-yet-running task. No code needed: stopping work is always safe."""
        if not reason.strip():
            raise InvalidInput("--reason: say why")
        approver = self._active(approver_id, ident)
        actor = f"approver:{approver.id}"
        if ident.startswith("T-"):
            denied = self.store.move_task(ident, TaskState.DENIED, actor=actor, reason=reason)
            self.store.audit.seal_pending()  # sealed at once: the ledger sees it before anything else
            return denied
        return self.store.move_idea(ident, IdeaState.DENIED, actor=actor, reason=reason)

    def amend(self, task_id: str, *, approver_id: str, repo: str | None = None,
              change_type: str | None = None) -> Task:
        """A new spec (e.g. another repo or change type) under the current policy: a new spec
        hash, every approval discarded."""
        approver = self._active(approver_id, task_id)
        actor = f"approver:{approver.id}"

        def build(pipe: Pipe) -> Task:
            now = self.store.clock()
            task = self.store.read_task(pipe, task_id)
            if task.state not in (TaskState.AWAITING_APPROVALS, TaskState.QUEUED):
                raise IllegalTransition("task", task_id, task.state.value, "amended")
            idea = self.store.read_idea(pipe, task.idea_id)
            try:
                spec = self.build_spec(idea, repo or task.spec.repo, change_type or task.spec.change_type)
            except Refused as exc:
                raise self._refuse(actor, task_id, exc.reason, str(exc)) from None
            if spec.spec_hash() == task.spec_hash:
                raise InvalidInput("the amended spec is the same as the current one")
            tier_name, tier = self._tier(spec)
            amended = task.model_copy(update={
                "spec": spec, "spec_hash": spec.spec_hash(), "state": TaskState.AWAITING_APPROVALS,
                "risk_tier": tier_name, "required": tier.approvals, "approvals": [],
                "window_ends_at": None, "queue": None, "updated_at": now,
            })
            pipe.multi()
            self.store.write_task(pipe, amended, task)
            self.store.emit(pipe, actor, "task.amended", task_id, old_spec_hash=task.spec_hash,
                            spec_hash=amended.spec_hash, repo=spec.repo, change_type=spec.change_type,
                            approvals_discarded=len(task.approvals), tier=tier_name)
            return amended

        return self.store.transact([self.store.keys.task(task_id)], build)

    # -- revoke / kill switch --------------------------------------------------------------
    def revoke(self, task_id: str, *, identity: str, is_approver: bool, reason: str,
               person: str | None = None) -> Task:
        """Stop a task for good: by its requester (under any linked identity; ``person`` is the
        caller's person when known) or any approver, no code needed. The event is sealed at
        once, so the ledger refuses every later claim and lease renewal for it."""
        if not reason.strip():
            raise InvalidInput("--reason: say why")
        task = self.store.get_task(task_id)
        caller = {person} if person else self.people.persons_of(identity)
        domains = frozenset(self.policy.identities.email_subaddress_domains)
        if not is_approver and identity != task.requester and not caller & self.people.persons_of(
                task.requester, subaddress_domains=domains):
            raise self._refuse(identity, task_id, "not_allowed",
                               "only the requester or an approver can revoke a task")
        live = self.ledger.follow().task(task_id)
        revoked = self.store.move_task(task_id, TaskState.REVOKED, actor=identity, reason=reason)
        self.store.audit.seal_pending()  # sealed at once: no lease is renewed after this
        if live is not None and live.run and live.worker and self.on_revoked is not None:
            attempt = live.deliveries if live.state is TaskState.DELIVERING else live.attempts
            self.on_revoked(task_id, live.worker, attempt, live.run)
        return revoked

    def frozen(self) -> dict[str, Any] | None:
        """The kill switch as the sealed history says (the Redis key is only a cache)."""
        return self.ledger.follow().frozen

    def freeze(self, *, by: str, actor: str, reason: str) -> None:
        """The kill switch, pulled by person ``by`` (any admin or confirmed approver; no code:
        stopping is always safe): no task starts until thawed, and running ones lose their
        leases. One rule for every channel that offers it."""
        if not self.policy.is_admin(by):
            self.approvers.active(by)
        if not reason.strip():
            raise InvalidInput("--reason: say why")

        def build(pipe: Pipe) -> None:
            pipe.multi()
            pipe.set(self.store.keys.freeze, json.dumps({"by": actor, "reason": reason, "at": self.store.clock()}))
            self.store.emit(pipe, actor, "broker.frozen", "broker", reason=reason)

        self.store.transact([self.store.keys.freeze], build)
        self.store.audit.seal_pending()

    def thaw(self, *, actor: str) -> None:
        def build(pipe: Pipe) -> None:
            if self.frozen() is None:
                raise InvalidInput("intake is not frozen")
            pipe.multi()
            pipe.delete(self.store.keys.freeze)
            self.store.emit(pipe, actor, "broker.thawed", "broker")

        self.store.transact([self.store.keys.freeze], build)

    # -- the clocks ------------------------------------------------------------------------
    def _expire_idea(self, idea_id: str) -> bool:
        def due(idea: Idea) -> None:
            if idea.expires_at is None or idea.expires_at > self.store.clock():
                raise InvalidInput("not due")

        try:
            self.store.move_idea(idea_id, IdeaState.EXPIRED, actor="system", check=due, clock="idea_ttl")
        except (IllegalTransition, InvalidInput, NotFound):
            return False
        return True

    def escalate_due(self) -> int:
        """Flag pending ideas nobody acted on within the escalation delay (once each); the
        outbox then pings the escalation group."""
        after = self.policy.escalation.after

        def due(idea: Idea) -> bool:
            return idea.created_at + after <= self.store.clock()

        candidates = self.store.ideas_due_to_escalate(self.store.clock() - after)
        return sum(self.store.mark_escalated(idea_id, due=due) for idea_id in candidates)

    def expire_due(self) -> dict[str, int]:
        """Expire pending ideas past their TTL and queued tasks whose approval window closed.

        Costs O(due ideas + open tasks). Safe to run from several processes at once.
        """
        now = self.store.clock()
        ideas = sum(self._expire_idea(idea_id) for idea_id in self.store.ideas_due_to_expire(now))
        tasks = 0
        self.ledger.follow()
        due_ids = [f.id for f in list(self.ledger.tasks.values())
                   if f.state is TaskState.QUEUED and (f.window_ends_at or 0) <= now]
        for task_id in due_ids:
            def due(t: Task) -> None:
                fact = self.ledger.task(t.id)
                if fact is None or fact.state is not TaskState.QUEUED or (fact.window_ends_at or 0) > self.store.clock():
                    raise InvalidInput("not due")
            try:
                self.store.move_task(task_id, TaskState.EXPIRED, actor="system",
                                     reason="the approval window closed before the task started", check=due)
                tasks += 1
            except (IllegalTransition, InvalidInput, NotFound):
                continue  # started or settled meanwhile
        return {"ideas": ideas, "tasks": tasks}

    def requeue_unsatisfied(self) -> int:
        """Queued tasks whose counted approvals no longer meet the policy (an approver was reset
        or removed) go back to awaiting approvals, audited. Running ones are left to finish."""
        now = self.store.clock()
        self.ledger.follow()
        moved = 0
        for fact in [f for f in list(self.ledger.tasks.values())
                     if f.state is TaskState.QUEUED and (f.window_ends_at or 0) > now]:  # closed: expire_due's
            try:
                task = self.store.get_task(fact.id)
            except (NotFound, InvalidInput):
                continue
            _, tier = self._tier(task.spec)
            if self.satisfied(tier, self.valid_approvals(task, now)):
                continue

            def still(t: Task) -> None:
                if t.state is not TaskState.QUEUED:
                    raise InvalidInput("no longer queued")

            try:
                self.store.move_task(task.id, TaskState.AWAITING_APPROVALS, actor="system", check=still,
                                     reason="its approvals no longer meet the policy (an approver was reset or removed)",
                                     update={"window_ends_at": None})
                moved += 1
            except (IllegalTransition, InvalidInput, NotFound):
                continue
        return moved
