"""Signed provenance for every delivered change: an in-toto Statement in a DSSE envelope.

When the broker dispatches a delivery (:meth:`intake.tasks.dispatch.Dispatcher.enqueue`, the commit
is known: the quarantined result the sealed history names) it builds an in-toto Statement v1
whose subject is that commit (``gitCommit``) and its tree (``gitTree``), with predicate type
:data:`PREDICATE_TYPE`, signs it in a DSSE envelope with its Ed25519 signing key (``keyid`` =
the key's kid), records ``provenance.issued`` (task, commit, envelope and statement SHA-256) on
the audit log in the same MULTI as the dispatch, and stores the envelope in Redis. The delivery
token carries the envelope; the worker attaches it as a git note on :data:`NOTES_REF` for the
commit, pushes the notes ref atomically with the branch, and embeds it in the pull request.

The predicate is built from the **sealed audit log alone** (:func:`gather`): the task's
creation (idea, repo, change type, spec hash, policy version, tier), the idea's capture
(channel, text hash, requester), the counted approvals, the run's dispatch token and claim
(worker, sandbox), the worker's own MAC'd result report (tree, base, gates, checks, SBOM digest)
and the result approvals; only the idea's channel provenance (MAC-checked on the idea record)
and the spec body (whose hash the log names) come from records. Verification
(``intake provenance verify``) therefore checks the signature with the public key alone, that
the subject is the commit, and then rebuilds the same predicate from the sealed log and compares
every fact (:func:`compare`): a forged, rewritten or re-signed envelope disagrees somewhere.

**Inclusion proofs.** The same walk computes the RFC 9162 Merkle tree over every sealed entry
(the tree the archive's signed tree heads are over, :mod:`intake.audit.archive`), and the
broker's answer (:func:`lookup`) carries a tree head over the whole log signed with its Ed25519
key and, for each approval of the task's spec, the entry itself and its inclusion proof.
:func:`verify` checks the tree head with the public key and each proof against its root, and that
every approval the statement names is one of the proven entries: the approvals are in the log
anyone can check, not only in the broker's say-so.

The envelope's format (DSSE, in-toto) is the wire's: :mod:`intake.protocol.envelope`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from intake.audit import merkle
from intake.audit.archive import TreeHead, entry_line
from intake.audit.log import OK, Anomaly, AuditLog, SealedEntry
from intake.core.models import Task, TaskSpec, canonical_json
from intake.protocol.envelope import (
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    ProvenanceInvalid,
    digest_of,
    open_envelope,
    sign_statement,
    subject_commit,
)
from intake.protocol.tokens import Keyring
from intake.tasks.handle import BrokerHandle

#: Predicate parts the sealed log cannot speak to (signed by the broker after it checked the
#: idea record's MAC and the record's spec against the spec hash the log names).
RECORD_PATHS = (
    "predicate.buildDefinition.externalParameters.idea.provenance",
    "predicate.buildDefinition.externalParameters.idea.rawSha256",
    "predicate.buildDefinition.externalParameters.spec",
)
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


# -- facts from the sealed log ---------------------------------------------------------------
@dataclass
class LogFacts:
    """What the sealed audit log says about one task's delivered commit (see :func:`gather`)."""

    task: str
    commit: str
    created: dict[str, Any] | None = None
    idea: dict[str, Any] | None = None
    approvals: list[dict[str, Any]] = field(default_factory=list)
    result_approvals: list[dict[str, Any]] = field(default_factory=list)
    running: dict[str, Any] | None = None
    dispatch: dict[str, Any] | None = None
    settled: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    issued: list[dict[str, Any]] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    leaves: list[bytes] = field(default_factory=list, repr=False)  # every sealed entry's Merkle leaf
    approval_entries: list[tuple[int, bytes]] = field(default_factory=list, repr=False)  # (index, line)

    def missing(self) -> str | None:
        """Which fact the log lacks for a statement (None when all are there)."""
        for name in ("created", "idea", "running", "dispatch", "settled", "report"):
            if getattr(self, name) is None:
                return name
        return None


