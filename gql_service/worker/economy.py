"""ECONOMY batches, the worker's side: waiting jobs sent to the provider's Batch API, its
answers handed to the ordinary attempt that validates them.

Every worker process runs this loop (beside the reconciler). Each pass:

1. **Flush.** A batch whose jobs wait (gql_service.economy_store) is due once it is closed,
   ECONOMY_FLUSH_S after its oldest waiting job came, or when ECONOMY_MAX_REQUESTS wait: its
   jobs are taken into chunks of at most that many, in one script each (no job in two).
2. **Chunks,** each worked on by one worker at a time (a redis-py lock, renewed while held,
   so a killed worker's chunk is taken over within CHUNK_LOCK_S), step by step; each step is
   written before the next starts, so another worker resumes where one died:
   - PREPARED: its jobs' requests (the interactive prompt and schema, `custom_id` = job id)
     go up as one JSONL file;
   - UPLOADED: the provider batch is made, tagged with the chunk's id. A worker that died
     after making it but before writing that down left a batch that the next one finds by
     its tag and adopts, rather than making a second;
   - CREATED: its jobs move to stage PROVIDER_BATCH (status STARTED);
   - RUNNING: polled every ECONOMY_POLL_S; the provider's counts are kept for
     `Batch.providerBatches`; a canceled batch's provider batch is cancelled;
   - READING: the output and error files are read line by line. An answer is stored beside
     its job and the job goes on the RQ queue in one guarded step: the attempt finds the
     answer and validates it as an interactive one (a repair is an interactive call). A
     request the provider did not answer (an error line, expired, missing) is queued again
     as an interactive job (ECONOMY_FALLBACK=interactive) or ends FAILED (`fail`, or an
     error no retry can fix). Each job's hand-over is guarded by a key written with it, so a
     worker that reads the same file again hands nothing over twice. Then the files are
     deleted and the chunk is DONE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import openai
from openai import AsyncOpenAI
from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from gql_service import economy_store, keys, queueing, store
from gql_service.economy_store import Chunk, ChunkState
from gql_service.models import JobErrorCode
from gql_service.redis_conn import sync_client
from gql_service.settings import RedisTarget, Settings
from gql_service.worker import outbox
from gql_service.worker.economy_jobs import ChunkJobs
from gql_service.worker.llm import provider_batches
from gql_service.worker.llm.base import LLMError, Provider
from gql_service.worker.llm.offline import OfflineProvider
from gql_service.worker.llm.provider_batches import Answer, BatchAPI, OpenAIBatches
from gql_service.worker.offline_batches import OfflineBatches

log = logging.getLogger(__name__)

GROUP = 200  # jobs read, moved or handed over per round trip
# A chunk's lock outlives a silent holder this long (renewed every third of it while held).
CHUNK_LOCK_S = 15.0
# How far back, before a chunk was made, the provider's batches are searched for one it may
# have made already (the provider's clock and ours may differ a little).
ADOPT_SLACK_S = 600


def _refused(exc: openai.APIStatusError) -> bool:
    """A 4xx that asking again will not change (not a timeout, a conflict or a 429)."""
    return 400 <= exc.status_code < 500 and exc.status_code not in (408, 409, 429)


def _groups(items: list[str]) -> Iterable[list[str]]:
    return (items[n : n + GROUP] for n in range(0, len(items), GROUP))


class Economy:
    def __init__(
        self, redis: Redis, api: BatchAPI, queues: queueing.Queues, settings: Settings, *, model: str, endpoint: str
    ) -> None:
        self.redis = redis
        self.api = api  # the provider's Batch and Files APIs (or the offline twin's)
        self.queues = queues
        self.settings = settings
        self.model = model
        self.endpoint = endpoint  # whose JSON-schema support the interactive path learnt
        self.ttl_s = settings.result_ttl_s
        self._lock: Lock | None = None  # the lock of the chunk being advanced
        self.jobs = ChunkJobs(redis, queues, settings)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._guarded("the pass", self.step())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.economy_poll_s)
        finally:
            await self.api.close()

    async def step(self) -> None:
        """One pass: make the chunks that are due, then move each chunk no one else holds.
        What fails in one chunk (its provider away for now, say) holds up no other."""
        await self._guarded("flush", self.flush())
        for chunk_id in await economy_store.active(self.redis):
            async with self._holding(chunk_id) as lock:
                if lock is not None:
                    await self._guarded(f"chunk {chunk_id}", self.advance(chunk_id, lock))

    @staticmethod
    async def _guarded(what: str, work: Awaitable[object]) -> None:
        try:
            await work
        except (RedisError, OSError, openai.APIError) as exc:  # away for now: the next pass tries again
            log.warning("economy: %s: %s: %s", what, type(exc).__name__, exc)
        except Exception:  # a bug: logged whole, and the loop lives on
            log.exception("economy: %s failed", what)

    async def flush(self) -> int:
        """Take the jobs of each due batch into chunks; how many chunks were made."""
        most, made = self.settings.economy_max_requests, 0
        now_ms = time.time() * 1000
        for batch_id, first_ms, count, still_open in await economy_store.waiting_batches(self.redis):
            aged = now_ms - first_ms >= self.settings.economy_flush_s * 1000
            # Closed or aged: all of it now; else only full chunks (so that two workers flushing
            # at once make no small one of what the other left).
            whole = aged or not still_open
            for _ in range(math.ceil(count / most) if whole else count // most):
                chunk_id = uuid.uuid4().hex
                if await economy_store.take(self.redis, batch_id, chunk_id, most=most, ttl_s=self.ttl_s,
                                            full=not whole):  # fmt: skip
                    made += 1
                    log.info("economy: batch %s: chunk %s made", batch_id, chunk_id)
        return made

    @contextlib.asynccontextmanager
    async def _holding(self, chunk_id: str) -> AsyncIterator[Lock | None]:
        """The chunk's lock, renewed while held; None if another worker holds it."""
        lock = Lock(self.redis, keys.economy_lock(chunk_id), timeout=CHUNK_LOCK_S, blocking=False)
        if not await lock.acquire():
            yield None
            return

        async def renew() -> None:
            while True:
                await asyncio.sleep(CHUNK_LOCK_S / 3)
                try:
                    await lock.reacquire()
                except LockNotOwnedError:
                    return  # lapsed (Redis away for longer than it): `_create` checks it
                except RedisError as exc:
                    log.warning("economy: chunk %s: its lock not renewed yet: %s", chunk_id, exc)

        renewing = asyncio.create_task(renew())
        try:
            yield lock
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError, LockError, RedisError):
                await renewing
            with contextlib.suppress(LockError, RedisError):
                await lock.release()

    async def advance(self, chunk_id: str, lock: Lock | None = None) -> None:
        """Take the chunk through as many of its steps as it can go now (holding `lock`)."""
        self._lock = lock
        steps: dict[ChunkState, Callable[[Chunk], Awaitable[bool]]] = {
            ChunkState.PREPARED: self._upload,
            ChunkState.UPLOADED: self._create,
            ChunkState.CREATED: self._start,
            ChunkState.RUNNING: self._poll,
            ChunkState.READING: self._read,
        }
        while True:
            chunk = await economy_store.chunk(self.redis, chunk_id)
            if chunk is None:  # expired with its batch (RESULT_TTL_S)
                await self.redis.srem(keys.ECONOMY_CHUNKS, chunk_id)
                return
            step = steps.get(chunk.state)
            if step is None:
                return
            if chunk.state in (ChunkState.PREPARED, ChunkState.UPLOADED) and await economy_store.canceled(
                self.redis, chunk.batch_id
            ):
                await self._drop(chunk)  # its batch was canceled before the provider had it
                return
            try:
                if not await step(chunk):
                    return
            except openai.APIStatusError as exc:
                if not _refused(exc):
                    raise  # the next pass tries again
                # Asking again will not help (a server without a Batch API answers 404, say):
                # its jobs go the other way now rather than wait for ever.
                reason = f"the provider refused its batch ({exc.status_code}: {str(exc.message)[:200]})"
                log.warning("economy: chunk %s: %s", chunk.id, reason)
                await self._give_up(chunk, reason)
                return

    # -- the steps: each returns whether the chunk moved on --------------------------------
    async def _upload(self, chunk: Chunk) -> bool:
        job_ids = await economy_store.job_ids(self.redis, chunk.id)
        sent = 0

        async def lines() -> AsyncIterator[bytes]:
            nonlocal sent
            json_schema = not await store.json_mode_only(self.redis, self.endpoint)
            for group in _groups(job_ids):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for job_id in group:
                        pipe.hmget(keys.job(job_id), ["d", "t"])
                    found = await pipe.execute()
                for job_id, (raw, text) in zip(group, found, strict=True):
                    if raw is not None and not store.decode(raw).terminal:  # not canceled meanwhile
                        sent += 1
                        yield provider_batches.request_line(job_id, text.decode(), model=self.model,
                                                            json_schema=json_schema)  # fmt: skip

        file_id = await self.api.upload(lines(), name=f"{chunk.id}.jsonl")
        if file_id is None:  # every job was canceled before it was sent
            return await economy_store.advance(self.redis, chunk.id, chunk.state, ChunkState.DONE)
        if not await economy_store.advance(self.redis, chunk.id, chunk.state, ChunkState.UPLOADED, input_file=file_id):
            now = await economy_store.chunk(self.redis, chunk.id)
            if now is None or now.input_file != file_id:  # (not this very write, its reply lost)
                await self.api.delete_file(file_id)  # another worker uploaded it first
            return False
        return True

    async def _create(self, chunk: Chunk) -> bool:
        assert chunk.input_file is not None
        # One its maker (a worker that died before noting it) left: adopted, not made twice.
        made = await self.api.find(chunk.id, since=chunk.made - ADOPT_SLACK_S)
        if made is None:
            if self._lock is not None and not await self._lock.owned():
                return False  # its lock lapsed: another worker may be here too, and only one may make it
            made = await self.api.create(chunk.input_file, tag=chunk.id)
            log.info("economy: chunk %s: provider batch %s made", chunk.id, made.id)
        else:
            log.warning("economy: chunk %s: provider batch %s adopted (made by a worker that died)", chunk.id, made.id)
        fields = {"provider_batch": made.id, "status": made.status}
        return await economy_store.advance(self.redis, chunk.id, chunk.state, ChunkState.CREATED, **fields)

    async def _start(self, chunk: Chunk) -> bool:
        for group in _groups(await economy_store.job_ids(self.redis, chunk.id)):
            await self.jobs.sent(group)
        return await economy_store.advance(self.redis, chunk.id, chunk.state, ChunkState.RUNNING)

    async def _poll(self, chunk: Chunk) -> bool:
        assert chunk.provider_batch is not None
        if chunk.status not in provider_batches.ENDED | {"cancelling"} and await economy_store.canceled(
            self.redis, chunk.batch_id
        ):
            await self.api.cancel(chunk.provider_batch)
        made = await self.api.retrieve(chunk.provider_batch)
        counts = made.request_counts
        total, completed, failed = (counts.total, counts.completed, counts.failed) if counts else (0, 0, 0)
        await economy_store.note_counts(self.redis, chunk, made.status, total, completed, failed)
        if made.status not in provider_batches.ENDED:
            return False  # the next pass looks again
        files = {"output_file": made.output_file_id or "", "error_file": made.error_file_id or ""}
        log.info("economy: chunk %s: provider batch %s %s (%d completed, %d failed of %d)",
                 chunk.id, made.id, made.status, completed, failed, total)  # fmt: skip
        return await economy_store.advance(self.redis, chunk.id, chunk.state, ChunkState.READING, **files)

    async def _read(self, chunk: Chunk) -> bool:
        for file_id in (chunk.output_file, chunk.error_file):
            if file_id:
                group: list[Answer] = []
                async for answer in self.api.answers(file_id):
                    group.append(answer)
                    if len(group) == GROUP:
                        await self.jobs.settle(chunk.id, group)
                        group = []
                await self.jobs.settle(chunk.id, group)
        # What is left had no line at all (the provider lost or dropped it): unanswered.
        unanswered = LLMError(JobErrorCode.PROVIDER_ERROR, f"the provider's batch ended {chunk.status} without "
                              "answering it", retryable=True)  # fmt: skip
        for group_ids in _groups(await economy_store.job_ids(self.redis, chunk.id)):
            await self.jobs.settle(chunk.id, [Answer(job_id, error=unanswered) for job_id in group_ids])
        for file_id in (chunk.input_file, chunk.output_file, chunk.error_file):
            if file_id:
                await self.api.delete_file(file_id)
        return await economy_store.advance(self.redis, chunk.id, chunk.state, ChunkState.DONE)

    async def _drop(self, chunk: Chunk) -> None:
        """A canceled batch's chunk the provider does not have yet: nothing is sent. (Its
        jobs are the API's to cancel: cancelBatch cancels every job of the batch.)"""
        if chunk.input_file:
            await self.api.delete_file(chunk.input_file)
        await economy_store.advance(self.redis, chunk.id, chunk.state, ChunkState.DONE, status="cancelled")

    async def _give_up(self, chunk: Chunk, reason: str) -> None:
        """Every job of the chunk that is still in it, as if the provider left it unanswered."""
        if chunk.provider_batch and chunk.status not in provider_batches.ENDED:
            with contextlib.suppress(openai.APIError):  # not to be paid for twice
                await self.api.cancel(chunk.provider_batch)
        error = LLMError(JobErrorCode.PROVIDER_ERROR, reason, retryable=True)
        for group in _groups(await economy_store.job_ids(self.redis, chunk.id)):
            await self.jobs.settle(chunk.id, [Answer(job_id, error=error) for job_id in group])
        for file_id in (chunk.input_file, chunk.output_file, chunk.error_file):
            if file_id:
                with contextlib.suppress(openai.APIError):
                    await self.api.delete_file(file_id)
        await economy_store.advance(self.redis, chunk.id, chunk.state, ChunkState.DONE, status="failed")


def batch_api(redis: Redis, settings: Settings, provider: Provider) -> BatchAPI:
    """The Batch API of the configured provider: OpenAI's (or a compatible one), or the
    offline twin. No SDK retries: a create retried blindly could make a provider batch twice
    (the next pass tries again, and adopts what the first made)."""
    if isinstance(provider, OfflineProvider):
        return OfflineBatches(redis, provider, delay_s=settings.offline_batch_delay_ms / 1000)
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    client = AsyncOpenAI(api_key=key, base_url=settings.openai_base_url, timeout=settings.llm_timeout_s, max_retries=0)
    return OpenAIBatches(client, model=provider.model)


def start_in_thread(target: RedisTarget, settings: Settings, provider: Provider) -> Callable[[], None]:
    """The worker process's economy loop; returns what stops it."""
    queues = queueing.llm_queues(settings, sync_client(target))
    model, endpoint = provider.model, provider.endpoint
    return outbox.start_in_thread(
        lambda redis: Economy(redis, batch_api(redis, settings, provider), queues, settings, model=model,
                              endpoint=endpoint),
        target, name="economy",
    )  # fmt: skip
