"""The interpreter on its own: a pipeline runs through in-memory effects, with no Temporal server.

Model calls are answered by a script, timers complete at once, waits are met by what the test
changes in the run state; each test asserts what the pipeline does, step by step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kernel.contracts import AssistantMessage, ChatResponse, Choice, EmbedResponse, Usage
from kernel.engine import (
    CallResult,
    ChildCall,
    ChildResult,
    EmbedCall,
    EmbedResult,
    Engine,
    LifecycleEvent,
    ModelCall,
    RunInfo,
    SearchField,
    ToolCall,
    ToolResult,
)
from kernel.errors import FailureType
from kernel.pipeline import parse_pipeline
from kernel.run import ModelFailure, PipelineStatus, RunState, StepState
from kernel.steps import StepFailure
from kernel.steps.context import McpCall, McpList


@dataclass
class _Answer:
    response: ChatResponse
    model_ref: str
    provider: str
    cost_usd: float | None


@dataclass
class _Vectors:
    response: EmbedResponse
    model_ref: str
    provider: str
    cost_usd: float | None


@dataclass
class _ToolAnswer:
    status_code: int
    body: Any


@dataclass
class FakeEffects:
    """Answers every model with ``answers[model]`` (a callable of the request's last message, or an
    exception to raise), keeps what the pipeline asked of the world."""

    answers: dict[str, Any] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    slept: list[float] = field(default_factory=list)
    search_updates: list[tuple[str, Any]] = field(default_factory=list)
    events: list[LifecycleEvent] = field(default_factory=list)
    clock: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    on_wait: Callable[[], None] | None = None

    def now(self) -> datetime:
        return self.clock

    def random(self) -> float:
        return 0.0

    async def sleep(self, seconds: float, *, summary: str) -> None:
        self.slept.append(seconds)
        self.clock += timedelta(seconds=seconds)

    async def wait(self, condition: Callable[[], bool], *, timeout: float | None, summary: str) -> bool:  # noqa: ASYNC109
        if not condition() and self.on_wait is not None:
            self.on_wait()
        if condition():
            return True
        if timeout is None:
            raise AssertionError(f"the pipeline would wait forever ({summary})")
        self.clock += timedelta(seconds=timeout)
        return False

    async def call_model(self, call: ModelCall) -> tuple[CallResult, Any]:
        failures: list[ModelFailure] = []
        for number, planned in enumerate(call.models, start=1):
            model = call.route(planned) if call.route else planned
            if call.on_attempt:
                call.on_attempt(model, number)
            self.calls.append(model)
            answer = self.answers.get(model)
            if isinstance(answer, Exception) or answer is None:
                failure = ModelFailure(model=model, error_type="UpstreamError", message=str(answer))
                failures.append(failure)
                if call.on_failure:
                    call.on_failure(failure)
                continue
            text = answer(call.request.messages[-1].content)
            result = _Answer(
                ChatResponse(
                    id="r",
                    model=model,
                    provider=model.split("/")[0],
                    choices=[Choice(message=AssistantMessage(content=text), finish_reason="stop")],
                    usage=Usage(prompt_tokens=10, completion_tokens=5),
                ),
                model,
                model.split("/")[0],
                0.001,
            )
            output = call.validate(result) if call.validate else text
            return result, output
        raise StepFailure(f"{call.label} failed on every model", FailureType.STEP_FAILED)

    async def embed(self, call: EmbedCall) -> EmbedResult:
        response = EmbedResponse(
            model=call.model,
            provider="openai",
            embeddings=[[0.5, 0.5] for _ in call.request.input],
            usage=Usage(),
        )
        return _Vectors(response, call.model, "openai", None)

    async def tool(self, call: ToolCall) -> ToolResult:
        return _ToolAnswer(200, {"url": call.url, "body": call.body})

    async def child(self, call: ChildCall) -> ChildResult:
        raise StepFailure("no children here", FailureType.STEP_FAILED)

    async def mcp_tools(self, call: McpList) -> list[dict[str, Any]]:
        raise StepFailure("no MCP servers here", FailureType.STEP_FAILED)

    async def mcp_call(self, call: McpCall) -> tuple[str, bool]:
        raise StepFailure("no MCP servers here", FailureType.STEP_FAILED)

    def continue_as_new_suggested(self) -> bool:
        return False

    async def pipeline_problem(self, name: str, version: int | None) -> str | None:
        return f"no pipeline {name!r} here"

    def search(self, updates: Mapping[SearchField, str | list[str]]) -> None:
        self.search_updates.extend(updates.items())

    def details(self, text: str) -> None:
        pass

    def lifecycle(self, event: LifecycleEvent) -> None:
        self.events.append(event)


def _engine(spec_data: dict[str, Any], effects: FakeEffects, inputs: dict[str, Any] | None = None) -> Engine:
    spec = parse_pipeline(spec_data)
    steps = [StepState(id=s.id, type=s.type) for s, inside in spec.walk() if not inside]
    state = RunState(status=PipelineStatus(pipeline=spec.name, steps=steps, budget=spec.budget))
    state.inputs.update(spec.resolve_inputs(inputs or {}))
    return Engine(spec, state, effects, RunInfo(workflow_id="wf-1", pipeline=spec.name))


async def _run(engine: Engine) -> None:
    scope = engine.top_scope()
    for step in engine.spec.steps:
        await engine.run_step(step, scope)


async def test_steps_chain_through_templates_with_fallback_and_accounting() -> None:
    effects = FakeEffects(
        answers={
            "openai/gpt-4o-mini": lambda prompt: '{"category": "billing"}',
            "openai/gpt-4.1": RuntimeError("503"),
            "anthropic/claude": lambda prompt: f"reply to: {prompt}",
        }
    )
    engine = _engine(
        {
            "name": "triage",
            "inputs": {"ticket": {"type": "string"}},
            "steps": [
                {
                    "id": "classify",
                    "model": "openai/gpt-4o-mini",
                    "prompt": "{{ inputs.ticket }}",
                    "output_schema": {"type": "object", "required": ["category"]},
                },
                {
                    "id": "draft",
                    "model": "openai/gpt-4.1",
                    "fallbacks": ["anthropic/claude"],
                    "prompt": "{{ steps.classify.output.category }}: {{ inputs.ticket }}",
                },
                {"id": "pause", "type": "sleep", "seconds": 30},
                {"id": "count", "type": "transform", "expression": "steps.draft.output | length"},
            ],
        },
        effects,
        {"ticket": "charged twice"},
    )
    await _run(engine)
    status = engine.state.status
    assert [s.status for s in status.steps] == ["completed"] * 4
    assert status.steps[1].output == "reply to: billing: charged twice"
    assert (
        status.steps[1].model == "anthropic/claude" and status.steps[1].failures[0].model == "openai/gpt-4.1"
    )
    assert status.steps[3].output == len("reply to: billing: charged twice")
    assert effects.slept == [30]
    assert status.usage.total_tokens == 30 and status.cost_usd == pytest.approx(0.002)
    assert [e.type for e in effects.events] == [
        "step.completed",
        "model.fallback",
        "step.completed",
        "step.completed",
        "step.completed",
    ]
    assert ("providers", ["openai"]) in effects.search_updates and (
        "providers",
        ["openai", "anthropic"],
    ) in effects.search_updates


async def test_approval_inside_switch_and_map_items_in_order() -> None:
    effects = FakeEffects(answers={"openai/m": lambda prompt: prompt.upper()})
    engine = _engine(
        {
            "name": "flow",
            "inputs": {"words": {"type": "array"}},
            "steps": [
                {
                    "id": "each",
                    "type": "map",
                    "items": "{{ inputs.words }}",
                    "concurrency": 2,
                    "steps": [{"id": "shout", "model": "openai/m", "prompt": "{{ item }}"}],
                },
                {
                    "id": "route",
                    "type": "switch",
                    "cases": [
                        {
                            "when": "steps.each.output | length > 2",
                            "steps": [{"id": "ok", "type": "approval"}],
                        }
                    ],
                    "default": [{"id": "skip_me", "type": "transform", "expression": "1"}],
                },
            ],
        },
        effects,
        {"words": ["a", "b", "c"]},
    )
    decision = engine.decision("ok")

    def approve() -> None:
        decision.status, decision.by = "approved", "alice"

    effects.on_wait = approve
    await _run(engine)
    states = {s.id: s for s in engine.state.status.steps}
    assert states["each"].output == ["A", "B", "C"]
    assert states["ok"].output["decision"] == "approved" and states["ok"].output["by"] == "alice"
    assert states["skip_me"].status == "skipped"
    assert effects.search_updates[1:] == [
        ("awaiting", ["ok"]),
        ("status", "WaitingForApproval"),
        ("awaiting", []),
        ("status", "Running"),
    ]
    assert "shout" not in states  # a map's steps run once per item: not listed


async def test_rejection_timeout_and_budget_fail_with_their_failure_types() -> None:
    engine = _engine(
        {"name": "gate", "steps": [{"id": "ok", "type": "approval", "timeout_s": 60}]}, FakeEffects()
    )
    with pytest.raises(StepFailure) as rejected:
        await _run(engine)
    assert rejected.value.type == FailureType.APPROVAL_REJECTED and "timed out" in rejected.value.message

    effects = FakeEffects(answers={"openai/m": lambda prompt: "x" * 10})
    engine = _engine(
        {
            "name": "budget",
            "budget": {"max_tokens": 20},
            "steps": [
                {"id": "one", "model": "openai/m", "prompt": "a"},
                {"id": "two", "model": "openai/m", "prompt": "b"},
            ],
        },
        effects,
    )
    with pytest.raises(StepFailure) as over:
        await _run(engine)
    assert over.value.type == FailureType.BUDGET_EXCEEDED and "30 tokens used" in over.value.message
    assert effects.calls == ["openai/m", "openai/m"]


async def test_routes_reach_fallbacks_and_the_models_still_to_call() -> None:
    effects = FakeEffects(answers={"openai/b": lambda prompt: "b"})
    engine = _engine(
        {
            "name": "moves",
            "steps": [
                {"id": "one", "model": "openai/a", "prompt": "p"},
                {"id": "two", "model": "openai/c", "fallbacks": ["openai/d"], "prompt": "p"},
            ],
        },
        effects,
    )
    assert engine.remaining_models() == ["openai/a", "openai/c", "openai/d"]
    engine.state.status.routes.update({"openai/a": "openai/b", "openai/c": "openai/b"})
    assert engine.remaining_models() == ["openai/b", "openai/d"]
    await asyncio.wait_for(_run(engine), 5)
    assert effects.calls == ["openai/b", "openai/b"]
    assert engine.remaining_models() == []
