"""The base class every provider plugin implements.

A provider declares what it is (``name``, ``version``, the kernel API range it was written for) and what
it can do (``capabilities``) as class data, so the kernel can refuse a request the provider cannot serve
before any network call. Transport is the plugin's business; the kernel never does I/O.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from kernel.batch import BatchItem, BatchItemResult, BatchJob, BatchLimits
from kernel.catalog import ModelFacts, ModelRules, Prepared, default_catalog
from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    EmbedRequest,
    EmbedResponse,
    FinishReason,
    FunctionCall,
    ProviderState,
    ProviderStateEvent,
    StreamDone,
    StreamError,
    StreamEvent,
    StreamStart,
    TextDelta,
    ToolCall,
    ToolCallDelta,
)
from kernel.errors import InvalidRequest, MissingCredentials, StreamInterrupted, UnsupportedCapability

__all__ = [
    "KERNEL_API_VERSION",
    "Capabilities",
    "Provider",
    "ProviderSettings",
    "collect_stream",
]

KERNEL_API_VERSION = 1
"""Bumped when the Provider contract changes incompatibly. Plugins declare the range they support."""


class Capabilities(BaseModel):
    """What a provider can do. ``json_schema_mode`` says how structured output is obtained:
    ``native`` (the API enforces a schema), ``tool`` (a forced tool call carries the JSON), or ``none``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chat: bool = True
    stream: bool = True
    tools: bool = True
    json_schema: bool = True
    json_schema_mode: Literal["native", "tool", "none"] = "native"
    embeddings: bool = False
    vision: bool = False
    documents: bool = False
    batch: bool = False
    """Whether the provider takes batches (``Provider.batch_submit`` and the rest, ``kernel.batch``)."""

    def names(self) -> list[str]:
        return [
            name
            for name in (
                "chat",
                "stream",
                "tools",
                "json_schema",
                "embeddings",
                "vision",
                "documents",
                "batch",
            )
            if getattr(self, name)
        ]


