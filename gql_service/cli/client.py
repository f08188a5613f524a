"""`gql-service submit` and `gql-service status`: a small client of a running service.

Exit codes a script can rely on: 0 every job FINISHED, 1 a job FAILED, 3 a job was
CANCELED, 4 still running (status without --wait), 2 bad usage, no service there, or the
service said no; a problem is one line on stderr (with --debug, after its traceback).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import websockets

JOB_FIELDS = """id status stage version attempts requestId priority
  result { summary sentiment tags entities { type value confidence } language toxicityScore }
  error { code message retryable } usage { totalTokens }
  webhook { url status attempts lastStatusCode lastError nextAttemptAt deliveredAt }"""
SUBMIT = (
    "mutation($inputs: [SubmitTextInput!]!) { submitTexts(inputs: $inputs) { deduplicated job { %s } } }" % JOB_FIELDS
)
STATUS = "query($id: ID!) { job(id: $id) { %s } }" % JOB_FIELDS
FOLLOW = (
    "subscription($ids: [ID!]!, $partial: Boolean!) { jobsUpdates(ids: $ids, partial: $partial) "
    "{ %s partial { summary } partialSeq } }" % JOB_FIELDS
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELED, EXIT_RUNNING = 0, 1, 2, 3, 4


class ClientError(Exception):
    pass


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def run(action: Callable[[], int], *, debug: bool) -> int:
    """`action`'s exit code; whatever stops it is one line on stderr and EXIT_USAGE (with
    `debug`, after its traceback). Never Python's traceback and 1: a script reads 1 as a
    failed job."""
    try:
        return action()
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, ClientError):
            print(f"gql-service: {exc}", file=sys.stderr)
        else:  # not foreseen: say what it was, and how to see where
            print(f"gql-service: {type(exc).__name__}: {exc} (--debug shows where)", file=sys.stderr)
        return EXIT_USAGE


def _post(url: str, query: str, variables: dict[str, Any], api_key: str | None) -> dict[str, Any]:
    try:
        response = httpx.post(url, json={"query": query, "variables": variables}, headers=_headers(api_key), timeout=30)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ClientError(f"cannot reach {url}: {exc}") from exc
    return answer(url, response)


def answer(url: str, response: httpx.Response) -> dict[str, Any]:
    """A GraphQL response's body; a ClientError if it is no GraphQL response, or only errors."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not ("data" in body or "errors" in body):
        raise ClientError(_not_graphql(url, response))
    if body.get("errors") and not body.get("data"):
        raise ClientError("; ".join(e["message"] for e in body["errors"]))
    return body


def _not_graphql(url: str, response: httpx.Response) -> str:
    answered = f"{response.status_code} {response.headers.get('content-type', 'without a type').split(';')[0]}"
    # A 404 or 405 (the service's own root only serves GET), a redirect, an HTML page: a
    # wrong URL, most often without the /graphql. Anything else is the server's to explain.
    if response.status_code in (404, 405) or response.status_code < 400:
        guess = _endpoint_guess(url)
        hint = f"; did you mean {guess}?" if guess != url else ""
        return f"{url} is not a GraphQL endpoint (it answered {answered}){hint}"
    said = " ".join(response.text.split())[:200]
    return f"{url} answered {answered}" + (f": {said}" if said else "")


