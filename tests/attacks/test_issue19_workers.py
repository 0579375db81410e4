"""Issue 19, attacked by an insider: a second registered worker, "mallory", holding only its own
report key and its own Redis user, goes after the runs of the first worker, "good".

Both workers are real: each has its own report key and its own Redis ACL user, on a real Redis 7
(``/usr/bin/redis-server``, with the ACL file ``intake redis aclfile`` writes, selectors on) and
on the embedded Redis 6.2 (each named worker's user created on the running server). Mallory is
registered for another queue and repo. It must not read good's lease, claim good's job, report on
good's run, or get provenance signed for any commit of its choosing; each attempt is audited as
rejected; good's run completes normally.

What stays possible, and is said in the README (*Redis users*): RQ's ``rq:*`` keys are shared by
every worker user, so mallory can still pop a job off a queue it does not serve and read the task
spec inside its token; the broker then refuses its claim and re-dispatches the task.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from intake.core.models import TaskState
from intake.core.redis_conn import EmbeddedRedis, make_client
from intake.protocol.envelope import ProvenanceInvalid
from intake.protocol.keyfiles import load_worker_key
from intake.protocol.reports import Reporter
from intake.protocol.tokens import verify_dispatch
from intake.tasks import provenance
from intake.tasks.dispatch import job_id_for
from tests.conftest import REPO_ROOT, FakeClock
from tests.ports import free_port
from tests.workers.harness import Rig, in_a_work_tree, make_rig, wait_for

NoPerm = redis.exceptions.NoPermissionError
REDIS7 = "/usr/bin/redis-server"


def sh(script: str) -> dict[str, object]:
    return {"type": "command", "argv": ["/bin/sh", "-c", script]}


def _redis7_users(tmp: Path) -> Iterator[dict[str, str]]:
    """A real Redis 7 with the users `intake redis aclfile --worker good --worker mallory` wrote."""
    if not os.path.exists(REDIS7):
        pytest.skip("no Redis 7 at /usr/bin/redis-server")
    version = subprocess.run([REDIS7, "--version"], capture_output=True, text=True, check=False).stdout
    if "v=7" not in version and "v=8" not in version:
        pytest.skip("no Redis 7 at /usr/bin/redis-server")
    port = free_port()
    acl = tmp / "acl"
    subprocess.run([sys.executable, "-m", "intake", "redis", "aclfile", str(acl), "--worker", "good",
                    "--worker", "mallory", "--queue", "good=tier-standard", "--queue", "mallory=tier-privileged",
                    "--host", f"127.0.0.1:{port}"], check=True, timeout=60, cwd=REPO_ROOT,
                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO_ROOT)},
                   capture_output=True)
    proc = subprocess.Popen([REDIS7, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp), "--aclfile", str(acl / "users.acl")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        urls = {u: (acl / f"intake-{u}.url").read_text().strip()
                for u in ("broker", "worker-good", "worker-mallory")}

        def up() -> bool:
            try:
                return bool(make_client(urls["broker"]).ping())
            except redis.RedisError:
                return False

        wait_for(up, 20, "redis 7")
        yield {"broker": urls["broker"], "good": urls["worker-good"], "mallory": urls["worker-mallory"]}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _embedded_users(tmp: Path) -> Iterator[dict[str, str]]:
    server = EmbeddedRedis(tmp / "emb")
    broker = server.acquire()
    try:
        yield {"broker": broker, "good": server.worker_url("good", ("tier-standard",)),
               "mallory": server.worker_url("mallory", ("tier-privileged",))}
    finally:
        server.release()


@pytest.fixture(params=["redis7", "embedded"])
def users(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="i19-", dir="/tmp"))  # short: the embedded socket path
    try:
        yield from (_redis7_users if request.param == "redis7" else _embedded_users)(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def two(tmp_path: Path, users: dict[str, str], clock: FakeClock) -> Iterator[tuple[Rig, dict[str, str]]]:
    broker = make_client(users["broker"])
    made = make_rig(tmp_path, users["broker"], broker, clock)
    yield made, users
    made.close()
    broker.close()


def _rejections(rig: Rig, worker: str) -> list[str]:
    return [str(e["data"].get("reason")) for e in rig.events() if e["subject"] == worker
            and e["action"] in ("report.rejected",)] + \
           [str(e["data"].get("reason")) for e in rig.events("job.refused") if e["data"].get("worker") == worker]


_RQ_ATTACKS: dict[str, Any] = {
    "lpop": lambda r, job: r.lpop("rq:queue:tier-standard"),
    "lmove": lambda r, job: r.lmove("rq:queue:tier-standard", "rq:queue:tier-privileged"),
    "blmove": lambda r, job: r.blmove("rq:queue:tier-standard", "rq:queue:tier-privileged", 0.01),
    "lrange": lambda r, job: r.lrange("rq:queue:tier-standard", 0, -1),
    "lmove_intermediate": lambda r, job: r.lmove("rq:queue:tier-standard:intermediate", "rq:queue:tier-privileged"),
    "job_hash": lambda r, job: r.hgetall(f"rq:job:{job}"),
    "job_write": lambda r, job: r.hset(f"rq:job:{job}", "status", "canceled"),
    "job_delete": lambda r, job: r.delete(f"rq:job:{job}"),
    "results": lambda r, job: r.xadd(f"rq:results:{job}", {"x": "1"}),
    "executions": lambda r, job: r.zrange(f"rq:executions:{job}", 0, -1),
    "wip": lambda r, job: r.zrange("rq:wip:tier-standard", 0, -1),
    "wip_write": lambda r, job: r.zadd("rq:wip:tier-standard", {job: 1}),
    "finished": lambda r, job: r.zadd("rq:finished:tier-standard", {job: 1}),
    "failed": lambda r, job: r.zadd("rq:failed:tier-standard", {job: 1}),
    "scheduled": lambda r, job: r.zadd("rq:scheduled:tier-standard", {job: 1}),
    "workers_of_queue": lambda r, job: r.smembers("rq:workers:tier-standard"),
    "good_rq_worker": lambda r, job: r.hgetall("rq:worker:good@1-ab12"),
}


def _rq_refusals(client: redis.Redis, job: str) -> dict[str, str]:
    """Each RQ-key attack by ``client`` on good's queue and job: "refused" (NOPERM) or "allowed"."""
    out = {}
    for name, attack in _RQ_ATTACKS.items():
        try:
            attack(client, job)
            out[name] = "allowed"
        except NoPerm:
            out[name] = "refused"
    return out


