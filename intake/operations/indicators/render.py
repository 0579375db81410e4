"""The figures as text (a terminal), JSON and a self-contained HTML page, and as the charts the
HTML report and the console dashboard share.

The HTML report loads nothing: charts are inline SVG laid out on the server
(:func:`intake.text.html.bar_chart`), its one stylesheet is inline and allowed by hash in a
``default-src 'none'`` Content-Security-Policy, and there is no script. Every value is
autoescaped (Jinja2); the terminal rendering shows control characters as escapes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime

import jinja2
from markupsafe import Markup

from intake.core.resources import TEMPLATES_DIR
from intake.operations.indicators.figures import INDICATORS, Figures, Spread
from intake.text.html import Chart, Sparkline, bar_chart, duration, show_hidden, sparkline
from intake.text.terminal import safe

FORMATS = ("text", "json", "html")
_OUTCOMES = ("created", "succeeded", "blocked", "failed", "revoked", "denied", "expired")
# No quotes, '<' or '&' in here: it is inserted verbatim and allowed by its hash.
REPORT_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1d2733; max-width: 64rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; }
th, td { border: 1px solid #c9d1da; padding: 0.25rem 0.6rem; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure.chart { margin: 1rem 0; } figcaption { font-weight: 600; margin-bottom: 0.25rem; }
.warn { background: #fde8e8; border: 1px solid #c53030; padding: 0.5rem; }
td.overdue { background: #fde8e8; font-weight: 600; }
figure.spark { margin: 0; } polyline.line { fill: none; stroke: #3b6ea5; stroke-width: 1.5; }
circle.point { fill: #3b6ea5; } line.base { stroke: #c9d1da; }
table.trend td, table.trend th { font-size: 0.85rem; white-space: nowrap; }
.muted { color: #5b6775; }
"""


def when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def share(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def seconds(value: float | None) -> str:
    return "n/a" if value is None else duration(value)


def day(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def shown(value: float | None, unit: str) -> str:
    """An indicator's value: ``n/a`` when missing, a share as ``%``, seconds as a duration."""
    if value is None:
        return "n/a"
    if unit == "%":
        return share(value)
    if unit == "s":
        return duration(value)
    return f"{value:g}"


def change(value: float | None, unit: str) -> str:
    """The change from the previous period: ``+3``, ``-10%`` (points), ``+2h 5m``, ``±0``; blank when unknown."""
    if value is None:
        return ""
    if value == 0:
        return "±0"
    sign = "+" if value > 0 else "-"
    if unit == "%":
        return f"{sign}{abs(value) * 100:.0f} pts"
    if unit == "s":
        return sign + duration(abs(value))
    return f"{sign}{abs(value):g}"


def trend_rows(fig: Figures) -> list[tuple[str, str, str]]:
    """(key, label, unit) of every indicator the trend shows, block reasons last."""
    rows = list(INDICATORS)
    reasons = sorted({k for p in fig.periods for k in p.values if k.startswith("blocks:")})
    return rows + [(k, "blocked: " + k.removeprefix("blocks:"), "") for k in reasons]


def sparklines(fig: Figures) -> dict[str, Sparkline]:
    """A sparkline per trend indicator (by key), and per repo's dependency trend (``repo:<name>``)."""
    out = {key: sparkline(key, label, [(day(p.since), p.values.get(key)) for p in fig.periods], unit=unit)
           for key, label, unit in trend_rows(fig)} if fig.periods else {}
    for r in fig.repos:
        if r.trend:
            out[f"repo:{r.repo}"] = sparkline(f"repo-{len(out)}", r.repo,
                                              list(zip([day(p.since) for p in fig.periods], r.trend, strict=False)))
    return out


def charts(fig: Figures) -> list[Chart]:
    """The report's charts, in order (the console dashboard shows the same ones)."""
    deps = fig.dependencies
    by_tier: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for s in fig.segments:
        by_tier[s.tier] = by_tier.get(s.tier, 0) + s.created
        by_type[s.change_type] = by_type.get(s.change_type, 0) + s.created

    def spread_values(name: str, spread: Spread) -> list[tuple[str, float]]:
        return [(f"{name} p50", spread.p50 or 0.0), (f"{name} p90", spread.p90 or 0.0)] if spread.count else []

    return [
        bar_chart("Funnel: ideas, promotions and outcomes", [
            ("ideas", fig.ideas), ("promoted", fig.promoted), ("delivered", fig.delivered),
            ("blocked", fig.blocked), ("failed", fig.failed), ("revoked", fig.revoked),
            ("denied", fig.denied), ("expired", fig.expired)], key="funnel"),
        bar_chart("Changes by risk tier", sorted(by_tier.items()), key="tiers"),
        bar_chart("Changes by change type", sorted(by_type.items()), key="change-types"),
        bar_chart("Delivered changes with verified provenance",
                  [("verified", fig.provenance.share or 0.0)] if fig.provenance.delivered else [],
                  key="provenance", unit="%", top=1.0),
        bar_chart("Dependency changes", [("added", deps.added), ("upgraded", deps.upgraded),
                                         ("downgraded", deps.downgraded), ("removed", deps.removed),
                                         ("denied", deps.denied)], key="dependencies"),
        bar_chart("License mix of added and bumped dependencies", list(deps.licenses.items()), key="licenses"),
        bar_chart("Time to promote and to deliver",
                  spread_values("promote", fig.time_to_promote) + spread_values("deliver", fig.time_to_deliver),
                  key="durations", unit="s"),
        bar_chart("Gate blocks by reason", list(fig.gate_blocks.items()), key="gate-blocks"),
        bar_chart("MFA failures by reason", list(fig.mfa_failures.items()), key="mfa-failures"),
        bar_chart("Refused egress by repo", list(fig.refused_egress_by_repo.items()), key="egress-refused"),
        bar_chart("Time to rotate and to revoke credentials",
                  spread_values("rotate", fig.credentials.time_to_rotate)
                  + spread_values("revoke", fig.credentials.time_to_revoke), key="credential-times", unit="s"),
        bar_chart("Credential age (oldest per kind, days)", _oldest(fig), key="credential-ages"),
    ]


def _oldest(fig: Figures) -> list[tuple[str, float]]:
    oldest: dict[str, float] = {}
    for c in fig.credentials.credentials:
        if c.age is not None:
            oldest[c.kind] = max(oldest.get(c.kind, 0.0), round(c.age / 86400, 1))
    return sorted(oldest.items())


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR / "console"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              finalize=show_hidden)


def css_hash() -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(REPORT_CSS.encode()).digest()).decode()


