"""What a step handler works with: the scope it runs in, its ``StepRun`` (state, helpers, the engine's
view), and the effects it may ask for (``Effects`` and the calls it takes). Below the step kinds and
the interpreter, so both import it and neither imports the other."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

from kernel.contracts import ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, Usage
from kernel.errors import FailureType
from kernel.run import ApprovalState, ModelFailure, RunState, StepState
from kernel.steps.base import RetrySpec, StepFailure, StepSpec

__all__ = [
    "LIFECYCLE_TYPES",
    "Answered",
    "CallResult",
    "ChildCall",
    "ChildResult",
    "ContinueAsNewRequested",
    "Effects",
    "EmbedCall",
    "EmbedResult",
    "EngineView",
    "LifecycleEvent",
    "McpCall",
    "McpList",
    "ModelCall",
    "RunInfo",
    "Scope",
    "SearchField",
    "SpecView",
    "StepRun",
    "ToolCall",
    "ToolResult",
    "json_value",
]

SearchField = Literal["status", "providers", "awaiting", "models"]

LIFECYCLE_TYPES = (
    "pipeline.started",
    "step.completed",
    "step.failed",
    "model.fallback",
    "approval.requested",
    "approval.decided",
    "pipeline.completed",
    "pipeline.failed",
    "pipeline.cancelled",
)


@dataclass(frozen=True)
class LifecycleEvent:
    """Something that happened to a pipeline, as outbound events report it: references and summaries
    (ids, models, usage, cost, error types), never prompts or outputs."""

    type: str
    sequence: int
    time: datetime
    step_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunInfo:
    workflow_id: str
    pipeline: str
    tenant: str | None = None


# --- what effects take and give ------------------------------------------------------------------


_R_co = TypeVar("_R_co", covariant=True)


class Answered(Protocol[_R_co]):
    """What a model answered: its response, the ``provider/model`` that answered, and the cost."""

    @property
    def response(self) -> _R_co: ...
    @property
    def model_ref(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def cost_usd(self) -> float | None: ...


CallResult = Answered[ChatResponse]
EmbedResult = Answered[EmbedResponse]


@dataclass
class ModelCall:
    """One model call of a step: the models in order (fallbacks after the first), how each is called,
    and the hooks the step uses to follow it."""

    models: list[str]
    request: ChatRequest
    step_id: str
    pipeline: str
    label: str
    timeout_s: float
    heartbeat_timeout_s: float | None
    retry: RetrySpec
    local_activity: bool = False
    stream: bool = False
    max_repairs: int = 0
    validate: Callable[[Any], Any] | None = None
    on_attempt: Callable[[str, int], None] | None = None
    on_failure: Callable[[ModelFailure], None] | None = None
    on_repair: Callable[[ModelFailure], None] | None = None
    route: Callable[[str], str] | None = None
    shadow: Any = None
    """The step's ``shadow`` (``kernel.shadow_rules.ShadowSpec``, False: never shadowed, None: the
    worker's rules decide)."""
    output_schema: dict[str, Any] | None = None


@dataclass
class EmbedCall:
    model: str
    request: EmbedRequest
    step_id: str
    pipeline: str
    timeout_s: float
    retry: RetrySpec
    summary: str
    heartbeat_timeout_s: float | None = None


@dataclass
class ToolCall:
    url: str
    method: str
    headers: dict[str, str]
    query: dict[str, str]
    body: Any
    timeout_s: float
    step_id: str
    retry: RetrySpec
    summary: str
    heartbeat_timeout_s: float | None = None


class ToolResult(Protocol):
    @property
    def status_code(self) -> int: ...
    @property
    def body(self) -> Any: ...


@dataclass
class ChildCall:
    step_id: str
    name: str
    workflow_id: str
    request: dict[str, Any]
    summary: str


class ChildResult(Protocol):
    @property
    def outputs(self) -> dict[str, Any]: ...
    @property
    def usage(self) -> Usage: ...
    @property
    def cost_usd(self) -> float: ...
    @property
    def cost_unknown_models(self) -> list[str]: ...


@dataclass
class McpList:
    server: str
    step_id: str
    retry: RetrySpec
    summary: str


@dataclass
class McpCall:
    server: str
    tool: str
    arguments: dict[str, Any]
    step_id: str
    timeout_s: float
    retry: RetrySpec
    summary: str
    heartbeat_timeout_s: float | None = None
    call_id: str = ""


class ContinueAsNewRequested(BaseException):
    """Raised by a step between units of work when the run should continue as new there; the step
    keeps its progress in ``RunState`` and picks it up in the next run. A ``BaseException`` so no
    step's error handling swallows it."""


