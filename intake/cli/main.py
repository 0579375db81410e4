"""The ``intake`` command line: a client of the broker's API.

Every command reads settings at run time (never at import). Commands that read or change state
call the broker's API (``INTAKE_URL``; by default the data dir's unix socket, where the kernel
tells the broker which OS user is calling), so the CLI never holds the signing, secrets or audit
key. Only bootstrap commands stay local: ``keys generate`` and ``admin bootstrap`` (the first
admin), and the broker host's own key management (``keys rotate/retire``, ``worker-key``,
``audit accept-rollback``), which needs files only the broker's OS account can read;
``policy check/show`` read only the policy file; ``serve`` and ``worker`` are servers.
Errors are one line on stderr with a non-zero exit, never a traceback. Untrusted
text is shown through :func:`intake.text.terminal.safe`; ``--json`` output is ASCII-escaped JSON.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from intake.cli.client import ApiClient, broker_url, seg
from intake.cli.records import idea_lines, idea_table, task_lines, task_table
from intake.core.errors import AuditBroken, IntakeError, InvalidInput
from intake.core.osuser import os_user
from intake.core.settings import Settings, load_settings
from intake.text.terminal import fields, safe, table

_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,39}")


def _out_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=True, sort_keys=True))


def _api() -> ApiClient:
    """The broker's API as this OS user (the socket) or as INTAKE_TOKEN's person (TCP)."""
    settings = load_settings()
    return ApiClient(broker_url(settings), settings.token.get_secret_value() if settings.token else None)


@contextmanager
def _local_broker() -> Iterator[tuple[Any, str]]:
    """The broker opened locally, for the operator commands that manage the broker's own key
    files on its host (keys rotate/retire, worker-key, audit accept-rollback): they need files
    only the broker's OS account can read, so nobody else can run them."""
    from intake.runtime import open_broker

    with open_broker(load_settings()) as broker:
        yield broker, f"os:{os_user()}"


