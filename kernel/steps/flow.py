"""Steps that arrange other steps: ``parallel``, ``map`` and ``switch``; and ``transform``, which
computes a value from what ran before."""

from __future__ import annotations

import asyncio
import re
from collections import ChainMap
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from kernel.errors import FailureType
from kernel.steps.base import ID_PATTERN, StepFailure, StepKind, StepSpec, _Spec
from kernel.steps.batching import BatchCollector, BatchSlot, uses_batch
from kernel.steps.context import Scope, StepRun, json_value

if TYPE_CHECKING:
    from kernel.steps.base import StepSpec as Step
else:
    from kernel.steps.base import Step

__all__ = [
    "MAP",
    "PARALLEL",
    "SWITCH",
    "TRANSFORM",
    "MapStep",
    "ParallelStep",
    "SwitchCase",
    "SwitchStep",
    "TransformStep",
    "all_or_nothing",
]


# --- parallel --------------------------------------------------------------------------------------


class ParallelStep(StepSpec):
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
            if not re.match(ID_PATTERN, name):
                raise ValueError(f"branch name {name!r} must be an identifier (letters, digits, _)")
            if not steps:
                raise ValueError(f"branch {name!r} has no steps")
        return branches

    def children(self) -> list[tuple[str, list[StepSpec]]]:
        return [(f"branches.{name}", steps) for name, steps in self.branches.items()]


async def all_or_nothing(runs: list[Awaitable[Any]]) -> list[Any]:
    """Run all; on the first failure cancel the others, let them finish cancelling, then re-raise."""
    tasks = [asyncio.ensure_future(run) for run in runs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _parallel(step: ParallelStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    names = list(step.branches)
    inner = run.scope.inner(step.id)
    runs = [run.engine.run_steps(step.branches[name], inner) for name in names]
    if step.on_failure == "fail_fast":
        try:
            results = await all_or_nothing(runs)
        except StepFailure as exc:
            raise StepFailure(f"parallel step {step.id!r} failed: {exc.message}", exc.type) from None
        return dict(zip(names, results, strict=True)), {"errors": {}}
    settled = await asyncio.gather(*runs, return_exceptions=True)
    outputs: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, outcome in zip(names, settled, strict=True):
        if isinstance(outcome, asyncio.CancelledError):
            raise outcome
        if isinstance(outcome, StepFailure):
            outputs[name], errors[name] = None, outcome.message
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            outputs[name] = outcome
    if errors:
        run.state.error = "; ".join(f"branch {name}: {message}" for name, message in errors.items())
    return outputs, {"errors": errors}


PARALLEL = StepKind("parallel", ParallelStep, _parallel, "run named branches at once")


# --- map -------------------------------------------------------------------------------------------


class MapStep(StepSpec):
    """Run ``steps`` once per item of ``items`` (a template such as ``{{ inputs.tickets }}``), at most
    ``concurrency`` items at a time. Inside, templates read the item as ``item_var`` and its position
    as ``index_var``. Output: the output of the last step for each item, in input order."""

    scope_boundary: ClassVar[bool] = True

    type: Literal["map"]
    items: str = Field(min_length=1)
    item_var: str = Field(default="item", pattern=ID_PATTERN)
    index_var: str = Field(default="index", pattern=ID_PATTERN)
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

    def children(self) -> list[tuple[str, list[StepSpec]]]:
        return [("steps", self.steps)]

    def scope_variables(self) -> set[str]:
        return {self.item_var, self.index_var}


async def _map(step: MapStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    items = run.value(step.items, "items")
    if isinstance(items, dict | str) or not isinstance(items, list | tuple):
        raise run.fail(
            f"step {step.id!r} items must be a list, got {type(items).__name__}", FailureType.PIPELINE_ERROR
        )
    if len(items) > step.max_items:
        raise run.fail(
            f"step {step.id!r} has {len(items)} items, more than its max_items {step.max_items}",
            FailureType.PIPELINE_ERROR,
        )
    limit = asyncio.Semaphore(step.concurrency)
    done = 0
    scope = run.scope
    collector: BatchCollector | None = None
    if uses_batch(step.steps, lambda s: getattr(s, "mode", None) == "batch"):
        collector = BatchCollector(run.engine, run.state, f"{scope.label}{step.id}", len(items), limit)

    async def one(index: int, item: Any) -> Any:
        nonlocal done
        async with limit:
            context = {
                **scope.context,
                "steps": ChainMap({}, scope.steps),
                step.item_var: item,
                step.index_var: index,
            }
            item_scope = Scope(
                context,
                listed=False,
                parent=step.id,
                label=f"{scope.label}{step.id}-{index}.",
                batches=None if collector is None else BatchSlot(collector, index),
            )
            try:
                output = await run.engine.run_steps(step.steps, item_scope)
            except StepFailure as exc:
                raise StepFailure(f"map step {step.id!r} item {index}: {exc.message}", exc.type) from None
            finally:
                if collector is not None:
                    collector.item_done()
            done += 1
            run.detail(f"{done}/{len(items)} items done")
            return output

    run.detail(f"0/{len(items)} items done")
    return await all_or_nothing([one(i, item) for i, item in enumerate(items)]), {"count": len(items)}


MAP = StepKind("map", MapStep, _map, "run steps for every item of a list")


# --- switch ----------------------------------------------------------------------------------------


class SwitchCase(_Spec):
    when: str = Field(min_length=1)
    steps: list[Step] = Field(min_length=1, max_length=100)


class SwitchStep(StepSpec):
    """Run the steps of the first case whose ``when`` holds, else ``default``; the steps of the other
    cases are ``skipped``. Output: the output of the last step run (``steps.<id>.case`` says which)."""

    type: Literal["switch"]
    cases: list[SwitchCase] = Field(min_length=1, max_length=50)
    default: list[Step] = Field(default_factory=list, max_length=100)

    def expressions(self) -> list[tuple[str, str]]:
        return [*super().expressions(), *((f"cases[{i}].when", c.when) for i, c in enumerate(self.cases))]

    def children(self) -> list[tuple[str, list[StepSpec]]]:
        cases: list[tuple[str, list[StepSpec]]] = [
            (f"cases[{i}].steps", c.steps) for i, c in enumerate(self.cases)
        ]
        return [*cases, ("default", self.default)]


async def _switch(step: SwitchStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    inner = run.scope.inner(step.id)
    chosen: int | None = None
    for index, case in enumerate(step.cases):
        if run.evaluate(case.when, f"cases[{index}].when"):
            chosen = index
            break
    for index, case in enumerate(step.cases):
        if index != chosen:
            run.engine.skip(case.steps, inner)
    if chosen is not None:
        run.engine.skip(step.default, inner)
        run.detail(f"case {chosen}")
        return await run.engine.run_steps(step.cases[chosen].steps, inner), {"case": chosen}
    run.detail("default")
    return await run.engine.run_steps(step.default, inner), {"case": "default"}


SWITCH = StepKind("switch", SwitchStep, _switch, "run the first case whose condition holds")


# --- transform -------------------------------------------------------------------------------------


class TransformStep(StepSpec):
    """Compute a value with a safe expression, e.g. ``{"n": steps.split.output | length}``."""

    type: Literal["transform"]
    expression: str = Field(min_length=1)

    def expressions(self) -> list[tuple[str, str]]:
        return [*super().expressions(), ("expression", self.expression)]


async def _transform(step: TransformStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    value = run.evaluate(step.expression, "expression")
    return json_value(value, run.where("expression")), {}


TRANSFORM = StepKind("transform", TransformStep, _transform, "compute a value with a safe expression")
