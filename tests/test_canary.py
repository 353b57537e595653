"""The proof that encryption leaves nothing readable at rest.

A worker (``kernelflow worker``, its own process, keys and payload store from environment variables) and
``kernelflow run`` run pipelines against an embedded Temporal dev server whose data is a SQLite file:
streaming, a fallback after an outage, a failure whose error message quotes the prompt, an approval, and
a conversation long enough to go through the payload store. Canaries (a prompt, an input value, an API
key, and one that reaches the history only through an error message) are then searched for in the
SQLite database, the payload store, the Temporal server's log, the worker's and the CLI's output, and
``temporal workflow show`` without the codec: none found. Through the codec server they are found
(except the API key, which is never a payload), so the search is not vacuous."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.client import WorkflowFailureError

from simulator.server import SimulatorServer
from worker.app import connect
from worker.client import approve, start_pipeline
from worker.codec_server import CodecServer, CodecServerSettings
from worker.config import CompressionSettings, EncryptionSettings, PayloadSettings
from worker.devserver import DevServer, free_port
from workflows.pipeline import PipelineStatus

REPO = Path(__file__).resolve().parents[1]
PROMPT = "CANARY-PROMPT-b71e0c"
VALUE = "CANARY-VALUE-3f9a22"
API_KEY = "sk-CANARY-KEY-90d4e1"
IN_ERROR = "CANARYERR81c2"
"""Reaches the history only in an error message: it is in no prompt or input, but in a header the worker's
config sends to one provider, which the simulator refuses and quotes in its error."""

pytestmark = pytest.mark.timeout(300)


def _spec(tmp: Path, name: str, body: dict[str, Any]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **body}), encoding="utf-8")
    return path


def _decoded_show(text: str) -> str:
    """``temporal workflow show --output json`` with every payload's base64 data decoded and appended."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "data" and isinstance(value, str):
                    found.append(base64.b64decode(value + "=" * (-len(value) % 4)).decode(errors="replace"))
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(text))
    return text + "\n".join(found)


async def _wait_for_approval(client: Any, workflow_id: str) -> None:
    handle = client.get_workflow_handle(workflow_id)
    for _ in range(1200):
        try:
            status = await handle.query("status", result_type=PipelineStatus)
        except Exception:
            status = None
        if status is not None and any(a.status == "waiting" for a in status.approvals):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the approval never started waiting")


