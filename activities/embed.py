"""The ``llm_embed`` activity: resolve an embedding model through the registry and call it, once.

Like ``llm_chat``: Temporal owns retries and kernel errors leave as ``ApplicationError`` through
``activities.errors``.
"""

from __future__ import annotations

import structlog
from pydantic import BaseModel, Field
from temporalio import activity

from activities.errors import to_application_error
from kernel.contracts import EmbedRequest, EmbedResponse
from kernel.errors import KernelflowError
from kernel.pricing import PriceTable
from kernel.registry import Registry

__all__ = ["LLM_EMBED", "EmbedActivities", "EmbedCallInput", "EmbedCallResult"]

LLM_EMBED = "llm_embed"
"""The activity's name: public API, never renamed."""

_log = structlog.get_logger("kernelflow.activity")


class EmbedCallInput(BaseModel):
    model: str = Field(description="provider/model or a worker alias; request.model is replaced.")
    request: EmbedRequest
    step_id: str = ""
    pipeline: str = ""


class EmbedCallResult(BaseModel):
    response: EmbedResponse
    model_ref: str
    provider: str
    cost_usd: float | None = None


class EmbedActivities:
    def __init__(self, registry: Registry, *, prices: PriceTable | None = None) -> None:
        self.registry = registry
        self.prices = prices or PriceTable()

    @activity.defn(name=LLM_EMBED)
    async def embed(self, call: EmbedCallInput) -> EmbedCallResult:
        try:
            provider, model_name = self.registry.resolve(call.model)
            response = await provider.embed(call.request.model_copy(update={"model": model_name}))
        except KernelflowError as exc:
            _log.warning("embed call failed", step=call.step_id, model=call.model, error=str(exc))
            raise to_application_error(exc) from exc
        return EmbedCallResult(
            response=response,
            model_ref=f"{provider.name}/{model_name}",
            provider=provider.name,
            cost_usd=self.prices.cost(provider.name, model_name, response.usage),
        )
