"""The codec server over real HTTP: who it refuses, CORS, decoding histories (payload-store references
included), and the ``temporal`` CLI reading a history through ``--codec-endpoint``."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads
from temporalio.client import Client

from kernel.errors import ConfigurationError
from kernel.pipeline import parse_pipeline
from kernel.registry import Registry
from worker.app import build_worker
from worker.codec_server import CodecServer, CodecServerSettings
from worker.config import CompressionSettings, EncryptionSettings, PayloadSettings
from worker.keys import format_ring, generate_key
from worker.storage import build_data_converter

CANARY = "CANARY-codec-5be2"
TOKEN = "s3cret-codec-token"
UI = "http://ui.example:8080"


@dataclass
class Run:
    client: Client
    workflow_id: str
    settings: PayloadSettings
    input_payloads: list[dict[str, Any]]
    """The workflow input as the history holds it (protobuf JSON)."""


@pytest.fixture
async def run(client: Client, registry: Registry, tmp_path: Path) -> AsyncIterator[Run]:
    from worker.client import start_pipeline

    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "default.keys").write_text(format_ring([generate_key("k1")]))
    settings = PayloadSettings(
        dir=tmp_path / "payloads",
        encryption=EncryptionSettings(enabled=True, provider="file", options={"dir": str(keys)}),
        compression=CompressionSettings(enabled=True),
    )
    enc = Client(**{**client.config(), "data_converter": build_data_converter(settings)})
    spec = parse_pipeline(
        {
            "name": "codec",
            "inputs": {"ticket": {"type": "string"}},
            "steps": [{"id": "answer", "model": "openai/gpt-4o-mini", "prompt": "{{ inputs.ticket }}"}],
        }
    )
    # Random text: over the 64 KiB threshold even compressed, so the input lives in the payload store.
    ticket = f"{CANARY} " + base64.b64encode(os.urandom(80_000)).decode()
    queue = f"codec-{uuid.uuid4().hex[:10]}"
    async with build_worker(enc, task_queue=queue, registry=registry):
        handle = await start_pipeline(enc, spec, {"ticket": ticket}, task_queue=queue)
        await handle.result()
    history = await handle.fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    payloads = json.loads(json_format.MessageToJson(started.input))["payloads"]
    yield Run(enc, handle.id, settings, payloads)


@pytest.fixture
def server(run: Run) -> Iterator[CodecServer]:
    settings = CodecServerSettings(
        namespaces=["default"], ui_origins=[UI], token=TOKEN, payloads=run.settings
    )
    with CodecServer(settings) as started:
        yield started


def _post(server: CodecServer, path: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", content=json.dumps(body), headers=headers, timeout=10)


def _plain(response: httpx.Response) -> str:
    """The response with every payload's data decoded from base64 (what a reader would see)."""
    try:
        payloads = response.json().get("payloads", [])
    except ValueError:
        return response.text
    return response.text + "".join(
        base64.b64decode(p.get("data", "")).decode(errors="replace") for p in payloads
    )


def _ok_headers(**extra: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {TOKEN}",
        "X-Namespace": "default",
        "Content-Type": "application/json",
        **extra,
    }


def test_decode_returns_the_plaintext_and_resolves_the_payload_store(server: CodecServer, run: Run) -> None:
    assert CANARY not in json.dumps(run.input_payloads)
    response = _post(server, "/decode", {"payloads": run.input_payloads}, **_ok_headers(Origin=UI))
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == UI
    assert response.headers["x-kernelflow-undecoded"] == "0"
    decoded = json_format.Parse(response.text, Payloads())
    assert CANARY in decoded.payloads[0].data.decode()


def test_encode_then_decode(server: CodecServer) -> None:
    plain = {
        "payloads": [
            {
                "metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                "data": base64.b64encode(b'"hi"').decode(),
            }
        ]
    }
    encoded = _post(server, "/encode", plain, **_ok_headers())
    assert encoded.status_code == 200, encoded.text
    metadata = encoded.json()["payloads"][0]["metadata"]
    assert base64.b64decode(metadata["encoding"]) == b"binary/encrypted"
    decoded = _post(server, "/decode", encoded.json(), **_ok_headers())
    assert decoded.json() == plain


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        ({"X-Namespace": "default"}, 401, "authentication required"),
        ({"X-Namespace": "default", "Authorization": "Bearer wrong"}, 401, "not accepted"),
        ({"X-Namespace": "default", "Authorization": f"Basic {TOKEN}"}, 401, "authentication required"),
        ({"Authorization": f"Bearer {TOKEN}"}, 400, "X-Namespace"),
        ({"X-Namespace": "payments", "Authorization": f"Bearer {TOKEN}"}, 403, "namespace 'payments'"),
        (
            {"X-Namespace": "default", "Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"},
            403,
            "origin",
        ),
    ],
    ids=["no-token", "wrong-token", "not-bearer", "no-namespace", "other-namespace", "other-origin"],
)
def test_refusals(server: CodecServer, run: Run, headers: dict[str, str], status: int, reason: str) -> None:
    for path in ("/decode", "/encode"):
        response = _post(server, path, {"payloads": run.input_payloads}, **headers)
        assert response.status_code == status, response.text
        assert reason in response.json()["error"]
        assert CANARY not in _plain(response)
        if headers.get("Origin") != UI:
            assert "access-control-allow-origin" not in response.headers


