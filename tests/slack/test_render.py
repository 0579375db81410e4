"""intake.channels.slack.render: Block Kit from Jinja2 templates, safe by construction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest

from intake.channels.slack import render
from intake.channels.slack.render import RenderError

HOSTILE = "<!channel> deploy & <https://evil.example|https://github.com/acme/web>"
HOSTILE_ESCAPED = (
    "&lt;!channel&gt; deploy &amp; &lt;https://evil.example|https://github.com/acme/web&gt;"
)


def card(**overrides: Any) -> list[dict[str, Any]]:
    args: dict[str, Any] = {
        "idea_id": "I-7f3a",
        "requester_slack_id": "U024BE7LH",
        "requester_label": "alice",
        "source_channel": "#eng-requests",
        "provenance": {"channel": "slack", "delivery": "Ev0123ABCD"},
        "text": "Please add a health check endpoint.",
        "title": "Health check endpoint",
        "state_line": "1 of 2 approvals by @bob",
        "spec_hash_short": None,
        "buttons": False,
    }
    args.update(overrides)
    return render.idea_card(**args)


def mrkdwn_texts(node: Any) -> list[str]:
    """Every text of a mrkdwn text object in ``node``."""
    out: list[str] = []
    if isinstance(node, list):
        for item in node:
            out += mrkdwn_texts(item)
    elif isinstance(node, dict):
        if node.get("type") == "mrkdwn":
            out.append(node["text"])
        for value in node.values():
            out += mrkdwn_texts(value)
    return out


def block(blocks: list[dict[str, Any]], block_id: str) -> dict[str, Any]:
    return next(b for b in blocks if b.get("block_id") == block_id)


# -- idea card -----------------------------------------------------------------------------


def test_hostile_text_is_escaped_in_card_json() -> None:
    blocks = card(text=HOSTILE)
    text = block(blocks, "idea_text")["text"]
    assert text == {"type": "mrkdwn", "verbatim": True, "text": HOSTILE_ESCAPED}
    raw = json.dumps(blocks)
    assert "<!channel>" not in raw and "<https://" not in raw


def test_decoded_slack_text_is_escaped_once_on_the_card() -> None:
    # What capture stores for Slack's "MSc &amp; MBA &lt;3" is the decoded text; the card
    # escapes it for mrkdwn exactly once.
    text = block(card(text="MSc & MBA <3"), "idea_text")["text"]["text"]
    assert text == "MSc &amp; MBA &lt;3"


def test_hidden_characters_are_marked_on_the_card_and_in_the_title() -> None:
    blocks = card(text="ok\u200b\u202eexe.txt", title="T\u2066itle")
    assert block(blocks, "idea_text")["text"]["text"] == "ok⟨U+200B⟩⟨U+202E⟩exe.txt"
    raw = json.dumps(blocks, ensure_ascii=False)
    assert "T⟨U+2066⟩itle" in raw and "\u202e" not in raw and "\u2066" not in raw


@pytest.mark.parametrize(
    "field", ["requester_label", "source_channel", "state_line", "idea_id", "spec_hash_short"]
)
def test_every_untrusted_field_is_escaped(field: str) -> None:
    blocks = card(**{field: HOSTILE, "requester_slack_id": None, "buttons": True})
    texts = "\n".join(mrkdwn_texts(blocks))
    assert HOSTILE_ESCAPED in texts
    assert "<" not in texts and ">" not in texts


def test_provenance_keys_and_values_are_escaped() -> None:
    blocks = card(provenance={"<!here>": HOSTILE})
    texts = mrkdwn_texts(block(blocks, "idea_provenance"))
    assert "&lt;!here&gt;: " + HOSTILE_ESCAPED in texts


def test_provenance_is_capped_at_context_limit() -> None:
    prov = {f"k{i}": "v" for i in range(15)}
    elements = block(card(provenance=prov), "idea_provenance")["elements"]
    assert len(elements) <= 10
    assert "(+6 more)" in elements[0]["text"]


def test_title_with_json_and_template_syntax_does_not_break_json() -> None:
    title = 'a "quoted" }]} title\n{{ 7 * 7 }} {% raw %}\\'
    blocks = card(title=title, text='x"}],"blocks":[{"type":"divider"}]} {{ 7 * 7 }}')
    header = blocks[0]
    assert header["type"] == "header"
    assert header["text"]["text"] == title.strip()
    assert "{{ 7 * 7 }}" in block(blocks, "idea_text")["text"]["text"]
    assert [b["type"] for b in blocks].count("divider") == 0


def test_header_is_capped_and_never_empty() -> None:
    assert len(card(title="t" * 1000)[0]["text"]["text"]) == render.HEADER_TEXT_MAX
    assert card(title="   ")[0]["text"]["text"] == "Idea I-7f3a"


def test_requester_mention_only_for_valid_id() -> None:
    meta = block(card(), "idea_meta")["fields"][0]["text"]
    assert meta == "*Requester*\n<@U024BE7LH>"
    forged_card = card(requester_slack_id="U024BE7LH> <!channel")
    forged = block(forged_card, "idea_meta")["fields"][0]["text"]
    assert "<" not in forged
    assert forged == "*Requester*\nalice"
    email = block(card(requester_slack_id=None, requester_label="<bob@example.com>"), "idea_meta")
    assert email["fields"][0]["text"] == "*Requester*\n&lt;bob@example.com&gt;"


def test_long_text_is_truncated_for_display_only() -> None:
    text = "&" * 5000
    blocks = card(text=text)
    shown = block(blocks, "idea_text")["text"]["text"]
    assert len(shown) <= render.DISPLAY_TEXT_MAX
    assert shown == "&amp;" * (render.DISPLAY_TEXT_MAX // 5)  # no entity cut in half
    notes = [t for t in mrkdwn_texts(blocks) if "truncated for display" in t]
    assert notes == ["(truncated for display; full text in `intake show I-7f3a`)"]
    assert text == "&" * 5000


def test_short_text_has_no_truncation_note() -> None:
    assert not [t for t in mrkdwn_texts(card()) if "truncated" in t]
    assert len(block(card(text="a" * 2900), "idea_text")["text"]["text"]) == 2900


def test_empty_text_still_renders_a_valid_section() -> None:
    assert block(card(text=""), "idea_text")["text"]["text"] == "_(no text)_"


def test_state_line_and_spec_hash() -> None:
    state = block(card(state_line="queued", spec_hash_short="3f9a1c2b"), "idea_state")
    assert state["elements"][0]["text"] == "queued · spec `3f9a1c2b`"
    assert block(card(), "idea_state")["elements"][0]["text"] == "1 of 2 approvals by @bob"


def test_buttons() -> None:
    assert not [b for b in card() if b["type"] == "actions"]
    actions = block(card(buttons=True, idea_id='I-"x"'), "idea_actions")
    promote, deny = actions["elements"]
    assert (promote["action_id"], promote["style"]) == ("intake_promote", "primary")
    assert (deny["action_id"], deny["style"]) == ("intake_deny", "danger")
    assert promote["value"] == deny["value"] == 'I-"x"'
    assert card(buttons=True)[-1]["type"] == "actions"


# -- modals --------------------------------------------------------------------------------


def by_block(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["block_id"]: b for b in view["blocks"] if "block_id" in b}


def test_promote_modal_shape() -> None:
    meta = json.dumps({"idea": "I-1", "channel": "C1", "ts": "1.2", "evil": '"}<!channel>'})
    view = render.promote_modal(
        idea_id="I-1", repos=["acme/web", 'acme/"odd"'], change_types=["bugfix", "feature"],
        private_metadata=meta,
    )
    assert view["type"] == "modal"
    assert view["callback_id"] == "intake_promote_submit"
    assert view["private_metadata"] == meta
    assert len(view["title"]["text"]) <= 24
    blocks = by_block(view)
    repo = blocks["repo"]["element"]
    assert (repo["type"], repo["action_id"]) == ("static_select", "repo")
    assert [o["value"] for o in repo["options"]] == ["acme/web", 'acme/"odd"']
    assert repo["options"][0]["text"] == {"type": "plain_text", "text": "acme/web"}
    change = blocks["change_type"]["element"]
    assert (change["type"], change["action_id"]) == ("static_select", "change_type")
    assert [o["value"] for o in change["options"]] == ["bugfix", "feature"]
    assert blocks["note"]["optional"] is True
    assert blocks["note"]["element"]["type"] == "plain_text_input"
    code = blocks["code"]
    assert code["label"]["text"] == "Authenticator code"
    assert code.get("optional", False) is False
    element = code["element"]
    assert (element["action_id"], element["min_length"], element["max_length"]) == ("code", 6, 6)


@pytest.mark.parametrize(
    ("repos", "change_types"),
    [([], ["bugfix"]), (["a"], []), (["a", "a"], ["bugfix"]), (["x" * 151], ["bugfix"]),
     ([f"r{i}" for i in range(101)], ["bugfix"]), ([""], ["bugfix"])],
)
def test_promote_modal_refuses_unrepresentable_options(
    repos: list[str], change_types: list[str]
) -> None:
    with pytest.raises(ValueError):
        render.promote_modal(
            idea_id="I-1", repos=repos, change_types=change_types, private_metadata=""
        )


def test_long_option_text_is_capped_but_value_kept() -> None:
    repo = "acme/" + "r" * 140
    view = render.promote_modal(
        idea_id="I-1", repos=[repo], change_types=["bugfix"], private_metadata=""
    )
    option = by_block(view)["repo"]["element"]["options"][0]
    assert len(option["text"]["text"]) == render.OPTION_TEXT_MAX
    assert option["value"] == repo


def test_private_metadata_is_limited() -> None:
    with pytest.raises(ValueError):
        render.deny_modal(subject_id="I-1", private_metadata="x" * 3001)


def test_deny_modal_shape() -> None:
    view = render.deny_modal(subject_id="<!here>", private_metadata="m")
    assert view["callback_id"] == "intake_deny_submit"
    assert view["private_metadata"] == "m"
    reason = by_block(view)["reason"]
    assert reason.get("optional", False) is False
    assert reason["element"]["multiline"] is True
    assert reason["element"]["action_id"] == "reason"
    assert "&lt;!here&gt;" in view["blocks"][0]["text"]["text"]


# -- status --------------------------------------------------------------------------------


def test_status_message_escapes_detail_and_link() -> None:
    blocks = render.status_message(
        subject_id="T-1",
        state="failed",
        detail=HOSTILE,
        link="https://evil.example|https://github.com/acme/web",
    )
    texts = mrkdwn_texts(blocks)
    assert texts[0] == "`T-1` is now *failed*\n" + HOSTILE_ESCAPED
    assert texts[1] == "Link: https://evil.example|https://github.com/acme/web"
    assert all(b["text"]["verbatim"] for b in blocks if "text" in b)
    assert "<" not in json.dumps(blocks)


def test_status_message_without_link_or_detail() -> None:
    blocks = render.status_message(subject_id="T-1", state="queued", detail="", link=None)
    assert len(blocks) == 1
    assert blocks[0]["text"]["text"] == "`T-1` is now *queued*"


def test_fallback_text() -> None:
    assert render.fallback_text(HOSTILE) == HOSTILE_ESCAPED
    assert render.fallback_text("&" * 400).endswith("&amp;…")


# -- the environment itself ----------------------------------------------------------------


def test_strict_undefined_catches_a_missing_variable() -> None:
    with pytest.raises(jinja2.UndefinedError, match="title"):
        render.render("slack/idea_card.json.j2", idea_id="I-1")


def _env_with(tmp_path: Path, source: str) -> jinja2.Environment:
    (tmp_path / "t.json.j2").write_text(source, encoding="utf-8")
    return render.build_env(tmp_path)


def test_expressions_are_json_values(tmp_path: Path) -> None:
    source = '{"s": {{ s }}, "n": {{ n }}, "b": {{ b }}, "l": {{ l }}, "z": {{ z }}}'
    env = _env_with(tmp_path, source)
    out = render.render_with(
        env, "t.json.j2", s='"}, "x": 1, "y": {"', n=3, b=True, l=["a"], z=None
    )
    assert out == {"s": '"}, "x": 1, "y": {"', "n": 3, "b": True, "l": ["a"], "z": None}


def test_expression_inside_a_quoted_literal_fails_loudly(tmp_path: Path) -> None:
    env = _env_with(tmp_path, '{"text": "hello {{ name }}"}')
    with pytest.raises(RenderError):
        render.render_with(env, "t.json.j2", name="x")


def test_forgotten_mrkdwn_filter_is_caught(tmp_path: Path) -> None:
    source = '{"blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": {{ t }}}}]}'
    env = _env_with(tmp_path, source)
    assert render.render_with(env, "t.json.j2", t="fine text")
    for bad in ("<!channel>", "a & b", "x > y"):
        with pytest.raises(RenderError):
            render.render_with(env, "t.json.j2", t=bad)


def test_check_mrkdwn_allows_only_validated_mentions() -> None:
    render.check_mrkdwn({"type": "mrkdwn", "text": "<@U024BE7LH> &amp; &lt;x&gt;"})
    for bad in ("<@U1>", "<@U024BE7LH|x>", "<#C024BE7LH>", "<!here>", "&#60;"):
        with pytest.raises(RenderError):
            render.check_mrkdwn([{"fields": [{"type": "mrkdwn", "text": bad}]}])


def test_non_object_output_is_refused(tmp_path: Path) -> None:
    env = _env_with(tmp_path, "[{{ x }}]")
    with pytest.raises(RenderError):
        render.render_with(env, "t.json.j2", x=1)


def test_templates_dir_is_in_repo() -> None:
    assert (render.TEMPLATES_DIR / "slack" / "idea_card.json.j2").is_file()


def test_modals_show_the_whole_text_an_approver_freezes() -> None:
    text = ("fix the docs & <tests> " * 700) + "TAIL: add my ssh key"  # ~16 KB, escapes expand it
    view = render.promote_modal(idea_id="I-000000000001", repos=["acme/web"], change_types=["docs"],
                                private_metadata="{}", text=text)
    sections = [b["text"]["text"] for b in view["blocks"][1:] if b["type"] == "section"]
    assert all(len(s) <= 3000 for s in sections)
    joined = "".join(sections).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    assert joined == text and "TAIL: add my ssh key" in sections[-1]
    approve = render.approve_modal(task_id="T-000000000001", summary=text, spec_hash="a" * 64,
                                   private_metadata="{}")
    assert "TAIL: add my ssh key" in approve["blocks"][-2]["text"]["text"]


def test_approve_card_links_to_the_console_for_a_passkey_approval() -> None:
    url = "https://intake.example.com/console/tasks/T-0123456789ab"
    blocks = card(buttons=True, task_id="T-0123456789ab", spec_hash="a" * 64, passkey_url=url)
    (actions,) = [b for b in blocks if b["type"] == "actions"]
    ids = [e["action_id"] for e in actions["elements"]]
    assert ids == ["intake_approve", "intake_deny", "intake_passkey_link"]
    link = actions["elements"][-1]
    assert link["url"] == url and link["text"]["text"] == "Approve with passkey" and "value" not in link
    assert "intake_passkey_link" not in json.dumps(card(buttons=True))


def test_result_card_shows_the_facts_escaped_and_binds_the_button_to_the_sha() -> None:
    sha = "a" * 40
    result = {"commit": sha, "files": ["docs/<!channel>.md", "docs/b.md"], "files_changed": 2,
              "additions": 7, "deletions": 1, "gates": "passed",
              "checks": [{"name": "docs/no-empty-markdown", "ok": True}, {"name": "sec", "ok": False}]}
    blocks = render.result_card(task_id="T-0123456789ab", result=result, waiting=True)
    text = json.dumps(blocks)
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text
    head = blocks[0]["text"]["text"]
    assert "`aaaaaaaaaaaa`" in head and "2 files changed" in head and "+7 / -1" in head
    assert "docs/no-empty-markdown: passed, sec: failed" in blocks[1]["text"]["text"]
    [button] = blocks[-1]["elements"]
    assert button["action_id"] == "intake_accept" and button["value"] == f"T-0123456789ab|{sha}"
    delivered = render.result_card(task_id="T-0123456789ab", result=result, waiting=False)
    assert all(b["type"] != "actions" for b in delivered)


def test_a_reviewed_result_card_shows_the_stat_and_links_to_the_diff_never_an_accept_button() -> None:
    """Issue 20: a result reviewed by its diff is accepted where the diff is shown (the console)."""
    result = {"commit": "a" * 40, "files": ["auth/x.md"], "files_changed": 1, "additions": 2, "deletions": 0,
              "gates": "passed", "review": {"sha256": "f" * 64, "stat": " auth/<!here>.md | 2 ++\n 1 file changed",
                                            "truncated": False, "bytes": 90, "binary": []}}
    blocks = render.result_card(task_id="T-0123456789ab", result=result, waiting=True,
                                console_origin="https://intake.example")
    text = json.dumps(blocks)
    assert "intake_accept" not in text and "<!here>" not in text and "&lt;!here&gt;" in text
    stat = next(b for b in blocks if b.get("block_id") == "result_stat")
    assert "1 file changed" in stat["text"]["text"]
    [button] = blocks[-1]["elements"]
    assert button["action_id"] == "intake_review_link"
    assert button["url"] == "https://intake.example/console/tasks/T-0123456789ab"


def test_accept_modal_names_the_commit_and_asks_for_a_code() -> None:
    view = render.accept_modal(task_id="T-0123456789ab", sha="b" * 40, summary="acme/web · docs\n<@U0000000000>",
                               private_metadata=json.dumps({"task": "T-0123456789ab", "sha": "b" * 40}))
    assert view["callback_id"] == "intake_accept_submit"
    assert "`bbbbbbbbbbbb`" in view["blocks"][0]["text"]["text"]
    assert "<@U0000000000>" not in json.dumps(view["blocks"]) and view["blocks"][-1]["block_id"] == "code"
