"""What a step kind is, and the one table of step kinds.

A step kind is one module: its spec class (a ``StepSpec``: fields, validation, the templates and
expressions it reads, the step lists it nests, its scoping traits) and its handler (an async function
that runs it through the engine's ``StepRun``), registered here as a ``StepKind``. The pipeline
language validates a step by looking its ``type`` up in this table, so a kind registered by a plugin
module is accepted everywhere at once: in specs, in nested step lists, in the interpreter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError, core_schema

__all__ = [
    "ID_PATTERN",
    "MODEL_PATTERN",
    "NAME_PATTERN",
    "BudgetSpec",
    "DefaultsVersion",
    "RetrySpec",
    "Step",
    "StepFailure",
    "StepHandler",
    "StepKind",
    "StepSpec",
    "TenantBudgetSpec",
    "register_step_kind",
    "step_kind",
    "step_kinds",
    "walk_steps",
]

ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,99}$"
MODEL_PATTERN = r"^[A-Za-z0-9_.:-]+(/[^\s]+)?$"

DefaultsVersion = int
"""Which generation of defaults a spec was validated with (see ``kernel.pipeline.DEFAULTS_VERSION``)."""


class StepFailure(Exception):
    """A step failed for a reason the pipeline's author or sender can act on; ``type`` is a
    ``FailureType`` value. The workflow turns it into a non-retryable failure, once."""

    def __init__(self, message: str, type: str = "StepFailed") -> None:
        super().__init__(message)
        self.message = message
        self.type = type

    def __reduce__(self) -> tuple[Any, ...]:
        return (StepFailure, (self.message, self.type))


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrySpec(_Spec):
    """How Temporal retries one model (or tool, or embedding) before the step moves on."""

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


class TenantBudgetSpec(_Spec):
    """What a call over its tenant's cost budget (worker config ``limits.tenants``) does: ``fail``
    the step, ``pause`` the pipeline until ``resume`` (which may carry ``tenant_budget``, the new
    budget), or wait for an ``approval`` (``tenant-budget-<n>``) whose approver may raise it."""

    on_exceed: Literal["fail", "pause", "approval"] = "fail"
    approvers: list[str] | None = Field(
        default=None, description="Who may decide (approval); anyone if unset."
    )


class StepSpec(_Spec):
    """Fields every step has, and the traits the validator and the interpreter read.

    Traits (class attributes, so one rule is written once):
    - ``scope_boundary``: the nested steps run once per item (like ``map``): they are not listed in
      the status, their ids are not visible after the step, and no ``single_instance`` step may
      run inside.
    - ``single_instance``: the step is addressed from outside by its id (an approval), so it cannot
      run inside a scope boundary where one id would name many runs.
    """

    scope_boundary: ClassVar[bool] = False
    single_instance: ClassVar[bool] = False
    versioned_defaults: ClassVar[Mapping[str, Mapping[int, Any]]] = {}
    """``{field: {defaults version: value}}`` for defaults that changed between versions: a spec is
    validated with the defaults of the version its run started with."""

    type: str
    id: str = Field(pattern=ID_PATTERN, description="Unique within the pipeline; templates read steps.<id>.")
    description: str | None = None
    when: str | None = Field(
        default=None, min_length=1, description="An expression; the step is skipped when it is false."
    )

    @model_validator(mode="before")
    @classmethod
    def _versioned_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if not cls.versioned_defaults or not isinstance(data, Mapping):
            return data
        version = (info.context or {}).get("defaults_version") if info.context else None
        filled = dict(data)
        for name, by_version in cls.versioned_defaults.items():
            if name in filled:
                continue
            chosen = [v for v in by_version if version is None or v <= version]
            if chosen:
                filled[name] = by_version[max(chosen)]
        return filled

    def templates(self) -> list[tuple[str, Any]]:
        """``(field, value)`` pairs whose strings are templates."""
        return []

    def expressions(self) -> list[tuple[str, str]]:
        """``(field, expression)`` pairs checked against what runs before the step."""
        return [("when", self.when)] if self.when else []

    def children(self) -> list[tuple[str, list[StepSpec]]]:
        """Nested step lists, each with its field name."""
        return []

    def scope_variables(self) -> set[str]:
        """Names the nested steps may read besides ``inputs`` and ``steps`` (a map's item)."""
        return set()

    def models(self) -> list[str]:
        """The models (``provider/model`` or alias) this step itself may call."""
        return []


StepHandler = Callable[[Any, Any], Awaitable[tuple[Any, dict[str, Any]]]]
"""Runs a step, given its spec and its ``kernel.steps.context.StepRun``: returns its output and extra
template fields (``steps.<id>.<extra>``)."""


_SpecClass = type[StepSpec]


@dataclass(frozen=True)
class StepKind:
    """One kind of step: its ``type`` tag, spec class and handler."""

    type: str
    spec: _SpecClass
    handler: StepHandler
    summary: str = ""


_KINDS: dict[str, StepKind] = {}


def register_step_kind(kind: StepKind, *, replace: bool = False) -> StepKind:
    """Add ``kind`` to the table: from now on specs may use ``type: <kind.type>`` anywhere."""
    existing = _KINDS.get(kind.type)
    if existing is not None and existing != kind and not replace:
        raise ValueError(
            f"step type {kind.type!r} is already registered by {existing.spec.__module__}."
            f"{existing.spec.__qualname__}; pass replace=True to override it"
        )
    _KINDS[kind.type] = kind
    return kind


def step_kinds() -> Mapping[str, StepKind]:
    return dict(_KINDS)


def step_kind(type_: str) -> StepKind:
    kind = _KINDS.get(type_)
    if kind is None:
        raise KeyError(type_)
    return kind


def _validate_step(value: Any, info: ValidationInfo) -> StepSpec:
    if isinstance(value, StepSpec):
        return value
    if not isinstance(value, Mapping):
        raise PydanticCustomError(
            "step_type", "a step must be a mapping with an id, got {kind}", {"kind": type(value).__name__}
        )
    tag = value.get("type", "llm")
    kind = _KINDS.get(tag) if isinstance(tag, str) else None
    if kind is None:
        raise PydanticCustomError(
            "unknown_step_type",
            "unknown step type {tag}; use one of {known}",
            {"tag": repr(tag), "known": ", ".join(_KINDS)},
        )
    spec: StepSpec = kind.spec.model_validate(value, context=info.context)
    return spec


def _serialize_step(step: StepSpec, info: core_schema.SerializationInfo) -> Any:
    return step.model_dump(
        mode=info.mode, by_alias=bool(info.by_alias), exclude_none=info.exclude_none, round_trip=True
    )


class _StepSchema:
    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(
            _validate_step,
            serialization=core_schema.plain_serializer_function_ser_schema(_serialize_step, info_arg=True),
        )


Step = Annotated[StepSpec, _StepSchema]
"""A step of any registered kind, chosen by its ``type`` (``llm`` when omitted)."""


def walk_steps(steps: list[StepSpec], *, inside: bool = False) -> Iterator[tuple[StepSpec, bool]]:
    """Every step, nested ones included, depth first; the flag says whether it runs inside a scope
    boundary (once per item)."""
    for step in steps:
        yield step, inside
        for _, children in step.children():
            yield from walk_steps(children, inside=inside or step.scope_boundary)