def test_bad_body_is_refused(server: CodecServer) -> None:
    response = httpx.post(f"{server.url}/decode", content=b"not json", headers=_ok_headers(), timeout=10)
    assert response.status_code == 400 and "protobuf JSON" in response.json()["error"]
    huge = httpx.post(
        f"{server.url}/decode", content=b" " * (65 * 1024 * 1024), headers=_ok_headers(), timeout=60
    )
    assert huge.status_code == 413


def test_cors_preflight_answers_only_the_ui_origin(server: CodecServer) -> None:
    asked = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-namespace,authorization",
    }
    ok = httpx.options(f"{server.url}/decode", headers={"Origin": UI, **asked}, timeout=10)
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == UI
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    evil = httpx.options(
        f"{server.url}/decode", headers={"Origin": "http://evil.example", **asked}, timeout=10
    )
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers


async def _accept_alice(token: str, namespace: str) -> bool:
    return token == "alice-access-token" and namespace == "default"


def test_a_verifier_checks_forwarded_access_tokens(run: Run) -> None:
    settings = CodecServerSettings(ui_origins=[UI], verifier=_accept_alice, payloads=run.settings)
    with CodecServer(settings) as server:
        body = {"payloads": run.input_payloads}
        alice = _post(
            server,
            "/decode",
            body,
            **{"X-Namespace": "default", "Authorization": "Bearer alice-access-token"},
        )
        assert alice.status_code == 200 and CANARY in _plain(alice)
        bob = _post(
            server, "/decode", body, **{"X-Namespace": "default", "Authorization": "Bearer bob-token"}
        )
        assert bob.status_code == 401 and CANARY not in _plain(bob)


def test_without_auth_only_loopback(run: Run) -> None:
    settings = CodecServerSettings(ui_origins=[UI], authenticate=False, payloads=run.settings)
    with pytest.raises(ConfigurationError, match="loopback only"):
        CodecServer(settings, host="0.0.0.0")
    with pytest.raises(ConfigurationError, match="needs a shared token"):
        CodecServer(CodecServerSettings(payloads=run.settings))
    with CodecServer(settings) as server:
        body = {"payloads": run.input_payloads}
        local = _post(server, "/decode", body, **{"X-Namespace": "default"})
        assert local.status_code == 200 and CANARY in _plain(local)
        rebound = _post(server, "/decode", body, **{"X-Namespace": "default", "Host": "evil.example"})
        assert rebound.status_code == 403 and "not loopback" in rebound.text
        page = _post(server, "/decode", body, **{"X-Namespace": "default", "Origin": "http://evil.example"})
        assert page.status_code == 403 and CANARY not in _plain(page)


async def test_temporal_cli_reads_a_history_through_the_codec_endpoint(
    server: CodecServer, run: Run, temporal_target: str
) -> None:
    temporal = shutil.which("temporal")
    assert temporal is not None
    base = [
        temporal,
        "workflow",
        "show",
        "--address",
        temporal_target,
        "-w",
        run.workflow_id,
        "--output",
        "json",
    ]

    async def show(*extra: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *base, *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        return _with_payload_data(out.decode())

    assert CANARY not in await show()
    decoded = await show("--codec-endpoint", server.url, "--codec-auth", f"Bearer {TOKEN}")
    assert CANARY in decoded
    refused = await asyncio.create_subprocess_exec(
        *base, "--codec-endpoint", server.url, "--codec-auth", "Bearer wrong",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await refused.communicate()
    assert CANARY not in _with_payload_data(out.decode() or "{}")


def _with_payload_data(text: str) -> str:
    """JSON output with the base64 ``data`` of every payload decoded and appended."""
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
    assert found or text == "{}", "no payload data in the output: the check would prove nothing"
    return text + "\n".join(found)
