"""The pipeline language: a declarative spec (YAML on disk, JSON on the wire) validated before start.

A pipeline has typed ``inputs``, ordered ``steps`` (discriminated on ``type``: llm, parallel, map,
switch, transform, approval, wait_event, sleep, tool, embed, pipeline; ``llm`` when omitted) and
``outputs`` rendered from templates. Templates and expressions see ``inputs`` and
``steps.<id>.output`` (plus ``.status`` and per-type extras such as ``.text``, ``.model`` of llm
steps) of steps that ran before them, and inside a map its item variable. Any step may carry a
``when:`` guard. Every error names the step (by position and id) and the field that are wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from kernel.contracts import ResponseFormat, Tool
from kernel.errors import PipelineError
from kernel.expressions import expression_refs, value_refs
from kernel.routing import Balance
from kernel.templating import TemplateRefs, template_refs

__all__ = [
    "STEP_TYPES",
    "ApprovalStep",
    "BudgetSpec",
    "EmbedStep",
    "InputSpec",
    "LlmStep",
    "MapStep",
    "MessageTemplate",
    "ParallelStep",
    "PipelineSpec",
    "PipelineStep",
    "RetrySpec",
    "SleepStep",
    "Step",
    "SwitchCase",
    "SwitchStep",
    "ToolStep",
    "TransformStep",
    "WaitEventStep",
    "format_validation_error",
    "load_pipeline",
    "parse_pipeline",
]

_ID = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
_NAME = r"^[a-z0-9][a-z0-9_.-]{0,99}$"
_MODEL = r"^[A-Za-z0-9_.:-]+(/[^\s]+)?$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrySpec(_Spec):
    """How Temporal retries one model before the step moves on to its next fallback."""

    max_attempts: int = Field(default=4, ge=1, le=100)
    initial_interval_s: float = Field(default=1.0, gt=0, le=3600)
    backoff: float = Field(default=2.0, ge=1, le=10)
    max_interval_s: float | None = Field(default=None, gt=0, le=86400, description="Default: 100 x initial.")

    @model_validator(mode="after")
    def _interval_order(self) -> RetrySpec:
        if self.max_interval_s is not None and self.max_interval_s < self.initial_interval_s:
            raise ValueError(
                f"max_interval_s ({self.max_interval_s}) must not be below initial_interval_s ({self.initial_interval_s})"
            )
        return self


class InputSpec(_Spec):
    type: Literal["string", "integer", "number", "boolean", "object", "array"] = "string"
    required: bool = True
    default: Any = None
    description: str | None = None

    @model_validator(mode="after")
    def _default_makes_optional(self) -> InputSpec:
        if self.default is not None:
            self.required = False
        return self


class MessageTemplate(_Spec):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class _StepBase(_Spec):
    id: str = Field(pattern=_ID, description="Unique within the pipeline; templates read steps.<id>.")
    description: str | None = None
    when: str | None = Field(
        default=None, min_length=1, description="An expression; the step is skipped when it is false."
    )

    def templates(self) -> list[tuple[str, Any]]:
        """``(field, value)`` pairs whose strings are templates."""
        return []

    def expressions(self) -> list[tuple[str, str]]:
        """``(field, expression)`` pairs checked against what runs before the step."""
        return [("when", self.when)] if self.when else []

    def children(self) -> list[tuple[str, list[Step]]]:
        """Nested step lists, each with its field name."""
        return []


class LlmStep(_StepBase):
    """Ask a model. ``model`` is ``provider/model`` or an alias configured on the worker; ``fallbacks``
    are tried in order when a model's retries are exhausted or its error cannot be retried.
    ``output_schema`` asks for JSON of that schema, validates the answer and re-asks up to
    ``max_repairs`` times with the validation error before the model counts as failed."""

    type: Literal["llm"] = "llm"
    model: str = Field(pattern=_MODEL)
    fallbacks: list[Annotated[str, Field(pattern=_MODEL)]] = Field(default_factory=list, max_length=10)
    balance: Balance | None = Field(default=None, description="Spread calls by weight; see workflows.calls.")
    system: str | None = None
    prompt: str | None = None
    messages: list[MessageTemplate] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    response_format: ResponseFormat | None = None
    output_schema: dict[str, Any] | None = Field(default=None, description="JSON Schema of the answer.")
    max_repairs: int = Field(default=2, ge=0, le=10)
    tools: list[Tool] | None = None
    output: Literal["text", "json"] = "text"
    stream: bool = Field(default=False, description="Stream tokens (heartbeating as they arrive).")
    local_activity: bool = Field(default=False, description="Run as a local activity (lower latency).")
    timeout_s: float = Field(default=120.0, gt=0, le=86400, description="Per attempt.")
    heartbeat_timeout_s: float | None = Field(default=None, gt=0, le=3600)
    retry: RetrySpec | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> LlmStep:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None and self.system is not None:
            raise ValueError("'system' goes with 'prompt'; with 'messages' add a message of role system")
        if self.output_schema is not None:
            if self.response_format is not None:
                raise ValueError("give 'output_schema' or 'response_format', not both")
            if not isinstance(self.output_schema.get("type", "object"), str | list):
                raise ValueError("'output_schema' must be a JSON Schema object")
            self.output = "json"
        return self

    def message_templates(self) -> list[MessageTemplate]:
        if self.messages is not None:
            return self.messages
        templates = [MessageTemplate(role="system", content=self.system)] if self.system else []
        return [*templates, MessageTemplate(role="user", content=self.prompt or "")]

    def templates(self) -> list[tuple[str, Any]]:
        return [(f"messages[{i}].content", m.content) for i, m in enumerate(self.message_templates())]


class ParallelStep(_StepBase):
    """Run named branches at once. ``fail_fast`` cancels the other branches when one fails;
    ``all_settled`` lets every branch finish and records the failures. Output: ``{branch: output of
    its last step}`` (``None`` for a failed branch); ``steps.<id>.errors`` maps failed branches to why."""

    type: Literal["parallel"]
    branches: dict[str, list[Step]] = Field(min_length=1, max_length=50)
    on_failure: Literal["fail_fast", "all_settled"] = "fail_fast"

    @field_validator("branches")
    @classmethod
    def _branch_names(cls, branches: dict[str, list[Step]]) -> dict[str, list[Step]]:
        for name, steps in branches.items():
            if not re.match(_ID, name):
                raise ValueError(f"branch name {name!r} must be an identifier (letters, digits, _)")
            if not steps:
                raise ValueError(f"branch {name!r} has no steps")
        return branches

    def children(self) -> list[tuple[str, list[Step]]]:
        return [(f"branches.{name}", steps) for name, steps in self.branches.items()]


class MapStep(_StepBase):
    """Run ``steps`` once per item of ``items`` (a template such as ``{{ inputs.tickets }}``), at most
    ``concurrency`` items at a time. Inside, templates read the item as ``item_var`` and its position
    as ``index_var``. Output: the output of the last step for each item, in input order."""

    type: Literal["map"]
    items: str = Field(min_length=1)
    item_var: str = Field(default="item", pattern=_ID)
    index_var: str = Field(default="index", pattern=_ID)
    concurrency: int = Field(default=4, ge=1, le=100)
    max_items: int = Field(default=500, ge=1, le=10_000)
    steps: list[Step] = Field(min_length=1, max_length=100)

    @model_validator(mode="after")
    def _variables(self) -> MapStep:
        taken = {"inputs", "steps"}
        for name in (self.item_var, self.index_var):
            if name in taken:
                raise ValueError(f"map variable {name!r} is already taken; choose another name")
            taken.add(name)
        return self

    def templates(self) -> list[tuple[str, Any]]:
        return [("items", self.items)]

    def children(self) -> list[tuple[str, list[Step]]]:
        return [("steps", self.steps)]


class SwitchCase(_Spec):
    when: str = Field(min_length=1)
    steps: list[Step] = Field(min_length=1, max_length=100)


class SwitchStep(_StepBase):
    """Run the steps of the first case whose ``when`` holds, else ``default``; the steps of the other
    cases are ``skipped``. Output: the output of the last step run (``steps.<id>.case`` says which)."""

    type: Literal["switch"]
    cases: list[SwitchCase] = Field(min_length=1, max_length=50)
    default: list[Step] = Field(default_factory=list, max_length=100)

    def expressions(self) -> list[tuple[str, str]]:
        return [*super().expressions(), *((f"cases[{i}].when", c.when) for i, c in enumerate(self.cases))]

    def children(self) -> list[tuple[str, list[Step]]]:
        cases = [(f"cases[{i}].steps", c.steps) for i, c in enumerate(self.cases)]
        return [*cases, ("default", self.default)]


class TransformStep(_StepBase):
    """Compute a value with a safe expression, e.g. ``{"n": steps.split.output | length}``."""

    type: Literal["transform"]
    expression: str = Field(min_length=1)

    def expressions(self) -> list[tuple[str, str]]:
        return [*super().expressions(), ("expression", self.expression)]


class ApprovalStep(_StepBase):
    """Wait for a person: the ``approve`` / ``reject`` updates decide. After ``timeout_s`` the
    ``default`` decision applies. A rejection fails the pipeline unless ``on_reject: continue``.
    Output: ``{decision, by, comment, timed_out}``."""

    type: Literal["approval"]
    message: str | None = Field(default=None, description="What is to be approved (a template).")
    approvers: list[str] | None = Field(default=None, description="Who may decide; anyone if unset.")
    timeout_s: float | None = Field(default=None, gt=0, le=365 * 86400)
    default: Literal["approve", "reject"] = "reject"
    on_reject: Literal["fail", "continue"] = "fail"

    def templates(self) -> list[tuple[str, Any]]:
        return [("message", self.message)] if self.message else []


class WaitEventStep(_StepBase):
    """Wait for the business event ``event`` (the ``event`` signal; an event that arrived earlier is
    kept and taken at once). Output: the event's payload (``None`` after a timeout with
    ``on_timeout: continue``)."""

    type: Literal["wait_event"]
    event: str = Field(pattern=_NAME)
    timeout_s: float | None = Field(default=None, gt=0, le=365 * 86400)
    on_timeout: Literal["fail", "continue"] = "fail"


class SleepStep(_StepBase):
    """A durable timer: the pipeline waits ``seconds`` (surviving worker restarts)."""

    type: Literal["sleep"]
    seconds: float = Field(gt=0, le=365 * 86400)


class ToolStep(_StepBase):
    """An HTTP call from the worker. The URL must be on the worker's allow-list. Strings in ``url``,
    ``headers``, ``query`` and ``body`` are templates (``{{ expr }}`` alone keeps its type).
    Output: the response body (JSON decoded when it is JSON); ``steps.<id>.status_code``."""

    type: Literal["tool"]
    url: str = Field(min_length=1)
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    body: Any = None
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    retry: RetrySpec | None = None

    def templates(self) -> list[tuple[str, Any]]:
        pairs: list[tuple[str, Any]] = [("url", self.url), ("headers", self.headers), ("query", self.query)]
        return [*pairs, ("body", self.body)] if self.body is not None else pairs


class EmbedStep(_StepBase):
    """Embed text. ``input`` is a template (or a list of them); ``{{ expr }}`` giving a list embeds
    each item. Output: one vector, or a list of vectors when the input is a list."""

    type: Literal["embed"]
    model: str = Field(pattern=_MODEL)
    input: str | list[str]
    dimensions: int | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    retry: RetrySpec | None = None

    def templates(self) -> list[tuple[str, Any]]:
        return [("input", self.input)]


class PipelineStep(_StepBase):
    """Run another pipeline as a child workflow: a registered one by ``pipeline`` (and ``version``),
    or ``spec`` inline. ``inputs`` are templates. Output: the child's outputs."""

    type: Literal["pipeline"]
    pipeline: str | None = Field(default=None, pattern=_NAME)
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


