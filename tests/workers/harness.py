"""A test rig for worker tests: a broker on the session's real Redis with enrolled approvers
(the World pattern of tests/test_promotion.py), real bare repositories, worker configs, and
workers run in-process (burst) or as real ``intake worker`` subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from intake.audit.log import AuditLog
from intake.core.models import Task
from intake.core.redis_conn import make_client
from intake.core.settings import Settings, load_settings
from intake.protocol.keyfiles import generate_keys, load_secret, write_worker_key
from intake.runtime import EXAMPLE_POLICY, Broker
from intake.storage.store import Store
from intake.tasks.dispatch import job_id_for
from intake.tasks.worker_reports import ReportProcessor, issue_worker_key, worker_scope
from intake.workers.config import load_worker_config
from intake.workers.dev import create_bare_repo
from intake.workers.rundirs import RunRoot
from intake.workers.worker import build_worker
from tests.conftest import REPO_ROOT, FakeClock
from tests.factories import draft

PEOPLE = {"alice": "platform", "bob": "platform", "carol": "security", "dave": "security"}
SEED = {"README.md": "# seed\n", "docs/README.md": "# docs\n", "payments/README.md": "# payments\n"}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def in_a_work_tree(name: str, worker: str = "test") -> Path | None:
    """A file called ``name`` in a live run's work tree of worker ``worker`` (sandboxed agents
    can write nowhere else: this is how a test sees that an agent got somewhere)."""
    return next(iter((RunRoot(worker).path).glob(f"*/intake-ws-*/{name}")), None)


def pids_with(marker: str) -> list[int]:
    """Host pids of live processes whose command line holds ``marker`` (a sandboxed agent cannot
    tell us its host pid; a random marker in its argv finds it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if marker.encode() in (entry / "cmdline").read_bytes() and not pid_gone(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (gone, or a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2] in "ZX"


def git_refs(bare: Path) -> dict[str, str]:
    out = subprocess.run(["git", "--git-dir", str(bare), "show-ref"], capture_output=True, text=True, check=False)
    return {ref: sha for sha, ref in (line.split(" ", 1) for line in out.stdout.splitlines())}


def git_show(bare: Path, rev: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", str(bare), "show", f"{rev}:{path}"],
                          capture_output=True, text=True, check=True).stdout


@dataclass
class Rig:
    settings: Settings
    broker: Broker
    clock: FakeClock
    tmp: Path
    totps: dict[str, pyotp.TOTP]
    repos: dict[str, Path] = field(default_factory=dict)
    _rq: redis.Redis | None = None
    _reports: ReportProcessor | None = None

    # -- broker side -----------------------------------------------------------------------
    @property
    def store(self) -> Store:
        return self.broker.store

    @property
    def r(self) -> redis.Redis:
        return self.broker.client

    def code(self, who: str) -> str:
        return self.totps[who].at(self.clock.now)

    def promote(self, repo: str = "acme/web", change_type: str = "docs",
                text: str = "Please document the deploy steps") -> Task:
        """An idea promoted (and approved as the tier needs) into a queued, enqueued task."""
        idea = self.store.capture(draft(text=text), ttl_s=self.broker.policy.clocks.idea_ttl)[0]
        gate = self.broker.gatekeeper
        task = gate.promote(idea.id, repo=repo, change_type=change_type, approver_id="alice",
                            code=self.code("alice")).task
        if task.required > 1:
            task = gate.approve(task.id, approver_id="carol", code=self.code("carol")).task
        assert task.state.value == "queued"
        self.clock.advance(30)  # each approver's code step is spent
        return task

    def accept(self, task_id: str, who: str = "carol", sha: str | None = None) -> Task:
        """Approve the task's quarantined result (the commit the sealed history names)."""
        fact = self.fact(task_id)
        task = self.broker.gatekeeper.accept(task_id, approver_id=who, code=self.code(who),
                                             sha=sha or fact.result_commit, diff_sha256=fact.result_diff).task
        self.clock.advance(30)  # the code's step is spent
        return task

    def task(self, task_id: str) -> Task:
        return self.store.get_task(task_id)

    def job_token(self, task_id: str, attempt: int = 1) -> str:
        """The dispatch token the broker put in the task's RQ job (as an attacker reads it)."""
        raw = self.rq().hget(f"rq:job:{job_id_for(self.fact(task_id).queue, task_id, attempt)}", "data")
        assert raw is not None, f"no job for {task_id} attempt {attempt}"
        return str(json.loads(zlib.decompress(raw))[3]["token"])

    def fact(self, task_id: str) -> Any:
        return self.broker.ledger.follow().task(task_id)

    def events(self, action: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.broker.audit.export() if action is None or e["action"] == action]

    def rq(self) -> redis.Redis:
        """A bytes client, as RQ needs (one per rig, closed by :meth:`close`)."""
        if self._rq is None:
            self._rq = make_client(self.broker.url, decode=False)
        return self._rq

    def serve_reports(self) -> ReportProcessor:
        """The broker's report processor on a thread, as `intake serve` runs it."""
        if self._reports is None:
            self._reports = ReportProcessor(self.broker)
            self._reports.start()
        return self._reports

    def drain(self, timeout: float = 20) -> None:
        """Wait until the broker has handled every report the workers sent."""
        reports = self.serve_reports()
        wait_for(reports.drained, timeout, "the broker to handle every worker report")

    def issue_key(self, name: str = "test", *, queues: tuple[str, ...] = ("tier-standard", "tier-privileged"),
                  repos: tuple[str, ...] = ("acme/web", "acme/payments"),
                  change_types: tuple[str, ...] = ("docs", "tests", "bugfix", "dependency-bump")) -> Path:
        """Register worker ``name`` for ``queues``/``repos``/``change_types`` and issue it its
        report key, written where the worker looks for it."""
        generation, key = issue_worker_key(self.broker, name, actor="cli:root",
                                           scope=worker_scope(queues, repos, change_types))
        path = self.settings.worker_key_path(name)
        write_worker_key(path, name, generation, key)
        return path

    def reconcile(self) -> int:
        return self.broker.dispatcher.reconcile()

    def close(self) -> None:
        if self._reports is not None:
            self._reports.stop()
        self.broker.dispatcher.close()
        if self._rq is not None:
            self._rq.close()

    def queue(self, name: str = "tier-standard") -> Queue:
        return Queue(name, connection=self.rq(), serializer=JSONSerializer)

    # -- repos and workers -----------------------------------------------------------------
    def bare(self, repo: str) -> Path:
        if repo not in self.repos:
            owner, name = repo.split("/")
            self.repos[repo] = create_bare_repo(self.tmp / "remotes" / owner / f"{name}.git", "main", SEED)
        return self.repos[repo]

    def config(self, *, agent: dict[str, Any] | None = None, repos: dict[str, dict[str, Any]] | None = None,
               queues: tuple[str, ...] = ("tier-standard", "tier-privileged"), name: str = "test",
               **top: Any) -> Path:
        """Write a worker config; ``repos`` maps repo names to extra keys (default: both repos,
        local bare remotes, every change type)."""
        repos = repos if repos is not None else {"acme/web": {}, "acme/payments": {}}
        data: dict[str, Any] = {
            "name": name, "queues": list(queues),
            "agent": agent or {"type": "demo"}, "repos": [], **top,
        }
        for repo, extra in repos.items():
            entry = {"name": repo, "change_types": ["docs", "tests", "bugfix", "dependency-bump"], **extra}
            entry.setdefault("url", str(self.bare(repo)))
            data["repos"].append(entry)
        path = self.tmp / f"worker-{len(list(self.tmp.glob('worker-*.toml')))}.toml"
        path.write_text(_to_toml(data))
        path.chmod(0o600)  # a bwrap worker refuses a config the agent user could read
        if not self.settings.worker_key_path(name).exists():
            self.issue_key(name, queues=tuple(queues), repos=tuple(repos),
                           change_types=tuple({c for r in data["repos"] for c in r["change_types"]}))
        return path

    def work(self, config: Path, *, url: str | None = None) -> bool:
        """One in-process burst worker over the queues (its clock is the rig's clock); the
        rig's broker-side report processor answers its claims and heartbeats. ``url`` connects
        the worker as another Redis user (e.g. the worker ACL user) instead of the rig's."""
        worked = self.work_once(config, url=url)
        # A run whose result needs no approval is delivered by a delivery job the broker
        # enqueues when it applies the result: work until the queues are empty.
        loaded = load_worker_config(config)
        for _ in range(5):
            if not any(self.queue(q).count for q in loaded.queues):
                break
            worked = self.work_once(config, url=url) or worked
        return worked

    def work_once(self, config: Path, *, url: str | None = None) -> bool:
        """One burst over the queues as they are now (no delivery jobs that follow)."""
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.serve_reports()
        client = make_client(url) if url else self.r
        worker = build_worker(self.settings, url or self.broker.url, client, load_worker_config(config),
                              clock=self.clock)
        try:
            return bool(worker.work(burst=True, logging_level="WARNING"))
        finally:
            worker.connection.close()
            if url:
                client.close()
            self.drain()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.tmp),
            "INTAKE_DATA_DIR": str(self.settings.data_dir),
            "INTAKE_POLICY": str(self.settings.policy_path),
            "PYTHONPATH": str(REPO_ROOT),
        }
        if self.settings.redis_url is not None:
            env["INTAKE_REDIS_URL"] = self.settings.redis_url.get_secret_value()
        env.update(extra)
        return env

    def spawn(self, config: Path, *, burst: bool = False, reports: bool = True, **env: str) -> subprocess.Popen[bytes]:
        """A real ``intake worker`` subprocess (``reports=False``: some other broker process,
        e.g. a real ``intake serve``, answers its reports instead of the rig)."""
        if reports:
            self.serve_reports()
        argv = [sys.executable, "-m", "intake", "worker", "--config", str(config)]
        if burst:
            argv.append("--burst")
        log = open(self.tmp / "worker-subprocess.log", "ab")  # noqa: SIM115
        try:
            return subprocess.Popen(argv, env=self.env(**env), cwd=self.tmp, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def worker_log(self) -> str:
        path = self.tmp / "worker-subprocess.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _to_toml(data: dict[str, Any]) -> str:
    """Enough TOML for worker configs: JSON scalars/arrays are TOML; tables inline."""

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if k not in {"agent", "repos"}]
    lines.append(f"agent = {value(data['agent'])}")
    for repo in data["repos"]:
        lines.append("[[repos]]")
        lines += [f"{k} = {value(v)}" for k, v in repo.items()]
    return "\n".join(lines) + "\n"


