"""The maps of the code stay true to the tree: docs/architecture.md's module table lists every
module and nothing else, the doc names only files that exist, and the README leads to it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gql_service"
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

# A table row whose first cell is a module's path in backticks: | `api/jobs.py` | ... |
MODULE_ROW = re.compile(r"^\|\s*`([^`\s]+\.py)`\s*\|")
# A file the doc names by its path in the repository: gql_service/store.py, tests/test_store.py.
REPO_PATH = re.compile(r"\b(?:gql_service|tests)/[\w./-]*?\.py\b")


def modules_in_tree() -> set[str]:
    """Every module under gql_service/, relative to it: no __init__.py, no migrations."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if path.name == "__init__.py" or relative.parts[0] == "migrations":
            continue
        found.add(relative.as_posix())
    return found


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section, up to the next heading of that level."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match is not None, f"no '## {heading}' section"
    return match.group(1)


def modules_in_table() -> list[str]:
    body = section(ARCHITECTURE.read_text(), "Every module")
    return [m.group(1) for line in body.splitlines() if (m := MODULE_ROW.match(line.strip()))]


def test_the_module_table_lists_every_module_and_nothing_else() -> None:
    listed = modules_in_table()
    assert listed, "no module rows found in docs/architecture.md's 'Every module' section"
    tree = modules_in_tree()
    missing = sorted(tree - set(listed))
    stale = sorted(set(listed) - tree)
    repeated = sorted({m for m in listed if listed.count(m) > 1})
    assert not (missing or stale or repeated), (
        "docs/architecture.md's module table (Every module) does not match gql_service/:\n"
        f"  missing (in the tree, not in the table): {missing}\n"
        f"  stale (in the table, not in the tree): {stale}\n"
        f"  listed more than once: {repeated}"
    )


def test_the_readme_links_the_architecture_doc() -> None:
    assert "(docs/architecture.md)" in README.read_text()


def test_the_architecture_doc_has_a_diagram_and_names_only_files_that_exist() -> None:
    text = ARCHITECTURE.read_text()
    diagrams = re.findall(r"^```mermaid\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert diagrams and all(d.strip() for d in diagrams), "docs/architecture.md needs a ```mermaid block"
    named = set(REPO_PATH.findall(text))
    assert any(p.startswith("gql_service/") for p in named), "docs/architecture.md names no gql_service/ module"
    absent = sorted(p for p in named if not (ROOT / p).is_file())
    assert not absent, f"docs/architecture.md names files that do not exist: {absent}"
