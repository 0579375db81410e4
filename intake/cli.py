"""The ``intake`` command line.

Every command reads settings at run time (never at import), opens the broker for its duration
and closes it. Errors are one line on stderr with a non-zero exit, never a traceback. Untrusted
text is shown through :func:`intake.terminal.safe`; ``--json`` output is ASCII-escaped JSON.
"""

from __future__ import annotations

import getpass
import json
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import redis

from intake.errors import AuditBroken, IntakeError, InvalidInput
from intake.models import Channel, Idea, IdeaDraft, Task
from intake.runtime import Broker, open_broker
from intake.settings import Settings, load_settings
from intake.terminal import safe

_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,39}$")


def _out_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=True, sort_keys=True))


@contextmanager
def _broker() -> Iterator[Broker]:
    with open_broker(load_settings()) as broker:
        yield broker


def local_identity(name: str | None) -> str:
    """The CLI channel's requester: ``--as NAME`` for scripts, else the local user."""
    user = name if name is not None else getpass.getuser()
    if not _NAME.match(user):
        raise InvalidInput(f"--as: {user!r} is not a valid name (a-z, 0-9, '.', '_', '-')")
    return user


def idea_json(idea: Idea) -> dict[str, Any]:
    return idea.model_dump(mode="json")


def task_json(task: Task) -> dict[str, Any]:
    """A task for display (tokens never sit on a task record, so none can be printed)."""
    data = task.model_dump(mode="json")
    data["approvals_count"] = len(task.approvals)
    return data


def _print_idea(idea: Idea) -> None:
    click.echo(f"{idea.id}  {idea.state.value}  from {safe(idea.requester)} via {idea.channel.value}")
    if idea.task_id:
        click.echo(f"task: {idea.task_id}")
    if idea.reason:
        click.echo(f"reason: {safe(idea.reason)}")
    click.echo(f"title: {safe(idea.title)}")
    click.echo("text (untrusted):")
    for line in safe(idea.text).splitlines() or [""]:
        click.echo(f"  | {line}")


def _print_task(task: Task) -> None:
    spec = task.spec
    click.echo(f"{task.id}  {task.state.value}  {spec.repo} ({spec.change_type})  idea {task.idea_id}")
    click.echo(f"spec {task.spec_hash}  policy {spec.policy_version[:12]}  tier {task.risk_tier}")
    approvers = ", ".join(a.approver for a in task.approvals) or "none"
    click.echo(f"approvals: {len(task.approvals)} of {task.required} ({approvers})")
    if task.reason:
        click.echo(f"reason: {safe(task.reason)}")
    if task.result:
        for key, value in sorted(task.result.items()):
            click.echo(f"{key}: {safe(str(value))}")


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
        except redis.RedisError as exc:
            click.echo(f"intake: Redis error: {type(exc).__name__}", err=True)
            sys.exit(1)
        except Exception as exc:  # the last line of defence: still one line, no traceback
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
def serve(dev: bool) -> None:
    """Run the broker's web app (GET /healthz, /readyz; channels mount here)."""
    from intake.serve import run

    run(load_settings(), dev=dev)


# -- ideas -----------------------------------------------------------------------------------
@cli.command()
@click.argument("text")
@click.option("--as", "as_name", metavar="NAME", help="Requester name (for scripts); default: local user.")
@click.option("--title", default="", help="A short title; default: the first line of TEXT.")
@click.option("--delivery-id", help="Idempotency key: the same id twice files one idea.")
@click.option("--json", "as_json", is_flag=True, help="Print the idea as JSON.")
def idea(text: str, as_name: str | None, title: str, delivery_id: str | None, as_json: bool) -> None:
    """File TEXT as an untrusted idea (the CLI channel). TEXT '-' reads standard input."""
    if text == "-":
        text = sys.stdin.read()
    requester = f"cli:{local_identity(as_name)}"
    try:
        draft = IdeaDraft(
            channel=Channel.CLI,
            requester=requester,
            delivery_id=delivery_id or f"cli-{uuid.uuid4()}",
            text=text,
            title=title,
            provenance={"host_user": getpass.getuser()},
        )
    except ValueError as exc:
        raise InvalidInput(f"invalid idea: {exc.errors()[0]['msg']}") from None  # type: ignore[attr-defined]
    with _broker() as broker:
        captured, created = broker.store.capture(draft, ttl_s=broker.policy.clocks.idea_ttl)
    if as_json:
        _out_json({**idea_json(captured), "created": created})
    else:
        verb = "captured" if created else "already captured"
        click.echo(f"{verb} {captured.id}: {safe(captured.title)}")


