"""Shadow traffic end to end: real Temporal server, real worker, real HTTP to the simulator.

A shadowed pipeline answers exactly as an unshadowed one, its history gains only the shadow calls'
markers and activities, the store holds both answers of every pair (the last step's too: within the
close's bounded wait, or after the result when the candidate is slower than that), a failing or hanging candidate changes nothing for the pipeline, an opted-out
tenant is never shadowed, caps hold through the budget workflow, and a sealed store holds no prompt
in the clear.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from kernel.errors import ConfigurationError, PipelineError
from kernel.limits import LimitsConfig
from kernel.pipeline import parse_pipeline
from kernel.registry import Registry
from kernel.shadow import request_digest
from kernel.shadow_rules import ShadowConfig
from simulator.server import SimulatorServer
from worker.app import build_worker
from worker.client import start_pipeline
from worker.config import CompressionSettings, EncryptionSettings, KernelflowConfig, PayloadSettings
from worker.keys import FileKeyProvider, format_ring, generate_key
from worker.shadow_sealer import CodecSealer
from worker.shadow_store import open_store
from worker.shadow_worker import check_shadow_rules, open_configured_store
from worker.storage import build_codec, build_data_converter
from workflows.contract import PipelineRequest
from workflows.pipeline import PipelineWorkflow

CANDIDATE = "anthropic/claude-sonnet-4-5"
TICKET = "I was charged twice for invoice 7781, please refund"
WAIT = 60.0
"""``close_wait_s`` of the tests that read the last step's shadow call from the run's history or the
store as soon as the result is in: long enough for it to finish within the run."""


def _spec(*, shadow: dict[str, Any] | None = None, last: dict[str, Any] | None = None) -> Any:
    """Two steps: a structured classification, then a draft (the last step)."""
    classify: dict[str, Any] = {
        "id": "classify",
        "model": "openai/gpt-4o-mini",
        "prompt": "Classify this ticket: {{ inputs.ticket }}",
        "output_schema": {
            "type": "object",
            "required": ["category"],
            "properties": {"category": {"enum": ["billing", "bug"]}},
        },
    }
    draft: dict[str, Any] = {
        "id": "draft",
        "model": "openai/gpt-4o-mini",
        "prompt": "Reply to this {{ steps.classify.output.category }} ticket: {{ inputs.ticket }}",
    }
    if shadow is not None:
        classify["shadow"] = shadow
    if last is not None:
        draft["shadow"] = last
    return parse_pipeline(
        {
            "name": "shadowed",
            "inputs": {"ticket": {"type": "string"}},
            "steps": [classify, draft],
            "outputs": {
                "category": "{{ steps.classify.output.category }}",
                "reply": "{{ steps.draft.output }}",
            },
        }
    )


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/shadow.db"


async def _run(
    client: Client,
    registry: Registry,
    spec: Any,
    *,
    shadow: ShadowConfig | None,
    tenant: str | None = None,
    payloads: PayloadSettings | None = None,
) -> tuple[Any, WorkflowHistory]:
    queue = f"shadow-{uuid.uuid4().hex[:10]}"
    async with build_worker(client, task_queue=queue, registry=registry, shadow=shadow, payloads=payloads):
        run_client = client
        if payloads is not None:
            run_client = Client(**{**client.config(), "data_converter": build_data_converter(payloads)})
        handle = await start_pipeline(run_client, spec, {"ticket": TICKET}, task_queue=queue, tenant=tenant)
        result = await handle.result()
        history = await handle.fetch_history()
    return result, history


def _activities(history: WorkflowHistory) -> dict[int, str]:
    """Scheduled event id -> activity type."""
    return {
        e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    }


_ACTIVITY_FIELDS = (
    "activity_task_started_event_attributes",
    "activity_task_completed_event_attributes",
    "activity_task_failed_event_attributes",
    "activity_task_timed_out_event_attributes",
)


def _marker_id(event: Any) -> str:
    """``patch:<id>`` of a patch marker, ``local:<activity type>`` of a local activity's marker."""
    attributes = event.marker_recorded_event_attributes
    if attributes.marker_name == "core_patch":
        return "patch:" + str(json.loads(attributes.details["patch-data"].payloads[0].data)["id"])
    if attributes.marker_name == "core_local_activity":
        return "local:" + str(json.loads(attributes.details["data"].payloads[0].data)["activity_type"])
    return ""


