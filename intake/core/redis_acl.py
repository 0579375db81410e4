"""Redis ACL users per role: who may touch which keys with which commands.

Redis is storage, not authority (DESIGN.md, boundary 6), but a worker host is the likeliest to be
compromised, so its Redis user is kept away from everything the broker decides on. Three roles,
each an ACL user named ``<prefix>-<role>``:

- ``broker``: every key under ``<prefix>:`` and RQ's ``rq:*``, every command except the
  ``@dangerous`` ones (FLUSHALL, KEYS, CONFIG, DEBUG, SHUTDOWN, ACL, MONITOR, …) plus INFO.
- ``worker``: RQ's keys (a named worker's: its queues' only) and the commands an RQ ``SimpleWorker`` uses on them (no scripting,
  no PUBLISH, no CLIENT LIST), SUBSCRIBE on ``rq:pubsub:*``, GET on lease keys and XADD on the
  report streams. Nothing else under ``<prefix>:``: no task, nonce, freeze, audit, approver or
  idea key, for reading or writing.
- ``readonly``: ``+@read`` on every key, for dashboards.

The roles are data (:data:`ROLES`), rendered per key prefix. On Redis 7+ / Valkey the worker's
lease and report grants are ACL *selectors* (``(%R~<prefix>:lease:* +get)``), so the worker can
GET a lease but not overwrite it, and XADD a report but not delete a stream. Redis 6.2 (the
embedded server) has neither selectors nor ``%R~``: there the grants are merged into the user's
flat key patterns and command list, so a worker user can also overwrite or delete its own lease
keys and its own report stream (both signed or MAC'd by their writers; the worst it can do is
stop its own work). Lease and report keys are named per worker (issue 19), so on both versions a
named worker's user reaches only its own. Given the queues it is registered for, a named worker's
user reaches only those queues' RQ keys, its own RQ worker hash and command channel, and the
shared ``rq:workers`` set (:func:`rq_worker_keys`): job ids start with their queue for this. The
shared worker user, and a named one given no queues, keep every ``rq:*`` key. Task, nonce,
freeze and audit keys stay out of reach on both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

#: The commands an RQ 2.12 SimpleWorker sends (found by running one against a server with
#: ``INFO commandstats`` and under the ACL user with ``ACL LOG``), grouped by data type.
RQ_WORKER_COMMANDS: tuple[str, ...] = (
    # connection and server (INFO: RQ's version check)
    "ping", "hello", "client|setname", "info",
    # transactions (RQ pipelines with WATCH/MULTI/EXEC)
    "multi", "exec", "discard", "watch", "unwatch",
    # keyspace
    "exists", "del", "expire", "persist",
    # strings (RQ's short-lived locks, e.g. registry cleaning)
    "get", "set",
    # lists (queues)
    "lmove", "blmove", "lpop", "blpop", "lpush", "rpush", "lrem", "lpos", "lrange", "llen",
    # hashes (jobs, workers)
    "hset", "hget", "hgetall", "hdel", "hexists", "hincrby", "hincrbyfloat",
    # sets (worker and queue sets)
    "sadd", "srem", "smembers",
    # sorted sets (registries)
    "zadd", "zrem", "zrange", "zrangebyscore", "zcard", "zscore", "zremrangebyscore",
    # streams (job results)
    "xadd",
    # pub/sub (commands from `rq` to a worker)
    "subscribe", "unsubscribe",
)


@dataclass(frozen=True)
class Grant:
    """Commands allowed on keys matching some patterns; ``read_only`` means ``%R~`` on Redis 7+."""

    keys: tuple[str, ...]
    commands: tuple[str, ...]
    read_only: bool = False


@dataclass(frozen=True)
class Role:
    """One ACL user: its main grant (categories, commands, keys, pub/sub channels) plus narrower
    grants that become selectors on Redis 7+ and are merged in on 6.2."""

    name: str
    purpose: str
    keys: tuple[str, ...]
    categories: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    narrow: tuple[Grant, ...] = field(default=())

    def user(self, prefix: str) -> str:
        return f"{prefix}-{self.name}"


ROLES: dict[str, Role] = {
    "broker": Role(
        "broker", "the broker (intake serve and CLI commands)",
        keys=("{prefix}:*", "rq:*"),
        categories=("+@all", "-@dangerous"),
        commands=("info",),  # readiness and RQ's version check; INFO is @dangerous only for its stats
        channels=("rq:pubsub:*",),
    ),
    "worker": Role(
        "worker", "agent workers (intake worker)",
        keys=("rq:*",),
        commands=RQ_WORKER_COMMANDS,
        channels=("rq:pubsub:*",),
        narrow=(
            # Its own leases only (issue 19): ``{prefix}:lease:<worker>:<task>``.
            Grant(("{prefix}:lease:{worker}:*",), ("get",), read_only=True),
            Grant(("{prefix}:reports:{worker}",), ("xadd",)),
        ),
    ),
    "readonly": Role(
        "readonly", "dashboards and read-only inspection",
        keys=("*",),
        categories=("+@read",),
    ),
}


def password_hash(password: str) -> str:
    """The ``#<sha256 hex>`` rule for a password, so a file of rules never holds the password."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def _fill(pattern: str, prefix: str, worker: str) -> str:
    return pattern.replace("{prefix}", prefix).replace("{worker}", worker)


