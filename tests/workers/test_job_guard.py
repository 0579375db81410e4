"""Writing to Redis must not run code: jobs naming anything but the entry point, or carrying
anything but {task_id, token}, are refused, audited and failed without being called."""

from __future__ import annotations

import json
import secrets
import zlib
from pathlib import Path
from typing import Any

import pytest
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from intake.protocol.jobs import ENTRY_POINT
from intake.workers.config import load_worker_config
from intake.workers.entry import run_task
from intake.workers.jobs import IntakeJob
from intake.workers.worker import PUBSUB_POLL_S, build_worker
from tests.workers import markers
from tests.workers.harness import Rig, git_refs, rig  # noqa: F401


def test_entry_point_constant_names_the_real_function() -> None:
    assert f"{run_task.__module__}.{run_task.__qualname__}" == ENTRY_POINT


def _refusals(rig: Rig) -> list[dict[str, Any]]:
    return rig.events("job.refused")


def test_enqueued_os_system_job_is_refused_and_never_called(rig: Rig, tmp_path: Path) -> None:
    pwned = tmp_path / f"pwned-{secrets.token_hex(4)}"
    queue = rig.queue()
    job = queue.enqueue_call("os.system", args=[f"touch {pwned}"])
    assert rig.work(rig.config())
    assert not pwned.exists()
    refused = _refusals(rig)
    assert len(refused) == 1
    assert refused[0]["data"]["func"] == "os.system"
    assert refused[0]["data"]["reason"] == "function not allowed"
    assert str(pwned) not in json.dumps(refused)  # the function name, never its arguments
    assert job.id in FailedJobRegistry(queue.name, connection=queue.connection)
    assert Job.fetch(job.id, connection=queue.connection, serializer=JSONSerializer).get_status() == "failed"


def _plant(rig: Rig, job_id: str, call: list[Any] | bytes, queue: str = "tier-standard", **fields: str) -> None:
    """Write a job hash and its queue entry by hand, as someone with Redis access could."""
    raw = call if isinstance(call, bytes) else json.dumps(call).encode()
    r = rig.rq()
    r.hset(f"rq:job:{job_id}", mapping={
        "data": zlib.compress(raw), "origin": queue, "status": "queued",
        "created_at": "2025-01-01T00:00:00.000000Z", "description": "planted", **fields,
    })
    r.sadd("rq:queues", f"rq:queue:{queue}")
    r.rpush(f"rq:queue:{queue}", job_id)


def _good_kwargs(rig: Rig) -> tuple[str, dict[str, str]]:
    task = rig.promote()
    return task.id, {"task_id": task.id, "token": rig.job_token(task.id)}


REASONS = {
    "os_system": "function not allowed",
    "os_system_callback": "job asks for success_callback",
    "entry_with_failure_callback": "job asks for failure_callback",
    "entry_with_webhook": "job asks for webhooks",
    "entry_extra_kwarg": "job arguments are not exactly task_id and token",
    "entry_positional": "job has positional arguments",
    "entry_instance": "job names an instance",
    "entry_with_meta": "job carries meta data",
    "entry_with_dependency": "job has dependencies",
    "entry_with_retries": "job asks for retries or repeats",
    "not_json": "job data is not the JSON of a call",
    "entry_with_unknown_field": "job hash has fields RQ never writes (x_callback)",
    "wrong_job_id": "job id does not name the task",
    "job_id_of_another_queue": "job belongs to another queue",
    "invalid_job_id": "job id is not a valid RQ job id",
}


