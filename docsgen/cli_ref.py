"""The command-line reference, from the `gql-service` parser itself
(`gql_service.cli.commands.build_parser`): every command and subcommand, with its usage, its
arguments and options, their defaults and help, so a flag added to the parser is documented
by the next build."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from gql_service.cli.commands import build_parser

INTRO = """\
# Command line

`gql-service` is the one command: `./scripts/run` is `gql-service dev`, and `python worker.py`
is `gql-service worker` (for process managers that want a file to run). After `./scripts/run`
or `./scripts/test`, `source .venv/bin/activate` puts it on the PATH (or call
`.venv/bin/gql-service`). Every command reads the [settings](settings.md) from the environment
and `.env`; `submit` and `status` are a client of a running service (see the
[command-line client](../clients/cli.md) for a tour).

This page is generated from the command's own parser at every build.
"""


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = (), summary: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser, str]]:
    """`gql-service`, then each command and subcommand, depth first, as `gql-service outbox replay`,
    each with what it does (its description, else the help its parent lists it with)."""
    yield " ".join((parser.prog.split()[0], *path)), parser, parser.description or summary
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # each command once, under its name (not its aliases)
                yield from commands(action.choices[choice.dest], (*path, choice.dest), choice.help or "")


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """A parser's own arguments and options, as --help lists them: not --help itself, not its
    subcommands (they have sections of their own), not an option whose help is suppressed."""
    return [
        a
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction) and a.help != argparse.SUPPRESS
    ]


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [(choice.dest, choice.help or "") for choice in action._choices_actions]
    return found


def invocation(action: argparse.Action) -> str:
    """`--host HOST`, `--format {lines,jsonl,csv}`, `TEXT`: as --help writes it."""
    return argparse.HelpFormatter("gql-service")._format_action_invocation(action)


def help_of(action: argparse.Action) -> str:
    return argparse.HelpFormatter("gql-service")._expand_help(action) if action.help else ""


def default_of(action: argparse.Action) -> str:
    if action.default in (None, False, argparse.SUPPRESS) or action.option_strings == []:
        return ""
    return f"`{action.default}`"


def usage_of(parser: argparse.ArgumentParser) -> list[str]:
    """--help's usage lines, without "usage: " and the indent it gave the lines after the first."""
    first, *more = parser.format_usage().rstrip().splitlines()
    return [first.removeprefix("usage: "), *(line.removeprefix(" " * len("usage: ")) for line in more)]


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def page(parser: argparse.ArgumentParser | None = None) -> str:
    parser = parser or build_parser()
    lines = [INTRO]
    for name, command, summary in commands(parser):
        lines += [f"## {name}", ""]
        if summary:
            lines += [summary, ""]
        lines += ["```text", *usage_of(command), "```", ""]
        if subs := subcommands(command):
            lines += ["| command | what it does |", "| --- | --- |"]
            for sub, help_ in subs:
                anchor = f"{name} {sub}".replace(" ", "-")
                lines.append(f"| [`{sub}`](#{anchor}) | {cell(help_)} |")
            lines.append("")
        if own := arguments(command):
            lines += ["| argument | default | meaning |", "| --- | --- | --- |"]
            lines += [f"| `{invocation(a)}` | {default_of(a)} | {cell(help_of(a))} |" for a in own]
            lines.append("")
        if command.epilog and command is not parser:  # the root's: examples and pointers, which these pages are
            lines += [command.epilog, ""]
    return "\n".join(lines)
