"""Calling Kernelflow's models from your own Temporal workflows.

Inside a ``@workflow.defn`` class registered on a Kernelflow worker
(``build_worker(..., extra_workflows=[MyWorkflow])``)::

    from workflows import api as kernelflow

    result = await kernelflow.chat(
        models=["openai/gpt-4o", "anthropic/claude-sonnet-4-5"],  # the first, then fallbacks in order
        messages=[{"role": "user", "content": "Summarise the clause"}],
        timeout_s=60,
        retry={"max_attempts": 3},
    )
    result.text, result.model, result.usage, result.cost_usd, result.failures

Each model gets Temporal's retries per ``retry``; when one fails for good the next is tried; the
activities carry the same summaries, failure records and cost accounting as pipeline steps (this
goes through ``workflows.calls.call_model``, like ``PipelineWorkflow``). ``Conversation`` keeps a
growing message list for multi-turn loops; ``agent`` runs the ``agent`` step's tool loop. Everything here is deterministic: it only schedules
activities, so it is safe in workflow code and nowhere else.

Long conversations: every call sends the whole conversation as the activity input. Enable payload
storage (``payloads:`` in the config, on by default) so those inputs are stored outside the history.

There is no ``embed()`` yet: the worker has no embedding activity to call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.llm import LlmCallResult
    from kernel.contracts import (
        AssistantMessage,
        ChatRequest,
        ChatResponse,
        FinishReason,
        Message,
        SystemMessage,
        ToolCall,
        Usage,
        UserMessage,
        message_text,
    )
    from kernel.engine import Engine, RunInfo
    from kernel.errors import PipelineError
    from kernel.pipeline import RetrySpec, parse_pipeline
    from kernel.run import PipelineStatus, RunState
    from kernel.steps.base import StepFailure
    from workflows.calls import AllModelsFailed, CallOptions, ModelFailure, call_model
    from workflows.engine.effects import TemporalEffects

__all__ = [
    "AgentResult",
    "AllModelsFailed",
    "CallOptions",
    "ChatRequest",
    "ChatResult",
    "Conversation",
    "Message",
    "ModelFailure",
    "RetrySpec",
    "Usage",
    "agent",
    "chat",
]


_MESSAGE: TypeAdapter[Message] = TypeAdapter(Message)


class ChatResult(BaseModel):
    """One answered call: the answer, who gave it, and what it cost."""

    text: str = Field(description="The answer's text ('' when the model only called tools).")
    message: AssistantMessage = Field(description="The answer as a message, to append to a conversation.")
    model: str = Field(description="The provider/model that answered.")
    provider: str
    finish_reason: FinishReason
    usage: Usage
    cost_usd: float | None = Field(description="None when the model's price is unknown.")
    latency_ms: float
    failures: list[ModelFailure] = Field(
        default_factory=list, description="Models that failed before this one answered, in order."
    )
    response: ChatResponse

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.response.tool_calls


def _invalid(label: str, what: str, exc: ValidationError) -> ApplicationError:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
    )
    return ApplicationError(f"{label}: invalid {what}: {problems}", type="InvalidRequest", non_retryable=True)


async def chat(
    *,
    models: str | Sequence[str],
    messages: Sequence[Message | Mapping[str, Any]],
    timeout_s: float = 120.0,
    retry: RetrySpec | Mapping[str, Any] | None = None,
    heartbeat_timeout_s: float | None = None,
    local_activity: bool = False,
    label: str = "chat",
    **request: Any,
) -> ChatResult:
    """Ask ``models`` (``provider/model`` refs or worker aliases, tried in order) and return the first
    answer. ``request`` takes the other ``ChatRequest`` fields (``temperature``, ``max_tokens``,
    ``response_format``, ``tools``, ``tool_choice``, ...). ``label`` names the call in activity
    summaries and errors.

    Raises ``AllModelsFailed`` (non-retryable, ``failures`` says how each model failed) when no model
    answered, and a non-retryable ``ApplicationError`` of type ``InvalidRequest`` for a request that
    cannot be valid. Both fail the workflow unless caught.
    """
    refs = [models] if isinstance(models, str) else list(models)
    if not refs:
        raise ApplicationError(f"{label}: no model to call", type="InvalidRequest", non_retryable=True)
    try:
        chat_request = ChatRequest.model_validate({**request, "model": refs[0], "messages": list(messages)})
    except ValidationError as exc:
        raise _invalid(label, "request", exc) from None
    try:
        options = CallOptions(
            timeout_s=timeout_s,
            heartbeat_timeout_s=heartbeat_timeout_s,
            retry=RetrySpec.model_validate(retry or {}),
            local_activity=local_activity,
        )
    except ValidationError as exc:
        raise _invalid(label, "options", exc) from None
    failures: list[ModelFailure] = []
    result: LlmCallResult
    result, _ = await call_model(refs, chat_request, options=options, label=label, on_failure=failures.append)
    response = result.response
    message = response.choices[0].message if response.choices else AssistantMessage(content="")
    return ChatResult(
        text=response.text,
        message=message,
        model=result.model_ref,
        provider=result.provider,
        finish_reason=response.finish_reason,
        usage=response.usage,
        cost_usd=result.cost_usd,
        latency_ms=result.latency_ms,
        failures=failures,
        response=response,
    )


class Conversation:
    """A growing message list for multi-turn loops; every ``ask`` sends the whole conversation.

    Workflow state, not an input: keep it in your workflow instance. Its totals (``usage``,
    ``cost_usd``) add up every answer.
    """

    def __init__(
        self, *, system: str | None = None, messages: Sequence[Message | Mapping[str, Any]] = ()
    ) -> None:
        self.messages: list[Message] = []
        if system is not None:
            self.messages.append(SystemMessage(content=system))
        for message in messages:
            self.messages.append(_message(message))
        self.usage = Usage()
        self.cost_usd = 0.0
        self.calls = 0

    def add(self, message: Message | Mapping[str, Any]) -> None:
        self.messages.append(_message(message))

    async def ask(
        self,
        text: str,
        *,
        models: str | Sequence[str],
        **options: Any,
    ) -> ChatResult:
        """Append ``text`` as a user turn, ask ``models`` with the whole conversation, append the answer.
        ``options`` are ``chat``'s (``timeout_s``, ``retry``, ``label``, request fields)."""
        self.messages.append(UserMessage(content=text))
        result = await chat(models=models, messages=self.messages, **options)
        self.messages.append(result.message)
        self.usage = self.usage + result.usage
        self.cost_usd = round(self.cost_usd + (result.cost_usd or 0.0), 10)
        self.calls += 1
        return result

    @property
    def chars(self) -> int:
        """The conversation's text length (about 4 characters to a token)."""
        return sum(len(message_text(m)) for m in self.messages)


