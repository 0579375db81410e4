"""Every command, option and argument of the CLI explains itself in --help."""

from __future__ import annotations

import click

from intake.cli.main import cli


def _walk(command: click.Command, path: str) -> list[str]:
    missing = []
    if not (command.help or "").strip():
        missing.append(f"{path}: no help text")
    for param in command.params:
        if isinstance(param, click.Option):
            if not param.hidden and not (param.help or "").strip():
                missing.append(f"{path} {param.opts[0]}: no help text")
        elif isinstance(param, click.Argument):
            # Arguments have no help= in click: the command's text must name them.
            if param.human_readable_name not in (command.help or ""):
                missing.append(f"{path} {param.human_readable_name}: not described in the command's help")
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            missing += _walk(sub, f"{path} {name}")
    return missing


def test_every_option_and_argument_has_help() -> None:
    assert _walk(cli, "intake") == []


def test_the_walker_finds_what_is_missing() -> None:
    @click.group(help="g")
    def group() -> None: ...

    @group.command()
    @click.argument("thing")
    @click.option("--loud", is_flag=True)
    def bare(thing: str, loud: bool) -> None: ...

    assert _walk(group, "g") == ["g bare: no help text", "g bare THING: not described in the command's help",
                                 "g bare --loud: no help text"]