def _casefold(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Approver and person ids are lower case: ``Alice`` means ``alice``."""
    return value.lower()


def requester_name(name: str) -> str:
    """``idea --as NAME``: a name for the words' author (the filer is still the caller)."""
    if not _NAME.fullmatch(name):
        raise InvalidInput(f"--as: {name!r} is not a valid name (a-z, 0-9, '.', '_', '-')")
    return name


def resolve_id(ident: str, kinds: str = "IT") -> str:
    """The whole id ``ident`` names: any case, or a unique prefix (at least 4 hex digits) looked
    up through the broker's API, within its own kind only (an idea prefix never names a task)."""
    from intake.core.ids import is_whole, parse_id_prefix

    parsed = parse_id_prefix(ident, kinds)
    return parsed if is_whole(parsed) else str(_api().call("GET", f"/ids/{seg(parsed)}")["id"])


def _print_idea(idea: dict[str, Any]) -> None:
    click.echo("\n".join(idea_lines(idea)))


def _print_task(task: dict[str, Any]) -> None:
    click.echo("\n".join(task_lines(task)))


class IntakeGroup(click.Group):
    """Translates every failure into one line on stderr and an exit code."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            rc = super().main(*args, **kwargs)
        except IntakeError as exc:
            click.echo(f"intake: {exc}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"intake: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("intake: aborted", err=True)
            sys.exit(130)
        except Exception as exc:  # the last line of defence: still one line, no traceback
            if type(exc).__module__.startswith("redis"):  # only local commands touch Redis
                click.echo(f"intake: Redis error: {type(exc).__name__}", err=True)
                sys.exit(1)
            first = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(f"intake: internal error: {type(exc).__name__}: {first}", err=True)
            sys.exit(70)
        sys.exit(rc if isinstance(rc, int) else 0)


@click.group(cls=IntakeGroup)
@click.version_option(package_name="intake")
def cli() -> None:
    """intake: untrusted chat ideas in, step-up-approved agent tasks out."""


def main() -> None:
    cli.main(prog_name="intake")


# -- serve -----------------------------------------------------------------------------------
@cli.command()
@click.option("--dev", is_flag=True, help="Dev mode: keys, example policy, embedded Redis and worker.")
@click.option("--edge", is_flag=True,
              help="Only answer requests (capture, reads); full serves on the same Redis seal, process worker "
                   "reports, dispatch, sweep and post cards (also INTAKE_EDGE=1).")
@click.option("--processes", type=click.IntRange(1, 64), default=None, metavar="N",
              help="With --edge: serve the port from N processes (SO_REUSEPORT), one event loop each "
                   "(also INTAKE_EDGE_PROCESSES).")
@click.option("--listen-fd", type=int, default=None, hidden=True)  # an edge's extra process (EdgeProcesses)
@click.option("--parent-fd", type=int, default=None, hidden=True)
def serve(dev: bool, edge: bool, processes: int | None, listen_fd: int | None, parent_fd: int | None) -> None:
    """Run the broker's web app (GET /healthz, /readyz; channels mount here)."""
    from intake.serve import run

    overrides: dict[str, Any] = {"edge": True} if edge else {}
    if processes is not None:
        overrides["edge_processes"] = processes
    settings = load_settings(**overrides)
    if settings.edge and dev:
        raise InvalidInput("--edge: dev mode is one full serve with its own worker; start edges beside it")
    if settings.edge_processes > 1 and not settings.edge:
        raise InvalidInput("--processes: only an edge (--edge) runs as several processes; "
                           "start full serves as separate replicas")
    run(settings, dev=dev, listen_fd=listen_fd, parent_fd=parent_fd)


@cli.command()
@click.option("--worker-config", "worker_configs", multiple=True, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Also check this worker config: agent program, credentials, report key (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def doctor(worker_configs: tuple[Path, ...], as_json: bool) -> None:
    """Check settings, key files, Redis, policy, Slack and worker configs; exit 1 on any problem."""
    from intake.operations.doctor import problems, run_doctor

    findings = run_doctor(worker_configs)
    findings += _credential_findings()
    if as_json:
        _out_json({"ok": not problems(findings), "findings": [f.as_json() for f in findings]})
    else:
        for finding in findings:
            click.echo(f"{finding.status:<8} {finding.check}: {safe(finding.message)}")
        count = len(problems(findings))
        click.echo(f"{count} problem(s)" if count else "no problems")
    if problems(findings):
        sys.exit(1)


def _credential_findings() -> list[Any]:
    """Credential ages, from a running broker's report (it reads the sealed log); nothing is
    opened or started here, so without a broker this is a warning that they were not checked."""
    from intake.core.errors import ConfigError
    from intake.operations.doctor import check_credentials, warning
    from intake.operations.indicators.figures import Figures

    try:
        settings = load_settings()
    except ConfigError:
        return []  # run_doctor reported it
    if not settings.url and not (settings.data_dir / "intake.sock").exists():
        return [warning("credentials", "not checked: no broker is running here (its socket "
                                       f"{settings.data_dir / 'intake.sock'} is missing; the ages come from its sealed log)")]
    try:
        client = ApiClient(broker_url(settings), settings.token.get_secret_value() if settings.token else None, timeout=30)
        fig = Figures.model_validate(client.call("GET", "/report", query={"since": "1d"}))
    except IntakeError as exc:
        return [warning("credentials", f"not checked: {exc}")]
    return check_credentials(fig.credentials)


# -- ideas -----------------------------------------------------------------------------------
@cli.command()
@click.argument("text")
@click.option("--as", "as_name", metavar="NAME",
              help="The words' author, when you file for someone; you are still recorded as the filer.")
@click.option("--title", default="", help="A short title; default: the first line of TEXT.")
@click.option("--delivery-id", help="Idempotency key: the same id twice files one idea.")
@click.option("--json", "as_json", is_flag=True, help="Print the idea as JSON.")
def idea(text: str, as_name: str | None, title: str, delivery_id: str | None, as_json: bool) -> None:
    """File TEXT as an untrusted idea (the CLI channel). TEXT '-' reads standard input."""
    if text == "-":
        text = sys.stdin.read()
    body: dict[str, Any] = {"text": text, "title": title}
    if as_name is not None:
        body["requester"] = requester_name(as_name)
    if delivery_id:
        body["delivery_id"] = delivery_id
    captured = _api().call("POST", "/ideas", body)
    if as_json:
        _out_json(captured)
    else:
        verb = "captured" if captured["created"] else "already captured"
        click.echo(f"{verb} {captured['id']}: {safe(captured['title'])}")


@cli.command(name="list")
@click.option("--all", "show_all", is_flag=True, help="Recent ideas in every state, not only pending.")
@click.option("--tasks", is_flag=True, help="List tasks (open ones, or recent with --all).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10000), help="At most this many rows.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def list_cmd(show_all: bool, tasks: bool, limit: int, as_json: bool) -> None:
    """List pending ideas (or tasks)."""
    query = {"limit": str(limit), **({"all": "1"} if show_all else {})}
    items = _api().call("GET", "/tasks" if tasks else "/ideas", query=query)
    if as_json:
        _out_json(items)
        return
    if not items:
        click.echo("nothing pending" if not show_all else "nothing yet")
    else:
        click.echo("\n".join(task_table(items) if tasks else idea_table(items)))


@cli.command()
@click.argument("ident")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@click.option("--sbom", is_flag=True, help="Print a task's CycloneDX SBOM (JSON) of its dependency delta.")
@click.option("--diff", "diff", is_flag=True, help="Print the diff a task's result is reviewed by, and its sha256.")
def show(ident: str, as_json: bool, sbom: bool, diff: bool) -> None:
    """Show an idea (I-…) or a task (T-…); IDENT may be a unique prefix, in any case."""
    ident = resolve_id(ident)
    if ident.startswith("T-") and diff:
        review = _api().call("GET", f"/tasks/{seg(ident)}/review")
        if as_json:
            _out_json(review)
            return
        # The diff is the agent's text: terminal controls and bidi characters are made visible.
        for line in review["stat"].splitlines():
            click.echo(safe(line))
        if review["binary"]:
            click.echo("binary files (not shown): " + ", ".join(safe(b) for b in review["binary"]))
        for path in review["privileged"]:
            click.echo(f"PRIVILEGED PATH CHANGED: {safe(path)}")
        click.echo("")
        for line in review["diff"].split("\n"):
            click.echo(safe(line))
        if review["truncated"]:
            click.echo(f"[the diff is {review['bytes']} bytes; only its first part is shown]")
        click.echo(f"diff sha256: {review['sha256']}")
        click.echo(f"accept what you reviewed: intake accept {ident} --sha {review['commit']} "
                   f"--diff-sha256 {review['sha256']}")
        return
    if ident.startswith("T-"):
        task = _api().call("GET", f"/tasks/{seg(ident)}")
        if sbom:
            deps = (task.get("result") or {}).get("dependencies")
            if not isinstance(deps, dict) or not isinstance(deps.get("sbom"), dict):
                raise InvalidInput(f"task {ident} has no SBOM (no gated result yet)")
            _out_json(deps["sbom"])
            return
        _out_json(task) if as_json else _print_task(task)
    else:
        found = _api().call("GET", f"/ideas/{seg(ident)}")
        _out_json(found) if as_json else _print_idea(found)


# -- audit -----------------------------------------------------------------------------------
@cli.group()
def audit() -> None:
    """The sealed audit log."""


@audit.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--offline", "offline", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Check an archive copy alone (segments, signed tree heads, consistency): "
                                  "no broker, no Redis, no audit key.")
@click.option("--public-key", "public_key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="PEM", help="With --offline: the broker's public key(s) the tree heads must be signed by.")
def verify(as_json: bool, offline: Path | None, public_key: Path | None) -> None:
    """Check the whole chain and list every anomaly; exit 1 when sealed history was changed."""
    if offline is not None or public_key is not None:
        _verify_offline(offline, public_key, as_json)
        return
    client = _api()
    status, _, raw = client.request("GET", "/audit/verify")
    report = json.loads(raw)
    if status >= 400 and report.get("error") != "audit_broken":
        client.call("GET", "/audit/verify")  # raises with the broker's message
    if as_json:
        _out_json(report)
    else:
        for anomaly in report.get("anomalies", []):
            click.echo(f"{'BROKEN' if anomaly['fatal'] else 'rejected'}: {safe(anomaly['message'])}")
        if report.get("ok"):
            rejected = sum(1 for a in report.get("anomalies", []) if not a["fatal"])
            note = f", {rejected} rejected entries (sealed as not genuine)" if rejected else ""
            click.echo(f"audit log intact: {report['events']} events{note}")
    if not report.get("ok"):
        if as_json:
            sys.exit(1)
        raise AuditBroken(report.get("event", "?"), report.get("message", "the audit log is broken"))


def _verify_offline(directory: Path | None, public_key: Path | None, as_json: bool) -> None:
    from intake.audit.archive import LocalDir, verify_offline
    from intake.protocol.keyfiles import load_public_keys

    if directory is None or public_key is None:
        raise InvalidInput("--offline DIR and --public-key PEM go together")
    if not directory.is_dir():
        raise InvalidInput(f"--offline: no archive directory at {directory}")
    report = verify_offline(LocalDir(directory), load_public_keys(public_key).keys)
    if as_json:
        _out_json({"ok": not report.problems, "entries": report.entries, "segments": report.segments,
                   "tree_heads": report.tree_heads, "problems": list(report.problems)})
    else:
        for problem in report.problems:
            click.echo(f"BROKEN: {safe(problem)}")
        if not report.problems:
            click.echo(f"archive intact: {report.entries} entries in {report.segments} segments, "
                       f"{report.tree_heads} signed tree heads verified and consistent")
    if report.problems:
        sys.exit(1)


@audit.command(name="accept-rollback")
@click.option("--reason", required=True, help="Why the loss is understood (recorded on the log).")
def accept_rollback(reason: str) -> None:
    """After a failover or restore lost sealed history: record the lost range and resume.

    An operator command on the broker's host (it moves this host's checkpoint file)."""
    if not reason.strip():
        raise InvalidInput("--reason: say why")
    with _local_broker() as (broker, actor):
        lost = broker.audit.accept_rollback(actor=actor, reason=reason)
    if lost is None:
        click.echo("nothing to accept: sealed history is not behind this host's checkpoint")
    else:
        click.echo(f"accepted: {lost}; sealing and dispatch resume (re-issue any revocation that was lost)")


@audit.command()
@click.option("-o", "--output", type=click.File("w"), default="-", help="File to write (default stdout).")
def export(output: Any) -> None:
    """Write every event as JSON Lines."""
    output.write(_api().call("GET", "/audit/export"))


# -- provenance ------------------------------------------------------------------------------
@cli.group(name="provenance")
def provenance_group() -> None:
    """Signed provenance of delivered changes (in-toto statements in DSSE envelopes)."""


@provenance_group.command(name="show")
@click.argument("ref")
@click.option("--repo", "repo", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Read the git note from this repository instead of the broker's stored envelope.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def provenance_show(ref: str, repo: Path | None, as_json: bool) -> None:
    """Show the provenance of REF (a commit sha or a task branch), verified or not."""
    from intake.cli.provenance import show

    show(_api(), load_settings(), ref, repo, as_json)


@provenance_group.command(name="verify")
@click.argument("ref")
@click.option("--repo", "repo", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Verify the git note in this repository (else the broker's stored envelope).")
@click.option("--offline", is_flag=True,
              help="With --repo: check the note with the public key alone (signature, subject, the approvals' "
                   "inclusion proof); no broker.")
@click.option("--public-key", "public_key", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              metavar="PEM", help="With --offline: the broker's public key(s) (default INTAKE_PUBLIC_KEY).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def provenance_verify(ref: str, repo: Path | None, offline: bool, public_key: Path | None, as_json: bool) -> None:
    """Check REF's provenance: the signature (public key alone), the subject, the approvals'
    inclusion proof against the signed tree head the note carries, and (online) every fact
    against the sealed audit log and that tree head's consistency with the broker's current
    one. Exit 1 with one line per failing check."""
    from intake.cli.provenance import verify, verify_offline

    if offline:
        if repo is None:
            raise InvalidInput("--offline reads the note from a repository: give --repo PATH")
        ok = verify_offline(public_key or load_settings().keys["public"], ref, repo, as_json)
    elif public_key is not None:
        raise InvalidInput("--public-key goes with --offline (online, the keyring is INTAKE_PUBLIC_KEY)")
    else:
        ok = verify(_api(), load_settings(), ref, repo, as_json)
    if not ok:
        sys.exit(1)


@cli.command()
@click.option("--since", default="7d", show_default=True, metavar="WHEN",
              help="Start of the window: a span back from now (7d, 24h, 30m) or an ISO date/time (UTC).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "html"]), default="text", show_default=True,
              help="text for a terminal, json for machines, html for a self-contained page with charts.")
@click.option("--by", type=click.Choice(["day", "week"]), default=None,
              help="Also show each indicator per period (from --since), with the change from the previous one.")
@click.option("-o", "--output", type=click.File("w"), default="-", metavar="FILE",
              help="File to write (default stdout).")
def report(since: str, fmt: str, by: str | None, output: Any) -> None:
    """The leading indicators (change-risk segmentation, provenance and dependency posture, time
    to promote and deliver, MFA failures, revoke to stop, gate blocks), their trend, and credential
    hygiene, from the sealed audit log."""
    from intake.operations.indicators.figures import Figures
    from intake.operations.indicators.render import render

    query = {"since": since, **({"by": by} if by else {})}
    figures = Figures.model_validate(_api().call("GET", "/report", query=query))
    output.write(render(figures, fmt))


# -- policy ----------------------------------------------------------------------------------
@cli.group()
def policy() -> None:
    """Policy as code."""


@policy.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check(file: Path) -> None:
    """Validate FILE; exit 2 naming the field and what is wrong."""
    from intake.core.policy import load_policy

    loaded = load_policy(file)
    click.echo(f"policy ok: {len(loaded.repos)} repos, version {loaded.version_hash[:12]}")


@policy.command(name="show")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def policy_show(as_json: bool) -> None:
    """Show the policy in force (INTAKE_POLICY) and its version hash."""
    from intake.core.policy import load_policy

    settings = load_settings()
    loaded = load_policy(settings.policy_path)
    if as_json:
        _out_json({"version_hash": loaded.version_hash, **loaded.model_dump(mode="json")})
        return
    click.echo(f"policy {settings.policy_path}  version {loaded.version} ({loaded.version_hash[:12]})")
    for repo in loaded.repos:
        tier = loaded.risk_tiers[repo.tier]
        need = ", ".join(f"{n} from {g}" for g, n in tier.require.items())
        click.echo(
            f"  {repo.name}: tier {repo.tier} ({tier.approvals} approval(s) from {'/'.join(tier.groups)}"
            f"{'; at least ' + need if need else ''}); change types {', '.join(repo.change_types)}"
        )


# -- keys ------------------------------------------------------------------------------------
@cli.group()
def keys() -> None:
    """The broker's key files."""


@keys.command()
@click.option("--force", is_flag=True, help="Replace existing keys (breaks the old audit chain).")
def generate(force: bool) -> None:
    """Write the signing key (0600), its public key, the audit, secrets and console keys (0600)."""
    from intake.protocol.keyfiles import generate_keys

    settings: Settings = load_settings()
    paths = generate_keys(settings, force=force)
    for purpose, path in paths.items():
        click.echo(f"{purpose}: {path}")


@keys.command()
def rotate() -> None:
    """A new signing key; workers accept tokens of the old one too until `keys retire`."""
    from intake.operations.keys import rotate_signing

    with _local_broker() as (broker, actor):
        new, old, seconds = rotate_signing(broker, actor=actor)
    click.echo(f"signing key rotated in {seconds}s: new {new}, old {old} still accepted "
               f"(run `intake keys retire {old}` once no token of it is live, e.g. after {2 * 120}s)")


@keys.command()
@click.argument("kid")
def retire(kid: str) -> None:
    """Drop KID from the public keyring (tokens signed with it stop verifying)."""
    from intake.operations.keys import retire_signing

    with _local_broker() as (broker, actor):
        retire_signing(broker, kid, actor=actor)
    click.echo(f"key {kid} retired")


# -- worker keys -----------------------------------------------------------------------------
@cli.group(name="worker-key")
def worker_key() -> None:
    """Agent workers' report keys (one per worker name, revocable)."""


@worker_key.command(name="issue")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the key file (default keys/workers/NAME.key in the data dir).")
@click.option("--queue", "queues", multiple=True, help="A queue NAME may serve (repeatable).")
@click.option("--repo", "repos", multiple=True, help="A repo NAME may work on (repeatable).")
@click.option("--change-type", "change_types", multiple=True, help="A change type NAME may make (repeatable).")
def worker_key_issue(name: str, output: Path | None, queues: tuple[str, ...], repos: tuple[str, ...],
                     change_types: tuple[str, ...]) -> None:
    """Issue worker NAME a new report key (any older one stops working at once).

    With --queue/--repo/--change-type, first register (a sealed ``worker.registered``) what
    NAME may serve, replacing any earlier registration: the broker grants a claim only to a
    worker registered for the task's queue, repo and change type. A worker never registered
    serves nothing."""
    from intake.protocol.keyfiles import write_worker_key
    from intake.tasks.worker_reports import issue_worker_key, worker_scope

    scope = worker_scope(queues, repos, change_types) if (queues or repos or change_types) else None
    with _local_broker() as (broker, actor):
        if scope is None and broker.ledger.follow().worker_scope(name) is None:
            raise InvalidInput(f"worker {name} is not registered: give --queue, --repo and --change-type")
        generation, key = issue_worker_key(broker, name, actor=actor, scope=scope)
        path = output or broker.settings.worker_key_path(name)
        write_worker_key(path, name, generation, key)
    click.echo(f"worker {name}: key generation {generation} written to {path} (mode 0600); "
               "give it to that worker only, as INTAKE_WORKER_KEY")


@worker_key.command(name="revoke")
@click.argument("name")
def worker_key_revoke(name: str) -> None:
    """Revoke worker NAME's key: its reports are refused from now on."""
    from intake.tasks.worker_reports import revoke_worker_key

    with _local_broker() as (broker, actor):
        revoke_worker_key(broker, name, actor=actor)
    click.echo(f"worker {name}: key revoked")



# -- redis -----------------------------------------------------------------------------------
@cli.group("redis")
def redis_group() -> None:
    """Redis set-up for a managed Redis 7+ / Valkey."""


_ACL_HOWTO = """\
# intake's Redis ACL users (key prefix {prefix!r}). The ACL SETUSER lines are on stdout:
#  1. replace every CHANGE-ME-<role> with its own long random password, e.g.
#     python3 -c 'import secrets; print(secrets.token_urlsafe(32))'
#  2. run them as an admin: redis-cli --user ADMIN --askpass < acl.txt   (then ACL SAVE, or
#     CONFIG REWRITE, so they outlive a restart)
#  3. turn the default user off (ACL SETUSER default off) once your admin user works
#  4. give each process its own user: broker INTAKE_REDIS_URL=redis://{prefix}-broker:PASSWORD@HOST/0,
#     each worker redis://{prefix}-worker:PASSWORD@HOST/0, dashboards {prefix}-readonly
"""


def _acl_prefix(prefix: str | None) -> str:
    if prefix is None:
        return load_settings().key_prefix
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", prefix):
        raise InvalidInput("--prefix: must be 1-32 characters of a-z, 0-9, _ or -, starting with a letter")
    return prefix


def _check_worker_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise InvalidInput("--worker: must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")


@redis_group.command("acl")
@click.option("--prefix", default=None, help="Key prefix the users are for (default: INTAKE_KEY_PREFIX).")
@click.option("--worker", "worker_name", default=None,
              help="Render the worker user for one worker (its own report stream only).")
@click.option("--queue", "queues", multiple=True,
              help="A queue the --worker is registered for (repeatable): its user then reaches only "
                   "those queues' RQ keys, not every rq:* key.")
@click.option("--no-selectors", is_flag=True,
              help="Flat rules for Redis 6.2 (no selectors: workers can then also overwrite leases "
                   "and delete report streams).")
def redis_acl(prefix: str | None, worker_name: str | None, queues: tuple[str, ...], no_selectors: bool) -> None:
    """Print ACL SETUSER lines for the broker, worker and read-only users (passwords as placeholders)."""
    from intake.core.redis_acl import setuser_commands

    prefix = _acl_prefix(prefix)
    if worker_name is not None:
        _check_worker_name(worker_name)
    if queues and worker_name is None:
        raise InvalidInput("--queue: needs --worker")
    for q in queues:
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", q):
            raise InvalidInput("--queue: must be a policy queue name ([a-z][a-z0-9_-]*)")
    click.echo(_ACL_HOWTO.format(prefix=prefix), err=True, nl=False)
    for line in setuser_commands(prefix, selectors=not no_selectors, worker=worker_name or "*",
                                 queues=queues or None):
        click.echo(line)


@redis_group.command("aclfile")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--prefix", default=None, help="Key prefix the users are for (default: INTAKE_KEY_PREFIX).")
@click.option("--worker", "workers", multiple=True,
              help="A worker to give its own user (repeatable); without it, one shared worker user.")
@click.option("--queue", "worker_queues", multiple=True, metavar="WORKER=QUEUE",
              help="A queue WORKER is registered for (repeatable): that worker's user then reaches "
                   "only its queues' RQ keys, not every rq:* key.")
@click.option("--host", default="redis:6379", show_default=True,
              help="HOST:PORT the Redis URLs written beside the file point at.")
@click.option("--no-selectors", is_flag=True, help="Flat rules for Redis 6.2 (see `redis acl`).")
def redis_aclfile(directory: Path, prefix: str | None, workers: tuple[str, ...], worker_queues: tuple[str, ...],
                  host: str, no_selectors: bool) -> None:
    """Write DIRECTORY/users.acl (password hashes only) and one 0600 Redis URL file per user.

    Each user gets a new random password; the ACL file holds only its SHA-256, so it can be
    mounted as plain configuration, while each ``<user>.url`` is a secret for one process."""
    import secrets as _secrets

    from intake.core.files import write_atomic
    from intake.core.redis_acl import aclfile, password_hash, user_names

    prefix = _acl_prefix(prefix)
    for w in workers:
        _check_worker_name(w)
    queues: dict[str, tuple[str, ...]] = {}
    for item in worker_queues:
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,63})=([a-z][a-z0-9_-]{0,63})", item)
        if match is None or match.group(1) not in workers:
            raise InvalidInput("--queue: must be WORKER=QUEUE, for a WORKER given with --worker")
        queues[match.group(1)] = (*queues.get(match.group(1), ()), match.group(2))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}:[0-9]{1,5}", host):
        raise InvalidInput("--host: must be HOST:PORT")
    directory.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, str] = {}
    for user in user_names(prefix, workers):
        password = _secrets.token_urlsafe(32)
        hashes[user] = password_hash(password)
        write_atomic(directory / f"{user}.url", f"redis://{user}:{password}@{host}/0\n".encode(), 0o600)
    write_atomic(directory / "users.acl",
                 aclfile(prefix, hashes, selectors=not no_selectors, workers=workers, queues=queues).encode(), 0o644)
    click.echo(f"wrote {directory / 'users.acl'} and {len(hashes)} URL files (mode 0600)")


# -- bootstrap -------------------------------------------------------------------------------
@cli.group()
def admin() -> None:
    """Bootstrap: the first admin (local, needs the broker's keys)."""


@admin.command(name="bootstrap")
@click.argument("person_id", callback=_casefold)
@click.option("--name", required=True, help="The admin's display name.")
def admin_bootstrap(person_id: str, name: str) -> None:
    """Create the first admin PERSON_ID (listed in the policy's [admins]) linked to your OS user.

    Runs locally as the broker's OS user (it reads the audit key to seal the record); refused
    once any admin exists. Everything else goes through the broker's API."""
    from intake.people.registry import People, bootstrap_admin
    from intake.runtime import open_broker

    user = os_user()
    with open_broker(load_settings()) as broker:
        person = bootstrap_admin(People(broker.store), broker.policy.admins.members, person_id, name=name,
                                 os_user=user, actor=f"os:{user}")
    click.echo(f"admin {person.id} created, linked to {', '.join(person.identities)}")
    click.echo(f"next: intake approver add {person.id} --name {safe(name)} --groups …")


def _code_option(func: Any) -> Any:
    return click.option(
        "--code", prompt="Authenticator code", hide_input=True, help="Your current TOTP code (prompted if omitted)."
    )(func)


def _behalf_option(func: Any) -> Any:
    return click.option(
        "--on-behalf-of", "on_behalf_of", metavar="PERSON",
        help="Admins: deny for PERSON, who has no channel of their own (audited; only deny can be relayed).",
    )(func)


# -- approvers -------------------------------------------------------------------------------
@cli.group()
def approver() -> None:
    """Register approvers and their authenticators."""


def _show_enrolment(enrolment: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _out_json(enrolment)
        return
    import io

    import qrcode

    qr = qrcode.QRCode(border=1)
    qr.add_data(enrolment["otpauth_uri"])
    buf = io.StringIO()
    qr.print_ascii(out=buf, invert=True)
    click.echo(buf.getvalue())
    click.echo(f"otpauth URI (shown once): {enrolment['otpauth_uri']}")
    click.echo(f"then: intake approver confirm {enrolment['id']} --code CODE")


def _enrolment_or(made: dict[str, Any], as_json: bool, line: str) -> None:
    """Show the secret when the answer holds one (it is the caller's own), else ``line``."""
    if "otpauth_uri" in made:
        _show_enrolment(made, as_json)
    elif as_json:
        _out_json(made)
    else:
        click.echo(line)


@approver.command(name="add")
@click.argument("approver_id", callback=_casefold)
@click.option("--name", required=True, help="The approver's display name.")
@click.option("--groups", required=True, help="Comma-separated policy groups that list this approver.")
@click.option("--slack-user", help="The approver's Slack user id (U…).")
@click.option("--email", help="The approver's email address (for notices; email never approves).")
@click.option("--code", help="Your (the admin's) current code; not needed to enrol yourself as the first admin.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def approver_add(approver_id: str, name: str, groups: str, slack_user: str | None, email: str | None,
                 code: str | None, as_json: bool) -> None:
    """Invite APPROVER_ID (a person) to become an approver; they enrol their own authenticator
    (`intake approver enrol`). Inviting yourself enrols you at once: your secret, shown once."""
    body = {"id": approver_id, "name": name, "groups": [g.strip() for g in groups.split(",") if g.strip()],
            "slack_user": slack_user, "email": email, "code": code}
    made = _api().call("POST", "/approvers", body)
    _enrolment_or(made, as_json, f"{made['id']} invited; they enrol their own authenticator: `intake approver "
                                 f"enrol {made['id']}` as their own OS user, or the console's link sent to their Slack DM")


@approver.command(name="enrol")
@click.argument("approver_id", callback=_casefold)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def approver_enrol(approver_id: str, as_json: bool) -> None:
    """Enrol your own authenticator (you are APPROVER_ID, invited or reset): a fresh TOTP secret,
    shown once, to you alone (run it as your own OS user on the broker host, or with your own token)."""
    _show_enrolment(_api().call("POST", f"/approvers/{seg(approver_id)}/enrol", {}), as_json)


@approver.command(name="confirm")
@click.argument("approver_id", callback=_casefold)
@_code_option
def approver_confirm(approver_id: str, code: str) -> None:
    """Activate APPROVER_ID (yourself) by proving one valid code."""
    _api().call("POST", f"/approvers/{seg(approver_id)}/confirm", {"code": code})
    click.echo(f"approver {approver_id} confirmed")


@approver.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def approver_list(as_json: bool) -> None:
    """Registered approvers (never their secrets)."""
    rows = _api().call("GET", "/approvers")
    if as_json:
        _out_json(rows)
        return
    if not rows:
        click.echo("no approvers")
        return
    table_rows = [[r["id"], r["name"], ",".join(r["groups"]), r["slack_user"], r.get("email"),
                   ("confirmed" if r["confirmed"] else "unconfirmed") + (", LOCKED" if r["locked"] else "")] for r in rows]
    for line in table(["id", "name", "groups", "slack", "email", "status"], table_rows):
        click.echo(line)


@approver.command(name="remove")
@click.argument("approver_id", callback=_casefold)
def approver_remove(approver_id: str) -> None:
    """Remove APPROVER_ID; their approvals stop counting (admins; no code: it takes power away)."""
    _api().call("DELETE", f"/approvers/{seg(approver_id)}")
    click.echo(f"approver {approver_id} removed")


@approver.command(name="reset")
@click.argument("approver_id", callback=_casefold)
@_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def approver_reset(approver_id: str, code: str, as_json: bool) -> None:
    """Reset APPROVER_ID's factors. Yourself: a new secret (shown once), the old one and your
    passkeys stop working at once. Someone else (admins, with their code): their factors are
    revoked; they enrol again."""
    made = _api().call("POST", f"/approvers/{seg(approver_id)}/reset", {"code": code})
    _enrolment_or(made, as_json, f"{approver_id}'s authenticator and passkeys are revoked; they enrol again "
                                 f"(`intake approver enrol {approver_id}`)")


@approver.command(name="unlock")
@click.argument("approver_id", callback=_casefold)
@_code_option
def approver_unlock(approver_id: str, code: str) -> None:
    """Clear APPROVER_ID's failed-code lock (admins, with their code)."""
    _api().call("POST", f"/approvers/{seg(approver_id)}/unlock", {"code": code})
    click.echo(f"approver {approver_id} unlocked")


# -- people and tokens -----------------------------------------------------------------------
@cli.group()
def person() -> None:
    """People and their linked identities (slack:U…, email:…, github:…, gitlab:…, jira:…, os:…)."""


def _print_person(found: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _out_json(found)
        return
    pairs = [("person", found["id"]), ("name", found["name"]), ("identities", found["identities"])]
    pairs += [(k.replace("_", " "), v) for k, v in sorted(found.items()) if k not in {"id", "name", "identities"}]
    for line in fields(pairs):
        click.echo(line)


@person.command(name="add")
@click.argument("person_id", callback=_casefold)
@click.option("--name", required=True, help="The person's display name.")
@click.option("--link", "links", multiple=True, metavar="IDENTITY", help="An identity to link (repeatable).")
@_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def person_add(person_id: str, name: str, links: tuple[str, ...], code: str, as_json: bool) -> None:
    """Add PERSON_ID (admins, with their code)."""
    body = {"id": person_id, "name": name, "identities": list(links), "code": code}
    _print_person(_api().call("POST", "/people", body), as_json)


@person.command(name="link")
@click.argument("person_id", callback=_casefold)
@click.argument("identity")
@_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def person_link(person_id: str, identity: str, code: str, as_json: bool) -> None:
    """Link IDENTITY to PERSON_ID (admins, with their code: a link lets that identity act as them)."""
    _print_person(_api().call("POST", f"/people/{seg(person_id)}/links", {"identity": identity, "code": code}),
                  as_json)


@person.command(name="unlink")
@click.argument("person_id", callback=_casefold)
@click.argument("identity")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def person_unlink(person_id: str, identity: str, as_json: bool) -> None:
    """Unlink IDENTITY from PERSON_ID (admins; no code: it takes power away)."""
    _print_person(_api().call("DELETE", f"/people/{seg(person_id)}/links/{seg(identity)}"), as_json)


@person.command(name="show")
@click.argument("person_id", callback=_casefold)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def person_show(person_id: str, as_json: bool) -> None:
    """PERSON_ID: their identities and API tokens (ids only)."""
    _print_person(_api().call("GET", f"/people/{seg(person_id)}"), as_json)


@person.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def person_list(as_json: bool) -> None:
    """Every person and their linked identities."""
    rows = _api().call("GET", "/people")
    if as_json:
        _out_json(rows)
        return
    if not rows:
        click.echo("no people")
        return
    for line in table(["id", "name", "identities"], [[r["id"], r["name"], " ".join(r["identities"])] for r in rows],
                      limit=100):
        click.echo(line)


@cli.group()
def token() -> None:
    """Per-person API tokens for callers over TCP (INTAKE_TOKEN)."""


@token.command(name="create")
@click.argument("person_id", callback=_casefold)
@_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def token_create(person_id: str, code: str, as_json: bool) -> None:
    """A new API token for PERSON_ID, shown once. Your own (your code): it can do what you can.
    An admin's for someone else (the admin's code): it only reads and files ideas."""
    made = _api().call("POST", f"/people/{seg(person_id)}/tokens", {"code": code})
    if as_json:
        _out_json(made)
    else:
        click.echo(f"token {made['id']} for {made['person']}, scope {made['scope']} (shown once): {made['token']}")


@token.command(name="revoke")
@click.argument("token_id")
def token_revoke(token_id: str) -> None:
    """Revoke the API token TOKEN_ID at once (admins; no code)."""
    _api().call("DELETE", f"/tokens/{seg(token_id)}")
    click.echo(f"token {token_id} revoked")


# -- credentials intake does not issue -------------------------------------------------------
@cli.group()
def credentials() -> None:
    """Credentials intake does not issue (Slack, forge tokens): declare their rotations."""


@credentials.command(name="rotated")
@click.argument("name")
@_code_option
def credentials_rotated(name: str, code: str) -> None:
    """Record that NAME (slack-bot, slack-signing, slack-app, forge-token, …) was rotated today
    (admins, with their code); the report ages it from here."""
    _api().call("POST", f"/credentials/{seg(name)}/rotated", {"code": code})
    click.echo(f"credential {name}: rotation recorded")


# -- promotion -------------------------------------------------------------------------------
def _print_decision(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _out_json(data)
        return
    click.echo(f"task {data['task']}: {data['status']} ({data['approvals']} of {data['required']} approvals) "
               f"spec {data['spec_hash'][:12]}")


@cli.command()
@click.argument("idea_id")
@click.option("--repo", required=True, help="The policy repo the task works on (owner/name).")
@click.option("--change-type", required=True, help="One of the repo's change types in the policy (docs, tests, …).")
@click.option("--note", default="", help="A note for the audit log and the other approvers.")
@_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def promote(idea_id: str, repo: str, change_type: str, note: str, code: str,
            as_json: bool) -> None:
    """Promote IDEA_ID into a task and record your approval (you are who the broker says)."""
    body = {"repo": repo, "change_type": change_type, "note": note, "code": code,}
    _print_decision(_api().call("POST", f"/ideas/{seg(resolve_id(idea_id, 'I'))}/promote", body), as_json)


@cli.command()
@click.argument("task_id")
@click.option("--spec-hash", help="The spec hash you reviewed; refused if the task changed since.")
@click.option("--note", default="", help="A note for the audit log and the other approvers.")
@_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def approve(task_id: str, spec_hash: str | None, note: str, code: str,
            as_json: bool) -> None:
    """Add your approval to TASK_ID's current spec."""
    body = {"spec_hash": spec_hash, "note": note, "code": code,}
    _print_decision(_api().call("POST", f"/tasks/{seg(resolve_id(task_id, 'T'))}/approve", body), as_json)


@cli.command()
@click.argument("task_id")
@click.option("--sha", required=True, help="The result commit you reviewed (refs/intake/TASK_ID).")
@click.option("--diff-sha256", "diff_sha256", help="The sha256 of the diff you reviewed (`intake show TASK --diff`).")
@click.option("--note", default="", help="A note for the audit log and the other approvers.")
@_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def accept(task_id: str, sha: str, diff_sha256: str | None, note: str, code: str, as_json: bool) -> None:
    """Approve TASK_ID's result, commit SHA and the diff you reviewed, so it may be delivered."""
    body = {"sha": sha, "diff_sha256": diff_sha256, "note": note, "code": code}
    data = _api().call("POST", f"/tasks/{seg(resolve_id(task_id, 'T'))}/accept", body)
    if as_json:
        _out_json(data)
    else:
        click.echo(f"task {data['task']}: {data['status']} (result {sha[:12]} approved by "
                   f"{', '.join(data['result_approvals'])})")


@cli.command()
@click.argument("ident")
@click.option("--reason", required=True, help="Why (shown to the requester and on the audit log).")
@_behalf_option
def deny(ident: str, reason: str, on_behalf_of: str | None) -> None:
    """Deny IDENT, an idea or a task that has not started (deny beats approve; no code needed)."""
    ident = resolve_id(ident)
    kind = "tasks" if ident.startswith("T-") else "ideas"
    ended = _api().call("POST", f"/{kind}/{seg(ident)}/deny", {"reason": reason, "on_behalf_of": on_behalf_of})
    click.echo(f"{ended['id']} denied")


@cli.command()
@click.argument("task_id")
@click.option("--repo", help="The new repo (owner/name).")
@click.option("--change-type", help="The new change type.")
@_code_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def amend(task_id: str, repo: str | None, change_type: str | None, code: str,
          as_json: bool) -> None:
    """Change TASK_ID's spec; every approval is discarded."""
    if repo is None and change_type is None:
        raise InvalidInput("amend: give --repo and/or --change-type")
    body = {"repo": repo, "change_type": change_type, "code": code,}
    task = _api().call("POST", f"/tasks/{seg(resolve_id(task_id, 'T'))}/amend", body)
    if as_json:
        _out_json(task)
    else:
        click.echo(f"task {task['id']} amended: spec {task['spec_hash'][:12]}, approvals start over "
                   f"(0 of {task['required']})")


@cli.command()
@click.argument("task_id")
@click.option("--reason", required=True, help="Why the task is stopped (on the audit log).")
def revoke(task_id: str, reason: str) -> None:
    """Stop TASK_ID for good: its requester or any approver (no code needed to stop work)."""
    task = _api().call("POST", f"/tasks/{seg(resolve_id(task_id, 'T'))}/revoke", {"reason": reason})
    click.echo(f"task {task['id']} revoked")


@cli.command()
@click.option("--reason", required=True, help="Why everything stops (on the audit log).")
def freeze(reason: str) -> None:
    """Kill switch: no task starts until `intake thaw` (admins and approvers; no code)."""
    _api().call("POST", "/freeze", {"reason": reason})
    click.echo("intake frozen: no task will start")


@cli.command()
@_code_option
def thaw(code: str) -> None:
    """Lift the kill switch (admins, with their code)."""
    _api().call("POST", "/thaw", {"code": code})
    click.echo("intake thawed: tasks may start")


# -- worker ----------------------------------------------------------------------------------
@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Worker settings (TOML): queues, repos and credential sources, agent.")
@click.option("--burst", is_flag=True, help="Quit when the queues are empty.")
@click.option("--exit-with-parent", is_flag=True, hidden=True,
              help="Stop when the parent process exits (the embedded dev worker).")
def worker(config_path: Path, burst: bool, exit_with_parent: bool) -> None:
    """Run an agent worker: take tasks from RQ, verify them, run them, report back."""
    from intake.workers.worker import run_worker

    run_worker(load_settings(), config_path, burst=burst, exit_with_parent=exit_with_parent)
