"""Whatever a client sends is its own mistake, never ours: every cursor, id and nested input
is checked into BAD_USER_INPUT with a message, before Redis or PostgreSQL see it. Through
`schema.execute` against a real Redis and a real PostgreSQL history (a NUL or a year past
9999 reached PostgreSQL only with the history on): first the shapes an outside probe found,
then a fuzzer (hypothesis) over cursors, ids and variables of every type."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gql_service import history
from gql_service.api.jobs import JobService
from gql_service.api.schema import Context, schema
from gql_service.broadcast import Broadcast
from gql_service.redis_conn import async_client
from gql_service.settings import Settings

from .embedded_postgres import EmbeddedPostgres

JOBS = "query($after: String) { jobs(first: 5, after: $after) { edges { cursor } pageInfo { endCursor } } }"
BATCHES = "query($after: String) { batches(first: 5, after: $after) { edges { cursor } } }"
BATCH_JOBS = "query($id: ID!, $after: String) { batch(id: $id) { jobs(first: 5, after: $after) { edges { cursor } } } }"
ENDED = "query($id: ID!, $after: String) { batch(id: $id) { endedJobs(first: 5, after: $after) { edges { cursor } } } }"
CREATE = 'mutation($m: JSON) { createBatch(input: {name: "fuzz", metadata: $m}) { id } }'


def cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@contextlib.asynccontextmanager
async def archived_context(redis_url: str, postgres: EmbeddedPostgres) -> AsyncIterator[Context]:
    """A context as the API builds it, with the job history on."""
    settings = Settings(llm_provider="offline", _env_file=None)  # type: ignore[call-arg]
    pool = history.pool(postgres.url, timeout_s=settings.redis_timeout_s)
    hub_client = async_client(redis_url, max_connections=1, retries=0)
    hub = Broadcast(hub_client)
    redis, sync_redis = AsyncRedis.from_url(redis_url), Redis.from_url(redis_url)
    await pool.open()
    await hub.start()
    try:
        jobs = JobService(redis=redis, sync_redis=sync_redis, broadcast=hub, settings=settings, history=pool)
        yield Context(jobs=jobs, request_id="client-input")
    finally:
        await hub.stop()
        await pool.close()
        await hub_client.aclose()
        await redis.aclose()
        sync_redis.close()


@pytest.fixture
async def ctx(redis_url: str, postgres: EmbeddedPostgres) -> AsyncIterator[Context]:
    async with archived_context(redis_url, postgres) as context:
        yield context


async def execute(context: Context, query: str, **variables: Any) -> Any:
    return await schema.execute(query, variable_values=variables, context_value=context)


def codes(result: Any) -> list[str | None]:
    return [(e.extensions or {}).get("code") for e in result.errors or []]


async def a_batch(context: Context) -> str:
    made = await execute(context, CREATE)
    assert made.errors is None, made.errors
    return str(made.data["createBatch"]["id"])


# -- the probe's shapes ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("query", "after"),
    [
        (JOBS, cursor("1e300|x")),  # was INTERNAL_SERVER_ERROR: a datetime past year 9999
        (JOBS, cursor("-62135596800001.0|x")),  # was INTERNAL_SERVER_ERROR: before year 1
        (JOBS, cursor("1700000000000.0|x\x00y")),  # was SERVICE_UNAVAILABLE: PostgreSQL refuses NUL
        (JOBS, cursor("nan|x")),
        (JOBS, cursor("1700000000000.0|" + "x" * 200)),
        (BATCHES, cursor("1e300|x")),
        (ENDED, cursor("p|99999999999999999999999")),  # was INTERNAL_SERVER_ERROR: past Redis's int64
        (BATCH_JOBS, cursor("p|99999999999999999999999")),
        (BATCH_JOBS, cursor("p|+5")),
        (BATCH_JOBS, cursor("p|\u0663")),  # a digit, in Arabic-Indic: int() takes it
        (ENDED, "p|99999999999999999999999"),  # not even base64
    ],
)
async def test_a_cursor_the_api_never_gave_out_is_bad_user_input(ctx: Context, query: str, after: str) -> None:
    result = await execute(ctx, query, after=after, id=await a_batch(ctx))
    assert codes(result) == ["BAD_USER_INPUT"], result.errors
    assert result.errors[0].message == "after is not a cursor this API gave out"


async def test_the_cursors_the_api_gives_out_are_taken_back(ctx: Context) -> None:
    for n in range(3):
        await execute(ctx, "mutation($t: String!) { submitText(input: {text: $t}) { job { id } } }", t=f"text {n}")
    first = await execute(ctx, JOBS.replace("first: 5", "first: 2"))
    after = first.data["jobs"]["pageInfo"]["endCursor"]
    rest = await execute(ctx, JOBS, after=after)
    assert rest.errors is None and len(rest.data["jobs"]["edges"]) == 1
    batch_id = await a_batch(ctx)
    for query in (BATCH_JOBS, ENDED):
        assert (await execute(ctx, query, id=batch_id, after=cursor("p|0"))).errors is None


@pytest.mark.parametrize(
    ("query", "variables"),
    [
        ("query($id: ID!) { job(id: $id) { id } }", {"id": "a\x00b"}),  # was SERVICE_UNAVAILABLE
        ("query($id: ID!) { batch(id: $id) { id } }", {"id": "batch_\x00"}),
        ("query($ids: [ID!]!) { nodes(ids: $ids) { id } }", {"ids": ["fine", "x" * 129]}),
        ("mutation($id: ID!) { cancelJob(id: $id) { id } }", {"id": "two words"}),
        ("mutation($id: ID!) { closeBatch(id: $id) { id } }", {"id": "caf\u00e9"}),
        (
            'mutation($id: ID) { submitTexts(inputs: [{text: "t"}], batchId: $id) { job { id } } }',
            {"id": "\x00"},
        ),
    ],
)
async def test_an_id_that_cannot_be_one_is_bad_user_input(ctx: Context, query: str, variables: dict[str, Any]) -> None:
    result = await execute(ctx, query, **variables)
    assert codes(result) == ["BAD_USER_INPUT"], result.errors
    assert "is not an id this API gives out" in result.errors[0].message


async def test_an_unknown_id_of_the_right_shape_is_still_just_unknown(ctx: Context) -> None:
    result = await execute(ctx, "query($id: ID!) { job(id: $id) { id } }", id="does-not-exist")
    assert result.errors is None and result.data == {"job": None}


async def test_a_subscription_to_an_id_that_cannot_be_one_is_bad_user_input(ctx: Context) -> None:
    stream = await schema.subscribe(
        "subscription($id: ID!) { jobUpdates(id: $id) { id } }", variable_values={"id": "a\x00b"}, context_value=ctx
    )
    async with contextlib.aclosing(stream) as results:  # type: ignore[type-var]
        first = await asyncio.wait_for(anext(results), 10)
    assert codes(first) == ["BAD_USER_INPUT"]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (nested(1000), "at most 32 levels deep"),  # was INTERNAL_SERVER_ERROR: json.dumps's recursion
        ([[[]]], "must be a JSON object"),
        ({"list": [nested(40)]}, "at most 32 levels deep"),
        ({"big": "x" * 5000}, "at most 4096 bytes"),
    ],
)
async def test_metadata_is_bounded_in_depth_and_size(ctx: Context, metadata: Any, message: str) -> None:
    result = await execute(ctx, CREATE, m=metadata)
    assert codes(result) == ["BAD_USER_INPUT"] and message in result.errors[0].message, result.errors


async def test_metadata_at_the_depth_bound_is_kept_as_given(ctx: Context) -> None:
    deepest = nested(32)
    made = await execute(ctx, CREATE.replace("{ id }", "{ metadata }"), m=deepest)
    assert made.errors is None and made.data["createBatch"]["metadata"] == deepest


async def test_an_infinite_number_in_a_metadata_literal_is_bad_user_input(ctx: Context) -> None:
    result = await execute(ctx, 'mutation { createBatch(input: {name: "n", metadata: {a: 1e999}}) { id } }')
    assert codes(result) == ["BAD_USER_INPUT"] and "finite" in result.errors[0].message


# -- the fuzzer -----------------------------------------------------------------------------
# Text as a client can send it: JSON over HTTP or a websocket carries no lone surrogate
# (orjson refuses one, and so does GraphQL's own string syntax), and hypothesis's text()
# has none either.
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.text(alphabet="0123456789.e+-_ infa", max_size=30),
)
IDS = st.one_of(st.text(max_size=140), st.text(alphabet="abcdef0123456789", min_size=32, max_size=32))
CURSORS = st.one_of(
    st.text(max_size=60),  # anything at all
    st.binary(max_size=60).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    st.builds(lambda n, i: cursor(f"{n}|{i}"), NUMBERS, IDS),  # keyset: created ms | id
    st.builds(lambda n: cursor(f"p|{n}"), NUMBERS),  # a position in a batch
)
# JSON values as a client's parsed body holds them: orjson gives no NaN, no infinity, and a
# float for an integer past 64 bits.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
# Each operation with the variables it declares; every variable may be given any JSON value.
OPERATIONS = [
    (
        "query($first: Int, $after: String, $status: JobStatus, $from: DateTime, $to: DateTime) { jobs(first: $first, "
        "after: $after, status: $status, createdAfter: $from, createdBefore: $to) { edges { cursor } } }",
        ["first", "after", "status", "from", "to"],
    ),
    (
        "query($first: Int, $after: String) { batches(first: $first, after: $after) { edges { cursor } } }",
        ["first", "after"],
    ),
    ("query($id: ID!) { job(id: $id) { id } }", ["id"]),
    ("query($ids: [ID!]!) { nodes(ids: $ids) { id } }", ["ids"]),
    ("mutation($input: SubmitTextInput!) { submitText(input: $input) { job { id } } }", ["input"]),
    (
        "mutation($inputs: [SubmitTextInput!]!, $b: ID) { submitTexts(inputs: $inputs, batchId: $b) { job { id } } }",
        ["inputs", "b"],
    ),
    ("mutation($input: CreateBatchInput!) { createBatch(input: $input) { id metadata } }", ["input"]),
    ("mutation($id: ID!) { cancelJob(id: $id) { id } }", ["id"]),
]


def variables_for(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    # Sometimes well-typed (a string, an input object with text), mostly anything.
    shaped = st.one_of(
        JSON_VALUES, IDS, CURSORS, st.fixed_dictionaries({"text": st.text(max_size=30)}, optional={"name": IDS})
    )
    return st.fixed_dictionaries({}, optional={name: shaped for name in names})


FUZZ = hypothesis.settings(
    max_examples=150, derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)  # fmt: skip


class Errors(logging.Handler):
    """The ERROR lines logged meanwhile: a client's input must not cause one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def ours(result: Any) -> list[str]:
    """The errors that would blame the service for a client's input."""
    return [
        f"{(e.extensions or {}).get('code')}: {e.message}"
        for e in result.errors or []
        if (e.extensions or {}).get("code") in (None, "INTERNAL_SERVER_ERROR", "SERVICE_UNAVAILABLE")
    ]