def _split(history: WorkflowHistory) -> tuple[list[str], list[str]]:
    """(the events of shadowing, the pipeline's own events), by type name. Shadowing's: the
    ``shadow-traffic`` and ``shadow-close-bound`` patch markers and the ``TemporalChangeVersion``
    update each brings, the ``shadow_rules`` local activity's marker, each ``shadow_chat`` activity's
    events and the timer bounding the wait for them at the close (the only timer after the
    ``shadow-close-bound`` marker); the workflow tasks their completions wake are left out of both
    (when a task runs depends on timing)."""
    shadow_ids = {i for i, name in _activities(history).items() if name == "shadow_chat"}
    markers = ("patch:shadow-traffic", "patch:shadow-close-bound", "local:shadow_rules")
    closing = False
    timers: set[int] = set()
    shadowing: list[str] = []
    pipeline: list[str] = []
    previous = ""
    for e in history.events:
        name = EventType.Name(e.event_type)
        mine = False
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            mine = e.event_id in shadow_ids
        elif any(e.HasField(f) for f in _ACTIVITY_FIELDS):
            mine = any(
                e.HasField(f) and getattr(e, f).scheduled_event_id in shadow_ids for f in _ACTIVITY_FIELDS
            )
        elif e.HasField("marker_recorded_event_attributes"):
            mine = _marker_id(e) in markers
            closing = closing or _marker_id(e) == "patch:shadow-close-bound"
        elif e.HasField("upsert_workflow_search_attributes_event_attributes"):
            fields = e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
            mine = previous.startswith("patch:shadow-") and set(fields) == {"TemporalChangeVersion"}
        elif e.event_type == EventType.EVENT_TYPE_TIMER_STARTED and closing:
            timers.add(e.event_id)
            mine = True
        elif e.HasField("timer_fired_event_attributes"):
            mine = e.timer_fired_event_attributes.started_event_id in timers
        elif e.HasField("timer_canceled_event_attributes"):
            mine = e.timer_canceled_event_attributes.started_event_id in timers
        previous = _marker_id(e) if e.HasField("marker_recorded_event_attributes") else ""
        if name.startswith("EVENT_TYPE_WORKFLOW_TASK_"):
            continue
        (shadowing if mine else pipeline).append(name)
    return shadowing, pipeline


def _shadow_events(history: WorkflowHistory) -> list[str]:
    return _split(history)[0]


def _pipeline_events(history: WorkflowHistory) -> list[str]:
    return _split(history)[1]


def _outcomes(history: WorkflowHistory) -> list[dict[str, Any]]:
    names = _activities(history)
    return [
        json.loads(e.activity_task_completed_event_attributes.result.payloads[0].data)
        for e in history.events
        if e.HasField("activity_task_completed_event_attributes")
        and names[e.activity_task_completed_event_attributes.scheduled_event_id] == "shadow_chat"
    ]


