"""LLM providers behind one small interface (DESIGN decision 5)."""

from .base import Completion, LLMError, Provider, Repair

__all__ = ["Completion", "LLMError", "Provider", "Repair"]
