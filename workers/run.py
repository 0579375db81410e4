"""One task run, from a claimed task to a settled one (DESIGN.md boundary 7).

:meth:`TaskRunner.run` clones the task's repo at the spec's base ref with only that repo's
credential, makes the branch ``<prefix>/<task id>``, runs the agent on the frozen prompt in a
minimal environment under the spec's time and output limits, commits, gates the change, runs the
required checks, pushes the commit to the quarantine ref ``refs/intake/<task id>`` (never a
branch), and reports:

* ``succeeded`` with ``{commit, tree, base, quarantine, files, files_changed, additions,
  deletions, gates, checks, output_tail, sandbox, …}`` and every changed path; the broker then
  decides whether the result waits for approval or is delivered;
* ``blocked`` with the gates' reasons or the failing required checks, nothing pushed;
* ``failed`` with a reason (agent error or timeout, no change, git trouble);
* nothing, when the run was stopped (revoked, frozen, superseded: the broker says so).

A delivery job (a token with ``kind = "deliver"``) runs no agent and makes no clone:
:meth:`TaskRunner._deliver` fetches the quarantined commit into an empty private git directory,
checks it is exactly the token's ``deliver_sha``, pushes it to ``<prefix>/<task id>`` and opens the
pull request (draft when the result needed approval).

The worker settles nothing itself: it reports the outcome (``report.result``) and the broker
applies it if its ledger says this run is still the live one. While the agent runs,
``should_stop`` is polled every 0.25 s: the run's lease (:class:`workers.lease.LeaseKeeper`),
which the broker stops renewing on revocation or freeze, so a run ends within seconds of either
and at the latest when its last lease runs out. The agent's whole process group is gone when
the agent adapter returns. A run that did not succeed ends its RQ job as failed, with the reason.

Everything of a run lives in one run directory under the worker's run root
(:mod:`workers.rundirs`): the work tree (with the agent's throwaway ``.git``), the worker's
private git directory, the agent's HOME and inputs, the trees required checks run on. Every
process of the agent is gone when the agent adapter returns (the sandbox's pid namespace is
killed).

The agent's environment is built here from scratch: ``LANG``/``LC_ALL``/``TZ`` if the worker
has them, ``PATH``, ``INTAKE_TASK_ID`` and the repo's ``agent_env`` secrets (the sandbox adds
``HOME``, ``TMPDIR`` and the prompt file). Nothing else of the worker's environment (Redis URL,
key paths, other repos' credentials, the push credential) reaches it. Required checks get the
same minus ``agent_env``, and never the network. Every result and settling event records
``sandbox`` (``bwrap`` or ``none``) and ``network``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from rq.timeouts import JobTimeoutException

from intake.core.errors import ConfigError, IntakeError
from intake.core.models import TaskSpec, TaskState
from intake.protocol.envelope import (
    NOTES_REF,
    digest_of,
    open_envelope,
    pull_request_provenance,
    subject_commit,
)

from .agents import TASK_ID_ENV, AgentError, AgentResult, build_prompt
from .checks import describe_failure, run_checks
from .claim import Claim, Claimer
from .config import RepoConfig, WorkerConfig
from .deps.gate import check_dependency_change
from .egress import EgressError, parse_allowlist
from .forge import ForgeError, create_pull_request
from .gates import run_gates
from .lease import LeaseKeeper
from .refusal import JobRefused
from .rundirs import RunRoot
from .sandbox import Network, RunLimits, SandboxError
from .workspace import GitError, Workspace

log = logging.getLogger("intake.worker")

#: What of the worker's own environment an agent may see.
ENV_ALLOWLIST = ("LANG", "LC_ALL", "TZ")
#: How much of the agent's output is kept on the task (the capture itself is the spec's cap).
OUTPUT_TAIL_CHARS = 4000
#: At most this many changed paths are listed in the result.
MAX_LISTED_FILES = 100
#: At most this many changed paths are reported for the broker's privileged-paths check; a
#: longer list is reported incomplete, and the broker then asks for a result approval.
MAX_REPORTED_PATHS = 1000
POLL_INTERVAL_S = 0.25


def network_for(repo: RepoConfig | None, spec: TaskSpec) -> Network:
    """The agent's network: the host's if the worker config opts the repo into it (recorded on
    every run), else the spec's egress allowlist through the proxy, else none."""
    if repo is not None and repo.network == "host":
        return "host"
    return "egress" if spec.egress else "none"


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with every secret of four or more characters replaced by ``***``."""
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


@dataclass
class Outcome:
    """How a run should be settled; ``state`` None means: write nothing (revoked or lost)."""

    state: TaskState | None
    reason: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    #: Every changed path (old and new), for the broker's privileged-paths decision.
    paths: list[str] | None = None


class _Stopper:
    """The agent's ``should_stop``: the run's lease is lost (refused or run out)."""

    def __init__(self, lease: LeaseKeeper) -> None:
        self.lease = lease
        self.why: str | None = None

    def __call__(self) -> bool:
        if self.why is None and self.lease.lost:
            self.why = self.lease.why or "lost"
        return self.why is not None


class TaskRunner:
    """Runs claimed tasks for one worker."""

    def __init__(self, claimer: Claimer, config: WorkerConfig, runs: RunRoot | None = None) -> None:
        self.claimer = claimer
        self.config = config
        self.agent = config.build_agent()
        self.sandbox = config.build_sandbox()
        self.runs = runs or RunRoot(config.name)

    # -- the entry point's work -------------------------------------------------------------
    def run_task(self, task_id: str, token: str, *, job_id: str, queue: str) -> dict[str, Any]:
        """Claim the task (or raise :class:`~workers.refusal.JobRefused`), run it, report it.

        Returns a one-line summary for RQ's job result (no secrets, no output) when the run
        succeeded; otherwise raises :class:`~workers.refusal.JobRefused` with the reason, so the RQ
        job ends failed and ``rq info`` shows why.
        """
        claim = self.claimer.claim(task_id, token, job_id=job_id, queue=queue)
        lease = LeaseKeeper(self.claimer, claim).start()
        # A delivery's directories are removed after its report: the broker (and the Slack
        # thread) need not wait for that. A run's go before (so its removal is not in the hop
        # between its result and its delivery, which the same worker may well take).
        with contextlib.ExitStack() as later:
            try:
                outcome = self._attempt(claim, lease, later)
            finally:
                lease.stop()
            self._report(claim, outcome)
        if outcome.state is not TaskState.SUCCEEDED:
            state = outcome.state.value if outcome.state else str(outcome.data.get("stopped", "stopped"))
            raise JobRefused(state, f"task {task_id} {state}: {outcome.reason or state}"[:500])
        return {"task": task_id, "attempt": claim.attempt, "outcome": outcome.state.value}

    def _attempt(self, claim: Claim, lease: LeaseKeeper, later: contextlib.ExitStack) -> Outcome:
        outcome = self._attempt_work(claim, lease, later)
        repo = self.config.repo(claim.task.spec.repo)
        isolation = {"sandbox": self.sandbox.mode, "network": network_for(repo, claim.task.spec)}
        egress = outcome.result.get("egress") if outcome.result else None
        if isinstance(egress, dict):  # counted per repo in the leading-indicator report
            isolation["egress_refused"] = egress.get("refused", 0)
        outcome.data.update(isolation)
        if outcome.result:
            outcome.result.update(isolation)
        return outcome

    def _attempt_work(self, claim: Claim, lease: LeaseKeeper, later: contextlib.ExitStack) -> Outcome:
        try:
            if claim.claims.kind == "deliver":
                return self._deliver(claim, lease, later)
            return self._work(claim, lease)
        except JobTimeoutException:
            return Outcome(TaskState.FAILED, "the run exceeded the worker's job timeout")
        except (GitError, AgentError, SandboxError, ConfigError) as exc:
            return Outcome(TaskState.FAILED, str(exc))
        except IntakeError as exc:
            return Outcome(TaskState.FAILED, f"the run failed: {exc}")
        except Exception as exc:  # still report: a crash must not leave the task running
            log.exception("task %s: unexpected error in the worker", claim.task.id)
            return Outcome(TaskState.FAILED, f"internal error in the worker: {type(exc).__name__}")

    def _report(self, claim: Claim, outcome: Outcome) -> None:
        """Tell the broker how the run ended; it applies it if the run is still the live one."""
        if outcome.state is None:
            return  # stopped: already reported by _stopped
        paths = {} if outcome.paths is None else {
            "paths": outcome.paths[:MAX_REPORTED_PATHS], "paths_complete": len(outcome.paths) <= MAX_REPORTED_PATHS}
        self.claimer.reporter.send(
            "report.result", claim.task.id, attempt=claim.attempt, run=claim.run_id, state=outcome.state.value,
            reason=outcome.reason, result=outcome.result or None, summary=outcome.data, **paths,
        )

    # -- the run itself ---------------------------------------------------------------------
    @staticmethod
    def _secrets(repo: RepoConfig) -> tuple[str | None, dict[str, str]]:
        credential = repo.credential.read() if repo.credential is not None else None
        return credential, {name: source.read() for name, source in repo.agent_env.items()}

    @staticmethod
    def agent_env(task_id: str, agent_secrets: dict[str, str] | None = None) -> dict[str, str]:
        """The agent's environment (see the module docstring); checks get it without secrets."""
        env = {name: os.environ[name] for name in ENV_ALLOWLIST if os.environ.get(name)}
        env["PATH"] = os.environ.get("PATH", "")
        env.update(agent_secrets or {})
        env[TASK_ID_ENV] = task_id
        return env

    def _stopped(self, claim: Claim, why: str, tail: str = "") -> Outcome:
        """The run was stopped because the broker stopped renewing its lease (revoked, frozen,
        superseded) or the lease ran out: the run reports that it stopped and settles nothing."""
        self.claimer.reporter.send("report.stopped", claim.task.id, attempt=claim.attempt, run=claim.run_id, why=why)
        return Outcome(None, data={"stopped": why})

    def _work(self, claim: Claim, lease: LeaseKeeper) -> Outcome:
        task = claim.task
        spec = task.spec
        repo = self.config.repo(spec.repo)
        if repo is None:  # checked at claim time; the config cannot change under a run
            raise IntakeError(f"no repo {spec.repo} in the worker config")
        stop = _Stopper(lease)
        credential, agent_secrets = self._secrets(repo)
        secrets = [s for s in (credential, *agent_secrets.values()) if s]
        with self.runs.run() as run_dir, Workspace.clone(
            repo.url, spec.base_ref, credential, username=repo.username, ca_file=repo.ca_file, root=run_dir,
        ) as ws:
            if stop():
                return self._stopped(claim, stop.why or "stopped")
            branch = f"{spec.branch_prefix}/{task.id}"
            ws.create_branch(branch)
            ws.give_agent_git()
            prompt = build_prompt(
                spec.prompt, task_id=task.id, repo=spec.repo, change_type=spec.change_type,
                allowed_paths=spec.allowed_paths, blocked_paths=spec.blocked_paths,
            )
            network = network_for(repo, spec)
            try:
                allowlist = parse_allowlist(spec.egress) if network == "egress" else ()
            except EgressError as exc:
                raise ConfigError(f"the spec's egress allowlist: {exc}") from None
            ran: AgentResult = self.agent.run(
                self.sandbox.with_network(network, allowlist), workdir=ws.path,
                home=RunRoot.private(run_dir, "home"), inputs=RunRoot.private(run_dir, "inputs"),
                prompt=prompt, env=self.agent_env(task.id, agent_secrets),
                timeout_s=spec.limits.run_timeout_s, max_output_bytes=spec.limits.max_output_bytes,
                should_stop=stop, poll_interval=POLL_INTERVAL_S,
                limits=RunLimits(spec.limits.max_disk_bytes, spec.limits.max_processes),
            )
            tail = redact(ran.output_tail, secrets)[-OUTPUT_TAIL_CHARS:]
            base = {"output_tail": tail, "output_truncated": ran.output_truncated, "worker": self.claimer.name}
            if ran.egress is not None:
                base["egress"] = ran.egress
            if ran.stopped:
                return self._stopped(claim, stop.why or "stopped", tail)
            if ran.limit is not None:
                return Outcome(TaskState.BLOCKED, f"stopped at a limit: {ran.limit_reason}",
                               {**base, "limit": ran.limit, "pushed": False}, {"limit": ran.limit})
            if ran.timed_out:
                return Outcome(TaskState.FAILED,
                               f"the agent timed out after {spec.limits.run_timeout_s}s", base)
            if not ran.ok:
                return Outcome(TaskState.FAILED, f"the agent exited with status {ran.exit_code}", base)
            commit = ws.commit_all(
                f"intake: {spec.change_type} for {task.id}\n\n"
                f"Idea: {task.idea_id}\nSpec: {task.spec_hash}\n"
            )
            if commit is None:
                return Outcome(TaskState.FAILED, "the agent made no changes", base)
            changed = ws.changed_files()
            files = [c.path for c in changed][:MAX_LISTED_FILES]
            # Trusted copies only: the base as snapshotted before the agent ran, the result as
            # the worker read it from the work tree (workers/snapshot.py); the policy the task
            # was approved under (checked at claim time).
            deps = check_dependency_change(changed, ws.read_base, ws.read_head, claim.policy.dependencies)
            base["dependencies"] = deps.result()
            reasons = run_gates(
                changed=changed, branch=branch, branch_prefix=spec.branch_prefix,
                change_type=spec.change_type, change_type_paths=spec.change_type_paths,
                allowed_paths=spec.allowed_paths, blocked_paths=spec.blocked_paths,
                dependency_reasons=deps.reasons,
            ) + ws.special_entries()
            if reasons:
                shown = "; ".join(reasons[:3]) + (f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else "")
                return Outcome(
                    TaskState.BLOCKED, f"blocked by the gates: {shown}",
                    {**base, "gates": reasons, "commit": commit, "files": files, "pushed": False},
                    {"gates": len(reasons)},
                )
            checks = run_checks(self.sandbox, ws, run_dir, spec, self.agent_env(task.id), stop, secrets)
            if stop.why is not None:
                return self._stopped(claim, stop.why, tail)
            failing = [c for c in checks if not c["ok"]]
            base["checks"] = checks
            if failing:
                shown = "; ".join(describe_failure(c) for c in failing)
                return Outcome(TaskState.BLOCKED, f"blocked by required checks: {shown}",
                               {**base, "commit": commit, "files": files, "pushed": False},
                               {"checks_failed": len(failing)})
            # Last look before anything leaves the worker.
            if stop():
                return self._stopped(claim, stop.why or "lost", tail)
            # Quarantine: a non-branch ref that forge CI does not run on. The broker decides
            # from the policy whether the result waits for approval or is delivered now.
            quarantine = f"refs/intake/{task.id}"
            pushed = ws.quarantine(quarantine)
            added, removed = ws.numstat()
            # What an approver reviews (issue 20): the diff from the worker's trusted objects,
            # bounded, with its SHA-256; the broker stores it and a result approval binds to it.
            result = {**base, "commit": pushed, "tree": ws.tree_of(pushed), "base": ws.base_sha,
                      "quarantine": quarantine, "files": files, "files_changed": len(changed),
                      "additions": added, "deletions": removed, "gates": "passed", "review": ws.review()}
            paths = sorted({p for c in changed for p in (c.path, c.old_path) if p})
            return Outcome(TaskState.SUCCEEDED, None, result,
                           {"commit": pushed, "files_changed": len(changed), "additions": added,
                            "deletions": removed}, paths)

    def _deliver(self, claim: Claim, lease: LeaseKeeper, later: contextlib.ExitStack) -> Outcome:
        """A delivery: push the quarantined commit the token names (verified to be exactly
        that sha) to ``<prefix>/<task id>`` and open the pull request. No agent runs. Its
        directories are removed when ``later`` closes (after the report)."""
        task, spec = claim.task, claim.task.spec
        sha = claim.claims.deliver_sha
        repo = self.config.repo(spec.repo)
        if repo is None or sha is None:
            raise IntakeError(f"no repo {spec.repo} in the worker config")
        stop = _Stopper(lease)
        credential, _ = self._secrets(repo)
        secrets = [s for s in (credential,) if s]
        run_dir = later.enter_context(self.runs.run())
        ws = later.enter_context(Workspace.for_delivery(
            repo.url, credential, object_format="sha256" if len(sha) == 64 else "sha1",
            username=repo.username, ca_file=repo.ca_file, root=run_dir,
        ))
        if stop():
            return self._stopped(claim, stop.why or "stopped")
        branch = f"{spec.branch_prefix}/{task.id}"
        envelope = self._provenance(claim, sha)
        claims = claim.claims
        reviewed = (claims.deliver_base, claims.deliver_diff) if claims.deliver_base and claims.deliver_diff else None
        pushed = ws.deliver(f"refs/intake/{task.id}", sha, branch, note=envelope, reviewed=reviewed,
                            base_ref=spec.base_ref)
        result: dict[str, Any] = {"branch": branch, "commit": pushed, "pr_url": None, "delivered_by": self.claimer.name,
                                  "provenance": {"notes_ref": NOTES_REF, "envelope_sha256": digest_of(envelope)}}
        if repo.forge is not None and not stop():  # no pull request for a task revoked meanwhile
            result.update(self._pull_request(repo, task.id, branch, spec.base_ref, spec.change_type,
                                             task.spec_hash, secrets, draft=claim.claims.draft,
                                             provenance=envelope))
        return Outcome(TaskState.SUCCEEDED, None, result,
                       {"branch": branch, "pr_url": result["pr_url"], "draft": claim.claims.draft})

    def _provenance(self, claim: Claim, sha: str) -> str:
        """The broker's signed provenance the delivery token carries, checked again here (the
        signature with the public keys, the subject is ``sha``) before it is published."""
        envelope = claim.claims.provenance
        if envelope is None:
            raise IntakeError("the delivery token carries no provenance; nothing is delivered without it")
        statement, _ = open_envelope(envelope, self.claimer.keyring())
        if subject_commit(statement) != sha:
            raise IntakeError("the delivery's provenance names another commit")
        return envelope

    def _pull_request(self, repo: RepoConfig, task_id: str, branch: str, base: str, change_type: str,
                      spec_hash: str, secrets: list[str], *, draft: bool = False,
                      provenance: str = "") -> dict[str, Any]:
        assert repo.forge is not None
        try:
            token = repo.forge.token.read()
            url = create_pull_request(
                api_url=repo.forge.api_url, repository=repo.forge.repository, token=token,
                title=f"intake {task_id}: {change_type}", head=branch, base=base, draft=draft,
                # Deliberately no idea text: it is untrusted and would be rendered (mentions, links).
                body=f"Opened by an intake worker for task {task_id}.\n\nSpec hash: `{spec_hash}`\n"
                     + pull_request_provenance(provenance),
            )
        except (ForgeError, ConfigError) as exc:
            return {"pr_url": None, "pr_error": redact(str(exc), secrets)}
        return {"pr_url": url}