STEP_TYPES: dict[str, type[_StepBase]] = {
    "llm": LlmStep,
    "parallel": ParallelStep,
    "map": MapStep,
    "switch": SwitchStep,
    "transform": TransformStep,
    "approval": ApprovalStep,
    "wait_event": WaitEventStep,
    "sleep": SleepStep,
    "tool": ToolStep,
    "embed": EmbedStep,
    "pipeline": PipelineStep,
}


def _step_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        tag = value.get("type", "llm")
        return tag if isinstance(tag, str) else None
    return getattr(value, "type", None)


Step = Annotated[
    Annotated[LlmStep, Tag("llm")]
    | Annotated[ParallelStep, Tag("parallel")]
    | Annotated[MapStep, Tag("map")]
    | Annotated[SwitchStep, Tag("switch")]
    | Annotated[TransformStep, Tag("transform")]
    | Annotated[ApprovalStep, Tag("approval")]
    | Annotated[WaitEventStep, Tag("wait_event")]
    | Annotated[SleepStep, Tag("sleep")]
    | Annotated[ToolStep, Tag("tool")]
    | Annotated[EmbedStep, Tag("embed")]
    | Annotated[PipelineStep, Tag("pipeline")],
    Discriminator(
        _step_tag,
        custom_error_type="unknown_step_type",
        custom_error_message=f"unknown step type; use one of {', '.join(STEP_TYPES)}",
    ),
]


