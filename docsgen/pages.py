"""mkdocs-gen-files' script (mkdocs.yml): the pages made at build time, never kept in docs/.

* reference/settings.md from the `Settings` model, reference/cli.md from the command's parser,
  reference/graphql.md from schema.graphql;
* benchmarks.md: BENCHMARKS.md as `./scripts/bench` wrote it, with its plots beside it, so the
  site shows the measured figures and no page copies them by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # mkdocs runs this file by its path: docsgen is not installed

from docsgen import cli_ref, schema_ref, settings_ref  # noqa: E402

BENCHMARKS_NOTE = """\
!!! note "BENCHMARKS.md"
    This page is `BENCHMARKS.md` from the repository's root, put here as it is at every build
    ([how to run the benchmarks](performance.md)).

"""


def write(path: str, text: str, source: str) -> None:
    with mkdocs_gen_files.open(path, "w") as page:
        page.write(text)
    mkdocs_gen_files.set_edit_path(path, source)


write("reference/settings.md", settings_ref.page(), "gql_service/settings.py")
write("reference/cli.md", cli_ref.page(), "gql_service/cli/commands.py")
write("reference/graphql.md", schema_ref.page(), "schema.graphql")
title, rest = (ROOT / "BENCHMARKS.md").read_text().split("\n", 1)
write("benchmarks.md", f"{title}\n\n{BENCHMARKS_NOTE}{rest}", "BENCHMARKS.md")
for plot in sorted(ROOT.glob("bench-*.png")):  # BENCHMARKS.md shows them by their bare names
    with mkdocs_gen_files.open(plot.name, "wb") as copy:
        copy.write(plot.read_bytes())