def gather(audit: AuditLog, task_id: str, commit: str) -> LogFacts:
    """Walk the whole sealed chain (checking every seal) and collect the facts of ``task_id``'s
    run that produced ``commit``. Only genuine entries count: broker events sealed ``ok`` and
    the worker's own MAC'd reports sealed ``ok``; a replayed copy (a repeated ``eid``) is skipped,
    and every break in the chain is reported as an anomaly."""
    facts = LogFacts(task_id, commit)
    ideas: dict[str, dict[str, Any]] = {}
    runs: dict[str, dict[str, Any]] = {}  # the running events of the task, by run id
    dispatches: dict[str, dict[str, Any]] = {}  # run dispatches of the task, by nonce
    reports: dict[str, dict[str, Any]] = {}  # the worker's succeeded result reports, by run id
    seen: set[str] = set()
    current: dict[str, Any] = {}

    def on_entry(sealed: SealedEntry) -> None:
        line = entry_line(sealed.seq, sealed.id, sealed.fields, sealed.verdict, sealed.seal)
        facts.leaves.append(merkle.leaf_hash(line))
        if sealed.verdict != OK:
            return
        ev = sealed.event
        if ev is None:
            if sealed.fields.get("k") == "w":
                _report(sealed.fields.get("e", ""))
            return
        if ev.eid in seen:
            return  # a replayed copy (sealed ok only if the sealer's index was tampered): skipped
        seen.add(ev.eid)
        data, action = ev.data, ev.action
        if action == "idea.captured":
            ideas[ev.subject] = {"id": ev.subject, "channel": data.get("channel"),
                                 "textSha256": data.get("text_sha256"), "requester": ev.actor}
            return
        if ev.subject != task_id:
            return
        if action in ("task.created", "task.amended"):
            base = facts.created or {}
            facts.created = {**base, **{k: data.get(k) for k in
                                        ("idea", "repo", "change_type", "spec_hash", "policy_version", "tier")
                                        if k in data or k not in base}}
            facts.approvals = []
            facts.approval_entries = []
        elif action == "approval.recorded" and facts.created and facts.running is None:
            if data.get("spec_hash") == facts.created.get("spec_hash"):
                facts.approvals.append(_approval(ev.actor, ev.at, data))
                facts.approval_entries.append((len(facts.leaves) - 1, line))
        elif action == "task.dispatched" and data.get("kind", "run") == "run":
            dispatches[str(data.get("nonce"))] = {"kind": "run", "job": data.get("job"),
                                                  "tokenId": data.get("nonce"), "kid": data.get("kid"),
                                                  "queue": data.get("queue")}
        elif action == "task.running":
            current.clear()
            current.update(data, at=ev.at)
            runs[str(data.get("run"))] = dict(current)
        elif (action in ("task.delivering", "task.awaiting_result_approval") and "run" in data
              and data.get("commit") == commit and facts.settled is None):
            facts.settled = {**data, "at": ev.at}
            facts.running = runs.get(str(data.get("run")))
            if facts.running is not None:
                facts.dispatch = dispatches.get(str(facts.running.get("nonce")))
        elif action == "result.approved" and facts.settled is not None and data.get("sha") == commit:
            facts.result_approvals.append(_approval(ev.actor, ev.at, data))
        elif action == "provenance.issued" and data.get("commit") == commit:
            facts.issued.append(dict(data))

    def _report(body: str) -> None:
        try:
            report = json.loads(body)
        except ValueError:
            return
        d = report.get("data") if isinstance(report, dict) else None
        if (isinstance(d, dict) and report.get("action") == "report.result" and report.get("task") == task_id
                and d.get("state") == "succeeded" and isinstance(d.get("result"), dict)):
            reports[str(d.get("run"))] = {**d["result"], "w": report.get("w")}

    def on_anomaly(anomaly: Anomaly) -> None:
        if anomaly.fatal:
            facts.anomalies.append(anomaly.message)

    audit.follow(None, on_entry, on_anomaly)
    if facts.created is not None:
        facts.idea = ideas.get(str(facts.created.get("idea")))
    if facts.running is not None:
        facts.report = reports.get(str(facts.running.get("run")))
    facts.approvals = _first_per_person(facts.approvals)
    facts.result_approvals = _first_per_person(facts.result_approvals)
    return facts


