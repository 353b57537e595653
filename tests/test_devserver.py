"""The embedded dev server: a real `temporal server start-dev` on free loopback ports."""

from __future__ import annotations

import os
import socket
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
    RemoveSearchAttributesRequest,
)
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from worker.devserver import DevServer, DevServerError, PortInUseError, find_temporal_binary, free_port
from worker.search_attributes import SearchAttributeConflictError, ensure_search_attributes
from workflows import search_attributes as sa

pytestmark = pytest.mark.timeout(180)

PROBE_WORKFLOW = "KernelflowPersistenceProbe"


def free_ports(count: int) -> list[int]:
    """Distinct ports nothing listens on, outside the range the dev server picks its own from."""
    return [free_port() for _ in range(count)]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def custom_search_attributes(client: Client, namespace: str = "default") -> dict[str, int]:
    response = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    return dict(response.custom_attributes)


def make_dev_server(state_dir: Path, *, headless: bool = False) -> DevServer:
    port, ui_port = free_ports(2)
    return DevServer(state_dir=state_dir, port=port, ui_port=ui_port, headless=headless)


@pytest.fixture(scope="module")
def module_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("devserver-state")


@pytest.fixture(scope="module")
async def headless_server(module_state_dir: Path) -> AsyncIterator[DevServer]:
    async with make_dev_server(module_state_dir, headless=True) as server:
        yield server


async def test_dev_server_has_search_attributes_ui_and_stops_cleanly(tmp_path: Path) -> None:
    server = make_dev_server(tmp_path / ".state")
    async with server:
        assert server.target == f"127.0.0.1:{server.port}"
        assert server.ui_url == f"http://127.0.0.1:{server.ui_port}"
        client = await Client.connect(server.target)

        registered = await custom_search_attributes(client)
        for key in sa.ALL:
            assert registered.get(key.name) == key.indexed_value_type, key.name

        async with httpx.AsyncClient() as http:
            page = await http.get(server.ui_url)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")

        pid = server.pid
        assert pid is not None
        assert process_exists(pid)

    assert not server.running
    assert not process_exists(pid)
    assert port_is_free(server.port)
    assert port_is_free(server.ui_port)
    assert (tmp_path / ".state" / "temporal.db").is_file()
    assert (tmp_path / ".state" / "temporal.log").is_file()


async def test_headless_server_has_no_ui(headless_server: DevServer) -> None:
    assert headless_server.ui_url is None
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", headless_server.ui_port), timeout=5):
        pass


async def test_taken_port_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = DevServer(state_dir=tmp_path, port=taken, ui_port=free_ports(1)[0])
        with pytest.raises(PortInUseError) as caught:
            await server.start()

    message = str(caught.value)
    assert str(taken) in message
    assert "`port`" in message
    assert server.pid is None, "no server process may be started when its port is taken"


