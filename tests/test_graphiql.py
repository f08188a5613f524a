"""The GraphiQL playground at /graphql works with no internet: its assets come from the
package, subscriptions run over graphql-transport-ws, and the Headers tab carries the API
key to both HTTP and the websocket (as connectionParams)."""

from __future__ import annotations

import filecmp
import gzip
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from .browser import Browser
from .service import Service

API_KEY = "sk-playground-test"
ASSETS = Path(__file__).resolve().parent.parent / "gql_service" / "api" / "static" / "graphiql"

# CodeMirror editors of GraphiQL 3: the document, the open tool tab (Variables or Headers), the result.
QUERY_EDITOR = ".graphiql-query-editor .CodeMirror"
TOOL_EDITOR = ".graphiql-editor-tool .graphiql-editor:not(.hidden) .CodeMirror"
RESULT = ".result-window .CodeMirror"


def editor_text(selector: str) -> str:
    return f"(document.querySelector({json.dumps(selector)})?.CodeMirror.getValue() ?? '')"


@pytest.fixture(scope="module")
def keyed_service(e2e_redis: str) -> Iterator[Service]:
    env = {"RQ_QUEUE": "llm-graphiql", "API_KEYS": json.dumps({API_KEY: "acme"})}
    with Service(e2e_redis, workers=1, env=env) as svc:
        yield svc


def test_the_page_carries_its_assets_and_names_no_cdn(keyed_service: Service) -> None:
    page = httpx.get(keyed_service.http_url, headers={"accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    script, stylesheet = (ASSETS / "graphiql.js").read_text(), (ASSETS / "graphiql.css").read_text()
    assert script in html and stylesheet in html
    # Around the inlined assets, nothing points anywhere: no src, no http(s) link.
    shell = html.replace(script, "").replace(stylesheet, "")
    assert "src=" not in shell and "http" not in shell, shell
    assert '{"apiKeys":true}' in html  # the page knows to ask for a key
    # Revalidation is a 304, and the 1.4 MB page travels gzipped to browsers that take it.
    etag = page.headers["etag"]
    again = httpx.get(keyed_service.http_url, headers={"accept": "text/html", "if-none-match": etag})
    assert again.status_code == 304 and not again.content
    headers = {"accept": "text/html", "accept-encoding": "gzip"}
    with httpx.stream("GET", keyed_service.http_url, headers=headers) as gzipped:
        body = b"".join(gzipped.iter_raw())
    assert gzipped.headers["content-encoding"] == "gzip" and len(body) < len(page.content) / 2
    assert gzip.decompress(body) == page.content


async def test_submit_then_follow_the_job_to_done_offline(keyed_service: Service) -> None:
    origin = f"127.0.0.1:{keyed_service.port}"
    async with Browser() as browser:
        await browser.send("Network.enable")
        await browser.goto(keyed_service.http_url)
        document = await browser.until(editor_text(QUERY_EDITOR))
        assert "mutation Submit" in document and "subscription Follow" in document

        # The key goes in the Headers tab (open by default when the service needs one).
        await browser.until(f"{editor_text(TOOL_EDITOR)}.includes('Authorization')")
        headers = json.dumps({"Authorization": f"Bearer {API_KEY}"})
        await browser.evaluate(f"document.querySelector({json.dumps(TOOL_EDITOR)}).CodeMirror.setValue({headers!r})")

        # The default document runs as it is: Submit over HTTP...
        await browser.click(".graphiql-execute-button")
        await browser.click("[role=menuitem]", "Submit")
        result = await browser.until(f"(() => {{ const t = {editor_text(RESULT)}; return t.includes('job') && t; }})()")
        job_id = json.loads(result)["data"]["submitText"]["job"]["id"]
        # ...the new job's id lands in the Variables tab, ready for Follow...
        await browser.click(".graphiql-editor-tools button", "Variables")
        await browser.until(f"{editor_text(TOOL_EDITOR)}.includes({json.dumps(job_id)})")

        # ...and Follow streams the job over the websocket until DONE.
        await browser.click(".graphiql-execute-button")
        await browser.click("[role=menuitem]", "Follow")
        await browser.until(f"{editor_text(RESULT)}.includes('\"DONE\"')", timeout_s=30)
        final = json.loads(await browser.evaluate(editor_text(RESULT)))["data"]["jobUpdates"]
        requested = browser.requested_urls()

    assert final["status"] == "FINISHED" and final["result"]["sentiment"] == "POSITIVE"
    # Nothing beyond the service itself: fonts and icons are data: URLs inside the page.
    elsewhere = [url for url in requested if not url.startswith("data:") and urlsplit(url).netloc != origin]
    assert not elsewhere, elsewhere
    assert any(url.startswith(f"ws://{origin}/") for url in requested), "the subscription used a websocket"


def test_the_committed_bundle_is_what_its_sources_build(tmp_path: Path) -> None:
    npm = shutil.which("npm")
    assert npm, "Node.js and npm are needed to rebuild the playground"
    sources = ASSETS / "src"
    installed = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=sources, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    built = subprocess.run(
        ["node", "build.mjs", str(tmp_path)], cwd=sources, capture_output=True, text=True, timeout=120
    )
    assert built.returncode == 0, built.stderr[-3000:]
    files = ["graphiql.js", "graphiql.css", "THIRD_PARTY_LICENSES.txt"]
    _, stale, missing = filecmp.cmpfiles(ASSETS, tmp_path, files, shallow=False)
    assert not stale and not missing, f"rebuild the playground (see {ASSETS / 'README.md'}): {stale + missing}"
