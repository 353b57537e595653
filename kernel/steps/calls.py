"""Steps that call out through an activity besides ``llm``: ``tool`` (an allow-listed HTTP call),
``embed`` (embeddings) and ``pipeline`` (a sub-pipeline as a child workflow)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from kernel.contracts import EmbedRequest
from kernel.errors import FailureType
from kernel.steps.base import MODEL_PATTERN, NAME_PATTERN, RetrySpec, StepKind, StepSpec
from kernel.steps.context import ChildCall, EmbedCall, StepRun, ToolCall, json_value

if TYPE_CHECKING:
    from kernel.pipeline import PipelineSpec

__all__ = ["EMBED", "PIPELINE", "TOOL", "EmbedStep", "PipelineStep", "ToolStep"]

_HEARTBEAT = {"heartbeat_timeout_s": {2: 8.0}}


class ToolStep(StepSpec):
    """An HTTP call from the worker. The URL must be on the worker's allow-list. Strings in ``url``,
    ``headers``, ``query`` and ``body`` are templates (``{{ expr }}`` alone keeps its type).
    Output: the response body (JSON decoded when it is JSON); ``steps.<id>.status_code``."""

    versioned_defaults: ClassVar[dict[str, dict[int, Any]]] = _HEARTBEAT

    type: Literal["tool"]
    url: str = Field(min_length=1)
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    body: Any = None
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    heartbeat_timeout_s: float | None = Field(default=None, gt=0, le=3600)
    retry: RetrySpec | None = None

    def templates(self) -> list[tuple[str, Any]]:
        pairs: list[tuple[str, Any]] = [("url", self.url), ("headers", self.headers), ("query", self.query)]
        return [*pairs, ("body", self.body)] if self.body is not None else pairs


async def _tool(step: ToolStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    url = run.render(step.url, "url")
    result = await run.effects.tool(
        ToolCall(
            url=url,
            method=step.method,
            headers={k: str(v) for k, v in run.value(step.headers, "headers").items()},
            query={k: str(v) for k, v in run.value(step.query, "query").items()},
            body=json_value(run.value(step.body, "body"), run.where("body")),
            timeout_s=step.timeout_s,
            heartbeat_timeout_s=step.heartbeat_timeout_s,
            step_id=step.id,
            retry=step.retry or run.spec.retry,
            summary=f"{step.id} · {step.method} {url.split('?')[0][:120]}",
        )
    )
    return result.body, {"status_code": result.status_code}


TOOL = StepKind("tool", ToolStep, _tool, "an HTTP call to an allow-listed endpoint")


class EmbedStep(StepSpec):
    """Embed text. ``input`` is a template (or a list of them); ``{{ expr }}`` giving a list embeds
    each item. Output: one vector, or a list of vectors when the input is a list."""

    versioned_defaults: ClassVar[dict[str, dict[int, Any]]] = _HEARTBEAT

    type: Literal["embed"]
    model: str = Field(pattern=MODEL_PATTERN)
    input: str | list[str]
    dimensions: int | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    heartbeat_timeout_s: float | None = Field(default=None, gt=0, le=3600)
    retry: RetrySpec | None = None

    def templates(self) -> list[tuple[str, Any]]:
        return [("input", self.input)]

    def models(self) -> list[str]:
        return [self.model]


async def _embed(step: EmbedStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    engine, state = run.engine, run.state
    value = run.value(step.input, "input")
    texts = value if isinstance(value, list) else [value]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise run.fail(
            f"step {step.id!r} input must be text or a list of texts, got {value!r:.120}",
            FailureType.PIPELINE_ERROR,
        )
    model = engine.route(step.model)
    state.model = model
    result = await engine.effects.embed(
        EmbedCall(
            model=model,
            request=EmbedRequest(model=model, input=texts, dimensions=step.dimensions),
            step_id=step.id,
            pipeline=engine.spec.name,
            timeout_s=step.timeout_s,
            heartbeat_timeout_s=step.heartbeat_timeout_s,
            retry=step.retry or engine.spec.retry,
            summary=f"{step.id} · embed · {model}",
        )
    )
    state.model, state.provider = result.model_ref, result.provider
    run.account(result.response.usage, result.cost_usd, result.model_ref)
    engine.note_provider(result.provider)
    await engine.check_budget()
    vectors = result.response.embeddings
    return (vectors if isinstance(value, list) else vectors[0]), {"model": result.model_ref}


EMBED = StepKind("embed", EmbedStep, _embed, "embeddings through the same registry")


class PipelineStep(StepSpec):
    """Run another pipeline as a child workflow: a registered one by ``pipeline`` (and ``version``),
    or ``spec`` inline. ``inputs`` are templates. Output: the child's outputs."""

    type: Literal["pipeline"]
    pipeline: str | None = Field(default=None, pattern=NAME_PATTERN)
    version: int | None = Field(default=None, ge=1)
    spec: PipelineSpec | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _name_or_spec(self) -> PipelineStep:
        if (self.pipeline is None) == (self.spec is None):
            raise ValueError("give exactly one of 'pipeline' (a registered name) or 'spec' (inline)")
        if self.spec is not None and self.version is not None:
            raise ValueError("'version' goes with a registered 'pipeline', not with an inline 'spec'")
        return self

    def templates(self) -> list[tuple[str, Any]]:
        return [("inputs", self.inputs)]


async def _child(step: PipelineStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    engine = run.engine
    inputs = run.value(step.inputs, "inputs")
    request: dict[str, Any] = {
        "pipeline": step.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        if step.spec
        else None,
        "pipeline_name": step.pipeline,
        "pipeline_version": step.version,
        "inputs": inputs,
        "tenant": engine.info.tenant,
    }
    child_id = f"{engine.info.workflow_id}/{run.scope.label}{step.id}"
    name = step.pipeline or (step.spec.name if step.spec else "inline")
    run.detail(f"child workflow {child_id}")
    result = await engine.effects.child(
        ChildCall(
            step_id=step.id,
            name=name,
            workflow_id=child_id,
            request=request,
            summary=f"sub-pipeline {name} of step {step.id}",
        )
    )
    run.account(result.usage, result.cost_usd, None)
    unknown = engine.state.status.cost_unknown_models
    unknown.extend(m for m in result.cost_unknown_models if m not in unknown)
    await engine.check_budget()
    return result.outputs, {"workflow_id": child_id}


PIPELINE = StepKind("pipeline", PipelineStep, _child, "a sub-pipeline as a child workflow")