def make_rig(tmp_path: Path, redis_url: str, rclient: redis.Redis, clock: FakeClock,
             policy_text: str | None = None, settings: Settings | None = None) -> Rig:
    """A rig on ``redis_url``; ``settings`` (with keys) if given, else fresh ones in tmp_path."""
    if settings is None:
        policy = EXAMPLE_POLICY
        if policy_text is not None:
            policy = tmp_path / "policy.toml"
            policy.write_text(policy_text)
        settings = load_settings(_env_file=None, data_dir=tmp_path / "data", redis_url=redis_url, policy=policy)
        generate_keys(settings)
    audit = AuditLog(rclient, load_secret(settings, "audit"), settings.key_prefix,
                     checkpoint=settings.audit_checkpoint)
    store = Store(rclient, audit, prefix=settings.key_prefix, clock=clock)
    broker = Broker(settings, redis_url, rclient, audit, store)
    totps = {}
    for name, group in PEOPLE.items():
        broker.approvers.add(broker.policy, name, name=name.title(), groups=(group,),
                                         slack_user=f"U{name.upper():0<9}", email=None, actor="cli:root")
        enrolment = broker.approvers.enrol(name, actor=f"approver:{name}")
        totps[name] = pyotp.parse_uri(enrolment.otpauth_uri)
        broker.approvers.confirm(name, totps[name].at(clock.now), actor=f"approver:{name}")
    clock.advance(30)  # the confirmation codes' steps are spent
    return Rig(settings, broker, clock, tmp_path, totps)


@pytest.fixture
def rig(tmp_path: Path, redis_server: str, rclient: redis.Redis, clock: FakeClock) -> Iterator[Rig]:
    made = make_rig(tmp_path, redis_server, rclient, clock)
    yield made
    made.close()
