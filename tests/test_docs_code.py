"""The documentation agrees with the code: every setting the docs name exists and every setting
is in the configuration table with its default; every `intake …` command and option the docs
name exists and every command is in the CLI table; the policy table names every key of the
policy model; the Slack scopes table is the manifest's. Where the README and a docs page carry
the same table, the two must be the same rows (link targets aside)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from pydantic import BaseModel, SecretStr

from intake.cli.main import cli
from intake.core import policy as policy_model
from intake.core.settings import Settings, _env_name
from tests.conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
#: Every page a reader may take a setting or a command from.
PAGES = sorted(DOCS.glob("*.md")) + [README, REPO_ROOT / "SECURITY.md"]
#: Names of the `INTAKE_` family that are not settings: the secrets directory (read before the
#: settings are), the Compose recipe's public name, and what the worker hands an agent.
NOT_SETTINGS = {"INTAKE_SECRETS_DIR", "INTAKE_DOMAIN", "INTAKE_PROMPT_FILE"}


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _table(text: str, header: str) -> list[str]:
    """The rows of the markdown table that starts with ``header``, link targets dropped (a page
    links to its own anchors, the README to its own)."""
    start = text.index(header)
    block = text[start:].split("\n\n", 1)[0]
    return [re.sub(r"\]\([^)]*\)", "]", row) for row in block.splitlines()]


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


# -- settings -------------------------------------------------------------------------------

CONFIG_HEADER = "| variable | default | meaning |"


def test_every_setting_a_page_names_exists() -> None:
    known = {_env_name(field) for field in Settings.model_fields} | NOT_SETTINGS
    for page in PAGES:
        # `INTAKE_OIDC_*` names a family; a name ending in `_` is such a prefix.
        named = {n for n in re.findall(r"\b(?:INTAKE|SLACK)_[A-Z0-9_]*[A-Z0-9]\b(?!_)", _text(page))}
        assert named - known == set(), f"{page.name} names settings that do not exist: {sorted(named - known)}"


def test_the_configuration_tables_agree_and_name_every_setting() -> None:
    readme = _table(_text(README), CONFIG_HEADER)
    page = _table(_text(DOCS / "configuration.md"), CONFIG_HEADER)
    assert page == readme, "docs/configuration.md's table is not the README's Configuration table"
    listed = {n for row in readme[2:] for n in re.findall(r"`([A-Z][A-Z0-9_]+)`", _cells(row)[0])}
    missing = {_env_name(field) for field in Settings.model_fields} - listed
    assert not missing, f"settings missing from the Configuration table: {sorted(missing)}"


def _shown(value: Any, data_dir: Path) -> str | None:
    """A setting's default as the table writes it (None: unset)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Path):
        return str(value).replace(str(data_dir), "$INTAKE_DATA_DIR")
    return str(value)


