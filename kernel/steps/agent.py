"""``agent``: a model that calls tools in a loop until it answers, each model turn and each tool call its
own durable call.

Tools come from three sources, all in the spec and fixed when the step starts: HTTP tools (the
worker's allow-listed ``http_tool``), registered pipelines (a child workflow per call) and MCP
servers configured on the worker (their listings fetched through an activity, so the catalogue is
in the history). Arguments are checked against the tool's JSON schema before a call; an invalid
call, a failed call or a rejected one is answered to the model, which goes on. Calls of one turn run
at once. A call of a tool that needs approval waits for the ``approve``/``reject`` updates under an
id of its own (``<step>.<turn>.<call>``). The loop's state lives in ``RunState.agents``, so a run
continues as new between turns and picks the loop up where it was.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from kernel.contracts import ChatRequest
from kernel.errors import FailureType
from kernel.routing import Balance
from kernel.run import AgentLoopState, AgentToolCallState
from kernel.schema import schema_errors
from kernel.steps.base import (
    MODEL_PATTERN,
    NAME_PATTERN,
    RetrySpec,
    StepFailure,
    StepKind,
    StepSpec,
    _Spec,
)
from kernel.steps.context import (
    ChildCall,
    ContinueAsNewRequested,
    McpCall,
    McpList,
    ModelCall,
    Scope,
    StepRun,
    ToolCall,
)
from kernel.steps.llm import order_models

__all__ = ["KIND", "AgentStep", "HttpTool", "McpTools", "PipelineTool"]

_TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
_OBJECT = {"type": "object", "properties": {}}


class _ToolSpec(_Spec):
    requires_approval: bool = Field(default=False, description="Each call waits for approve/reject.")


class HttpTool(_ToolSpec):
    """An HTTP endpoint on the worker's allow-list. ``url`` is a template that may read
    ``arguments``; GET sends the arguments as the query, other methods as the JSON body."""

    type: Literal["http"]
    name: str = Field(pattern=_TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: dict(_OBJECT))
    url: str = Field(min_length=1)
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, str] = Field(default_factory=dict)


class PipelineTool(_ToolSpec):
    """A registered pipeline called as a child workflow; the arguments are its inputs, its outputs
    are the result."""

    type: Literal["pipeline"]
    name: str = Field(pattern=_TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: dict(_OBJECT))
    pipeline: str = Field(pattern=NAME_PATTERN)
    version: int | None = Field(default=None, ge=1)


class McpTools(_Spec):
    """The tools of an MCP server configured on the worker (``KERNELFLOW_MCP_SERVERS``): all of
    them, or those named in ``tools``. ``requires_approval``: true for all, or the names that need it."""

    type: Literal["mcp"]
    server: str = Field(pattern=NAME_PATTERN)
    tools: list[str] | None = None
    prefix: str = Field(default="", pattern=r"^[a-zA-Z0-9_-]{0,20}$")
    requires_approval: bool | list[str] = False


AgentTool = Annotated[HttpTool | PipelineTool | McpTools, Field(discriminator="type")]


class AgentStep(StepSpec):
    """A model that calls tools in a loop. ``instructions`` (system), ``conversation`` (a template
    giving a list of ``{role, content}`` messages) and ``prompt`` open the conversation. The loop
    ends when the model answers without tool calls, calls one of ``stop_tools`` (its arguments are
    the output) or ``stop_when`` holds (an expression over ``turn``, ``text`` and ``calls``).
    Limits (``max_turns``, ``max_tokens``, ``max_cost_usd``, ``max_wall_s``) are checked at every
    turn; ``on_limit`` says whether reaching one fails the step or stops with the last answer.
    Output: the final text (JSON of ``output_schema`` when given); ``steps.<id>.messages``,
    ``.turns``, ``.tool_calls`` and ``.stopped``."""

    versioned_defaults: ClassVar[dict[str, dict[int, Any]]] = {"heartbeat_timeout_s": {2: 8.0}}

    type: Literal["agent"]
    model: str = Field(pattern=MODEL_PATTERN)
    fallbacks: list[Annotated[str, Field(pattern=MODEL_PATTERN)]] = Field(default_factory=list, max_length=10)
    balance: Balance | None = None
    instructions: str | None = None
    conversation: str | None = Field(default=None, description="A template giving earlier messages.")
    prompt: str | None = None
    tools: list[AgentTool] = Field(default_factory=list, max_length=50)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens_per_turn: int | None = Field(default=None, gt=0)
    output_schema: dict[str, Any] | None = None
    max_repairs: int = Field(default=2, ge=0, le=10)
    max_turns: int = Field(default=10, ge=1, le=1000)
    max_tokens: int | None = Field(default=None, gt=0, description="Tokens of the whole loop.")
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_wall_s: float | None = Field(default=None, gt=0)
    on_limit: Literal["fail", "stop"] = "fail"
    stop_tools: list[str] = Field(default_factory=list)
    stop_when: str | None = None
    on_tool_error: Literal["continue", "fail"] = "continue"
    approval_when: str | None = Field(
        default=None, description="An expression over tool and arguments: true asks for approval."
    )
    approvers: list[str] | None = None
    approval_timeout_s: float | None = Field(default=None, gt=0, le=365 * 86400)
    stream: bool = False
    timeout_s: float = Field(default=120.0, gt=0, le=86400, description="Per model or tool call attempt.")
    heartbeat_timeout_s: float | None = Field(default=None, gt=0, le=3600)
    retry: RetrySpec | None = None
    tool_retry: RetrySpec = Field(
        default_factory=lambda: RetrySpec(max_attempts=3),
        description="Retries of one tool call before its error goes to the model.",
    )

    @model_validator(mode="after")
    def _check(self) -> AgentStep:
        if self.prompt is None and self.conversation is None:
            raise ValueError("an agent needs a 'prompt' or a 'conversation'")
        names = [t.name for t in self.tools if not isinstance(t, McpTools)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tool names must be unique; given more than once: {', '.join(twice)}")
        for tool in self.tools:
            if not isinstance(tool, McpTools) and tool.parameters.get("type", "object") != "object":
                raise ValueError(f"tool {tool.name!r}: 'parameters' must be a JSON Schema of type object")
        return self

    def templates(self) -> list[tuple[str, Any]]:
        pairs = [
            ("instructions", self.instructions),
            ("prompt", self.prompt),
            ("conversation", self.conversation),
        ]
        return [(name, value) for name, value in pairs if value is not None]

    def models(self) -> list[str]:
        return list(dict.fromkeys([self.model, *self.fallbacks, *(b.model for b in self.balance or [])]))


# --- the loop --------------------------------------------------------------------------------------


def _catalogue_entry(
    name: str, description: str | None, parameters: dict[str, Any], **source: Any
) -> dict[str, Any]:
    return {"name": name, "description": description, "parameters": parameters, **source}


async def _catalogue(step: AgentStep, run: StepRun) -> list[dict[str, Any]]:
    """Every tool the model may call, fixed at start; MCP listings come through an activity."""
    tools: list[dict[str, Any]] = []
    for index, spec in enumerate(step.tools):
        if isinstance(spec, PipelineTool):
            problem = await run.effects.pipeline_problem(spec.pipeline, spec.version)
            if problem is not None:
                raise run.fail(f"step {step.id!r} tool {spec.name!r}: {problem}", FailureType.PIPELINE_ERROR)
        if isinstance(spec, HttpTool | PipelineTool):
            tools.append(
                _catalogue_entry(
                    spec.name,
                    spec.description,
                    spec.parameters,
                    source=index,
                    approval=spec.requires_approval,
                )
            )
        else:
            listed = await run.effects.mcp_tools(
                McpList(
                    server=spec.server,
                    step_id=step.id,
                    retry=step.tool_retry,
                    summary=f"{step.id} · list tools of MCP server {spec.server}",
                )
            )
            by_name = {t["name"]: t for t in listed}
            wanted = spec.tools if spec.tools is not None else list(by_name)
            missing = [name for name in wanted if name not in by_name]
            if missing:
                raise run.fail(
                    f"step {step.id!r}: MCP server {spec.server!r} has no tool {', '.join(map(repr, missing))}; "
                    f"its tools: {', '.join(sorted(by_name)) or 'none'}",
                    FailureType.PIPELINE_ERROR,
                )
            gated = spec.requires_approval
            for name in wanted:
                tool = by_name[name]
                needs = gated if isinstance(gated, bool) else name in gated
                tools.append(
                    _catalogue_entry(
                        spec.prefix + name,
                        tool.get("description"),
                        tool.get("input_schema") or dict(_OBJECT),
                        source=index,
                        approval=needs,
                        remote=name,
                    )
                )
    names = [t["name"] for t in tools]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise run.fail(
            f"step {step.id!r}: tool names collide across sources: {', '.join(twice)} (give an MCP source a 'prefix')",
            FailureType.PIPELINE_ERROR,
        )
    unknown_stops = [n for n in step.stop_tools if n not in names]
    if unknown_stops:
        raise run.fail(
            f"step {step.id!r}: stop_tools {unknown_stops} are not among its tools: {', '.join(names) or 'none'}",
            FailureType.PIPELINE_ERROR,
        )
    return tools


def _opening(step: AgentStep, run: StepRun) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if step.instructions:
        messages.append({"role": "system", "content": run.render(step.instructions, "instructions")})
    if step.conversation is not None:
        earlier = run.value(step.conversation, "conversation")
        if not isinstance(earlier, list) or not all(isinstance(m, dict) and "role" in m for m in earlier):
            raise run.fail(
                f"step {step.id!r} conversation must give a list of {{role, content}} messages, got {earlier!r:.120}",
                FailureType.PIPELINE_ERROR,
            )
        messages.extend(earlier)
    if step.prompt is not None:
        messages.append({"role": "user", "content": run.render(step.prompt, "prompt")})
    return messages


def _request(step: AgentStep, loop: AgentLoopState, run: StepRun) -> ChatRequest:
    tools = [
        {
            "type": "function",
            "function": {"name": t["name"], "description": t["description"], "parameters": t["parameters"]},
        }
        for t in loop.tools
    ]
    response_format = None
    if step.output_schema is not None:
        response_format = {
            "type": "json_schema",
            "json_schema": {"name": step.id, "schema": step.output_schema},
        }
    try:
        return ChatRequest.model_validate(
            {
                "model": step.model,
                "messages": loop.messages,
                "tools": tools or None,
                "temperature": step.temperature,
                "max_tokens": step.max_tokens_per_turn,
                "response_format": response_format,
            }
        )
    except ValueError as exc:
        raise run.fail(
            f"step {step.id!r} builds an invalid request: {exc}", FailureType.PIPELINE_ERROR
        ) from None


def _limit(step: AgentStep, loop: AgentLoopState, run: StepRun) -> str | None:
    state = run.state
    if loop.turn >= step.max_turns:
        return f"max_turns {step.max_turns} reached"
    if step.max_tokens is not None and state.usage.total_tokens > step.max_tokens:
        return f"{state.usage.total_tokens} tokens used, over max_tokens {step.max_tokens}"
    if step.max_cost_usd is not None and (state.cost_usd or 0.0) > step.max_cost_usd:
        return f"${state.cost_usd:.6f} spent, over max_cost_usd ${step.max_cost_usd:g}"
    if step.max_wall_s is not None and loop.started_at is not None:
        elapsed = (run.effects.now() - loop.started_at).total_seconds()
        if elapsed > step.max_wall_s:
            return f"{elapsed:.0f}s since the loop started, over max_wall_s {step.max_wall_s:g}"
    return None


def _show(step: AgentStep, loop: AgentLoopState, run: StepRun) -> None:
    flying = [c.tool for c in loop.calls if c.status == "running"]
    waiting = [c.tool for c in loop.calls if c.status == "waiting"]
    text = f"turn {loop.turn}/{step.max_turns} · cost ${run.state.cost_usd or 0.0:.6f}"
    if flying:
        text += f" · tool in flight: {', '.join(flying)}"
    if waiting:
        text += f" · waiting for approval: {', '.join(waiting)}"
    run.detail(text)


async def run(step: AgentStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    engine = run.engine
    loops = engine.state.agents
    loop = loops.get(step.id)
    if loop is None:
        loop = AgentLoopState(started_at=run.effects.now())
        loop.messages = _opening(step, run)
        loop.tools = await _catalogue(step, run)
        loops[step.id] = loop
    top_level = run.scope.listed and run.scope.parent is None
    while True:
        if loop.calls:
            await _answer_calls(step, loop, run)
        over = _limit(step, loop, run)
        if over is not None:
            if step.on_limit == "fail":
                raise run.fail(f"agent {step.id!r} stopped: {over}", FailureType.BUDGET_EXCEEDED)
            return _finish(step, loop, run, _last_text(loop), over)
        if top_level and loop.turn > 0 and run.effects.continue_as_new_suggested():
            raise ContinueAsNewRequested()
        message = await _model_turn(step, loop, run)
        calls = message.get("tool_calls") or []
        text = message.get("content")
        stop = next((c for c in calls if c["function"]["name"] in step.stop_tools), None)
        if stop is not None:
            return _finish(
                step,
                loop,
                run,
                _arguments(stop["function"]["arguments"]),
                f"stop tool {stop['function']['name']}",
            )
        if step.stop_when is not None:
            scope = Scope(
                {
                    **run.scope.context,
                    "turn": loop.turn,
                    "text": text,
                    "calls": [c["function"]["name"] for c in calls],
                }
            )
            if run.evaluate(step.stop_when, "stop_when", scope):
                return _finish(step, loop, run, text, "stop_when")
        if not calls:
            if step.output_schema is None:
                return _finish(step, loop, run, text, None)
            problem, value = _check_output(text, step.output_schema)
            if problem is None:
                return _finish(step, loop, run, value, None)
            if loop.repairs >= step.max_repairs:
                raise run.fail(f"agent {step.id!r}: the final answer {problem}", FailureType.INVALID_OUTPUT)
            loop.repairs += 1
            loop.messages.append(
                {"role": "user", "content": f"Your answer was not valid: {problem}\nAnswer again."}
            )
            continue
        loop.calls = [
            AgentToolCallState(
                id=str(c.get("id") or f"call_{loop.turn}_{i}"),
                tool=c["function"]["name"],
                arguments=c["function"].get("arguments") or "{}",
            )
            for i, c in enumerate(calls)
        ]


async def _model_turn(step: AgentStep, loop: AgentLoopState, run: StepRun) -> dict[str, Any]:
    engine, state = run.engine, run.state
    rand = engine.effects.random() if step.balance else 0.0
    models = order_models(step.model, step.fallbacks, step.balance, rand)
    number = loop.turn + 1

    def on_attempt(model: str, attempt: int) -> None:
        state.model = model
        if attempt > 1:
            engine.lifecycle("model.fallback", step.id, {"model": model, "attempt": attempt})
        run.details(f"{step.id} · turn {number} · {model}")

    _show(step, loop, run)
    result, _ = await engine.effects.call_model(
        ModelCall(
            models=models,
            request=_request(step, loop, run),
            step_id=step.id,
            pipeline=engine.spec.name,
            label=f"agent {step.id!r} turn {number}",
            timeout_s=step.timeout_s,
            heartbeat_timeout_s=step.heartbeat_timeout_s,
            retry=step.retry or engine.spec.retry,
            stream=step.stream,
            on_attempt=on_attempt,
            on_failure=state.failures.append,
            route=engine.route,
        )
    )
    run.account(result.response.usage, result.cost_usd, result.model_ref)
    state.model, state.provider = result.model_ref, result.provider
    engine.note_provider(result.provider)
    message = result.response.choices[0].message.model_dump(mode="json", exclude_none=True)
    loop.messages.append(message)
    loop.turn = number
    _show(step, loop, run)
    await engine.check_budget()
    return message


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw or "{}")
        except ValueError:
            return raw
    return raw


def _check_output(text: str | None, schema: dict[str, Any]) -> tuple[str | None, Any]:
    try:
        value = json.loads(text or "")
    except ValueError as exc:
        return f"is not JSON: {exc}", None
    problems = schema_errors(value, schema)
    return ("does not match output_schema: " + "; ".join(problems)) if problems else None, value


def _last_text(loop: AgentLoopState) -> str | None:
    return next((m.get("content") for m in reversed(loop.messages) if m.get("role") == "assistant"), None)


def _finish(
    step: AgentStep, loop: AgentLoopState, run: StepRun, output: Any, stopped: str | None
) -> tuple[Any, dict[str, Any]]:
    run.engine.state.agents.pop(step.id, None)
    run.detail(None)
    return output, {
        "messages": loop.messages,
        "turns": loop.turn,
        "tool_calls": loop.tool_calls,
        "stopped": stopped,
        "model": run.state.model,
    }


# --- tool calls ------------------------------------------------------------------------------------


async def _answer_calls(step: AgentStep, loop: AgentLoopState, run: StepRun) -> None:
    """Run the last turn's calls not yet answered, at once; then give every answer to the model."""
    pending = [(i, c) for i, c in enumerate(loop.calls) if c.status in ("pending", "running", "waiting")]
    outcomes = await asyncio.gather(
        *(_one_call(step, loop, run, i, c) for i, c in pending), return_exceptions=True
    )
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    for call in loop.calls:
        loop.messages.append({"role": "tool", "tool_call_id": call.id, "content": call.result or ""})
    loop.calls = []
    _show(step, loop, run)


