"""Showing untrusted text and numbers in the console: invisible characters made visible, and
server-side SVG charts. Templates autoescape everything; these helpers only shape the data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from intake.text.normalise import is_hidden, marker, visible

# Characters that render as nothing, or that reorder what is shown around them (bidi controls),
# are shown as ⟨U+XXXX⟩ markers so an approver sees exactly what the agent will get. The one
# definition of "hidden" is intake.text.normalise.is_hidden (capture refuses text of nothing else).


def show_hidden(value: Any) -> Any:
    """The Jinja ``finalize`` of every HTML surface (console pages, the HTML report): each
    string a template prints has its hidden characters replaced by ``⟨U+XXXX⟩`` markers before
    it is autoescaped, so no page (a list, a table cell, a chart label, an attribute) can show
    text that reads differently from what is stored. Plain text, never markup: a marker is
    safe in any HTML context. :class:`Markup` (our own HTML) passes unchanged."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return visible(value)
    return value


@dataclass(frozen=True)
class Segment:
    text: str
    marker: bool = False


def visible_segments(text: str) -> list[Segment]:
    """``text`` as plain runs and ``⟨U+XXXX⟩`` markers for every hidden character."""
    out: list[Segment] = []
    run: list[str] = []
    for ch in text:
        if is_hidden(ch):
            if run:
                out.append(Segment("".join(run)))
                run = []
            out.append(Segment(marker(ch), marker=True))
        else:
            run.append(ch)
    if run:
        out.append(Segment("".join(run)))
    return out


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    y: int
    width: int
    unit: str = ""

    @property
    def shown(self) -> str:
        """The value as the chart prints it (``%`` values are fractions; ``s`` seconds)."""
        if self.unit == "%":
            return f"{self.value * 100:.0f}%"
        if self.unit == "s":
            return duration(self.value)
        return f"{self.value:g}"


def duration(seconds: float) -> str:
    """``42s``, ``7m 3s``, ``5h 2m``, ``3d 4h``: short enough for a chart label."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


@dataclass(frozen=True)
class Chart:
    """A horizontal bar chart, laid out for the ``chart`` macro (pure SVG, no script)."""

    title: str
    bars: list[Bar]
    height: int
    width: int = 560
    label_w: int = 200
    key: str = ""  # a stable id for the figure (``chart-<key>``)


def bar_chart(title: str, values: list[tuple[str, float]], *, width: int = 560, label_w: int = 200,
              key: str = "", unit: str = "", top: float | None = None) -> Chart:
    """Lay out one horizontal bar per (label, value); bars scale to ``top`` (default: the
    largest value). ``unit`` is ``%`` for fractions, ``s`` for seconds, else plain numbers."""
    top = top or max((v for _, v in values), default=0.0) or 1.0
    span = width - label_w - 60
    bars = [Bar(label, value, 8 + i * 24, int(span * min(value, top) / top), unit)
            for i, (label, value) in enumerate(values)]
    return Chart(title, bars, height=max(40, 16 + 24 * len(values)), width=width, label_w=label_w, key=key)


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str  # the period and its value, for the point's <title>


@dataclass(frozen=True)
class Sparkline:
    """A small line chart of one indicator over the trend's periods, laid out for the
    ``sparkline`` macro (pure SVG, no script). Missing values leave a gap."""

    key: str
    title: str
    points: list[Point]
    paths: list[str]  # one polyline ("x,y x,y …") per run of adjacent values
    width: int = 180
    height: int = 40


def sparkline(key: str, title: str, values: list[tuple[str, float | None]], *, unit: str = "",
              width: int = 180, height: int = 40) -> Sparkline:
    """Lay out ``values`` (label, value or None) left to right, scaled between 0 and the largest
    value; ``unit`` as for :class:`Bar`."""
    top = max((v for _, v in values if v is not None), default=0.0) or 1.0
    step = (width - 8) / max(len(values) - 1, 1)
    points, runs, run = [], [], []
    for i, (label, value) in enumerate(values):
        if value is None:
            if len(run) > 1:
                runs.append(run)
            run = []
            continue
        x, y = 4 + i * step, height - 4 - (height - 8) * min(value, top) / top
        shown = Bar(label, value, 0, 0, unit).shown
        points.append(Point(round(x, 1), round(y, 1), f"{label}: {shown}"))
        run.append(f"{x:.1f},{y:.1f}")
    if len(run) > 1:
        runs.append(run)
    return Sparkline(key, title, points, [" ".join(r) for r in runs], width, height)
