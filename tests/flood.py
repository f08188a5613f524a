"""A parked job whose newer versions are published without pause: its subscribers are always
being sent something, so a client that goes, goes mid-send."""

from __future__ import annotations

import threading
import uuid
from types import TracebackType

from redis import Redis

from gql_service import keys, store
from gql_service.models import JobRecord, JobStatus


class Flood:
    def __init__(self, redis_url: str, *, tenant: str = "public") -> None:
        self.redis = Redis.from_url(redis_url)
        self.record = JobRecord(id=f"flooded-{uuid.uuid4().hex}", tenant=tenant)
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._publish, name="flood", daemon=True)

    @property
    def job_id(self) -> str:
        return self.record.id

    def __enter__(self) -> Flood:
        with self.redis.pipeline() as pipe:
            store.create_job(pipe, self.record, text="flooded", ttl_s=600)
            pipe.execute()
        self._thread.start()
        return self

    def _publish(self) -> None:
        channel, version = keys.job_events(self.record.id), 1
        while not self._stop.is_set():
            with self.redis.pipeline(transaction=False) as pipe:
                for _ in range(20):
                    version += 1
                    newer = self.record.model_copy(update={"version": version, "status": JobStatus.STARTED})
                    pipe.publish(channel, store.encode(newer))
                pipe.execute()
            self.published = version - 1
            self._stop.wait(0.005)  # pacing: a few thousand versions a second, not a synchronisation

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(10)
        self.redis.close()