def _endpoint_guess(url: str) -> str:
    """Where the service answers GraphQL, on the server `url` names: its /graphql."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    return urlunsplit(parts._replace(path=path if path.endswith("/graphql") else "/graphql", query="", fragment=""))


def exit_code(jobs: Iterable[dict[str, Any]]) -> int:
    statuses = {job["status"] for job in jobs}
    if "FAILED" in statuses:
        return EXIT_FAILED
    if "CANCELED" in statuses:
        return EXIT_CANCELED
    if statuses - {"FINISHED"}:
        return EXIT_RUNNING
    return EXIT_OK


def describe(job: dict[str, Any]) -> str:
    priority = f", priority {job['priority']}" if job.get("priority") else ""
    lines = [f"job {job['id']}: {job['status']} ({job['stage']}), attempts {job['attempts']}{priority}"]
    if job.get("result"):
        r = job["result"]
        lines += [
            f"  summary:   {r['summary']}",
            f"  sentiment: {r['sentiment']}   language: {r['language']}   toxicity: {r['toxicityScore']:.2f}",
            f"  tags:      {', '.join(r['tags'])}",
        ]
        lines += [f"  entity:    {e['type']:<9} {e['value']}  ({e['confidence']:.2f})" for e in r["entities"]]
    if job.get("error"):
        e = job["error"]
        lines.append(f"  error:     {e['code']}: {e['message']}" + (" (retryable)" if e["retryable"] else ""))
    if job.get("webhook"):
        lines.append(f"  webhook:   {describe_webhook(job['webhook'])}")
    return "\n".join(lines)


def describe_webhook(w: dict[str, Any]) -> str:
    tries = f"{w['attempts']} attempt{'' if w['attempts'] == 1 else 's'}"
    line = f"{w['status']} after {tries}" if w["attempts"] else w["status"]
    if w["status"] == "RETRYING" and w.get("nextAttemptAt"):
        line += f", next at {w['nextAttemptAt']}"
    if w["status"] != "DELIVERED" and w.get("lastError"):
        line += f" ({w['lastError']})"
    return f"{line} -> {w['url']}"


class Progress:
    """What `submit --wait` shows on stderr: a line per status change; in a terminal, also the
    summary as the model writes it, on one line rewritten in place."""

    def __init__(self, *, live: bool) -> None:
        self.live = live
        self._writing = False

    def status(self, job: dict[str, Any]) -> None:
        self._clear()
        print(f"{job['id']}  {job['status']:<9} {job['stage']}", file=sys.stderr, flush=True)

    def partial(self, job: dict[str, Any]) -> None:
        summary = " ".join((job["partial"].get("summary") or "").split())
        width = shutil.get_terminal_size().columns - len(job["id"]) - 4
        if width > 10 and len(summary) > width:
            summary = "…" + summary[-(width - 1) :]  # the end is what is being written
        print(f"\r\x1b[K{job['id']}  {summary}", end="", file=sys.stderr, flush=True)
        self._writing = True

    def _clear(self) -> None:
        if self._writing:
            print("\r\x1b[K", end="", file=sys.stderr)
            self._writing = False


async def follow(
    url: str, ids: list[str], api_key: str | None, *, progress: Progress | None
) -> dict[str, dict[str, Any]]:
    """Follow every job over one graphql-transport-ws subscription until all have ended."""
    latest: dict[str, dict[str, Any]] = {}
    ws_url = url.replace("https://", "wss://").replace("http://", "ws://")
    variables = {"ids": ids, "partial": progress is not None and progress.live}
    async with websockets.connect(ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        payload = _headers(api_key)
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        if json.loads(await ws.recv()).get("type") != "connection_ack":
            raise ClientError("the service refused the websocket connection")
        await ws.send(
            json.dumps({"id": "1", "type": "subscribe", "payload": {"query": FOLLOW, "variables": variables}})
        )
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] == "next":
                if message["payload"].get("errors"):
                    raise ClientError("; ".join(e["message"] for e in message["payload"]["errors"]))
                job = message["payload"]["data"]["jobsUpdates"]
                if job.pop("partialSeq") is not None:  # an interim frame: the answer being written
                    if progress is not None:
                        progress.partial(job)
                    continue
                del job["partial"]
                before = latest.get(job["id"], {})
                # The first event is the job as it is now (QUEUED, or already ended if the
                # workers were quick); then every change: a retry shows as its own line.
                if progress and (before.get("status"), before.get("stage")) != (job["status"], job["stage"]):
                    progress.status(job)
                latest[job["id"]] = job
            elif message["type"] == "error":
                raise ClientError("; ".join(e["message"] for e in message["payload"]))
            elif message["type"] == "complete":
                break
    return latest


def _follow_submitted(
    url: str, ids: list[str], api_key: str | None, *, progress: Progress | None
) -> dict[str, dict[str, Any]]:
    try:
        return asyncio.run(follow(url, ids, api_key, progress=progress))
    except (websockets.exceptions.WebSocketException, OSError) as exc:
        # Submitted all the same: say which jobs, so that `status` can find them later.
        raise ClientError(f"cannot follow the jobs {' '.join(ids)} at {url}: {exc}") from exc


def submit(
    url: str,
    texts: list[str],
    *,
    wait: bool,
    as_json: bool,
    api_key: str | None,
    webhook: str | None = None,
    priority: str = "NORMAL",
) -> int:
    hook = {"webhookUrl": webhook} if webhook else {}
    body = _post(url, SUBMIT, {"inputs": [{"text": t, "priority": priority, **hook} for t in texts]}, api_key)
    for error in body.get("errors") or []:
        print(f"gql-service: {error['message']}", file=sys.stderr)
    jobs = [p["job"] for p in body["data"]["submitTexts"] if p]
    if not jobs:
        return EXIT_USAGE
    if wait:
        progress = None if as_json else Progress(live=sys.stderr.isatty())
        final = _follow_submitted(url, [j["id"] for j in jobs], api_key, progress=progress)
        jobs = [final.get(j["id"], j) for j in jobs]
    print(json.dumps(jobs, indent=2) if as_json else "\n".join(describe(j) if wait else j["id"] for j in jobs))
    code = exit_code(jobs) if wait else EXIT_OK
    return EXIT_USAGE if body.get("errors") and code == EXIT_OK else code


def status(url: str, job_id: str, *, as_json: bool, api_key: str | None) -> int:
    job = _post(url, STATUS, {"id": job_id}, api_key)["data"]["job"]
    if job is None:
        print(f"gql-service: job {job_id} not found", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(job, indent=2) if as_json else describe(job))
    return exit_code([job])
