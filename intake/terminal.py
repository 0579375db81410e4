"""Showing untrusted text on a terminal: control characters become visible escapes.

An idea's text may carry ANSI sequences (colour, cursor moves, OSC 8 links, title changes) meant
to disguise what an approver reads, or bidi overrides that reorder it ("Trojan Source").
Controls other than newline and tab are shown as ``\\xNN``, bidi controls as ``\\uNNNN``.
"""

from __future__ import annotations

import re

# C0 controls except \t and \n, DEL, and the C1 range (U+0080-U+009F, e.g. the 8-bit CSI).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe(text: str) -> str:
    """``text`` with every terminal control character replaced by a visible escape."""
    def visible(m: re.Match[str]) -> str:
        code = ord(m.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROL.sub(visible, text)