def test_no_cursor_id_or_variable_a_client_sends_is_an_internal_error(
    redis_url: str, postgres: EmbeddedPostgres
) -> None:
    errors = Errors()
    logging.getLogger("gql_service").addHandler(errors)
    # One loop for every example: hypothesis calls each example synchronously.
    with asyncio.Runner() as runner:
        stack = contextlib.AsyncExitStack()
        context = runner.run(stack.enter_async_context(archived_context(redis_url, postgres)))
        batch_id = runner.run(a_batch(context))

        def run(query: str, **variables: Any) -> Any:
            return runner.run(execute(context, query, **variables))

        @FUZZ
        @hypothesis.given(after=CURSORS, which=st.sampled_from([JOBS, BATCHES, BATCH_JOBS, ENDED]))
        def cursors(after: str, which: str) -> None:
            result = run(which, after=after, id=batch_id)
            assert not ours(result), ours(result)

        @FUZZ
        @hypothesis.given(data=st.data(), operation=st.sampled_from(OPERATIONS))
        def variables(data: st.DataObject, operation: tuple[str, list[str]]) -> None:
            query, names = operation
            result = run(query, **data.draw(variables_for(names)))
            assert not ours(result), ours(result)

        try:
            cursors()
            variables()
        finally:
            runner.run(stack.aclose())
            logging.getLogger("gql_service").removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]
