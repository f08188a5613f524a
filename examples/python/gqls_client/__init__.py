from .async_base_client import AsyncBaseClient
from .base_model import BaseModel, Upload
from .client import Client
from .enums import (
    BatchMode,
    BatchStatus,
    JobErrorCode,
    JobPriority,
    JobStage,
    JobStatus,
    Sentiment,
    WebhookStatus,
)
from .exceptions import (
    GraphQLClientError,
    GraphQLClientGraphQLError,
    GraphQLClientGraphQLMultiError,
    GraphQLClientHttpError,
    GraphQLClientInvalidResponseError,
)
from .get_job import GetJob, GetJobJob
from .input_types import CreateBatchInput, SubmitTextInput
from .job_updates import (
    JobUpdates,
    JobUpdatesJobUpdates,
    JobUpdatesJobUpdatesError,
    JobUpdatesJobUpdatesPartial,
    JobUpdatesJobUpdatesResult,
    JobUpdatesJobUpdatesResultEntities,
)
from .submit_text import SubmitText, SubmitTextSubmitText, SubmitTextSubmitTextJob

__all__ = [
    "AsyncBaseClient",
    "BaseModel",
    "BatchMode",
    "BatchStatus",
    "Client",
    "CreateBatchInput",
    "GetJob",
    "GetJobJob",
    "GraphQLClientError",
    "GraphQLClientGraphQLError",
    "GraphQLClientGraphQLMultiError",
    "GraphQLClientHttpError",
    "GraphQLClientInvalidResponseError",
    "JobErrorCode",
    "JobPriority",
    "JobStage",
    "JobStatus",
    "JobUpdates",
    "JobUpdatesJobUpdates",
    "JobUpdatesJobUpdatesError",
    "JobUpdatesJobUpdatesPartial",
    "JobUpdatesJobUpdatesResult",
    "JobUpdatesJobUpdatesResultEntities",
    "Sentiment",
    "SubmitText",
    "SubmitTextInput",
    "SubmitTextSubmitText",
    "SubmitTextSubmitTextJob",
    "Upload",
    "WebhookStatus",
]
