"""The REST baseline: the lesson's design (FastAPI, a synchronous endpoint calling RQ's
`Queue.enqueue`), kept as the lesson wrote it so submitText is compared with it fairly.

    REDIS_URL=... uvicorn bench.rest_baseline:app
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from pydantic import BaseModel, Field
from redis import Redis
from rq import Queue

redis_conn = Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
queue = Queue(os.environ.get("RQ_QUEUE", "llm-rest"), connection=redis_conn)

app = FastAPI(title="LLM Workflow API (lesson baseline)")


class LLMInput(BaseModel):
    text: str = Field(..., min_length=1)


class SubmitResponse(BaseModel):
    job_id: str


def process_text_to_structured(user_text: str) -> None:  # never run: no worker in the benchmark
    raise NotImplementedError


@app.post("/llm/submit", response_model=SubmitResponse)
def submit_job(payload: LLMInput) -> SubmitResponse:
    job = queue.enqueue(process_text_to_structured, payload.text, job_timeout=180)
    return SubmitResponse(job_id=job.id)
