"""An ECONOMY batch's jobs going into and out of their chunk (gql_service.worker.economy):
into stage PROVIDER_BATCH once the provider has them, and out once it has answered, each job
once: to its RQ queue with the provider's answer beside it (the attempt validates it), or
to be asked interactively, or FAILED. A job's way out is written with a guard
(keys.economy_handed) in the same step, so a file read again hands nothing over twice."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from gql_service import keys, queueing, redis_conn, store
from gql_service.models import JobError, JobRecord, JobStage, JobStatus, utcnow
from gql_service.settings import Settings
from gql_service.worker.job_ends import fail_job, transition
from gql_service.worker.llm import provider_batches
from gql_service.worker.llm.base import Completion, LLMError
from gql_service.worker.llm.provider_batches import Answer

# Where a job waits for its chunk: PROVIDER_BATCH; or still QUEUED when the provider refused
# the batch itself, or when a worker died between a job's way back and its queueing.
_IN_CHUNK = (JobStage.PROVIDER_BATCH, JobStage.QUEUED)


class ChunkJobs:
    def __init__(self, redis: Redis, queues: queueing.Queues, settings: Settings) -> None:
        self.redis = redis
        self.queues = queues
        self.settings = settings
        self.ttl_s = settings.result_ttl_s

    async def sent(self, job_ids: list[str]) -> None:
        """The jobs are at the provider: stage PROVIDER_BATCH (status STARTED, counted running)."""

        def sent(job: JobRecord) -> JobRecord | None:
            if job.stage is not JobStage.QUEUED:
                return None  # moved already (by a worker that died after), or canceled
            return job.model_copy(update={"status": JobStatus.STARTED, "stage": JobStage.PROVIDER_BATCH,
                                          "started_at": job.started_at or utcnow()})  # fmt: skip

        await asyncio.gather(*(self._write(job_id, sent) for job_id in job_ids))

    async def settle(self, chunk_id: str, answers: list[Answer]) -> None:
        """Hand over each answer whose job is the chunk's, still waits for it, and was not
        handed over before (a line named twice, or a file read again)."""
        if not answers:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for answer in answers:
                pipe.hget(keys.job(answer.job_id), "d")
                pipe.exists(keys.economy_handed(answer.job_id))
                pipe.sismember(keys.economy_chunk_jobs(chunk_id), answer.job_id)
            found = await pipe.execute()
        pending = []
        for n, answer in enumerate(answers):
            raw, handed, member = found[3 * n : 3 * n + 3]
            record = store.decode(raw) if raw is not None and not handed and member else None
            # In PROVIDER_BATCH; or still QUEUED, when the provider refused the batch itself.
            if record is not None and record.stage in _IN_CHUNK and not record.terminal:
                if answer.completion is not None:
                    pending.append(self._hand_over(record, answer.completion))
                else:
                    assert answer.error is not None
                    pending.append(self._fall_back(record, answer.error))
        await asyncio.gather(*pending)

    async def _hand_over(self, record: JobRecord, completion: Completion) -> None:
        """The answer beside the job, and the job on its RQ queue: in one step, once."""
        guard = keys.economy_handed(record.id)
        await queueing.prime(self.queues, self.redis)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.multi()  # RQ's enqueue starts one itself unless it is in one already
            pipe.set(guard, 1, ex=self.ttl_s)
            pipe.hset(keys.job(record.id), keys.ANSWER_FIELD, provider_batches.answer_to_store(completion))
            queueing.enqueue_extraction(self.queues, record, pipe, self.settings)
            await redis_conn.run_once(self.redis, pipe, guard)

    async def _fall_back(self, record: JobRecord, error: LLMError) -> None:
        """A request the provider's batch did not answer: queued again for the interactive
        path, or FAILED (ECONOMY_FALLBACK=fail, or an error another try cannot fix)."""
        if self.settings.economy_fallback == "fail" or not error.retryable:
            bound, ack = self.settings.outbox_max_len, self.settings.replica_ack
            ended = JobError(code=error.code, message=error.message)
            await fail_job(self.redis, record.id, ended, ttl_s=self.ttl_s, outbox_max_len=bound, ack=ack)
            return
        message = f"{error.message}; queued for an interactive call"
        job_error = JobError(code=error.code, message=message, retryable=True)

        def back(job: JobRecord) -> JobRecord | None:
            if job.stage is not JobStage.PROVIDER_BATCH:
                return None
            return job.model_copy(update={"status": JobStatus.RETRYING, "stage": JobStage.QUEUED, "error": job_error})

        if record.stage is JobStage.PROVIDER_BATCH:
            # Written before it is queued: a worker that takes it at once must not find it
            # still in PROVIDER_BATCH. (Killed in between: the next worker to read the chunk's
            # answers finds it QUEUED, not handed over, and queues it.)
            done = await self._write(record.id, back)
            if not done.changed or done.record is None:
                return
            record = done.record
        guard = keys.economy_handed(record.id)
        await queueing.prime(self.queues, self.redis)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.multi()
            pipe.set(guard, 1, ex=self.ttl_s)
            queueing.enqueue_extraction(self.queues, record, pipe, self.settings)
            await redis_conn.run_once(self.redis, pipe, guard)

    async def _write(self, job_id: str, change: store.Change) -> store.Transition:
        settings = self.settings
        return await transition(self.redis, job_id, change, ttl_s=self.ttl_s, outbox_max_len=settings.outbox_max_len,
                                ack=settings.replica_ack)  # fmt: skip