async def test_no_canary_at_rest_and_all_through_the_codec(tmp_path: Path) -> None:
    state = tmp_path / "state"
    keys = tmp_path / "keys"  # outside the searched folder: it holds the keys, never data
    logs = tmp_path / "logs"
    logs.mkdir()
    temporal = shutil.which("temporal")
    kernelflow = shutil.which("kernelflow") or str(Path(sys.executable).parent / "kernelflow")
    assert temporal is not None

    with SimulatorServer() as sim:
        config = tmp_path / "kernelflow.yaml"
        providers = {
            "openai": {"base_url": f"{sim.url}/v1"},
            "mistral": {"base_url": f"{sim.url}/v1", "headers": {"x-sim-fault": f"fault={IN_ERROR}"}},
        }
        config.write_text(yaml.safe_dump({"providers": providers}), encoding="utf-8")
        queue = f"canary-{uuid.uuid4().hex[:8]}"
        async with DevServer(state_dir=state, port=free_port(), headless=True) as server:
            env = {
                **os.environ,
                "TEMPORAL_ADDRESS": server.target,
                "KERNELFLOW_TASK_QUEUE": queue,
                "KERNELFLOW_CONFIG": str(config),
                "KERNELFLOW_PAYLOADS_DIR": str(state / "payloads"),
                "KERNELFLOW_ENCRYPTION_KEYS_DIR": str(keys),
                "KERNELFLOW_LOG_FORMAT": "json",
                "KERNELFLOW_LOG_LEVEL": "debug",
                "OPENAI_API_KEY": API_KEY,
                "MISTRAL_API_KEY": "sim-key",
            }
            keys.mkdir()
            from worker.keys import format_ring, generate_key

            (keys / "default.keys").write_text(format_ring([generate_key()]))
            payloads = PayloadSettings(
                dir=state / "payloads",
                encryption=EncryptionSettings(enabled=True, provider="file", options={"dir": str(keys)}),
                compression=CompressionSettings(enabled=False),
            )
            client = await connect(server.target, payloads=payloads)
            worker_log = (logs / "worker.log").open("wb")
            worker = subprocess.Popen(  # noqa: ASYNC220
                [kernelflow, "worker"], env=env, stdout=worker_log, stderr=subprocess.STDOUT, cwd=tmp_path
            )
            try:
                ids = await _run_pipelines(tmp_path, client, env, kernelflow, queue, logs)
            finally:
                worker.send_signal(signal.SIGTERM)
                await asyncio.to_thread(worker.wait, 60)
                worker_log.close()

            shows = await _shows(temporal, server.target, ids, logs)
            with CodecServer(CodecServerSettings(token="t0k3n", payloads=payloads)) as codec:
                decoded = await _shows(
                    temporal,
                    server.target,
                    ids,
                    logs,
                    "--codec-endpoint",
                    codec.url,
                    "--codec-auth",
                    "Bearer t0k3n",
                )

    # Through the codec server every payload canary is readable: the search below is not vacuous.
    for canary in (PROMPT, VALUE, IN_ERROR):
        assert canary in decoded, f"{canary} not found even through the codec server"

    assert ids["stream"].encode() in (state / "temporal.db").read_bytes() + _wal(state), (
        "not the right database"
    )
    stored = [p for p in (state / "payloads").rglob("*") if p.is_file()]
    assert stored, "the long conversation did not go through the payload store"

    places: dict[str, bytes] = {"temporal workflow show (no codec)": shows.encode()}
    for path in sorted(p for p in state.rglob("*") if p.is_file()):
        places[str(path.relative_to(tmp_path))] = path.read_bytes()
    for path in sorted(logs.iterdir()):
        places[f"log {path.name}"] = path.read_bytes()
    assert any(name.startswith("state/payloads/") for name in places)
    assert "log worker.log" in places and "log cli.log" in places
    leaks = [
        f"{canary} in {name}"
        for name, content in places.items()
        for canary in (PROMPT, VALUE, API_KEY, IN_ERROR)
        if canary.encode() in content
    ]
    assert not leaks, "canaries readable at rest:\n" + "\n".join(leaks)


def _wal(state: Path) -> bytes:
    wal = state / "temporal.db-wal"
    return wal.read_bytes() if wal.exists() else b""


