"""One normalisation of untrusted channel text, applied by capture to every channel.

Order of work: the channel first decodes its *own* transport encoding (Slack's ``&amp;``
``&lt;`` ``&gt;`` entities, HTML mail bodies, …) so the broker stores what the person wrote;
then :func:`normalise` puts it into NFC and refuses text that is empty once every hidden
character is taken out. Nothing else is changed: the stored text is the person's words, and
every surface (Slack mrkdwn, console HTML, the CLI terminal, the agent prompt) escapes it for
itself.

Hidden characters (:func:`is_hidden`: Unicode Cf/Co/Cs/Cn and other invisible formatting, bidi
controls, tag characters, variation selectors, zero-width and filler characters, odd spaces)
are **kept and marked visibly**, not refused: zero-width joiners, variation selectors and
LRM/RLM marks are part of ordinary emoji and right-to-left writing, so refusing them would
refuse real requests. Marking makes them harmless where it matters, in front of an approver:
the console and the Slack card show each one as ``⟨U+XXXX⟩`` (:func:`visible`), so what an
approver reads is exactly what the agent will get. Only text made of nothing visible at all is
refused, because its card would look blank.
"""

from __future__ import annotations

import re
import unicodedata

from intake.core.errors import InvalidInput

# Whitespace that is shown as itself; every other space or separator is marked.
_SHOWN_WHITESPACE = frozenset("\n\t ")
# Letters that render as nothing: Hangul fillers and the braille blank.
_INVISIBLE_LETTERS = frozenset({0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800})
# Control, format (incl. bidi controls, zero-width, tag characters), private use, surrogate,
# unassigned, and the line/paragraph/space separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp", "Zs"})
_SLACK_ENTITY = re.compile(r"&(amp|lt|gt);")
_SLACK_ENTITIES = {"amp": "&", "lt": "<", "gt": ">"}


def is_hidden(ch: str) -> bool:
    """True if the character renders as nothing or reorders what is shown around it."""
    if ch in _SHOWN_WHITESPACE:
        return False
    cp = ord(ch)
    if cp in _INVISIBLE_LETTERS or 0xFE00 <= cp <= 0xFE0F or 0xE0100 <= cp <= 0xE01EF:  # variation selectors
        return True
    return unicodedata.category(ch) in _HIDDEN_CATEGORIES


def marker(ch: str) -> str:
    """The visible stand-in for one hidden character, e.g. ``⟨U+200B⟩``."""
    return f"⟨U+{ord(ch):04X}⟩"


def visible(text: str) -> str:
    """``text`` with every hidden character replaced by its :func:`marker` (for display only)."""
    return "".join(marker(ch) if is_hidden(ch) else ch for ch in text)


def normalise(text: str) -> str:
    """The text capture stores: NFC, otherwise unchanged.

    Raises:
        InvalidInput: nothing visible is left once hidden characters and whitespace are
            removed (an idea of only zero-width or bidi characters would show as a blank card).
    """
    if not isinstance(text, str):
        raise InvalidInput("idea text must be a string")
    text = unicodedata.normalize("NFC", text)
    if not any(not ch.isspace() and not is_hidden(ch) for ch in text):
        if text.strip():
            raise InvalidInput(
                "idea text has nothing visible: it is only invisible or direction-control "
                "characters (zero-width spaces, bidi overrides, …)"
            )
        raise InvalidInput("idea text is empty")
    return text


def normalise_title(title: str) -> str:
    """A title in NFC (surfaces escape and mark it like the text)."""
    return unicodedata.normalize("NFC", title) if isinstance(title, str) else ""


def decode_slack(text: str) -> str:
    """Undo Slack's own encoding of message text: ``&amp;`` ``&lt;`` ``&gt;`` become ``&`` ``<``
    ``>`` in one pass (so ``&amp;lt;``, what Slack sends for a typed ``&lt;``, becomes ``&lt;``).
    ``<@U…>`` mentions and ``<url|label>`` links stay as Slack wrote them."""
    return _SLACK_ENTITY.sub(lambda m: _SLACK_ENTITIES[m.group(1)], text)