class Effects(Protocol):
    """Everything the interpreter does to the world. Each method either returns or raises
    ``StepFailure`` (a failure the step reports) or ``asyncio.CancelledError``."""

    def now(self) -> datetime: ...
    def random(self) -> float: ...
    async def sleep(self, seconds: float, *, summary: str) -> None: ...
    async def wait(self, condition: Callable[[], bool], *, timeout: float | None, summary: str) -> bool:  # noqa: ASYNC109
        """Wait until ``condition()`` holds: True, or False when ``timeout`` seconds passed first."""
        ...

    async def call_model(self, call: ModelCall) -> tuple[CallResult, Any]: ...
    async def embed(self, call: EmbedCall) -> EmbedResult: ...
    async def tool(self, call: ToolCall) -> ToolResult: ...
    async def child(self, call: ChildCall) -> ChildResult: ...
    async def mcp_tools(self, call: McpList) -> list[dict[str, Any]]:
        """The tools of an MCP server configured on the worker: ``name``, ``description``, ``input_schema``."""
        ...

    async def mcp_call(self, call: McpCall) -> tuple[str, bool]:
        """Call an MCP tool: its text and whether the server reported a tool error."""
        ...

    def continue_as_new_suggested(self) -> bool:
        """Whether the history is long enough that the run should continue as new."""
        ...

    async def pipeline_problem(self, name: str, version: int | None) -> str | None:
        """Why the registered pipeline ``name`` (``version``) cannot be run, or None."""
        ...

    def search(self, updates: Mapping[SearchField, str | list[str]]) -> None:
        """Set search attributes, all in one update."""
        ...

    def details(self, text: str) -> None: ...
    def lifecycle(self, event: LifecycleEvent) -> None: ...


class SpecView(Protocol):
    """What a handler reads of the pipeline's spec."""

    @property
    def name(self) -> str: ...
    @property
    def retry(self) -> RetrySpec: ...


class EngineView(Protocol):
    """What a step handler may ask of the interpreter running it."""

    state: RunState
    effects: Effects
    info: RunInfo

    @property
    def spec(self) -> SpecView: ...
    def run_steps(self, steps: Sequence[StepSpec], scope: Scope) -> Awaitable[Any]: ...
    def skip(self, steps: Sequence[StepSpec], scope: Scope) -> None: ...
    def render(self, source: str, scope: Scope, location: str) -> str: ...
    def value(self, value: Any, scope: Scope, location: str) -> Any: ...
    def evaluate(self, source: str, scope: Scope, location: str) -> Any: ...
    def route(self, model: str) -> str: ...
    def note_provider(self, provider: str) -> None: ...
    def account(self, state: StepState, usage: Usage, cost: float | None, model_ref: str | None) -> None: ...
    def check_budget(self) -> Awaitable[None]: ...
    def details(self, summary: str) -> None: ...
    def lifecycle(
        self, type_: str, step_id: str | None = None, data: dict[str, Any] | None = None
    ) -> None: ...
    def refresh_search_status(self, also: Mapping[SearchField, str | list[str]] | None = None) -> None: ...
    def awaiting_changed(self) -> None: ...
    def decision(self, step_id: str) -> ApprovalState: ...


# --- scopes and the handler's view -----------------------------------------------------------------


@dataclass
class Scope:
    """Where steps run: the template context, whether their states are listed in the status (not
    inside a scope boundary such as a map), the enclosing step, and a label for ids."""

    context: dict[str, Any]
    listed: bool = True
    parent: str | None = None
    label: str = ""
    scratch: dict[str, StepState] = field(default_factory=dict)
    batches: Any = None
    """The batch collector of the enclosing map when it has ``llm`` steps in batch mode
    (``kernel.steps.batching.BatchCollector``)."""

    @property
    def steps(self) -> MutableMapping[str, Any]:
        steps: MutableMapping[str, Any] = self.context["steps"]
        return steps

    def inner(self, parent: str) -> Scope:
        """The scope of a step's nested steps (same context; listed like the step)."""
        return Scope(self.context, self.listed, parent, self.label, self.scratch, self.batches)


@dataclass
class StepRun:
    """What a step handler gets: the engine, the step's scope and its state, and helpers that name
    the step in every error."""

    engine: EngineView
    step: StepSpec
    scope: Scope
    state: StepState

    @property
    def effects(self) -> Effects:
        return self.engine.effects

    @property
    def spec(self) -> SpecView:
        return self.engine.spec

    def where(self, field_name: str = "") -> str:
        return f"step {self.step.id!r}" + (f" {field_name}" if field_name else "")

    def fail(self, message: str, type: str = FailureType.STEP_FAILED) -> StepFailure:
        return StepFailure(message, type)

    def render(self, source: str, field_name: str, scope: Scope | None = None) -> str:
        return self.engine.render(source, scope or self.scope, self.where(field_name))

    def value(self, value: Any, field_name: str, scope: Scope | None = None) -> Any:
        return self.engine.value(value, scope or self.scope, self.where(field_name))

    def evaluate(self, source: str, field_name: str, scope: Scope | None = None) -> Any:
        return self.engine.evaluate(source, scope or self.scope, self.where(field_name))

    def detail(self, text: str | None) -> None:
        self.state.detail = text

    def details(self, summary: str) -> None:
        self.engine.details(summary)

    def account(self, usage: Usage, cost: float | None, model_ref: str | None) -> None:
        self.engine.account(self.state, usage, cost, model_ref)

    def route(self, model: str) -> str:
        return self.engine.route(model)


def json_value(value: Any, location: str) -> Any:
    """Values become JSON data (kept in status and history); anything else is a clear error."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise StepFailure(
            f"{location}: the value is not JSON data ({type(value).__name__}); a generator needs '| list'",
            FailureType.PIPELINE_ERROR,
        ) from None