def csp() -> str:
    """The report's policy: nothing loads, no script runs, only its own stylesheet applies."""
    return (f"default-src 'none'; style-src '{css_hash()}'; img-src 'none'; script-src 'none'; "
            "base-uri 'none'; form-action 'none'")


def figures_context(fig: Figures) -> dict[str, object]:
    """What ``_figures.html`` needs: the report's body and the console dashboard's."""
    return {"fig": fig, "charts": charts(fig), "outcomes": _OUTCOMES, "when": when, "share": share,
            "seconds": seconds, "day": day, "shown": shown, "change": change, "trend_rows": trend_rows(fig),
            "sparklines": sparklines(fig)}


def render_html(fig: Figures) -> str:
    """A self-contained HTML page: inline SVG charts, no network, strict CSP meta."""
    return _environment().get_template("report.html").render(
        css=Markup(REPORT_CSS), csp=csp(), **figures_context(fig))


def render_json(fig: Figures) -> str:
    return json.dumps(fig.model_dump(mode="json"), ensure_ascii=True, sort_keys=True, indent=2) + "\n"


def render_text(fig: Figures) -> str:
    """For a terminal: every value that came from a result or a person goes through ``safe``."""
    deps, prov = fig.dependencies, fig.provenance
    until = when(fig.until) if fig.until is not None else "now"
    lines = [f"intake report: {when(fig.since)} to {until} (from the sealed audit log)"]
    if fig.audit.broken:
        lines.append(f"WARNING: the audit chain is broken ({safe(fig.audit.broken[0])}); "
                     "figures cover only entries whose seals check")
    lines += [
        "",
        f"ideas {fig.ideas}, promoted {fig.promoted}, delivered {fig.delivered}, blocked {fig.blocked}, "
        f"failed {fig.failed}, revoked {fig.revoked}, denied {fig.denied}, expired {fig.expired}",
        f"refused egress: {fig.refused_egress}",
        f"provenance: {prov.verified} of {prov.delivered} delivered changes verified ({share(prov.share)})",
        f"dependencies: {deps.added} added, {deps.bumped} bumped ({deps.upgraded} up, {deps.downgraded} down), "
        f"{deps.removed} removed, {deps.denied} denied; SBOM for {deps.with_sbom} of {deps.changes} "
        f"changes ({share(deps.sbom_coverage)})",
        "licenses: " + (", ".join(f"{safe(k)} {v}" for k, v in deps.licenses.items()) or "none"),
    ]
    for name, spread in (("time to promote", fig.time_to_promote), ("time to deliver", fig.time_to_deliver)):
        lines.append(f"{name}: p50 {seconds(spread.p50)}, p90 {seconds(spread.p90)} ({spread.count})")
    lines.append(f"revoke to stop: mean {seconds(fig.revoke_to_stop.mean)} ({fig.revoke_to_stop.count})")
    for name, counts in (("MFA failures", fig.mfa_failures), ("gate blocks", fig.gate_blocks),
                         ("refused egress by repo", fig.refused_egress_by_repo)):
        lines.append(f"{name}: " + (", ".join(f"{safe(k)} {v}" for k, v in counts.items()) or "none"))
    lines += ["", "changes by risk tier and change type:"]
    width = max([len(s.tier) + len(s.change_type) + 3 for s in fig.segments] + [20])
    lines.append(f"  {'tier / type':<{width}} " + " ".join(f"{o:>9}" for o in _OUTCOMES))
    for s in fig.segments:
        lines.append(f"  {safe(s.tier + ' / ' + s.change_type):<{width}} "
                     + " ".join(f"{getattr(s, o):>9}" for o in _OUTCOMES))
    if fig.notable:
        lines += ["", "blocked and revoked:"]
        for n in fig.notable:
            title = safe(n.title) if n.title is not None else "(idea record failed verification)"
            lines.append(f"  {n.task} {n.outcome} {safe(n.tier)}/{safe(n.change_type)}: {title}")
            lines += [f"      {safe(r)}" for r in n.reasons]
    lines += _trend_text(fig) + _repos_text(fig) + _credentials_text(fig)
    lines.append(f"\naudit: {fig.audit.entries} sealed entries, {fig.audit.rejected} rejected, "
                 f"{fig.audit.replayed} replayed copies ignored")
    return "\n".join(lines) + "\n"


