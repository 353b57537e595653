"""The shadow store on PostgreSQL: Debian's postgresql server, started by the test in a temporary
directory (initdb and pg_ctl, as the ``postgres`` user when the tests run as root), reached over TCP
on 127.0.0.1. The same behaviour as SQLite: stored once, filtered, oldest first, sealed bodies; and a
real worker writes its pairs there."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.client import Client

from kernel.errors import ConfigurationError
from kernel.registry import Registry
from kernel.shadow import ShadowPair, ShadowSide, request_digest
from kernel.shadow_rules import ShadowConfig
from simulator.server import SimulatorServer
from worker.app import build_worker
from worker.client import start_pipeline
from worker.codec import KernelflowCodec
from worker.devserver import free_port
from worker.keys import FileKeyProvider, format_ring, generate_key
from worker.shadow_sealer import CodecSealer
from worker.shadow_store import PostgresShadowStore, open_store

_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own; yields its URL. Its directory is outside pytest's (which only
    root may enter), owned by the server's user."""
    if not _BIN:
        pytest.skip("Debian's postgresql is not installed (make postgres installs it as root)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: PostgreSQL refuses to run as root")
    binaries = Path(_BIN[-1])
    root = Path(tempfile.mkdtemp(prefix="kernelflow-postgres-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    subprocess.run(
        _as_server_user(
            [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
        ),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_server_user(
            [str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            _as_server_user([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database(postgres: str) -> Iterator[str]:
    """A fresh database on the server for one test."""
    import psycopg

    name = f"shadow_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield postgres.rsplit("/", 1)[0] + f"/{name}"


def _pair(n: int, *, step: str = "triage", candidate: str = "anthropic/claude-sonnet-4-5") -> ShadowPair:
    request = {"messages": [{"role": "user", "content": f"ticket {n} secret-prompt"}]}
    return ShadowPair(
        id=f"wf-{n}/run/{step}",
        source="shadow" if n % 2 else "compare",
        recorded_at=datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=n),
        pipeline="support",
        step_id=step,
        workflow_id=f"wf-{n}",
        tenant="acme",
        request_digest=request_digest(request),
        request=request,
        primary=ShadowSide(model="openai/gpt-4o-mini", output="refund", cost_usd=0.001, latency_ms=80),
        candidate=ShadowSide(model=candidate, error_type="RateLimited", error="429"),
    )


def test_pairs_are_stored_once_filtered_and_read_oldest_first(database: str) -> None:
    store = open_store(database)
    assert isinstance(store, PostgresShadowStore)
    assert (
        store.add([_pair(3), _pair(1), _pair(2, step="draft"), _pair(4, candidate="gemini/gemini-2.5-pro")])
        == 4
    )
    assert store.add([_pair(1), _pair(5)]) == 1  # pair 1 was stored already
    assert [p.id for p in store.pairs()] == [
        f"wf-{n}/run/{s}"
        for n, s in [(1, "triage"), (2, "draft"), (3, "triage"), (4, "triage"), (5, "triage")]
    ]
    assert [p.workflow_id for p in store.pairs(step_id="draft")] == ["wf-2"]
    assert [p.workflow_id for p in store.pairs(candidate="gemini/gemini-2.5-pro")] == ["wf-4"]
    assert [p.workflow_id for p in store.pairs(source="compare")] == ["wf-2", "wf-4"]
    since = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=4)
    assert [p.workflow_id for p in store.pairs(since=since, limit=1)] == ["wf-4"]
    assert store.pairs(pipeline="other") == []
    again = open_store(database)  # the schema is created once; a second worker shares the table
    assert len(again.pairs()) == 5 and again.pairs()[0] == store.pairs()[0]
    store.close()
    again.close()


def test_sealed_pairs_hold_no_prompt_in_the_clear(database: str, tmp_path: Path) -> None:
    import psycopg

    keys = FileKeyProvider(dir=tmp_path / "keys")
    keys.ring_path().parent.mkdir(parents=True)
    keys.ring_path().write_text(format_ring([generate_key("pg-k1")]))
    store = open_store(database, sealer=CodecSealer(KernelflowCodec(provider=keys)))
    store.add([_pair(1)])
    with psycopg.connect(database) as db:
        (body,) = db.execute("SELECT body FROM shadow_pairs").fetchone() or (b"",)
    assert b"secret-prompt" not in bytes(body) and b"pg-k1" in bytes(body)
    assert "secret-prompt" in str(store.pairs()[0].request)
    with pytest.raises(ConfigurationError, match="holds encrypted pairs"):
        open_store(database).pairs()


def test_a_wrong_address_names_the_store_without_its_password() -> None:
    with pytest.raises(ConfigurationError, match=r"postgresql://kf:\*\*\*@127.0.0.1:1/x") as caught:
        open_store("postgresql://kf:hunter2@127.0.0.1:1/x")
    assert "hunter2" not in str(caught.value)


async def test_a_worker_writes_its_pairs_to_postgresql(
    client: Client, registry: Registry, sim: SimulatorServer, database: str
) -> None:
    from kernel.pipeline import parse_pipeline

    spec = parse_pipeline(
        {
            "name": "pg-shadowed",
            "inputs": {"ticket": {"type": "string"}},
            "steps": [
                {
                    "id": "answer",
                    "model": "openai/gpt-4o-mini",
                    "prompt": "Answer: {{ inputs.ticket }}",
                    "shadow": {"model": "anthropic/claude-sonnet-4-5"},
                }
            ],
            "outputs": {"answer": "{{ steps.answer.output }}"},
        }
    )
    queue = f"shadow-pg-{uuid.uuid4().hex[:8]}"
    async with build_worker(
        client, task_queue=queue, registry=registry, shadow=ShadowConfig(store=database, close_wait_s=60)
    ):
        handle = await start_pipeline(client, spec, {"ticket": "where is my parcel"}, task_queue=queue)
        result = await handle.result()
    (pair,) = open_store(database).pairs(pipeline="pg-shadowed")
    assert pair.primary.output == result.outputs["answer"]
    assert pair.candidate.model == "anthropic/claude-sonnet-4-5" and pair.candidate.ok
    assert pair.workflow_id == handle.id
