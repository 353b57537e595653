"""Payloads encrypted at rest, on a real Temporal server: what the history and the payload store hold,
key rotation, a missing key, mismatched processes, per-tenant keys and crypto-shredding."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.worker import Replayer

from kernel.errors import ConfigurationError
from kernel.keys import KeyUnavailable
from kernel.pipeline import PipelineSpec, parse_pipeline
from kernel.registry import Registry
from worker.app import build_worker, workflow_runner
from worker.codec import EncryptionMismatch, tenant_of
from worker.config import CompressionSettings, EncryptionSettings, PayloadSettings
from worker.keys import FileKeyProvider, format_ring, generate_key
from worker.storage import build_data_converter
from workflows.pipeline import PipelineWorkflow

CANARY = "CANARY-7f3a91-prompt"


def _spec(steps: list[dict[str, Any]] | None = None, name: str = "enc") -> PipelineSpec:
    steps = steps or [
        {"id": "classify", "model": "openai/gpt-4o-mini", "prompt": "{{ inputs.ticket }}"},
        {"id": "draft", "model": "openai/gpt-4o-mini", "prompt": "Answer: {{ steps.classify.output }}"},
    ]
    return parse_pipeline(
        {
            "name": name,
            "outputs": {"answer": "{{ steps." + steps[-1]["id"] + ".output }}"},
            "inputs": {"ticket": {"type": "string"}},
            "steps": steps
            or [
                {"id": "classify", "model": "openai/gpt-4o-mini", "prompt": "{{ inputs.ticket }}"},
                {
                    "id": "draft",
                    "model": "openai/gpt-4o-mini",
                    "prompt": "Answer: {{ steps.classify.output }}",
                },
            ],
        }
    )


def _settings(
    tmp: Path, *, keys: Path | None = None, enabled: bool = True, **encryption: Any
) -> PayloadSettings:
    return PayloadSettings(
        dir=tmp / "payloads",
        encryption=EncryptionSettings(
            enabled=enabled,
            provider="file",
            options={"dir": str(keys or tmp / "keys"), "create_tenant_keys": True},
            **encryption,
        ),
        compression=CompressionSettings(enabled=True, min_bytes=512),
    )


def _client(client: Client, settings: PayloadSettings) -> Client:
    return Client(**{**client.config(), "data_converter": build_data_converter(settings)})


def _payload_metadata(history: WorkflowHistory) -> list[dict[str, str]]:
    """The metadata of every payload in a history, as the server stores it; search attributes (the
    server indexes them) and the SDK's patch markers (the name of a code change) left out: neither goes
    through the codec."""
    found: list[dict[str, str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "metadata" in node and isinstance(node["metadata"], dict) and "encoding" in node["metadata"]:
                found.append(
                    {k: base64.b64decode(v).decode(errors="replace") for k, v in node["metadata"].items()}
                )
            for key, value in node.items():
                if key not in ("searchAttributes", "patch-data"):
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(history.to_json()))
    return found


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[FileKeyProvider]:
    provider = FileKeyProvider(dir=tmp_path / "keys", create_tenant_keys=True)
    provider.ring_path().parent.mkdir(parents=True)
    provider.ring_path().write_text(format_ring([generate_key("k1")]))
    yield provider


@pytest.fixture
async def encrypted(
    client: Client, registry: Registry, tmp_path: Path, keys: FileKeyProvider
) -> AsyncIterator[tuple[Client, str]]:
    """A client and a worker (on its own task queue) with encryption on, sharing keys and store."""
    enc = _client(client, _settings(tmp_path))
    queue = f"enc-{uuid.uuid4().hex[:10]}"
    async with build_worker(enc, task_queue=queue, registry=registry):
        yield enc, queue


async def test_history_and_payload_store_hold_only_ciphertext(
    encrypted: tuple[Client, str], tmp_path: Path
) -> None:
    from worker.client import start_pipeline

    enc, queue = encrypted
    # Over 64 KiB even compressed (random text), so it is kept in the payload store; the rest compresses.
    noise = base64.b64encode(os.urandom(100_000)).decode()
    long_ticket = f"{CANARY} " + "the customer writes at length. " * 4000 + noise
    handle = await start_pipeline(enc, _spec(), {"ticket": long_ticket}, task_queue=queue)
    result = await handle.result()
    assert CANARY in result.outputs["answer"], "the decrypted answer lost the prompt it echoes"

    history = await handle.fetch_history()
    assert CANARY not in history.to_json()
    metadata = _payload_metadata(history)
    assert metadata, "no payloads found in the history"
    clear = [m for m in metadata if m["encoding"] != "binary/encrypted"]
    assert clear, "the long ticket left no payload-store reference in the history"
    for reference in clear:  # a reference: the stored payload's hash and size, nothing else
        assert reference.get("messageType", "").endswith("ExternalStorageReference"), reference
    assert {m.get("encryption-key-id") for m in metadata if m["encoding"] == "binary/encrypted"} == {"k1"}

    stored = [p for p in (tmp_path / "payloads").rglob("*") if p.is_file()]
    assert stored, "the long ticket was not kept in the payload store"
    for path in stored:
        blob = path.read_bytes()
        assert CANARY.encode() not in blob
        payload = Payload.FromString(blob)
        assert payload.metadata["encoding"] == b"binary/encrypted"
        assert payload.metadata["kernelflow-compression"] == b"zlib"
    assert max(p.stat().st_size for p in stored) < len(long_ticket) * 0.75, "compression did not shrink it"


async def test_rotation_keeps_old_histories_readable_and_encrypts_with_the_newest_key(
    client: Client, registry: Registry, tmp_path: Path, keys: FileKeyProvider
) -> None:
    from worker.client import start_pipeline

    settings = _settings(tmp_path)
    old = _client(client, settings)
    queue = f"rot-{uuid.uuid4().hex[:10]}"
    async with build_worker(old, task_queue=queue, registry=registry):
        before = await start_pipeline(old, _spec(), {"ticket": f"{CANARY} before"}, task_queue=queue)
        await before.result()
    recorded = await before.fetch_history()

    rotated = keys.add_key()
    new = _client(client, settings)
    async with build_worker(new, task_queue=queue, registry=registry):
        after = await start_pipeline(new, _spec(), {"ticket": "after rotation"}, task_queue=queue)
        await after.result()
        assert (await new.get_workflow_handle(before.id).result())["status"] == "completed"
    ids = {m.get("encryption-key-id") for m in _payload_metadata(await after.fetch_history())}
    assert ids == {rotated.id}, f"new payloads are not encrypted with the newest key only: {ids}"

    # The history written under k1 replays on a worker whose ring is [new, k1].
    replay = await _replay(recorded, settings)
    assert replay.replay_failure is None, replay.replay_failure

    # Without k1 it cannot: the failure names the key id, it never yields garbage.
    keys.ring_path().write_text(format_ring([k for k in await keys.keys() if k.id != "k1"]))
    replay = await _replay(recorded, settings)
    assert replay.replay_failure is not None
    assert "'k1'" in str(replay.replay_failure), replay.replay_failure


async def _replay(history: WorkflowHistory, settings: PayloadSettings) -> Any:
    replayer = Replayer(
        workflows=[PipelineWorkflow],
        data_converter=build_data_converter(settings),
        workflow_runner=workflow_runner(),
    )
    return await replayer.replay_workflow(history, raise_on_replay_failure=False)


async def _workflow_task_failure(client: Client, workflow_id: str) -> str:
    """The message of the first failed workflow task, decoded with ``client``'s converter."""
    handle = client.get_workflow_handle(workflow_id)
    for _ in range(400):
        async for event in handle.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
                failure = event.workflow_task_failed_event_attributes.failure
                return str(await client.data_converter.decode_failure(failure))
        await asyncio.sleep(0.05)
    raise AssertionError(f"workflow {workflow_id} never failed a workflow task")