def _approval(actor: str, at: float, data: dict[str, Any]) -> dict[str, Any]:
    via = str(data.get("via", "cli"))
    return {"person": actor.removeprefix("approver:"), "time": _iso(at),
            "factor": "passkey" if via.endswith("+passkey") else "totp", "via": via}


def _first_per_person(approvals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    return [a for a in approvals if not (a["person"] in seen or seen.add(a["person"]))]  # type: ignore[func-returns-value]


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- the statement ---------------------------------------------------------------------------
def spec_view(spec: TaskSpec) -> dict[str, Any]:
    """The spec as the predicate shows it: every field, the prompt (untrusted idea text) only as
    its hash, so the attestation can be published (git note, pull request) as it is."""
    body = spec.model_dump(mode="json")
    prompt = body.pop("prompt")
    return {**body, "promptSha256": digest_of(prompt)}


def _egress(facts: Any) -> dict[str, Any] | None:
    """The run's egress facts as the worker reported them (None: the agent had no allowlist)."""
    if not isinstance(facts, dict):
        return None
    attempts = facts.get("attempts") if isinstance(facts.get("attempts"), list) else []
    return {"allowlist": facts.get("allowlist"), "allowed": facts.get("allowed"), "refused": facts.get("refused"),
            "bytesUp": facts.get("bytes_up"), "bytesDown": facts.get("bytes_down"),
            "attempts": [{"host": a.get("host"), "port": a.get("port"), "allowed": a.get("allowed"),
                          "reason": a.get("reason"), "bytesUp": a.get("bytes_up"), "bytesDown": a.get("bytes_down")}
                         for a in attempts if isinstance(a, dict)]}


def build_statement(facts: LogFacts, record: dict[str, Any] | None) -> dict[str, Any]:
    """The in-toto Statement v1 for ``facts`` (complete: see :meth:`LogFacts.missing`).
    ``record`` holds the parts under :data:`RECORD_PATHS` (None: left null, for comparing)."""
    assert facts.created and facts.idea and facts.running and facts.dispatch and facts.settled and facts.report
    created, run, report = facts.created, facts.running, facts.report
    record = record or {}
    deps = report.get("dependencies") if isinstance(report.get("dependencies"), dict) else {}
    sbom = deps.get("sbom_sha256") if isinstance(deps.get("sbom_sha256"), str) else None
    checks = report.get("checks") if isinstance(report.get("checks"), list) else []
    predicate = {
        "buildDefinition": {
            "buildType": PREDICATE_TYPE,
            "externalParameters": {
                "task": facts.task,
                "idea": {**facts.idea, "provenance": record.get("provenance"), "rawSha256": record.get("raw_sha256")},
                "repo": created.get("repo"), "changeType": created.get("change_type"),
                "specHash": created.get("spec_hash"), "policyVersion": created.get("policy_version"),
                "spec": record.get("spec"),
            },
            "internalParameters": {"riskTier": created.get("tier"), "queue": facts.dispatch.get("queue")},
            "resolvedDependencies": [{"uri": f"intake:repo/{created.get('repo')}",
                                      "digest": {"gitCommit": report.get("base")}}],
        },
        "runDetails": {
            "builder": {"id": f"intake:worker/{report.get('w')}"},
            "metadata": {"invocationId": f"{facts.task}/{run.get('attempt')}/{run.get('run')}",
                         "startedOn": _iso(run["at"]), "finishedOn": _iso(facts.settled["at"])},
        },
        "approvals": facts.approvals,
        "resultApprovals": facts.result_approvals,
        "dispatch": [{k: facts.dispatch.get(k) for k in ("kind", "job", "tokenId", "kid")}],
        "worker": {"name": report.get("w"), "claimedAs": run.get("worker")},
        "sandbox": {"mode": report.get("sandbox"), "network": report.get("network")},
        "egress": _egress(report.get("egress")),
        "gates": report.get("gates"),
        "checks": [{"name": c.get("name"), "ok": c.get("ok"), "exitCode": c.get("exit_code")}
                   for c in checks if isinstance(c, dict)],
        "sbom": {"sha256": sbom} if sbom else {"dependencyChanges": False},
    }
    return {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": f"{created.get('repo')}", "digest": {"gitCommit": facts.commit}},
            {"name": f"{created.get('repo')}^{{tree}}", "digest": {"gitTree": report.get("tree")}},
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }


def compare(statement: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One line per fact where ``statement`` disagrees with ``expected`` (the statement the
    sealed log gives, :func:`build_statement` with no record), parts under
    :data:`RECORD_PATHS` aside."""
    ours, theirs = _flatten(statement), _flatten(expected)
    failures = []
    for path in sorted(set(ours) | set(theirs)):
        if any(path == p or path.startswith(p + ".") or path.startswith(p + "[") for p in RECORD_PATHS):
            continue
        if path not in theirs:
            failures.append(f"{path}: {_show(ours[path])} is not in the sealed audit log")
        elif path not in ours:
            failures.append(f"{path}: missing; the sealed audit log says {_show(theirs[path])}")
        elif ours[path] != theirs[path]:
            failures.append(f"{path}: {_show(ours[path])}, but the sealed audit log says {_show(theirs[path])}")
    return failures


def _flatten(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{path}.{key}" if path else str(key)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{path}[{i}]"))
        return out
    return {path: value}


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True)[:80]


# -- the broker's side -----------------------------------------------------------------------
@dataclass(frozen=True)
class Issued:
    """An envelope the broker signed, with the digests ``provenance.issued`` records."""

    task: str
    commit: str
    envelope: str
    envelope_sha256: str
    statement_sha256: str


def issue(broker: BrokerHandle, task: Task, commit: str) -> Issued:
    """Build and sign the statement for delivering ``commit`` of ``task`` (a record the caller
    has checked against the ledger). Raises :class:`ProvenanceInvalid` when the sealed log
    lacks a fact or the idea record fails its integrity check: then nothing is delivered."""
    from intake.storage.store import idea_fields

    facts = gather(broker.audit, task.id, commit)
    if facts.anomalies:
        raise ProvenanceInvalid("audit_broken", f"the audit chain is broken: {facts.anomalies[0]}")
    if (missing := facts.missing()) is not None:
        raise ProvenanceInvalid("incomplete", f"the sealed log has no {missing} fact for {task.id} at {commit[:12]}")
    if (why := _not_quarantined(broker, task.id, commit, facts)) is not None:
        raise ProvenanceInvalid("not_quarantined", why)
    idea = broker.store.get_idea(task.idea_id)
    if idea.id != (facts.created or {}).get("idea") or not broker.audit.record_ok("idea", idea_fields(idea), idea.mac):
        raise ProvenanceInvalid("tampered", f"idea {task.idea_id} failed its integrity check")
    record = {"provenance": dict(idea.provenance), "raw_sha256": idea.raw_sha256, "spec": spec_view(task.spec)}
    statement = build_statement(facts, record)
    envelope = sign_statement(broker.signer, statement)
    return Issued(task.id, commit, envelope, digest_of(envelope), digest_of(canonical_json(statement)))


def _not_quarantined(broker: BrokerHandle, task_id: str, commit: str, facts: LogFacts) -> str | None:
    """Why ``commit`` is not the task's quarantined result, or None (issue 19). The broker signs
    provenance only for the commit its ledger names as the result, which the worker that
    claimed that very run reported (MAC'd with its own key, sealed) as pushed to the task's
    quarantine ref; the delivery worker then checks the ref holds exactly that commit."""
    fact = broker.ledger.follow().task(task_id)
    if fact is None or fact.result_commit != commit:
        return f"{commit[:12]} is not the result the sealed history names for {task_id}"
    report, running = facts.report or {}, facts.running or {}
    if not running.get("worker") or report.get("w") != running.get("worker"):
        return f"the result report for {task_id} is not from the worker that claimed the run"
    if report.get("commit") != commit or report.get("quarantine") != f"refs/intake/{task_id}":
        return f"the claiming worker did not report {commit[:12]} as quarantined at refs/intake/{task_id}"
    return None


def record_issued(broker: BrokerHandle, pipe: Any, issued: Issued) -> None:
    """Queue ``provenance.issued`` and the stored envelope on ``pipe`` (inside its MULTI)."""
    broker.store.emit(pipe, "system", "provenance.issued", issued.task, task=issued.task, commit=issued.commit,
                      envelope_sha256=issued.envelope_sha256, statement_sha256=issued.statement_sha256)
    pipe.set(envelope_key(broker.store.keys.p, issued.commit), issued.envelope)


def envelope_key(prefix: str, commit: str) -> str:
    return f"{prefix}:provenance:{commit}"


def lookup(broker: BrokerHandle, ref: str) -> dict[str, Any]:
    """What the broker knows of a delivered commit (``ref``: a full SHA, or a task branch
    ``<prefix>/T-…``): the task, the stored envelope, the statement the sealed log gives and
    the envelope digests it issued. For ``intake provenance show/verify``."""
    from intake.core.errors import InvalidInput, NotFound

    ledger = broker.ledger.follow()
    if _SHA.fullmatch(ref):
        found = [f for f in list(ledger.tasks.values()) if f.result_commit == ref]
    else:
        name = ref.rsplit("/", 1)[-1]
        if not re.fullmatch(r"T-[A-Za-z0-9]{1,40}", name):
            raise InvalidInput(f"{ref!r} is neither a full commit sha nor a task branch")
        fact = ledger.task(name)
        found = [fact] if fact is not None and fact.result_commit else []
    if not found:
        raise NotFound(f"no delivered change for {ref}")
    fact = found[0]
    commit = str(fact.result_commit)
    facts = gather(broker.audit, fact.id, commit)
    stored = broker.store.r.get(envelope_key(broker.store.keys.p, commit))
    return {
        "task": fact.id, "commit": commit, "state": fact.state.value,
        "envelope": stored if isinstance(stored, str) else None,
        "expected": build_statement(facts, None) if facts.missing() is None else None,
        "missing": facts.missing(),
        "issued": sorted({str(i.get("envelope_sha256")) for i in facts.issued}),
        "anomalies": facts.anomalies,
        "inclusion": inclusion(broker, facts) if facts.leaves else None,
    }


def inclusion(broker: BrokerHandle, facts: LogFacts) -> dict[str, Any]:
    """A tree head over the whole sealed log, signed now, and each approval entry of the task
    with its inclusion proof in that tree."""
    frontier = merkle.Frontier()
    for leaf in facts.leaves:
        frontier.append(leaf)
    signer = broker.signer
    head = TreeHead(size=frontier.size, root=frontier.root(), at=time.time(), last="", frontier=frontier,
                    kid=signer.kid, sig=b"")
    head = TreeHead(**{**head.__dict__, "sig": signer.sign_bytes(head.body())})
    return {"tree_head": head.encode().decode(),
            "entries": [{"index": index, "line": line.decode(),
                         "proof": [p.hex() for p in merkle.inclusion_proof(index, facts.leaves)]}
                        for index, line in facts.approval_entries]}


def verify_inclusion(statement: dict[str, Any], found: Any, keyring: Keyring) -> tuple[str | None, list[str]]:
    """Check the approvals' inclusion proofs (see the module docstring): (a one-line summary
    when they hold, one line per failure)."""
    if not isinstance(found, dict):
        return None, ["inclusion: the broker gave no inclusion proof of the approvals"]
    try:
        head = TreeHead.decode(str(found["tree_head"]).encode())
        entries = list(found["entries"])
    except (ValueError, KeyError, TypeError):
        return None, ["inclusion: the tree head or proofs are malformed"]
    if not head.verify(keyring.keys):
        return None, ["inclusion: the tree head is not signed by the broker's public key"]
    proven: set[str] = set()
    task = statement.get("predicate", {}).get("buildDefinition", {}).get("externalParameters", {}).get("task")
    for item in entries:
        try:
            line = str(item["line"]).encode()
            proof = [bytes.fromhex(p) for p in item["proof"]]
            index = int(item["index"])
            entry = json.loads(line)
            event = json.loads(entry["f"]["e"])
        except (ValueError, KeyError, TypeError):
            return None, ["inclusion: a proven entry is malformed"]
        if not merkle.verify_inclusion(index, head.size, merkle.leaf_hash(line), proof, head.root):
            return None, [f"inclusion: entry #{index + 1}'s proof does not verify against the signed tree head"]
        if (entry.get("verdict") == OK and event.get("action") == "approval.recorded"
                and event.get("subject") == task and str(event.get("actor", "")).startswith("approver:")):
            proven.add(str(event["actor"]).removeprefix("approver:"))
    named = {str(a.get("person")) for a in statement.get("predicate", {}).get("approvals", []) if isinstance(a, dict)}
    if not named or not named <= proven:
        return None, [f"inclusion: approvals by {', '.join(sorted(named - proven)) or 'nobody'} are not proven "
                      "in the signed tree"]
    return (f"{len(named)} approval(s) proven in the log's Merkle tree of {head.size} entries "
            f"(tree head signed by {head.kid})"), []


def verify(envelope: str, keyring: Keyring, *, commit: str, known: dict[str, Any],
           tree: str | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """Every check of ``intake provenance verify``: (statement or None, one line per failure).

    The signature with the public keys alone, the subject against ``commit`` (and ``tree``
    when the repository was read), then the broker's sealed-log view ``known`` (from
    :func:`lookup`): the chain is intact, this very envelope was issued, and every fact of the
    predicate is the log's."""
    try:
        statement, _ = open_envelope(envelope, keyring)
    except ProvenanceInvalid as exc:
        return None, [f"signature: {exc}"]
    failures = []
    named = subject_commit(statement)
    if named != commit:
        failures.append(f"subject: the statement is for commit {str(named)[:40]}, not {commit}")
    if tree is not None:
        trees = [i.get("digest", {}).get("gitTree") for i in statement["subject"] if isinstance(i, dict)]
        if tree not in trees:
            failures.append(f"subject: the commit's tree {tree} is not the statement's")
    failures += [f"audit log: {a}" for a in known.get("anomalies", [])]
    if known.get("commit") != commit:
        failures.append(f"audit log: the delivered commit of {known.get('task')} is {known.get('commit')}")
    if digest_of(envelope.strip()) not in known.get("issued", []):
        failures.append("issued: the broker never issued this envelope (no provenance.issued with its sha256)")
    summary, missing = verify_inclusion(statement, known.get("inclusion"), keyring)
    failures += missing
    if summary is not None:
        known["inclusion_verified"] = summary
    expected = known.get("expected")
    if expected is None:
        failures.append(f"audit log: no {known.get('missing')} fact for the task's run")
    else:
        failures += [f"predicate {line}" if line.startswith("predicate") else f"statement {line}"
                     for line in compare(statement, expected)]
    return statement, failures

