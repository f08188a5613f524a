"""`gql-service submit` / `status` against a live service, with exit codes a script can trust."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .clients import post, submit
from .openai_stub import VALID_EXTRACTION, OpenAIStub
from .service import Service


def cli(svc: Service, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GQLS_URL": svc.http_url}
    return subprocess.run(
        [sys.executable, "-m", "gql_service", *args], input=stdin, env=env, capture_output=True, text=True, timeout=60
    )


def test_submit_wait_shows_every_stage_then_the_result(e2e_redis: str, stub: OpenAIStub) -> None:
    # No worker until the CLI follows the job, so it sees it QUEUED and then every change,
    # however quick the workers (before, a job done before the CLI subscribed showed only
    # its last line). The model takes a moment, so CALLING_LLM is not overtaken by the next
    # state in the API's latest-wins mailbox either.
    stub.latency_s = 0.3
    env = {"RQ_QUEUE": "llm-cli-wait", **stub.env}
    with Service(e2e_redis, workers=0, env=env) as svc:
        follow = subprocess.Popen(
            [sys.executable, "-m", "gql_service", "submit", "--wait", "I loved the clinic. Dr. Rao was kind."],
            env={**os.environ, "GQLS_URL": svc.http_url}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert follow.stderr is not None
        first = follow.stderr.readline()  # printed once the subscription has its snapshot
        assert first.split()[1:] == ["QUEUED", "QUEUED"], first
        svc.start_worker(1)
        out, err = follow.communicate(timeout=60)
    assert follow.returncode == 0, err
    stages = [line.split()[2] for line in [first, *err.splitlines()]]
    assert stages[:2] == ["QUEUED", "CALLING_LLM"] and stages[-1] == "DONE", stages
    assert stages in (["QUEUED", "CALLING_LLM", "VALIDATING", "DONE"], ["QUEUED", "CALLING_LLM", "DONE"])
    assert "HTTP Request" not in err  # and nothing else
    assert "sentiment: POSITIVE" in out and "Dr. Rao" in out


def test_submit_json_batch_from_a_file_and_stdin(service: Service, tmp_path: Path) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_text("Great service from Acme Corp.\n\nTerrible wait at the airport.\n")
    done = cli(service, "submit", "--wait", "--json", "--file", str(lines), "-", stdin="Hello from stdin.")
    assert done.returncode == 0, done.stderr
    jobs = json.loads(done.stdout)
    assert [j["status"] for j in jobs] == ["FINISHED"] * 3
    assert jobs[0]["result"]["summary"] == "Hello from stdin."


def test_submit_priority_reaches_the_jobs_and_a_file_s_batch(service: Service, tmp_path: Path) -> None:
    done = cli(service, "submit", "--wait", "--json", "--priority", "HIGH", "Urgent: the server room is flooding.")
    assert done.returncode == 0, done.stderr
    assert [j["priority"] for j in json.loads(done.stdout)] == ["HIGH"]
    lines = tmp_path / "nightly.txt"
    lines.write_text("First nightly text.\nSecond nightly text.\n")
    done = cli(service, "submit", "--wait", "--json", "--priority", "LOW", "--file", str(lines))
    assert done.returncode == 0, done.stderr
    assert [j["priority"] for j in json.loads(done.stdout)] == ["LOW", "LOW"]
    # The same file at another priority: its batch exists, at LOW.
    again = cli(service, "submit", "--priority", "HIGH", "--file", str(lines))
    assert again.returncode == 2 and "priority" in again.stderr, again.stderr
    status = cli(service, "status", json.loads(done.stdout)[0]["id"])
    assert "priority LOW" in status.stdout.splitlines()[0], status.stdout


def test_an_unwritable_output_or_one_without_a_file_is_refused_before_submitting(
    service: Service, tmp_path: Path
) -> None:
    texts = tmp_path / "unwritten.txt"
    texts.write_text("Never submitted: its results would have had nowhere to go.\n")
    for output, why in ((tmp_path / "no-dir" / "out.jsonl", "No such file or directory"), (tmp_path, "Is a directory")):
        done = cli(service, "submit", "--file", str(texts), "--output", str(output))
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [f"gql-service: cannot write --output {output}: {why}"]
    # Said before anything was sent (it once came as a traceback after the whole file was submitted).
    batches = post(service, "{ batches(first: 100) { edges { node { name } } } }").json()["data"]["batches"]
    assert "unwritten.txt" not in [edge["node"]["name"] for edge in batches["edges"]]
    alone = cli(service, "submit", "--output", str(tmp_path / "out.jsonl"), "A text with no file.")
    assert alone.returncode == 2 and alone.stdout == ""  # once ignored: the text submitted, and 0
    assert alone.stderr.splitlines() == ["gql-service: --output writes the results of a --file: give --file"]


def test_submit_without_wait_prints_ids(service: Service) -> None:
    done = cli(service, "submit", "one", "two")
    assert done.returncode == 0 and len(done.stdout.split()) == 2


def test_bad_input_and_unknown_ids_exit_2(service: Service) -> None:
    assert cli(service, "submit", "   ").returncode == 2
    missing = cli(service, "status", "no-such-job")
    assert missing.returncode == 2 and "not found" in missing.stderr


async def test_status_exit_codes_follow_the_job(e2e_redis: str) -> None:
    with Service(e2e_redis, workers=0, env={"RQ_QUEUE": "llm-cli-status"}) as svc:
        job_id = submit(svc)
        assert cli(svc, "status", job_id).returncode == 4  # still queued
        cancel = "mutation($id: ID!) { cancelJob(id: $id) { id } }"
        import httpx

        httpx.post(svc.http_url, json={"query": cancel, "variables": {"id": job_id}})
        canceled = cli(svc, "status", "--json", job_id)
        assert canceled.returncode == 3 and json.loads(canceled.stdout)["status"] == "CANCELED"


def test_unreachable_service_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gql_service", "status", "--url", "http://127.0.0.1:9/graphql", "x"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "cannot reach" in done.stderr and "Traceback" not in done.stderr


def shown_on(leader: int) -> bytes:
    """Everything written to a pseudo-terminal, read from its other end until the process closes it."""
    shown = b""
    with contextlib.suppress(OSError):  # EIO: the terminal's other end closed with the process
        while chunk := os.read(leader, 4096):
            shown += chunk
    os.close(leader)
    return shown


class _NotFound(BaseHTTPRequestHandler):
    """An HTML 404 for everything, as a web server that is not the service answers."""

    def do_GET(self) -> None:
        body = b"<!doctype html><title>404</title><h1>Not Found</h1>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def html_404() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_wrong_url_is_one_line_saying_so_and_exit_2(service: Service, tmp_path: Path) -> None:
    """The service's root instead of its /graphql (405 text/plain), or another web server's
    HTML 404: one line naming the endpoint to use, and 2, never a traceback and 1 (a failed job)."""
    texts = tmp_path / "nowhere.txt"
    texts.write_text("A text for nowhere.\n")
    commands = (["status", "some-job"], ["submit", "A text."], ["submit", "--wait", "A text."],
                ["submit", "--file", str(texts)])  # fmt: skip
    with html_404() as elsewhere:
        for url, answered in ((f"http://127.0.0.1:{service.port}/", "405 text/plain"), (elsewhere, "404 text/html")):
            for command in commands:
                done = subprocess.run([sys.executable, "-m", "gql_service", *command, "--url", url],
                                      capture_output=True, text=True, timeout=60)  # fmt: skip
                assert done.returncode == 2 and done.stderr.splitlines() == [
                    f"gql-service: {url} is not a GraphQL endpoint (it answered {answered}); did you mean {url}graphql?"
                ], (command, done.stderr)
                assert done.stdout == ""
        # --debug adds the traceback, for a bug report; the line and the exit code stay.
        debug = subprocess.run([sys.executable, "-m", "gql_service", "status", "--debug", "--url", elsewhere, "x"],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    assert debug.returncode == 2 and "Traceback" in debug.stderr, debug.stderr
    assert debug.stderr.splitlines()[-1].startswith(f"gql-service: {elsewhere} is not a GraphQL endpoint")


def test_submit_wait_in_a_terminal_shows_the_summary_being_written(e2e_redis: str, stub: OpenAIStub) -> None:
    stub.stream_chunks, stub.stream_seconds = 60, 2.0
    env = {"RQ_QUEUE": "llm-cli-tty", **stub.env}
    with Service(e2e_redis, workers=1, env=env) as svc:
        # stderr is a terminal (a pseudo-terminal), as when a person runs it.
        leader, terminal = pty.openpty()
        follow = subprocess.Popen(
            [sys.executable, "-m", "gql_service", "submit", "--wait", "I loved the clinic. Dr. Rao was kind."],
            env={**os.environ, "GQLS_URL": svc.http_url}, stdout=subprocess.PIPE, stderr=terminal, text=True,
        )  # fmt: skip
        os.close(terminal)
        shown = shown_on(leader)
        out, _ = follow.communicate(timeout=60)
    assert follow.returncode == 0, shown
    rewrites = [line for line in shown.decode().split("\r\x1b[K") if line.strip()]
    summaries = [line.split("  ", 1)[1] for line in rewrites if "  " in line and "STARTED" not in line]
    growing = [s for s in summaries if VALID_EXTRACTION["summary"].startswith(s.strip())]
    assert len(set(growing)) >= 3, rewrites  # one line, rewritten as the summary grows
    assert f"summary:   {VALID_EXTRACTION['summary']}" in out


def test_submit_file_json_redirected_in_a_terminal_keeps_the_bar_on_stderr(service: Service, tmp_path: Path) -> None:
    """`submit --wait --json --file F > out.json` typed in a terminal: the bar is drawn live on
    the terminal (stderr), and out.json holds the JSON alone (it once held the bar's last frame)."""
    texts = tmp_path / "redirected.txt"
    texts.write_text("The bar goes to the terminal.\nThe JSON goes to the file.\n")
    out = tmp_path / "out.json"
    leader, terminal = pty.openpty()
    with out.open("w") as stdout:
        follow = subprocess.Popen(
            [sys.executable, "-m", "gql_service", "submit", "--wait", "--json", "--file", str(texts)],
            env={**os.environ, "GQLS_URL": service.http_url, "TERM": "xterm-256color"}, stdin=subprocess.DEVNULL,
            stdout=stdout, stderr=terminal,
        )  # fmt: skip
    os.close(terminal)
    shown = shown_on(leader).decode(errors="replace")
    assert follow.wait(60) == 0, shown
    assert [job["status"] for job in json.loads(out.read_text())] == ["FINISHED"] * 2
    assert "submitted" in shown and "ended" in shown and "2/2" in shown, shown
    assert "\x1b[" in shown  # drawn in place, as on a terminal: not a plain line every few seconds
