"""Recorded histories replay on today's code: a deploy never breaks a running pipeline.

Each ``tests/histories/*.json`` is a real run (see ``tests/histories/record.py`` to regenerate).
``*-v1.json`` files were recorded by the engine before step types, budgets and continue-as-new
existed and are never regenerated. Replay uses the worker's own workflow classes, sandbox and
pydantic data converter, so a non-deterministic change fails here before it reaches a worker.
"""

from __future__ import annotations

import json
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
    assert {
        "ticket-triage-v1",
        "ticket-triage-v2",
        "ticket-triage",
        "approval-gate",
        "fan-out",
        "driven",
        "refund-agent",
        "batch-summaries",
        "batch-cancelled",
        "lifecycle-events",
        "lifecycle-events-linger",
        "shadowed",
        "shadowed-bounded",
    } <= names


def test_the_cancelled_batch_recording_cancels_the_provider_batch_before_the_run_ends() -> None:
    history = json.loads(_TEXT["batch-cancelled"])
    scheduled = [
        e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
        for e in history["events"]
        if "activityTaskScheduledEventAttributes" in e
    ]
    assert scheduled[0] == "llm_batch_submit" and scheduled[-1] == "llm_batch_cancel"
    assert history["events"][-1]["eventType"] in (
        "EVENT_TYPE_WORKFLOW_EXECUTION_CANCELED",
        "WorkflowExecutionCanceled",
    )


def test_the_batch_recording_waits_on_a_provider_batch_and_answers_a_failed_item_in_realtime() -> None:
    history = json.loads(_TEXT["batch-summaries"])
    scheduled = [
        e["activityTaskScheduledEventAttributes"]["activityType"]["name"]
        for e in history["events"]
        if "activityTaskScheduledEventAttributes" in e
    ]
    assert scheduled[0] == "llm_batch_submit" and scheduled.count("llm_batch_submit") == 1
    assert "llm_batch_results" in scheduled and scheduled.count("llm_chat") == 1
    assert any("timerStartedEventAttributes" in e for e in history["events"])


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


def _patches(name: str) -> set[str]:
    history = WorkflowHistory.from_json(name, _TEXT[name])
    found = set()
    for event in history.events:
        marker = event.marker_recorded_event_attributes
        if marker.marker_name == "core_patch":
            for payload in marker.details["patch-data"].payloads:
                found.add(json.loads(payload.data)["id"])
    return found


def _search_attributes(name: str) -> set[str]:
    history = WorkflowHistory.from_json(name, _TEXT[name])
    return {
        key
        for event in history.events
        for key in event.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
    }


@pytest.mark.parametrize("name", ["ticket-triage", "approval-gate", "fan-out", "driven"])
def test_current_recordings_carry_the_engine_2_marker_and_search_attributes(name: str) -> None:
    assert "kernelflow-engine-2" in _patches(name)
    assert "KernelflowModels" in _search_attributes(name)


@pytest.mark.parametrize("name", ["ticket-triage-v1", "ticket-triage-v2", "approval-gate-v2", "fan-out-v2"])
def test_older_recordings_replay_as_runs_without_the_marker(name: str) -> None:
    assert "kernelflow-engine-2" not in _patches(name)
    assert not {"KernelflowModels", "KernelflowAwaiting"} & _search_attributes(name)


def test_the_approval_recordings_show_the_awaited_approval_in_visibility() -> None:
    assert "KernelflowAwaiting" in _search_attributes("approval-gate")
    assert "KernelflowAwaiting" in _search_attributes("driven")


def test_the_agent_recording_replays_with_no_mcp_server_at_all() -> None:
    """The replayer runs no activity and reaches no server: the tool listing and every tool call of
    the recorded loop come from the history (the generic replay test above replays it so)."""
    history = WorkflowHistory.from_json("refund-agent", _TEXT["refund-agent"])
    names = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert names.count("mcp_list_tools") == 1 and names.count("mcp_call_tool") == 3
    assert names.count("llm_chat") == 3
    assert any(e.HasField("workflow_execution_update_accepted_event_attributes") for e in history.events)


def test_the_lifecycle_recordings_before_and_after_the_outbox_lingered() -> None:
    """The older run sent each batch at once; the newer one records the linger patch, started a timer
    and published all its events in the one local activity that drained the outbox before the close."""
    assert "kernelflow-lifecycle-events" in _patches("lifecycle-events")
    assert "kernelflow-lifecycle-linger" not in _patches("lifecycle-events")
    assert "kernelflow-lifecycle-linger" in _patches("lifecycle-events-linger")
    history = WorkflowHistory.from_json("lifecycle-events-linger", _TEXT["lifecycle-events-linger"])
    published = [
        e for e in history.events if e.marker_recorded_event_attributes.marker_name == "core_local_activity"
    ]
    assert len(published) == 1
    assert any(e.HasField("timer_canceled_event_attributes") for e in history.events)


def test_the_shadowed_recording_shadows_both_steps_and_only_it_carries_the_shadow_marker() -> None:
    history = WorkflowHistory.from_json("shadowed", _TEXT["shadowed"])
    names = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert names == ["llm_chat", "llm_chat", "shadow_chat", "shadow_chat"]
    assert "shadow-traffic" in _patches("shadowed")
    assert "shadow-close-bound" not in _patches("shadowed")  # it awaited the last step's call fully
    shadowed = ("shadowed", "shadowed-bounded")
    assert not any("shadow-traffic" in _patches(name) for name in _TEXT if name not in shadowed)


def test_the_bounded_recording_closes_before_the_last_steps_shadow_call_answers() -> None:
    """The run waited close_wait_s for the last step's shadow call (its timer fired), then completed;
    the call was scheduled and never completed in the run's history."""
    history = WorkflowHistory.from_json("shadowed-bounded", _TEXT["shadowed-bounded"])
    shadow = [
        e.event_id
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == "shadow_chat"
    ]
    completed = [
        e.activity_task_completed_event_attributes.scheduled_event_id
        for e in history.events
        if e.HasField("activity_task_completed_event_attributes")
    ]
    assert len(shadow) == 2 and shadow[0] in completed and shadow[1] not in completed
    assert {"shadow-traffic", "shadow-close-bound"} <= set(_patches("shadowed-bounded"))
    assert any(e.HasField("timer_fired_event_attributes") for e in history.events)
    assert history.events[-1].HasField("workflow_execution_completed_event_attributes")


@pytest.mark.parametrize(
    "rules",
    [
        None,
        {"models": {"openai/gpt-4o-mini": {"model": "gemini/gemini-2.5-pro"}}, "opt_out_tenants": ["acme"]},
        {"enabled": False},
    ],
    ids=["no-rules", "other-rules", "disabled"],
)
@pytest.mark.parametrize("recording", ["shadowed", "shadowed-bounded"])
async def test_a_shadowed_run_replays_whatever_the_replaying_worker_rules(
    rules: dict[str, object] | None, recording: str
) -> None:
    """The run read its worker's rules once (the shadow_rules local activity's answer is in the history);
    a worker with other rules, or none, decides as the run did."""
    from kernel.shadow_rules import ShadowConfig
    from workflows.engine.shadow import install_shadow

    install_shadow(ShadowConfig.model_validate(rules) if rules is not None else None)
    try:
        await test_history_replays_without_non_determinism(HERE_HISTORIES / f"{recording}.json")
    finally:
        install_shadow(None)


HERE_HISTORIES = Path(__file__).parent / "histories"