async def test_a_worker_without_the_key_fails_the_workflow_task_naming_the_key_id(
    client: Client, registry: Registry, tmp_path: Path, keys: FileKeyProvider
) -> None:
    from worker.client import start_pipeline

    writer = _client(client, _settings(tmp_path))
    other_keys = tmp_path / "other-keys"
    other_keys.mkdir()
    (other_keys / "default.keys").write_text(format_ring([generate_key("k9")]))
    reader = _client(client, _settings(tmp_path, keys=other_keys))
    queue = f"nokey-{uuid.uuid4().hex[:10]}"
    handle = await start_pipeline(writer, _spec(), {"ticket": CANARY}, task_queue=queue)
    async with build_worker(reader, task_queue=queue, registry=registry):
        message = await _workflow_task_failure(writer, handle.id)
    assert "no key 'k1'" in message and "[k9]" in message, message
    await handle.terminate()


async def test_client_and_worker_with_encryption_on_one_side_only_are_explained(
    client: Client, registry: Registry, tmp_path: Path, keys: FileKeyProvider
) -> None:
    from worker.client import start_pipeline

    on = _client(client, _settings(tmp_path))
    off = _client(client, _settings(tmp_path, enabled=False))

    # Client on, worker off: the worker cannot read the input and says why.
    queue = f"mis-{uuid.uuid4().hex[:10]}"
    handle = await start_pipeline(on, _spec(), {"ticket": CANARY}, task_queue=queue)
    async with build_worker(off, task_queue=queue, registry=registry):
        message = await _workflow_task_failure(on, handle.id)
    assert "encrypted with key 'k1'" in message and "encryption is off in this process" in message, message
    await handle.terminate()

    # Worker on, client off: the pipeline runs (the worker reads plaintext input), but the client cannot
    # read the encrypted result and says why instead of failing on JSON.
    queue = f"mis-{uuid.uuid4().hex[:10]}"
    async with build_worker(on, task_queue=queue, registry=registry):
        handle = await start_pipeline(off, _spec(), {"ticket": "plain"}, task_queue=queue)
        with pytest.raises(EncryptionMismatch, match="encryption is off in this process"):
            await handle.result()


