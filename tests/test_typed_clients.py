"""schema.graphql serves codegen users: a TypeScript client (GraphQL Code Generator, tsc,
graphql-ws) and a Python client (ariadne-codegen), each run against a live service."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from .service import Service

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TS = EXAMPLES / "typescript"
PY = EXAMPLES / "python"
ARIADNE_CODEGEN = "ariadne-codegen[subscriptions]==0.19.0"


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built_ts() -> Path:
    npm = shutil.which("npm")
    assert npm, "Node.js and npm are needed for the TypeScript client"
    installed = run([npm, "ci", "--no-audit", "--no-fund"], TS)
    assert installed.returncode == 0, installed.stderr[-3000:]
    built = run([npm, "run", "build"], TS)  # graphql-codegen from ../../schema.graphql, then tsc
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return TS


def test_typescript_client_is_generated_compiled_and_follows_a_job(service: Service, built_ts: Path) -> None:
    assert "export type JobUpdatesSubscription" in (TS / "src/generated/graphql.ts").read_text()
    done = run(["node", "dist/client.js", service.http_url, "Great service from Acme Corp!"], TS, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FINISHED DONE" in done.stdout and '"sentiment":"POSITIVE"' in done.stdout


def test_typescript_client_by_ids_alone_against_its_generated_manifest(e2e_redis: str, built_ts: Path) -> None:
    """GraphQL Code Generator's client preset writes persisted-documents.json; the service
    trusts nothing else, and the client sends nothing but ids."""
    manifest = TS / "src/generated/persisted-documents.json"
    env = {
        "RQ_QUEUE": "llm-ts-ids",
        "TRUSTED_DOCUMENTS": str(manifest),
        "TRUSTED_DOCUMENTS_ONLY": "true",
        "TRUSTED_DOCUMENTS_REQUIRE_ID": "true",
    }
    with Service(e2e_redis, workers=1, env=env) as svc:
        done = run(["node", "dist/client.js", svc.http_url, "Great service from Acme Corp!", "--ids"], TS, timeout=60)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "FINISHED DONE" in done.stdout and '"sentiment":"POSITIVE"' in done.stdout
        # The same client sending its documents in full is refused by this service.
        full = run(["node", "dist/client.js", svc.http_url, "Great service from Acme Corp!"], TS, timeout=60)
        assert full.returncode != 0 and "this service runs trusted documents named by their id only" in full.stderr


def test_typescript_types_catch_a_wrong_field(tmp_path: Path, built_ts: Path) -> None:
    # The generated types are strict: a client using a field the schema doesn't have won't compile.
    bad = TS / "src" / "wrong.ts"
    bad.write_text(
        'import type { JobUpdatesSubscription } from "./generated/graphql.js";\n'
        'export const f = (j: JobUpdatesSubscription["jobUpdates"]) => j.noSuchField;\n'
    )
    try:
        checked = run([str(TS / "node_modules/.bin/tsc"), "-p", ".", "--noEmit"], TS)
    finally:
        bad.unlink()
    assert checked.returncode != 0 and "noSuchField" in checked.stdout


def test_generated_python_client_follows_a_job(service: Service) -> None:
    done = run([sys.executable, "follow.py", service.http_url, "Great service from Acme Corp!"], PY, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FINISHED DONE" in done.stdout and "sentiment: POSITIVE" in done.stdout


def test_python_client_runs_against_its_manifest_alone(e2e_redis: str) -> None:
    """examples/python/persisted-documents.json (manifest.py, from the generated client's own
    texts) is current, and a service that trusts nothing else runs the client."""
    manifest = PY / "persisted-documents.json"
    made = run([sys.executable, "-c", "import json, manifest; print(json.dumps(manifest.documents()))"], PY)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout) == json.loads(manifest.read_text()), "run `python manifest.py` in examples/python"
    env = {"RQ_QUEUE": "llm-py-trusted", "TRUSTED_DOCUMENTS": str(manifest), "TRUSTED_DOCUMENTS_ONLY": "true"}
    with Service(e2e_redis, workers=1, env=env) as svc:
        done = run([sys.executable, "follow.py", svc.http_url, "Great service from Acme Corp!"], PY, timeout=60)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "FINISHED DONE" in done.stdout and "sentiment: POSITIVE" in done.stdout


def test_python_client_is_what_ariadne_codegen_generates_from_schema_graphql(tmp_path: Path) -> None:
    # ariadne-codegen pins an older graphql-core than Strawberry needs: it gets a venv of its own.
    tool = Path(sys.prefix) / "codegen-tool"
    if not (tool / "bin" / "ariadne-codegen").exists():
        venv.create(tool, with_pip=True)
        got = run([str(tool / "bin" / "pip"), "install", "-q", ARIADNE_CODEGEN], tmp_path)
        assert got.returncode == 0, got.stderr[-3000:]
    work = tmp_path / "python"
    shutil.copytree(PY, work, ignore=shutil.ignore_patterns("gqls_client", "__pycache__"))
    (work / "pyproject.toml").write_text(
        (PY / "pyproject.toml").read_text().replace("../../schema.graphql", str(PY.parent.parent / "schema.graphql"))
    )
    generated = run([str(tool / "bin" / "ariadne-codegen"), "client"], work)
    assert generated.returncode == 0, generated.stdout[-3000:] + generated.stderr[-3000:]
    comparison = filecmp.dircmp(PY / "gqls_client", work / "gqls_client", ignore=["__pycache__"])
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only, (
        "examples/python/gqls_client is stale: run `ariadne-codegen client` in examples/python"
    )
