"""What every resolver knows of its request: the job service, the caller's tenant, loaders."""

from __future__ import annotations

from dataclasses import dataclass, field

from strawberry.dataloader import DataLoader
from strawberry.types import Info

from gql_service import models
from gql_service.api.batches import BatchService
from gql_service.api.errors import Unauthenticated
from gql_service.api.jobs import JobService


@dataclass
class Context:
    jobs: JobService
    tenant: str | None = "public"
    request_id: str | None = None
    connection_params: object = None  # a websocket's connection_init payload
    own_page: bool = False  # a websocket opened by this service's own page (documents.own_page)
    # A page of jobs asking for `webhook` reads every delivery in one round trip. Not cached:
    # a websocket's context lives as long as its connection, and deliveries change.
    deliveries: DataLoader[str, models.WebhookDelivery | None] = field(init=False)
    batches: BatchService = field(init=False)

    def __post_init__(self) -> None:
        self.deliveries = DataLoader(self.jobs.deliveries, cache=False)
        self.batches = BatchService(self.jobs)


@dataclass(frozen=True)
class Caller:
    jobs: JobService
    batches: BatchService
    tenant: str
    request_id: str | None
    deliveries: DataLoader[str, models.WebhookDelivery | None]


def caller(info: Info) -> Caller:
    ctx = info.context
    assert isinstance(ctx, Context)
    if ctx.tenant is None:
        raise Unauthenticated("a valid API key is required")
    return Caller(
        jobs=ctx.jobs, batches=ctx.batches, tenant=ctx.tenant, request_id=ctx.request_id, deliveries=ctx.deliveries
    )