async def _one_call(
    step: AgentStep, loop: AgentLoopState, run: StepRun, index: int, call: AgentToolCallState
) -> None:
    tool = next((t for t in loop.tools if t["name"] == call.tool), None)
    if tool is None:
        names = ", ".join(t["name"] for t in loop.tools) or "none"
        return _error(step, call, f"there is no tool {call.tool!r}; the tools are: {names}", fatal=False)
    arguments = _arguments(call.arguments)
    if not isinstance(arguments, dict):
        return _error(
            step, call, f"the arguments are not a JSON object: {call.arguments!r:.200}", fatal=False
        )
    problems = schema_errors(arguments, tool["parameters"])
    if problems:
        return _error(step, call, "invalid arguments: " + "; ".join(problems), fatal=False)
    if await _needs_approval(step, run, tool, arguments):
        decided = await _approve(step, loop, run, index, call, arguments)
        if not decided:
            return None
    call.status = "running"
    _show(step, loop, run)
    try:
        call.result = await _execute(step, loop, run, index, tool, arguments)
    except StepFailure as exc:
        return _error(step, call, exc.message, fatal=step.on_tool_error == "fail")
    call.status = "done"
    loop.tool_calls += 1
    _show(step, loop, run)
    return None


def _error(step: AgentStep, call: AgentToolCallState, message: str, *, fatal: bool) -> None:
    if fatal:
        raise StepFailure(f"agent {step.id!r}: tool {call.tool!r} failed: {message}", FailureType.STEP_FAILED)
    call.status = "error"
    call.result = json.dumps({"error": message})