async def _run_pipelines(
    tmp: Path, client: Any, env: dict[str, str], kernelflow: str, queue: str, logs: Path
) -> dict[str, str]:
    ids: dict[str, str] = {}
    cli_log = (logs / "cli.log").open("ab")

    def cli(*args: str) -> str:
        done = subprocess.run([kernelflow, *args], env=env, capture_output=True, cwd=tmp, timeout=120)
        cli_log.write(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode().strip().splitlines()[-1]

    # Streaming, started from the CLI.
    stream = _spec(
        tmp,
        "canary-stream",
        {
            "inputs": {"ticket": {"type": "string"}},
            "steps": [
                {
                    "id": "answer",
                    "model": "openai/gpt-4o-mini",
                    "stream": True,
                    "prompt": f"{PROMPT} {{{{ inputs.ticket }}}}",
                }
            ],
            "outputs": {"answer": "{{ steps.answer.output }}"},
        },
    )
    ids["stream"] = cli(
        "run",
        str(stream),
        "--input",
        f"ticket={VALUE}",
        "--no-wait",
        "--id",
        f"canaryproof-{uuid.uuid4().hex[:6]}",
    )

    # A fallback: the primary model is in an outage (503), the step falls back; from the CLI too.
    triage = str(REPO / "examples" / "ticket-triage.yaml")
    ticket = f"{PROMPT} [[sim: fault=503 model=gpt-4.1]]"
    ids["fallback"] = cli(
        "run", triage, "--input", f"ticket={ticket}", "--input", f"customer={VALUE}", "--no-wait"
    )

    for name in ("stream", "fallback"):
        result = await client.get_workflow_handle(ids[name]).result()
        assert result["status"] == "completed", result
        assert PROMPT in json.dumps(result)
    fallback = await client.get_workflow_handle(ids["fallback"]).result()
    assert fallback["outputs"]["drafted_by"] == "openai/gpt-4o", "the fallback model did not answer"

    from kernel.pipeline import load_pipeline, parse_pipeline

    # A failure whose error message carries a canary found nowhere else.
    failing = parse_pipeline(
        {
            "name": "canary-failure",
            "inputs": {"ticket": {"type": "string"}},
            "steps": [
                {
                    "id": "answer",
                    "model": "mistral/mistral-small-latest",
                    "prompt": "{{ inputs.ticket }}",
                }
            ],
        }
    )
    handle = await start_pipeline(client, failing, {"ticket": VALUE}, task_queue=queue)
    ids["failure"] = handle.id
    with pytest.raises(WorkflowFailureError):
        await handle.result()

    # An approval, decided with a comment that quotes the input.
    gate = load_pipeline(REPO / "examples" / "approval-gate.yaml")
    handle = await start_pipeline(client, gate, {"customer": VALUE, "amount": 120}, task_queue=queue)
    ids["approval"] = handle.id
    await _wait_for_approval(client, handle.id)
    await approve(client, handle.id, "review", by="alice", comment=f"ok for {VALUE}")
    assert (await handle.result()).status == "completed"

    # A long conversation: kept in the payload store, not in the history.
    long_spec = parse_pipeline(
        {
            "name": "canary-long",
            "inputs": {"ticket": {"type": "string"}},
            "steps": [
                {"id": "answer", "model": "openai/gpt-4o-mini", "prompt": f"{PROMPT} {{{{ inputs.ticket }}}}"}
            ],
            "outputs": {"answer": "{{ steps.answer.output }}"},
        }
    )
    long_ticket = f"{VALUE} " + base64.b64encode(os.urandom(90_000)).decode()
    handle = await start_pipeline(client, long_spec, {"ticket": long_ticket}, task_queue=queue)
    ids["long"] = handle.id
    assert (await handle.result()).status == "completed"
    cli_log.close()
    return ids


async def _shows(temporal: str, target: str, ids: dict[str, str], logs: Path, *extra: str) -> str:
    outputs = []
    for workflow_id in ids.values():
        process = await asyncio.create_subprocess_exec(
            temporal, "workflow", "show", "--address", target, "-w", workflow_id, "--output", "json", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        outputs.append(_decoded_show(out.decode()))
    return "\n".join(outputs)


def test_demo_is_encrypted_at_rest_by_default(tmp_path: Path) -> None:
    kernelflow = shutil.which("kernelflow") or str(Path(sys.executable).parent / "kernelflow")
    state = tmp_path / "state"
    done = subprocess.run(
        [kernelflow, "demo", "--state-dir", str(state), "--port", str(free_port()), "--ui-port", str(free_port())],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "payloads encrypted at rest: yes" in done.stdout
    assert "charged twice" in done.stdout, "the demo's answer (which quotes the ticket) was not printed"
    assert (state / "keys" / "default.keys").is_file(), "no key generated under the state folder"
    database = (state / "temporal.db").read_bytes() + _wal(state)
    assert b"ticket-triage" in database, "not the demo's database"
    assert b"charged twice" not in database, "the demo's ticket is readable in the Temporal database"
