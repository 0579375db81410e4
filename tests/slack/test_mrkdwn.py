"""intake.text.mrkdwn: escaping untrusted text and building mentions only from validated ids."""

from __future__ import annotations

import json

import pytest

from intake.text.mrkdwn import escape, is_user_id, mention
from tests.conftest import VECTORS


def _vectors(name: str) -> dict:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


CASES = _vectors("mrkdwn_escape.json")["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["in"] for c in CASES])
def test_escape_vectors(case: dict) -> None:
    assert escape(case["in"]) == case["out"]


def test_escape_ampersand_first_and_never_unescapes() -> None:
    assert escape("&lt;!here&gt;") == "&amp;lt;!here&amp;gt;"
    assert escape(escape("<&>")) == "&amp;lt;&amp;amp;&amp;gt;"


@pytest.mark.parametrize(
    "text",
    [
        "<!here>",
        "<!everyone>",
        "<!subteam^S0123ABCD>",
        "<#C0123ABCD>",
        "<!date^1392734382^{date}|x>",
    ],
)
def test_escaped_text_cannot_form_control_sequences(text: str) -> None:
    out = escape(text)
    assert "<" not in out and ">" not in out


def test_escape_leaves_other_characters_alone() -> None:
    text = "*bold* _it_ `code` ~s~ \"q\" 'a' é \n"
    assert escape(text) == text


def test_escape_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        escape(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("uid", ["U024BE7LH", "W012A3CDE", "UABCDEFGH1234"])
def test_mention_valid(uid: str) -> None:
    assert is_user_id(uid)
    assert mention(uid) == f"<@{uid}>"


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "U1234567",  # too short
        "u024BE7LH",  # lower-case prefix
        "C024BE7LH",  # a channel, not a user
        "U024be7lh",
        "U024BE7LH\n",  # "$" would have accepted this
        "U024BE7LH>",
        "U024BE7LH|x",
        "<@U024BE7LH>",
        "U024BE7LＨ",  # full-width letter
        "U０２４BE7LH",  # full-width digits
    ],
)
def test_mention_refuses_anything_else(uid: str) -> None:
    assert not is_user_id(uid)
    with pytest.raises(ValueError):
        mention(uid)


def test_mention_refuses_non_str() -> None:
    assert not is_user_id(12345678901)
    with pytest.raises(ValueError):
        mention(None)  # type: ignore[arg-type]
