"""The documentation site (mkdocs.yml, docs/, docsgen/): it builds with --strict (no broken
link or anchor, every page in the nav), and its reference pages, generated at build time,
list everything the code defines and nothing else: every setting of the `Settings` model,
every command and option of the `gql-service` parser, every type of schema.graphql."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from graphql import TypeDefinitionNode, parse

from docsgen import cli_ref, schema_ref, settings_ref
from gql_service.cli.commands import build_parser
from gql_service.settings import Settings
from gql_service.worker import deliveries

ROOT = Path(__file__).resolve().parent.parent

ROW = re.compile(r"^\| `([^`]+)` \|(.*)\|$")


def rows(markdown: str) -> list[tuple[str, list[str]]]:
    """Each table row whose first cell is code: that code, and the other cells."""
    found = []
    for line in markdown.splitlines():
        if match := ROW.match(line):
            found.append((match.group(1), [c.strip() for c in match.group(2).split(" | ")]))
    return found


def sections(markdown: str, level: str) -> dict[str, str]:
    """The body under each heading of that level (`##`), by the heading's text."""
    parts = re.split(rf"^{level} (.+)$", markdown, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_the_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict`, as ./scripts/docs builds it: a broken link or anchor, or a page
    left out of the nav, is a warning, and --strict fails on any."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-5000:]
    assert "WARNING" not in built.stderr, built.stderr[-5000:]
    for page in ("reference/settings", "reference/cli", "reference/graphql", "benchmarks", "architecture"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    assert (tmp_path / "site" / "bench-fanout.png").is_file()  # BENCHMARKS.md's plots, beside it


def test_every_setting_has_a_description_and_its_readers() -> None:
    docs = settings_ref.docstrings()
    for name, field in Settings.model_fields.items():
        assert docs.get(name), f"Settings.{name} has no docstring (gql_service/settings.py)"
        extra = field.json_schema_extra
        assert isinstance(extra, dict) and extra.get("read_by") in settings_ref.READ_BY, f"Settings.{name}: no marker"


def test_the_settings_reference_lists_every_setting_and_nothing_else() -> None:
    listed = rows(settings_ref.page())
    names = [name for name, _ in listed]
    assert sorted(names) == sorted(name.upper() for name in Settings.model_fields)
    assert len(names) == len(set(names))
    for name, (default, read_by, meaning) in listed:
        field = Settings.model_fields[name.lower()]
        assert default.startswith(settings_ref.shown(field.default)), (name, default)
        assert read_by == settings_ref.READ_BY[field.json_schema_extra["read_by"]], name
        assert meaning, name


def test_a_description_that_says_see_links_to_a_page() -> None:
    page = settings_ref.page()
    assert "see [Webhooks](../operations/webhooks.md)" in page
    assert not re.search(r"\bsee [A-Z][\w ,]+[);]", page)  # every "see X" became a link
    with pytest.raises(KeyError, match="see Nowhere"):
        settings_ref.linked("(see Nowhere)")


def test_the_webhook_retries_span_what_the_docs_say() -> None:
    """8 attempts from 5 s, each wait five times the last and at most 12 h: about 17 h (the
    sum without the cap, 27 h, was once in the README's table)."""
    base, attempts = Settings().webhook_retry_base_s, Settings().webhook_max_attempts
    waits = [min(base * deliveries.GROWTH**i, deliveries.MAX_WAIT_S) for i in range(attempts - 1)]
    hours = round(sum(waits) / 3600)
    assert hours == 17
    assert f"span about {hours} h" in settings_ref.docstrings()["webhook_max_attempts"]
    assert f"span about {hours} hours" in (ROOT / "docs" / "operations" / "webhooks.md").read_text()


def expected_cli(parser: argparse.ArgumentParser, path: str = "gql-service") -> dict[str, set[str]]:
    """Each command's arguments as the parser has them: option strings, positionals' metavars."""
    found: dict[str, set[str]] = {path: set()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:  # as --help lists them: names, not aliases
                found |= expected_cli(action.choices[choice.dest], f"{path} {choice.dest}")
        elif not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS:
            found[path] |= set(action.option_strings) or {str(action.metavar or action.dest)}
    return found


def documented_cli(page: str) -> dict[str, set[str]]:
    documented = {}
    for heading, body in sections(page, "##").items():
        args = set()
        for invocation, _ in rows(body):
            args |= {word.strip(",") for word in invocation.split() if word.startswith("-")} or {invocation}
        documented[heading] = args
    return documented


def test_the_cli_reference_lists_every_command_and_option_and_nothing_else() -> None:
    parser = build_parser()
    assert documented_cli(cli_ref.page(parser)) == expected_cli(parser)


def test_the_cli_reference_follows_the_parser() -> None:
    """A flag added to the parser (on the command or a subcommand) is on the page at the next build."""
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors")
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subparsers.choices["status"].add_argument("--watch", action="store_true", help="follow it")
    subparsers.choices["status"].add_argument("--hidden", action="store_true", help=argparse.SUPPRESS)
    page = cli_ref.page(parser)
    assert "--hidden" not in page  # as --help has it
    assert "| `--debug` |  | tracebacks instead of one-line errors |" in sections(page, "##")["gql-service"]
    assert "`--watch`" in sections(page, "##")["gql-service status"]
    assert documented_cli(page) == expected_cli(parser)


def test_the_graphql_reference_lists_every_type_and_nothing_else() -> None:
    document = parse((ROOT / "schema.graphql").read_text())
    declared = {d.name.value for d in document.definitions if isinstance(d, TypeDefinitionNode)}
    page = schema_ref.page()
    headings = re.findall(r"^### (\w+)$", page, re.MULTILINE)
    assert sorted(headings) == sorted(declared)
    schema = schema_ref.load()
    operations = sections(page, "###")
    for root in schema_ref.roots(schema):
        assert [name for name, _ in rows(operations[root.name])] == list(root.fields), root.name


def test_the_readme_is_a_front_door() -> None:
    """What it is, the two commands, a first job followed live, and the way into the site:
    at most 200 lines, the rest is on the site's pages."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for needed in (
        "./scripts/run",
        "./scripts/test",
        "docs/console.png",
        "(docs/getting-started.md)",
        "./scripts/docs",
    ):
        assert needed in readme, needed
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):  # the pages it points to exist
        assert (ROOT / link).exists(), link
