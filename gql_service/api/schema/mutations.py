"""The mutations: submitting texts, cancelling, and batches."""

from __future__ import annotations

from typing import Annotated, Any

import strawberry
from strawberry.types import Info

from gql_service.api.errors import BadUserInput, ClientError
from gql_service.api.jobs import NewJob
from gql_service.api.schema.context import caller
from gql_service.api.schema.queries import MAX_BATCH
from gql_service.api.schema.types import Batch, CreateBatchInput, Job, SubmitTextInput, SubmitTextPayload
from gql_service.models import BatchMode, JobPriority


async def _raise(error: Exception) -> None:
    raise error


def in_batch(asked: JobPriority, batch: JobPriority | None) -> JobPriority:
    """An item's priority: its own outside a batch; in one, the batch's. An item that asks for
    another one than NORMAL (the default, which takes the batch's) is refused, not overruled."""
    if batch is None or asked in (batch, JobPriority.NORMAL):
        return batch or asked
    raise BadUserInput(f"the batch's jobs have its priority, {batch.value}: leave priority out, or give {batch.value}")


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Queue text for extraction; returns at once with the new (or deduplicated) job.")
    async def submit_text(self, info: Info, input: SubmitTextInput) -> SubmitTextPayload:
        ctx = caller(info)
        record, deduplicated = await ctx.jobs.submit(
            input.text, idempotency_key=input.idempotency_key, tenant=ctx.tenant, request_id=ctx.request_id,
            webhook_url=input.webhook_url, priority=input.priority,
        )  # fmt: skip
        return SubmitTextPayload(job=Job.from_record(record), deduplicated=deduplicated)

    @strawberry.mutation(
        description=f"Queue up to {MAX_BATCH} texts in one round trip. A bad item is null in the answer, "
        "with a BAD_USER_INPUT error at its index; the good items are still submitted."
    )
    async def submit_texts(
        self,
        info: Info,
        inputs: list[SubmitTextInput],
        batch_id: Annotated[
            strawberry.ID | None,
            strawberry.argument(description="Add the jobs to this open batch (createBatch); any number of calls."),
        ] = None,
    ) -> list[SubmitTextPayload | None]:
        ctx = caller(info)
        if len(inputs) > MAX_BATCH:
            raise BadUserInput(f"at most {MAX_BATCH} inputs per call, got {len(inputs)}")
        batch = str(batch_id) if batch_id is not None else None
        # A batch's jobs have the batch's priority (and mode); without a batch, each item's own.
        in_batch_of = await ctx.batches.check_owned(batch, tenant=ctx.tenant) if batch else None
        batch_priority = in_batch_of.priority if in_batch_of else None
        economy = in_batch_of is not None and in_batch_of.mode is BatchMode.ECONOMY
        accepted: list[tuple[int, NewJob]] = []
        errors: dict[int, ClientError] = {}
        refused = await ctx.jobs.refused_webhooks({i.webhook_url for i in inputs if i.webhook_url is not None})
        for index, item in enumerate(inputs):
            try:
                if item.webhook_url in refused:
                    raise refused[item.webhook_url]
                job = ctx.jobs.new_job(
                    item.text, idempotency_key=item.idempotency_key, tenant=ctx.tenant, request_id=ctx.request_id,
                    webhook_url=item.webhook_url, batch_id=batch, one_of_many=True,
                    priority=in_batch(item.priority, batch_priority),
                )  # fmt: skip
                accepted.append((index, job))
            except BadUserInput as exc:
                errors[index] = BadUserInput(f"inputs[{index}]: {exc.message}", index=index)
        news = [job for _, job in accepted]
        submitted = await ctx.jobs.submit_many(news, batch_id=batch, economy=economy) if accepted else []
        answers: list[Any] = [None] * len(inputs)
        for (index, _), outcome in zip(accepted, submitted, strict=True):
            if isinstance(outcome, ClientError):
                errors[index] = type(outcome)(f"inputs[{index}]: {outcome.message}", index=index)
            else:
                answers[index] = SubmitTextPayload(job=Job.from_record(outcome[0]), deduplicated=outcome[1])
        for index, error in errors.items():
            answers[index] = _raise(error)  # graphql-core places the error at [submitTexts, index]
        return answers

    @strawberry.mutation(
        description="Cancel a queued or running job; it becomes CANCELED and never turns DONE later. "
        "Cancelling a finished or failed job is a BAD_USER_INPUT error; cancelling a canceled one returns it."
    )
    async def cancel_job(self, info: Info, id: strawberry.ID) -> Job:
        ctx = caller(info)
        return Job.from_record(await ctx.jobs.cancel(str(id), tenant=ctx.tenant))

    @strawberry.mutation(description="A new, open batch: add jobs with submitTexts(batchId:), then closeBatch.")
    async def create_batch(self, info: Info, input: CreateBatchInput) -> Batch:
        ctx = caller(info)
        record, _ = await ctx.batches.create(
            name=input.name,
            metadata=input.metadata,  # type: ignore[arg-type]  # the JSON scalar; create() checks it is an object
            idempotency_key=input.idempotency_key,
            tenant=ctx.tenant,
            priority=input.priority,
            mode=input.mode,
        )
        return Batch.from_record(record)

    @strawberry.mutation(
        description="No more jobs for this batch: it is RUNNING until every job has ended, then COMPLETED. "
        "Closing a closed batch returns it."
    )
    async def close_batch(self, info: Info, id: strawberry.ID) -> Batch:
        ctx = caller(info)
        return Batch.from_record(await ctx.batches.close(str(id), tenant=ctx.tenant))

    @strawberry.mutation(description="Close the batch and cancel every job of it that has not ended.")
    async def cancel_batch(self, info: Info, id: strawberry.ID) -> Batch:
        ctx = caller(info)
        return Batch.from_record(await ctx.batches.cancel(str(id), tenant=ctx.tenant))