async def test_taken_ui_port_names_the_ui_setting(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = DevServer(state_dir=tmp_path, port=free_ports(1)[0], ui_port=taken)
        with pytest.raises(PortInUseError, match="ui_port") as caught:
            await server.start()
    assert caught.value.port == taken


async def test_server_that_dies_while_starting_reports_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "temporal"
    broken.write_text("#!/bin/sh\necho 'unable to open database file' >&2\nexit 3\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    port, ui_port = free_ports(2)
    server = DevServer(state_dir=tmp_path / "state", port=port, ui_port=ui_port, temporal_binary=str(broken))

    with pytest.raises(DevServerError) as caught:
        await server.start()

    message = str(caught.value)
    assert "code 3" in message
    assert "unable to open database file" in message
    assert str(server.log_path) in message
    assert not server.running


async def test_workflows_survive_a_restart(tmp_path: Path) -> None:
    state_dir = tmp_path / ".state"
    workflow_id = f"probe-{uuid.uuid4()}"

    async with make_dev_server(state_dir, headless=True) as first:
        client = await Client.connect(first.target)
        # No worker polls this queue: the workflow simply stays open, which is all a restart must keep.
        await client.start_workflow(PROBE_WORKFLOW, id=workflow_id, task_queue=f"tq-{uuid.uuid4()}")

    async with make_dev_server(state_dir, headless=True) as second:
        client = await Client.connect(second.target)
        description = await client.get_workflow_handle(workflow_id).describe()

    assert description.workflow_type == PROBE_WORKFLOW
    assert description.status == WorkflowExecutionStatus.RUNNING


async def test_restart_registers_search_attributes_missing_from_an_older_state_dir(tmp_path: Path) -> None:
    # `start-dev --search-attribute` only applies to a fresh database; a state dir made before an
    # attribute existed must still get it.
    state_dir = tmp_path / ".state"
    async with make_dev_server(state_dir, headless=True) as first:
        client = await Client.connect(first.target)
        await client.operator_service.remove_search_attributes(
            RemoveSearchAttributesRequest(namespace="default", search_attributes=[sa.TENANT.name])
        )
        assert sa.TENANT.name not in await custom_search_attributes(client)

    async with make_dev_server(state_dir, headless=True) as second:
        client = await Client.connect(second.target)
        assert sa.TENANT.name in await custom_search_attributes(client)


async def test_ensure_search_attributes_adds_only_missing_ones(headless_server: DevServer) -> None:
    client = await Client.connect(headless_server.target)
    await client.operator_service.remove_search_attributes(
        RemoveSearchAttributesRequest(namespace="default", search_attributes=[sa.PROVIDER.name])
    )

    assert await ensure_search_attributes(client, "default") == [sa.PROVIDER.name]
    assert await ensure_search_attributes(client, "default") == []

    # Usable right away: a workflow can be started carrying every typed attribute.
    handle = await client.start_workflow(
        PROBE_WORKFLOW,
        id=f"sa-{uuid.uuid4()}",
        task_queue=f"tq-{uuid.uuid4()}",
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(sa.PIPELINE, "summarize"),
                SearchAttributePair(sa.STATUS, "running"),
                SearchAttributePair(sa.PROVIDER, ["openai", "anthropic"]),
                SearchAttributePair(sa.TENANT, "acme"),
            ]
        ),
    )
    described = await handle.describe()
    assert described.typed_search_attributes[sa.PROVIDER] == ["openai", "anthropic"]
    assert described.typed_search_attributes[sa.TENANT] == "acme"


async def test_ensure_search_attributes_refuses_a_name_with_another_type(headless_server: DevServer) -> None:
    client = await Client.connect(headless_server.target)
    await client.operator_service.remove_search_attributes(
        RemoveSearchAttributesRequest(namespace="default", search_attributes=[sa.TENANT.name])
    )
    await client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace="default",
            search_attributes={sa.TENANT.name: IndexedValueType.INDEXED_VALUE_TYPE_TEXT},
        )
    )
    try:
        with pytest.raises(SearchAttributeConflictError) as caught:
            await ensure_search_attributes(client, "default")
        assert sa.TENANT.name in str(caught.value)
        assert "TEXT" in str(caught.value) and "KEYWORD" in str(caught.value)
    finally:
        await client.operator_service.remove_search_attributes(
            RemoveSearchAttributesRequest(namespace="default", search_attributes=[sa.TENANT.name])
        )
        await ensure_search_attributes(client, "default")


def test_temporal_binary_is_found() -> None:
    assert Path(find_temporal_binary()).name.startswith("temporal")


def test_command_registers_every_search_attribute_and_persists_state(tmp_path: Path) -> None:
    server = DevServer(state_dir=tmp_path, port=7300, ui_port=8300)
    command = server.command()
    assert command[1:3] == ["server", "start-dev"]
    assert command[command.index("--db-filename") + 1] == str(tmp_path / "temporal.db")
    assert command[command.index("--ip") + 1] == "127.0.0.1"
    registered = [command[i + 1] for i, arg in enumerate(command) if arg == "--search-attribute"]
    assert registered == [
        "KernelflowPipeline=Keyword",
        "KernelflowStatus=Keyword",
        "KernelflowProvider=KeywordList",
        "KernelflowTenant=Keyword",
        "KernelflowAwaiting=KeywordList",
        "KernelflowModels=KeywordList",
    ]
    assert "--headless" not in command
    assert "--headless" in DevServer(state_dir=tmp_path, headless=True).command()