class ProviderSettings(BaseModel):
    """Per-worker configuration of one provider. Secrets live here and in the environment only; they
    never enter workflow inputs, results or history."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = Field(default=None, repr=False)
    base_url: str | None = None
    timeout: float = Field(default=600.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    headers: dict[str, str] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)


class Provider(ABC):
    """A plugin that serves models of one LLM service."""

    name: ClassVar[str]
    version: ClassVar[str] = "0.0.0"
    kernel_api: ClassVar[tuple[int, int]] = (1, 1)
    capabilities: ClassVar[Capabilities] = Capabilities()
    api_key_env: ClassVar[str | None] = None
    """Environment variable the API key is read from when the settings give none."""
    default_base_url: ClassVar[str | None] = None
    description: ClassVar[str] = ""
    unsupported_options: ClassVar[frozenset[str]] = frozenset(
        {"reasoning_effort", "thinking_budget", "service_tier", "cache", "provider_options"}
    )
    """Optional request fields (``kernel.catalog.REQUEST_OPTIONS``) this provider cannot honour: a request
    using one is refused before the call, or in lenient mode the field is dropped with a warning. The
    default names the options added after the first plugins were written, so an older plugin refuses
    them instead of silently ignoring them."""
    option_ranges: ClassVar[Mapping[str, tuple[float | None, float | None]]] = {}
    """Inclusive (low, high) bounds narrower than the contract's, e.g. ``{"temperature": (0, 1)}``."""
    catalog_vendor: ClassVar[str | None] = None
    """Whose models this provider serves, for the model catalog (``None``: its own ``name``)."""
    batch_limits: ClassVar[BatchLimits | None] = None
    """What one batch may hold, for providers whose ``capabilities.batch`` is true."""
    batch_unsupported_reason: ClassVar[str | None] = None
    """Why a provider whose vendor sells batches declares no batch capability, shown when one is asked."""

    def __init__(
        self, *, settings: ProviderSettings | None = None, environ: Mapping[str, str] | None = None
    ) -> None:
        self.settings = settings or ProviderSettings()
        self._environ = os.environ if environ is None else environ

    # --- credentials and capability checks -------------------------------------------------------

    @property
    def base_url(self) -> str:
        url = self.settings.base_url or self.default_base_url
        if not url:
            raise UnsupportedCapability(
                f"provider {self.name!r} needs a base_url in its settings", provider=self.name
            )
        return url.rstrip("/")

    def has_credentials(self) -> bool:
        if self.api_key_env is None:
            return True
        return bool(self.settings.api_key or self._environ.get(self.api_key_env))

    def api_key(self) -> str:
        """The API key, or ``MissingCredentials`` naming the environment variable to set."""
        key = self.settings.api_key or (self._environ.get(self.api_key_env) if self.api_key_env else None)
        if not key:
            raise MissingCredentials(
                f"provider {self.name!r} has no API key: set the environment variable "
                f"{self.api_key_env} on the worker (or api_key in the provider settings)",
                provider=self.name,
                env_var=self.api_key_env,
            )
        return key

    def refused_options(self) -> frozenset[str]:
        """``unsupported_options`` as this instance is configured (a mode may refuse more)."""
        return self.unsupported_options

    def model_facts(self, model: str) -> ModelFacts | None:
        """What the model catalog knows about ``model`` as this provider serves it; ``None`` for models
        it does not list (they pass through unchecked)."""
        return default_catalog().lookup(self.catalog_vendor or self.name, model)

    def model_rules(self, model: str) -> ModelRules:
        """The option rules for ``model`` as this provider serves it, worked out on first use."""
        unsupported = self.refused_options()
        key = (model, unsupported)
        known: dict[tuple[str, frozenset[str]], ModelRules] = self.__dict__.setdefault("_rules", {})
        rules: ModelRules | None = known.get(key)
        if rules is None:
            if len(known) >= 1024:
                known.clear()  # model names come from requests: keep the memory bounded
            rules = known[key] = ModelRules.build(
                provider=self.name, model=model, unsupported=unsupported, facts=self.model_facts(model)
            )
        return rules

    def prepare_chat(self, request: ChatRequest, *, lenient: bool | None = None) -> Prepared:
        """``request`` as this provider and model can take it. In lenient mode (``lenient``, else the
        request's own) options they cannot honour are dropped (listed in ``warnings``); otherwise such a
        request raises ``UnsupportedCapability`` naming them. Values outside the provider's ranges raise
        ``InvalidRequest`` in both modes."""
        for name, (low, high) in self.option_ranges.items():
            value = getattr(request, name)
            if value is None:
                continue
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"{low if low is not None else '-inf'} to {high if high is not None else 'inf'}"
                raise InvalidRequest(
                    f"{name}={value} is out of range for {self.name}: it accepts {bounds}",
                    provider=self.name,
                    model=request.model,
                )
        return self.model_rules(request.model).apply(request, lenient=lenient)

    def check_chat(self, request: ChatRequest, *, stream: bool = False) -> None:
        """Refuse a request whose features the provider does not declare, or that the model is known
        to refuse, before any network call."""
        self.prepare_chat(request, lenient=False)
        caps = self.capabilities
        missing: list[str] = []
        if not caps.chat:
            missing.append("chat")
        if stream and not caps.stream:
            missing.append("stream")
        if request.needs_tools and not caps.tools:
            missing.append("tools")
        if request.needs_json_schema and not caps.json_schema:
            missing.append("json_schema")
        if request.has_images and not caps.vision:
            missing.append("vision")
        if request.has_documents and not caps.documents:
            missing.append("documents")
        if missing:
            raise UnsupportedCapability(
                f"provider {self.name!r} does not support {', '.join(missing)} "
                f"(it supports: {', '.join(caps.names()) or 'nothing'})",
                provider=self.name,
                model=request.model,
            )

    def check_embed(self, request: EmbedRequest) -> None:
        if not self.capabilities.embeddings:
            raise UnsupportedCapability(
                f"provider {self.name!r} does not offer embeddings "
                f"(it supports: {', '.join(self.capabilities.names())})",
                provider=self.name,
                model=request.model,
            )

    # --- the calls -------------------------------------------------------------------------------

    @abstractmethod
    async def chat(self, request: ChatRequest) -> ChatResponse:
        """One completion. Raises a ``kernel.errors.ProviderError`` subclass on failure; never retries."""

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """Typed stream events: ``StreamStart``, deltas, then ``StreamDone`` or ``StreamError``.

        An error before the first event is raised; after it, it is yielded as ``StreamError``."""
        raise UnsupportedCapability(f"provider {self.name!r} does not stream", provider=self.name)

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        self.check_embed(request)
        raise UnsupportedCapability(f"provider {self.name!r} does not embed", provider=self.name)

    # --- batches (``kernel.batch``) ------------------------------------------------------------------

    def check_batch(self, items: list[BatchItem]) -> None:
        """Refuse a batch this provider cannot take, before any network call."""
        if not self.capabilities.batch or self.batch_limits is None:
            raise UnsupportedCapability(
                f"provider {self.name!r} does not take batches "
                f"(it supports: {', '.join(self.capabilities.names()) or 'nothing'})",
                provider=self.name,
            )
        problem = self.batch_problem()
        if problem is not None:
            raise UnsupportedCapability(
                f"provider {self.name!r} does not take batches as configured: {problem}", provider=self.name
            )
        if not items:
            raise InvalidRequest("a batch needs at least one item", provider=self.name)
        if len(items) > self.batch_limits.max_requests:
            raise InvalidRequest(
                f"a batch of {self.name!r} holds at most {self.batch_limits.max_requests} requests, "
                f"got {len(items)}: split it (kernel.batch.split_batch)",
                provider=self.name,
            )
        seen: set[str] = set()
        for item in items:
            if item.custom_id in seen:
                raise InvalidRequest(
                    f"custom_id {item.custom_id!r} appears twice in a batch", provider=self.name
                )
            seen.add(item.custom_id)
            self.check_chat(item.request)

    def batch_problem(self) -> str | None:
        """Why this instance, as configured, cannot take batches although its class declares them (a
        setting the vendor's batch API needs is missing), naming what to set; ``None`` when it can."""
        return None

    def batch_min_requests(self) -> int:
        """The fewest requests one batch of this provider may hold; fewer are answered in realtime."""
        return 1

    def batch_item_size(self, item: BatchItem) -> int:
        """The item's size on this provider's batch wire, for ``kernel.batch.split_batch``."""
        return len(item.model_dump_json(exclude_none=True)) + 64

    async def batch_submit(self, tag: str, items: list[BatchItem]) -> BatchJob:
        """The batch under ``tag``: the existing one when the provider already has it, else a new one.
        Repeating a submission (after a crash, by a retried activity) never creates a second batch."""
        self.check_batch(items)
        found = await self.batch_find(tag)
        if found is not None:
            return found
        return await self.batch_create(tag, items)

    async def batch_find(self, tag: str) -> BatchJob | None:
        """The batch created under ``tag``, if any."""
        raise UnsupportedCapability(f"provider {self.name!r} does not take batches", provider=self.name)

    async def batch_create(self, tag: str, items: list[BatchItem]) -> BatchJob:
        """Create a batch carrying ``tag`` in its metadata (callers use ``batch_submit``)."""
        raise UnsupportedCapability(f"provider {self.name!r} does not take batches", provider=self.name)

    async def batch_status(self, batch_id: str) -> BatchJob:
        raise UnsupportedCapability(f"provider {self.name!r} does not take batches", provider=self.name)

    async def batch_results(self, batch_id: str, custom_ids: list[str], model: str) -> list[BatchItemResult]:
        """One result per id of ``custom_ids`` (the batch's items, asked of ``model``), in their order.
        Items the batch holds no answer for are ``expired`` (or ``cancelled`` when it was cancelled)."""
        raise UnsupportedCapability(f"provider {self.name!r} does not take batches", provider=self.name)

    async def batch_cancel(self, batch_id: str) -> BatchJob:
        """Ask the provider to stop the batch; answers already made stay readable."""
        raise UnsupportedCapability(f"provider {self.name!r} does not take batches", provider=self.name)

    async def aclose(self) -> None:
        """Release connections. Called once when the worker stops."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kernel_api": list(self.kernel_api),
            "capabilities": self.capabilities.names(),
            "json_schema_mode": self.capabilities.json_schema_mode,
            "unsupported_options": sorted(self.unsupported_options),
            "credentials_env": self.api_key_env,
            "credentials_present": self.has_credentials(),
            "description": self.description,
        }


async def collect_stream(events: AsyncIterator[StreamEvent], *, provider: str) -> ChatResponse:
    """Assemble stream events into a ``ChatResponse``; a ``StreamError`` or a stream that ends
    without ``StreamDone`` raises ``StreamInterrupted`` rather than returning a truncated answer."""
    response_id, model = "", ""
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    done: StreamDone | None = None
    state: ProviderState | None = None
    async for event in events:
        if isinstance(event, StreamStart):
            response_id, model = event.id, event.model
        elif isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, ToolCallDelta):
            call = calls.setdefault(event.index, {"id": "", "name": "", "arguments": []})
            call["id"] = event.id or call["id"]
            call["name"] = event.name or call["name"]
            call["arguments"].append(event.arguments)
        elif isinstance(event, ProviderStateEvent):
            state = event.state
        elif isinstance(event, StreamError):
            raise StreamInterrupted(
                f"the stream from {provider!r} broke off: {event.message}", provider=provider, model=model
            )
        elif isinstance(event, StreamDone):
            done = event
    if done is None:
        raise StreamInterrupted(
            f"the stream from {provider!r} ended without a finish reason", provider=provider, model=model
        )
    tool_calls = [
        ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments="".join(c["arguments"])))
        for _, c in sorted(calls.items())
    ]
    finish: FinishReason = done.finish_reason
    message = AssistantMessage(
        content="".join(text) or None, tool_calls=tool_calls or None, provider_state=state
    )
    return ChatResponse(
        id=response_id,
        model=model,
        provider=provider,
        choices=[Choice(message=message, finish_reason=finish)],
        usage=done.usage,
    )