class BudgetSpec(_Spec):
    """Spending limits checked after each model call. ``fail`` fails the pipeline; ``pause`` waits
    for the ``resume`` signal (which may carry new limits)."""

    max_tokens: int | None = Field(default=None, gt=0)
    max_cost_usd: float | None = Field(default=None, gt=0)
    on_exceed: Literal["fail", "pause"] = "fail"

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetSpec:
        if self.max_tokens is None and self.max_cost_usd is None:
            raise ValueError("a budget needs max_tokens or max_cost_usd")
        return self


class PipelineSpec(_Spec):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    version: int = Field(default=1, ge=1)
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1, max_length=500)
    outputs: dict[str, str] = Field(default_factory=dict)
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Default retry policy of steps.")
    budget: BudgetSpec | None = None

    @field_validator("inputs")
    @classmethod
    def _input_names(cls, inputs: dict[str, InputSpec]) -> dict[str, InputSpec]:
        for name in inputs:
            if not re.match(_ID, name):
                raise ValueError(f"input name {name!r} must be an identifier (letters, digits, _)")
        return inputs

    @model_validator(mode="after")
    def _check_references(self) -> PipelineSpec:
        all_ids = {s.id for s, _ in self.walk()}
        _Checker(self, all_ids).steps(self.steps, "steps", available=set(), variables=set(), seen=set())
        available = {s.id for s, inside_map in self.walk() if not inside_map}
        for name, source in self.outputs.items():
            _Checker(self, all_ids).template(source, f"outputs.{name}", available, set())
        return self

    def walk(self) -> Iterator[tuple[Step, bool]]:
        """Every step, nested ones included, depth first; the flag says whether it runs inside a map."""
        yield from _walk(self.steps, inside_map=False)

    def step(self, step_id: str) -> Step:
        for step, _ in self.walk():
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def models(self) -> list[str]:
        models: set[str] = set()
        for step, _ in self.walk():
            if isinstance(step, LlmStep):
                models.update((step.model, *step.fallbacks, *(b.model for b in step.balance or [])))
            elif isinstance(step, EmbedStep):
                models.add(step.model)
        return sorted(models)

    def resolve_inputs(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Apply defaults and check required inputs and types; unknown inputs are refused."""
        unknown = sorted(set(given) - set(self.inputs))
        if unknown:
            raise PipelineError(
                f"pipeline {self.name!r} has no input(s) {unknown}; it takes {sorted(self.inputs) or 'none'}",
                location="inputs",
            )
        resolved: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            if name in given:
                value = given[name]
                if not _type_ok(spec.type, value):
                    raise PipelineError(
                        f"input {name!r} must be of type {spec.type}, got {type(value).__name__} {value!r:.80}",
                        location=f"inputs.{name}",
                    )
                resolved[name] = value
            elif spec.required:
                raise PipelineError(
                    f"pipeline {self.name!r} needs input {name!r} ({spec.type})"
                    + (f": {spec.description}" if spec.description else ""),
                    location=f"inputs.{name}",
                )
            else:
                resolved[name] = spec.default
        return resolved


def _walk(steps: list[Step], *, inside_map: bool) -> Iterator[tuple[Step, bool]]:
    for step in steps:
        yield step, inside_map
        for _, children in step.children():
            yield from _walk(children, inside_map=inside_map or isinstance(step, MapStep))


class _Checker:
    """Checks ids and what each template and expression reads, scope by scope."""

    def __init__(self, spec: PipelineSpec, all_ids: set[str]) -> None:
        self.spec = spec
        self.all_ids = all_ids

    def steps(
        self, steps: list[Step], path: str, *, available: set[str], variables: set[str], seen: set[str]
    ) -> set[str]:
        """Check ``steps``; returns the step ids visible after them."""
        available = set(available)
        for index, step in enumerate(steps):
            where = f"{path}[{index}] (id {step.id!r})"
            if step.id in seen:
                raise ValueError(f"{where}: step id {step.id!r} is used twice")
            seen.add(step.id)
            for field, expression in step.expressions():
                location = f"step {step.id!r} {field}"
                self.refs(expression_refs(expression, location=location), location, available, variables)
            for field, value in step.templates():
                for refs in value_refs(value, location=f"step {step.id!r} {field}"):
                    self.refs(refs, f"step {step.id!r} {field}", available, variables)
            inner_vars = variables
            if isinstance(step, MapStep):
                inner_vars = variables | {step.item_var, step.index_var}
            visible_after: set[str] = set()
            for field, children in step.children():
                if isinstance(step, MapStep):
                    for child, _ in _walk(children, inside_map=True):
                        if isinstance(child, ApprovalStep):
                            raise ValueError(
                                f"step {child.id!r}: an approval cannot run inside map {step.id!r} "
                                "(one decision could not name the item)"
                            )
                visible_after |= self.steps(
                    children, f"{where}.{field}", available=available, variables=inner_vars, seen=seen
                )
            if not isinstance(step, MapStep):
                available |= visible_after
            available.add(step.id)
        return available

    def template(self, source: str, location: str, available: set[str], variables: set[str]) -> None:
        self.refs(template_refs(source, location=location), location, available, variables)

    def refs(self, refs: TemplateRefs, location: str, available: set[str], variables: set[str]) -> None:
        allowed = {"inputs", "steps", *variables}
        unknown = refs.variables - allowed
        if unknown:
            raise ValueError(
                f"{location}: reads {sorted(unknown)}; templates and expressions may read "
                + ", ".join(repr(v) for v in sorted(allowed))
            )
        for step_id in refs.attributes.get("steps", set()):
            if step_id not in available:
                raise ValueError(
                    f"{location}: template reads steps.{step_id}, which "
                    + ("does not run before it" if step_id in self.all_ids else "is no step")
                    + f"; steps before it: {sorted(available) or 'none'}"
                )
        for input_name in refs.attributes.get("inputs", set()):
            if input_name not in self.spec.inputs:
                raise ValueError(
                    f"{location}: template reads inputs.{input_name}, which is not declared; "
                    f"declared inputs: {sorted(self.spec.inputs) or 'none'}"
                )


def _type_ok(kind: str, value: Any) -> bool:
    match kind:
        case "string":
            return isinstance(value, str)
        case "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        case "number":
            return isinstance(value, int | float) and not isinstance(value, bool)
        case "boolean":
            return isinstance(value, bool)
        case "object":
            return isinstance(value, dict)
        case "array":
            return isinstance(value, list)
    return False


def format_validation_error(exc: ValidationError, *, prefix: str = "pipeline", data: Any = None) -> str:
    """One line per problem, each naming where it is and what is wrong. Given the validated ``data``,
    a step is named by position and id (``steps[2] (id 'draft').model``); union tags are dropped."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = _location(error["loc"], data)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        elif error["type"] == "string_pattern_mismatch":
            message = f"{message} (got {error.get('input')!r})"
        lines.append(f"{prefix}.{loc}: {message}" if loc else f"{prefix}: {message}")
    return "; ".join(lines)


def _location(parts: tuple[int | str, ...], data: Any) -> str:
    text = ""
    node = data
    after_index = False
    for part in parts:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            text += f"[{part}]"
            if isinstance(node, Mapping) and isinstance(node.get("id"), str):
                text += f" (id {node['id']!r})"
            after_index = True
            continue
        if after_index and part in STEP_TYPES and (node is None or _step_tag(node) == part):
            after_index = False
            continue  # the discriminated union's tag: the step is already named
        after_index = False
        node = node.get(part) if isinstance(node, Mapping) else None
        text += f".{part}" if text else str(part)
    return text


def parse_pipeline(data: Mapping[str, Any] | str) -> PipelineSpec:
    """Validate a pipeline given as a mapping or JSON/YAML text; ``PipelineError`` names every problem."""
    if isinstance(data, str):
        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise PipelineError(f"pipeline is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise PipelineError(f"a pipeline must be a mapping with name and steps, got {type(data).__name__}")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise PipelineError(format_validation_error(exc, data=data)) from exc
    except PipelineError:
        raise


def load_pipeline(path: str | Path) -> PipelineSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineError(f"cannot read pipeline file {str(path)!r}: {exc.strerror}") from exc
    try:
        return parse_pipeline(text)
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc.message}", location=exc.location) from exc


for _model in (ParallelStep, MapStep, SwitchCase, SwitchStep, PipelineStep, PipelineSpec):
    _model.model_rebuild()
