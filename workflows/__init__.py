"""Deterministic Temporal workflows. Their names, queries, signals and updates are public API."""

from __future__ import annotations

from workflows.pipeline import (
    PIPELINE_WORKFLOW,
    CancelRequest,
    PipelineRequest,
    PipelineResult,
    PipelineStatus,
    PipelineWorkflow,
    StepState,
)

__all__ = [
    "PIPELINE_WORKFLOW",
    "CancelRequest",
    "PipelineRequest",
    "PipelineResult",
    "PipelineStatus",
    "PipelineWorkflow",
    "StepState",
]
