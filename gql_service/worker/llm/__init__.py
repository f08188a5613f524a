"""LLM providers behind one small interface (DESIGN decision 5)."""

from gql_service.worker.llm.base import Completion, FallsBackToJsonMode, LLMError, OnText, Provider, Repair

__all__ = ["Completion", "FallsBackToJsonMode", "LLMError", "OnText", "Provider", "Repair"]
