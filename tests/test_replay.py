"""Recorded histories replay on today's code: a deploy never breaks a running pipeline.

Each ``tests/histories/*.json`` is a real run (see ``tests/histories/record.py`` to regenerate).
``*-v1.json`` files were recorded by the engine before step types, budgets and continue-as-new
existed and are never regenerated. Replay uses the worker's own workflow classes, sandbox and
pydantic data converter, so a non-deterministic change fails here before it reaches a worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from worker.app import workflow_runner
from workflows.pipeline import PipelineWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
_TEXT = {path.stem: path.read_text(encoding="utf-8") for path in HISTORIES}


def test_histories_are_present() -> None:
    names = {path.stem for path in HISTORIES}
    assert {"ticket-triage-v1", "ticket-triage", "approval-gate", "fan-out"} <= names


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays_without_non_determinism(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, _TEXT[path.stem])
    replayer = Replayer(
        workflows=[PipelineWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"
