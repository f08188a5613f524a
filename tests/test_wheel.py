"""The package as users get it: the sdist and the wheel built from it, the wheel installed
with its locked dependencies into a new virtual environment outside the source tree, and
`gql-service dev` run from there. Whatever the package forgets to ship (static files, the
migrations, a module) fails here, not in a user's hands."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gql_service.cli.embedded_redis import free_port

from .clients import SUBMIT, TEXT
from .service import wait_until

ROOT = Path(__file__).resolve().parent.parent
UV = os.environ.get("GQLS_UV") or shutil.which("uv")
JOB = "query($id: ID!) { job(id: $id) { status stage result { summary } } }"


def uv(*args: str, cwd: Path = ROOT) -> str:
    assert UV, "uv is needed: run the tests with ./scripts/test, which provides it"
    done = subprocess.run([UV, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"uv {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding the built wheel and the locked dependencies, only."""
    tmp = tmp_path_factory.mktemp("wheel")
    # From the files a clone has (no build leftovers such as an egg-info, whose file list
    # setuptools would take for the package's).
    clone = tmp / "clone"
    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    uv("build", "--out-dir", str(tmp / "dist"), str(clone))  # the sdist, then the wheel from it
    [wheel] = (tmp / "dist").glob("gql_service-*.whl")
    locked = tmp / "requirements.txt"
    uv("export", "--locked", "--no-emit-project", "--no-hashes", "--format", "requirements-txt", "-o", str(locked))
    uv("venv", "--python", sys.executable, str(tmp / "venv"))
    uv("pip", "install", "--python", str(tmp / "venv" / "bin" / "python"), "-r", str(locked), str(wheel))
    return tmp / "venv"


def outside(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A command of the installed package, run where the source tree can't be imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "PYTHON", "GQLS_", "VIRTUAL_ENV"))}
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]], cwd=venv.parent, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_installed_package_is_the_wheel_and_carries_its_files(venv: Path) -> None:
    code = (
        "import importlib.resources as r, gql_service; print(gql_service.__file__); "
        "p = r.files('gql_service'); "
        "print(all((p / f).is_file() for f in ('api/static/console.html', 'api/static/graphiql/graphiql.js', "
        "'api/static/graphiql/graphiql.css', 'migrations/env.py', 'migrations/versions/0001_jobs.py')))"
    )
    where, carries = outside(venv, "python", "-c", code).stdout.split()
    assert where.startswith(str(venv)) and carries == "True", (where, carries)
    # The installed code is this tree's: the schema it prints is the committed one.
    assert outside(venv, "gql-service", "export-schema").stdout == (ROOT / "schema.graphql").read_text()


@pytest.fixture(scope="module")
def dev(venv: Path) -> Iterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "PYTHON", "GQLS_", "VIRTUAL_ENV"))}
    log = (venv.parent / "dev.log").open("wb")
    proc = subprocess.Popen(
        [str(venv / "bin" / "gql-service"), "dev", "--port", str(port), "--workers", "1"],
        cwd=venv.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: "dev: ready" in (venv.parent / "dev.log").read_text(), timeout_s=60, what="dev to be ready")
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        proc.wait(20)
        log.close()
    assert proc.returncode == 0 and time.monotonic() - started < 15


def test_dev_from_the_wheel_runs_a_job_to_done(dev: str) -> None:
    body = httpx.post(f"{dev}/graphql", json={"query": SUBMIT, "variables": {"text": TEXT}}).json()
    job_id = body["data"]["submitText"]["job"]["id"]
    job: dict[str, object] = {}

    def done() -> bool:
        job.update(httpx.post(f"{dev}/graphql", json={"query": JOB, "variables": {"id": job_id}}).json()["data"]["job"])
        return job["stage"] in ("DONE", "FAILED")

    wait_until(done, timeout_s=60, what="the job to end")
    assert job["stage"] == "DONE" and job["result"], job


def test_the_console_and_the_playground_come_with_their_assets(dev: str) -> None:
    console = httpx.get(f"{dev}/")
    assert console.status_code == 200 and console.text == (ROOT / "gql_service/api/static/console.html").read_text()
    playground = httpx.get(f"{dev}/graphql", headers={"accept": "text/html"})
    assert playground.status_code == 200
    for asset in ("graphiql.js", "graphiql.css"):
        assert (ROOT / "gql_service/api/static/graphiql" / asset).read_text() in playground.text
