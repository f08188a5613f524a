"""Shared fixtures: a real Redis server, the OpenAI-compatible stub, service processes."""

from __future__ import annotations

import base64
import contextlib
import warnings
from collections.abc import AsyncIterator, Iterator

import psutil
import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gql_service.api.jobs import JobService
from gql_service.api.schema import Context
from gql_service.broadcast import Broadcast
from gql_service.cli import migrate
from gql_service.cli.embedded_redis import EmbeddedRedis
from gql_service.cli.procs import become_subreaper
from gql_service.redis_conn import async_client
from gql_service.settings import Settings

from .embedded_postgres import EmbeddedPostgres
from .openai_stub import OpenAIStub
from .service import Service

# The files that take longest, first: with two processes taking files in order, one drawn
# last (the bench smoke run takes minutes) kept one process busy alone at the end.
SLOWEST_FIRST = ("test_bench_smoke.py", "test_js_clients.py", "test_sentinel.py", "test_wheel.py", "test_install.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that used live services shows what each of their processes said last:
    a flake seen once in CI is then explained by its own report."""
    report = yield
    if report.failed and call.when == "call":
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Service):
                for proc in value.procs:
                    tail = proc.output().splitlines()[-80:]
                    report.sections.append((f"{name}: {proc.name} (last {len(tail)} lines)", "\n".join(tail)))
    return report


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_tests() -> Iterator[None]:
    """The suite adopts its orphans (a worker pool's children whose parent was killed) and
    kills whatever of its process tree is still alive at the end, so a failed test never
    leaves workers retrying a Redis that is gone on the machine."""
    become_subreaper()
    yield
    leftovers: list[str] = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE:  # an adopted orphan that already exited
                leftovers.append(" ".join(process.cmdline())[:100])
                process.kill()
    if leftovers:
        warnings.warn(f"killed {len(leftovers)} process(es) the tests left behind: {leftovers}", stacklevel=1)


@pytest.fixture(scope="module")
def postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of the module's own, its tables made by `gql-service migrate`'s
    code (the job history)."""
    with EmbeddedPostgres() as pg:
        migrate.upgrade(pg.url)
        yield pg


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """A clean database for every test."""
    client = Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def async_redis(redis_url: str) -> AsyncIterator[AsyncRedis]:
    client = AsyncRedis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def openai_stub() -> Iterator[OpenAIStub]:
    stub = OpenAIStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def stub(openai_stub: OpenAIStub) -> OpenAIStub:
    openai_stub.reset()
    return openai_stub


@pytest.fixture
def settings() -> Settings:
    return Settings(
        llm_provider="offline",
        max_text_chars=1000,
        retry_backoff_s=0,
        _env_file=None,  # type: ignore[call-arg]
    )


@pytest.fixture
async def broadcast(redis_url: str) -> AsyncIterator[Broadcast]:
    # As the API builds it: a pool of its own and no retries underneath.
    client = async_client(redis_url, max_connections=1, retries=0)
    hub = Broadcast(client, health_check_s=1.0)
    await hub.start()
    yield hub
    await hub.stop()
    await client.aclose()


@pytest.fixture
async def jobs(async_redis: AsyncRedis, sync_redis: Redis, broadcast: Broadcast, settings: Settings) -> JobService:
    return JobService(redis=async_redis, sync_redis=sync_redis, broadcast=broadcast, settings=settings)


@pytest.fixture
def context(jobs: JobService) -> Context:
    return Context(jobs=jobs, request_id="test-request")


@pytest.fixture(scope="module")
def e2e_redis(redis_server: EmbeddedRedis) -> str:
    """For a module's live service: flushed once, not per test (workers keep state there)."""
    Redis.from_url(redis_server.url).flushall()
    return redis_server.url


# The webhook secret of the shared service (the receiver example of docs/operations/webhooks.md verifies with it).
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"gql-service webhook test secret!").decode()


@pytest.fixture(scope="module")
def service(e2e_redis: str) -> Iterator[Service]:
    """`gql-service serve` and a pool of two workers, offline provider; webhooks on, to
    loopback receivers too."""
    env = {"WEBHOOK_SECRET": WEBHOOK_SECRET, "WEBHOOK_ALLOW_PRIVATE": "true"}
    with Service(e2e_redis, workers=2, env=env) as svc:
        yield svc
