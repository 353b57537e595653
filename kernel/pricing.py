"""Prices per million tokens, and the cost of a call computed from normalised usage.

Cached prompt tokens are billed at the cached-input rate, the rest of the prompt at the input rate;
reasoning tokens are part of the completion and billed at the output rate. A model with no known
price has cost ``None`` (unknown), never 0. Prices are list prices in USD and can be overridden from
worker configuration (``PriceTable.with_overrides``), which is the way to price a private deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kernel.contracts import Usage

__all__ = ["DEFAULT_PRICES", "Price", "PriceTable"]


class Price(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0, description="USD per million uncached prompt tokens")
    output: float = Field(ge=0, description="USD per million completion tokens (reasoning included)")
    cached_input: float | None = Field(default=None, ge=0, description="USD per million cached tokens")

    def cost(self, usage: Usage) -> float:
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        total = (
            (usage.prompt_tokens - cached) * self.input
            + cached * cached_rate
            + usage.completion_tokens * self.output
        )
        return round(total / 1_000_000, 10)


def _p(input: float, output: float, cached: float | None = None) -> Price:
    return Price(input=input, output=output, cached_input=cached)


DEFAULT_PRICES: dict[str, dict[str, Price]] = {
    "openai": {
        "gpt-5": _p(1.25, 10.00, 0.125),
        "gpt-5-mini": _p(0.25, 2.00, 0.025),
        "gpt-5-nano": _p(0.05, 0.40, 0.005),
        "gpt-4.1": _p(2.00, 8.00, 0.50),
        "gpt-4.1-mini": _p(0.40, 1.60, 0.10),
        "gpt-4.1-nano": _p(0.10, 0.40, 0.025),
        "gpt-4o": _p(2.50, 10.00, 1.25),
        "gpt-4o-mini": _p(0.15, 0.60, 0.075),
        "o3": _p(2.00, 8.00, 0.50),
        "o3-mini": _p(1.10, 4.40, 0.55),
        "o4-mini": _p(1.10, 4.40, 0.275),
        "text-embedding-3-small": _p(0.02, 0.0),
        "text-embedding-3-large": _p(0.13, 0.0),
    },
    "anthropic": {
        "claude-opus-4-1": _p(15.00, 75.00, 1.50),
        "claude-sonnet-4-5": _p(3.00, 15.00, 0.30),
        "claude-sonnet-4": _p(3.00, 15.00, 0.30),
        "claude-haiku-4-5": _p(1.00, 5.00, 0.10),
        "claude-3-5-haiku": _p(0.80, 4.00, 0.08),
    },
    "gemini": {
        "gemini-2.5-pro": _p(1.25, 10.00, 0.31),
        "gemini-2.5-flash": _p(0.30, 2.50, 0.075),
        "gemini-2.5-flash-lite": _p(0.10, 0.40, 0.025),
        "gemini-2.0-flash": _p(0.10, 0.40, 0.025),
        "text-embedding-004": _p(0.0, 0.0),
    },
    "mistral": {
        "mistral-large-latest": _p(2.00, 6.00),
        "mistral-medium-latest": _p(0.40, 2.00),
        "mistral-small-latest": _p(0.10, 0.30),
        "mistral-embed": _p(0.10, 0.0),
    },
    "deepseek": {
        "deepseek-chat": _p(0.27, 1.10, 0.07),
        "deepseek-reasoner": _p(0.55, 2.19, 0.14),
    },
    "groq": {
        "llama-3.3-70b-versatile": _p(0.59, 0.79),
        "llama-3.1-8b-instant": _p(0.05, 0.08),
    },
    "bedrock": {
        "anthropic.claude-sonnet-4-5": _p(3.00, 15.00, 0.30),
        "anthropic.claude-3-5-haiku": _p(0.80, 4.00, 0.08),
        "amazon.nova-pro-v1": _p(0.80, 3.20, 0.20),
        "amazon.nova-lite-v1": _p(0.06, 0.24, 0.015),
    },
}


class PriceTable:
    """Looks a model up by exact name, then by the longest known prefix followed by ``-`` (so dated
    snapshots such as ``gpt-4o-2024-08-06`` price as ``gpt-4o``, and ``gpt-4o-mini`` stays itself)."""

    def __init__(self, prices: Mapping[str, Mapping[str, Price]] | None = None) -> None:
        source = DEFAULT_PRICES if prices is None else prices
        self._prices: dict[str, dict[str, Price]] = {p: dict(m) for p, m in source.items()}
        self._free_providers: set[str] = {"ollama", "sim-local"}

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> PriceTable:
        """A copy with ``{"provider": {"model": {"input": .., "output": .., "cached_input": ..}}}`` applied."""
        table = PriceTable(self._prices)
        table._free_providers = set(self._free_providers)
        for provider, models in overrides.items():
            for model, price in models.items():
                table._prices.setdefault(provider, {})[model] = (
                    price if isinstance(price, Price) else Price.model_validate(price)
                )
        return table

    def lookup(self, provider: str, model: str) -> Price | None:
        models = self._prices.get(provider)
        if models:
            exact = models.get(model)
            if exact is not None:
                return exact
            base = model.rsplit("/", 1)[-1]
            best: str | None = None
            for known in models:
                if (base == known or base.startswith(known + "-")) and (
                    best is None or len(known) > len(best)
                ):
                    best = known
            if best is not None:
                return models[best]
        if provider in self._free_providers:
            return Price(input=0.0, output=0.0)
        return None

    def cost(self, provider: str, model: str, usage: Usage) -> float | None:
        price = self.lookup(provider, model)
        return None if price is None else price.cost(usage)
