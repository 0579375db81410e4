"""The figures over sealed history written by the real Store and AuditLog: windows, percentiles,
dependency posture and provenance coverage from the contracts of issue 11's other parts."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from intake.core.errors import InvalidInput
from intake.operations.indicators.figures import Timeline, compute_figures, parse_since, spread
from intake.operations.indicators.render import render_html, render_text
from intake.storage.store import Store
from tests.conftest import FakeClock
from tests.report.events import emit, settle

NOW = 1_800_000_000.0


@pytest.mark.parametrize(("text", "back"), [("7d", 7 * 86400), ("24h", 86400), ("30m", 1800), ("90s", 90),
                                             ("2w", 14 * 86400)])
def test_since_spans(text: str, back: int) -> None:
    assert parse_since(text, NOW) == NOW - back


def test_since_iso_dates_are_utc_unless_zoned() -> None:
    assert parse_since("2026-11-01", NOW) == datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert parse_since("2026-11-01T10:00:00+02:00", NOW) == datetime(2026, 11, 1, 8, tzinfo=UTC).timestamp()


@pytest.mark.parametrize("bad", ["7", "7x", "-1d", "0d", "1d; rm", "", "d7", "1e3d", "2026-13-01", "7d\n"])
def test_since_refuses_anything_else(bad: str) -> None:
    with pytest.raises(InvalidInput, match="--since"):
        parse_since(bad, NOW)


def test_spread_is_nearest_rank() -> None:
    s = spread([float(v) for v in range(1, 11)])
    assert (s.count, s.p50, s.p90, s.mean) == (10, 5.0, 9.0, 5.5)
    assert spread([]).p50 is None and spread([4.0]).p90 == 4.0


def created(store: Store, task_id: str, tier: str = "standard", change_type: str = "dependency-bump") -> None:
    emit(store, "approver:alice", "task.created", task_id, idea="I-000000000001", repo="acme/web",
         change_type=change_type, tier=tier, spec_hash="0" * 64)


def delta(*entries: tuple[str, str, str | None]) -> dict[str, object]:
    return {"delta": [{"ecosystem": "pypi", "name": name, "before": None, "after": "1.0", "change": change,
                       "license": lic, "integrity": "sha256:ab"} for name, change, lic in entries]}


def test_dependency_posture_and_provenance_coverage(store: Store, clock: FakeClock) -> None:
    a, b, c, d = "T-00000000000a", "T-00000000000b", "T-00000000000c", "T-00000000000d"
    for t in (a, b, c, d):
        created(store, t)
    sha_a, sha_b = "a" * 40, "b" * 40
    # a: two additions and a bump, with an SBOM, delivered with provenance for its commit.
    settle(store, a, "delivering", {"commit": sha_a, "gates": [], "dependencies": {
        **delta(("attrs", "added", "MIT"), ("idna", "added", "BSD-3-Clause"), ("rich", "upgraded", "MIT")),
        "sbom": {"bomFormat": "CycloneDX"}, "sbom_sha256": "c" * 64}}, commit=sha_a)
    emit(store, "system", "task.succeeded", a, commit=sha_a)
    emit(store, "system", "provenance.issued", a, task=a, commit=sha_a, envelope_sha256="e" * 64)
    # b: one downgrade, a removal, no SBOM; its provenance names another commit: not verified.
    settle(store, b, "delivering", {"commit": sha_b, "dependencies": delta(("six", "downgraded", None),
                                                                            ("toml", "removed", "MIT"))})
    emit(store, "system", "task.succeeded", b, commit=sha_b)
    emit(store, "system", "provenance.issued", b, task=b, commit="f" * 40, envelope_sha256="e" * 64)
    # c: blocked by two dependency reasons and a path reason.
    settle(store, c, "blocked", {"gates": ["dependency: npm:axios 1.14.1 is on the denylist",
                                           "dependency: pypi:left-pad is not on the allowlist",
                                           "blocked path: .github/workflows/x.yml"]})
    # d: failed later (no result).
    clock.advance(60)
    emit(store, "system", "task.failed", d)

    timeline = Timeline(store.audit, store).follow()
    fig = compute_figures(timeline, clock.now - 3600, now=clock.now)
    deps = fig.dependencies
    assert (fig.delivered, fig.blocked, fig.failed) == (2, 1, 1)
    assert (deps.changes, deps.added, deps.upgraded, deps.downgraded, deps.removed, deps.bumped) == (2, 2, 1, 1, 1, 2)
    assert deps.denied == 2
    assert deps.licenses == {"BSD-3-Clause": 1, "MIT": 2, "unknown": 1}
    assert (deps.with_sbom, deps.sbom_coverage) == (1, 0.5)
    assert (fig.provenance.delivered, fig.provenance.verified, fig.provenance.share) == (2, 1, 0.5)
    assert fig.gate_blocks == {"blocked_path": 1, "dependency": 2}
    assert [s.model_dump() for s in fig.segments] == [{
        "tier": "standard", "change_type": "dependency-bump", "created": 4, "succeeded": 2, "blocked": 1,
        "failed": 1, "revoked": 0, "denied": 0, "expired": 0}]
    # The window: only what ends inside it.
    later = compute_figures(timeline, clock.now - 30, now=clock.now)
    assert (later.created, later.delivered, later.failed) == (0, 0, 1)


def test_a_result_without_the_brokers_settling_event_counts_for_nothing(store: Store, clock: FakeClock) -> None:
    task = "T-0000000000aa"
    created(store, task)
    settle(store, task, "delivering", {"dependencies": delta(("attrs", "added", "MIT"))})
    # Evidence of another run followed by a broker event that settles nothing (task.running):
    # the broker never accepted that result, so its delta is not the delivered change's.
    settle(store, task, "running", {"dependencies": delta(("worse", "added", "GPL-3.0"))})
    emit(store, "system", "task.succeeded", task, commit="a" * 40)
    fig = compute_figures(Timeline(store.audit, store).follow(), clock.now - 60, now=clock.now)
    assert fig.dependencies.added == 1 and fig.dependencies.licenses == {"MIT": 1}


def test_license_labels_are_bounded_and_every_surface_escapes(store: Store, clock: FakeClock) -> None:
    task = "T-0000000000ab"
    created(store, task, tier="<b>tier</b>", change_type="docs\x1b[31m")
    hostile = [(f"p{i}", "added", f"L{i}") for i in range(15)] + [("q", "added", "<script>x</script>\x1b[2J")]
    settle(store, task, "delivering", {"dependencies": delta(*hostile)})
    emit(store, "system", "task.succeeded", task, commit="a" * 40)
    fig = compute_figures(Timeline(store.audit, store).follow(), clock.now - 60, now=clock.now)
    assert len(fig.dependencies.licenses) == 13 and fig.dependencies.licenses["other"] == 4
    text = render_text(fig)
    assert "\x1b" not in text and "docs\\x1b[31m" in text
    page = render_html(fig)
    assert "<b>tier</b>" not in page and "&lt;b&gt;tier&lt;/b&gt;" in page


def test_revoke_to_stop_counts_only_runs_the_revoke_caught_live(store: Store, clock: FakeClock) -> None:
    live, requeued = "T-0000000000e1", "T-0000000000e2"
    for t in (live, requeued):
        created(store, t)
        emit(store, "system", "task.running", t, attempt=1, run="r1")
    emit(store, "system", "task.queued", requeued, retry=True)  # its run was abandoned, then retried
    for t in (live, requeued):
        emit(store, "cli:bob", "task.revoked", t, reason="stop")
    clock.advance(3)
    for t in (live, requeued):
        emit(store, "system", "run.stopped", t, worker="w1", why="revoked")
    fig = compute_figures(Timeline(store.audit, store).follow(), clock.now - 60, now=clock.now)
    assert fig.revoked == 2 and fig.revoke_to_stop.model_dump() == {"count": 1, "p50": 3.0, "p90": 3.0, "mean": 3.0}
