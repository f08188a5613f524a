"""The scripts install what uv.lock says, and only that: a pyproject.toml changed without
refreshing the lock stops them (and so CI) with a message that says what to do, instead of
resolving something untested behind the developer's back."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def project_copy(tmp_path: Path) -> Path:
    """The files the scripts read, in a directory of their own."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "uv.lock", "README.md", "LICENSE", "scripts", "gql_service", "worker.py"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, project / name)
    return project


def sync(project: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    if os.environ.get("GQLS_UV"):  # the uv ./scripts/test found or installed: no second install
        env["PATH"] = f"{Path(os.environ['GQLS_UV']).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["bash", "-c", 'source scripts/_venv.sh ""'], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_pyproject_that_disagrees_with_the_lock_stops_the_scripts(tmp_path: Path) -> None:
    project = project_copy(tmp_path)
    pyproject = project / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"orjson>=3.10,<4",', '"orjson>=3.10,<4",\n    "tomli-w>=1.0",'))
    done = sync(project)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "uv.lock" in done.stderr and "needs to be updated" in done.stderr, done.stderr[-3000:]
    assert "./scripts/upgrade" in done.stderr  # what to do about it
    assert not list(project.glob(".venv/lib/*/site-packages/orjson"))  # nothing was installed


def test_a_second_sync_keeps_the_environment(tmp_path: Path) -> None:
    """The environment is made once and then only topped up: a script run while another
    runs must not delete the packages under it. (With python3 a pyenv shim, uv saw another
    interpreter each time, and removed and remade .venv on every command.)"""
    project = project_copy(tmp_path)
    first = sync(project)
    assert first.returncode == 0, first.stderr[-3000:]
    kept = project / ".venv" / "lib" / "kept-by-the-second-sync"
    kept.write_text("")
    second = sync(project)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Removed virtual environment" not in second.stderr, second.stderr[-3000:]
    assert kept.exists()


def test_a_stop_signal_during_the_first_use_install_stops_the_script_at_once(tmp_path: Path) -> None:
    """SIGINT to ./scripts/run's own process (not its group, as `kill -INT` does) while it
    installs: it stops then, and the service never starts. uv is a stand-in that takes its
    time, so the signal lands mid-install by construction."""
    project = project_copy(tmp_path)
    fake = tmp_path / "bin"
    fake.mkdir()
    started = tmp_path / "uv-started"
    (fake / "uv").write_text(f"#!/bin/sh\ntouch {started}\nexec sleep 60\n")
    (fake / "uv").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    # SIGINT as a developer's shell leaves it (default), whatever this process inherited: a
    # suite started in the background of a script inherits it ignored, and bash cannot trap a
    # signal ignored when it started (the test then failed after its 10 s).
    run = subprocess.Popen(
        ["bash", "scripts/run"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not started.exists():  # the stand-in's own mark: the install is under way
        assert time.monotonic() < deadline and run.poll() is None, "the install never started"
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=10)  # at once: not after the 60 s install
    assert run.returncode == 130, err
    assert "interrupted" in err and "dev" not in out
    left = subprocess.run(["pgrep", "-f", f"touch {started}|sleep 60"], capture_output=True, text=True)
    assert not any(
        (Path(f"/proc/{pid}/cwd").resolve() == project) for pid in left.stdout.split() if Path(f"/proc/{pid}").exists()
    )
