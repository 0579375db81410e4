"""/metrics from the real app: a scripted scenario, then every family checked against it."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pyotp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from intake.app import BROKER, METRICS_PORT, create_app
from intake.core.errors import Refused
from intake.core.models import Channel, TaskState
from intake.core.settings import Settings, load_settings
from tests.conftest import FakeClock
from tests.factories import draft, previous_step_code


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_match_a_scripted_scenario(settings: Settings, clock: FakeClock) -> None:
    assert settings.redis_url is not None
    s = load_settings(_env_file=None, data_dir=settings.data_dir, redis_url=settings.redis_url.get_secret_value(),
                      policy=settings.policy_path, sweep_interval=3600, metrics_port=0)
    app = create_app(s)
    async with TestClient(TestServer(app, host="127.0.0.1")), aiohttp.ClientSession() as scraper:
        broker = app[BROKER]
        broker.store.clock = clock
        store, gk = broker.store, broker.gatekeeper
        totps = {}
        for name in ("alice", "bob"):
            broker.approvers.add(broker.policy, name, name=name, groups=("platform",), slack_user=None,
                                             email=None, actor="cli:root")
            enrolment = broker.approvers.enrol(name, actor=f"approver:{name}")
            totps[name] = pyotp.parse_uri(enrolment.otpauth_uri)
            broker.approvers.confirm(name, previous_step_code(totps[name]), actor=f"approver:{name}")
        one, _ = store.capture(draft(channel=Channel.SLACK))
        two, _ = store.capture(draft(channel=Channel.CLI, requester="cli:erin"))
        three, _ = store.capture(draft(channel=Channel.CLI, requester="cli:alice"))
        with pytest.raises(Refused):  # self-approval
            gk.promote(three.id, repo="acme/web", change_type="docs", approver_id="alice", code=totps["alice"].at(clock()))
        with pytest.raises(Refused):  # a wrong code: an MFA failure and no promotion
            gk.promote(one.id, repo="acme/web", change_type="docs", approver_id="bob", code="000000"
                       if totps["bob"].at(clock()) != "000000" else "111111")
        clock.advance(120)
        t1 = gk.promote(one.id, repo="acme/web", change_type="docs", approver_id="alice",
                        code=totps["alice"].at(clock())).task
        clock.advance(600)
        t2 = gk.promote(two.id, repo="acme/web", change_type="bugfix", approver_id="bob",
                        code=totps["bob"].at(clock())).task
        assert t1.state is t2.state is TaskState.QUEUED
        # What the broker applies from a worker's reports, through the same store transitions:
        # t1 runs and is revoked, its run stops 3 s later; t2 is blocked by the gates.
        store.move_task(t1.id, TaskState.RUNNING, actor="system", worker="w1")
        gk.revoke(t1.id, identity="approver:alice", is_approver=True, reason="stop")
        clock.advance(3)
        store.audit.record("system", "run.stopped", t1.id, why="revoked", worker="w1", at=clock())
        store.move_task(t2.id, TaskState.RUNNING, actor="system", worker="w1")
        store.move_task(t2.id, TaskState.BLOCKED, actor="system", worker="w1", reason="gates",
                        update={"result": {"gates": ["blocked path: .github/x", "dependency: unlisted package: npm:left-pad 1.3.0"]}})
        # A forged entry written straight into Redis counts for nothing.
        broker.client.xadd(broker.audit.stream, {"e": '{"action":"idea.captured","data":{"channel":"email"}}', "m": "0" * 64})

        resp = await scraper.get(f"http://127.0.0.1:{app[METRICS_PORT]}/metrics")
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        m = _samples(await resp.text())

    assert m[("intake_ideas_captured_total", (("channel", "slack"),))] == 1
    assert m[("intake_ideas_captured_total", (("channel", "cli"),))] == 2
    assert ("intake_ideas_captured_total", (("channel", "email"),)) not in m
    assert m[("intake_promotions_total", (("via", "cli"),))] == 2
    assert m[("intake_refusals_total", (("reason", "self_approval"),))] == 1
    assert m[("intake_mfa_failures_total", (("reason", "invalid"),))] == 1
    assert m[("intake_time_to_promote_seconds_count", ())] == 2
    assert m[("intake_time_to_promote_seconds_sum", ())] == 120 + 720
    assert m[("intake_time_to_promote_seconds_bucket", (("le", "300.0"),))] == 1
    assert m[("intake_time_to_promote_seconds_bucket", (("le", "900.0"),))] == 2
    assert m[("intake_runs_total", (("outcome", "revoked"), ("tier", "standard")))] == 1
    assert m[("intake_runs_total", (("outcome", "blocked"), ("tier", "standard")))] == 1
    assert m[("intake_revoke_to_stop_seconds_count", ())] == 1
    assert m[("intake_revoke_to_stop_seconds_sum", ())] == 3
    assert m[("intake_gate_blocks_total", (("reason", "blocked_path"),))] == 1
    assert m[("intake_gate_blocks_total", (("reason", "dependency"),))] == 1
    assert ("intake_queue_depth", (("queue", "tier-standard"),)) not in m  # nothing left queued
    assert ("intake_outbox_dropped_total", ()) not in m


def test_scrapes_are_incremental_and_queue_depth_is_live(settings: Settings, store, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    from intake.operations.metrics import AuditMetrics
    from intake.runtime import open_broker

    with open_broker(settings) as broker:
        metrics = AuditMetrics(broker)
        list(metrics.collect())
        broker.store.capture(draft(channel=Channel.SLACK))
        first = {f.name: f for f in metrics.collect()}
        broker.store.capture(draft(channel=Channel.SLACK))
        second = {f.name: f for f in metrics.collect()}
    assert first["intake_ideas_captured"].samples[0].value == 1
    assert second["intake_ideas_captured"].samples[0].value == 2


def test_outbox_lag_and_drops(settings: Settings, tmp_path: Path) -> None:
    from intake.operations.metrics import AuditMetrics
    from intake.runtime import open_broker
    from intake.storage.outbox import Outbox

    with open_broker(settings) as broker:
        outbox = Outbox(broker.audit, "slack-notifier", max_age_s=3600)
        outbox.ensure_group()
        clock = FakeClock()
        clock.advance(-7200)  # captured two hours ago: past the outbox's maximum age
        broker.store.clock = clock
        broker.store.capture(draft())
        broker.store.capture(draft())
        (delivery, _) = outbox.fetch(count=2, block_ms=10)
        outbox.failed(delivery, "boom")  # too old to retry: dropped and audited
        fams = {f.name: f for f in AuditMetrics(broker).collect()}
    dropped = fams["intake_outbox_dropped"].samples
    assert [(s.labels, s.value) for s in dropped if s.name.endswith("_total")] == [({"group": "slack_notifier"}, 1.0)]
    lag = {s.labels["group"]: s.value for s in fams["intake_outbox_lag_events"].samples}
    assert lag["slack-notifier"] == 2  # the second delivery is pending, the drop event undelivered


async def test_metrics_are_never_on_the_public_port(settings: Settings) -> None:
    """A stranger who reaches the API port asks for /metrics: 404 there, with or without a
    metrics listener; the listener itself binds loopback by default."""
    assert settings.redis_url is not None
    base = {"_env_file": None, "data_dir": settings.data_dir, "redis_url": settings.redis_url.get_secret_value(),
            "policy": settings.policy_path, "sweep_interval": 3600}
    assert load_settings(**base).metrics_port is None and load_settings(**base).metrics_host == "127.0.0.1"
    for extra in ({}, {"metrics_port": 0}):
        app = create_app(load_settings(**base, **extra))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            assert (await client.get("/metrics")).status == 404
            assert (await client.get("/metrics", headers={"Authorization": "Bearer x"})).status == 404
            if extra:
                async with aiohttp.ClientSession() as scraper:
                    scraped = await scraper.get(f"http://127.0.0.1:{app[METRICS_PORT]}/metrics")
                    assert scraped.status == 200 and "intake_ideas_captured_total" in await scraped.text()
            else:
                assert METRICS_PORT not in app