async def _needs_approval(
    step: AgentStep, run: StepRun, tool: dict[str, Any], arguments: dict[str, Any]
) -> bool:
    if tool.get("approval"):
        return True
    if step.approval_when is None:
        return False
    scope = Scope({**run.scope.context, "tool": tool["name"], "arguments": arguments})
    return bool(run.evaluate(step.approval_when, "approval_when", scope))


async def _approve(
    step: AgentStep,
    loop: AgentLoopState,
    run: StepRun,
    index: int,
    call: AgentToolCallState,
    arguments: dict[str, Any],
) -> bool:
    """Wait for a decision on this call; a rejection is the call's answer. True when approved."""
    engine = run.engine
    approval_id = call.approval_id or f"{step.id}.{loop.turn}.{index}"
    call.approval_id = approval_id
    decision = engine.decision(approval_id)
    if decision.status not in ("approved", "rejected"):
        decision.tool, decision.arguments, decision.approvers = call.tool, arguments, step.approvers
        said = _last_text(loop)
        decision.message = f"agent {step.id!r} turn {loop.turn} calls {call.tool}" + (
            f" — it said: {said[:500]}" if said else ""
        )
        decision.status = "waiting"
        if step.approval_timeout_s:
            decision.deadline = engine.effects.now() + timedelta(seconds=step.approval_timeout_s)
        call.status = "waiting"
        _show(step, loop, run)
        engine.awaiting_changed()
        engine.lifecycle("approval.requested", step.id, {"approval_id": approval_id, "tool": call.tool})
        try:
            arrived = await engine.effects.wait(
                lambda: decision.status in ("approved", "rejected"),
                timeout=step.approval_timeout_s,
                summary=f"{approval_id} · approval timeout",
            )
        except GeneratorExit:
            raise
        if not arrived:
            decision.status, decision.by, decision.timed_out = "rejected", "timeout", True
            decision.decided_at = engine.effects.now()
        engine.awaiting_changed()
        engine.lifecycle(
            "approval.decided",
            step.id,
            {"approval_id": approval_id, "decision": decision.status, "by": decision.by},
        )
    if decision.status == "rejected":
        why = "timed out" if decision.timed_out else f"rejected by {decision.by or 'someone'}"
        call.status = "rejected"
        call.result = json.dumps({"error": f"the call was not approved: {why}", "comment": decision.comment})
        return False
    return True