@pytest.mark.parametrize("case", sorted(REASONS))
def test_hand_written_jobs_are_refused(rig: Rig, tmp_path: Path, case: str) -> None:
    pwned = tmp_path / "pwned"
    markers.MARKER = tmp_path / "marker"
    touch = ["os.system", None, [f"touch {pwned}"], {}]
    task_id, kwargs = _good_kwargs(rig)
    # The task's real job would run too: take it off the queue, so only the planted one is seen.
    rig.rq().delete("rq:queue:tier-standard")
    entry = [ENTRY_POINT, None, [], kwargs]
    callback = "tests.workers.markers.touch_marker"
    planted: dict[str, tuple[Any, dict[str, str]]] = {
        "os_system": (touch, {}),
        "os_system_callback": (touch, {"success_callback_name": callback}),
        "entry_with_failure_callback": (entry, {"failure_callback_name": callback}),
        "entry_with_webhook": (entry, {"webhooks": json.dumps([{"url": "http://127.0.0.1:9/x"}])}),
        "entry_extra_kwarg": ([ENTRY_POINT, None, [], {**kwargs, "shell": "touch x"}], {}),
        "entry_positional": ([ENTRY_POINT, None, [task_id], kwargs], {}),
        "entry_instance": ([ENTRY_POINT, "os", [], kwargs], {}),
        "entry_with_meta": (entry, {"meta": json.dumps({"x": 1})}),
        "entry_with_dependency": (entry, {"dependency_ids": json.dumps(["other"])}),
        "entry_with_retries": (entry, {"retries_left": "3"}),
        "not_json": (b"\x80\x04\x95pickle", {}),
        "entry_with_unknown_field": (entry, {"x_callback": "os.system"}),
    }
    if case == "wrong_job_id":
        _plant(rig, "tier-standard_T-000000000000_1", entry)
    elif case == "job_id_of_another_queue":  # on this queue, named for another (its ACL grant)
        _plant(rig, f"tier-privileged_{task_id}_7", entry)
    elif case == "invalid_job_id":
        rig.rq().rpush("rq:queue:tier-standard", "../../etc:passwd")
    else:
        call, fields = planted[case]
        _plant(rig, f"tier-standard_{task_id}_7", call, **fields)
    rig.work(rig.config())
    assert not pwned.exists() and not markers.MARKER.exists()
    refused = _refusals(rig)
    assert len(refused) == 1, refused
    assert refused[0]["data"]["reason"] == REASONS[case]
    assert rig.task(task_id).state.value == "queued"  # a planted job changes nothing
    assert git_refs(rig.bare("acme/web")).keys() == {"refs/heads/main"}


def test_callbacks_stored_on_an_abandoned_job_are_never_resolved(rig: Rig, tmp_path: Path) -> None:
    """RQ's registry maintenance calls an abandoned job's failure callback by name; the worker's
    job class never resolves one."""
    markers.MARKER = tmp_path / "marker"
    callback = "tests.workers.markers.touch_marker"
    r = rig.rq()

    def plant(job_id: str) -> None:
        _plant(rig, job_id, ["os.system", None, ["true"], {}], failure_callback_name=callback)
        r.lrem("rq:queue:tier-standard", 0, job_id)
        r.zadd("rq:wip:tier-standard", {f"{job_id}:exec1": 1})  # expired long ago

    plant("planted_1")
    StartedJobRegistry("tier-standard", connection=r, job_class=IntakeJob, serializer=JSONSerializer).cleanup()
    assert not markers.MARKER.exists()
    # The same hash under RQ's own Job class would have called it: the test means something.
    plant("planted_2")
    StartedJobRegistry("tier-standard", connection=r, job_class=Job, serializer=JSONSerializer).cleanup()
    assert markers.MARKER.exists()


def test_intake_job_disarms_callbacks_and_webhooks(rig: Rig) -> None:
    _plant(rig, "planted_3", ["os.system", None, [], {}], success_callback_name="os.system",
           webhooks=json.dumps([{"url": "http://127.0.0.1:9/"}]))
    job = IntakeJob.fetch("planted_3", connection=rig.rq(), serializer=JSONSerializer)
    assert job.success_callback is None and job.failure_callback is None and job.webhooks == []
    assert job.asked_for == ("success_callback_name", "webhooks")
    with pytest.raises(Exception, match="only the intake entry point"):
        job.func  # noqa: B018


def test_the_command_channel_polls_briefly_so_a_worker_exits_at_once(rig: Rig) -> None:  # noqa: F811
    """RQ's pub/sub thread waited 60 s a round, and a stop that raced the unsubscribe joined
    for all of it: a worker's exit (every burst) hung for a minute, one time in a few."""
    worker = build_worker(rig.settings, rig.broker.url, rig.r, load_worker_config(rig.config()), clock=rig.clock)
    worker.subscribe()
    try:
        assert worker.pubsub_thread.sleep_time == PUBSUB_POLL_S <= 1
    finally:
        worker.unsubscribe()
        worker.connection.close()
    assert not worker.pubsub_thread.is_alive()
