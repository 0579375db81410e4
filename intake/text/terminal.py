"""Showing untrusted text on a terminal: control and hidden characters become visible escapes.

An idea's text may carry ANSI sequences (colour, cursor moves, OSC 8 links, title changes) meant
to disguise what an approver reads, bidi overrides that reorder it ("Trojan Source"), or
zero-width and tag characters that hide words from a reader but not from an agent. Newline and
tab are kept; C0/C1 controls and DEL are shown as ``\\xNN``, every other hidden character (the
one definition, :func:`intake.text.normalise.is_hidden`) as ``\\uNNNN`` or ``\\UNNNNNNNN``.

The CLI's shapes live here too: :func:`table` for lists, :func:`fields` for ``show``.
"""

from __future__ import annotations

import datetime
import unicodedata
from collections.abc import Iterable, Sequence

from intake.text.normalise import is_hidden


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def safe(text: str) -> str:
    """``text`` with every terminal control or hidden character replaced by a visible escape."""
    return "".join(_escape(ch) if ch not in "\t\n" and is_hidden(ch) else ch for ch in text)


def _width(text: str) -> int:
    """Terminal columns ``text`` takes (wide East Asian characters take two, combining none)."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def cell(value: object, limit: int = 60) -> str:
    """One table cell: made safe, on one line (newlines shown as ``\\n``), cut to ``limit``."""
    text = "-" if value is None or value == "" else safe(str(value)).replace("\n", "\\n").replace("\t", " ")
    if _width(text) <= limit:
        return text
    while _width(text) > limit - 1:
        text = text[:-1]
    return text + "…"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, limit: int = 60) -> list[str]:
    """Aligned columns under an upper-case header, every cell through :func:`cell`; the last
    column is not padded (no trailing spaces)."""
    body = [[cell(v, limit) for v in row] for row in rows]
    head = [h.upper() for h in headers]
    widths = [max(_width(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        padded = [c + " " * (widths[i] - _width(c)) for i, c in enumerate(cells[:-1])]
        return "  ".join([*padded, cells[-1]])

    return [line(head), *(line(r) for r in body)]


def when(epoch: float | None) -> str:
    """A stored timestamp as people read it (UTC, to the second)."""
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def fields(pairs: Iterable[tuple[str, object]], indent: int = 0) -> list[str]:
    """``key  value`` lines with aligned values, never a Python repr: a dict becomes a nested
    section under its key, a list of scalars a comma-separated value, a list of dicts numbered
    sub-sections, ``None`` a dash, booleans yes/no and numbers under a ``*_at`` key UTC times.
    Every string is made safe."""
    items = [(k, v) for k, v in pairs]
    width = max((len(k) for k, v in items if not _nested(v)), default=0)
    pad, out = " " * indent, []
    for key, value in items:
        if isinstance(value, dict):
            out.append(f"{pad}{key}:")
            out += fields(((_label(k), v) for k, v in value.items()), indent + 2) if value else [f"{pad}  -"]
        elif _nested(value):
            out.append(f"{pad}{key}:")
            for n, item in enumerate(value, 1):  # type: ignore[arg-type]
                out.append(f"{pad}  [{n}]")
                out += fields(((_label(k), v) for k, v in item.items()), indent + 4)
        elif isinstance(value, int | float) and not isinstance(value, bool) and key.replace(" ", "_").endswith("_at"):
            out.append(f"{pad}{key:<{width}}  {when(value)}")
        else:
            out.append(f"{pad}{key:<{width}}  {_scalar(value)}".rstrip())
    return out


def _label(key: object) -> str:
    return str(key).replace("_", " ")


def _nested(value: object) -> bool:
    return isinstance(value, dict) or (isinstance(value, list | tuple) and any(isinstance(v, dict) for v in value))


def _scalar(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(_scalar(v) for v in value) or "-"
    return safe(str(value)).replace("\n", "\\n")
