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

**Inclusion proofs, in the note.** The same walk computes the RFC 9162 Merkle tree over every
sealed entry (the tree the archive's signed tree heads are over, :mod:`intake.audit.archive`).
The approvals are sealed before the delivery is dispatched, so :func:`issue` signs a tree head
over the whole sealed log as it stands (its size and root are recorded on ``provenance.issued``)
and embeds it in the statement as ``predicate.logInclusion``: the tree head, and for each
approval of the task's spec its leaf index, the entry itself (its canonical archive line, the
Merkle leaf's data) and its inclusion path. :func:`check_note` checks it with the public key
alone (no broker, no Redis): the tree head's signature, each path against its root, and that
every approver the statement names is in a proven, genuine ``approval.recorded`` entry of this
task and spec. Online, the broker also answers with its current signed tree head and an RFC 9162
consistency proof from the note's tree head to it (:func:`lookup`), so a tree head signed over a
history the broker's log does not extend (a split view, a rewritten log) fails. Notes issued
before the proof was embedded are proven with the broker's fresh proof instead (online only).

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
#: The embedded inclusion proof: checked by :func:`check_inclusion` (a tree head signed at issue
#: time cannot be rebuilt from the log later, only proven consistent with it).
INCLUSION_PATH = "predicate.logInclusion"
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
    last: str = ""  # the last sealed entry walked, "id seq seal" (a tree head names it)
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
        facts.last = f"{sealed.id} {sealed.seq} {sealed.seal}"
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
        if any(path == p or path.startswith(p + ".") or path.startswith(p + "[")
               for p in (*RECORD_PATHS, INCLUSION_PATH)):
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
    """An envelope the broker signed, with the digests ``provenance.issued`` records and the
    tree head its inclusion proof is against."""

    task: str
    commit: str
    envelope: str
    envelope_sha256: str
    statement_sha256: str
    tree_size: int
    tree_root: str


def issue(broker: BrokerHandle, task: Task, commit: str) -> Issued:
    """Build and sign the statement for delivering ``commit`` of ``task`` (a record the caller
    has checked against the ledger), with the approvals' inclusion proof against a tree head
    signed now. Raises :class:`ProvenanceInvalid` when the sealed log lacks a fact or the idea
    record fails its integrity check: then nothing is delivered."""
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
    proof = inclusion(broker, facts)
    statement["predicate"]["logInclusion"] = proof
    envelope = sign_statement(broker.signer, statement)
    return Issued(task.id, commit, envelope, digest_of(envelope), digest_of(canonical_json(statement)),
                  tree_size=int(proof["treeHead"]["size"]), tree_root=str(proof["treeHead"]["root"]))


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
    """Queue ``provenance.issued`` and the stored envelope on ``pipe`` (inside its MULTI). The
    event names the tree head the envelope's inclusion proof is against: every tree head the
    broker signs for provenance is itself on the sealed log."""
    broker.store.emit(pipe, "system", "provenance.issued", issued.task, task=issued.task, commit=issued.commit,
                      envelope_sha256=issued.envelope_sha256, statement_sha256=issued.statement_sha256,
                      tree_size=issued.tree_size, tree_root=issued.tree_root)
    pipe.set(envelope_key(broker.store.keys.p, issued.commit), issued.envelope)


def envelope_key(prefix: str, commit: str) -> str:
    return f"{prefix}:provenance:{commit}"


def lookup(broker: BrokerHandle, ref: str, tree_size: int | None = None) -> dict[str, Any]:
    """What the broker knows of a delivered commit (``ref``: a full SHA, or a task branch
    ``<prefix>/T-…``): the task, the stored envelope, the statement the sealed log gives, the
    envelope digests it issued, the approvals' inclusion proofs against a tree head over the
    whole sealed log signed now, and (given the ``tree_size`` of the tree head a note carries)
    the consistency proof from that tree to this one (by default, the tree head of the stored
    envelope). For ``intake provenance show/verify`` and the console."""
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
    if tree_size is None and isinstance(stored, str):
        tree_size = note_tree_size(stored, broker.keyring)
    consistency = None
    if tree_size is not None and facts.leaves:
        consistency = {"size": tree_size, "path": (
            [p.hex() for p in merkle.consistency_proof(tree_size, facts.leaves)]
            if 0 < tree_size <= len(facts.leaves) else None)}
    return {
        "task": fact.id, "commit": commit, "state": fact.state.value,
        "envelope": stored if isinstance(stored, str) else None,
        "expected": build_statement(facts, None) if facts.missing() is None else None,
        "missing": facts.missing(),
        "issued": sorted({str(i.get("envelope_sha256")) for i in facts.issued}),
        "anomalies": facts.anomalies,
        "inclusion": inclusion(broker, facts) if facts.leaves else None,
        "consistency": consistency,
    }


def note_tree_size(envelope: str | None, keyring: Keyring) -> int | None:
    """The size of the tree head an envelope's statement carries (its signature checked), or None."""
    if envelope is None:
        return None
    try:
        statement, _ = open_envelope(envelope, keyring)
        size = statement["predicate"]["logInclusion"]["treeHead"]["size"]
    except (ProvenanceInvalid, KeyError, TypeError):
        return None
    return size if isinstance(size, int) and size > 0 else None


def inclusion(broker: BrokerHandle, facts: LogFacts) -> dict[str, Any]:
    """A tree head over every sealed entry ``facts`` walked, signed now, and each approval entry
    of the task with its leaf index and RFC 9162 inclusion path in that tree (the shape
    ``predicate.logInclusion`` has)."""
    frontier = merkle.Frontier()
    for leaf in facts.leaves:
        frontier.append(leaf)
    head = TreeHead.signed(broker.signer, frontier, facts.last, time.time())
    return {"treeHead": head.as_json(),
            "entries": [{"leafIndex": index, "entry": line.decode(),
                         "inclusionPath": [p.hex() for p in merkle.inclusion_proof(index, facts.leaves)]}
                        for index, line in facts.approval_entries]}


def statement_task(statement: dict[str, Any]) -> Any:
    return statement.get("predicate", {}).get("buildDefinition", {}).get("externalParameters", {}).get("task")


def check_inclusion(statement: dict[str, Any], found: Any, keyring: Keyring
                    ) -> tuple[TreeHead | None, str | None, list[str]]:
    """Check an inclusion proof of the statement's approvals (``found``: the shape
    :func:`inclusion` gives): the tree head is signed by a key of ``keyring``, each entry's
    path leads from its leaf to the head's root, and every approver the statement names is in a
    proven entry that is a genuine ``approval.recorded`` of this task and spec hash. Returns
    (the verified tree head, a one-line summary, one line per failure)."""
    if not isinstance(found, dict):
        return None, None, ["inclusion: no inclusion proof of the approvals"]
    try:
        head = TreeHead.from_json(found["treeHead"])
        entries = list(found["entries"])
    except (ValueError, KeyError, TypeError):
        return None, None, ["inclusion: the tree head or proofs are malformed"]
    if not head.verify(keyring.keys):
        return None, None, ["inclusion: the tree head is not signed by the broker's public key"]
    proven: set[str] = set()
    ext = statement.get("predicate", {}).get("buildDefinition", {}).get("externalParameters", {})
    for item in entries:
        try:
            line = str(item["entry"]).encode()
            path = [bytes.fromhex(p) for p in item["inclusionPath"]]
            index = item["leafIndex"]
            entry = json.loads(line)
            event = json.loads(entry["f"]["e"])
            data = event.get("data") or {}
            if not isinstance(index, int) or isinstance(index, bool) or not isinstance(data, dict):
                raise TypeError("malformed")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None, None, ["inclusion: a proven entry is malformed"]
        if not merkle.verify_inclusion(index, head.size, merkle.leaf_hash(line), path, head.root):
            return None, None, [f"inclusion: entry #{index + 1}'s proof does not verify against the signed tree head"]
        if (entry.get("verdict") == OK and "k" not in entry["f"] and event.get("action") == "approval.recorded"
                and event.get("subject") == ext.get("task") and data.get("spec_hash") == ext.get("specHash")
                and str(event.get("actor", "")).startswith("approver:")):
            proven.add(str(event["actor"]).removeprefix("approver:"))
    named = {str(a.get("person")) for a in statement.get("predicate", {}).get("approvals", []) if isinstance(a, dict)}
    if not named or not named <= proven:
        return None, None, [f"inclusion: approvals by {', '.join(sorted(named - proven)) or 'nobody'} are not "
                            f"proven in the signed tree as approvals of {statement_task(statement)}"]
    return head, (f"{len(named)} approval(s) proven in the log's Merkle tree of {head.size} entries "
                  f"(tree head signed by {head.kid})"), []


def check_consistency(note_head: TreeHead, known: dict[str, Any], keyring: Keyring) -> tuple[str | None, list[str]]:
    """Whether the broker's current tree head (in ``known``, from :func:`lookup`) extends the
    note's: its signature and the RFC 9162 consistency proof from the note's tree to it."""
    found, answer = known.get("inclusion"), known.get("consistency")
    try:
        current = TreeHead.from_json(found["treeHead"])  # type: ignore[index]
    except (ValueError, KeyError, TypeError):
        return None, ["consistency: the broker gave no current tree head"]
    if not current.verify(keyring.keys):
        return None, ["consistency: the broker's current tree head is not signed by the broker's public key"]
    if not isinstance(answer, dict) or answer.get("size") != note_head.size:
        return None, [f"consistency: the broker gave no consistency proof from the note's tree of {note_head.size} entries"]
    if answer.get("path") is None:
        return None, [f"consistency: the note's tree head covers {note_head.size} entries, the broker's log only "
                      f"{current.size} (the log was rolled back or the tree head is forged)"]
    try:
        path = [bytes.fromhex(str(p)) for p in answer["path"]]
    except (ValueError, TypeError):
        return None, ["consistency: the broker's consistency proof is malformed"]
    if not merkle.verify_consistency(note_head.size, current.size, path, note_head.root, current.root):
        return None, [f"consistency: the note's tree head ({note_head.size} entries) is not consistent with the "
                      f"broker's current tree head ({current.size} entries): the log was rewritten since, or the "
                      "note's tree head is not of this log"]
    return f"the note's tree head of {note_head.size} entries is consistent with the broker's of {current.size}", []


def check_note(envelope: str, keyring: Keyring, *, commit: str, tree: str | None = None
               ) -> tuple[dict[str, Any] | None, TreeHead | None, str | None, list[str]]:
    """The checks that need the public keys alone (``intake provenance verify --offline``): the
    signature, the subject against ``commit`` (and ``tree`` when the repository was read), and
    the embedded inclusion proof. Returns (statement or None, the note's verified tree head, the
    inclusion summary, one line per failure)."""
    try:
        statement, _ = open_envelope(envelope, keyring)
    except ProvenanceInvalid as exc:
        return None, None, None, [f"signature: {exc}"]
    failures = []
    named = subject_commit(statement)
    if named != commit:
        failures.append(f"subject: the statement is for commit {str(named)[:40]}, not {commit}")
    if tree is not None:
        trees = [i.get("digest", {}).get("gitTree") for i in statement["subject"] if isinstance(i, dict)]
        if tree not in trees:
            failures.append(f"subject: the commit's tree {tree} is not the statement's")
    head = summary = None
    embedded = statement["predicate"].get("logInclusion")
    if embedded is not None:
        head, summary, missing = check_inclusion(statement, embedded, keyring)
        failures += missing
    return statement, head, summary, failures


def verify_offline(envelope: str, keyring: Keyring, *, commit: str, tree: str | None = None
                   ) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """``intake provenance verify --offline``: :func:`check_note`, and the note must carry its
    inclusion proof (there is no broker to ask). Returns (statement, inclusion summary, failures).
    The predicate's other facts are signed by the broker but not re-checked against the log."""
    statement, _, summary, failures = check_note(envelope, keyring, commit=commit, tree=tree)
    if statement is not None and "logInclusion" not in statement["predicate"]:
        failures.append("inclusion: this note carries no inclusion proof (issued before proofs were embedded); "
                        "verify it online")
    return statement, summary, failures


def verify(envelope: str, keyring: Keyring, *, commit: str, known: dict[str, Any],
           tree: str | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """Every check of ``intake provenance verify``: (statement or None, one line per failure).

    :func:`check_note`, then the broker's sealed-log view ``known`` (from :func:`lookup`): the
    chain is intact, this very envelope was issued, every fact of the predicate is the log's,
    and the note's tree head is consistent with the broker's current one (a note without an
    embedded proof is proven with the broker's fresh one). Sets ``known["inclusion_verified"]``
    and ``known["consistency_verified"]`` to the summaries of what held."""
    statement, head, summary, failures = check_note(envelope, keyring, commit=commit, tree=tree)
    if statement is None:
        return None, failures
    failures += [f"audit log: {a}" for a in known.get("anomalies", [])]
    if known.get("commit") != commit:
        failures.append(f"audit log: the delivered commit of {known.get('task')} is {known.get('commit')}")
    if digest_of(envelope.strip()) not in known.get("issued", []):
        failures.append("issued: the broker never issued this envelope (no provenance.issued with its sha256)")
    if "logInclusion" not in statement["predicate"]:  # issued before the proof was embedded
        _, summary, missing = check_inclusion(statement, known.get("inclusion"), keyring)
        failures += missing
        if summary is not None:
            summary += " (the broker's proof: this note carries none)"
    elif head is not None:
        consistent, missing = check_consistency(head, known, keyring)
        failures += missing
        if consistent is not None:
            known["consistency_verified"] = consistent
    if summary is not None:
        known["inclusion_verified"] = summary
    expected = known.get("expected")
    if expected is None:
        failures.append(f"audit log: no {known.get('missing')} fact for the task's run")
    else:
        failures += [f"predicate {line}" if line.startswith("predicate") else f"statement {line}"
                     for line in compare(statement, expected)]
    return statement, failures
