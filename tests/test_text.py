"""The one normalisation of untrusted text (intake.text.normalise), as capture applies it."""

from __future__ import annotations

import pytest

from intake.core.errors import InvalidInput
from intake.storage.store import Store
from intake.text.html import visible_segments
from intake.text.normalise import decode_slack, is_hidden, normalise, visible
from tests.factories import draft


def test_slack_entities_decode_in_one_pass() -> None:
    assert decode_slack("MSc &amp; MBA &lt;3") == "MSc & MBA <3"
    assert decode_slack("&amp;lt;") == "&lt;"  # what Slack sends for a typed "&lt;"
    assert decode_slack("&quot; &#60; <@U123ABCDE>") == "&quot; &#60; <@U123ABCDE>"  # Slack encodes only three


def test_nfc_and_text_otherwise_unchanged() -> None:
    assert normalise("cafe\u0301") == "caf\u00e9"
    kept = "fix it\u200d👩\u200d💻 \u202eoops\u202c"
    assert normalise(kept) == kept


@pytest.mark.parametrize("text", [
    "\u200b", "\u200b\u200c\u200d\u2060", "\u202e\u202d\u2066\u2069", "\U000e0041\U000e0042", "\ufe0f",
    " \u3164 \u2800 ", "\ue000",
])
def test_nothing_visible_is_refused_with_a_clear_message(text: str) -> None:
    with pytest.raises(InvalidInput, match="nothing visible"):
        normalise(text)


def test_empty_is_still_empty() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        normalise(" \n\t\u00a0\u3000")


def test_one_definition_for_marks_on_every_surface() -> None:
    text = "a\u200bb\U000e0041\ufe0fc\u202e"
    assert visible(text) == "a⟨U+200B⟩b⟨U+E0041⟩⟨U+FE0F⟩c⟨U+202E⟩"
    assert "".join(s.text for s in visible_segments(text)) == visible(text)
    assert not any(is_hidden(ch) for ch in "hello\n\tworld é 中文 עברית")


def test_capture_applies_it_for_every_channel(store: Store) -> None:
    with pytest.raises(InvalidInput, match="nothing visible"):
        store.capture(draft(text="\u200b\u200b"))
    idea, _ = store.capture(draft(text="cafe\u0301", title="Cafe\u0301"))
    assert idea.text == "café" and idea.title == "Café"
    assert store.get_idea(idea.id).text == "café"


def test_the_terminal_shows_the_same_hidden_characters() -> None:
    from intake.text.terminal import safe

    assert safe("a\u200bb\U000e0041c\u202e\x1b[31m\tok\n") == "a\\u200bb\\U000e0041c\\u202e\\x1b[31m\tok\n"
    assert safe("é 中文 עברית") == "é 中文 עברית"
