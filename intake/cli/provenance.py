"""``intake provenance show|verify``: read a delivered commit's envelope (a git note in a
repository, or the broker's stored copy) and check it (:func:`intake.tasks.provenance.verify`).

The signature and the approvals' inclusion proof the note carries are checked here with the
public keyring file alone (``INTAKE_PUBLIC_KEY``, or ``--public-key``); with ``--offline`` that is
all (no broker, no Redis). Otherwise the sealed audit log's view of the commit comes from the
broker's API (``GET /provenance``), which rebuilds it from the sealed chain and proves the note's
tree head consistent with its current one. Everything read from the repository or the envelope is
untrusted: shown through :func:`intake.text.terminal.safe`, never executed or interpolated.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import click

from intake.cli.client import ApiClient, ApiError
from intake.core.errors import InvalidInput, NotFound
from intake.core.settings import Settings
from intake.protocol.envelope import NOTES_REF, ProvenanceInvalid, open_envelope
from intake.protocol.keyfiles import load_public_keys
from intake.protocol.tokens import Keyring
from intake.tasks import provenance
from intake.text.terminal import safe

_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,200}")
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _git(repo: Path, *args: str) -> str | None:
    """git's stdout in ``repo``, or None when it fails (no user or system config is read)."""
    env = {"PATH": os.environ.get("PATH", os.defpath), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0", "GIT_NO_REPLACE_OBJECTS": "1",
           "LC_ALL": "C", "HOME": os.devnull}
    done = subprocess.run(["git", "-C", str(repo), *args], env=env, capture_output=True, timeout=60, check=False)
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def read_note(repo: Path, ref: str) -> tuple[str, str | None, str | None]:
    """(commit, its tree, the exact bytes of its ``refs/notes/intake`` note or None) for
    ``ref`` (a sha, or a branch) in ``repo``."""
    if not _REF.fullmatch(ref) or ".." in ref:
        raise InvalidInput(f"{ref!r} is not a commit sha or a branch name")
    commit = None
    for candidate in (f"refs/heads/{ref}", ref):
        found = _git(repo, "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}")
        if found:
            commit = found.strip()
            break
    if commit is None:
        raise NotFound(f"no commit {ref} in {repo}")
    tree = (_git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{tree}}") or "").strip() or None
    blob = (_git(repo, "notes", f"--ref={NOTES_REF}", "list", commit) or "").strip()
    note = _git(repo, "cat-file", "blob", blob) if _SHA.fullmatch(blob) else None
    return commit, tree, note


def _ask(api: ApiClient, ref: str, tree_size: int | None) -> dict[str, Any]:
    query = {"ref": ref, **({"tree_size": str(tree_size)} if tree_size is not None else {})}
    try:
        return dict(api.call("GET", "/provenance", query=query))
    except ApiError as exc:
        if exc.status != 404:
            raise
        return {"anomalies": [], "issued": [], "expected": None, "missing": "delivery", "commit": None,
                "envelope": None, "not_found": str(exc)}


def _gather(api: ApiClient, keyring: Keyring, ref: str, repo: Path | None
            ) -> tuple[str, str | None, str | None, dict[str, Any], str]:
    """(commit, tree, envelope, the broker's view, where the envelope came from)."""
    if repo is None:  # the broker proves consistency from its stored copy's tree head
        known = _ask(api, ref, None)
        return str(known.get("commit") or ref), None, known.get("envelope"), known, "the broker's stored copy"
    commit, tree, note = read_note(repo, ref)
    return (commit, tree, note, _ask(api, commit, provenance.note_tree_size(note, keyring)),
            f"the {NOTES_REF} note in {repo}")