def render(fig: Figures, fmt: str) -> str:
    """``fig`` in one of :data:`FORMATS`."""
    return {"text": render_text, "json": render_json, "html": render_html}[fmt](fig)


def _trend_text(fig: Figures) -> list[str]:
    """Each indicator per period: ``value (change)``, the periods as columns."""
    if not fig.periods:
        return []
    lines = ["", f"trend by {fig.by} (each period: value, change from the one before):"]
    cells = [[f"{shown(p.values.get(k), u)} ({change(p.change.get(k), u) or '-'})" for p in fig.periods]
             for k, _, u in trend_rows(fig)]
    widths = [max([len(day(p.since))] + [len(row[i]) for row in cells]) for i, p in enumerate(fig.periods)]
    label_w = max(len(safe(label)) for _, label, _ in trend_rows(fig))
    lines.append(f"  {'':<{label_w}} " + " ".join(f"{day(p.since):>{w}}" for p, w in zip(fig.periods, widths, strict=True)))
    for (_, label, _), row in zip(trend_rows(fig), cells, strict=True):
        lines.append(f"  {safe(label):<{label_w}} " + " ".join(f"{c:>{w}}" for c, w in zip(row, widths, strict=True)))
    return lines


def _repos_text(fig: Figures) -> list[str]:
    if not fig.repos:
        return []
    lines = ["", "dependency risk posture by repo (delivered changes; denylist hits on blocked ones):"]
    for r in fig.repos:
        trend = f"; per {fig.by}: {' '.join(str(n) for n in r.trend)}" if r.trend else ""
        lines.append(f"  {safe(r.repo)}: {r.added} added, {r.bumped} bumped, {r.pinned} of {r.added + r.bumped} "
                     f"pinned with a hash, {r.unknown_licenses} unknown license(s), {r.denylist_hits} denylist "
                     f"hit(s){trend}")
    return lines


def _credentials_text(fig: Figures) -> list[str]:
    cred = fig.credentials
    lines = ["", f"credentials ({cred.overdue} past the policy's maximum age):"]
    for c in cred.credentials:
        age = "age unknown" if c.age is None else f"{seconds(c.age)} old"
        rotated = f", last rotated {when(c.last_rotation)}" if c.last_rotation is not None else ""
        flag = "  PAST MAX AGE" if c.overdue else ""
        lines.append(f"  {c.kind:<12} {safe(c.name)} ({safe(c.detail)}): {age}, max {seconds(c.max_age)}"
                     f"{rotated}{flag}")
    for r in cred.rotations:
        took = f"took {seconds(r.seconds)}" if r.seconds is not None else "under way"
        lines.append(f"  rotation {r.kind} {safe(r.name)}: {safe(r.old)} -> {safe(r.new)} from "
                     f"{when(r.started)}, {took}")
    for v in cred.revocations:
        took = f"took effect in {seconds(v.seconds)} ({v.how})" if v.seconds is not None else "not yet in effect"
        lines.append(f"  revocation {v.kind} {safe(v.name)} at {when(v.at)}: {took}")
    lines.append(f"mean time to rotate: {seconds(cred.time_to_rotate.mean)} ({cred.time_to_rotate.count}); "
                 f"mean time to revoke: {seconds(cred.time_to_revoke.mean)} ({cred.time_to_revoke.count})")
    return lines
