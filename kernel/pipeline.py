"""The pipeline language: a declarative spec (YAML on disk, JSON on the wire) validated before start.

A pipeline has typed ``inputs``, ordered ``steps`` (chosen by ``type`` from the table of step kinds in
``kernel.steps``: llm, parallel, map, switch, transform, approval, wait_event, sleep, tool, embed,
pipeline, and any kind a plugin registers; ``llm`` when omitted) and ``outputs`` rendered from
templates. Templates and expressions see ``inputs`` and
``steps.<id>.output`` (plus ``.status`` and per-type extras such as ``.text``, ``.model`` of llm
steps) of steps that ran before them, and inside a map its item variable. Any step may carry a
``when:`` guard. Every error names the step (by position and id) and the field that are wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernel.errors import PipelineError
from kernel.expressions import expression_refs, value_refs
from kernel.steps import (
    ApprovalStep,
    BudgetSpec,
    EmbedStep,
    LlmStep,
    MapStep,
    MessageTemplate,
    ParallelStep,
    PipelineStep,
    RetrySpec,
    SleepStep,
    StepKind,
    StepSpec,
    SwitchCase,
    SwitchStep,
    ToolStep,
    TransformStep,
    WaitEventStep,
    register_step_kind,
    step_kinds,
    walk_steps,
)
from kernel.steps.base import ID_PATTERN, NAME_PATTERN, TenantBudgetSpec
from kernel.templating import TemplateRefs, template_refs

if TYPE_CHECKING:
    from kernel.steps.base import StepSpec as Step
else:
    from kernel.steps.base import Step

__all__ = [
    "DEFAULTS_VERSION",
    "STEP_TYPES",
    "ApprovalStep",
    "BudgetSpec",
    "EmbedStep",
    "EventsSpec",
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
    "StepKind",
    "StepSpec",
    "SwitchCase",
    "SwitchStep",
    "ToolStep",
    "TransformStep",
    "WaitEventStep",
    "format_validation_error",
    "load_pipeline",
    "parse_pipeline",
    "register_step_kind",
    "step_types",
]

DEFAULTS_VERSION = 2
"""The generation of defaults new runs validate their spec with. A default that changes gets a new
version (a ``versioned_defaults`` entry on the step class), and a running pipeline keeps the defaults
of the version it started with (the workflow records it with ``workflow.patched``)."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


def step_types() -> list[str]:
    """Every step type a spec may use, built-in and registered."""
    return list(step_kinds())


class _StepTypes(dict[str, type[StepSpec]]):
    """``STEP_TYPES`` stays a live view of the table of step kinds."""

    def _table(self) -> dict[str, type[StepSpec]]:
        return {name: kind.spec for name, kind in step_kinds().items()}

    def __getitem__(self, key: str) -> type[StepSpec]:
        return self._table()[key]

    def __contains__(self, key: object) -> bool:
        return key in step_kinds()

    def __iter__(self) -> Any:
        return iter(self._table())

    def __len__(self) -> int:
        return len(step_kinds())

    def keys(self) -> Any:
        return self._table().keys()

    def items(self) -> Any:
        return self._table().items()

    def values(self) -> Any:
        return self._table().values()


STEP_TYPES: dict[str, type[StepSpec]] = _StepTypes()


class EventsSpec(_Spec):
    """Outbound lifecycle events of a pipeline (docs/events.md). ``events: true`` is short for
    ``{enabled: true}``; without an ``events:`` field the worker's default applies to pipelines
    registered on it by name."""

    enabled: bool = True
    types: list[str] | None = Field(
        default=None, description="Lifecycle event types to publish (default: all), e.g. pipeline.completed."
    )
    content: bool = Field(
        default=False,
        description="Also carry step outputs (step.completed) and the pipeline's outputs (pipeline.completed), "
        "as payloads encoded like any other: encrypted when the worker encrypts.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("types")
    @classmethod
    def _known_types(cls, types: list[str] | None) -> list[str] | None:
        from kernel.engine import LIFECYCLE_TYPES

        for name in types or []:
            if name not in LIFECYCLE_TYPES:
                raise ValueError(
                    f"unknown lifecycle event type {name!r}; known: {', '.join(LIFECYCLE_TYPES)}"
                )
        return types

    def wants(self, event_type: str) -> bool:
        return self.enabled and (self.types is None or event_type in self.types)


class PipelineSpec(_Spec):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    version: int = Field(default=1, ge=1)
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1, max_length=500)
    outputs: dict[str, str] = Field(default_factory=dict)
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Default retry policy of steps.")
    budget: BudgetSpec | None = None
    tenant_budget: TenantBudgetSpec | None = Field(
        default=None,
        description="What a call over its tenant's cost budget does (on_exceed: fail, pause, approval).",
    )
    events: EventsSpec | None = Field(
        default=None, description="Publish lifecycle events (true/false, or {enabled, types})."
    )

    @field_validator("inputs")
    @classmethod
    def _input_names(cls, inputs: dict[str, InputSpec]) -> dict[str, InputSpec]:
        for name in inputs:
            if not re.match(ID_PATTERN, name):
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

    @model_validator(mode="after")
    def _batch_mode_inside_a_map(self) -> PipelineSpec:
        for step, inside_map in self.walk():
            shared = getattr(getattr(step, "batch", None), "window_s", None) is not None
            if getattr(step, "mode", None) == "batch" and not inside_map and not shared:
                raise ValueError(
                    f"step {step.id!r} has mode: batch outside a map: batch mode gathers the calls of a "
                    "map's items into one provider batch (put the step inside a map, set batch.window_s to "
                    "gather many pipelines' calls, or drop mode: batch)"
                )
        return self

    def walk(self) -> Iterator[tuple[Step, bool]]:
        """Every step, nested ones included, depth first; the flag says whether it runs inside a map."""
        yield from walk_steps(self.steps)

    def step(self, step_id: str) -> Step:
        for step, _ in self.walk():
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def models(self) -> list[str]:
        return sorted({model for step, _ in self.walk() for model in step.models()})

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
            inner_vars = variables | step.scope_variables()
            visible_after: set[str] = set()
            for field, children in step.children():
                if step.scope_boundary:
                    for child, _ in walk_steps(children):
                        if child.single_instance:
                            raise ValueError(
                                f"step {child.id!r}: {_article(child.type)} {child.type} cannot run inside "
                                f"{step.type} {step.id!r} (one id could not name each item's run)"
                            )
                visible_after |= self.steps(
                    children, f"{where}.{field}", available=available, variables=inner_vars, seen=seen
                )
            if not step.scope_boundary:
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


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


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
    for part in parts:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            text += f"[{part}]"
            if isinstance(node, Mapping) and isinstance(node.get("id"), str):
                text += f" (id {node['id']!r})"
            continue
        node = node.get(part) if isinstance(node, Mapping) else None
        text += f".{part}" if text else str(part)
    return text


def parse_pipeline(data: Mapping[str, Any] | str, *, defaults_version: int | None = None) -> PipelineSpec:
    """Validate a pipeline given as a mapping or JSON/YAML text; ``PipelineError`` names every problem.
    Fields left out take the defaults of ``defaults_version`` (the newest when not given)."""
    if isinstance(data, str):
        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise PipelineError(f"pipeline is not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise PipelineError(f"a pipeline must be a mapping with name and steps, got {type(data).__name__}")
    try:
        return PipelineSpec.model_validate(data, context={"defaults_version": defaults_version})
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
    _model.model_rebuild(_types_namespace={"PipelineSpec": PipelineSpec})
