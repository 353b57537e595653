"""The pipeline language: a declarative spec (YAML on disk, JSON on the wire) validated before start.

A pipeline has typed ``inputs``, ordered ``steps`` and ``outputs`` rendered from templates. Templates
see ``inputs`` and ``steps.<id>.output`` (plus ``.text``, ``.model``, ``.provider`` of llm steps) of
steps that ran before them. Every error names the step and field that are wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernel.contracts import ResponseFormat, Tool
from kernel.errors import PipelineError
from kernel.routing import Balance
from kernel.templating import template_refs

__all__ = [
    "InputSpec",
    "LlmStep",
    "MessageTemplate",
    "PipelineSpec",
    "RetrySpec",
    "Step",
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


class LlmStep(_StepBase):
    """Ask a model. ``model`` is ``provider/model`` or an alias configured on the worker; ``fallbacks``
    are tried in order when a model's retries are exhausted or its error cannot be retried."""

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
        return self

    def message_templates(self) -> list[MessageTemplate]:
        if self.messages is not None:
            return self.messages
        templates = [MessageTemplate(role="system", content=self.system)] if self.system else []
        return [*templates, MessageTemplate(role="user", content=self.prompt or "")]

    def templates(self) -> list[tuple[str, str]]:
        return [(f"messages[{i}].content", m.content) for i, m in enumerate(self.message_templates())]


Step = Annotated[LlmStep, Field(discriminator="type")]


class PipelineSpec(_Spec):
    name: str = Field(pattern=_NAME)
    description: str | None = None
    version: int = Field(default=1, ge=1)
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1, max_length=500)
    outputs: dict[str, str] = Field(default_factory=dict)
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Default retry policy of steps.")

    @field_validator("steps", mode="before")
    @classmethod
    def _default_step_type(cls, steps: Any) -> Any:
        if isinstance(steps, list):
            return [{"type": "llm", **s} if isinstance(s, dict) and "type" not in s else s for s in steps]
        return steps

    @field_validator("inputs")
    @classmethod
    def _input_names(cls, inputs: dict[str, InputSpec]) -> dict[str, InputSpec]:
        import re

        for name in inputs:
            if not re.match(_ID, name):
                raise ValueError(f"input name {name!r} must be an identifier (letters, digits, _)")
        return inputs

    @model_validator(mode="after")
    def _check_references(self) -> PipelineSpec:
        seen: set[str] = set()
        for index, step in enumerate(self.steps):
            if step.id in seen:
                raise ValueError(f"steps[{index}]: step id {step.id!r} is used twice")
            for field, source in step.templates():
                self._check_template(source, f"step {step.id!r} {field}", available=seen)
            seen.add(step.id)
        for name, source in self.outputs.items():
            self._check_template(source, f"outputs.{name}", available=seen)
        return self

    def _check_template(self, source: str, location: str, *, available: set[str]) -> None:
        refs = template_refs(source, location=location)
        unknown = refs.variables - {"inputs", "steps"}
        if unknown:
            raise ValueError(
                f"{location}: template reads {sorted(unknown)}; templates may read 'inputs' and 'steps'"
            )
        for step_id in refs.attributes.get("steps", set()):
            if step_id not in available:
                raise ValueError(
                    f"{location}: template reads steps.{step_id}, which "
                    + ("does not run before it" if any(s.id == step_id for s in self.steps) else "is no step")
                    + f"; steps before it: {sorted(available) or 'none'}"
                )
        for input_name in refs.attributes.get("inputs", set()):
            if input_name not in self.inputs:
                raise ValueError(
                    f"{location}: template reads inputs.{input_name}, which is not declared; "
                    f"declared inputs: {sorted(self.inputs) or 'none'}"
                )

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def models(self) -> list[str]:
        return sorted({m for s in self.steps for m in (s.model, *s.fallbacks)})

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


def format_validation_error(exc: ValidationError, *, prefix: str = "pipeline") -> str:
    """One line per problem, each naming where it is (``steps[1].model``) and what is wrong."""
    lines = []
    for error in exc.errors(include_url=False):
        loc = ".".join(f"[{part}]" if isinstance(part, int) else str(part) for part in error["loc"]).replace(
            ".[", "["
        )
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        elif error["type"] == "string_pattern_mismatch":
            message = f"{message} (got {error.get('input')!r})"
        lines.append(f"{prefix}.{loc}: {message}" if loc else f"{prefix}: {message}")
    return "; ".join(lines)


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
        raise PipelineError(format_validation_error(exc)) from exc
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
