"""Step kinds: each module holds a kind's spec class and its handler; ``BUILTIN_KINDS`` is the table of
the built-in ones. A plugin adds a kind with ``register_step_kind`` (see ``kernel.steps.base``)."""

from __future__ import annotations

from kernel.steps.agent import KIND as AGENT
from kernel.steps.agent import AgentStep
from kernel.steps.base import (
    BudgetSpec,
    RetrySpec,
    Step,
    StepFailure,
    StepKind,
    StepSpec,
    register_step_kind,
    step_kind,
    step_kinds,
    walk_steps,
)
from kernel.steps.calls import EMBED, PIPELINE, TOOL, EmbedStep, PipelineStep, ToolStep
from kernel.steps.flow import (
    MAP,
    PARALLEL,
    SWITCH,
    TRANSFORM,
    MapStep,
    ParallelStep,
    SwitchCase,
    SwitchStep,
    TransformStep,
)
from kernel.steps.llm import KIND as LLM
from kernel.steps.llm import LlmStep, MessageTemplate
from kernel.steps.waiting import APPROVAL, SLEEP, WAIT_EVENT, ApprovalStep, SleepStep, WaitEventStep

__all__ = [
    "BUILTIN_KINDS",
    "AgentStep",
    "ApprovalStep",
    "BudgetSpec",
    "EmbedStep",
    "LlmStep",
    "MapStep",
    "MessageTemplate",
    "ParallelStep",
    "PipelineStep",
    "RetrySpec",
    "SleepStep",
    "Step",
    "StepFailure",
    "StepKind",
    "StepSpec",
    "SwitchCase",
    "SwitchStep",
    "ToolStep",
    "TransformStep",
    "WaitEventStep",
    "register_step_kind",
    "step_kind",
    "step_kinds",
    "walk_steps",
]

BUILTIN_KINDS = (
    LLM,
    PARALLEL,
    MAP,
    SWITCH,
    TRANSFORM,
    APPROVAL,
    WAIT_EVENT,
    SLEEP,
    TOOL,
    EMBED,
    PIPELINE,
    AGENT,
)

for _kind in BUILTIN_KINDS:
    register_step_kind(_kind)
