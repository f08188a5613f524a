"""`gql-service submit --file`: a file of any length in, a batch, results out as jobs end.

* The file's items: plain lines, JSONL (`{"text": …, "id": …}`) or CSV (`--column`), each
  with an id (the file's own, or its line number).
* Resumable: the batch and every job have idempotency keys derived from the file's content
  and the item's position, so running the same command again after an interruption finds
  the same batch and the jobs already submitted, and adds only the rest.
* Progress on stderr (rich's bar on a terminal; a plain line every few seconds otherwise),
  and with `--output`, one JSON line per job as it ends, read from the batch's `endedJobs`
  in the order they ended (the file is written afresh from the start on every run).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from gql_service.cli.client import (
    EXIT_CANCELED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    JOB_FIELDS,
    ClientError,
    _headers,
    answer,
)

CHUNK = 100  # submitTexts' most inputs per call
POLL_S = 0.5
PLAIN_EVERY_S = 5.0  # how often a non-terminal stderr gets a progress line

CREATE = "mutation($input: CreateBatchInput!) { createBatch(input: $input) { id status } }"
ADD = (
    "mutation($inputs: [SubmitTextInput!]!, $batch: ID) "
    "{ submitTexts(inputs: $inputs, batchId: $batch) { deduplicated job { id } } }"
)
CLOSE = "mutation($id: ID!) { closeBatch(id: $id) { status } }"
WATCH = (
    "query($id: ID!, $after: String) { batch(id: $id) { status counts { total queued running finished failed "
    "canceled } providerBatches { requestCounts { total completed failed } } "
    "endedJobs(first: 1000, after: $after) { edges { node { %s } } pageInfo { endCursor hasNextPage } } } }"
    % JOB_FIELDS
)


@dataclass(frozen=True)
class Item:
    id: str
    text: str


def read_items(path: Path, *, fmt: str | None, column: str, id_column: str) -> list[Item]:
    """The file's texts with their ids; raises ClientError with a line number."""
    kind = fmt or {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}.get(path.suffix.lower(), "lines")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(_items(f, kind, column, id_column))
    except OSError as exc:
        raise ClientError(f"cannot read --file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ClientError(f"cannot read --file {path}: not UTF-8 ({exc.reason})") from None


def check_output(path: Path) -> None:
    """Raises ClientError unless `path` can be written: said before anything is submitted,
    not when the results start to come, after the whole file."""
    if path.is_dir():
        problem = errno.EISDIR
    elif not path.parent.is_dir():
        problem = errno.ENOENT if not path.parent.exists() else errno.ENOTDIR
    elif not os.access(path if path.exists() else path.parent, os.W_OK):
        problem = errno.EACCES
    else:
        return
    raise ClientError(f"cannot write --output {path}: {os.strerror(problem)}")


def _items(f: IO[str], kind: str, column: str, id_column: str) -> Iterator[Item]:
    if kind == "csv":
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise ClientError(f"the CSV file has no column {column!r} (its columns: {reader.fieldnames}); see --column")
        for row in reader:
            if (row.get(column) or "").strip():
                yield Item(row.get(id_column) or str(reader.line_num), row[column])
        return
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        if kind == "jsonl":
            try:
                value = json.loads(line)
                text, given = value["text"], value.get("id")
            except (ValueError, KeyError, TypeError):
                raise ClientError(f'line {number}: not a JSON object with a "text"') from None
            yield Item(str(given) if given is not None else str(number), str(text))
        else:
            yield Item(str(number), line.rstrip("\r\n"))


class Client:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url
        self.http = httpx.Client(headers=_headers(api_key), timeout=60)

    def call(self, query: str, **variables: Any) -> dict[str, Any]:
        try:
            response = self.http.post(self.url, json={"query": query, "variables": variables})
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ClientError(f"cannot reach {self.url}: {exc}") from exc
        return answer(self.url, response)


class Progress:
    """Submitted, finished, failed, rate and time left: a bar on a terminal, lines otherwise."""

    def __init__(self, total: int, *, live: bool) -> None:
        self.total, self.live = total, live
        self.started = time.monotonic()
        self._last_line = 0.0
        self._bar: Any = None
        self._provider: Any = None  # the provider's bar, once an ECONOMY batch has one
        if live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            # On stderr, where `live` looked: rich's default console is stdout's, and stdout
            # holds the results (`--json > out.json` once got the bar's last frame too).
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), transient=False, console=Console(stderr=True),
            )  # fmt: skip
            self._bar.start()
            self._submit = self._bar.add_task("submitted", total=total, info="")
            self._end = self._bar.add_task("ended    ", total=total, info="")

    def close(self) -> None:
        if self._bar is not None and self._bar.live.is_started:
            self._bar.stop()  # once: rich adds a blank line at each stop on a dumb terminal

    def update(
        self,
        *,
        submitted: int,
        counts: dict[str, int] | None = None,
        provider: tuple[int, int] | None = None,
        final: bool = False,
    ) -> None:
        """`provider`: (answered, total) of an ECONOMY batch's requests at the provider."""
        ended = sum(counts[k] for k in ("finished", "failed", "canceled")) if counts else 0
        elapsed = time.monotonic() - self.started
        rate = ended / elapsed if elapsed > 0 else 0.0
        left = (self.total - ended) / rate if rate > 0 else None
        failed = counts["failed"] if counts else 0
        info = f"{failed} failed, {rate:.1f} jobs/s"
        if self._bar is not None:
            if provider is not None:
                if self._provider is None:
                    self._provider = self._bar.add_task("provider ", total=provider[1], info="answered")
                self._bar.update(self._provider, completed=provider[0], total=provider[1])
            self._bar.update(self._submit, completed=submitted)
            self._bar.update(self._end, completed=ended, info=info)
            if final:
                self.close()
            return
        if final or time.monotonic() - self._last_line >= PLAIN_EVERY_S:
            self._last_line = time.monotonic()
            eta = f", about {left:.0f} s left" if left is not None and not final else ""
            at = f", provider answered {provider[0]}/{provider[1]}" if provider is not None else ""
            print(f"submitted {submitted}/{self.total}, ended {ended} ({failed} failed), {rate:.1f} jobs/s{at}{eta}",
                  file=sys.stderr, flush=True)  # fmt: skip


