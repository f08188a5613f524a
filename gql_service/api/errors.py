"""GraphQL errors a client can act on, each with `extensions.code`, and the HTTP request
errors answered in the same shape."""

from __future__ import annotations

from cross_web import HTTPException
from graphql import GraphQLError


class ClientError(GraphQLError):
    code = "INTERNAL_SERVER_ERROR"

    def __init__(self, message: str, **extensions: object) -> None:
        super().__init__(message, extensions={"code": self.code, **extensions})


class BadUserInput(ClientError):
    code = "BAD_USER_INPUT"


class NotFound(ClientError):
    code = "NOT_FOUND"


class Unauthenticated(ClientError):
    code = "UNAUTHENTICATED"


class ServiceUnavailable(ClientError):
    code = "SERVICE_UNAVAILABLE"


class RateLimited(ClientError):
    code = "RATE_LIMITED"


class IdempotencyKeyReused(ClientError):
    """An idempotency key given again with a different request (Stripe's and the IETF
    Idempotency-Key draft's rule): refused, never silently answered with the first job."""

    code = "IDEMPOTENCY_KEY_REUSED"


class QuotaExceeded(ClientError):
    """The tenant's budget (TENANT_BUDGETS) is spent: nothing new until it resets. The
    extensions say which budget (`budget`) and when (`resetsAt`)."""

    code = "QUOTA_EXCEEDED"


class RequestError(HTTPException):
    """A request that never reaches execution, answered with a GraphQL-shaped JSON error
    (by the view's `request_error_response`)."""

    def __init__(
        self, status_code: int, reason: str, *, code: str = "BAD_REQUEST", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code, reason)
        self.code = code
        self.headers = headers or {}
