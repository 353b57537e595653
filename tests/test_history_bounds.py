"""History stays bounded: large payloads are stored outside it, oversized inline ones fail at once.

The workload is the one that used to end at call 53 on Temporal's 50 MB history limit: a
conversation re-sent whole at every model call, growing to ~100k tokens.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.converter import StorageDriverClaim, StorageDriverRetrieveContext, StorageDriverStoreContext
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.service import RPCError

from kernel.registry import Registry
from simulator.server import SimulatorServer
from worker.app import build_worker
from worker.config import TEMPORAL_PAYLOAD_LIMIT, PayloadSettings, load_config, payload_settings_from_env
from worker.storage import (
    FileSystemPayloadStore,
    PayloadStoreError,
    PayloadTooLarge,
    build_data_converter,
    build_storage_driver,
)
from workflows.conversation import ConversationInput, ConversationResult, ConversationWorkflow

HISTORY_WARN_BYTES = 10 * 1024 * 1024
"""Temporal warns at 10 MB of history and terminates the workflow at 50 MB."""

MODEL = "openai/gpt-4o-mini"


def _payload(data: bytes) -> Payload:
    return Payload(metadata={"encoding": b"binary/plain"}, data=data)


async def _connect(target: str, payloads: PayloadSettings, identity: str | None = None) -> Client:
    extra: dict[str, Any] = {"identity": identity} if identity else {}
    return await Client.connect(target, data_converter=build_data_converter(payloads), **extra)


async def _history_bytes(handle: WorkflowHandle[Any, Any]) -> int:
    history = await handle.fetch_history()
    return sum(len(event.SerializeToString()) for event in history.events)


@pytest.fixture
async def stored(temporal_target: str, tmp_path: Path) -> AsyncIterator[tuple[Client, PayloadSettings]]:
    settings = PayloadSettings(dir=tmp_path / "payloads")
    yield await _connect(temporal_target, settings), settings


# --- the store ------------------------------------------------------------------------------------


async def test_store_is_content_addressed_atomic_and_round_trips(tmp_path: Path) -> None:
    store = FileSystemPayloadStore(tmp_path / "store")
    big = _payload(b"conversation " * 10_000)
    first = await store.store(StorageDriverStoreContext(), [big])
    again = await store.store(StorageDriverStoreContext(), [big, _payload(b"other")])

    assert first[0] == again[0]
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert len(files) == 2, "the same payload stored twice must be one file"
    assert not [p for p in files if p.name.startswith(".tmp-")], "no temporary file may be left"
    [back] = await store.retrieve(StorageDriverRetrieveContext(), [first[0]])
    assert back == big


async def test_missing_or_corrupt_stored_payload_is_a_clear_error(tmp_path: Path) -> None:
    store = FileSystemPayloadStore(tmp_path / "store")
    [claim] = await store.store(StorageDriverStoreContext(), [_payload(b"x" * 1000)])
    path = store.path_for(claim.claim_data["sha256"])

    path.write_bytes(path.read_bytes()[:-1] + b"y")
    with pytest.raises(PayloadStoreError, match=r"corrupt.*SHA-256"):
        await store.retrieve(StorageDriverRetrieveContext(), [claim])

    path.unlink()
    with pytest.raises(PayloadStoreError, match=r"missing.*shared volume"):
        await store.retrieve(StorageDriverRetrieveContext(), [claim])

    with pytest.raises(PayloadStoreError, match="no valid sha256"):
        await store.retrieve(StorageDriverRetrieveContext(), [StorageDriverClaim({"sha256": "../../etc"})])


async def test_converter_stores_payloads_from_the_threshold_up(tmp_path: Path) -> None:
    converter = build_data_converter(PayloadSettings(dir=tmp_path, threshold_bytes=1000))
    small, large = await converter.encode(["a" * 100, "b" * 5000])
    assert small.data == b'"' + b"a" * 100 + b'"'
    assert len(large.data) < 500 and large.external_payloads[0].size_bytes > 5000
    assert await converter.decode([small, large], [str, str]) == ["a" * 100, "b" * 5000]


def test_payloads_section_of_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "kernelflow.yaml"
    config_file.write_text("payloads: {dir: shared/payloads, threshold_bytes: 4096}\n")
    payloads = load_config(config_file).payloads
    assert payloads.dir == tmp_path / "shared" / "payloads" and payloads.threshold_bytes == 4096
    assert load_config(None).payloads.storage == "filesystem"

    env = {"KERNELFLOW_CONFIG": str(config_file), "KERNELFLOW_PAYLOADS_STORAGE": "off"}
    from_env = payload_settings_from_env(env)
    assert from_env.storage == "off" and from_env.threshold_bytes == 4096

    custom = PayloadSettings(
        storage="driver",
        driver="worker.storage:FileSystemPayloadStore",
        driver_options={"root": str(tmp_path / "elsewhere"), "name": "team.store"},
    )
    driver = build_storage_driver(custom)
    assert driver is not None and driver.name() == "team.store"
    with pytest.raises(ValueError, match=r"payloads\.driver names no"):
        PayloadSettings(storage="driver")


# --- history size, end to end -------------------------------------------------------------------


async def test_two_hundred_calls_over_a_100k_token_conversation_keep_history_small(
    stored: tuple[Client, PayloadSettings], registry: Registry, sim: SimulatorServer
) -> None:
    client, settings = stored
    queue = f"history-{uuid.uuid4().hex[:8]}"
    async with build_worker(
        client, task_queue=queue, registry=registry, extra_workflows=[ConversationWorkflow]
    ):
        handle = await client.start_workflow(
            ConversationWorkflow.run,
            ConversationInput(models=[MODEL], calls=200),
            id=f"conversation-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
        )
        result = await handle.result()

    assert result.calls == 200 and result.models == [MODEL] * 200
    assert result.chars >= 400_000, "the conversation should reach ~100k tokens"
    assert "Turn 200" in result.last_reply
    assert sim.stats()["requests"] == 200
    stored_bytes = await _history_bytes(handle)
    # With every call's input inline, the history would hold at least every conversation sent.
    inline_at_least = sum(result.request_chars)
    print(
        f"\nhistory with payload storage: {stored_bytes / 1e6:.2f} MB for 200 calls; "
        f"inline it would be at least {inline_at_least / 1e6:.1f} MB"
    )
    assert stored_bytes < HISTORY_WARN_BYTES
    assert inline_at_least > 5 * HISTORY_WARN_BYTES * 0.7 > 10 * stored_bytes
    assert await asyncio.to_thread(lambda: any(settings.dir.rglob("*"))), "payloads should be stored"


async def test_without_storage_history_grows_with_every_conversation_resent(
    temporal_target: str, registry: Registry, sim: SimulatorServer
) -> None:
    client = await _connect(temporal_target, PayloadSettings(storage="off"))
    queue = f"naive-{uuid.uuid4().hex[:8]}"
    async with build_worker(
        client, task_queue=queue, registry=registry, extra_workflows=[ConversationWorkflow]
    ):
        handle = await client.start_workflow(
            ConversationWorkflow.run,
            ConversationInput(models=[MODEL], calls=40),
            id=f"naive-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
        )
        result = await handle.result()
    inline_bytes = await _history_bytes(handle)
    print(f"\nhistory without payload storage: {inline_bytes / 1e6:.2f} MB for 40 calls")
    # Every call's whole conversation is in the history: the sum of what was sent, quadratic in turns.
    assert inline_bytes >= sum(result.request_chars)
    assert sum(result.request_chars) > 40 * 40 / 2 * 1800


async def test_conversation_completes_after_a_worker_restart_reading_stored_payloads(
    temporal_target: str, tmp_path: Path, registry: Registry, sim: SimulatorServer
) -> None:
    settings = PayloadSettings(dir=tmp_path / "payloads", threshold_bytes=4096)
    starter = await _connect(temporal_target, settings)
    queue = f"restart-{uuid.uuid4().hex[:8]}"
    handle = await starter.start_workflow(
        ConversationWorkflow.run,
        # Each call takes at least 50 ms, so the first worker stops mid-conversation.
        ConversationInput(models=[MODEL], calls=30, system="Review the contract. [[sim: latency=0.05]]"),
        id=f"restart-{uuid.uuid4().hex[:8]}",
        task_queue=queue,
    )
    first = await _connect(temporal_target, settings, identity="worker-a")
    async with build_worker(
        first, task_queue=queue, registry=registry, extra_workflows=[ConversationWorkflow]
    ):
        completed = 0
        async for event in handle.fetch_history_events(wait_new_event=True):
            completed += event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
            if completed >= 5:
                break
    # A fresh worker with no cache replays the whole history on every task, reading each stored payload.
    second = await _connect(temporal_target, settings, identity="worker-b")
    async with build_worker(
        second,
        task_queue=queue,
        registry=registry,
        extra_workflows=[ConversationWorkflow],
        max_cached_workflows=0,
    ):
        result: ConversationResult = await handle.result()

    assert result.calls == 30 and len(result.request_chars) == 30 and result.messages == 61
    assert "Turn 30" in result.last_reply
    history = await handle.fetch_history()
    workers = {
        e.activity_task_started_event_attributes.identity
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    }
    assert workers == {"worker-a", "worker-b"}
    assert sim.stats()["requests"] == 30, "no completed call may run twice"


# --- oversized payloads without storage ---------------------------------------------------------


async def test_oversized_workflow_input_is_refused_before_start(temporal_target: str) -> None:
    client = await _connect(temporal_target, PayloadSettings(storage="off"))
    workflow_id = f"too-big-{uuid.uuid4().hex[:8]}"
    with pytest.raises(PayloadTooLarge) as refused:
        await client.start_workflow(
            ConversationWorkflow.run,
            ConversationInput(models=[MODEL], system="x" * (TEMPORAL_PAYLOAD_LIMIT + 1000)),
            id=workflow_id,
            task_queue="nobody-polls-this",
        )
    message = str(refused.value)
    assert str(TEMPORAL_PAYLOAD_LIMIT) in message and "payloads.storage" in message
    assert refused.value.size > TEMPORAL_PAYLOAD_LIMIT and refused.value.non_retryable
    with pytest.raises(RPCError, match="not found"):
        await client.get_workflow_handle(workflow_id).describe()


async def test_oversized_model_answer_fails_the_call_at_once_without_retrying(
    temporal_target: str, registry: Registry, sim: SimulatorServer
) -> None:
    sim.add_faults([{"model": "gpt-4.1-nano", "reply": "z" * (TEMPORAL_PAYLOAD_LIMIT + 100_000)}])
    client = await _connect(temporal_target, PayloadSettings(storage="off"))
    queue = f"too-big-{uuid.uuid4().hex[:8]}"
    async with build_worker(
        client, task_queue=queue, registry=registry, extra_workflows=[ConversationWorkflow]
    ):
        handle = await client.start_workflow(
            ConversationWorkflow.run,
            ConversationInput(
                models=["openai/gpt-4.1-nano", MODEL],
                calls=1,
                retry={"max_attempts": 4, "initial_interval_s": 0.1},
            ),
            id=f"too-big-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
        )
        result = await handle.result()
    # The oversized answer failed its model once (no retry, so no second bill); the fallback answered.
    assert result.models == [MODEL]
    assert sim.stats()["by_model"] == {"gpt-4.1-nano": 1, "gpt-4o-mini": 1}
    failed = [
        e.activity_task_failed_event_attributes.failure
        for e in (await handle.fetch_history()).events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED
    ]
    assert len(failed) == 1
    assert failed[0].application_failure_info.type == "PayloadTooLarge"
    assert failed[0].application_failure_info.non_retryable
    assert str(TEMPORAL_PAYLOAD_LIMIT) in failed[0].message and "payload storage" in failed[0].message


async def test_oversized_answer_with_no_fallback_fails_the_workflow_naming_the_fix(
    temporal_target: str, registry: Registry, sim: SimulatorServer
) -> None:
    sim.add_faults([{"model": "gpt-4.1-nano", "reply": "z" * (TEMPORAL_PAYLOAD_LIMIT + 100_000)}])
    client = await _connect(temporal_target, PayloadSettings(storage="off"))
    queue = f"too-big-{uuid.uuid4().hex[:8]}"
    async with build_worker(
        client, task_queue=queue, registry=registry, extra_workflows=[ConversationWorkflow]
    ):
        handle = await client.start_workflow(
            ConversationWorkflow.run,
            ConversationInput(models=["openai/gpt-4.1-nano"], calls=1),
            id=f"too-big-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
        )
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError | ActivityError)
    assert "PayloadTooLarge" in str(cause) and "enable payload storage" in str(cause)
    assert sim.stats()["by_model"] == {"gpt-4.1-nano": 1}
