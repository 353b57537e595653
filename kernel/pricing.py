"""Prices per million tokens, and the cost of a call computed from normalised usage.

Cached prompt tokens are billed at the cached-input rate, tokens written to a prompt cache at the
cache-write rate (Anthropic charges more than the input rate for them), the rest of the prompt at the
input rate; reasoning tokens are part of the completion and billed at the output rate. The default
prices come from the model catalog (``kernel/catalog.py``), each with its source. A model with no known
price has cost ``None`` (unknown), never 0. Prices are list prices in USD and can be overridden from
worker configuration (``PriceTable.with_overrides``), which is the way to price a private deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kernel.catalog import default_catalog
from kernel.contracts import Usage

__all__ = ["BATCH_DISCOUNTS", "DEFAULT_PRICES", "Price", "PriceTable"]


class Price(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0, description="USD per million uncached prompt tokens")
    output: float = Field(ge=0, description="USD per million completion tokens (reasoning included)")
    cached_input: float | None = Field(default=None, ge=0, description="USD per million cached tokens")
    cache_write_input: float | None = Field(
        default=None, ge=0, description="USD per million tokens written to the prompt cache"
    )

    def cost(self, usage: Usage) -> float:
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        write_rate = self.input if self.cache_write_input is None else self.cache_write_input
        total = (
            (usage.prompt_tokens - cached - written) * self.input
            + cached * cached_rate
            + written * write_rate
            + usage.completion_tokens * self.output
        )
        return round(total / 1_000_000, 10)


def _catalog_prices() -> dict[str, dict[str, Price]]:
    prices: dict[str, dict[str, Price]] = {}
    catalog = default_catalog()
    for vendor in catalog.vendors():
        for facts in catalog.models(vendor):
            if facts.price is not None:
                prices.setdefault(vendor, {})[facts.name] = Price.model_validate(facts.price.model_dump())
    return prices


DEFAULT_PRICES: dict[str, dict[str, Price]] = _catalog_prices()
"""The list prices of the model catalog (``kernel/models.yaml``), by provider and model."""


BATCH_DISCOUNTS: dict[str, tuple[float, str]] = {
    "openai": (0.5, "https://platform.openai.com/docs/guides/batch"),
    "anthropic": (0.5, "https://docs.anthropic.com/en/docs/build-with-claude/batch-processing#pricing"),
    "gemini": (0.5, "https://ai.google.dev/gemini-api/docs/batch-mode"),
    "bedrock": (0.5, "https://aws.amazon.com/bedrock/pricing/"),
}
"""What a provider's batch API charges, as a share of its realtime list price, with the source."""


class PriceTable:
    """Looks a model up by exact name, then by the longest known prefix followed by ``-`` (so dated
    snapshots such as ``gpt-4o-2024-08-06`` price as ``gpt-4o``, and ``gpt-4o-mini`` stays itself)."""

    def __init__(self, prices: Mapping[str, Mapping[str, Price]] | None = None) -> None:
        source = DEFAULT_PRICES if prices is None else prices
        self._prices: dict[str, dict[str, Price]] = {p: dict(m) for p, m in source.items()}
        self._free_providers: set[str] = {"ollama", "sim-local"}
        self._found: dict[tuple[str, str], Price | None] = {}  # lookups made since the last change

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> PriceTable:
        """A copy with ``{"provider": {"model": {"input": .., "output": .., "cached_input": ..}}}`` applied."""
        table = PriceTable(self._prices)
        table._free_providers = set(self._free_providers)
        for provider, models in overrides.items():
            for model, price in models.items():
                table._prices.setdefault(provider, {})[model] = (
                    price if isinstance(price, Price) else Price.model_validate(price)
                )
        table._found.clear()
        return table

    def lookup(self, provider: str, model: str) -> Price | None:
        key = (provider, model)
        try:
            return self._found[key]
        except KeyError:
            pass
        if len(self._found) >= 4096:
            self._found.clear()  # model names come from requests: keep the memory bounded
        found = self._found[key] = self._find(provider, model)
        return found

    def _find(self, provider: str, model: str) -> Price | None:
        models = self._prices.get(provider)
        if models:
            exact = models.get(model)
            if exact is not None:
                return exact
            base = model.rsplit("/", 1)[-1]
            if provider == "bedrock" and base.count(".") >= 2:
                base = base.split(".", 1)[1]  # a cross-region inference profile: us.anthropic.claude-...
            best: str | None = None
            for known in models:
                # A Bedrock model id ends in a version: amazon.nova-lite-v1:0 is amazon.nova-lite-v1.
                if (base == known or base.startswith((known + "-", known + ":"))) and (
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

    def batch_cost(self, provider: str, model: str, usage: Usage) -> float | None:
        """The cost of ``usage`` answered through the provider's batch API (``BATCH_DISCOUNTS``);
        ``None`` when the price is unknown or the provider sells no batches."""
        realtime = self.cost(provider, model, usage)
        discount = BATCH_DISCOUNTS.get(provider)
        if realtime is None or discount is None:
            return None
        return round(realtime * discount[0], 10)
