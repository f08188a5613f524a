"""The provider interface and the errors a provider may raise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from gql_service.models import JobErrorCode, TokenUsage


@dataclass(frozen=True)
class Repair:
    """A second ask: what the model said last time and why it was rejected."""

    previous_output: str
    problem: str


@dataclass(frozen=True)
class Completion:
    content: str
    usage: TokenUsage
    model: str
    # What the endpoint said about the answer (for the chat span, gql_service.worker.job_spans).
    response_id: str | None = None
    finish_reasons: tuple[str, ...] = ()
    # The endpoint's rate headers said a budget is spent: seconds until it resets.
    spent_for_s: float | None = None


@dataclass
class LLMError(Exception):
    """A failed LLM call, already classified for the job record."""

    code: JobErrorCode
    message: str
    retryable: bool = False
    usage: TokenUsage = field(default_factory=TokenUsage)
    retry_after_s: float | None = None  # the endpoint said when to come back (429 Retry-After)

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


OnText = Callable[[str], None]


class Provider(Protocol):
    @property
    def model(self) -> str: ...

    @property
    def endpoint(self) -> str:
        """What shared limits and learnt capabilities belong to: the endpoint and the model."""
        ...

    async def extract(self, text: str, *, repair: Repair | None = None, on_text: OnText | None = None) -> Completion:
        """Ask for the extraction as JSON text. Raises LLMError. Never blocks the event loop:
        one worker process runs many of these at once. `on_text` gets each piece of the
        answer as it arrives, on the event loop (the pieces joined are the content)."""
        ...

    async def aclose(self) -> None:
        """Release what the provider holds for the running event loop (before it ends)."""
        ...


@runtime_checkable
class FallsBackToJsonMode(Protocol):
    """A provider that asks for strict JSON-schema output and falls back to JSON mode when
    its endpoint refuses it; the worker remembers the fallback across jobs and processes."""

    json_schema: bool
