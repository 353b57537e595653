"""The ``agent`` step on real parts: a real MCP server (the ``mcp`` SDK's server API, over streamable HTTP
and stdio, in its own process), the simulator answering from scripts of turns, the Temporal dev server."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError

from activities.mcp import McpServerConfig
from kernel.pipeline import parse_pipeline
from kernel.registry import Registry
from worker.app import build_worker
from worker.client import approve, reject, start_pipeline
from worker.devserver import free_port
from workflows.pipeline import PipelineStatus

MODEL = "openai/gpt-4o-mini"
ROOT = Path(__file__).resolve().parent.parent


def script(*turns: dict[str, Any]) -> str:
    """A simulator directive answering turn n of the loop with ``turns[n]``."""
    return f"[[sim: script='{json.dumps(list(turns))}']]"


def calls(*pairs: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"calls": [{"name": name, "arguments": arguments} for name, arguments in pairs]}


class McpServer:
    """The example order-desk MCP server in a process of its own, logging each call to a file."""

    def __init__(self, tmp: Path) -> None:
        self.log = tmp / f"mcp-{uuid.uuid4().hex[:6]}.jsonl"
        self.log.touch()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "examples.orders_mcp", "--http", str(self.port)],
            cwd=ROOT,
            env={"ORDERS_MCP_LOG": str(self.log), "PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the MCP server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [c for c in lines if tool is None or c["tool"] == tool]

    def servers(self) -> dict[str, McpServerConfig]:
        stdio = McpServerConfig(
            command=sys.executable,
            args=["-m", "examples.orders_mcp"],
            cwd=str(ROOT),
            env={"ORDERS_MCP_LOG": str(self.log)},
        )
        return {"orders": McpServerConfig(url=self.url, timeout_s=10), "orders-stdio": stdio}


@pytest.fixture
def mcp_server(tmp_path: Path) -> Iterator[McpServer]:
    server = McpServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def queue(client: Client, registry: Registry, mcp_server: McpServer) -> AsyncIterator[str]:
    name = f"agent-{uuid.uuid4().hex[:10]}"
    async with build_worker(client, task_queue=name, registry=registry, mcp_servers=mcp_server.servers()):
        yield name


def agent_spec(prompt: str, tools: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    step = {
        "id": "desk",
        "type": "agent",
        "model": MODEL,
        "instructions": "You help customers.",
        "prompt": prompt,
    }
    step["tools"] = tools
    step.update(extra)
    outputs = {"answer": "{{ steps.desk.output }}", "messages": "{{ steps.desk.messages | tojson }}"}
    return {"name": "agent-test", "steps": [step], "outputs": outputs}


async def start(client: Client, spec: dict[str, Any], queue: str) -> WorkflowHandle[Any, Any]:
    return await start_pipeline(client, parse_pipeline(spec), {}, task_queue=queue)


async def until(handle: WorkflowHandle[Any, Any], check: Any, within: float = 30.0) -> PipelineStatus:
    deadline = time.monotonic() + within
    while True:
        status: PipelineStatus = await handle.query("status", result_type=PipelineStatus)
        if check(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met; status: {status.model_dump_json()[:2000]}")
        await asyncio.sleep(0.1)


def tool_answers(result: Any) -> list[str]:
    return [m["content"] for m in json.loads(result.outputs["messages"]) if m["role"] == "tool"]


async def test_three_turns_with_parallel_calls_over_http_and_stdio(
    client: Client, queue: str, mcp_server: McpServer
) -> None:
    turns = script(
        calls(("lookup_order", {"order_id": "A100"}), ("shipping_status", {"order_id": "B200"})),
        calls(
            ("lookup_order", {"order_id": "B200"}),
            ("status", {"order_id": "B200"}),
            ("lookup_order", {"id": 7}),
        ),
        {"text": "Both orders checked."},
    )
    spec = agent_spec(
        f"Check my orders {turns}",
        [
            {"type": "mcp", "server": "orders", "tools": ["lookup_order"]},
            {"type": "mcp", "server": "orders-stdio", "tools": ["shipping_status"]},
        ],
    )
    handle = await start(client, spec, queue)
    result = await handle.result()
    assert result.outputs["answer"] == "Both orders checked."
    desk = next(s for s in result.steps if s.id == "desk")
    assert desk.status == "completed" and desk.usage.total_tokens > 0
    history = [e async for e in handle.fetch_history_events()]
    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert scheduled.count("llm_chat") == 3
    assert scheduled.count("mcp_list_tools") == 2
    assert scheduled.count("mcp_call_tool") == 3
    # the unknown tool and the invalid arguments never reached the server: the model was told why
    assert [c["arguments"]["order_id"] for c in mcp_server.calls("lookup_order")] == ["A100", "B200"]
    assert len(mcp_server.calls("shipping_status")) == 1  # over stdio, logged by the process it started
    answers = tool_answers(result)
    assert len(answers) == 5
    assert "A100" in answers[0] and "lost in transit" in answers[1] and "B200" in answers[2]
    assert "there is no tool 'status'" in answers[3] and "lookup_order, shipping_status" in answers[3]
    assert "invalid arguments" in answers[4] and "order_id" in answers[4]


async def test_parallel_calls_run_at_once_and_answers_keep_call_order(
    client: Client, queue: str, mcp_server: McpServer
) -> None:
    gate = mcp_server.log.parent / f"gate-{uuid.uuid4().hex[:6]}"
    turns = script(
        calls(
            ("hold", {"gate": str(gate)}),
            ("lookup_order", {"order_id": "A100"}),
            ("shipping_status", {"order_id": "B200"}),
        ),
        {"text": "done"},
    )
    spec = agent_spec(f"go {turns}", [{"type": "mcp", "server": "orders"}])
    handle = await start(client, spec, queue)
    # the two quick calls finish while `hold` is still in flight: the calls of a turn run at once
    deadline = time.monotonic() + 30
    while len(mcp_server.calls("lookup_order")) + len(mcp_server.calls("shipping_status")) < 2:
        assert time.monotonic() < deadline, mcp_server.calls()
        await asyncio.sleep(0.05)
    assert mcp_server.calls("hold") == []
    status = await until(handle, lambda s: "tool in flight: hold" in (s.steps[0].detail or ""))
    assert "turn 1/10" in (status.steps[0].detail or "")
    gate.touch()
    result = await handle.result()
    assert result.outputs["answer"] == "done"
    answers = tool_answers(result)
    assert answers[0] == "released" and "A100" in answers[1] and "lost in transit" in answers[2]


async def test_an_approved_call_runs_and_a_rejected_one_is_told_to_the_model(
    client: Client, queue: str, mcp_server: McpServer
) -> None:
    turns = script(
        calls(("lookup_order", {"order_id": "B200"})),
        calls(
            ("issue_refund", {"order_id": "B200", "amount": 18.5, "reason": "lost"}),
            ("issue_refund", {"order_id": "A100", "amount": 42.0, "reason": "asked"}),
        ),
        {"text": "Refunded B200; the refund of A100 was declined."},
    )
    spec = agent_spec(
        f"Refund please {turns}",
        [{"type": "mcp", "server": "orders", "requires_approval": ["issue_refund"]}],
        approvers=["ops@example.com"],
    )
    handle = await start(client, spec, queue)
    status = await until(handle, lambda s: sum(a.status == "waiting" for a in s.approvals) == 2)
    waiting = {a.step_id: a for a in status.approvals if a.status == "waiting"}
    assert set(waiting) == {"desk.2.0", "desk.2.1"}
    assert waiting["desk.2.0"].tool == "issue_refund" and waiting["desk.2.0"].arguments["amount"] == 18.5
    assert "waiting for approval: issue_refund, issue_refund" in (status.steps[0].detail or "")
    loop = status.agents["desk"]  # the approver sees the conversation so far
    assert loop.turn == 2 and [c.status for c in loop.calls] == ["waiting", "waiting"]
    assert [m["role"] for m in loop.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert mcp_server.calls("issue_refund") == []
    deadline = time.monotonic() + 30
    while True:  # the approvals inbox finds the pipeline by the call's approval id
        found = [w.id async for w in client.list_workflows('KernelflowAwaiting = "desk.2.1"')]
        if found:
            break
        assert time.monotonic() < deadline, "the waiting call never reached visibility"
        await asyncio.sleep(0.2)
    assert found == [handle.id]
    # someone else may not decide; an unknown id is refused and names what waits
    from temporalio.client import WorkflowUpdateFailedError

    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await approve(client, handle.id, "desk.2.0", by="intruder")
    assert isinstance(refused.value.cause, ApplicationError) and refused.value.cause.type == "NotAnApprover"
    with pytest.raises(WorkflowUpdateFailedError) as unknown:
        await approve(client, handle.id, "desk.9.9", by="ops@example.com")
    assert "desk.2.0" in str(unknown.value.cause)
    await approve(client, handle.id, "desk.2.0", by="ops@example.com")
    await reject(client, handle.id, "desk.2.1", by="ops@example.com", comment="not eligible")
    result = await handle.result()
    assert result.outputs["answer"].startswith("Refunded B200")
    assert [c["arguments"]["order_id"] for c in mcp_server.calls("issue_refund")] == ["B200"]
    assert mcp_server.calls("issue_refund")[0]["call_id"] == f"{handle.id}/desk.2.0"
    answers = tool_answers(result)
    assert answers[1] == "refunded 18.50 on order B200"
    assert "not approved: rejected by ops@example.com" in answers[2] and "not eligible" in answers[2]


async def test_a_policy_over_name_and_arguments_gates_only_large_refunds(
    client: Client, queue: str, mcp_server: McpServer
) -> None:
    turns = script(
        calls(("issue_refund", {"order_id": "A100", "amount": 5, "reason": "small"})),
        calls(("issue_refund", {"order_id": "A100", "amount": 500, "reason": "large"})),
        {"text": "ok"},
    )
    spec = agent_spec(
        f"go {turns}",
        [{"type": "mcp", "server": "orders"}],
        approval_when="tool == 'issue_refund' and arguments.amount > 100",
    )
    handle = await start(client, spec, queue)
    await until(handle, lambda s: any(a.status == "waiting" for a in s.approvals))
    assert [c["arguments"]["amount"] for c in mcp_server.calls("issue_refund")] == [5]
    await reject(client, handle.id, "desk.2.0", by="ops")
    result = await handle.result()
    assert result.outputs["answer"] == "ok"
    assert len(mcp_server.calls("issue_refund")) == 1


async def test_a_server_gone_mid_run_is_an_error_given_to_the_model(
    client: Client, queue: str, mcp_server: McpServer
) -> None:
    gate = mcp_server.log.parent / "never"
    turns = script(
        calls(("lookup_order", {"order_id": "A100"})),
        calls(("hold", {"gate": str(gate)})),
        calls(("lookup_order", {"order_id": "B200"})),
        {"text": "The order desk is down."},
    )
    retry = {"max_attempts": 2, "initial_interval_s": 0.2}
    spec = agent_spec(f"go {turns}", [{"type": "mcp", "server": "orders"}], tool_retry=retry, timeout_s=10)
    handle = await start(client, spec, queue)
    deadline = time.monotonic() + 30
    while not mcp_server.calls("hold:start"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    mcp_server.stop()  # the server goes away with the call in flight
    result = await handle.result()
    assert result.outputs["answer"] == "The order desk is down."
    answers = tool_answers(result)
    assert "A100" in answers[0]
    assert "MCP server 'orders' failed" in answers[1]
    assert "MCP server 'orders' failed" in answers[2]


async def test_a_server_gone_fails_the_step_when_so_configured(
    client: Client, queue: str, mcp_server: McpServer
) -> None:
    gate = mcp_server.log.parent / "never"
    turns = script(
        calls(("lookup_order", {"order_id": "A100"})),
        calls(("hold", {"gate": str(gate)})),
        {"text": "x"},
    )
    retry = {"max_attempts": 2, "initial_interval_s": 0.2}
    spec = agent_spec(
        f"go {turns}",
        [{"type": "mcp", "server": "orders"}],
        tool_retry=retry,
        on_tool_error="fail",
        timeout_s=10,
    )
    handle = await start(client, spec, queue)
    deadline = time.monotonic() + 30
    while not mcp_server.calls("hold:start"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    mcp_server.stop()  # the server goes away with the call in flight
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError)
    assert "tool 'hold' failed" in cause.message and "MCP server 'orders' failed" in cause.message


async def test_unknown_server_and_unknown_tool_fail_at_start(client: Client, queue: str) -> None:
    for tools, expected in (
        (
            [{"type": "mcp", "server": "nowhere"}],
            "MCP server 'nowhere' is not configured on this worker; configured: orders, orders-stdio",
        ),
        (
            [{"type": "mcp", "server": "orders", "tools": ["drop_tables"]}],
            "has no tool 'drop_tables'; its tools: hold, issue_refund",
        ),
        ([{"type": "pipeline", "name": "sub", "pipeline": "nowhere"}], "tool 'sub': UnknownPipeline: "),
    ):
        handle = await start(client, agent_spec("hi", tools), queue)
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        assert expected in str(failure.value.cause), (failure.value.cause.type, failure.value.cause.message)


async def test_limits_stop_or_fail_the_loop(client: Client, queue: str) -> None:
    endless = script(*[calls(("lookup_order", {"order_id": "A100"}))] * 5)
    tools = [{"type": "mcp", "server": "orders", "tools": ["lookup_order"]}]
    handle = await start(client, agent_spec(f"go {endless}", tools, max_turns=2), queue)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    assert isinstance(failure.value.cause, ApplicationError)
    assert (
        failure.value.cause.type == "BudgetExceeded" and "max_turns 2 reached" in failure.value.cause.message
    )
    handle = await start(client, agent_spec(f"go {endless}", tools, max_tokens=1, on_limit="stop"), queue)
    result = await handle.result()
    desk = next(s for s in result.steps if s.id == "desk")
    assert desk.status == "completed" and desk.usage.total_tokens > 1
    assert len(tool_answers(result)) == 1  # one turn, its call answered, then the limit


async def test_a_worker_killed_with_a_call_in_flight_repeats_no_finished_call(
    client: Client, sim: Any, mcp_server: McpServer, temporal_target: str, tmp_path: Path
) -> None:
    """The finished call of the turn (``lookup_order``) and the finished model turn are in the history
    and are not made again; the call in flight when the worker died (``hold``) is made again by the next
    worker: a tool call is at-least-once, so tools with side effects should be idempotent."""
    import os
    import shutil

    queue = f"agent-kill-{uuid.uuid4().hex[:8]}"
    gate = tmp_path / "gate"
    turns = script(
        calls(("lookup_order", {"order_id": "A100"}), ("hold", {"gate": str(gate)})),
        {"text": "survived"},
    )
    servers = {"orders": {"url": mcp_server.url}}
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": temporal_target,
        "KERNELFLOW_TASK_QUEUE": queue,
        "OPENAI_BASE_URL": f"{sim.url}/v1",
        "OPENAI_API_KEY": "sim-key",
        "KERNELFLOW_MCP_SERVERS": json.dumps(servers),
    }
    binary = shutil.which("kernelflow")
    assert binary is not None
    processes: list[subprocess.Popen[bytes]] = []

    def worker() -> subprocess.Popen[bytes]:
        log = (tmp_path / f"worker-{len(processes)}.log").open("wb")
        process = subprocess.Popen([binary, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    try:
        first = worker()
        spec = agent_spec(f"go [[sim: tag=agent]] {turns}", [{"type": "mcp", "server": "orders"}])
        handle = await start(client, spec, queue)
        deadline = time.monotonic() + 60
        while not (mcp_server.calls("hold:start") and mcp_server.calls("lookup_order")):
            assert time.monotonic() < deadline, mcp_server.calls()
            await asyncio.sleep(0.05)
        await until(
            handle, lambda s: s.steps[0].detail is not None and "in flight: hold" in s.steps[0].detail
        )
        first.kill()
        first.wait()
        gate.touch()
        worker()
        result = await asyncio.wait_for(handle.result(), timeout=90)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=20)
    assert result.outputs["answer"] == "survived"
    assert len(mcp_server.calls("lookup_order")) == 1  # finished before the kill: not repeated
    held = mcp_server.calls("hold:start")
    assert len(held) == 2  # in flight at the kill: made again (at-least-once)
    assert held[0]["call_id"] == held[1]["call_id"] == f"{handle.id}/desk.1.1"  # one id for both attempts
    assert sim.stats()["by_tag"]["agent"] == 2  # each model turn once


async def test_a_long_loop_continues_as_new_between_turns_and_goes_on(
    client: Client, queue: str, mcp_server: McpServer
) -> None:
    from workflows.contract import PIPELINE_WORKFLOW, PipelineRequest, PipelineResult

    turns = script(
        *[calls(("lookup_order", {"order_id": f"A{i}"})) for i in range(4)], {"text": "all looked up"}
    )
    spec = parse_pipeline(
        agent_spec(f"go {turns}", [{"type": "mcp", "server": "orders", "tools": ["lookup_order"]}])
    )
    handle = await client.start_workflow(
        PIPELINE_WORKFLOW,
        PipelineRequest(
            pipeline=spec.model_dump(mode="json", by_alias=True, exclude_none=True),
            continue_as_new_after=15,  # a few events: the loop continues as new between its turns
        ),
        id=f"agent-long-{uuid.uuid4().hex[:8]}",
        task_queue=queue,
        result_type=PipelineResult,
    )
    result = await handle.result()
    assert result.outputs["answer"] == "all looked up"
    # every call made once, in order, across runs
    assert [c["arguments"]["order_id"] for c in mcp_server.calls("lookup_order")] == ["A0", "A1", "A2", "A3"]
    status = await handle.query("status", result_type=PipelineStatus)
    assert status.run > 2
    assert len(tool_answers(result)) == 4
    assert "no order 'A3'" in tool_answers(result)[3]


async def test_kernelflow_agent_runs_the_loop_in_a_code_defined_workflow(
    client: Client, registry: Registry, mcp_server: McpServer
) -> None:
    from tests.agent_workflows import OrderDesk

    name = f"agent-code-{uuid.uuid4().hex[:8]}"
    turns = script(calls(("lookup_order", {"order_id": "A100"})), {"text": "A100 was delivered."})
    worker = build_worker(
        client,
        task_queue=name,
        registry=registry,
        mcp_servers=mcp_server.servers(),
        extra_workflows=[OrderDesk],
    )
    async with worker:
        result = await client.execute_workflow(
            OrderDesk.run, f"Where is A100? {turns}", id=name, task_queue=name
        )
    assert result == {"output": "A100 was delivered.", "turns": 2, "tool_calls": 1}
    assert len(mcp_server.calls("lookup_order")) == 1


class _Crm(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        type(self).received.append((self.command, self.path, body))
        payload = json.dumps({"customer": "Ada", "tier": "gold", "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        return None


async def test_http_and_sub_pipeline_tools_with_schemas(client: Client, registry: Registry) -> None:
    from worker.pipelines import PipelineCatalog

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Crm)
    _Crm.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    politeness = parse_pipeline(
        {
            "name": "politeness",
            "inputs": {"text": {"type": "string"}},
            "steps": [{"id": "score", "type": "transform", "expression": "inputs.text | length"}],
            "outputs": {"length": "{{ steps.score.output }}"},
        }
    )
    turns = script(
        calls(
            ("customer", {"customer_id": "c-1"}),
            ("measure", {"text": "hello"}),
            ("customer", {"customer_id": 5}),
            ("forbidden", {}),
        ),
        {"text": "done"},
    )
    number = {
        "type": "object",
        "properties": {"customer_id": {"type": "string"}},
        "required": ["customer_id"],
    }
    tools = [
        {
            "type": "http",
            "name": "customer",
            "url": base + "/customers/{{ arguments.customer_id }}",
            "method": "GET",
            "parameters": number,
        },
        {"type": "http", "name": "forbidden", "url": "http://127.0.0.1:1/elsewhere", "method": "POST"},
        {
            "type": "pipeline",
            "name": "measure",
            "pipeline": "politeness",
            "parameters": {
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
            },
        },
    ]
    queue = f"agent-http-{uuid.uuid4().hex[:8]}"
    worker = build_worker(
        client,
        task_queue=queue,
        registry=registry,
        tool_allow=[base + "/customers/"],
        pipelines=PipelineCatalog([politeness]),
    )
    try:
        async with worker:
            handle = await start(
                client, agent_spec(f"go {turns}", tools, tool_retry={"max_attempts": 1}), queue
            )
            result = await handle.result()
    finally:
        server.shutdown()
        server.server_close()
    answers = tool_answers(result)
    assert json.loads(answers[0]) == {
        "customer": "Ada",
        "tier": "gold",
        "path": "/customers/c-1?customer_id=c-1",
    }
    assert json.loads(answers[1]) == {"length": "5"}
    assert "invalid arguments" in answers[2] and "customer_id" in answers[2]
    assert "not on the worker's tool allow-list" in answers[3]
    assert [r[0] for r in _Crm.received] == ["GET"]


async def test_each_model_turn_streams_to_watchers(client: Client, queue: str) -> None:
    from temporalio.contrib.workflow_streams import WorkflowStreamClient

    from activities.streaming import TokenEvent, tokens_topic

    turns = script(calls(("lookup_order", {"order_id": "A100"})), {"text": "streamed final answer"})
    tools = [{"type": "mcp", "server": "orders", "tools": ["lookup_order"]}]
    handle = await start(client, agent_spec(f"go {turns}", tools, stream=True), queue)
    result = await handle.result()
    assert result.outputs["answer"] == "streamed final answer"
    assert len(tool_answers(result)) == 1  # the streamed turn's tool call was assembled and made
    stream = WorkflowStreamClient.create(client, handle.id)
    texts = [
        item.data.text
        async for item in stream.subscribe(tokens_topic("desk"), result_type=TokenEvent)
        if item.data.kind == "text"
    ]
    assert "".join(texts) == "streamed final answer"


def test_mcp_servers_come_from_the_config_file_and_the_environment(tmp_path: Path) -> None:
    from activities.mcp import mcp_servers_from_env
    from kernel.errors import ConfigurationError
    from worker.config import load_config

    path = tmp_path / "kernelflow.yaml"
    path.write_text(
        "mcp_servers:\n  orders: {url: 'http://127.0.0.1:9/mcp'}\n  files: {command: python, args: [-m, x]}\n"
    )
    config = load_config(path)
    assert config.mcp_servers["orders"].url == "http://127.0.0.1:9/mcp"
    assert config.mcp_servers["files"].args == ["-m", "x"]
    env = {"KERNELFLOW_MCP_SERVERS": json.dumps({"orders": {"command": "orders-mcp"}})}
    assert mcp_servers_from_env(env)["orders"].command == "orders-mcp"
    path.write_text("mcp_servers:\n  broken: {url: 'http://x/mcp', command: y}\n")
    with pytest.raises(ConfigurationError, match="exactly one of 'url'"):
        load_config(path)


async def test_stop_conditions_and_a_repaired_final_answer(
    client: Client, queue: str, mcp_server: McpServer
) -> None:
    submit = {
        "type": "http",
        "name": "submit",
        "url": "http://127.0.0.1:9/never",
        "parameters": {"type": "object", "properties": {"verdict": {"type": "string"}}},
    }
    lookup = {"type": "mcp", "server": "orders", "tools": ["lookup_order"]}
    by_tool = script(calls(("lookup_order", {"order_id": "A100"})), calls(("submit", {"verdict": "refund"})))
    handle = await start(client, agent_spec(f"go {by_tool}", [lookup, submit], stop_tools=["submit"]), queue)
    result = await handle.result()
    assert result.outputs["answer"] == "{'verdict': 'refund'}"  # the stop tool's arguments, not called
    endless = script(*[calls(("lookup_order", {"order_id": "A100"}))] * 5)
    handle = await start(client, agent_spec(f"go {endless}", [lookup], stop_when="turn >= 2"), queue)
    await handle.result()
    assert len(mcp_server.calls("lookup_order")) == 2  # one call by the first spec, one before turn 2 stopped
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    repaired = script({"text": "not json"}, {"text": '{"a": "x"}'}, {"text": '{"a": 1}'})
    spec = agent_spec(f"go {repaired}", [], output_schema=schema)
    spec["outputs"]["a"] = "{{ steps.desk.output.a + 1 }}"
    result = await (await start(client, spec, queue)).result()
    assert result.outputs["a"] == "2"
    messages = json.loads(result.outputs["messages"])
    assert [m["content"][:26] for m in messages if m["role"] == "user"][1:] == [
        "Your answer was not valid:"
    ] * 2