def test_mallory_cannot_touch_goods_run(two: tuple[Rig, dict[str, str]]) -> None:
    rig, users = two
    good_config = rig.config(name="good", queues=("tier-standard",), repos={"acme/web": {}},
                             agent=sh("echo up > docs/running.md; while [ ! -e docs/go.md ]; do sleep 0.05; done; "
                                      "rm docs/go.md docs/running.md; echo done > docs/a.md"))
    name, generation, key = load_worker_key(rig.issue_key("mallory", queues=("tier-privileged",),
                                                          repos=("acme/payments",), change_types=("docs",)))
    mallory = make_client(users["mallory"])
    mallory_rq = make_client(users["mallory"], decode=False)
    reporter = Reporter(mallory, rig.settings.key_prefix, "mallory", generation, key)
    rig.serve_reports()
    task = rig.promote()  # acme/web docs: tier-standard, good's queue
    keys = rig.store.keys

    # 1. Good's queue, its jobs and registries are out of reach of mallory's Redis user: no pop,
    #    no move, no peek, no read of the job hash (and so of the dispatch token in it).
    job = job_id_for("tier-standard", task.id, 1)
    assert rig.rq().lrange("rq:queue:tier-standard", 0, -1) == [job.encode()]
    assert _rq_refusals(mallory_rq, job) == {name: "refused" for name in _RQ_ATTACKS}, _rq_refusals(mallory_rq, job)
    assert rig.rq().lrange("rq:queue:tier-standard", 0, -1) == [job.encode()]  # untouched
    # Mallory's own queue still works for it (the grants are per queue, not none at all).
    assert mallory_rq.lrange("rq:queue:tier-privileged", 0, -1) == []
    # Told the token anyway (as if it had learnt it), its claim is refused and audited.
    fact = rig.fact(task.id)
    nonce = next(iter(fact.dispatches))
    claims = verify_dispatch(rig.job_token(task.id), rig.broker.keyring, now=rig.clock())
    reporter.send("report.claimed", task.id, attempt=claims.attempt, run="m" * 32, job=job, nonce=nonce,
                  sandbox="none")
    rig.drain()
    assert rig.fact(task.id).state is TaskState.QUEUED and nonce not in rig.fact(task.id).used_nonces
    assert "not_registered" in _rejections(rig, "mallory")
    # A refusal that would end the task counts only from a worker serving its queue.
    reporter.send("report.refused", task.id, reason="misrouted", job=job, nonce=nonce, message="no")
    rig.drain()
    assert rig.fact(task.id).state is TaskState.QUEUED
    rig.reconcile()  # the job is still live: nothing is dispatched again

    attacks: dict[str, Any] = {}

    def attack_when_running() -> None:
        wait_for(lambda: in_a_work_tree("docs/running.md", worker="good"), 60, "good's agent to start")
        live = rig.fact(task.id)
        assert live.state is TaskState.RUNNING and live.worker == "good"
        # 2. Read good's lease: the key is good's, mallory's user may not read it.
        try:
            mallory.get(keys.lease("good", task.id))
            attacks["lease"] = "read"
        except NoPerm:
            attacks["lease"] = "refused"
        before = rig.broker.client.get(keys.lease("good", task.id))
        # 3. Report on good's run (told its run id, as if it had learnt it): heartbeat, result
        #    naming a commit of mallory's choosing, stopped. All rejected, nothing changes.
        reporter.send("report.heartbeat", task.id, attempt=live.attempts, run=live.run, seq=10**6)
        reporter.send("report.result", task.id, attempt=live.attempts, run=live.run, state="succeeded",
                      result={"commit": "c" * 40, "quarantine": f"refs/intake/{task.id}", "files": []},
                      paths=[], paths_complete=True)
        reporter.send("report.stopped", task.id, attempt=live.attempts, run=live.run, why="done")
        rig.drain()
        attacks["state"] = rig.fact(task.id).state
        attacks["lease_after"] = rig.broker.client.get(keys.lease("good", task.id)) == before
        # 4. Mallory's own key cannot write good's lease or report stream either.
        for write in (lambda: mallory.set(keys.lease("good", task.id), "x"),
                      lambda: mallory.xadd(keys.reports("good"), {"r": "{}", "m": "0"})):
            try:
                write()
                attacks.setdefault("writes", []).append("allowed")
            except NoPerm:
                attacks.setdefault("writes", []).append("refused")
        # 5. While good runs the job, mallory still cannot reach it, its queue or registries.
        attacks["rq"] = _rq_refusals(mallory_rq, job)
        go = in_a_work_tree("docs/running.md", worker="good")
        assert go is not None
        (go.parent / "go.md").write_text("go\n")

    helper = threading.Thread(target=attack_when_running, daemon=True)
    helper.start()
    good_url = users["good"]
    assert rig.work(good_config, url=good_url)
    helper.join(timeout=60)
    assert attacks == {"lease": "refused", "state": TaskState.RUNNING, "lease_after": True,
                       "writes": ["refused", "refused"], "rq": {name: "refused" for name in _RQ_ATTACKS}}
    rejected = _rejections(rig, "mallory")
    assert rejected.count("not_your_run") == 3, rejected
    # Good's run completed normally, and was delivered with provenance for good's commit only.
    done = rig.task(task.id)
    assert done.state is TaskState.SUCCEEDED, done.reason
    commit = rig.fact(task.id).result_commit
    issued = {e["data"]["commit"] for e in rig.events("provenance.issued") if e["subject"] == task.id}
    assert issued == {commit}
    # 6. No provenance for any other commit, whoever asks.
    with pytest.raises(ProvenanceInvalid) as err:
        provenance.issue(rig.broker, done, "c" * 40)
    assert err.value.reason in ("not_quarantined", "incomplete")
    mallory.close()
    mallory_rq.close()
