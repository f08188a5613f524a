"""GraphQL errors a client can act on, each with `extensions.code`."""

from __future__ import annotations

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
