from enum import Enum


class BatchStatus(str, Enum):
    OPEN = "OPEN"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"


class JobErrorCode(str, Enum):
    INVALID_OUTPUT = "INVALID_OUTPUT"
    REFUSED = "REFUSED"
    TRUNCATED = "TRUNCATED"
    TIMEOUT = "TIMEOUT"
    RATE_LIMITED = "RATE_LIMITED"
    PROVIDER_ERROR = "PROVIDER_ERROR"
    PROVIDER_AUTH = "PROVIDER_AUTH"
    WORKER_LOST = "WORKER_LOST"
    CANCELED = "CANCELED"
    INTERNAL = "INTERNAL"


class JobPriority(str, Enum):
    HIGH = "HIGH"
    NORMAL = "NORMAL"
    LOW = "LOW"


class JobStage(str, Enum):
    QUEUED = "QUEUED"
    CALLING_LLM = "CALLING_LLM"
    VALIDATING = "VALIDATING"
    REPAIRING = "REPAIRING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


class JobStatus(str, Enum):
    QUEUED = "QUEUED"
    STARTED = "STARTED"
    RETRYING = "RETRYING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


class Sentiment(str, Enum):
    POSITIVE = "POSITIVE"
    NEUTRAL = "NEUTRAL"
    NEGATIVE = "NEGATIVE"


class WebhookStatus(str, Enum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    RETRYING = "RETRYING"
    FAILED = "FAILED"
