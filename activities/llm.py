"""The ``llm_chat`` activity: resolve a model through the registry and call its provider, once.

Temporal owns retries: the provider never retries, and a kernel error leaves here as an
``ApplicationError`` that says whether Temporal may retry it and after how long. API keys are read by
the provider from the worker's environment or settings; they never enter inputs, results or history.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import structlog
from pydantic import BaseModel, Field
from temporalio import activity

from activities.errors import to_application_error
from activities.live import HEARTBEAT_EVERY, LiveProviders, heartbeating
from activities.streaming import DEFAULT_BATCH_INTERVAL, TokenPublisher
from kernel.contracts import ChatRequest, ChatResponse, StreamEvent, TextDelta, ToolCallDelta
from kernel.errors import KernelflowError, RateLimited
from kernel.limits import GRANT_AHEAD_S
from kernel.pricing import PriceTable
from kernel.provider import collect_stream
from kernel.registry import Registry
from kernel.routing import BreakerBoard, Permit

__all__ = ["LLM_CHAT", "CallObserver", "LlmActivities", "LlmCallInput", "LlmCallResult"]

LLM_CHAT = "llm_chat"
"""The activity's name: public API, never renamed."""

_T = TypeVar("_T")
_log = structlog.get_logger("kernelflow.activity")


class CallObserver(Protocol):
    def first_token(self, provider: str, model: str, seconds: float) -> None: ...


class LlmCallInput(BaseModel):
    """One model call. ``model`` is ``provider/model`` or a worker alias; ``request.model`` is ignored
    and replaced by the provider's own model name once resolved."""

    model: str
    request: ChatRequest
    step_id: str = ""
    pipeline: str = ""
    stream: bool = False
    not_before: float | None = Field(
        default=None,
        description="Admission granted ahead: the request is held until this instant (s since the epoch).",
    )


class LlmCallResult(BaseModel):
    response: ChatResponse
    model_ref: str = Field(description="The resolved provider/model that answered.")
    provider: str
    cost_usd: float | None = Field(description="None when the model's price is unknown.")
    latency_ms: float
    answered_at: float | None = Field(
        default=None,
        description="Worker wall clock (s since the epoch) when the answer was in: the provider had the "
        "request by then (admission control counts the call's window from it).",
    )


class LlmActivities:
    """Holds the worker's registry, prices and circuit breakers; its bound methods are the activities.
    ``registry`` and ``prices`` may be replaced while running (config reload): each call reads them once."""

    stream_batch_interval: float = DEFAULT_BATCH_INTERVAL

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        prices: PriceTable | None = None,
        heartbeat_every: float = HEARTBEAT_EVERY,
        breakers: BreakerBoard | None = None,
        live: LiveProviders | None = None,
    ) -> None:
        if live is None:
            if registry is None:
                raise ValueError("LlmActivities needs a registry or live providers")
            live = LiveProviders(registry, prices=prices, breakers=breakers)
        self.live = live
        self.heartbeat_every = heartbeat_every
        self.observer: CallObserver | None = None
        self.rate_limited: Callable[[str, float], Awaitable[None]] | None = None
        """Told of a provider's 429 with Retry-After (``provider/model``, seconds): the limiter shares it."""
        """Told the time to the first streamed token of each call (the worker's metrics)."""

    @property
    def registry(self) -> Registry:
        return self.live.registry

    @registry.setter
    def registry(self, registry: Registry) -> None:
        self.live.registry = registry

    @property
    def prices(self) -> PriceTable:
        return self.live.prices

    @prices.setter
    def prices(self, prices: PriceTable) -> None:
        self.live.prices = prices

    @property
    def breakers(self) -> BreakerBoard | None:
        return self.live.breakers

    @activity.defn(name=LLM_CHAT)
    async def chat(self, call: LlmCallInput) -> LlmCallResult:
        info = activity.info()
        log = _log.bind(
            workflow_id=info.workflow_id,
            activity_id=info.activity_id,
            step=call.step_id,
            model=call.model,
            attempt=info.attempt,
        )
        if call.not_before is not None and (hold := call.not_before - time.time()) > 0:
            await asyncio.sleep(min(hold, GRANT_AHEAD_S + 1))  # the call's slot opens then
        started = time.perf_counter()
        permit: Permit | None = None
        try:
            provider, model_name = self.registry.resolve(call.model)
            if self.breakers is not None:
                permit = self.breakers.admit(provider.name, model_name)  # CircuitOpen when refused
            # Known models' rules and the provider's unsupported options: refused here, or dropped in
            # lenient mode with the drops recorded on the response.
            prepared = provider.prepare_chat(call.request.model_copy(update={"model": model_name}))
            request = prepared.request
            if call.stream:
                response = await self._heartbeating(
                    self._stream(provider.stream(request), provider.name, call), info.is_local
                )
            else:
                provider.check_chat(request)
                response = await self._heartbeating(provider.chat(request), info.is_local)
        except KernelflowError as exc:
            self._settle(permit, exc)
            if isinstance(exc, RateLimited) and exc.retry_after and self.rate_limited is not None:
                await self.rate_limited(f"{provider.name}/{model_name}", exc.retry_after)
            log.warning(
                "llm call failed", error_type=type(exc).__name__, error=str(exc), retryable=exc.retryable
            )
            raise to_application_error(exc) from exc
        except BaseException as exc:  # cancelled, or a bug: no verdict on the upstream's health
            self._settle(permit, exc)
            raise
        answered_at = time.time()
        self._settle(permit, None)
        if prepared.warnings:
            response = response.model_copy(update={"warnings": [*prepared.warnings, *response.warnings]})
            log.warning("llm request adjusted", warnings=list(prepared.warnings))
        latency_ms = (time.perf_counter() - started) * 1000
        cost = self.prices.cost(provider.name, model_name, response.usage)
        log.info(
            "llm call finished",
            provider=provider.name,
            latency_ms=round(latency_ms, 1),
            prompt_tokens=response.usage.prompt_tokens,
            completion_tokens=response.usage.completion_tokens,
            finish_reason=response.finish_reason,
        )
        return LlmCallResult(
            response=response,
            model_ref=f"{provider.name}/{model_name}",
            provider=provider.name,
            cost_usd=cost,
            latency_ms=latency_ms,
            answered_at=answered_at,
        )

    def _settle(self, permit: Permit | None, error: BaseException | None) -> None:
        if self.breakers is not None:
            self.breakers.settle(permit, error)

    async def _stream(self, events: Any, provider: str, call: LlmCallInput) -> ChatResponse:
        received = 0
        started = time.perf_counter()
        tokens = TokenPublisher.for_current_activity(
            step_id=call.step_id, model=call.model, batch_interval=self.stream_batch_interval
        )

        async def counted() -> Any:
            nonlocal received
            event: StreamEvent
            async for event in events:
                tokens.feed(event)
                if isinstance(event, TextDelta | ToolCallDelta):
                    received += 1
                    if received == 1 and self.observer is not None:
                        self.observer.first_token(provider, call.model, time.perf_counter() - started)
                    if not activity.info().is_local:
                        activity.heartbeat({"chunks": received})
                yield event

        async with tokens:
            return await collect_stream(counted(), provider=provider)

    async def _heartbeating(self, work: Awaitable[_T], is_local: bool) -> _T:
        return await heartbeating(work, every=self.heartbeat_every)
