"""The offline provider's Batch API: the ECONOMY flow with no key and no network, so `dev`,
the console and the CLI show it as it runs against a provider.

It keeps what a provider keeps in Redis (any worker may poll a batch another made): an
uploaded file is a list of its lines, a batch a hash. A batch is `in_progress` for
OFFLINE_BATCH_DELAY_MS, its `completed` count rising with the time gone, then `completed`;
its output file is its input file read again, each request answered by the offline provider
as it is read, so nothing is computed until it is asked for and nothing large is stored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from openai.types import Batch
from redis.asyncio import Redis

from gql_service import keys
from gql_service.worker.llm import prompt, provider_batches
from gql_service.worker.llm.offline import OfflineProvider
from gql_service.worker.llm.provider_batches import Answer

OUTPUT_PREFIX = "offline-output-"  # an output file's id: this, then its input file's
PAGE = 500  # lines read per round trip
TTL_S = 2 * 24 * 3600  # as a provider keeps a batch's files: longer than its 24 h window


class OfflineBatches:
    """`BatchAPI` (gql_service.worker.llm.provider_batches) answered by the offline provider."""

    def __init__(self, redis: Redis, provider: OfflineProvider, *, delay_s: float) -> None:
        self.redis = redis
        self.provider = provider
        self.delay_s = delay_s

    async def upload(self, lines: AsyncIterable[bytes], *, name: str) -> str | None:
        file_id = f"offline-file-{uuid.uuid4().hex}"
        key, page, count = keys.offline_batch_file(file_id), [], 0
        async for line in lines:
            page.append(line)
            if len(page) == PAGE:
                count += await self.redis.rpush(key, *page)
                page = []
        if page:
            count = await self.redis.rpush(key, *page)
        if not count:
            return None
        await self.redis.expire(key, TTL_S)
        return file_id

    async def create(self, input_file_id: str, *, tag: str) -> Batch:
        batch_id = f"offline-batch-{uuid.uuid4().hex}"
        total = await self.redis.llen(keys.offline_batch_file(input_file_id))
        fields = {"input": input_file_id, "created": time.time(), "total": total, "tag": tag, "status": "in_progress"}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.offline_batch(batch_id), mapping=fields)  # type: ignore[arg-type]
            pipe.expire(keys.offline_batch(batch_id), TTL_S)
            pipe.hset(keys.OFFLINE_BATCH_TAGS, tag, batch_id)
            await pipe.execute()
        return await self.retrieve(batch_id)

    async def find(self, tag: str, *, since: float) -> Batch | None:
        found: Any = await self.redis.hget(keys.OFFLINE_BATCH_TAGS, tag)
        return await self.retrieve(found.decode()) if found else None

    async def retrieve(self, batch_id: str) -> Batch:
        found: Any = await self.redis.hgetall(keys.offline_batch(batch_id))
        f = {k.decode(): v.decode() for k, v in found.items()}
        created, total = float(f["created"]), int(f["total"])
        share = min(1.0, (time.time() - created) / self.delay_s) if self.delay_s else 1.0
        status = f["status"]
        if status == "in_progress" and share >= 1.0:
            status = "completed"
        done = status == "completed"
        return Batch.model_validate({
            "id": batch_id, "object": "batch", "endpoint": provider_batches.ENDPOINT, "completion_window": "24h",
            "input_file_id": f["input"], "created_at": int(created), "status": status,
            "metadata": {provider_batches.TAG: f["tag"]},
            "output_file_id": OUTPUT_PREFIX + f["input"] if done else None,
            "request_counts": {"total": total, "completed": total if done else int(total * share), "failed": 0},
        })  # fmt: skip

    async def cancel(self, batch_id: str) -> None:
        # Cancelled with nothing answered: its jobs are canceled already.
        await self.redis.hset(keys.offline_batch(batch_id), "status", "cancelled")

    async def answers(self, file_id: str) -> AsyncIterator[Answer]:
        key = keys.offline_batch_file(file_id.removeprefix(OUTPUT_PREFIX))
        start = 0
        while lines := await self.redis.lrange(key, start, start + PAGE - 1):
            for line in lines:
                request = json.loads(line)
                text = prompt.unfence(request["body"]["messages"][-1]["content"])
                yield Answer(request["custom_id"], completion=await self.provider.extract(text))
            start += len(lines)

    async def delete_file(self, file_id: str) -> None:
        if not file_id.startswith(OUTPUT_PREFIX):  # an output file is its input, read again
            await self.redis.delete(keys.offline_batch_file(file_id))

    async def close(self) -> None:
        pass  # the Redis client is the loop's
