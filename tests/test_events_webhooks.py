"""Webhook ingress (Standard Webhooks signatures, checked with the reference library) in front of the
bridge, on real NATS and Temporal."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook
from temporalio.client import Client
from test_events_bridge import broker, run_bridge, triggers, worker_queue  # noqa: F401

from kernel.cloudevents import CloudEvent, encode_binary, encode_structured
from kernel.triggers import EventsConfig
from kernel.webhooks import SignatureInvalid, signature_headers, verify
from worker.devserver import free_port
from worker.webhook_ingress import WebhookIngress

SECRET = "whsec_" + base64.b64encode(b"kernelflow-test-secret-0123456789").decode()


def reference_headers(body: bytes, *, when: datetime | None = None) -> dict[str, str]:
    """Headers signed by the Standard Webhooks reference implementation."""
    msg_id = "msg_" + uuid.uuid4().hex
    when = when or datetime.now(tz=UTC)
    signature = Webhook(SECRET).sign(msg_id, when, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signature,
    }


def test_signatures_agree_with_the_reference_implementation() -> None:
    body = b'{"hello": "world"}'
    verify(SECRET, reference_headers(body), body)
    ours = signature_headers(SECRET, "msg_1", body)
    assert Webhook(SECRET).verify(body, ours) == {"hello": "world"}
    with pytest.raises(SignatureInvalid, match="no webhook-signature matches"):
        verify(SECRET, reference_headers(body), body + b" ")
    stale = reference_headers(body, when=datetime.fromtimestamp(time.time() - 3600, tz=UTC))
    with pytest.raises(SignatureInvalid, match="more than 300s"):
        verify(SECRET, stale, body)


async def test_ingress_starts_pipelines_and_refuses_bad_signatures(
    client: Client,
    broker: Any,  # noqa: F811  (fixtures shared with test_events_bridge)
    worker_queue: str,  # noqa: F811
    run_bridge: Any,  # noqa: F811
) -> None:
    p = "w1" + uuid.uuid4().hex[:6]
    port = free_port()
    config: EventsConfig = triggers(p).model_copy(
        update={"ingress": EventsConfig.model_validate({"ingress": {"listen": f"127.0.0.1:{port}"}}).ingress}
    )
    running = await run_bridge(config, worker_queue)
    ingress = WebhookIngress(broker, config, environ={"KERNELFLOW_WEBHOOK_SECRET": SECRET})
    await ingress.start()
    try:
        async with httpx.AsyncClient(base_url=ingress.url) as http:
            ce = CloudEvent(
                id="w-1", source="/shop", type="com.shop.order.paid", data={"order_id": "5", "amount": 9}
            )
            body, headers = encode_structured(ce)

            forged = {
                **reference_headers(body),
                "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode(),
            }
            answer = await http.post(f"/events/{p}.orders.paid", content=body, headers={**headers, **forged})
            assert answer.status_code == 401
            stale = reference_headers(body, when=datetime.fromtimestamp(time.time() - 3600, tz=UTC))
            answer = await http.post(f"/events/{p}.orders.paid", content=body, headers={**headers, **stale})
            assert answer.status_code == 401
            assert "300s" in answer.json()["error"]

            answer = await http.post(
                f"/events/{p}.orders.paid", content=b"{}", headers={**headers, **reference_headers(b"{}")}
            )
            assert answer.status_code == 400 and "specversion" in answer.json()["error"]
            answer = await http.post(
                "/events/elsewhere.x", content=body, headers={**headers, **reference_headers(body)}
            )
            assert answer.status_code == 404

            answer = await http.post(
                f"/events/{p}.orders.paid", content=body, headers={**headers, **reference_headers(body)}
            )
            assert answer.status_code == 202, answer.text
            assert answer.json()["duplicate"] is False
            again = await http.post(
                f"/events/{p}.orders.paid", content=body, headers={**headers, **reference_headers(body)}
            )
            assert again.json()["duplicate"] is True  # a sender's retry is stored once

            shipped = CloudEvent(
                id="w-2",
                source="/shop",
                type="com.shop.order.shipped",
                data={"order_id": "5", "carrier": "GLS"},
            )
            body, headers = encode_binary(shipped)
            answer = await http.post(
                f"/events/{p}.orders.shipped", content=body, headers={**headers, **reference_headers(body)}
            )
            assert answer.status_code == 202, answer.text
            stats = (await http.get("/stats")).json()
        await running.until(lambda: running.bridge.stats["signalled"] == 1)
        result = await asyncio.wait_for(client.get_workflow_handle(f"{p}-order-5").result(), timeout=60)
        assert result["outputs"]["carrier"] == "GLS"
        assert running.bridge.stats["started"] == 1
        assert stats == {"accepted": 2, "duplicate": 1, "unauthorized": 2, "invalid": 1}
        assert json.loads(body) == {"order_id": "5", "carrier": "GLS"}
    finally:
        await ingress.stop()
