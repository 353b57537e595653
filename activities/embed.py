"""The ``llm_embed`` activity: resolve an embedding model through the registry and call it, once.

Like ``llm_chat``: Temporal owns retries and kernel errors leave as ``ApplicationError`` through
``activities.errors``.
"""

from __future__ import annotations

import structlog
from pydantic import BaseModel, Field
from temporalio import activity

from activities.errors import to_application_error
from activities.live import LiveProviders, heartbeating
from kernel.contracts import EmbedRequest, EmbedResponse
from kernel.errors import KernelflowError
from kernel.pricing import PriceTable
from kernel.registry import Registry
from kernel.routing import Permit

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
    """Reads the worker's live providers at each call, like ``llm_chat``: a config reload reaches
    embeddings too, and the same circuit breakers guard them."""

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        prices: PriceTable | None = None,
        live: LiveProviders | None = None,
    ) -> None:
        if live is None:
            if registry is None:
                raise ValueError("EmbedActivities needs a registry or live providers")
            live = LiveProviders(registry, prices=prices)
        self.live = live

    @activity.defn(name=LLM_EMBED)
    async def embed(self, call: EmbedCallInput) -> EmbedCallResult:
        registry, prices, breakers = self.live.registry, self.live.prices, self.live.breakers
        permit: Permit | None = None
        try:
            provider, model_name = registry.resolve(call.model)
            if breakers is not None:
                permit = breakers.admit(provider.name, model_name)
            response = await heartbeating(
                provider.embed(call.request.model_copy(update={"model": model_name}))
            )
        except KernelflowError as exc:
            if breakers is not None:
                breakers.settle(permit, exc)
            _log.warning("embed call failed", step=call.step_id, model=call.model, error=str(exc))
            raise to_application_error(exc) from exc
        except BaseException as exc:
            if breakers is not None:
                breakers.settle(permit, exc)
            raise
        if breakers is not None:
            breakers.settle(permit, None)
        return EmbedCallResult(
            response=response,
            model_ref=f"{provider.name}/{model_name}",
            provider=provider.name,
            cost_usd=prices.cost(provider.name, model_name, response.usage),
        )