async def test_per_tenant_keys_and_crypto_shredding(
    client: Client, registry: Registry, tmp_path: Path, keys: FileKeyProvider
) -> None:
    from worker.client import start_pipeline

    settings = _settings(tmp_path, tenant_keys=True)
    enc = _client(client, settings)
    child = {
        "id": "sub",
        "type": "pipeline",
        "spec": _spec(name="sub").model_dump(),
        "inputs": {"ticket": "{{ inputs.ticket }}"},
    }
    spec = _spec([{"id": "classify", "model": "openai/gpt-4o-mini", "prompt": "{{ inputs.ticket }}"}, child])
    queue = f"tenant-{uuid.uuid4().hex[:10]}"
    async with build_worker(enc, task_queue=queue, registry=registry):
        acme = await start_pipeline(enc, spec, {"ticket": f"{CANARY} acme"}, task_queue=queue, tenant="acme")
        globex = await start_pipeline(enc, spec, {"ticket": "globex data"}, task_queue=queue, tenant="globex")
        await acme.result()
        await globex.result()
        with pytest.raises(ConfigurationError, match="does not belong to tenant 'acme'"):
            await start_pipeline(
                enc, spec, {"ticket": "x"}, task_queue=queue, tenant="acme", workflow_id="plain-id"
            )

    assert acme.id.startswith("tenant/acme/") and tenant_of(acme.id) == "acme"
    child_id = f"{acme.id}/sub"
    for workflow_id in (acme.id, child_id):
        history = await enc.get_workflow_handle(workflow_id).fetch_history()
        tenants = {m.get("kernelflow-tenant") for m in _payload_metadata(history)}
        assert tenants == {"acme"}, f"{workflow_id}: payloads not all under acme's keys: {tenants}"

    # The procedure: destroying is refused while one of acme's pipelines runs; terminate, then destroy.
    async with build_worker(enc, task_queue=queue, registry=registry):
        gate = _spec([{"id": "hold", "type": "approval", "timeout_s": 3600}])
        waiting = await start_pipeline(enc, gate, {"ticket": "x"}, task_queue=queue, tenant="acme")
        with pytest.raises(ConfigurationError, match="still has 1 running pipeline"):
            await _destroy_when_listed(enc, keys, "acme", waiting.id)
        await waiting.terminate()
    # Destroy acme's keys: acme's stored prompts become unreadable everywhere; globex is untouched.
    assert await _destroy_when_listed(enc, keys, "acme", None)
    fresh = _client(client, settings)
    with pytest.raises(KeyUnavailable, match="tenant 'acme'"):
        await fresh.get_workflow_handle(acme.id).result()
    with pytest.raises(KeyUnavailable, match="tenant 'acme'"):
        await fresh.get_workflow_handle(child_id).result()
    assert (await fresh.get_workflow_handle(globex.id).result())["status"] == "completed"


