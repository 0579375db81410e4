"""Signed provenance of delivered branches, end to end: a real worker delivers a real branch
with its note on refs/notes/intake; ``intake provenance verify`` (the real CLI against the real
app) passes, and fails for any changed byte, another commit, a forged or re-signed envelope,
and a note a hostile agent wrote."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from intake.cli.main import cli
from intake.core.models import TaskState
from intake.protocol import envelope as provenance
from intake.protocol.tokens import Signer
from tests.api_harness import link_os_user, running_broker
from tests.workers.fake_forge import FakeForge, fake_forge  # noqa: F401
from tests.workers.harness import Rig, git_refs, rig  # noqa: F401


def git(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, check=True,
                          env={"PATH": "/usr/bin:/bin", "GIT_AUTHOR_NAME": "m", "GIT_AUTHOR_EMAIL": "m@x",
                               "GIT_COMMITTER_NAME": "m", "GIT_COMMITTER_EMAIL": "m@x", "HOME": "/nonexistent"},
                          ).stdout.decode()


def set_note(repo: Path, commit: str, text: str) -> None:
    """Rewrite the note as someone with push access could (exact bytes)."""
    blob = git(repo, "hash-object", "-w", "--stdin", stdin=text.encode()).strip()
    git(repo, "notes", f"--ref={provenance.NOTES_REF}", "add", "--force", "-C", blob, commit)


@pytest.fixture
def delivered(rig: Rig, tmp_path: Path) -> Iterator[tuple[Rig, str, str, Path, dict[str, str]]]:  # noqa: F811
    """(rig, task id, delivered sha, a clone with the notes, CLI env) for one delivered task."""
    task = rig.promote()
    rig.work(rig.config())
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED, done.reason
    sha = (done.result or {})["commit"]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--mirror", str(rig.bare("acme/web")), str(clone)], check=True)
    link_os_user(rig.settings)  # the CLI reads as the OS user, who must be a person
    with running_broker(rig.settings) as running:
        yield rig, task.id, sha, clone, rig.env(INTAKE_URL=running.socket_url)


def cli_verify(env: dict[str, str], *args: str) -> tuple[int, dict[str, object]]:
    result = CliRunner().invoke(cli, ["provenance", "verify", *args, "--json"], env=env, catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def test_a_delivered_branch_carries_a_verifying_note(delivered, rig: Rig) -> None:  # noqa: F811
    _, task_id, sha, clone, env = delivered
    refs = git_refs(rig.bare("acme/web"))
    assert refs[f"refs/heads/intake/{task_id}"] == sha and provenance.NOTES_REF in refs
    note = git(clone, "notes", f"--ref={provenance.NOTES_REF}", "show", sha)
    [issued] = rig.events("provenance.issued")
    assert issued["subject"] == task_id and issued["data"]["commit"] == sha
    assert issued["data"]["envelope_sha256"] == provenance.digest_of(note)
    assert rig.r.get(f"intake:provenance:{sha}") == note  # stored by the broker too
    statement, _ = provenance.open_envelope(note, rig.broker.keyring)
    assert issued["data"]["statement_sha256"] == provenance.digest_of(
        base64.b64decode(json.loads(note)["payload"]))
    assert statement["subject"][0]["digest"] == {"gitCommit": sha}
    assert statement["subject"][1]["digest"] == {"gitTree": git(clone, "rev-parse", f"{sha}^{{tree}}").strip()}
    p = statement["predicate"]
    ext = p["buildDefinition"]["externalParameters"]
    task = rig.task(task_id)
    assert ext["task"] == task_id and ext["specHash"] == task.spec_hash and ext["idea"]["id"] == task.idea_id
    assert ext["idea"]["channel"] == "slack" and len(ext["idea"]["textSha256"]) == 64
    assert "prompt" not in ext["spec"] and "Please document" not in note  # idea text only as a hash
    assert [(a["person"], a["factor"]) for a in p["approvals"]] == [("alice", "totp")]
    assert p["dispatch"][0]["tokenId"] in rig.fact(task_id).used_nonces
    assert p["worker"]["name"] == "test" and p["sandbox"]["mode"] in ("bwrap", "none") and p["gates"] == "passed"
    assert p["sbom"] == {"sha256": task.result["dependencies"]["sbom_sha256"]}  # the gated result's SBOM

    for args in ((sha, "--repo", str(clone)), (f"intake/{task_id}", "--repo", str(clone)), (sha,),
                 (f"intake/{task_id}",)):
        code, out = cli_verify(env, *args)
        assert code == 0 and out["ok"] is True and out["failures"] == [] and out["task"] == task_id, (args, out)
        assert str(out["inclusion"]).startswith("1 approval(s) proven in the log's Merkle tree of ")
    text = CliRunner().invoke(cli, ["provenance", "verify", sha, "--repo", str(clone)], env=env)
    assert text.exit_code == 0 and "inclusion proof verified: 1 approval(s) proven" in text.stdout
    shown = CliRunner().invoke(cli, ["provenance", "show", sha, "--repo", str(clone)], env=env)
    assert shown.exit_code == 0 and "signature ok" in shown.stdout and "approved by alice" in shown.stdout
    assert "log inclusion: 1 approval entr(ies) against a tree head of" in shown.stdout


def test_any_changed_byte_fails(delivered) -> None:  # noqa: F811
    _, _, sha, clone, env = delivered
    note = git(clone, "notes", f"--ref={provenance.NOTES_REF}", "show", sha)
    data = json.loads(note)
    spots = {"payload": note.index(data["payload"]) + len(data["payload"]) // 2,
             "signature": note.index(data["signatures"][0]["sig"]) + 5,
             "keyid": note.index(data["signatures"][0]["keyid"]) + 3,
             "payloadType": note.index(data["payloadType"]) + 12,
             "structure": 0}
    for what, at in spots.items():
        flipped = note[:at] + chr(ord(note[at]) ^ 1) + note[at + 1:]
        set_note(clone, sha, flipped)
        code, out = cli_verify(env, sha, "--repo", str(clone))
        assert code == 1 and out["ok"] is False and out["failures"], what
    # Put back, the genuine note verifies again.
    set_note(clone, sha, note)
    assert cli_verify(env, sha, "--repo", str(clone))[0] == 0


def test_another_commit_a_foreign_key_and_a_resigned_lie_fail(delivered, rig: Rig) -> None:  # noqa: F811
    _, task_id, sha, clone, env = delivered
    note = git(clone, "notes", f"--ref={provenance.NOTES_REF}", "show", sha)
    # The genuine note copied onto another commit (main): the subject is not that commit.
    main = git(clone, "rev-parse", "refs/heads/main").strip()
    set_note(clone, main, note)
    code, out = cli_verify(env, main, "--repo", str(clone))
    assert code == 1 and any(f.startswith("subject:") for f in out["failures"])
    statement, _ = provenance.open_envelope(note, rig.broker.keyring)
    # Forged with a different key (someone with push access rewrote the note).
    set_note(clone, sha, provenance.sign_statement(Signer(Ed25519PrivateKey.generate()), statement))
    code, out = cli_verify(env, sha, "--repo", str(clone))
    assert code == 1 and out["failures"][0].startswith("signature:") and "keyring" in out["failures"][0]
    # Signed with the broker's real key but naming an approver the log does not have: the
    # signature holds, the sealed log disagrees, and the envelope was never issued.
    lie = json.loads(json.dumps(statement))
    lie["predicate"]["approvals"].append({"person": "mallory", "time": "2026-01-01T00:00:00.000000Z",
                                          "factor": "totp", "via": "cli"})
    set_note(clone, sha, provenance.sign_statement(rig.broker.signer, lie))
    code, out = cli_verify(env, sha, "--repo", str(clone))
    failures = out["failures"]
    assert code == 1 and not any(f.startswith("signature:") for f in failures)
    assert any("issued:" in f for f in failures)
    assert any(f.startswith("predicate predicate.approvals[1]") and "mallory" in f for f in failures)
    # The text output: one line per failing check, non-zero exit.
    text = CliRunner().invoke(cli, ["provenance", "verify", sha, "--repo", str(clone)], env=env)
    assert text.exit_code == 1 and text.stdout.count("FAIL ") == len(failures)
    # A broker-stored copy rewritten in Redis is no better.
    rig.r.set(f"intake:provenance:{sha}", provenance.sign_statement(rig.broker.signer, lie))
    assert cli_verify(env, sha)[0] == 1


def test_a_hostile_agents_own_note_is_neither_delivered_nor_verified(
        rig: Rig, tmp_path: Path, fake_forge: FakeForge, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    forged = json.dumps({"payload": base64.b64encode(b'{"_type":"x"}').decode(), "payloadType": provenance.PAYLOAD_TYPE,
                         "signatures": [{"keyid": "0" * 16, "sig": "AAAA"}]})
    script = (
        "set -e; mkdir -p docs; echo 'agent docs' > docs/agent.md; git add -A; git commit -qm mine; "
        f"git notes --ref=intake add -f -m '{forged}' HEAD; git notes --ref=intake add -f -m '{forged}' HEAD~1; "
        "git update-ref refs/notes/intake-extra refs/notes/intake"
    )
    config = rig.config(agent={"type": "command", "argv": ["/bin/sh", "-c", script]},
                        repos={"acme/web": {"forge": {"api_url": fake_forge.url, "repository": "acme/web",
                                                      "token": {"env": "WEB_FORGE_TOKEN"}}}})
    monkeypatch.setenv("WEB_FORGE_TOKEN", "forge-token-web")
    task = rig.promote()
    rig.work(config)
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED, done.reason
    sha = (done.result or {})["commit"]
    bare = rig.bare("acme/web")
    assert "refs/notes/intake-extra" not in git_refs(bare)
    notes = git(bare, "notes", f"--ref={provenance.NOTES_REF}", "list").split()
    assert len(notes) == 2  # one note, for the delivered commit, and it is the broker's
    note = git(bare, "notes", f"--ref={provenance.NOTES_REF}", "show", sha)
    assert "AAAA" not in note and provenance.digest_of(note) == rig.events("provenance.issued")[-1]["data"]["envelope_sha256"]
    # The PR embeds the broker's envelope and links the note.
    [call] = fake_forge.calls
    assert provenance.digest_of(note) in call["json"]["body"] and note in call["json"]["body"]
    # The agent's forged note, put on the commit by anyone, does not verify.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--mirror", str(bare), str(clone)], check=True)
    set_note(clone, sha, forged)
    link_os_user(rig.settings)  # the CLI reads as the OS user, who must be a person
    with running_broker(rig.settings) as running:
        code, out = cli_verify(rig.env(INTAKE_URL=running.socket_url), sha, "--repo", str(clone))
    assert code == 1 and out["failures"][0].startswith("signature:")


def test_the_brokers_own_proof_is_checked_not_trusted(delivered, rig: Rig) -> None:  # noqa: F811
    """The broker's fresh proof (what proves a note issued before proofs were embedded) is
    checked like the note's: a proof for another entry, a changed approval line, a missing entry
    or a tree head signed by another key each fail the inclusion check."""
    from intake.audit.archive import TreeHead
    from intake.tasks.provenance import check_inclusion, lookup, verify

    _, _, sha, clone, _ = delivered
    note = git(clone, "notes", f"--ref={provenance.NOTES_REF}", "show", sha)
    statement, _ = provenance.open_envelope(note, rig.broker.keyring)
    old = json.loads(json.dumps(statement))
    del old["predicate"]["logInclusion"]
    old_note = provenance.sign_statement(rig.broker.signer, old)
    known = {**lookup(rig.broker, sha), "issued": [provenance.digest_of(old_note)]}  # as if issued so
    assert verify(old_note, rig.broker.keyring, commit=sha, known=known)[1] == []
    assert known["inclusion_verified"].endswith("(the broker's proof: this note carries none)")
    proof = known["inclusion"]

    def failures(inclusion: object) -> list[str]:
        return check_inclusion(old, inclusion, rig.broker.keyring)[2]

    assert failures(proof) == []
    [entry] = proof["entries"]
    assert failures({**proof, "entries": [{**entry, "leafIndex": entry["leafIndex"] + 1}]})
    assert failures({**proof, "entries": [{**entry, "entry": entry["entry"].replace("alice", "alicf")}]})
    assert failures({**proof, "entries": []})
    assert failures({"treeHead": {}, "entries": []})
    assert failures(None)
    head = TreeHead.from_json(proof["treeHead"])
    forged = TreeHead(**{**head.__dict__, "sig": Ed25519PrivateKey.generate().sign(head.body())})
    assert failures({**proof, "treeHead": forged.as_json()}) == [
        "inclusion: the tree head is not signed by the broker's public key"]