#: RQ keys named per queue (``{q}`` is the queue): the queue list and its intermediate list,
#: every registry, the workers-per-queue set and the registry-cleaning lock (rq 2.12).
RQ_QUEUE_KEYS: tuple[str, ...] = (
    "rq:queue:{q}", "rq:queue:{q}:intermediate", "rq:wip:{q}", "rq:finished:{q}", "rq:failed:{q}",
    "rq:deferred:{q}", "rq:scheduled:{q}", "rq:canceled:{q}", "rq:workers:{q}", "rq:clean_registries:{q}",
)
#: RQ keys named per job; a job id starts with its queue (``<queue>_T-…``, see
#: ``intake.tasks.dispatch.job_id_for``), and queue names hold no upper case, so ``{q}_T-*``
#: matches only that queue's jobs. (``rq:job::<id>:dependencies``, with two colons, is RQ 2.12's
#: own spelling of a job's dependency set: it EXPIREs it with the job.)
RQ_JOB_KEYS: tuple[str, ...] = (
    "rq:job:{q}_T-*", "rq:job::{q}_T-*", "rq:results:{q}_T-*", "rq:executions:{q}_T-*",
    "rq:execution:{q}_T-*",
)
#: RQ keys a worker touches whatever its queues: the set of all RQ workers (SADD/SREM of its own
#: name on start and stop), and the suspension flag ``rq suspend`` sets, which it only reads
#: (EXISTS before each job; a read-only selector on Redis 7+).
RQ_SHARED_KEYS: tuple[str, ...] = ("rq:workers",)
RQ_SUSPENDED = Grant(("rq:suspended",), ("exists",), read_only=True)
#: Separates an intake worker's name from the rest of its RQ worker name; worker names
#: (``[A-Za-z0-9_.-]``) never hold it, so ``<worker>@*`` matches only that worker's RQ workers.
RQ_NAME_SEP = "@"