@cli.command(name="list")
@click.option("--all", "show_all", is_flag=True, help="Recent ideas in every state, not only pending.")
@click.option("--tasks", is_flag=True, help="List tasks (open ones, or recent with --all).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True)
def list_cmd(show_all: bool, tasks: bool, limit: int, as_json: bool) -> None:
    """List pending ideas (or tasks)."""
    with _broker() as broker:
        store = broker.store
        if tasks:
            items: list[Any] = store.recent_tasks(limit) if show_all else store.open_tasks()[:limit]
        else:
            items = store.recent_ideas(limit) if show_all else store.pending_ideas()[:limit]
    if as_json:
        _out_json([task_json(i) if tasks else idea_json(i) for i in items])
        return
    for item in items:
        if tasks:
            click.echo(f"{item.id}  {item.state.value:<18} {item.spec.repo} {item.spec.change_type}")
        else:
            click.echo(f"{item.id}  {item.state.value:<18} {safe(item.requester):<20} {safe(item.title)}")
    if not items:
        click.echo("nothing pending" if not show_all else "nothing yet")


@cli.command()
@click.argument("ident")
@click.option("--json", "as_json", is_flag=True)
def show(ident: str, as_json: bool) -> None:
    """Show an idea (I-…) or a task (T-…)."""
    with _broker() as broker:
        if ident.startswith("T-"):
            task = broker.store.get_task(ident)
            _out_json(task_json(task)) if as_json else _print_task(task)
        else:
            found = broker.store.get_idea(ident)
            _out_json(idea_json(found)) if as_json else _print_idea(found)


# -- audit -----------------------------------------------------------------------------------
@cli.group()
def audit() -> None:
    """The sealed audit log."""


@audit.command()
@click.option("--json", "as_json", is_flag=True)
def verify(as_json: bool) -> None:
    """Check the whole chain and list every anomaly; exit 1 when sealed history was changed."""
    with _broker() as broker:
        broker.audit.kick()
        try:
            report = broker.audit.verify()
            broken: AuditBroken | None = None
        except AuditBroken as exc:
            report, broken = exc.report, exc  # type: ignore[assignment]
    anomalies = list(report.anomalies) if report is not None else []
    if as_json:
        _out_json({"ok": broken is None, "events": report.events if report else None,
                   "unsealed": report.unsealed if report else None,
                   "anomalies": [a.as_json() for a in anomalies],
                   **({"event": broken.event_id, "error": str(broken)} if broken else {})})
    else:
        for anomaly in anomalies:
            click.echo(f"{'BROKEN' if anomaly.fatal else 'rejected'}: {anomaly.message}")
        if broken is None:
            rejected = f", {report.rejected} rejected entries (sealed as not genuine)" if report.rejected else ""
            click.echo(f"audit log intact: {report.events} events{rejected}")
    if broken is not None:
        if not as_json:
            raise broken
        sys.exit(1)


@audit.command(name="accept-rollback")
@click.option("--reason", required=True, help="Why the loss is understood (recorded on the log).")
def accept_rollback(reason: str) -> None:
    """After a failover or restore lost sealed history: record the lost range and resume."""
    if not reason.strip():
        raise InvalidInput("--reason: say why")
    with _broker() as broker:
        lost = broker.audit.accept_rollback(actor=f"cli:{local_identity(None)}", reason=reason)
    if lost is None:
        click.echo("nothing to accept: sealed history is not behind this host's checkpoint")
    else:
        click.echo(f"accepted: {lost}; sealing and dispatch resume (re-issue any revocation that was lost)")


@audit.command()
@click.option("-o", "--output", type=click.File("w"), default="-", help="File to write (default stdout).")
def export(output: Any) -> None:
    """Write every event as JSON Lines."""
    with _broker() as broker:
        for record in broker.audit.export():
            output.write(json.dumps(record, ensure_ascii=True, sort_keys=True) + "\n")


# -- policy ----------------------------------------------------------------------------------
@cli.group()
def policy() -> None:
    """Policy as code."""


@policy.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def check(file: Path) -> None:
    """Validate FILE; exit 2 naming the field and what is wrong."""
    from intake.policy import load_policy

    loaded = load_policy(file)
    click.echo(f"policy ok: {len(loaded.repos)} repos, version {loaded.version_hash[:12]}")


@policy.command(name="show")
@click.option("--json", "as_json", is_flag=True)
def policy_show(as_json: bool) -> None:
    """Show the policy in force (INTAKE_POLICY) and its version hash."""
    from intake.policy import load_policy

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
    """Write the signing key (0600), its public key, the audit key and the secrets key."""
    from intake.keys import generate_keys

    settings: Settings = load_settings()
    paths = generate_keys(settings, force=force)
    for purpose, path in paths.items():
        click.echo(f"{purpose}: {path}")


@keys.command()
def rotate() -> None:
    """A new signing key; workers accept tokens of the old one too until `keys retire`."""
    import time

    from intake.keys import rotate_signing_key

    started = time.monotonic()
    with _broker() as broker:
        new, old = rotate_signing_key(broker.settings)
        seconds = round(time.monotonic() - started, 3)
        broker.audit.record(f"cli:{local_identity(None)}", "keys.rotated", "broker", new_kid=new, old_kid=old,
                            seconds=seconds)
    click.echo(f"signing key rotated in {seconds}s: new {new}, old {old} still accepted "
               f"(run `intake keys retire {old}` once no token of it is live, e.g. after {2 * 120}s)")


@keys.command()
@click.argument("kid")
def retire(kid: str) -> None:
    """Drop KID from the public keyring (tokens signed with it stop verifying)."""
    from intake.keys import retire_public_key

    with _broker() as broker:
        retire_public_key(broker.settings, kid)
        broker.audit.record(f"cli:{local_identity(None)}", "keys.retired", "broker", kid=kid)
    click.echo(f"key {kid} retired")


# -- worker keys -----------------------------------------------------------------------------
@cli.group(name="worker-key")
def worker_key() -> None:
    """Agent workers' report keys (one per worker name, revocable)."""


@worker_key.command(name="issue")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the key file (default keys/workers/NAME.key in the data dir).")
def worker_key_issue(name: str, output: Path | None) -> None:
    """Issue worker NAME a new report key (any older one stops working at once)."""
    from intake.keys import write_worker_key
    from intake.reports import issue_worker_key

    with _broker() as broker:
        generation, key = issue_worker_key(broker, name, actor=f"cli:{local_identity(None)}")
        path = output or broker.settings.worker_key_path(name)
        write_worker_key(path, name, generation, key)
    click.echo(f"worker {name}: key generation {generation} written to {path} (mode 0600); "
               "give it to that worker only, as INTAKE_WORKER_KEY")


@worker_key.command(name="revoke")
@click.argument("name")
def worker_key_revoke(name: str) -> None:
    """Revoke worker NAME's key: its reports are refused from now on."""
    from intake.reports import revoke_worker_key

    with _broker() as broker:
        revoke_worker_key(broker, name, actor=f"cli:{local_identity(None)}")
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


@redis_group.command("acl")
@click.option("--prefix", default=None, help="Key prefix the users are for (default: INTAKE_KEY_PREFIX).")
@click.option("--worker", "worker_name", default=None,
              help="Render the worker user for one worker (its own report stream only).")
@click.option("--no-selectors", is_flag=True,
              help="Flat rules for Redis 6.2 (no selectors: workers can then also overwrite leases "
                   "and delete report streams).")
def redis_acl(prefix: str | None, worker_name: str | None, no_selectors: bool) -> None:
    """Print ACL SETUSER lines for the broker, worker and read-only users (passwords as placeholders)."""
    from intake.redis_acl import setuser_commands

    if prefix is None:
        prefix = load_settings().key_prefix
    elif not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", prefix):
        raise InvalidInput("--prefix: must be 1-32 characters of a-z, 0-9, _ or -, starting with a letter")
    if worker_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", worker_name):
        raise InvalidInput("--worker: must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")
    click.echo(_ACL_HOWTO.format(prefix=prefix), err=True, nl=False)
    for line in setuser_commands(prefix, selectors=not no_selectors, worker=worker_name or "*"):
        click.echo(line)


# -- approvers -------------------------------------------------------------------------------
@cli.group()
def approver() -> None:
    """Register approvers and their authenticators."""


def _show_enrolment(enrolment: Any, as_json: bool) -> None:
    if as_json:
        _out_json({"id": enrolment.approver.id, "otpauth_uri": enrolment.otpauth_uri, "confirmed": False})
        return
    import io

    import qrcode

    qr = qrcode.QRCode(border=1)
    qr.add_data(enrolment.otpauth_uri)
    buf = io.StringIO()
    qr.print_ascii(out=buf, invert=True)
    click.echo(buf.getvalue())
    click.echo(f"otpauth URI (shown once): {enrolment.otpauth_uri}")
    click.echo(f"then: intake approver confirm {enrolment.approver.id} --code CODE")


def _code_option(func: Any) -> Any:
    return click.option(
        "--code", prompt="Authenticator code", hide_input=True, help="The current TOTP code (prompted if omitted)."
    )(func)


@approver.command(name="add")
@click.argument("approver_id")
@click.option("--name", required=True)
@click.option("--groups", required=True, help="Comma-separated policy groups that list this approver.")
@click.option("--slack-user", help="The approver's Slack user id (U…).")
@click.option("--email")
@click.option("--json", "as_json", is_flag=True)
def approver_add(approver_id: str, name: str, groups: str, slack_user: str | None, email: str | None,
                 as_json: bool) -> None:
    """Create APPROVER_ID with a fresh TOTP secret, shown once as a URI and QR code."""
    group_list = tuple(g.strip() for g in groups.split(",") if g.strip())
    with _broker() as broker:
        enrolment = broker.approvers.add(
            broker.policy, approver_id, name=name, groups=group_list, slack_user=slack_user,
            email=email, actor=f"cli:{local_identity(None)}",
        )
    _show_enrolment(enrolment, as_json)


@approver.command(name="confirm")
@click.argument("approver_id")
@_code_option
def approver_confirm(approver_id: str, code: str) -> None:
    """Activate APPROVER_ID by proving one valid code."""
    with _broker() as broker:
        broker.approvers.confirm(approver_id, code, actor=f"approver:{approver_id}")
    click.echo(f"approver {approver_id} confirmed")


@approver.command(name="list")
@click.option("--json", "as_json", is_flag=True)
def approver_list(as_json: bool) -> None:
    """Registered approvers (never their secrets)."""
    with _broker() as broker:
        rows = [
            {"id": a.id, "name": a.name, "groups": list(broker.policy.groups_of(a.id)),
             "slack_user": a.slack_user, "email": a.email, "confirmed": a.confirmed,
             "locked": broker.approvers.is_locked(a.id)}
            for a in broker.approvers.all()
        ]
    if as_json:
        _out_json(rows)
        return
    for row in rows:
        flags = ("confirmed" if row["confirmed"] else "unconfirmed") + (", LOCKED" if row["locked"] else "")
        click.echo(f"{row['id']:<12} {safe(row['name']):<20} {','.join(row['groups']) or '-':<18} "
                   f"{row['slack_user'] or '-':<12} {flags}")
    if not rows:
        click.echo("no approvers")


@approver.command(name="remove")
@click.argument("approver_id")
def approver_remove(approver_id: str) -> None:
    """Remove APPROVER_ID; their approvals stop counting."""
    with _broker() as broker:
        broker.approvers.remove(approver_id, actor=f"cli:{local_identity(None)}")
    click.echo(f"approver {approver_id} removed")


@approver.command(name="reset")
@click.argument("approver_id")
@click.option("--json", "as_json", is_flag=True)
def approver_reset(approver_id: str, as_json: bool) -> None:
    """Give APPROVER_ID a new secret; the old one stops working at once."""
    with _broker() as broker:
        enrolment = broker.approvers.reset(approver_id, actor=f"cli:{local_identity(None)}")
    _show_enrolment(enrolment, as_json)


@approver.command(name="unlock")
@click.argument("approver_id")
def approver_unlock(approver_id: str) -> None:
    """Clear APPROVER_ID's failed-code lock."""
    with _broker() as broker:
        broker.approvers.unlock(approver_id, actor=f"cli:{local_identity(None)}")
    click.echo(f"approver {approver_id} unlocked")


# -- promotion -------------------------------------------------------------------------------
def _print_decision(decision: Any, as_json: bool) -> None:
    data = decision.as_json()
    if as_json:
        _out_json(data)
        return
    click.echo(f"task {data['task']}: {data['status']} ({data['approvals']} of {data['required']} approvals) "
               f"spec {data['spec_hash'][:12]}")


@cli.command()
@click.argument("idea_id")
@click.option("--repo", required=True)
@click.option("--change-type", required=True)
@click.option("--as", "as_name", required=True, metavar="APPROVER")
@click.option("--note", default="")
@_code_option
@click.option("--json", "as_json", is_flag=True)
def promote(idea_id: str, repo: str, change_type: str, as_name: str, note: str, code: str, as_json: bool) -> None:
    """Promote IDEA_ID into a task and record the first approval."""
    with _broker() as broker:
        decision = broker.gatekeeper.promote(
            idea_id, repo=repo, change_type=change_type, approver_id=as_name, code=code, note=note
        )
    _print_decision(decision, as_json)


@cli.command()
@click.argument("task_id")
@click.option("--as", "as_name", required=True, metavar="APPROVER")
@click.option("--spec-hash", help="The spec hash you reviewed; refused if the task changed since.")
@click.option("--note", default="")
@_code_option
@click.option("--json", "as_json", is_flag=True)
def approve(task_id: str, as_name: str, spec_hash: str | None, note: str, code: str, as_json: bool) -> None:
    """Add an approval to TASK_ID's current spec."""
    with _broker() as broker:
        decision = broker.gatekeeper.approve(
            task_id, approver_id=as_name, code=code, spec_hash=spec_hash, note=note
        )
    _print_decision(decision, as_json)


@cli.command()
@click.argument("task_id")
@click.option("--sha", required=True, help="The result commit you reviewed (refs/intake/TASK_ID).")
@click.option("--as", "as_name", required=True, metavar="APPROVER")
@click.option("--note", default="")
@_code_option
@click.option("--json", "as_json", is_flag=True)
def accept(task_id: str, sha: str, as_name: str, note: str, code: str, as_json: bool) -> None:
    """Approve TASK_ID's result, commit SHA, so it may be delivered as a branch and PR."""
    with _broker() as broker:
        decision = broker.gatekeeper.accept(task_id, approver_id=as_name, code=code, sha=sha, note=note)
    task = decision.task
    if as_json:
        _out_json({"task": task.id, "status": task.state.value, "sha": sha,
                   "result_approvals": [a.approver for a in task.result_approvals]})
    else:
        click.echo(f"task {task.id}: {task.state.value} (result {sha[:12]} approved by "
                   f"{', '.join(a.approver for a in task.result_approvals)})")


@cli.command()
@click.argument("ident")
@click.option("--as", "as_name", required=True, metavar="APPROVER")
@click.option("--reason", required=True)
def deny(ident: str, as_name: str, reason: str) -> None:
    """Deny an idea or a task that has not started (deny beats approve)."""
    with _broker() as broker:
        ended = broker.gatekeeper.deny(ident, approver_id=as_name, reason=reason)
    click.echo(f"{ended.id} denied")


@cli.command()
@click.argument("task_id")
@click.option("--as", "as_name", required=True, metavar="APPROVER")
@click.option("--repo")
@click.option("--change-type")
@click.option("--json", "as_json", is_flag=True)
def amend(task_id: str, as_name: str, repo: str | None, change_type: str | None, as_json: bool) -> None:
    """Change TASK_ID's spec; every approval is discarded."""
    if repo is None and change_type is None:
        raise InvalidInput("amend: give --repo and/or --change-type")
    with _broker() as broker:
        task = broker.gatekeeper.amend(task_id, approver_id=as_name, repo=repo, change_type=change_type)
    if as_json:
        _out_json(task_json(task))
    else:
        click.echo(f"task {task.id} amended: spec {task.spec_hash[:12]}, approvals start over (0 of {task.required})")


@cli.command()
@click.argument("task_id")
@click.option("--as", "as_name", metavar="NAME", help="Who revokes (the requester or an approver).")
@click.option("--reason", required=True)
def revoke(task_id: str, as_name: str | None, reason: str) -> None:
    """Stop TASK_ID for good (no code needed to stop work)."""
    name = local_identity(as_name)
    with _broker() as broker:
        try:
            broker.approvers.get(name)
            is_approver = True
        except IntakeError:
            is_approver = False
        task = broker.gatekeeper.revoke(task_id, identity=f"cli:{name}", is_approver=is_approver, reason=reason)
    click.echo(f"task {task.id} revoked")


@cli.command()
@click.option("--as", "as_name", metavar="NAME")
@click.option("--reason", required=True)
def freeze(as_name: str | None, reason: str) -> None:
    """Kill switch: no task starts until `intake thaw`."""
    with _broker() as broker:
        broker.gatekeeper.freeze(actor=f"cli:{local_identity(as_name)}", reason=reason)
    click.echo("intake frozen: no task will start")


@cli.command()
@click.option("--as", "as_name", metavar="NAME")
def thaw(as_name: str | None) -> None:
    """Lift the kill switch."""
    with _broker() as broker:
        broker.gatekeeper.thaw(actor=f"cli:{local_identity(as_name)}")
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
    from workers.worker import run_worker

    run_worker(load_settings(), config_path, burst=burst, exit_with_parent=exit_with_parent)
