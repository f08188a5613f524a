"""Every code block in README.md and in the documentation site's pages (docs/**/*.md) runs as
pasted, against a live service, or is marked a fragment.

A block is a fragment when the line before its fence is `<!-- fragment: why -->` (the
quick-start commands themselves, diagrams, usage synopses, settings that need a real
OpenAI key). Every other block is run by its language:

* `bash`: with `gql-service` on the PATH (as after `source .venv/bin/activate`), in a
  scratch directory, or in the repository's root when the line before says `<!-- cwd: root -->`;
* `python`: with the project's Python;
* `js`: with Node, importing the packages pinned in tests/readme/package.json;
* `graphql`: each operation over HTTP, subscriptions over graphql-transport-ws.

Two things are replaced, as a reader would: `127.0.0.1:8000` by the test service's
address, and placeholder job ids (four hex digits and "…", e.g. `"9f0c…"`) by real ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gql import Client, GraphQLRequest, gql
from gql.transport.websockets import WebsocketsTransport

from .clients import post, submit
from .conftest import WEBHOOK_SECRET
from .service import Service

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
JS = Path(__file__).resolve().parent / "readme"
PLACEHOLDER_ID = re.compile(r"[0-9a-f]{4}…")
RUNNERS = {"bash", "python", "js", "graphql"}


@dataclass(frozen=True)
class Block:
    path: str  # the page, relative to the repository: README.md, docs/clients/urql.md
    line: int
    lang: str
    body: str
    fragment: str | None  # why it is not run
    in_root: bool = False  # run in the repository's root, as a reader of the page would

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line}:{self.lang or 'text'}"


def pages() -> list[Path]:
    """README.md, then every page of the site in the order of their paths."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def page_blocks(page: Path) -> list[Block]:
    path = page.relative_to(ROOT).as_posix()
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            start, lang = i, lines[i][3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            before = lines[i - 1].strip() if i else ""
            marker = re.fullmatch(r"<!--\s*fragment:\s*(.+?)\s*-->", before)
            body = "\n".join(lines[start + 1 : end]) + "\n"
            in_root = re.fullmatch(r"<!--\s*cwd:\s*root\s*-->", before) is not None
            blocks.append(Block(path, start + 1, lang, body, marker.group(1) if marker else None, in_root))
            i = end
        i += 1
    return blocks


BLOCKS = [block for page in pages() for block in page_blocks(page)]
RUN = [b for b in BLOCKS if b.fragment is None]


def test_every_block_is_run_or_marked_a_fragment() -> None:
    unrunnable = [b.name for b in RUN if b.lang not in RUNNERS]
    assert not unrunnable, f"mark these as <!-- fragment: why --> or give them a language the test runs: {unrunnable}"
    assert len(RUN) >= 7  # the snippets people copy first are all run
    assert any(b.path == "README.md" for b in RUN)  # the front door's first job too


def test_the_figures_the_readme_quotes_are_the_committed_runs() -> None:
    """The README's measured figures are what BENCHMARKS.json holds (./scripts/bench writes
    both): a figure edited by hand, or a run committed without its README, fails here."""
    from bench import readme_quote

    results = json.loads((ROOT / "BENCHMARKS.json").read_text())
    assert readme_quote.quoted(README.read_text()) == readme_quote.block(results)


@pytest.fixture(scope="module")
def js_deps() -> Path:
    npm = shutil.which("npm")
    assert npm, "Node.js and npm run the JavaScript snippets of README.md and docs/"
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=JS, capture_output=True, text=True, timeout=300
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return JS


def as_pasted(body: str, service: Service, job_ids: list[str]) -> str:
    body = body.replace("127.0.0.1:8000", f"127.0.0.1:{service.port}")
    ids = iter(job_ids)
    return PLACEHOLDER_ID.sub(lambda _: next(ids), body)


def finished_jobs(service: Service, count: int) -> list[str]:
    from .clients import follow

    ids = [submit(service) for _ in range(count)]
    for job_id in ids:
        assert asyncio.run(follow(service, job_id))[-1]["status"] == "FINISHED"
    return ids


@pytest.mark.parametrize("block", RUN, ids=[b.name for b in RUN])
def test_readme_block_runs(block: Block, service: Service, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    code = as_pasted(block.body, service, finished_jobs(service, 2))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("GQLS_URL", None)
    env["WEBHOOK_SECRET"] = WEBHOOK_SECRET  # as a receiver is configured: the service's secret
    if block.lang == "graphql":
        run_graphql(code, service)
        return
    if block.lang == "bash":
        (tmp_path / "texts.txt").write_text("The clinic was great.\nThe food was cold.\n")
        args = ["bash", "-euo", "pipefail", "-c", code]
        env["GQLS_URL"] = service.http_url
        if block.in_root:
            tmp_path = ROOT
    elif block.lang == "python":
        (tmp_path / "snippet.py").write_text(code)
        args = [sys.executable, "snippet.py"]
    else:
        deps = request.getfixturevalue("js_deps")
        script = deps / f"snippet-{re.sub(r'[^A-Za-z0-9]+', '-', block.path)}-{block.line}.mjs"
        script.write_text(code)
        request.addfinalizer(script.unlink)
        args, tmp_path = ["node", script.name], deps
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{block.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert '"errors"' not in done.stdout, done.stdout[-2000:]
    if block.lang in {"js", "python"}:
        assert "DONE" in done.stdout, done.stdout[-2000:]  # each follows a job to its end


def run_graphql(code: str, service: Service) -> None:
    """Each operation of the block; its `# ->` comment says what errors to expect."""
    for operation in re.split(r"\n(?=(?:query|mutation|subscription)\b)", code.strip()):
        document = "\n".join(line for line in operation.splitlines() if not line.startswith("#"))
        expected = re.findall(r"\b([A-Z_]{6,})\b error", operation)
        if document.startswith("subscription"):
            events = asyncio.run(subscribe(service, document))
            assert events and all(e.get("status") in {"FINISHED", None} for e in events[-1:])
            continue
        body: dict[str, Any] = post(service, document).json()
        codes = [e["extensions"]["code"] for e in body.get("errors", [])]
        assert codes == expected, json.dumps(body)[:2000]


async def subscribe(service: Service, document: str) -> list[dict[str, Any]]:
    transport = WebsocketsTransport(url=service.ws_url, subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL])
    events = []
    async with asyncio.timeout(30), Client(transport=transport) as session:
        async for data in session.subscribe(GraphQLRequest(gql(document))):
            events.append(next(iter(data.values())))
    return events