def test_every_default_in_the_configuration_table_is_the_settings_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("INTAKE_", "SLACK_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env
    defaults = Settings(data_dir=tmp_path / "d")
    by_env = {_env_name(f): _shown(getattr(defaults, f), defaults.data_dir) for f in Settings.model_fields}
    by_env["INTAKE_DATA_DIR"] = ".intake"  # resolved at start; its default as written
    checked = 0
    for row in _table(_text(README), CONFIG_HEADER)[2:]:
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", _cells(row)[0])
        said = re.findall(r"`([^`]*)`|\bunset\b", _cells(row)[1])
        if said == [""] and "unset" in _cells(row)[1]:
            said = [""] * len(names)
        if len(said) != len(names):
            continue  # prose ("the data dir's socket if present, else …"): read, not parsed
        for name, literal in zip(names, said, strict=True):
            if name not in by_env or "NAME" in literal or "{" in literal:
                continue  # a pattern, not a value
            assert by_env[name] == (literal or None), f"{name}: the table says {literal or 'unset'!r}, " \
                                                      f"the default is {by_env[name]!r}"
            checked += 1
    assert checked >= 50, checked


# -- the CLI --------------------------------------------------------------------------------

def _command(words: list[str]) -> tuple[click.Command, list[str]] | None:
    """The command ``intake WORDS…`` names and the words after it, or None when the first word
    is not a command."""
    command: click.Command = cli
    rest = list(words)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    return None if command is cli else (command, rest)


def _options(command: click.Command) -> set[str]:
    return {opt for param in command.params if isinstance(param, click.Option) for opt in param.opts} | {"--help"}


def _mentions(text: str) -> list[str]:
    return re.findall(r"`(?:\.venv/bin/)?intake ([a-z][^`]*)`", text)


def test_every_intake_command_and_option_a_page_names_exists() -> None:
    wrong = []
    for page in PAGES:
        for mention in _mentions(_text(page)):
            words = mention.replace("…", " ").split()
            found = _command(words)
            if found is None:
                wrong.append(f"{page.name}: `intake {mention}`: no such command")
                continue
            command, rest = found
            if isinstance(command, click.Group) and rest and rest[0].islower() and not rest[0].startswith("-"):
                wrong.append(f"{page.name}: `intake {mention}`: no such subcommand")
            for word in rest:
                if "$(" in word or word == "|":
                    break  # a shell expression inside the example, not the command's own words
                option = re.match(r"\[?(--?[a-z][a-z0-9-]*)", word)
                if option and option.group(1) not in _options(command):
                    wrong.append(f"{page.name}: `intake {mention}`: no option {option.group(1)}")
    assert wrong == []


def _leaves(command: click.Command, path: str) -> list[str]:
    if isinstance(command, click.Group):
        return [leaf for name, sub in command.commands.items() for leaf in _leaves(sub, f"{path} {name}")]
    return [path]


CLI_HEADER = "| command | what it does |"


def test_the_cli_tables_agree_and_name_every_command_and_its_options() -> None:
    readme = _table(_text(README), CLI_HEADER)
    page = _table(_text(DOCS / "cli.md"), CLI_HEADER)
    assert page == readme, "docs/cli.md's table is not the README's CLI table"
    rows = [_cells(row)[0] for row in readme[2:]]
    for leaf in _leaves(cli, "intake"):
        found = _command(leaf.split()[1:])
        assert found is not None
        command = found[0]
        group, last = leaf.rsplit(" ", 1)
        # The rows that name the command: by its full name, or by its last word after a `/` in
        # a row of its group (`intake approver list` / `remove ID` / …).
        named = " ".join(r for r in rows if re.search(rf"`{re.escape(leaf)}\b", r)
                         or (group != "intake" and f"`{group} " in r and re.search(rf"/ `{re.escape(last)}\b", r)))
        assert named, f"`{leaf}` is not in the CLI table"
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert any(re.search(rf"{re.escape(o)}\b", named) for o in param.opts), \
                    f"`{leaf}`: {param.opts[-1]} is not in its CLI table row"


# -- the policy -----------------------------------------------------------------------------

POLICY_HEADER = "| section | meaning |"


def _keys(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def test_the_policy_tables_agree_and_name_every_key() -> None:
    readme = _table(_text(README), POLICY_HEADER)
    page = _table(_text(DOCS / "policy.md"), POLICY_HEADER)
    assert page == readme, "docs/policy.md's table is not the README's Policy table"
    named = {word for span in re.findall(r"`([^`]+)`", "\n".join(readme)) for word in re.findall(r"[a-z_]+", span)}
    for model in (policy_model.Policy, policy_model.Clocks, policy_model.Escalation, policy_model.Dependencies,
                  policy_model.Limits, policy_model.ChangeType, policy_model.RiskTier,
                  policy_model.ResultApprovalRule, policy_model.Admins, policy_model.Group, policy_model.Identities,
                  policy_model.Channels, policy_model.EmailChannel, policy_model.Credentials, policy_model.Repo,
                  policy_model.Check):
        missing = _keys(model) - named
        assert not missing, f"{model.__name__}: keys missing from the Policy table: {sorted(missing)}"


# -- Slack ----------------------------------------------------------------------------------

def test_the_scopes_table_is_the_manifests() -> None:
    rows = _table(_text(DOCS / "channels.md"), "| Scope | Used for |")[2:]
    documented = {scope for row in rows for scope in re.findall(r"`([a-z_]+:[a-z_]+|commands)`", _cells(row)[0])}
    for manifest in ("slack-app-manifest.yaml", "slack-app-manifest.socket.yaml"):
        scopes = yaml.safe_load(_text(REPO_ROOT / "deploy" / manifest))["oauth_config"]["scopes"]["bot"]
        assert documented == set(scopes), manifest


# -- the checks catch what they must --------------------------------------------------------

def test_the_checks_find_a_wrong_command_option_and_table_row() -> None:
    assert _command(["approver", "add"]) is not None
    assert _command(["no-such-command"]) is None
    assert "--diff-sha256" in _options(_command(["accept"])[0])  # type: ignore[index]
    assert "--no-such-flag" not in _options(_command(["accept"])[0])  # type: ignore[index]
    assert _mentions("run `intake serve --dev` and `.venv/bin/intake audit verify`, not `intake-agent`") == [
        "serve --dev", "audit verify"]
    table = "| a | b |\n|---|---|\n| `x` ([y](#z)) | \\| c |\n\nafter"
    assert _table(table, "| a | b |") == ["| a | b |", "|---|---|", "| `x` ([y]) | \\| c |"]
    assert _cells("| `x` | a \\| b |") == ["`x`", "a \\| b"]