async def test_a_shadowed_pipeline_answers_the_same_and_records_both_sides(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    plain, plain_history = await _run(client, registry, _spec(), shadow=None)
    shadowed, history = await _run(
        client,
        registry,
        _spec(shadow={"model": CANDIDATE, "rate": 1.0}, last={"model": CANDIDATE}),
        shadow=ShadowConfig(close_wait_s=WAIT, store=store_url),
    )
    assert shadowed.status == plain.status == "completed"
    assert shadowed.outputs == plain.outputs
    assert shadowed.usage == plain.usage and shadowed.cost_usd == plain.cost_usd

    # Only the shadow calls' events were added: the rest of the history has the same shape.
    assert _pipeline_events(history) == _pipeline_events(plain_history)
    added = _shadow_events(history)
    assert added.count("EVENT_TYPE_ACTIVITY_TASK_SCHEDULED") == 2
    assert added.count("EVENT_TYPE_ACTIVITY_TASK_COMPLETED") == 2
    assert sorted(added) == sorted(
        [
            "EVENT_TYPE_MARKER_RECORDED",
            "EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES",
            "EVENT_TYPE_MARKER_RECORDED",
            # at the close, the last step's call still running: the bounded wait for it, which it ends
            "EVENT_TYPE_MARKER_RECORDED",
            "EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES",
            "EVENT_TYPE_TIMER_STARTED",
            "EVENT_TYPE_TIMER_CANCELED",
        ]
        + [
            "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED",
            "EVENT_TYPE_ACTIVITY_TASK_STARTED",
            "EVENT_TYPE_ACTIVITY_TASK_COMPLETED",
        ]
        * 2
    )

    # The last step's pair is in the store when the result is: it answered within close_wait_s.
    store = open_store(store_url)
    pairs = store.pairs(pipeline="shadowed")
    assert [p.step_id for p in sorted(pairs, key=lambda p: p.id)] == ["classify", "draft"]
    for pair in pairs:
        assert pair.source == "shadow" and pair.workflow_id == history.workflow_id
        assert pair.request is not None and pair.request_digest == request_digest(pair.request)
        assert TICKET in json.dumps(pair.request)
        assert pair.primary.model == "openai/gpt-4o-mini" and pair.candidate.model == CANDIDATE
        assert pair.candidate.ok and pair.candidate.output
        for side in (pair.primary, pair.candidate):
            assert side.prompt_tokens and side.completion_tokens
            assert side.cost_usd is not None and side.cost_usd > 0
            assert side.latency_ms is not None and side.latency_ms > 0
    classify = next(p for p in pairs if p.step_id == "classify")
    assert classify.output_schema is not None
    assert classify.primary.valid is True and classify.primary.structured == shadowed.steps[0].output
    assert classify.candidate.valid is not None
    draft = next(p for p in pairs if p.step_id == "draft")
    assert draft.primary.output == shadowed.outputs["reply"]
    assert sim.stats()["by_model"].get("claude-sonnet-4-5") == 2
    store.close()


async def test_worker_rules_shadow_by_model_and_an_opted_out_tenant_is_never_shadowed(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    config = ShadowConfig(
        close_wait_s=WAIT,
        store=store_url,
        models={"openai/gpt-4o-mini": {"model": CANDIDATE, "rate": 1.0}},  # type: ignore[dict-item]
        opt_out_tenants=["acme"],
    )
    _, history = await _run(client, registry, _spec(), shadow=config, tenant="globex")
    assert [o["outcome"] for o in _outcomes(history)] == ["recorded", "recorded"]

    sim.reset()
    result, opted_out = await _run(client, registry, _spec(), shadow=config, tenant="acme")
    assert result.status == "completed"
    assert _shadow_events(opted_out) == []
    assert "claude-sonnet-4-5" not in sim.stats()["by_model"]
    store = open_store(store_url)
    assert {p.tenant for p in store.pairs()} == {"globex"}
    # A step may refuse shadowing whatever the worker's rules say (the run still read the rules).
    _, refused = await _run(client, registry, _spec(shadow=False, last=False), shadow=config)  # type: ignore[arg-type]
    assert "shadow_chat" not in _activities(refused).values()
    assert _shadow_events(refused) == [
        "EVENT_TYPE_MARKER_RECORDED",
        "EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES",
        "EVENT_TYPE_MARKER_RECORDED",
    ]
    store.close()


async def test_a_failing_candidate_changes_nothing_and_its_failure_is_recorded(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    plain, _ = await _run(client, registry, _spec(), shadow=None)
    sim.add_faults([{"fault": "500", "model": "claude-sonnet-4-5"}])
    rule = {"model": CANDIDATE, "max_attempts": 2}
    result, history = await _run(
        client,
        registry,
        _spec(shadow=rule, last=rule),
        shadow=ShadowConfig(close_wait_s=WAIT, store=store_url),
    )
    assert result.status == "completed" and result.outputs == plain.outputs
    outcomes = _outcomes(history)
    assert [o["outcome"] for o in outcomes] == ["recorded", "recorded"]
    assert all(o["candidate_error_type"] for o in outcomes)
    pairs = open_store(store_url).pairs()
    assert len(pairs) == 2
    for pair in pairs:
        assert not pair.candidate.ok and pair.candidate.output is None
        assert pair.candidate.error_type == outcomes[0]["candidate_error_type"]
        assert pair.primary.ok and pair.primary.output


async def test_the_breaker_skips_a_candidate_that_keeps_failing_and_counts_it(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    sim.add_faults([{"fault": "503", "model": "claude-sonnet-4-5"}])
    config = ShadowConfig(
        close_wait_s=WAIT,
        store=store_url,
        models={"openai/gpt-4o-mini": {"model": CANDIDATE, "max_attempts": 1}},  # type: ignore[dict-item]
        breaker={"failure_threshold": 2, "cooldown_s": 3600},  # type: ignore[arg-type]
    )
    queue = f"shadow-{uuid.uuid4().hex[:10]}"
    outcomes: list[str] = []
    async with build_worker(client, task_queue=queue, registry=registry, shadow=config):
        for _ in range(2):  # four shadowed calls, one after another
            handle = await start_pipeline(client, _spec(), {"ticket": TICKET}, task_queue=queue)
            assert (await handle.result()).status == "completed"
            outcomes += [o["outcome"] for o in _outcomes(await handle.fetch_history())]
    assert outcomes == ["recorded", "recorded", "breaker_open", "breaker_open"]
    assert len(open_store(store_url).pairs()) == 2  # skipped calls are counted, not stored


async def test_a_hanging_candidate_neither_delays_the_next_step_nor_the_result(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    plain, _ = await _run(client, registry, _spec(), shadow=None)
    sim.add_faults([{"fault": "hang", "model": "claude-sonnet-4-5", "hang_seconds": 600}])
    result, history = await _run(
        client,
        registry,
        _spec(shadow={"model": CANDIDATE, "timeout_s": 5, "max_attempts": 1}),
        shadow=ShadowConfig(close_wait_s=WAIT, store=store_url),
    )
    assert result.status == "completed" and result.outputs == plain.outputs
    # The draft step's call was scheduled and answered while the candidate still hung.
    names = _activities(history)
    shadow_done = next(
        e.event_id
        for e in history.events
        if e.HasField("activity_task_completed_event_attributes")
        and names[e.activity_task_completed_event_attributes.scheduled_event_id] == "shadow_chat"
    )
    draft_done = [
        e.event_id
        for e in history.events
        if e.HasField("activity_task_completed_event_attributes")
        and names[e.activity_task_completed_event_attributes.scheduled_event_id] == "llm_chat"
    ][-1]
    assert draft_done < shadow_done
    (pair,) = open_store(store_url).pairs()
    assert pair.candidate.error_type == "UpstreamTimeout" and pair.candidate.latency_ms is not None


async def test_a_slow_candidate_on_the_last_step_does_not_delay_the_result_and_records_its_pair_after(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    """The candidate of the last step takes 20 s; the run waits for it at most close_wait_s (the
    default), so the result is in while the simulator still holds the candidate's request, and the
    pair is written afterwards by the worker running the call."""
    sim.add_faults([{"model": "claude-sonnet-4-5", "latency": 20}])
    queue = f"shadow-{uuid.uuid4().hex[:10]}"
    config = ShadowConfig(store=store_url)
    assert config.close_wait_s < 20
    async with build_worker(client, task_queue=queue, registry=registry, shadow=config):
        handle = await start_pipeline(
            client, _spec(last={"model": CANDIDATE}), {"ticket": TICKET}, task_queue=queue
        )
        result = await handle.result()
        # The candidate has not answered yet: its pair is written as soon as it does.
        assert open_store(store_url).pairs() == [], "the run waited for the candidate's answer"
        history = await handle.fetch_history()
        deadline = asyncio.get_running_loop().time() + 90
        pairs = open_store(store_url).pairs()
        while not pairs:
            assert asyncio.get_running_loop().time() < deadline, (
                f"no pair 90 s after the result; simulator saw {sim.stats()['by_model']}"
            )
            await asyncio.sleep(0.2)
            pairs = open_store(store_url).pairs()
    assert result.status == "completed"
    assert history.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED
    # The run scheduled the call, waited for it the bounded time (the timer fired) and closed without it.
    shadow_ids = [i for i, name in _activities(history).items() if name == "shadow_chat"]
    assert len(shadow_ids) == 1 and _outcomes(history) == []
    assert "patch:shadow-close-bound" in [_marker_id(e) for e in history.events]
    kinds = [EventType.Name(e.event_type) for e in history.events]
    assert "EVENT_TYPE_TIMER_FIRED" in kinds and "EVENT_TYPE_TIMER_CANCELED" not in kinds
    (pair,) = pairs
    assert pair.step_id == "draft" and pair.workflow_id == handle.id
    assert pair.primary.output == result.outputs["reply"]
    assert pair.candidate.ok and pair.candidate.output and pair.candidate.model == CANDIDATE
    assert pair.candidate.latency_ms is not None and pair.candidate.latency_ms >= 20_000
    assert sim.stats()["by_model"].get("claude-sonnet-4-5") == 1


async def test_a_retryable_failure_after_the_run_closed_is_recorded_at_once(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    """The last step's candidate answers 503 after 5 s, when its run has closed: Temporal would refuse
    the failure and never retry, so the call records it as the candidate's error instead."""
    sim.add_faults([{"fault": "503", "model": "claude-sonnet-4-5", "latency": 5, "times": 1, "key": "late"}])
    queue = f"shadow-{uuid.uuid4().hex[:10]}"
    config = ShadowConfig(store=store_url, close_wait_s=0.5)
    async with build_worker(client, task_queue=queue, registry=registry, shadow=config):
        handle = await start_pipeline(
            client, _spec(last={"model": CANDIDATE, "max_attempts": 2}), {"ticket": TICKET}, task_queue=queue
        )
        result = await handle.result()
        assert open_store(store_url).pairs() == [], "the run waited for the candidate's answer"
        deadline = asyncio.get_running_loop().time() + 90
        pairs = open_store(store_url).pairs()
        while not pairs:
            assert asyncio.get_running_loop().time() < deadline, (
                f"no pair 90 s after the result; simulator saw {sim.stats()}"
            )
            await asyncio.sleep(0.2)
            pairs = open_store(store_url).pairs()
    assert result.status == "completed"
    (pair,) = pairs
    assert pair.step_id == "draft" and pair.candidate.error_type == "Overloaded"
    assert sim.stats()["by_model"].get("claude-sonnet-4-5") == 1  # asked once: no retry


async def test_hourly_caps_hold_through_the_budget_workflow(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    rule = {"model": CANDIDATE, "per_hour": 1}
    scope = f"caps-{uuid.uuid4().hex[:8]}"
    queue = f"shadow-{uuid.uuid4().hex[:10]}"
    config = ShadowConfig(close_wait_s=WAIT, store=store_url, scope=scope)
    async with build_worker(client, task_queue=queue, registry=registry, shadow=config):
        handle = await start_pipeline(
            client, _spec(shadow=rule, last=rule), {"ticket": TICKET}, task_queue=queue
        )
        assert (await handle.result()).status == "completed"
        outcomes = _outcomes(await handle.fetch_history())
        budget = client.get_workflow_handle(f"kernelflow-shadow-budget/{scope}/{CANDIDATE}")
        state = await budget.query("state")
        await budget.terminate("test done")
    assert sorted(o["outcome"] for o in outcomes) == ["over_budget", "recorded"]
    assert state["calls_this_hour"] == 1 and state["refused"] == 1 and state["cost_usd_this_hour"] > 0
    assert len(open_store(store_url).pairs()) == 1


async def test_shadow_calls_in_flight_finish_before_a_continue_as_new(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    """A long pipeline continues as new between steps; the shadow calls of the run that ends are
    awaited first, and the next run reads the rules again and goes on shadowing."""
    rule = {"model": CANDIDATE}
    steps = [
        {
            "id": f"s{n}",
            "model": "openai/gpt-4o-mini",
            "prompt": f"Part {n}: {{{{ inputs.ticket }}}}",
            "shadow": rule,
        }
        for n in range(4)
    ]
    spec = parse_pipeline(
        {"name": "long-shadowed", "inputs": {"ticket": {"type": "string"}}, "steps": steps, "outputs": {}}
    )
    queue = f"shadow-{uuid.uuid4().hex[:10]}"
    request = PipelineRequest(
        pipeline=spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        inputs={"ticket": TICKET},
        continue_as_new_after=20,
    )
    async with build_worker(
        client, task_queue=queue, registry=registry, shadow=ShadowConfig(close_wait_s=WAIT, store=store_url)
    ):
        handle = await client.start_workflow(
            PipelineWorkflow.run, request, id=f"long-{uuid.uuid4().hex[:8]}", task_queue=queue
        )
        result = await handle.result()
        first = await client.get_workflow_handle(
            handle.id, run_id=handle.first_execution_run_id
        ).fetch_history()
    assert result.status == "completed"
    pairs = open_store(store_url).pairs(pipeline="long-shadowed")
    assert sorted(p.step_id for p in pairs) == ["s0", "s1", "s2", "s3"]
    assert len({p.run_id for p in pairs}) > 1  # the run continued as new in between
    assert first.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    scheduled = [n for n in _activities(first).values() if n == "shadow_chat"]
    assert scheduled and len(_outcomes(first)) == len(scheduled)  # each finished in the run that started it


async def test_a_continue_as_new_waits_for_a_slow_shadow_call_only_the_bounded_time(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    """The first step's candidate takes 20 s: the run that started it continues as new after at most
    close_wait_s, the pipeline's result comes before that candidate answers, and its pair is written
    afterwards, under the run that started it."""
    sim.add_faults([{"model": "claude-sonnet-4-5", "match": "Part 0:", "latency": 20}])
    steps = [
        {"id": f"s{n}", "model": "openai/gpt-4o-mini", "prompt": f"Part {n}: {{{{ inputs.ticket }}}}"}
        for n in range(4)
    ]
    steps[0]["shadow"] = {"model": CANDIDATE}
    spec = parse_pipeline(
        {"name": "long-slow-shadow", "inputs": {"ticket": {"type": "string"}}, "steps": steps, "outputs": {}}
    )
    queue = f"shadow-{uuid.uuid4().hex[:10]}"
    request = PipelineRequest(
        pipeline=spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        inputs={"ticket": TICKET},
        continue_as_new_after=20,
    )
    async with build_worker(
        client, task_queue=queue, registry=registry, shadow=ShadowConfig(store=store_url)
    ):
        handle = await client.start_workflow(
            PipelineWorkflow.run, request, id=f"long-{uuid.uuid4().hex[:8]}", task_queue=queue
        )
        result = await handle.result()
        assert open_store(store_url).pairs() == [], "a run waited for the slow candidate's answer"
        deadline = asyncio.get_running_loop().time() + 90
        pairs = open_store(store_url).pairs()
        while not pairs:
            assert asyncio.get_running_loop().time() < deadline, (
                f"no pair 90 s after the result; simulator saw {sim.stats()['by_model']}"
            )
            await asyncio.sleep(0.2)
            pairs = open_store(store_url).pairs()
        first = await client.get_workflow_handle(
            handle.id, run_id=handle.first_execution_run_id
        ).fetch_history()
    assert result.status == "completed"
    assert first.events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    assert [n for n in _activities(first).values() if n == "shadow_chat"] == ["shadow_chat"]
    assert _outcomes(first) == []  # the run continued as new without it
    (pair,) = pairs
    assert pair.step_id == "s0" and pair.run_id == handle.first_execution_run_id and pair.candidate.ok


async def test_a_candidate_with_a_provider_limit_is_shadowed_only_when_there_is_capacity_now(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    """The admission-control limiter counts shadow calls against the candidate's limit; a shadow call
    is admitted now or skipped, never queued ahead of production calls."""
    queue = f"shadow-{uuid.uuid4().hex[:10]}"
    limits = LimitsConfig.model_validate({"models": {CANDIDATE: {"requests_per_minute": 1}}})
    rule = {"model": CANDIDATE}
    async with build_worker(
        client,
        task_queue=queue,
        registry=registry,
        shadow=ShadowConfig(close_wait_s=WAIT, store=store_url),
        limits=limits,
    ):
        handle = await start_pipeline(
            client, _spec(shadow=rule, last=rule), {"ticket": TICKET}, task_queue=queue
        )
        result = await handle.result()
        outcomes = _outcomes(await handle.fetch_history())
        limiter = client.get_workflow_handle(f"kernelflow-limiter/{queue}/{CANDIDATE}")
        state = await limiter.query("state")
        await limiter.terminate("test done")
    assert result.status == "completed"
    assert sorted(o["outcome"] for o in outcomes) == ["over_limit", "recorded"]
    assert state["waiting"] == 0 and state["active"] == 0 and state["admitted"] == 1
    assert sim.stats()["by_model"]["claude-sonnet-4-5"] == 1


async def test_a_sealed_store_holds_no_prompt_in_the_clear(
    client: Client, registry: Registry, sim: SimulatorServer, tmp_path: Path
) -> None:
    keys = FileKeyProvider(dir=tmp_path / "keys")
    keys.ring_path().parent.mkdir(parents=True)
    key = generate_key("shadow-k1")
    keys.ring_path().write_text(format_ring([key]))
    payloads = PayloadSettings(
        dir=tmp_path / "payloads",
        encryption=EncryptionSettings(enabled=True, provider="file", options={"dir": str(tmp_path / "keys")}),
        compression=CompressionSettings(enabled=False),
    )
    database = tmp_path / "sealed.db"
    result, _ = await _run(
        client,
        registry,
        _spec(shadow={"model": CANDIDATE}),
        shadow=ShadowConfig(close_wait_s=WAIT, store=f"sqlite:///{database}"),
        payloads=payloads,
    )
    assert result.status == "completed"
    raw = database.read_bytes() + (tmp_path / "sealed.db-wal").read_bytes()
    assert b"invoice 7781" not in raw and b"Classify this ticket" not in raw
    with pytest.raises(ConfigurationError, match="encrypted pairs"):
        open_store(f"sqlite:///{database}").pairs()
    (pair,) = open_store(f"sqlite:///{database}", sealer=CodecSealer.of(build_codec(payloads))).pairs()
    assert TICKET in json.dumps(pair.request)
    # What a report opens: the store and the keys of the worker's config.
    config = KernelflowConfig(
        payloads=payloads, shadow=ShadowConfig(close_wait_s=WAIT, store=f"sqlite:///{database}")
    )
    (again,) = (await open_configured_store(config, environ={})).pairs()
    assert again == pair
    keys.ring_path().write_text(format_ring([generate_key("other")]))  # the key is gone from the ring
    with pytest.raises(ConfigurationError, match="no key 'shadow-k1'"):
        open_store(f"sqlite:///{database}", sealer=CodecSealer.of(build_codec(payloads))).pairs()


def test_shadow_specs_and_rules_are_checked_with_what_is_wrong(registry: Registry) -> None:
    with pytest.raises(PipelineError, match=r"steps\[0\] \(id 'classify'\)\.shadow: rate: Input should be"):
        _spec(shadow={"model": CANDIDATE, "rate": 2})
    with pytest.raises(
        PipelineError, match=r"shadow: model: String should match pattern .* \(got 'not a model'\)"
    ):
        _spec(shadow={"model": "not a model"})
    with pytest.raises(PipelineError, match="mode: batch cannot be combined with shadow"):
        parse_pipeline(
            {
                "name": "b",
                "steps": [
                    {
                        "id": "m",
                        "type": "map",
                        "items": "{{ [1, 2] }}",
                        "steps": [
                            {
                                "id": "s",
                                "model": "openai/gpt-4o-mini",
                                "prompt": "x",
                                "mode": "batch",
                                "shadow": {"model": CANDIDATE},
                            },
                        ],
                    }
                ],
            }
        )
    config = ShadowConfig(models={"openai/gpt-4o-mini": {"model": "nowhere/model-x"}})  # type: ignore[dict-item]
    with pytest.raises(
        ConfigurationError, match=r"shadow\.models\['openai/gpt-4o-mini'\]\.model: 'nowhere/model-x'"
    ):
        check_shadow_rules(config, registry)


async def test_a_worker_refuses_to_start_with_an_unknown_candidate(
    client: Client, registry: Registry
) -> None:
    config = ShadowConfig(models={"fast-alias": {"model": CANDIDATE}})  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError, match=r"shadow\.models\['fast-alias'\]: 'fast-alias'"):
        worker: Worker = build_worker(client, task_queue="never", registry=registry, shadow=config)
        async with worker:
            pass


async def test_tool_calls_are_recorded_as_output_and_never_executed(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "issue_refund",
            "description": "Refund an invoice",
            "parameters": {
                "type": "object",
                "required": ["invoice"],
                "properties": {"invoice": {"type": "string"}},
            },
        },
    }
    spec = parse_pipeline(
        {
            "name": "tooled",
            "inputs": {"ticket": {"type": "string"}},
            "steps": [
                {
                    "id": "act",
                    "model": "openai/gpt-4o-mini",
                    "prompt": "Handle: {{ inputs.ticket }}",
                    "tools": [tool],
                    "shadow": {"model": CANDIDATE},
                }
            ],
            "outputs": {"text": "{{ steps.act.output }}"},
        }
    )
    result, history = await _run(
        client, registry, spec, shadow=ShadowConfig(close_wait_s=WAIT, store=store_url)
    )
    assert result.status == "completed"
    (pair,) = open_store(store_url).pairs()
    assert pair.request is not None and pair.request["tools"][0]["function"]["name"] == "issue_refund"
    for side in (pair.primary, pair.candidate):
        assert side.tool_calls and side.tool_calls[0]["function"]["name"] == "issue_refund"
    # One call each, no tool run and no follow-up turn: the candidate's tool call is only recorded.
    assert sim.stats()["by_model"] == {"gpt-4o-mini": 1, "claude-sonnet-4-5": 1}
    assert sorted(_activities(history).values()) == ["llm_chat", "shadow_chat"]


async def test_a_spec_whose_candidate_the_worker_cannot_call_fails_before_its_first_step(
    client: Client, registry: Registry, sim: SimulatorServer, store_url: str
) -> None:
    queue = f"shadow-{uuid.uuid4().hex[:10]}"
    spec = _spec(shadow={"model": "nowhere/model-x"})
    async with build_worker(
        client, task_queue=queue, registry=registry, shadow=ShadowConfig(close_wait_s=WAIT, store=store_url)
    ):
        handle = await start_pipeline(client, spec, {"ticket": TICKET}, task_queue=queue)
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "PipelineError"
    assert "step 'classify' shadow.model: 'nowhere/model-x'" in cause.message and "nowhere" in cause.message
    assert "llm_chat" not in _activities(await handle.fetch_history()).values()
    assert sim.stats()["requests"] == 0


@pytest.fixture(autouse=True)
async def _no_rules_left_behind() -> AsyncIterator[None]:
    """Worker-wide rules are installed per process; the next test's worker installs its own."""
    yield
    from workflows.engine.shadow import install_shadow

    install_shadow(None)


def test_a_worker_process_shadows_a_pipeline_started_with_the_temporal_cli(
    temporal_target: str, sim: SimulatorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a user: ``kernelflow worker`` with a config file (a worker rule by alias, an opted-out
    tenant, a store path), encryption keys from the environment, pipelines started by the ``temporal``
    CLI with raw JSON, then the store read with the worker's config and keys."""
    binary, temporal = shutil.which("kernelflow"), shutil.which("temporal")
    assert binary and temporal, "the kernelflow and temporal commands are not installed"
    queue = f"shadow-cli-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "kernelflow.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "providers": {"openai": {"base_url": f"{sim.url}/v1"}, "anthropic": {"base_url": sim.url}},
                "aliases": {"fast": "openai/gpt-4o-mini"},
                "shadow": {
                    "store": f"sqlite:///{tmp_path}/pairs.db",
                    "models": {"fast": {"model": CANDIDATE}},
                    "opt_out_tenants": ["acme"],
                    "close_wait_s": WAIT,
                },
            }
        )
    )
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": temporal_target,
        "KERNELFLOW_TASK_QUEUE": queue,
        "KERNELFLOW_CONFIG": str(config),
        "KERNELFLOW_ENCRYPTION_KEYS": format_ring([generate_key("cli-k1")]),
        "KERNELFLOW_PAYLOADS_DIR": str(tmp_path / "payloads"),
        "OPENAI_API_KEY": "sim-key",
        "ANTHROPIC_API_KEY": "sim-key",
        "KERNELFLOW_LOG_FORMAT": "json",
    }
    env.pop("KERNELFLOW_SHADOW_STORE", None)
    spec = {
        "name": "cli-shadowed",
        "inputs": {"ticket": {"type": "string"}},
        "steps": [{"id": "answer", "model": "fast", "prompt": "Answer: {{ inputs.ticket }}"}],
        "outputs": {"answer": "{{ steps.answer.output }}"},
    }
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen([binary, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for tenant in ("globex", "acme"):
            request = {
                "pipeline": spec,
                "inputs": {"ticket": f"parcel for {tenant} is late"},
                "tenant": tenant,
            }
            for command in (
                [
                    "start",
                    "--type",
                    "PipelineWorkflow",
                    "--task-queue",
                    queue,
                    "--input",
                    json.dumps(request),
                ],
                ["result"],
            ):
                done = subprocess.run(
                    [
                        temporal,
                        "workflow",
                        *command,
                        "--workflow-id",
                        f"{queue}-{tenant}",
                        "--address",
                        temporal_target,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert done.returncode == 0, f"temporal workflow {command[0]}: {done.stderr or done.stdout}"
            assert "COMPLETED" in done.stdout
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
    raw = (tmp_path / "pairs.db").read_bytes() + (tmp_path / "pairs.db-wal").read_bytes()
    assert b"parcel for" not in raw  # sealed with the worker's keys
    (pair,) = asyncio.run(open_configured_store(environ=env)).pairs()  # the worker's environment, given
    for name in ("KERNELFLOW_CONFIG", "KERNELFLOW_ENCRYPTION_KEYS"):  # or the reader's own, as a user's
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv("KERNELFLOW_SHADOW_STORE", raising=False)
    assert asyncio.run(open_configured_store()).pairs() == [pair]
    assert pair.workflow_id == f"{queue}-globex" and pair.tenant == "globex"
    assert pair.primary.model == "openai/gpt-4o-mini" and pair.candidate.model == CANDIDATE
    assert pair.candidate.ok and "parcel for globex" in json.dumps(pair.request)