def show(api: ApiClient, settings: Settings, ref: str, repo: Path | None, as_json: bool) -> None:
    commit, _, envelope, known, source = _gather(api, load_public_keys(settings.keys["public"]), ref, repo)
    if envelope is None:
        raise NotFound(f"no provenance for {ref} ({source})")
    try:
        statement, kid = open_envelope(envelope, load_public_keys(settings.keys["public"]))
        verified = f"signature ok (key {kid})"
    except ProvenanceInvalid as exc:
        statement, verified = None, f"NOT VERIFIED: {exc}"
    if as_json:
        click.echo(json.dumps({"commit": commit, "source": source, "signature": verified,
                               "envelope": json.loads(envelope), "statement": statement},
                              ensure_ascii=True, sort_keys=True))
        return
    click.echo(f"commit {commit} ({safe(source)}): {safe(verified)}")
    if statement is None:
        return
    p = statement["predicate"]
    ext = p.get("buildDefinition", {}).get("externalParameters", {})
    click.echo(f"  task {safe(str(ext.get('task')))}  idea {safe(str(ext.get('idea', {}).get('id')))} "
               f"via {safe(str(ext.get('idea', {}).get('channel')))}  repo {safe(str(ext.get('repo')))} "
               f"({safe(str(ext.get('changeType')))})")
    click.echo(f"  spec {safe(str(ext.get('specHash')))}  policy {safe(str(ext.get('policyVersion')))[:12]}")
    for label, key in (("approved", "approvals"), ("result approved", "resultApprovals")):
        for a in p.get(key, []):
            click.echo(f"  {label} by {safe(str(a.get('person')))} at {safe(str(a.get('time')))} "
                       f"({safe(str(a.get('factor')))})")
    click.echo(f"  worker {safe(str(p.get('worker', {}).get('name')))}  sandbox "
               f"{safe(str(p.get('sandbox', {}).get('mode')))}  gates {safe(str(p.get('gates')))}  "
               f"checks {', '.join(safe(str(c.get('name'))) + (' ok' if c.get('ok') else ' FAILED') for c in p.get('checks', [])) or 'none'}")
    sbom = p.get("sbom", {})
    click.echo(f"  sbom {safe(str(sbom.get('sha256')))}" if "sha256" in sbom else "  sbom: no dependency changes")
    proof = p.get("logInclusion")
    if isinstance(proof, dict) and isinstance(proof.get("treeHead"), dict) and isinstance(proof.get("entries"), list):
        click.echo(f"  log inclusion: {len(proof['entries'])} approval entr(ies) against a tree head of "
                   f"{safe(str(proof['treeHead'].get('size')))} entries (checked by `intake provenance verify`)")


def verify(api: ApiClient, settings: Settings, ref: str, repo: Path | None, as_json: bool) -> bool:
    """Print the outcome (one line per failing check); True when everything holds."""
    keyring = load_public_keys(settings.keys["public"])
    commit, tree, envelope, known, source = _gather(api, keyring, ref, repo)
    if envelope is None:
        failures = [f"envelope: no provenance for {commit} ({source})"]
        statement = None
    else:
        statement, failures = provenance.verify(envelope, keyring, commit=commit, known=known, tree=tree)
    if known.get("not_found"):
        failures.insert(0, f"audit log: {known['not_found']}")
    task = provenance.statement_task(statement) if statement else known.get("task")
    inclusion, consistency = known.get("inclusion_verified"), known.get("consistency_verified")
    return _report(as_json, commit=commit, task=task, source=source, inclusion=inclusion,
                   consistency=consistency, failures=failures,
                   verified="provenance verified: commit {commit}, task {task}: signature, subject and every fact "
                            "agree with the sealed audit log")


def _report(as_json: bool, *, commit: str, task: str | None, source: str, inclusion: Any, consistency: Any,
            failures: list[str], verified: str, offline: bool = False) -> bool:
    """Print a verify's outcome (JSON, one FAIL line per failing check, or the verified lines);
    True when everything holds. ``verified`` is the first line, with ``{commit}`` and ``{task}``."""
    if as_json:
        click.echo(json.dumps({"ok": not failures, "commit": commit, "task": task, "source": source,
                               "inclusion": inclusion, "consistency": consistency, "offline": offline,
                               "failures": failures}, ensure_ascii=True, sort_keys=True))
    elif failures:
        for line in failures:
            click.echo(f"FAIL {safe(line)}")
    else:
        click.echo(verified.format(commit=commit, task=safe(str(task))))
        click.echo(f"inclusion proof verified: {safe(str(inclusion))}")
        if consistency is not None:
            click.echo(f"tree head consistent: {safe(str(consistency))}")
    return not failures


def verify_offline(public_key: Path, ref: str, repo: Path, as_json: bool) -> bool:
    """``--offline``: the note in ``repo`` checked with ``public_key`` alone (signature, subject
    and its tree, the embedded inclusion proof); no broker, no Redis, no settings."""
    commit, tree, note = read_note(repo, ref)
    source = f"the {NOTES_REF} note in {repo}"
    if note is None:
        statement, inclusion, failures = None, None, [f"envelope: no provenance for {commit} ({source})"]
    else:
        statement, inclusion, failures = provenance.verify_offline(note, load_public_keys(public_key),
                                                                   commit=commit, tree=tree)
    task = provenance.statement_task(statement) if statement else None
    return _report(as_json, commit=commit, task=task, source=source, inclusion=inclusion, consistency=None,
                   failures=failures, offline=True,
                   verified="provenance verified offline: commit {commit}, task {task}: signature, subject and "
                            "the approvals' inclusion proof (the other facts need the broker: run without --offline)")
