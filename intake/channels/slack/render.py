"""Render Slack Block Kit payloads from the Jinja2 templates in ``templates/slack``.

Safe by construction:

* ``finalize`` JSON-encodes every ``{{ … }}`` result, so an expression always yields one
  complete JSON value (a quoted string, a number, ``true``…). Untrusted text cannot close a
  string or add a key, and an expression placed inside a quoted literal produces invalid JSON,
  which :func:`render` refuses loudly instead of sending.
* ``StrictUndefined`` turns a missing or misspelt variable into an error, not an empty string.
* The ``mrkdwn`` filter (:func:`intake.text.mrkdwn.escape`) is applied in the templates to every
  untrusted string that lands in a ``mrkdwn`` text object; :func:`render` then re-checks every
  mrkdwn text it produced and refuses any ``<…>`` that is not a broker-built user mention, so a
  forgotten filter is a failure, not a ping to the whole channel.
* Templates are repo files; untrusted strings are only ever context values, never template
  source.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from intake.core.resources import TEMPLATES_DIR
from intake.text import mrkdwn
from intake.text.normalise import visible

# Slack Block Kit limits we design around (https://docs.slack.dev/reference/block-kit).
SECTION_TEXT_MAX = 3000
DISPLAY_TEXT_MAX = 2900  # idea text shown on a card, escaped length; leaves room for markup
HEADER_TEXT_MAX = 150
FIELD_TEXT_MAX = 2000
OPTION_TEXT_MAX = 75
OPTION_VALUE_MAX = 150
OPTIONS_MAX = 100
PRIVATE_METADATA_MAX = 3000
PROVENANCE_ITEMS_MAX = 9  # context block holds 10 elements; one is the "Provenance" label
PROVENANCE_VALUE_MAX = 200

# In rendered mrkdwn the only "<" allowed is a validated mention; "&" must start an entity
# that escape() produces.
_MENTION = re.compile(r"<@[UW][A-Z0-9]{8,}>")
_ENTITY_OR_AMP = re.compile(r"&(?!amp;|lt;|gt;)")


class RenderError(ValueError):
    """A template produced something that is not safe or valid Block Kit JSON."""


def _json_literal(value: Any) -> str:
    """Jinja ``finalize`` hook: encode each expression result as one JSON value."""
    if isinstance(value, jinja2.Undefined):
        # json.dumps would raise a TypeError naming the Undefined class; str() raises the
        # proper UndefinedError naming the missing variable.
        str(value)
    return json.dumps(value)


def build_env(templates_dir: Path = TEMPLATES_DIR) -> jinja2.Environment:
    """The Jinja2 environment every Slack template is rendered with (see module docstring)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=_json_literal,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["mrkdwn"] = mrkdwn.escape
    env.filters["mention"] = mrkdwn.mention
    env.tests["slack_user_id"] = mrkdwn.is_user_id
    return env


_ENV = build_env()


