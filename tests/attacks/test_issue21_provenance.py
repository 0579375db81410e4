"""Issue 21, attacked through the provenance note's inclusion proof.

A delivered change's note carries its approvals' inclusion proofs (RFC 9162) against a tree
head the broker signed at delivery. ``intake provenance verify --offline`` checks them with the
public key alone (no broker, no Redis, no settings); online, the broker also proves that tree
head consistent with its current one. Each forgery is refused with one clear line and exit 1:

* the proof changed in the note (the envelope's signature breaks), or changed and re-signed with
  the broker's key (the path no longer leads to the signed root);
* a tree head signed by another key;
* the approval entry swapped for the same person's approval of another task (a genuine entry,
  genuinely in the log, with a genuine proof: it is not an approval of this task);
* a tree head over a history the broker's log does not extend (signed with the broker's key: a
  split view): offline cannot tell, online the consistency proof fails.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from intake.audit import merkle
from intake.audit.archive import TreeHead
from intake.cli.main import cli
from intake.protocol import envelope as provenance
from intake.tasks.provenance import gather, inclusion
from tests.factories import draft
from tests.workers.fake_forge import fake_forge  # noqa: F401
from tests.workers.harness import Rig, rig  # noqa: F401
from tests.workers.test_provenance_delivery import delivered, git, set_note  # noqa: F401


def offline_subprocess(clone: Path, sha: str, pem: Path) -> subprocess.CompletedProcess[str]:
    """`intake provenance verify --offline` with no broker settings at all (no Redis, no key
    but the public one, no API URL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INTAKE_", "SLACK_"))}
    env["INTAKE_DATA_DIR"] = str(clone.parent / "nowhere")
    return subprocess.run([sys.executable, "-m", "intake", "provenance", "verify", sha, "--repo", str(clone),
                           "--offline", "--public-key", str(pem)], env=env, capture_output=True, text=True,
                          timeout=60)


def run(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["provenance", "verify", *args, "--json"], env=env, catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def text(env: dict[str, str], *args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli, ["provenance", "verify", *args], env=env, catch_exceptions=False)
    return result.exit_code, result.stdout.splitlines()


def test_the_note_proves_its_approvals_offline_and_stays_consistent_online(delivered, rig: Rig) -> None:  # noqa: F811
    _, task_id, sha, clone, env = delivered
    note = git(clone, "notes", f"--ref={provenance.NOTES_REF}", "show", sha)
    statement, _ = provenance.open_envelope(note, rig.broker.keyring)
    embedded = statement["predicate"]["logInclusion"]
    head = TreeHead.from_json(embedded["treeHead"])
    [issued] = rig.events("provenance.issued")
    # The tree head the note carries is on the sealed log too, and covers the approval.
    assert issued["data"]["tree_size"] == head.size and issued["data"]["tree_root"] == head.root.hex()
    [entry] = embedded["entries"]
    [approval] = [e for e in rig.events("approval.recorded") if e["subject"] == task_id]
    assert json.loads(json.loads(entry["entry"])["f"]["e"])["eid"] == approval["eid"]
    assert entry["leafIndex"] < head.size

    done = offline_subprocess(clone, sha, rig.settings.keys["public"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"provenance verified offline: commit {sha}, task {task_id}" in done.stdout
    assert f"inclusion proof verified: 1 approval(s) proven in the log's Merkle tree of {head.size} entries" \
        in done.stdout

    # The log grows after delivery; online, the broker's later head extends the note's.
    for _ in range(5):
        rig.store.capture(draft())
    rig.broker.audit.seal_pending()
    code, out = run(env, sha, "--repo", str(clone))
    assert code == 0 and out["failures"] == [], out
    assert out["inclusion"].startswith(f"1 approval(s) proven in the log's Merkle tree of {head.size} entries")
    assert out["consistency"].startswith(f"the note's tree head of {head.size} entries is consistent with the "
                                         "broker's of ")
    assert int(out["consistency"].rsplit(" ", 1)[1]) > head.size
    code, lines = text(env, sha)  # the broker's stored copy: the same note, the same checks
    assert code == 0 and lines[1].startswith("inclusion proof verified: 1 approval(s)")
    assert lines[2].startswith("tree head consistent: the note's tree head of")


def forge(rig: Rig, clone: Path, sha: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the note's statement and re-sign it with the broker's own key (the strongest
    forger: only the inner checks can catch it)."""
    note = git(clone, "notes", f"--ref={provenance.NOTES_REF}", "show", sha)
    statement, _ = provenance.open_envelope(note, rig.broker.keyring)
    change(statement)
    set_note(clone, sha, provenance.sign_statement(rig.broker.signer, statement))


def refused(env: dict[str, str], clone: Path, sha: str, pem: Path, expected: str, *, online: bool = False) -> None:
    """Refused offline (and online when asked) with exactly one line saying ``expected``."""
    args = (sha, "--repo", str(clone), *(() if online else ("--offline", "--public-key", str(pem))))
    code, out = run(env, *args)
    assert code == 1 and out["ok"] is False, out
    hits = [f for f in out["failures"] if f.startswith(expected)]
    assert len(hits) == 1, out["failures"]
    if not online:
        assert out["failures"] == hits  # nothing else is wrong with the note offline
    code, lines = text(env, *args)
    assert code == 1 and f"FAIL {hits[0]}" in lines and all(line.startswith("FAIL ") for line in lines)


def test_a_changed_proof_is_refused(delivered, rig: Rig) -> None:  # noqa: F811
    _, _, sha, clone, env = delivered
    pem = rig.settings.keys["public"]
    note = git(clone, "notes", f"--ref={provenance.NOTES_REF}", "show", sha)
    statement, _ = provenance.open_envelope(note, rig.broker.keyring)
    path = statement["predicate"]["logInclusion"]["entries"][0]["inclusionPath"]
    assert path, "a log of more than one entry gives a non-empty path"
    # Changed in place (someone with push access): the envelope's signature no longer holds.
    payload = json.loads(note)["payload"]
    raw = base64.b64decode(payload).replace(path[0].encode(), ("0" * 64).encode())
    assert raw != base64.b64decode(payload)
    set_note(clone, sha, note.replace(payload, base64.b64encode(raw).decode()))
    refused(env, clone, sha, pem, "signature: the envelope's signature does not verify")

    # Changed and re-signed with the broker's key: the path does not lead to the signed root.
    def flip(st: dict[str, Any]) -> None:
        e = st["predicate"]["logInclusion"]["entries"][0]
        e["inclusionPath"][0] = ("%064x" % (int(e["inclusionPath"][0], 16) ^ 1))

    set_note(clone, sha, note)
    forge(rig, clone, sha, flip)
    refused(env, clone, sha, pem, "inclusion: entry #")
    refused(env, clone, sha, pem, "inclusion: entry #", online=True)

    def move(st: dict[str, Any]) -> None:  # the same path claimed for the next leaf
        st["predicate"]["logInclusion"]["entries"][0]["leafIndex"] += 1

    set_note(clone, sha, note)
    forge(rig, clone, sha, move)
    refused(env, clone, sha, pem, "inclusion: entry #")


def test_a_tree_head_signed_by_another_key_is_refused(delivered, rig: Rig) -> None:  # noqa: F811
    _, _, sha, clone, env = delivered
    other = Ed25519PrivateKey.generate()

    def resign(keep_kid: bool) -> Callable[[dict[str, Any]], None]:
        def change(st: dict[str, Any]) -> None:
            head = TreeHead.from_json(st["predicate"]["logInclusion"]["treeHead"])
            head = TreeHead(**{**head.__dict__, "kid": head.kid if keep_kid else "0" * 16})
            head = TreeHead(**{**head.__dict__, "sig": other.sign(head.body())})
            st["predicate"]["logInclusion"]["treeHead"] = head.as_json()
        return change

    for keep_kid in (True, False):
        forge(rig, clone, sha, resign(keep_kid))
        refused(env, clone, sha, rig.settings.keys["public"],
                "inclusion: the tree head is not signed by the broker's public key")
    refused(env, clone, sha, rig.settings.keys["public"],
            "inclusion: the tree head is not signed by the broker's public key", online=True)


def test_another_tasks_approval_does_not_prove_this_one(delivered, rig: Rig) -> None:  # noqa: F811
    _, task_id, sha, clone, env = delivered
    other = rig.promote()  # alice approves another task: a genuine entry with a genuine proof
    assert other.id != task_id
    theirs = inclusion(rig.broker, gather(rig.broker.audit, other.id, sha))
    [their_entry] = theirs["entries"]
    assert json.loads(json.loads(their_entry["entry"])["f"]["e"])["actor"] == "approver:alice"

    def swap(st: dict[str, Any]) -> None:
        st["predicate"]["logInclusion"] = theirs

    forge(rig, clone, sha, swap)
    expected = f"inclusion: approvals by alice are not proven in the signed tree as approvals of {task_id}"
    refused(env, clone, sha, rig.settings.keys["public"], expected)
    refused(env, clone, sha, rig.settings.keys["public"], expected, online=True)

    def both(st: dict[str, Any]) -> None:  # theirs added beside a broken one of ours: still not proven
        ours = st["predicate"]["logInclusion"]["entries"][0]
        st["predicate"]["logInclusion"] = {**theirs, "entries": [
            {**ours, "entry": ours["entry"].replace("approval.recorded", "approval.recordex")}, their_entry]}

    forge(rig, clone, sha, both)
    refused(env, clone, sha, rig.settings.keys["public"], "inclusion: entry #")


def test_a_tree_head_the_brokers_log_does_not_extend_is_refused_online(delivered, rig: Rig) -> None:  # noqa: F811
    _, task_id, sha, clone, env = delivered
    pem = rig.settings.keys["public"]
    note = git(clone, "notes", f"--ref={provenance.NOTES_REF}", "show", sha)
    statement, _ = provenance.open_envelope(note, rig.broker.keyring)
    real = TreeHead.from_json(statement["predicate"]["logInclusion"]["treeHead"])
    leaves = gather(rig.broker.audit, task_id, sha).leaves[:real.size]
    [ours] = statement["predicate"]["logInclusion"]["entries"]
    assert ours["leafIndex"] != 0
    # A split view: the same approval in a tree whose first entry differs, signed with the
    # broker's key (as a broker made to sign a forked log would). Every proof in it holds.
    forked = [merkle.leaf_hash(b"a rewritten first entry"), *leaves[1:]]
    frontier = merkle.Frontier()
    for leaf in forked:
        frontier.append(leaf)
    head = TreeHead.signed(rig.broker.signer, frontier, real.last, real.at)
    path = [p.hex() for p in merkle.inclusion_proof(ours["leafIndex"], forked)]

    def fork(st: dict[str, Any]) -> None:
        st["predicate"]["logInclusion"] = {"treeHead": head.as_json(),
                                           "entries": [{**ours, "inclusionPath": path}]}

    forge(rig, clone, sha, fork)
    code, out = run(env, sha, "--repo", str(clone), "--offline", "--public-key", str(pem))
    assert code == 0, out  # offline cannot see a split view: that is what the broker's head is for
    refused(env, clone, sha, pem, f"consistency: the note's tree head ({real.size} entries) is not consistent "
            "with the broker's current tree head", online=True)

    # A tree head claiming more entries than the broker's log has (a log rolled back since).
    longer = [*leaves, *(merkle.leaf_hash(b"x%d" % i) for i in range(50))]
    frontier = merkle.Frontier()
    for leaf in longer:
        frontier.append(leaf)
    ahead = TreeHead.signed(rig.broker.signer, frontier, real.last, real.at)
    path = [p.hex() for p in merkle.inclusion_proof(ours["leafIndex"], longer)]

    def beyond(st: dict[str, Any]) -> None:
        st["predicate"]["logInclusion"] = {"treeHead": ahead.as_json(), "entries": [{**ours, "inclusionPath": path}]}

    forge(rig, clone, sha, beyond)
    refused(env, clone, sha, pem, f"consistency: the note's tree head covers {real.size + 50} entries", online=True)


def test_malformed_proofs_fail_cleanly(delivered, rig: Rig) -> None:  # noqa: F811
    """Whatever shape a re-signed note's proof takes, verify says so in one line (no crash)."""
    from intake.tasks.provenance import check_inclusion

    _, _, sha, clone, _ = delivered
    note = git(clone, "notes", f"--ref={provenance.NOTES_REF}", "show", sha)
    statement, _ = provenance.open_envelope(note, rig.broker.keyring)
    good = statement["predicate"]["logInclusion"]
    [entry] = good["entries"]
    line = json.loads(entry["entry"])
    bad_event = {**line, "f": {**line["f"], "e": json.dumps({**json.loads(line["f"]["e"]), "data": [1]})}}
    shapes: list[Any] = [
        None, [], "x", {"treeHead": None, "entries": []}, {"treeHead": {**good["treeHead"], "root": 5}, "entries": []},
        {"treeHead": {**good["treeHead"], "frontier": "x"}, "entries": []},
        {**good, "entries": {"a": 1}}, {**good, "entries": [None]}, {**good, "entries": [{**entry, "leafIndex": True}]},
        {**good, "entries": [{**entry, "leafIndex": -1}]}, {**good, "entries": [{**entry, "inclusionPath": ["zz"]}]},
        {**good, "entries": [{**entry, "entry": "[" * 100000}]},
        {**good, "entries": [{**entry, "entry": json.dumps(bad_event)}]},
    ]
    for shape in shapes:
        head, summary, failures = check_inclusion(statement, shape, rig.broker.keyring)
        assert head is None and summary is None and len(failures) == 1 and failures[0].startswith("inclusion: "), shape
    assert check_inclusion(statement, good, rig.broker.keyring)[2] == []
