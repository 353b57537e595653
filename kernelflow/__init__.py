"""Kernelflow's public API: ``import kernelflow`` gives plugin authors and client code everything they
need, so the internal layout can change without breaking them.

- Provider plugins: ``Provider``, ``HttpProvider`` (the HTTP connection part: base URL, pooled httpx
  client, errors by status, streams that fail cleanly), ``Capabilities``, ``ProviderSettings``, the
  contracts (``ChatRequest``, ``ChatResponse``, messages, stream events, ``Usage``) and the error tree;
  ``ProviderConformance`` (the conformance kit, loaded on first use: it needs pytest).
- Pipelines: ``PipelineSpec``, ``parse_pipeline``, ``load_pipeline``, and new step kinds
  (``StepSpec``, ``StepKind``, ``register_step_kind``).
- Temporal: ``KernelflowPlugin`` (add Kernelflow to any client or worker), ``PipelineWorkflow`` and
  its payloads, and the client helpers (``start_pipeline``, ``approve``, ``reroute`` … ``list_pipelines``).
- Code-defined workflows: ``chat``, ``Conversation`` and ``agent`` (call them from workflow code).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kernel.batch import BatchCounts, BatchItem, BatchItemResult, BatchJob, BatchLimits, batch_tag
from kernel.catalog import REQUEST_OPTIONS, ModelCatalog, ModelFacts, default_catalog
from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    DeveloperMessage,
    DocumentPart,
    DocumentSource,
    EmbedRequest,
    EmbedResponse,
    FinishReason,
    ImagePart,
    Message,
    PromptCache,
    ProviderState,
    ProviderStateEvent,
    StreamDone,
    StreamError,
    StreamEvent,
    StreamStart,
    SystemMessage,
    TextDelta,
    TextPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolMessage,
    Usage,
    UserMessage,
    message_text,
)
from kernel.errors import (
    AuthenticationFailed,
    CircuitOpen,
    ConfigurationError,
    ConnectionFailed,
    ContentFiltered,
    ContextLengthExceeded,
    FailureType,
    InvalidRequest,
    KernelflowError,
    MalformedResponse,
    MissingCredentials,
    ModelNotFound,
    NonRetryableError,
    Overloaded,
    PermissionDenied,
    PipelineError,
    PluginError,
    ProviderError,
    QuotaExceeded,
    RateLimited,
    RetryableError,
    StreamInterrupted,
    UnknownProvider,
    UnsupportedCapability,
    UpstreamError,
    UpstreamTimeout,
    error_from_status,
)
from kernel.pipeline import PipelineSpec, load_pipeline, parse_pipeline
from kernel.pricing import Price, PriceTable
from kernel.provider import KERNEL_API_VERSION, Capabilities, Provider, ProviderSettings, collect_stream
from kernel.registry import Registry
from kernel.steps import StepFailure, StepKind, StepSpec, register_step_kind
from providers._http import HttpProvider, WireShapeError, as_list, as_object, as_text, iter_ndjson, iter_sse
from worker.client import (
    PipelineSummary,
    approve,
    cancel,
    decide_with_start,
    deliver_event,
    follow,
    list_pipelines,
    outputs,
    pause,
    reject,
    reroute,
    resume,
    send_event,
    start_pipeline,
    start_registered,
    status,
)
from worker.plugin import KernelflowPlugin
from workflows.api import AgentResult, ChatResult, Conversation, agent, chat
from workflows.contract import (
    ApprovalState,
    ControlAnswer,
    PipelineRequest,
    PipelineResult,
    PipelineStatus,
    Query,
    Signal,
    StepState,
    Update,
)
from workflows.pipeline import PipelineWorkflow

if TYPE_CHECKING:
    from kernel.testing import ProviderConformance

__version__ = "0.1.0"

__all__ = [
    "KERNEL_API_VERSION",
    "REQUEST_OPTIONS",
    "AgentResult",
    "ApprovalState",
    "AssistantMessage",
    "AuthenticationFailed",
    "BatchCounts",
    "BatchItem",
    "BatchItemResult",
    "BatchJob",
    "BatchLimits",
    "Capabilities",
    "ChatRequest",
    "ChatResponse",
    "ChatResult",
    "Choice",
    "CircuitOpen",
    "ConfigurationError",
    "ConnectionFailed",
    "ContentFiltered",
    "ContextLengthExceeded",
    "ControlAnswer",
    "Conversation",
    "DeveloperMessage",
    "DocumentPart",
    "DocumentSource",
    "EmbedRequest",
    "EmbedResponse",
    "FailureType",
    "FinishReason",
    "HttpProvider",
    "ImagePart",
    "InvalidRequest",
    "KernelflowError",
    "KernelflowPlugin",
    "MalformedResponse",
    "Message",
    "MissingCredentials",
    "ModelCatalog",
    "ModelFacts",
    "ModelNotFound",
    "NonRetryableError",
    "Overloaded",
    "PermissionDenied",
    "PipelineError",
    "PipelineRequest",
    "PipelineResult",
    "PipelineSpec",
    "PipelineStatus",
    "PipelineSummary",
    "PipelineWorkflow",
    "PluginError",
    "Price",
    "PriceTable",
    "PromptCache",
    "Provider",
    "ProviderConformance",
    "ProviderError",
    "ProviderSettings",
    "ProviderState",
    "ProviderStateEvent",
    "Query",
    "QuotaExceeded",
    "RateLimited",
    "Registry",
    "RetryableError",
    "Signal",
    "StepFailure",
    "StepKind",
    "StepSpec",
    "StepState",
    "StreamDone",
    "StreamError",
    "StreamEvent",
    "StreamInterrupted",
    "StreamStart",
    "SystemMessage",
    "TextDelta",
    "TextPart",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolMessage",
    "UnknownProvider",
    "UnsupportedCapability",
    "Update",
    "UpstreamError",
    "UpstreamTimeout",
    "Usage",
    "UserMessage",
    "WireShapeError",
    "__version__",
    "agent",
    "approve",
    "as_list",
    "as_object",
    "as_text",
    "batch_tag",
    "cancel",
    "chat",
    "collect_stream",
    "decide_with_start",
    "default_catalog",
    "deliver_event",
    "error_from_status",
    "follow",
    "iter_ndjson",
    "iter_sse",
    "list_pipelines",
    "load_pipeline",
    "message_text",
    "outputs",
    "parse_pipeline",
    "pause",
    "register_step_kind",
    "reject",
    "reroute",
    "resume",
    "send_event",
    "start_pipeline",
    "start_registered",
    "status",
]


def __getattr__(name: str) -> Any:
    if name == "ProviderConformance":
        from kernel.testing import ProviderConformance

        return ProviderConformance
    raise AttributeError(f"module 'kernelflow' has no attribute {name!r}")