def check_mrkdwn(node: Any) -> None:
    """Refuse any mrkdwn text object in ``node`` holding an unescaped control character.

    Walks dicts and lists; in every ``{"type": "mrkdwn", "text": …}`` the only ``<…>`` allowed
    is a validated ``<@U…>`` mention, and every ``&`` must begin ``&amp;``, ``&lt;`` or
    ``&gt;``. Use it on blocks built outside the templates too.

    Raises:
        RenderError: a mrkdwn text is not escaped.
    """
    if isinstance(node, list):
        for item in node:
            check_mrkdwn(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "mrkdwn":
        text = node.get("text")
        if not isinstance(text, str):
            raise RenderError("mrkdwn text object without a string text")
        rest = _MENTION.sub("", text)
        if "<" in rest or ">" in rest or _ENTITY_OR_AMP.search(rest):
            raise RenderError("unescaped mrkdwn control character in rendered template")
    for value in node.values():
        check_mrkdwn(value)


def render(name: str, /, **ctx: Any) -> dict[str, Any]:
    """Render template ``name`` (relative to ``templates/``) and parse it as a JSON object.

    Raises:
        jinja2.UndefinedError: the template used a variable not in ``ctx``.
        RenderError: the output is not a JSON object, or a mrkdwn text is not escaped.
    """
    return render_with(_ENV, name, **ctx)


def render_with(env: jinja2.Environment, name: str, /, **ctx: Any) -> dict[str, Any]:
    """:func:`render` with an explicit environment from :func:`build_env`."""
    text = env.get_template(name).render(**ctx)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RenderError(f"{name} rendered invalid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(data, dict):
        raise RenderError(f"{name} must render a JSON object")
    check_mrkdwn(data)
    return data


def _cap_plain(text: str, limit: int) -> str:
    """Shorten plain text to ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cap_for_mrkdwn(text: str, limit: int) -> tuple[str, bool]:
    """Longest prefix of ``text`` whose *escaped* form fits in ``limit`` characters.

    Truncating before escaping means an entity such as ``&amp;`` is never cut in half.
    Returns the (unescaped) prefix and whether anything was cut.
    """
    used = 0
    for i, ch in enumerate(text):
        used += len(mrkdwn.escape(ch))
        if used > limit:
            return text[:i], True
    return text, False


def mrkdwn_chunks(text: str, limit: int = DISPLAY_TEXT_MAX) -> list[str]:
    """Split ``text`` into pieces whose escaped forms each fit in ``limit``: the whole text,
    for modals where an approver must see everything they approve."""
    chunks = []
    rest = text
    while rest:
        piece, _ = cap_for_mrkdwn(rest, limit)
        chunks.append(piece)
        rest = rest[len(piece):]
    return chunks or [""]


def _options(values: list[str], what: str) -> list[dict[str, str]]:
    if not values:
        raise ValueError(f"{what}: at least one option is needed")
    if len(values) > OPTIONS_MAX:
        raise ValueError(f"{what}: at most {OPTIONS_MAX} options fit in a select")
    if len(set(values)) != len(values):
        raise ValueError(f"{what}: duplicate option")
    out = []
    for value in values:
        if not value or len(value) > OPTION_VALUE_MAX:
            raise ValueError(f"{what}: each option must be 1..{OPTION_VALUE_MAX} characters")
        out.append({"text": _cap_plain(value, OPTION_TEXT_MAX), "value": value})
    return out


def _check_metadata(private_metadata: str) -> None:
    if len(private_metadata) > PRIVATE_METADATA_MAX:
        raise ValueError(f"private_metadata is limited to {PRIVATE_METADATA_MAX} characters")


def idea_card(
    *,
    idea_id: str,
    requester_slack_id: str | None,
    requester_label: str,
    source_channel: str,
    provenance: Mapping[str, str],
    text: str,
    title: str,
    state_line: str,
    spec_hash_short: str | None = None,
    buttons: bool = False,
    task_id: str | None = None,
    spec_hash: str | None = None,
    passkey_url: str | None = None,
) -> list[dict[str, Any]]:
    """Blocks for the card that shows one idea in Slack.

    The requester is shown as a mention only when ``requester_slack_id`` is a valid Slack user
    id, otherwise as the escaped ``requester_label``. The idea text is escaped and capped at
    :data:`DISPLAY_TEXT_MAX` for display only, with a note pointing at ``intake show``; the
    stored text is never touched. ``buttons`` adds Promote/Deny (``intake_promote`` /
    ``intake_deny``), each carrying the idea id as its value; with ``task_id`` and ``spec_hash``
    they are Approve/Deny for that task instead (``intake_approve`` carries ``task|spec hash``,
    so an approval binds to the spec the card showed). ``passkey_url`` adds an "Approve with
    passkey" link button to that action's console page.
    """
    # Hidden characters (zero-width, bidi controls, tags) are shown as ⟨U+XXXX⟩ markers, the
    # same as in the console, so the card shows what the agent would get; provenance values
    # (attachment names, envelope senders, …) come from the sender too and are marked alike.
    shown, truncated = cap_for_mrkdwn(visible(text), DISPLAY_TEXT_MAX)
    title = visible(title)
    items = list(provenance.items())
    data = render(
        "slack/idea_card.json.j2",
        idea_id=idea_id,
        title=_cap_plain(title.strip() or f"Idea {idea_id}", HEADER_TEXT_MAX),
        text=shown if shown.strip() else "",
        truncated=truncated,
        requester_slack_id=requester_slack_id,
        requester_label=_cap_plain(requester_label or (requester_slack_id or "unknown"), 500),
        source_channel=_cap_plain(source_channel, 500),
        provenance=[
            (_cap_plain(visible(str(k)), 50), _cap_plain(visible(str(v)), PROVENANCE_VALUE_MAX))
            for k, v in items[:PROVENANCE_ITEMS_MAX]
        ],
        provenance_omitted=max(0, len(items) - PROVENANCE_ITEMS_MAX),
        state_line=_cap_plain(state_line, 1000),
        spec_hash_short=spec_hash_short,
        buttons=buttons,
        approve_value=f"{task_id}|{spec_hash}" if task_id and spec_hash else None,
        deny_value=task_id,
        passkey_url=_cap_plain(passkey_url, 3000) if passkey_url else None,
    )
    return data["blocks"]


def promote_modal(
    *, idea_id: str, repos: list[str], change_types: list[str], private_metadata: str, text: str = ""
) -> dict[str, Any]:
    """The ``intake_promote_submit`` modal: repo, change type, optional note, TOTP code.

    Block/action ids: ``repo``/``repo``, ``change_type``/``change_type``, ``note``/``note``,
    ``code``/``code`` (6 characters exactly).

    Raises:
        ValueError: no options, too many or too long options, or oversize metadata.
    """
    _check_metadata(private_metadata)
    return render(
        "slack/promote_modal.json.j2",
        idea_id=idea_id,
        sections=mrkdwn_chunks(visible(text)) if text else [],
        repos=_options(repos, "repos"),
        change_types=_options(change_types, "change_types"),
        private_metadata=private_metadata,
    )


def approve_modal(*, task_id: str, summary: str, spec_hash: str, private_metadata: str) -> dict[str, Any]:
    """The ``intake_approve_submit`` modal: everything that is approved (escaped, in as many
    sections as it takes, never cut) and the TOTP ``code``."""
    _check_metadata(private_metadata)
    return render(
        "slack/approve_modal.json.j2",
        task_id=task_id,
        sections=mrkdwn_chunks(summary),
        spec_hash=spec_hash,
        private_metadata=private_metadata,
    )


def result_card(*, task_id: str, result: dict[str, Any], waiting: bool,
                console_origin: str | None = None) -> list[dict[str, Any]]:
    """Blocks for a run's quarantined result: commit, files changed, +/- lines, gate and check
    outcomes, the diff's stat, and (while it waits for result approval) how to accept it. A
    result reviewed by its diff (issue 20) is accepted only where the diff is shown: the card
    carries a link to the console's task page, never an accept button. (A result sealed
    before diffs existed keeps the ``intake_accept`` button, bound to its commit.)"""
    sha = str(result.get("commit", ""))
    files = [str(f) for f in result.get("files") or []]
    # A path is the agent's choice: a newline or other control character in one would forge
    # lines of the card (say, a passing check), so those are shown escaped, one path a line.
    shown = [_cap_plain("".join(c if c.isprintable() else repr(c)[1:-1] for c in f), 200) for f in files[:20]] + ([f"… and {len(files) - 20} more"] if len(files) > 20 else [])
    checks = [f"{c.get('name')}: {'passed' if c.get('ok') else 'failed'}"
              for c in result.get("checks") or [] if isinstance(c, dict)]
    review = result.get("review") if isinstance(result.get("review"), dict) else None
    # The stat is the agent's file names: controls shown escaped, as for the file list.
    stat = _cap_plain("".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1]
                              for c in str(review.get("stat", ""))), 2500) if review else ""
    review_url = f"{console_origin}/console/tasks/{task_id}" if review and console_origin else ""
    data = render(
        "slack/result_card.json.j2",
        task_id=task_id, sha=sha[:12], files=shown or ["(none listed)"],
        files_changed=int(result.get("files_changed") or len(files)),
        additions=int(result.get("additions") or 0), deletions=int(result.get("deletions") or 0),
        gates=str(result.get("gates") or "passed"), checks=checks[:20], waiting=waiting,
        accept_value=f"{task_id}|{sha}", stat=stat, review_url=review_url,
    )
    return data["blocks"]


def accept_modal(*, task_id: str, sha: str, summary: str, private_metadata: str) -> dict[str, Any]:
    """The ``intake_accept_submit`` modal: the result's facts (escaped) and the TOTP ``code``."""
    _check_metadata(private_metadata)
    return render("slack/accept_modal.json.j2", task_id=task_id, sha=sha[:12], sections=mrkdwn_chunks(summary),
                  private_metadata=private_metadata)


def deny_modal(*, subject_id: str, private_metadata: str) -> dict[str, Any]:
    """The ``intake_deny_submit`` modal with one required multiline ``reason`` input."""
    _check_metadata(private_metadata)
    return render(
        "slack/deny_modal.json.j2",
        subject_id=subject_id,
        private_metadata=private_metadata,
    )


def status_message(
    *, subject_id: str, state: str, detail: str, link: str | None = None, notify: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Blocks for a thread update about an idea or task; ``notify`` user ids are mentioned
    (each must be a valid Slack user id, else ValueError).

    ``detail`` and ``link`` are escaped; a link is shown as text with auto-linking off
    (``verbatim``), never as ``<url|label>``, so its label cannot disguise where it goes.
    """
    shown, truncated = cap_for_mrkdwn(detail, DISPLAY_TEXT_MAX)
    data = render(
        "slack/status.json.j2",
        subject_id=subject_id,
        state=state,
        detail=shown + ("…" if truncated else ""),
        link=_cap_plain(link, 1000) if link else None,
        mentions=" ".join(mrkdwn.mention(user) for user in notify),
    )
    return data["blocks"]


def fallback_text(text: str, limit: int = 300) -> str:
    """Escaped, short notification text for ``chat.postMessage``'s top-level ``text``.

    That field is parsed as mrkdwn too, so it needs the same escaping as the blocks.
    """
    shown, truncated = cap_for_mrkdwn(text, limit)
    return mrkdwn.escape(shown) + ("…" if truncated else "")
