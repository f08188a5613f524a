"""What a job cost: its token usage at the prices of the model that answered (LLM_PRICES).

Prices are per million tokens, as providers publish them. A model is priced by its exact
name, or else by the longest priced name it extends with a dash: providers answer with a
dated snapshot (`gpt-4o-mini-2024-07-18`) of the model that was asked for (`gpt-4o-mini`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from gql_service.models import TokenUsage

MTOK = 1_000_000


class Price(BaseModel):
    """One model's prices in USD per million tokens (`LLM_PRICES` entries)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    input_per_mtok: float = Field(ge=0, alias="inputPerMTok")
    output_per_mtok: float = Field(ge=0, alias="outputPerMTok")
    # Prompt tokens the provider served from its cache (OpenAI's `cached_tokens`), when they
    # are cheaper; unset: they cost as much as any input.
    cached_input_per_mtok: float | None = Field(None, ge=0, alias="cachedInputPerMTok")


def price_of(prices: dict[str, Price] | None, model: str | None) -> Price | None:
    if not prices or not model:
        return None
    if model in prices:
        return prices[model]
    extended = [name for name in prices if model.startswith(f"{name}-")]
    return prices[max(extended, key=len)] if extended else None


def cost_usd(usage: TokenUsage, price: Price) -> float:
    cached = min(usage.cached_tokens, usage.prompt_tokens) if price.cached_input_per_mtok is not None else 0
    return (
        (usage.prompt_tokens - cached) * price.input_per_mtok
        + cached * (price.cached_input_per_mtok or 0.0)
        + usage.completion_tokens * price.output_per_mtok
    ) / MTOK


def job_cost(
    prices: dict[str, Price] | None,
    model: str | None,
    usage: TokenUsage | None,
    *,
    batch_usage: TokenUsage | None = None,
    batch_discount: float = 1.0,
) -> float | None:
    """The cost of `usage` at `model`'s prices; None when the model has no price. The part of
    it a provider batch answered (`batch_usage`) costs `batch_discount` of the price."""
    price = price_of(prices, model)
    if price is None:
        return None
    full = cost_usd(usage or TokenUsage(), price)
    return full if batch_usage is None else full - (1 - batch_discount) * cost_usd(batch_usage, price)
