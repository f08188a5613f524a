"""The outboxes (archive, webhooks): one bad entry never holds up the rest, a poison entry
ends in its outbox's dead letters (and can be replayed), the streams are bounded, and no
process writes an entry that no consumer reads. Real Redis, PostgreSQL, uvicorn and RQ
worker processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from pydantic import ValidationError
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError
from rq import Queue
from rq.job import Job as RQJob

from gql_service import delivery_store, keys, store
from gql_service.cli import outbox as cli_outbox
from gql_service.cli.embedded_redis import EmbeddedRedis
from gql_service.models import Extraction, JobRecord, JobStage, JobStatus, WebhookDelivery, utcnow
from gql_service.settings import Settings
from gql_service.worker import outbox
from gql_service.worker.deliveries import Relay

from .clients import post, submit
from .conftest import WEBHOOK_SECRET
from .embedded_postgres import EmbeddedPostgres
from .openai_stub import VALID_EXTRACTION
from .service import Service, wait_until
from .test_webhooks import submit as hooked
from .webhook_receiver import Receiver

TTL = 3600


@pytest.mark.parametrize(
    "nul",
    [
        {"summary": "A visit\x00 to the clinic."},
        {"tags": ["health", "clin\x00ic"]},
        {"entities": [{"type": "PER\x00SON", "value": "Dr. Rao", "confidence": 0.9}]},
        {"entities": [{"type": "PERSON", "value": "Dr.\x00Rao", "confidence": 0.9}]},
        {"language": "e\x00"},
    ],
)
def test_an_extraction_with_a_nul_in_any_text_is_invalid(nul: dict[str, object]) -> None:
    Extraction.model_validate(VALID_EXTRACTION)  # the same answer without it is fine
    with pytest.raises(ValidationError):
        Extraction.model_validate({**VALID_EXTRACTION, **nul})


# -- the store: entries only into outboxes that exist, bounded -----------------------------
async def end(redis: AsyncRedis, job_id: str, *, webhook: bool = True, bound: int = store.OUTBOX_MAX_LEN) -> None:
    record = JobRecord(id=job_id, webhook_url="https://example.com/hook" if webhook else None)
    async with redis.pipeline(transaction=True) as pipe:
        store.create_job(pipe, record, text="A text.", ttl_s=TTL)
        await pipe.execute()
    finished = {"status": JobStatus.FINISHED, "stage": JobStage.DONE}
    _, changed = await store.update_job(
        redis, job_id, lambda job: job.model_copy(update=finished), ttl_s=TTL, outbox_max_len=bound
    )
    assert changed


async def drained(redis: AsyncRedis, *outboxes: keys.Outbox) -> None:
    """What a drainer does when it starts: its stream, with its group."""
    for box in outboxes:
        await redis.xgroup_create(box.stream, box.group, id="0", mkstream=True)


async def test_a_transition_writes_an_outbox_entry_only_once_its_stream_exists(async_redis: AsyncRedis) -> None:
    await end(async_redis, "before")
    assert await async_redis.exists(keys.ARCHIVE_OUTBOX, keys.WEBHOOK_OUTBOX) == 0  # nobody reads them: not written
    await drained(async_redis, keys.ARCHIVE)
    await end(async_redis, "archived")
    [(_, fields)] = await async_redis.xrange(keys.ARCHIVE_OUTBOX)
    assert store.decode(fields[b"d"]).id == "archived" and fields[b"t"] == b"A text."
    assert not await async_redis.exists(keys.WEBHOOK_OUTBOX)
    await drained(async_redis, keys.WEBHOOKS)
    await end(async_redis, "hooked")
    assert [store.decode(f[b"d"]).id for _, f in await async_redis.xrange(keys.WEBHOOK_OUTBOX)] == ["hooked"]
    # Drained empty, the stream stays (and so does the rule's answer).
    ids = [entry_id for entry_id, _ in await async_redis.xrange(keys.ARCHIVE_OUTBOX)]
    await async_redis.xack(keys.ARCHIVE_OUTBOX, keys.ARCHIVE.group, *ids)
    await async_redis.xdel(keys.ARCHIVE_OUTBOX, *ids)
    assert await async_redis.exists(keys.ARCHIVE_OUTBOX) == 1
    await end(async_redis, "after", webhook=False)
    assert await async_redis.xlen(keys.ARCHIVE_OUTBOX) == 1


async def test_every_outbox_entry_carries_the_max_len_bound(async_redis: AsyncRedis) -> None:
    await drained(async_redis, keys.ARCHIVE, keys.WEBHOOKS)
    for n in range(400):
        await end(async_redis, f"job-{n}", bound=50)
    # MAXLEN ~ trims whole stream nodes (100 entries each): about the bound, never 400.
    for stream in (keys.ARCHIVE_OUTBOX, keys.WEBHOOK_OUTBOX):
        assert 50 <= await async_redis.xlen(stream) < 150


# -- the one consumer: per-entry isolation, dead letters, delivery counts -------------------
class Recorder(outbox.Drainer[str]):
    """A drainer of the archive outbox that keeps what it did (parsed: the entry's `d`), and
    fails as told: `fail[d]` is a list of exceptions raised by the next attempts at it."""

    outbox = keys.ARCHIVE
    poison = (LookupError,)

    def __init__(self, redis: AsyncRedis, fail: dict[str, list[BaseException]], **options: Any) -> None:
        super().__init__(redis, consumer="recorder", claim_after_s=60, **options)
        self.fail, self.done = fail, set[str]()
        self.ids: dict[str, bytes] = {}
        self.deliveries: dict[str, list[int]] = {}  # of an item, at each failure

    def parse(self, entry_id: bytes, fields: dict[bytes, bytes]) -> str:
        self.ids[fields[b"d"].decode()] = entry_id
        return fields[b"d"].decode()

    async def handle(self, items: list[str], pipe: Pipeline) -> None:
        for item in items:
            if self.fail.get(item):
                entry_id = self.ids[item]
                [row] = await self.redis.xpending_range(self.outbox.stream, self.outbox.group, entry_id, entry_id, 1)
                self.deliveries.setdefault(item, []).append(row["times_delivered"])
                raise self.fail[item].pop(0)
        self.done.update(items)


async def run_until(drainer: outbox.Drainer[Any], condition: Callable[[], Awaitable[bool]]) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(drainer.run(stop))
    try:
        async with asyncio.timeout(30):
            while not await condition():
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await running


async def test_a_bad_entry_is_dead_lettered_alone_and_a_transient_failure_never_counts(
    async_redis: AsyncRedis,
) -> None:
    await drained(async_redis, keys.ARCHIVE)
    for name in ("a", "refused", "b", "buggy", "away", "c"):
        await async_redis.xadd(keys.ARCHIVE_OUTBOX, {"d": name})
    await async_redis.xadd(keys.ARCHIVE_OUTBOX, {"no d": "x"})  # can't be parsed
    fail: dict[str, list[BaseException]] = {
        "refused": [LookupError("refused")] * 10,  # poison: dead at once
        "buggy": [RuntimeError("bug")] * 10,  # unforeseen: dead after 2 deliveries
        "away": [OSError("away")] * 3,  # transient: held (no delivery counted), done once it is back
    }
    drainer = Recorder(async_redis, fail, max_deliveries=2)

    async def settled() -> bool:
        return await async_redis.xlen(keys.ARCHIVE_OUTBOX) == 0

    await run_until(drainer, settled)
    assert drainer.done == {"a", "b", "c", "away"}
    assert drainer.deliveries["away"] == [1, 1, 1] and drainer.deliveries["buggy"] == [1, 2]
    reasons = {f[b"d"]: f[b"dead:reason"].decode() for _, f in await async_redis.xrange(keys.ARCHIVE.dead) if b"d" in f}
    assert reasons == {b"refused": "builtins.LookupError: refused", b"buggy": reasons[b"buggy"]}
    assert reasons[b"buggy"].startswith("taken 3 times, never done (OUTBOX_MAX_DELIVERIES 2)")
    assert await async_redis.xlen(keys.ARCHIVE.dead) == 3  # and the one without `d`
    assert (await async_redis.xpending(keys.ARCHIVE_OUTBOX, keys.ARCHIVE.group))["pending"] == 0


# -- the relay and the delivery state: one atomic step each ---------------------------------
async def test_two_relays_holding_the_same_entry_queue_its_delivery_once(
    async_redis: AsyncRedis, sync_redis: Redis
) -> None:
    settings = Settings(webhook_secret=WEBHOOK_SECRET, _env_file=None)  # type: ignore[call-arg]
    queue = Queue(keys.webhook_queue("llm"), connection=sync_redis)
    await drained(async_redis, keys.WEBHOOKS)
    await end(async_redis, "raced")
    [entry] = [(entry_id, fields) for entry_id, fields in await async_redis.xrange(keys.WEBHOOK_OUTBOX)]
    first, second = Relay(async_redis, queue, settings, consumer="a"), Relay(async_redis, queue, settings, consumer="b")
    checked = first._not_queued

    async def then_the_other_commits(deliveries: list[RQJob]) -> list[RQJob]:
        absent = await checked(deliveries)  # nothing queued yet: both would queue it
        await second._commit([(entry, second.parse(*entry))])
        return absent

    first._not_queued = then_the_other_commits  # type: ignore[method-assign]
    with pytest.raises(WatchError):
        await first._commit([(entry, first.parse(*entry))])
    assert queue.count == 1 and queue.job_ids == [keys.webhook_delivery_job("raced")]
    # Tried again (as a transient failure is), it finds the delivery queued and only acknowledges.
    first._not_queued = checked  # type: ignore[method-assign]
    await first._commit([(entry, first.parse(*entry))])
    assert queue.count == 1 and await async_redis.xlen(keys.WEBHOOK_OUTBOX) == 0


async def test_two_attempts_at_once_both_count_in_the_delivery_state(
    async_redis: AsyncRedis, sync_redis: Redis
) -> None:
    await end(async_redis, "counted")
    url = "https://example.com/hook"

    def attempt(state: WebhookDelivery) -> WebhookDelivery:
        state.attempts += 1
        return state

    def raced(state: WebhookDelivery) -> WebhookDelivery:
        if state.attempts == 0:  # another attempt (a lost one's failure callback) writes first
            delivery_store.update_delivery_sync(sync_redis, "counted", url, attempt)
        return attempt(state)

    # This one's write is refused (what it read has changed), read again and applied again.
    final = await delivery_store.update_delivery(async_redis, "counted", url, raced)
    assert final.attempts == 2
    assert (await delivery_store.get_deliveries(async_redis, ["counted"]))[0] == final


# -- end to end: real workers, PostgreSQL, the webhook receiver -----------------------------
@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    hooks = Receiver(WEBHOOK_SECRET).start()
    yield hooks
    hooks.stop()


@pytest.fixture(scope="module")
def svc(postgres: EmbeddedPostgres) -> Iterator[Service]:
    """The archive and webhooks on, against a Redis of the module's own (the store tests
    above flush the shared one). DATABASE_URL on the worker only: the API archives what it
    ends (a cancel) all the same, as its workers drain the archive. The offline answer is
    written slowly (a job takes a couple of seconds), so a job can be canceled while it runs."""
    env = {
        "WEBHOOK_SECRET": WEBHOOK_SECRET, "WEBHOOK_ALLOW_PRIVATE": "true", "RQ_QUEUE": "llm-outbox",
        "ARCHIVE_CLAIM_AFTER_S": "2",
    }  # fmt: skip
    with EmbeddedRedis() as redis, Service(redis.url, workers=0, env=env) as service:
        service.start_worker(1, env={"DATABASE_URL": postgres.url, "OFFLINE_STREAM_DELAY_MS": "50"})
        client = Redis.from_url(redis.url)
        ready = lambda: client.exists(keys.ARCHIVE_OUTBOX, keys.WEBHOOK_OUTBOX) == 2  # noqa: E731
        wait_until(ready, timeout_s=90, what="the worker's drainers")
        client.close()
        yield service


@pytest.fixture
def redis(svc: Service) -> Iterator[Redis]:
    """The service's Redis, without the dead letters earlier tests left."""
    client = Redis.from_url(svc.env["REDIS_URL"])
    client.delete(keys.ARCHIVE.dead, keys.WEBHOOKS.dead)
    yield client
    client.close()