async def _destroy_when_listed(
    client: Client, keys: FileKeyProvider, tenant: str, running: str | None
) -> bool:
    """``destroy_tenant_keys`` once the visibility store (eventually consistent) shows ``running`` as the
    tenant's only running workflow, or none."""
    from worker.keys_cli import destroy_tenant_keys, running_tenant_workflows

    for _ in range(200):
        if await running_tenant_workflows(client, tenant) == ([running] if running else []):
            break
        await asyncio.sleep(0.05)
    return await destroy_tenant_keys(client, keys, tenant)


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parent / "histories").glob("*.json")))
async def test_histories_written_before_encryption_replay_with_it_on(
    name: str, tmp_path: Path, keys: FileKeyProvider
) -> None:
    path = Path(__file__).parent / "histories" / f"{name}.json"
    history = WorkflowHistory.from_json(name, path.read_text(encoding="utf-8"))
    result = await _replay(history, _settings(tmp_path))
    assert result.replay_failure is None, f"{name}: {result.replay_failure}"


ENCRYPTED_HISTORIES = sorted((Path(__file__).parent / "histories" / "encrypted").glob("*.json"))
_ENCRYPTED_TEXT = {path.stem: path.read_text(encoding="utf-8") for path in ENCRYPTED_HISTORIES}


def test_encrypted_recordings_are_present() -> None:
    assert {p.stem for p in ENCRYPTED_HISTORIES} >= {"ticket-triage", "approval-gate", "fan-out"}


@pytest.mark.parametrize("path", ENCRYPTED_HISTORIES, ids=[p.stem for p in ENCRYPTED_HISTORIES])
async def test_recorded_encrypted_histories_still_decrypt_and_replay(path: Path, tmp_path: Path) -> None:
    """Histories recorded with encryption on (tests/histories/record_encrypted.py) pin the format: the
    codec of today reads what it wrote then."""
    from tests.histories.record_encrypted import settings as recorded_settings

    text = _ENCRYPTED_TEXT[path.stem]
    assert "ACME Corp" not in text and "charged twice" not in text
    history = WorkflowHistory.from_json(path.stem, text)
    result = await _replay(history, recorded_settings(tmp_path))
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"


async def test_failure_messages_are_encrypted(encrypted: tuple[Client, str]) -> None:
    from worker.client import start_pipeline

    enc, queue = encrypted
    spec = _spec([{"id": "boom", "model": "openai/gpt-4o-mini", "prompt": "{{ inputs.ticket }}"}])
    handle = await start_pipeline(enc, spec, {"ticket": f"[[sim: fault={CANARY}]]"}, task_queue=queue)
    with pytest.raises(WorkflowFailureError):
        await handle.result()
    raw = (await handle.fetch_history()).to_json()
    assert CANARY not in raw
    assert "Encoded failure" in raw
    # Decrypted, the message is intact.
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    assert CANARY in _chain(caught.value)


def _chain(error: BaseException | None) -> str:
    text = []
    while error is not None:
        text.append(str(error))
        error = error.__cause__
    return " | ".join(text)
