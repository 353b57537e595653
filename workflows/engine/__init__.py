"""The parts of ``PipelineWorkflow``: ``models`` (its payloads), ``steps`` (the step interpreter) and
``schema`` (the output-schema check). Import the modules themselves; this package exports nothing."""

from __future__ import annotations

__all__: list[str] = []