def submit_ten(svc: Service, webhook: str | None = None) -> list[str]:
    texts = [f"Text {n}: the clinic in Boston was fine." for n in range(10)]
    if webhook is None:
        return [submit(svc, text) for text in texts]
    return [hooked(svc, webhook, text) for text in texts]


def rows(pg: EmbeddedPostgres, job_ids: list[str]) -> set[str]:
    with psycopg.connect(pg.url) as conn:
        return {r[0] for r in conn.execute("SELECT id FROM jobs WHERE id = ANY(%s)", (job_ids,)).fetchall()}


def dead(redis: Redis, box: keys.Outbox) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return list(redis.xrange(box.dead))  # type: ignore[arg-type]


def cli(svc: Service, *args: str, redis_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**svc.env, "REDIS_URL": redis_url or svc.env["REDIS_URL"]}
    command = [sys.executable, "-m", "gql_service", "outbox", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_a_garbage_entry_in_each_outbox_is_dead_lettered_and_the_jobs_after_it_flow(
    svc: Service, redis: Redis, postgres: EmbeddedPostgres, receiver: Receiver
) -> None:
    for stream in (keys.ARCHIVE_OUTBOX, keys.WEBHOOK_OUTBOX):
        redis.xadd(stream, {"d": b"\xff not a job record"})
    ids = submit_ten(svc, receiver.url("after-garbage"))
    wait_until(lambda: len(receiver.events("after-garbage")) == 10, timeout_s=60, what="10 webhooks")
    wait_until(lambda: rows(postgres, ids) == set(ids), timeout_s=30, what="10 rows")
    for box in (keys.ARCHIVE, keys.WEBHOOKS):
        [(_, letter)] = dead(redis, box)
        assert letter[b"d"] == b"\xff not a job record", letter
        assert letter[b"dead:reason"].startswith(b"not a job record: ValidationError"), letter
        assert redis.xlen(box.stream) == 0


def test_a_record_postgresql_refuses_is_dead_lettered_shown_and_can_be_replayed(
    svc: Service, redis: Redis, postgres: EmbeddedPostgres
) -> None:
    # As store.py's Lua writes an ended job's entry, with a NUL in its text (an older
    # version's, or one planted): PostgreSQL's text can't hold it.
    record = JobRecord(id="nul-text", status=JobStatus.FINISHED, stage=JobStage.DONE, finished_at=utcnow())
    planted = redis.xadd(keys.ARCHIVE_OUTBOX, {"d": store.encode(record), "t": "before\x00after"})
    ids = submit_ten(svc)
    wait_until(lambda: rows(postgres, ids) == set(ids), timeout_s=60, what="the 10 jobs after it in PostgreSQL")
    wait_until(lambda: len(dead(redis, keys.ARCHIVE)) == 1, what="the dead letter")
    [(_, letter)] = dead(redis, keys.ARCHIVE)
    assert letter[b"dead:id"] == planted and letter[b"t"] == b"before\x00after"
    assert letter[b"dead:reason"].startswith(b"psycopg.DataError: PostgreSQL text fields cannot contain NUL"), letter
    assert rows(postgres, ["nul-text"]) == set()
    # Where operators look: /metrics and the command.
    scraped = httpx.get(f"http://127.0.0.1:{svc.port}/metrics").text
    assert 'gqls_outbox_dead_letters{outbox="archive"} 1.0' in scraped, scraped
    assert 'gqls_outbox_dead_letters{outbox="webhooks"} 0.0' in scraped
    assert 'gqls_outbox_depth{outbox="archive"} 0.0' in scraped
    shown = cli(svc, "--json")
    assert shown.returncode == 0, shown.stderr
    archive = json.loads(shown.stdout)["archive"]
    assert (archive["drained"], archive["depth"], archive["pending"], archive["dead_letters"]) == (True, 0, 0, 1)
    assert archive["newest_dead"][0]["entry"] == planted.decode()
    assert "cannot contain NUL" in archive["newest_dead"][0]["reason"]
    # Replayed with nothing fixed: it goes through the outbox again, and is refused again.
    replayed = cli(svc, "replay", "archive")
    assert (replayed.returncode, replayed.stdout.strip()) == (0, "archive: 1 replayed"), replayed.stderr

    def dead_again() -> bool:
        letters = dead(redis, keys.ARCHIVE)
        return len(letters) == 1 and letters[0][1][b"dead:id"] != planted

    wait_until(dead_again, timeout_s=30, what="the replayed entry to be dead-lettered again")
    assert redis.xlen(keys.ARCHIVE_OUTBOX) == 0 and rows(postgres, ["nul-text"]) == set()
    assert json.loads(cli(svc, "replay", "webhooks", "--json").stdout) == {"replayed": 0}


def test_a_job_the_api_cancels_is_archived_though_the_api_has_no_database_url(
    svc: Service, redis: Redis, postgres: EmbeddedPostgres
) -> None:
    assert "DATABASE_URL" not in svc.env
    job_id = submit(svc, "Canceled while the answer is being written.")
    canceled = post(svc, "mutation($id: ID!) { cancelJob(id: $id) { status } }", id=job_id).json()
    assert canceled["data"]["cancelJob"]["status"] == "CANCELED", canceled
    wait_until(lambda: rows(postgres, [job_id]) == {job_id}, timeout_s=30, what="the canceled job's row")


def test_a_replay_moves_only_the_dead_letters_there_when_it_began(
    sync_redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drainer refuses a replayed entry again while the replay runs (seen once in CI:
    "2 replayed" for one dead letter); the replay must not take it back in, or it would go
    round for as long as the drainer keeps up."""
    box = keys.OUTBOXES["archive"]
    sync_redis.xgroup_create(box.stream, box.group, id="$", mkstream=True)
    for n in range(3):
        sync_redis.xadd(box.dead, {"d": f"entry {n}", "dead:reason": "refused"})
    register = sync_redis.register_script

    def reburying(source: str) -> Any:
        script = register(source)

        def run(**kwargs: Any) -> Any:
            result = script(**kwargs)
            sync_redis.xadd(box.dead, {"d": "refused again", "dead:reason": "refused"})  # as a drainer would
            return result

        return run

    monkeypatch.setattr(sync_redis, "register_script", reburying)
    monkeypatch.setattr(cli_outbox, "REPLAY_BATCH", 1)
    assert cli_outbox.replay(sync_redis, box, max_len=1000) == 3
    assert sync_redis.xlen(box.stream) == 3
    assert sync_redis.xlen(box.dead) == 4  # those that came later wait for the next replay


def test_the_outbox_command_says_what_is_wrong_in_one_line(svc: Service, redis_url: str) -> None:
    unreachable = cli(svc, "--json", redis_url="redis://127.0.0.1:1/0")
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1
    assert "cannot reach Redis" in unreachable.stderr
    # A Redis no drainer has started on: nothing is written to its outboxes, nor replayed into them.
    shown = cli(svc, redis_url=redis_url)
    assert shown.returncode == 0 and "none (not drained" in shown.stdout, shown.stdout
    refused = cli(svc, "replay", "archive", redis_url=redis_url)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "no drainer has started on the archive outbox" in refused.stderr
