"""Kernelflow's kernel: contracts, the provider base class, the registry, errors, pricing, pipelines.

Pure Python: no Temporal, no HTTP. Everything here is fast to import and to test.
"""

from __future__ import annotations

from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    EmbedRequest,
    EmbedResponse,
    StreamEvent,
    SystemMessage,
    Tool,
    ToolMessage,
    Usage,
    UserMessage,
)
from kernel.pipeline import PipelineSpec, load_pipeline, parse_pipeline
from kernel.pricing import Price, PriceTable
from kernel.provider import KERNEL_API_VERSION, Capabilities, Provider, ProviderSettings, collect_stream
from kernel.registry import ENTRY_POINT_GROUP, ModelRef, Registry, parse_model_ref

__all__ = [
    "ENTRY_POINT_GROUP",
    "KERNEL_API_VERSION",
    "AssistantMessage",
    "Capabilities",
    "ChatRequest",
    "ChatResponse",
    "EmbedRequest",
    "EmbedResponse",
    "ModelRef",
    "PipelineSpec",
    "Price",
    "PriceTable",
    "Provider",
    "ProviderSettings",
    "Registry",
    "StreamEvent",
    "SystemMessage",
    "Tool",
    "ToolMessage",
    "Usage",
    "UserMessage",
    "collect_stream",
    "load_pipeline",
    "parse_model_ref",
    "parse_pipeline",
]