def _message(message: Message | Mapping[str, Any]) -> Message:
    if not isinstance(message, Mapping):
        return message
    try:
        return _MESSAGE.validate_python(dict(message))
    except ValidationError as exc:
        raise _invalid("conversation", "message", exc) from None


class AgentResult(BaseModel):
    """What an agent loop ended with."""

    output: Any = Field(description="The final answer (JSON of output_schema when given).")
    messages: list[dict[str, Any]] = Field(description="The whole conversation, tool calls and results.")
    turns: int
    tool_calls: int
    stopped: str | None = Field(description="Why the loop stopped early (a limit or a stop condition).")
    model: str | None
    usage: Usage
    cost_usd: float | None


async def agent(
    *,
    model: str,
    tools: Sequence[Mapping[str, Any]] = (),
    prompt: str | None = None,
    instructions: str | None = None,
    conversation: Sequence[Message | Mapping[str, Any]] | None = None,
    label: str = "agent",
    **options: Any,
) -> AgentResult:
    """The ``agent`` step's loop from workflow code: ``model`` calls ``tools`` (the step's tool specs:
    ``{"type": "mcp", "server": ...}``, ``{"type": "http", ...}``, ``{"type": "pipeline", ...}``)
    until it answers. ``options`` are the step's other fields (``fallbacks``, ``max_turns``,
    ``max_cost_usd``, ``output_schema``, ``stop_tools``, ``tool_retry``, ...). Each model turn and
    each tool call is an activity of your workflow. ``prompt``, ``instructions`` and ``conversation``
    are taken as they are (no templates).

    Tool calls that need approval are refused here: approvals are decided through
    ``PipelineWorkflow``'s updates, so run such an agent as a pipeline step (or a child pipeline).
    Raises a non-retryable ``ApplicationError`` whose ``type`` is a ``FailureType`` when the loop fails.
    """
    gated = options.get("approval_when") is not None or any(t.get("requires_approval") for t in tools)
    if gated:
        raise ApplicationError(
            f"{label}: tools that need approval are for agent steps of a pipeline (approve/reject updates);"
            " drop requires_approval/approval_when here or run the agent as a pipeline",
            type="InvalidRequest",
            non_retryable=True,
        )
    step: dict[str, Any] = {"id": "agent", "type": "agent", "model": model, "tools": list(tools), **options}
    inputs: dict[str, Any] = {}
    if prompt is not None:
        step["prompt"], inputs["prompt"] = "{{ inputs.prompt }}", prompt
    if instructions is not None:
        step["instructions"], inputs["instructions"] = "{{ inputs.instructions }}", instructions
    if conversation is not None:
        inputs["conversation"] = [
            _message(m).model_dump(mode="json", exclude_none=True) for m in conversation
        ]
        step["conversation"] = "{{ inputs.conversation }}"
    declared = {name: {"type": "array" if name == "conversation" else "string"} for name in inputs}
    try:
        spec = parse_pipeline({"name": "agent", "inputs": declared, "steps": [step]})
    except PipelineError as exc:
        raise ApplicationError(f"{label}: {exc}", type="InvalidRequest", non_retryable=True) from None
    state = RunState(status=PipelineStatus(pipeline=label), inputs=inputs)
    engine = Engine(
        spec,
        state,
        _InWorkflowEffects(search_attributes=False, v2=True),
        RunInfo(workflow_id=workflow.info().workflow_id, pipeline=label),
    )
    try:
        output = await engine.run_step(spec.steps[0], engine.top_scope())
    except StepFailure as exc:
        raise ApplicationError(f"{label}: {exc.message}", type=exc.type, non_retryable=True) from None
    extras = state.context_steps["agent"]
    step_state = engine.step_state(spec.steps[0], engine.top_scope())
    return AgentResult(
        output=output,
        messages=extras["messages"],
        turns=extras["turns"],
        tool_calls=extras["tool_calls"],
        stopped=extras["stopped"],
        model=extras["model"],
        usage=step_state.usage,
        cost_usd=step_state.cost_usd,
    )


class _InWorkflowEffects(TemporalEffects):
    """The pipeline's effects inside a user's workflow: the loop never continues that workflow as new."""

    def continue_as_new_suggested(self) -> bool:
        return False
