"""The Events page over a real NATS JetStream server: dead letters with their reasons, replayed by an
operator to their original subject, and recent inbound events."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from brokers.nats import NatsBroker
from kernel.triggers import EventsConfig
from worker.console import ConsoleSettings, create_app
from worker.console.auth import User, Users, hash_password
from worker.console.broker_events import BrokerEvents
from worker.console.serve import ConsoleServer
from worker.devserver import free_port


@pytest.fixture
async def broker(nats_server: str) -> AsyncIterator[NatsBroker]:
    async with NatsBroker(nats_server) as connected:
        yield connected


async def test_dead_letters_are_listed_with_why_and_replayed_by_an_operator(
    broker: NatsBroker, client: Client
) -> None:
    suffix = os.urandom(3).hex()
    inbound = f"shop{suffix}"
    config = EventsConfig.model_validate(
        {
            "subjects": [f"{inbound}.>"],
            "dead_letter_subject": f"dlq{suffix}",
            "dead_letter_stream": f"DLQ{suffix}",
        }
    )
    await broker.ensure_stream(f"IN{suffix}", [f"{inbound}.>"])
    await broker.ensure_stream(f"DLQ{suffix}", [f"dlq{suffix}.>"])
    event = {"specversion": "1.0", "id": "order-1", "source": "shop", "type": "order.paid", "data": {"n": 1}}
    body = json.dumps(event).encode()
    await broker.publish(
        f"dlq{suffix}.{inbound}.orders.paid", body,
        headers={"Kernelflow-Dead-Letter-Reason": "no trigger matches", "Kernelflow-Dead-Letter-Subject": f"{inbound}.orders.paid",
                 "Kernelflow-Dead-Letter-Attempts": "1", "Kernelflow-Dead-Letter-Time": "1700000000"},
    )  # fmt: skip
    reader = BrokerEvents(broker, config)
    letters = await reader.dead_letters()
    assert [(d.subject, d.reason, d.attempts) for d in letters] == [
        (f"{inbound}.orders.paid", "no trigger matches", 1)
    ]

    users = Users(users=[User(name="otto", roles=["operator"], password_hash=hash_password("pw"))])
    settings = ConsoleSettings(users=users, secret=os.urandom(32), events=reader)
    async with (
        ConsoleServer(create_app(client, settings), port=free_port()) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        token: Any = re.search(r'name="csrf" value="([^"]+)"', (await http.get("/login")).text)
        await http.post("/login", data={"csrf": token.group(1), "username": "otto", "password": "pw"})
        page = (await http.get("/events")).text
        assert "no trigger matches" in page and letters[0].id in page
        csrf: Any = re.search(r'name="csrf" value="([^"]+)"', page)
        done = await http.post(
            "/events/replay", data={"csrf": csrf.group(1), "id": letters[0].id}, follow_redirects=True
        )
        assert f"replayed dead letter {letters[0].id} to {inbound}.orders.paid" in done.text
        unknown = await http.post(
            "/events/replay", data={"csrf": csrf.group(1), "id": "nope"}, follow_redirects=True
        )
        assert "not replayed: no dead letter" in unknown.text
        # The replayed event is back on its subject with its bytes, and says who replayed it.
        again = await reader._read(f"{inbound}.>", 10)
        assert [(s, b) for s, b, _ in again] == [(f"{inbound}.orders.paid", body)]
        assert again[0][2]["Kernelflow-Replayed-By"] == "otto"
        assert not any(k.startswith("Kernelflow-Dead-Letter-") for k in again[0][2])
        recent = (await http.get("/events")).text
        assert "order.paid" in recent


async def test_dead_letter_commands_list_and_replay(
    broker: NatsBroker, nats_server: str, tmp_path: Any
) -> None:
    suffix = os.urandom(3).hex()
    await broker.ensure_stream(f"DLQ{suffix}", [f"dlq{suffix}.>"])
    await broker.ensure_stream(f"IN{suffix}", [f"in{suffix}.>"])
    await broker.publish(
        f"dlq{suffix}.in{suffix}.x", b'{"specversion": "1.0", "id": "e1", "source": "s", "type": "t"}',
        headers={"Kernelflow-Dead-Letter-Reason": "the filter failed", "Kernelflow-Dead-Letter-Subject": f"in{suffix}.x",
                 "Kernelflow-Dead-Letter-Attempts": "3", "Kernelflow-Dead-Letter-Time": "1700000000"},
    )  # fmt: skip
    config = tmp_path / "kernelflow.yaml"
    config.write_text(f"events:\n  dead_letter_subject: dlq{suffix}\n  dead_letter_stream: DLQ{suffix}\n")
    env = {**os.environ, "KERNELFLOW_CONFIG": str(config), "KERNELFLOW_BROKER_URL": nats_server}

    def kf(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kernelflow", "events", "dlq", *args], capture_output=True, text=True, env=env, timeout=60
        )

    listed = await asyncio.to_thread(kf, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert [(d["subject"], d["reason"], d["attempts"]) for d in letters] == [
        (f"in{suffix}.x", "the filter failed", 3)
    ]
    table = await asyncio.to_thread(kf, "ls")
    assert table.stdout.startswith("ID") and "the filter failed" in table.stdout
    replayed = await asyncio.to_thread(kf, "replay", letters[0]["id"], "--by", "ops")
    assert replayed.returncode == 0 and f"to in{suffix}.x" in replayed.stdout
    missing = await asyncio.to_thread(kf, "replay", "nope")
    assert missing.returncode == 4 and "no dead letter" in missing.stderr
    back = await BrokerEvents(broker, EventsConfig())._read(f"in{suffix}.>", 10)
    assert len(back) == 1 and back[0][2]["Kernelflow-Replayed-By"] == "ops"