def submit_file(
    url: str,
    items: list[Item],
    *,
    source: bytes,
    name: str,
    output: Path | None,
    wait: bool,
    api_key: str | None,
    webhook: str | None = None,
    priority: str = "NORMAL",
    mode: str = "INTERACTIVE",
) -> tuple[int, list[dict[str, Any]]]:
    """(exit code, the jobs in the file's order once they have all ended; [] without waiting)."""
    if not items:
        raise ClientError("nothing to submit: the file holds no text")
    digest = hashlib.sha256(source).hexdigest()[:32]
    client = Client(url, api_key)
    metadata = {"file": name, "items": len(items), "sha256": digest}
    # The jobs have the batch's priority and mode. The same file again at another one is
    # refused (IDEMPOTENCY_KEY_REUSED): its batch exists, at the first.
    made = {"name": name, "metadata": metadata, "idempotencyKey": digest, "priority": priority, "mode": mode}
    batch_id = client.call(CREATE, input=made)["data"]["createBatch"]["id"]
    print(f"batch {batch_id} ({len(items)} texts)", file=sys.stderr, flush=True)
    # Drawn once the service has answered: a wrong --url is its one line, with no bar above it.
    progress = Progress(len(items), live=sys.stderr.isatty())
    try:
        hook = {"webhookUrl": webhook} if webhook else {}
        of_item, position, problems = _add(client, batch_id, items, digest, hook, progress)
        client.call(CLOSE, id=batch_id)
        for problem in problems:
            print(f"gql-service: {problem}", file=sys.stderr)
        if not (wait or output):
            progress.update(submitted=len(items), final=True)
            print(batch_id)
            return (EXIT_USAGE if problems else EXIT_OK), []
        code, ended = _follow(client, batch_id, of_item, progress, output, problems)
    finally:
        progress.close()  # a connection lost midway: its line goes below the bar, not into it
    return code, sorted(ended, key=lambda job: position.get(job["id"], len(position)))


def _add(
    client: Client, batch_id: str, items: list[Item], digest: str, hook: dict[str, str], progress: Progress
) -> tuple[dict[str, str], dict[str, int], list[str]]:
    """Every item into the batch, a chunk a call: (job id -> item id, job id -> the item's
    place in the file, the problems the service reported)."""
    of_item: dict[str, str] = {}
    position: dict[str, int] = {}
    problems = []
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        inputs = [{"text": it.text, "idempotencyKey": f"{digest}:{start + n}", **hook} for n, it in enumerate(chunk)]
        body = client.call(ADD, inputs=inputs, batch=batch_id)
        for item, given in zip(chunk, body["data"]["submitTexts"], strict=True):
            if given is not None:
                of_item[given["job"]["id"]] = item.id
                position[given["job"]["id"]] = len(position)
        problems += [e["message"] for e in body.get("errors") or []]
        progress.update(submitted=start + len(chunk))
    return of_item, position, problems


def _follow(
    client: Client,
    batch_id: str,
    of_item: dict[str, str],
    progress: Progress,
    output: Path | None,
    problems: list[str],
) -> tuple[int, list[dict[str, Any]]]:
    ended: list[dict[str, Any]] = []
    after = None
    try:
        out = output.open("w", encoding="utf-8") if output else None
    except OSError as exc:  # changed since check_output
        raise ClientError(f"cannot write --output {output}: {exc.strerror or exc}") from exc
    try:
        while True:
            batch = client.call(WATCH, id=batch_id, after=after)["data"]["batch"]
            page = batch["endedJobs"]
            for edge in page["edges"]:
                job = edge["node"]
                ended.append(job)
                if out is not None:
                    line = {"id": of_item.get(job["id"]), "job": job["id"], "status": job["status"],
                            "result": job["result"], "error": job["error"]}  # fmt: skip
                    out.write(json.dumps(line, ensure_ascii=False) + "\n")
            if out is not None:
                out.flush()
            after = page["pageInfo"]["endCursor"]
            counts = batch["counts"]
            # Every end read (not len(ended) == total: a job whose record expired everywhere
            # is never listed, and waiting for it would never end).
            done = batch["status"] in ("COMPLETED", "CANCELED") and not page["pageInfo"]["hasNextPage"]
            # An ECONOMY batch: the provider's own counts, while its jobs wait for its answers.
            asked = [p["requestCounts"] for p in batch["providerBatches"]]
            answered = (sum(c["completed"] + c["failed"] for c in asked), sum(c["total"] for c in asked))
            progress.update(submitted=counts["total"], counts=counts, provider=answered if asked else None, final=done)
            if done:
                break
            if not page["edges"]:
                time.sleep(POLL_S)
    finally:
        if out is not None:
            out.close()
    statuses = {job["status"] for job in ended}
    code = EXIT_FAILED if "FAILED" in statuses else EXIT_CANCELED if "CANCELED" in statuses else EXIT_OK
    return (EXIT_USAGE if problems and code == EXIT_OK else code), ended