def rq_worker_keys(worker: str, queues: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(key patterns, pub/sub channels) of the RQ keys one named worker registered for
    ``queues`` may reach: its queues' lists, registries and jobs, its own RQ worker hashes and
    command channel, and :data:`RQ_SHARED_KEYS`."""
    keys = [k.replace("{q}", q) for q in queues for k in RQ_QUEUE_KEYS + RQ_JOB_KEYS]
    keys += [f"rq:worker:{worker}{RQ_NAME_SEP}*", *RQ_SHARED_KEYS]
    return keys, [f"rq:pubsub:{worker}{RQ_NAME_SEP}*"]  # and RQ_SUSPENDED, see acl_rules


def acl_rules(role: Role, prefix: str, password_rule: str, *, selectors: bool, worker: str = "*",
              queues: tuple[str, ...] | None = None) -> list[str]:
    """The ``ACL SETUSER`` rules (arguments after the user name) for ``role`` under ``prefix``.

    ``password_rule`` is ``>password`` or ``#sha256``. ``selectors`` renders narrow grants as
    Redis 7 selectors; without it they are merged into the flat rules (Redis 6.2). ``worker``
    narrows the report stream to one worker's (``<prefix>:reports:<worker>``); with ``queues``
    too, the worker's ``rq:*`` grant narrows to those queues' keys (:func:`rq_worker_keys`).
    """
    keys = [_fill(k, prefix, worker) for k in role.keys]
    channels = list(role.channels)
    narrow = role.narrow
    if role.name == "worker" and queues is not None and worker != "*":
        keys, channels = rq_worker_keys(worker, queues)
        narrow = (*narrow, RQ_SUSPENDED)
    commands = list(role.commands)
    if not selectors:
        for grant in narrow:
            keys += [_fill(k, prefix, worker) for k in grant.keys]
            commands += [c for c in grant.commands if c not in commands]
    rules = ["reset", "on", password_rule, "resetkeys", *(f"~{k}" for k in keys), "resetchannels",
             *(f"&{c}" for c in channels), "-@all", *role.categories, *(f"+{c}" for c in commands)]
    if selectors:
        for grant in narrow:
            access = "%R~" if grant.read_only else "~"
            parts = [f"{access}{_fill(k, prefix, worker)}" for k in grant.keys] + [f"+{c}" for c in grant.commands]
            rules.append("(" + " ".join(parts) + ")")
    return rules


#: The embedded server's one extra user: it may only set users (``ACL SETUSER``), so a worker that
#: joins later gets its own user without a restart. Its password file sits beside the broker's
#: (0600 in the data dir's keys): whoever can read it owns the data dir, and so the server, already.
ACL_LOADER = "acl-loader"


def aclfile(prefix: str, password_hashes: dict[str, str], *, selectors: bool = False,
            workers: tuple[str, ...] = (), shared_worker: bool = False, loader: bool = False,
            queues: dict[str, tuple[str, ...]] | None = None) -> str:
    """An ``aclfile``: the users of :data:`ROLES`, and the default user off.

    ``password_hashes`` maps each user name (:func:`user_names`) to its ``#sha256`` rule.
    ``selectors`` renders Redis 7 selectors (off for the embedded Redis 6.2); ``workers`` gives
    each named worker its own user, limited to its own leases and report stream, and replaces
    the shared worker user unless ``shared_worker``; ``loader`` adds :data:`ACL_LOADER`.
    ``queues`` maps a named worker to the queues it is registered for: its user then reaches
    only those queues' RQ keys (:func:`rq_worker_keys`), not every ``rq:*`` key.
    """
    lines = ["user default off resetpass resetkeys resetchannels -@all"]
    for user, (role, worker) in user_names(prefix, workers, shared_worker=shared_worker).items():
        rules = acl_rules(role, prefix, password_hashes[user], selectors=selectors, worker=worker,
                          queues=(queues or {}).get(worker) if worker != "*" else None)
        lines.append(" ".join(["user", user, *rules]))
    if loader:
        lines.append(f"user {prefix}-{ACL_LOADER} on {password_hashes[f'{prefix}-{ACL_LOADER}']} "
                     "resetkeys resetchannels -@all +acl|setuser")
    return "\n".join(lines) + "\n"


def worker_user(prefix: str, worker: str) -> str:
    """The ACL user of one named worker."""
    return f"{ROLES['worker'].user(prefix)}-{worker}"


def user_names(prefix: str, workers: tuple[str, ...] = (), *,
               shared_worker: bool = False) -> dict[str, tuple[Role, str]]:
    """Every ACL user name with its role and worker: ``<prefix>-<role>``, and
    ``<prefix>-worker-<name>`` for each named worker (instead of the shared worker user, unless
    ``shared_worker``)."""
    users: dict[str, tuple[Role, str]] = {}
    for name, role in ROLES.items():
        if name != "worker" or not workers or shared_worker:
            users[role.user(prefix)] = (role, "*")
        if name == "worker":
            users.update({worker_user(prefix, w): (role, w) for w in workers})
    return users


def _quote(arg: str) -> str:
    # redis-cli splits on spaces and understands double quotes; the patterns hold no quotes.
    return f'"{arg}"' if " " in arg else arg


def setuser_commands(prefix: str, *, selectors: bool = True, worker: str = "*",
                     queues: tuple[str, ...] | None = None) -> list[str]:
    """``ACL SETUSER`` lines for a managed Redis, one per role, with ``>CHANGE-ME-<role>``
    placeholders where the passwords go; ``queues`` narrows a named ``worker``'s RQ keys."""
    lines = []
    for name, role in ROLES.items():
        rules = acl_rules(role, prefix, f">CHANGE-ME-{name}", selectors=selectors,
                          worker=worker if name == "worker" else "*", queues=queues if name == "worker" else None)
        user = role.user(prefix) if name != "worker" or worker == "*" else f"{role.user(prefix)}-{worker}"
        lines.append(" ".join(["ACL", "SETUSER", user, *(_quote(r) for r in rules)]))
    return lines
