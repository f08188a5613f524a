"""Real service processes for end-to-end tests: `gql-service serve` and `gql-service worker`."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import httpx

from gql_service.cli.embedded_redis import free_port


def wait_until(predicate, *, timeout_s: float = 15.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Wait for a state we can only observe from outside (a port opening, a count dropping)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def answers(url: str) -> bool:
    """Whether an HTTP server is up and answers 200 at `url` (for wait_until)."""
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def limit_fds(limit: int) -> None:
    """`ulimit -n limit` in a child about to start (a Popen preexec_fn)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


class Proc:
    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        preexec_fn: Callable[[], None] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.name = name
        self.log = Path(tempfile.mkstemp(prefix=f"gqls-{name}-", suffix=".log")[1])
        self._log_file = self.log.open("wb")
        self.popen = subprocess.Popen(
            [python, "-m", "gql_service", *args], env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn, process_group=0,  # its own group: a pool's workers go with it (stop)
        )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        # Whatever it started and left (a pool's workers, once it is SIGKILLed or hangs) goes
        # too: a worker left running would take later tests' jobs from their queues.
        self.kill_group()
        self._log_file.close()
        return self.popen.returncode

    def kill_group(self) -> None:
        """SIGKILL the process and everything it started (as `kill -9` on a host would)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


class Service:
    """An API process and a worker pool against one Redis, with the given settings."""

    def __init__(
        self,
        redis_url: str,
        *,
        workers: int = 2,
        env: dict[str, str] | None = None,
        api_fd_limit: int | None = None,
        python: str = sys.executable,
    ) -> None:
        self.port = free_port()
        self.python = python  # another environment's (one without an optional package)
        self.api_fd_limit = api_fd_limit  # the API process's `ulimit -n`; None: this process's
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_"))},
            "REDIS_URL": redis_url,
            "LLM_PROVIDER": "offline",
            "RETRY_BACKOFF_S": "0",
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.workers = workers
        self.procs: list[Proc] = []

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/graphql"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/graphql"

    def start_worker(self, workers: int | None = None, env: dict[str, str] | None = None) -> Proc:
        """A worker pool; `env` adds settings of its own (as on another host)."""
        proc = Proc(
            "worker",
            ["worker", "--workers", str(workers or self.workers or 1)],
            {**self.env, **(env or {})},
            python=self.python,
        )
        self.procs.append(proc)
        return proc

    def start(self) -> Service:
        try:
            if self.workers:
                self.start_worker()
            self._start_api()
        except BaseException:
            self.__exit__(BaseException)  # `with` calls no __exit__ when __enter__ fails
            raise
        return self

    def _start_api(self) -> Proc:
        fds = partial(limit_fds, self.api_fd_limit) if self.api_fd_limit else None
        api = Proc("api", ["serve", "--port", str(self.port)], self.env, preexec_fn=fds, python=self.python)
        self.procs.append(api)

        def healthy() -> bool:
            if api.popen.poll() is not None:
                raise RuntimeError(f"API exited:\n{api.output()}")
            return answers(f"http://127.0.0.1:{self.port}/healthz")

        # Seconds on a quiet machine; far more with the suite's other file running beside it.
        wait_until(healthy, timeout_s=60, what="the API to answer /healthz")
        return api

    def restart_api(self, sig: int = signal.SIGKILL) -> Proc:
        """Stop the API process (SIGKILL: every connection it held drops at once) and start
        another on the same port."""
        api = next(p for p in reversed(self.procs) if p.name == "api")
        api.stop(sig)
        return self._start_api()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.output()}" for p in self.procs)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.stop()  # nothing may be left running
        if exc_type is not None:  # pytest shows a failed test's output: what each process said
            for proc in self.procs:
                tail = proc.output().splitlines()[-60:]
                print(f"--- {proc.name} {proc.log} (last {len(tail)} lines) ---", *tail, sep="\n")