async def _execute(
    step: AgentStep,
    loop: AgentLoopState,
    run: StepRun,
    index: int,
    tool: dict[str, Any],
    arguments: dict[str, Any],
) -> str:
    engine = run.engine
    spec = step.tools[tool["source"]]
    label = f"{step.id} · turn {loop.turn} · {tool['name']}"
    if isinstance(spec, McpTools):
        text, is_error = await engine.effects.mcp_call(
            McpCall(
                server=spec.server,
                tool=tool["remote"],
                arguments=arguments,
                step_id=step.id,
                timeout_s=step.timeout_s,
                heartbeat_timeout_s=step.heartbeat_timeout_s,
                retry=step.tool_retry,
                summary=label,
                call_id=f"{engine.info.workflow_id}/{run.scope.label}{step.id}.{loop.turn}.{index}",
            )
        )
        if is_error:
            raise StepFailure(f"the tool reported an error: {text}", FailureType.TOOL_REQUEST_FAILED)
        return text
    if isinstance(spec, PipelineTool):
        child = await engine.effects.child(
            ChildCall(
                step_id=step.id,
                name=spec.pipeline,
                workflow_id=f"{engine.info.workflow_id}/{run.scope.label}{step.id}-{loop.turn}-{index}",
                request={
                    "pipeline": None,
                    "pipeline_name": spec.pipeline,
                    "pipeline_version": spec.version,
                    "inputs": arguments,
                    "tenant": engine.info.tenant,
                },
                summary=label,
            )
        )
        run.account(child.usage, child.cost_usd, None)
        return json.dumps(child.outputs)
    if not isinstance(spec, HttpTool):
        raise StepFailure(
            f"step {step.id!r}: tool source {tool['source']} is unknown", FailureType.PIPELINE_ERROR
        )
    scope = Scope({**run.scope.context, "arguments": arguments})
    url = run.render(spec.url, "tools.url", scope)
    get = spec.method == "GET"
    result = await engine.effects.tool(
        ToolCall(
            url=url,
            method=spec.method,
            headers=dict(spec.headers),
            query={k: v if isinstance(v, str) else json.dumps(v) for k, v in arguments.items()}
            if get
            else {},
            body=None if get else arguments,
            timeout_s=step.timeout_s,
            heartbeat_timeout_s=step.heartbeat_timeout_s,
            step_id=step.id,
            retry=step.tool_retry,
            summary=label,
        )
    )
    body = result.body
    return body if isinstance(body, str) else json.dumps(body)


KIND = StepKind("agent", AgentStep, run, "a model calling tools in a loop (HTTP, sub-pipelines, MCP)")
