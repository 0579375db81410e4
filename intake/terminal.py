"""Showing untrusted text on a terminal: control and hidden characters become visible escapes.

An idea's text may carry ANSI sequences (colour, cursor moves, OSC 8 links, title changes) meant
to disguise what an approver reads, bidi overrides that reorder it ("Trojan Source"), or
zero-width and tag characters that hide words from a reader but not from an agent. Newline and
tab are kept; C0/C1 controls and DEL are shown as ``\\xNN``, every other hidden character (the
one definition, :func:`intake.channels.text.is_hidden`) as ``\\uNNNN`` or ``\\UNNNNNNNN``.
"""

from __future__ import annotations

from intake.channels.text import is_hidden


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def safe(text: str) -> str:
    """``text`` with every terminal control or hidden character replaced by a visible escape."""
    return "".join(_escape(ch) if ch not in "\t\n" and is_hidden(ch) else ch for ch in text)
