"""The GraphQL clients front ends use, each the real npm package (examples/clients/), run
in Node against a live service with API keys: Relay (relay-compiler compiles the app
against schema.graphql; relay-runtime runs it over fetch and graphql-ws), urql (graphql-ws
subscription exchange, and fetchSubscriptions over Server-Sent Events), Apollo Client with
HttpLink alone (multipart subscriptions), meros (a strict multipart parser) and graphql-sse
(Server-Sent Events, in both its modes), a reconnect after the server drops the stream
included."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .clients import SUBMIT, TEXT, post
from .service import Service

CLIENTS = Path(__file__).resolve().parent.parent / "examples" / "clients"
KEY = "sk-js-clients"
ENV = {"API_KEYS": json.dumps({KEY: "acme"}), "OFFLINE_STREAM_DELAY_MS": "5"}


def run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=CLIENTS, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed() -> Path:
    npm = shutil.which("npm")
    assert npm, "Node.js and npm run the JavaScript clients"
    done = run([npm, "ci", "--no-audit", "--no-fund"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return CLIENTS


@pytest.fixture(scope="module")
def svc(e2e_redis: str, installed: Path) -> Iterator[Service]:
    with Service(e2e_redis, workers=1, env={"RQ_QUEUE": "llm-js-clients", **ENV}) as service:
        yield service


STAGES = ["QUEUED", "CALLING_LLM", "VALIDATING", "DONE"]


def followed_to_done(line: str, prefix: str) -> bool:
    """The stages a subscription saw: from its snapshot (wherever the job was by then) on to
    DONE, in order, none missing."""
    seen = line.removeprefix(prefix).split()
    return line.startswith(prefix) and bool(seen) and seen == STAGES[STAGES.index(seen[0]) :]


def node(svc: Service, script: str, *args: str) -> list[str]:
    done = run(["node", script, svc.http_url, KEY, *args], timeout=90)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout.splitlines()


def test_relay_compiles_the_app_against_the_schema_and_runs_it_by_persisted_ids(
    e2e_redis: str, installed: Path
) -> None:
    """relay-compiler persists every operation (relay.config.json's persistConfig, SHA256):
    the artifacts carry ids, and the app runs against a service that trusts that manifest
    alone and takes ids only (`doc_id`). (docs/clients/relay.md runs the same app with the texts.)"""
    generated = CLIENTS / "relay" / "__generated__"
    for artifact in generated.glob("*.graphql.js"):
        artifact.unlink()
    manifest = CLIENTS / "relay" / "persisted-documents.json"
    committed = json.loads(manifest.read_text())
    compiled = run(["node_modules/.bin/relay-compiler"])
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    assert (generated / "JobsAppPaginationQuery.graphql.js").exists()  # from @refetchable
    assert json.loads(manifest.read_text()) == committed, "relay/persisted-documents.json is stale: commit it"
    env = {"RQ_QUEUE": "llm-relay", **ENV, "TRUSTED_DOCUMENTS": str(manifest), "TRUSTED_DOCUMENTS_REQUIRE_ID": "true"}
    with Service(e2e_redis, workers=1, env=env) as svc:
        lines = node(svc, "relay/run.mjs", "--ids")
    assert followed_to_done(lines[0], "subscription: "), lines
    assert lines[1] == "node: true FINISHED DONE POSITIVE", lines
    assert lines[2] == "store record: Job FINISHED", lines  # the refetched object normalized by id
    # Four jobs (the module's Redis is fresh), two a page, merged by @connection.
    pages, distinct = lines[3].removeprefix("pages: ").split("; ")
    assert pages.split()[-1] == "4" and pages.split()[0] == "2" and distinct == "4 distinct jobs", lines


def test_relay_compiles_counts_for_every_connection_as_relay_declares_them(installed: Path) -> None:
    """Connection arguments are nullable, as Relay's convention has them: a count declared
    `Int` with a default (`@argumentDefinitions(count: {type: "Int", defaultValue: 2})`), or
    with none, compiles for every connection (with `first: Int!` the one without a default
    was refused: "Variable of type 'Int' cannot be used where 'Int!' is expected")."""
    generated = CLIENTS / "relay" / "__generated__"
    for artifact in generated.glob("*.graphql.js"):
        artifact.unlink()
    compiled = run(["node_modules/.bin/relay-compiler"])
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    refetch = (generated / "JobsAppBatchPaginationQuery.graphql.js").read_text()
    assert '"defaultValue": 2' in refetch and '"name": "endedCount"' in refetch


def test_the_schema_breaks_no_client_built_against_the_one_before(installed: Path) -> None:
    """graphql-js's findBreakingChanges between schema.graphql as it was (kept as
    tests/schema_baseline.graphql) and as it is: nothing a client sent before fails now.
    The other way round, the change is breaking (a nullable argument made non-null again),
    which shows the check sees what it is meant to."""
    root = CLIENTS.parent.parent

    def changes(before: Path, after: Path) -> dict[str, list[dict[str, str]]]:
        done = run(["node", "schema_changes.mjs", str(before), str(after)])
        assert done.returncode == 0, done.stderr[-3000:]
        found: dict[str, list[dict[str, str]]] = json.loads(done.stdout)
        return found

    baseline, current = Path(__file__).with_name("schema_baseline.graphql"), root / "schema.graphql"
    found = changes(baseline, current)
    assert found["breaking"] == []
    # "Dangerous" in graphql-js's words, harmless here: an input field added with a default
    # (priority: NORMAL), which a client that does not send it gets, as it always behaved.
    # And a stage a job reaches only in an ECONOMY batch, which a client built before could
    # not ask for (it sends no `mode`): none of its jobs is ever in it.
    added = [c["description"] for c in found["dangerous"] if c["type"] == "OPTIONAL_INPUT_FIELD_ADDED"]
    others = [c["description"] for c in found["dangerous"] if c["type"] != "OPTIONAL_INPUT_FIELD_ADDED"]
    assert others == ["PROVIDER_BATCH was added to enum type JobStage."]
    assert "An optional field priority on input type SubmitTextInput was added." in added
    assert "An optional field mode on input type CreateBatchInput was added." in added
    # The check can fail: going back to the baseline breaks clients (fields added since are
    # removed then too, so only the one change this test knows of is named).
    backwards = changes(current, baseline)["breaking"]
    assert "ARG_CHANGED_KIND" in {c["type"] for c in backwards}
    assert "Query.jobs arg first has changed type from Int to Int!." in [c["description"] for c in backwards]


def test_relay_compiler_refuses_a_field_the_schema_lacks(installed: Path) -> None:
    wrong = CLIENTS / "relay" / "Wrong.js"
    wrong.write_text(
        'import { graphql } from "relay-runtime";\ngraphql`query WrongQuery { job(id: "x") { noSuchField } }`;\n'
    )
    try:
        checked = run(["node_modules/.bin/relay-compiler", "--validate"])
    finally:
        wrong.unlink()
    assert checked.returncode != 0 and "noSuchField" in checked.stdout + checked.stderr


def test_urql_queries_mutates_and_subscribes_over_graphql_ws(svc: Service) -> None:
    lines = node(svc, "urql.mjs")
    assert lines[0] == "mutation: QUEUED" and lines[2] == "query: FINISHED NEGATIVE", lines
    assert followed_to_done(lines[1], "subscription: "), lines


def test_apollo_client_subscribes_with_httplink_alone(svc: Service) -> None:
    lines = node(svc, "apollo.mjs")
    assert followed_to_done(lines[0], "subscription over multipart HTTP: ") and lines[1] == "query: FINISHED", lines


def test_urql_subscribes_over_fetch_with_its_default_accept(svc: Service) -> None:
    """urql's fetchSubscriptions asks `text/event-stream, multipart/mixed` and splits events
    on "\\n\\n": events ended with "\\r\\n\\r\\n" were never found ([Network] No Content)."""
    lines = node(svc, "urql-fetch.mjs")
    assert lines[0] == "mutation: QUEUED" and followed_to_done(lines[1], "subscription over fetch: "), lines


def test_meros_reads_every_part_of_multipart_answers_as_json(svc: Service) -> None:
    """meros, strict about RFC 2046, lost the first part (no opening delimiter) and read an
    empty part before the close; a mutation asked for with multipart alone failed."""
    lines = node(svc, "meros.mjs")
    assert followed_to_done(lines[0], "subscription: ") and lines[1].startswith("every part JSON: "), lines


def test_graphql_sse_follows_a_job_to_its_end(svc: Service) -> None:
    lines = node(svc, "sse.mjs")
    assert lines[-2:] == ["next FINISHED DONE v4", "complete"], lines
    stages = " ".join(line.split()[2] for line in lines if line.startswith("next"))
    assert followed_to_done(stages, ""), lines


def test_graphql_sse_single_connection_mode_follows_a_job_over_one_stream(svc: Service) -> None:
    """Its reservation (a PUT) was answered 405: the mode did not work at all."""
    lines = node(svc, "sse-single.mjs")
    assert followed_to_done(lines[0], "subscription: "), lines
    assert lines[1].removeprefix("stopped after: ") in STAGES, lines
    # One reservation and one stream for everything; the stopped subscription's DELETE answered.
    assert lines[2] == "requests: DELETE 200, GET 200, POST 202 x3, PUT 201", lines


def test_graphql_sse_reconnects_after_the_server_drops_the_stream(e2e_redis: str, installed: Path) -> None:
    with Service(e2e_redis, workers=0, env={"RQ_QUEUE": "llm-js-sse-drop", **ENV}) as svc:
        answer = post(svc, SUBMIT, headers={"authorization": f"Bearer {KEY}"}, text=TEXT).json()
        job_id = answer["data"]["submitText"]["job"]["id"]
        client = subprocess.Popen(
            ["node", "sse.mjs", svc.http_url, KEY, job_id], cwd=CLIENTS, stdout=subprocess.PIPE, text=True
        )
        assert client.stdout is not None
        lines = [client.stdout.readline().strip(), client.stdout.readline().strip()]
        assert lines == ["connected", "next QUEUED QUEUED v1"], lines
        svc.restart_api()  # SIGKILL: the stream drops with the process
        svc.start_worker(1)  # meanwhile the job runs to its end
        started = time.monotonic()
        lines += [line.strip() for line in client.stdout]
        assert client.wait(30) == 0
    assert "reconnected" in lines and lines[-1] == "complete", lines
    after = [line for line in lines[lines.index("reconnected") :] if line.startswith("next")]
    # The reopened stream starts with the job as it is now, then goes on to its end.
    assert after and after[-1] == "next FINISHED DONE v4", lines
    assert int(after[0].rsplit("v", 1)[1]) >= 1 and time.monotonic() - started < 30


def test_apollo_client_with_persisted_queries_sends_hashes_and_falls_back_once(svc: Service) -> None:
    """PersistedQueryLink (GET for hashed queries) before HttpLink: a mutation, a subscription
    followed to DONE over multipart HTTP, and a query twice; each document goes over the
    wire once, after the service's PERSISTED_QUERY_NOT_FOUND, and the hash alone after that."""
    lines = node(svc, "apollo-persisted.mjs")
    assert lines[0] == "mutation: QUEUED" and followed_to_done(lines[1], "subscription: "), lines
    assert lines[2:4] == ["query 1: FINISHED", "query 2: FINISHED"], lines
    sent = lines[4].removeprefix("sent: ").split()
    assert (
        sent
        == [
            "POST:hash+hash",
            "POST:document+hash",  # the mutation: not found, then registered
            *sent[2:4],  # the subscription, the same way (its method is the link's choice)
            "GET:hash+hash",
            "POST:document+hash",  # the query: not found, then registered
            "GET:hash+hash",  # and then by its hash alone
        ]
    ), lines
    assert [s.split(":")[1] for s in sent[2:4]] == ["hash+hash", "document+hash"], lines
