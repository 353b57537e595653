"""Every step type end to end: real Temporal server, real worker, real HTTP to the simulator."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from kernel.errors import PipelineError
from kernel.pipeline import parse_pipeline
from kernel.registry import Registry
from simulator.server import SimulatorServer
from worker.app import build_worker
from worker.client import start_pipeline
from workflows.pipeline import PipelineResult, PipelineStatus

MODEL = "openai/gpt-4o-mini"


def _spec(steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": "engine-test", "steps": steps, **extra}


async def _run(client: Client, spec: dict[str, Any], queue: str, inputs: dict[str, Any] | None = None) -> Any:
    handle = await start_pipeline(client, parse_pipeline(spec), inputs or {}, task_queue=queue)
    return handle, await handle.result()


async def _failure(client: Client, spec: dict[str, Any], queue: str) -> tuple[ApplicationError, Any]:
    handle = await start_pipeline(client, parse_pipeline(spec), {}, task_queue=queue)
    with pytest.raises(WorkflowFailureError) as failure:
        await handle.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError)
    return cause, handle


async def test_transform_switch_and_when_guards(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {"id": "numbers", "type": "transform", "expression": "inputs.nums | map('int') | list"},
            {"id": "total", "type": "transform", "expression": "{'sum': steps.numbers.output | sum}"},
            {
                "id": "route",
                "type": "switch",
                "cases": [
                    {
                        "when": "steps.total.output.sum > 100",
                        "steps": [{"id": "big", "type": "transform", "expression": "'big'"}],
                    },
                    {
                        "when": "steps.total.output.sum > 5",
                        "steps": [{"id": "medium", "type": "transform", "expression": "'medium'"}],
                    },
                ],
                "default": [{"id": "small", "type": "transform", "expression": "'small'"}],
            },
            {
                "id": "never",
                "model": MODEL,
                "prompt": "x [[sim: tag=never]]",
                "when": "steps.route.output == 'big'",
            },
            {
                "id": "shout",
                "type": "transform",
                "expression": "steps.route.output | upper",
                "when": "steps.never.status == 'skipped'",
            },
        ],
        inputs={"nums": {"type": "array"}},
        outputs={"size": "{{ steps.shout.output }}", "case": "{{ steps.route.case }}"},
    )
    _, result = await _run(client, spec, task_queue, {"nums": ["3", "4"]})
    assert result.outputs == {"size": "MEDIUM", "case": "1"}
    statuses = {s.id: s.status for s in result.steps}
    assert statuses == {
        "numbers": "completed", "total": "completed", "route": "completed", "big": "skipped",
        "medium": "completed", "small": "skipped", "never": "skipped", "shout": "completed",
    }  # fmt: skip
    assert {s.id: s.parent for s in result.steps}["medium"] == "route"
    assert "never" not in sim.stats()["by_tag"]


async def test_transform_cannot_reach_python_internals(client: Client, task_queue: str) -> None:
    with pytest.raises(PipelineError, match=r"inputs\.__class__"):
        parse_pipeline(_spec([{"id": "evil", "type": "transform", "expression": "inputs.__class__"}]))
    spec = _spec(
        [
            {"id": "t", "type": "transform", "expression": "'text'"},
            {"id": "evil", "type": "transform", "expression": "steps.t.output.__class__.__mro__"},
        ]
    )
    cause, _ = await _failure(client, spec, task_queue)
    assert cause.type == "PipelineError" and "step 'evil' expression" in cause.message


async def test_parallel_all_settled_keeps_going_and_records_the_failed_branch(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {
                "id": "fan",
                "type": "parallel",
                "on_failure": "all_settled",
                "branches": {
                    "good": [{"id": "a", "model": MODEL, "prompt": "alpha [[sim: tag=a]]"}],
                    "bad": [
                        {
                            "id": "b",
                            "model": MODEL,
                            "prompt": "[[sim: fault=401]] beta",
                            "retry": {"max_attempts": 1},
                        }
                    ],
                },
            },
            {
                "id": "after",
                "type": "transform",
                "expression": "[steps.fan.output.good, steps.fan.errors.keys() | list]",
            },
        ]
    )
    _, result = await _run(client, spec, task_queue)
    good, failed = result.steps[-1].output
    assert good == "Simulated reply from gpt-4o-mini: alpha" and failed == ["bad"]
    assert {s.id: s.status for s in result.steps}["b"] == "failed"


async def test_parallel_fail_fast_cancels_the_sibling_call(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {
                "id": "fan",
                "type": "parallel",
                "branches": {
                    "slow": [
                        {
                            "id": "hangs",
                            "model": MODEL,
                            "prompt": "[[sim: fault=hang tag=hangs]] wait",
                            "heartbeat_timeout_s": 2,
                        }
                    ],
                    "fails": [
                        {"id": "gate", "type": "transform", "expression": "1"},
                        {"id": "breaks", "model": MODEL, "prompt": "[[sim: fault=400 latency=0.5]] no"},
                    ],
                },
            },
            {"id": "never", "model": MODEL, "prompt": "[[sim: tag=never]] x"},
        ]
    )
    cause, handle = await _failure(client, spec, task_queue)
    assert cause.type == "StepFailed" and "fan" in cause.message and "breaks" in cause.message
    status = await handle.query("status", result_type=PipelineStatus)
    states = {s.id: s.status for s in status.steps}
    assert states["hangs"] == "cancelled" and states["breaks"] == "failed" and states["never"] == "pending"
    assert sim.stats()["by_tag"] == {"hangs": 1}  # called once, never retried, and nothing after it
    history = await handle.fetch_history()
    kinds = [e.event_type for e in history.events]
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED in kinds


async def test_map_keeps_input_order_and_never_exceeds_its_concurrency(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {
                "id": "each",
                "type": "map",
                "items": "{{ inputs.cities }}",
                "item_var": "city",
                "concurrency": 2,
                "steps": [
                    {
                        "id": "describe",
                        "model": MODEL,
                        "prompt": "[[sim: latency=0.2 tag=describe]] {{ index }}:{{ city }}",
                    },
                    {
                        "id": "short",
                        "type": "transform",
                        "expression": "steps.describe.output | replace('Simulated reply from gpt-4o-mini: ', '')",
                    },
                ],
            }
        ],
        inputs={"cities": {"type": "array"}},
        outputs={"joined": "{{ steps.each.output | join(',') }}"},
    )
    cities = ["Oslo", "Lima", "Pune", "Kyiv", "Nuuk"]
    handle, result = await _run(client, spec, task_queue, {"cities": cities})
    assert result.outputs["joined"] == "0:Oslo,1:Lima,2:Pune,3:Kyiv,4:Nuuk"
    assert sim.stats()["by_tag"]["describe"] == 5
    assert [s.id for s in result.steps] == ["each"]  # per-item steps are not listed
    # In history order: calls scheduled but not yet closed never exceed the limit, and do reach it.
    in_flight = peak = 0
    for event in (await handle.fetch_history()).events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            in_flight += 1
            peak = max(peak, in_flight)
        elif event.event_type in (
            EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
            EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED,
            EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
        ):
            in_flight -= 1
    assert peak == 2


async def test_map_over_something_that_is_not_a_list_names_the_step(client: Client, task_queue: str) -> None:
    spec = _spec(
        [
            {
                "id": "each",
                "type": "map",
                "items": "{{ inputs.n }}",
                "steps": [{"id": "x", "type": "transform", "expression": "item"}],
            }
        ],
        inputs={"n": {"type": "integer", "default": 3}},
    )
    cause, _ = await _failure(client, spec, task_queue)
    assert "step 'each' items must be a list, got int" in cause.message


async def test_structured_output_is_re_asked_with_the_error_then_accepted(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    key = uuid.uuid4().hex
    schema = {
        "type": "object",
        "required": ["category", "score"],
        "properties": {
            "category": {"type": "string", "enum": ["billing", "bug"]},
            "score": {"type": "integer", "minimum": 1},
        },
    }
    spec = _spec(
        [
            {
                "id": "classify",
                "model": MODEL,
                "fallbacks": ["openai/gpt-4.1-nano"],
                "prompt": f'[[sim: reply="not json at all" times=1 key={key} tag=classify]] Classify it',
                "output_schema": schema,
            }
        ],
        outputs={"category": "{{ steps.classify.output.category }}"},
    )
    _, result = await _run(client, spec, task_queue)
    assert result.outputs["category"] == "billing"
    assert result.steps[0].output == {"category": "billing", "score": 1}
    assert result.steps[0].model == MODEL and result.steps[0].failures == []
    assert sim.stats()["by_model"] == {"gpt-4o-mini": 2}  # asked, re-asked, no fallback


async def test_structured_output_still_wrong_after_repairs_falls_back(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        [
            {
                "id": "classify",
                "model": MODEL,
                "fallbacks": ["openai/gpt-4.1-nano"],
                "prompt": '[[sim: reply="{\\"category\\": \\"other\\"}" model=gpt-4o-mini]] Classify it',
                "output_schema": {
                    "type": "object",
                    "required": ["category"],
                    "properties": {"category": {"enum": ["billing"]}},
                },
                "max_repairs": 1,
            }
        ]
    )
    _, result = await _run(client, spec, task_queue)
    step = result.steps[0]
    assert step.model == "openai/gpt-4.1-nano" and step.output == {"category": "billing"}
    assert [(f.model, f.error_type) for f in step.failures] == [(MODEL, "InvalidOutput")]
    assert "$.category" in step.failures[0].message and "'other'" in step.failures[0].message
    assert sim.stats()["by_model"] == {"gpt-4o-mini": 2, "gpt-4.1-nano": 1}


async def test_embed_step_returns_vectors(client: Client, task_queue: str, sim: SimulatorServer) -> None:
    spec = _spec(
        [
            {"id": "one", "type": "embed", "model": "openai/text-embedding-3-small", "input": "hello"},
            {
                "id": "many",
                "type": "embed",
                "model": "openai/text-embedding-3-small",
                "input": "{{ inputs.texts }}",
            },
        ],
        inputs={"texts": {"type": "array"}},
    )
    _, result = await _run(client, spec, task_queue, {"texts": ["a", "b", "c"]})
    one, many = result.steps[0].output, result.steps[1].output
    assert isinstance(one, list) and all(isinstance(x, float) for x in one)
    assert len(many) == 3 and all(len(v) == len(one) for v in many)
    assert result.usage.total_tokens > 0


# --- tool ---------------------------------------------------------------------------------------


class _Api(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        type(self).received.append((self.command, self.path, body))
        payload = b'{"ticket": 42, "ok": true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    _Api.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_tool_calls_an_allowed_endpoint_and_is_refused_elsewhere(
    client: Client, registry: Registry, api: str
) -> None:
    queue = f"tool-{uuid.uuid4().hex[:8]}"
    allowed = _spec(
        [
            {
                "id": "create",
                "type": "tool",
                "method": "POST",
                "url": api + "/api/tickets?source={{ inputs.source }}",
                "body": {"title": "{{ inputs.source }} ticket", "tags": "{{ inputs.tags }}"},
            },
            {"id": "number", "type": "transform", "expression": "steps.create.output.ticket + 1"},
        ],
        inputs={"source": {"type": "string"}, "tags": {"type": "array"}},
    )
    refused = _spec([{"id": "leak", "type": "tool", "url": api + "/admin/export"}])
    async with build_worker(client, task_queue=queue, registry=registry, tool_allow=[api + "/api/"]):
        _, result = await _run(client, allowed, queue, {"source": "web", "tags": ["a", "b"]})
        cause, _ = await _failure(client, refused, queue)
    assert result.steps[1].output == 43
    method, path, body = _Api.received[0]
    assert (method, path) == ("POST", "/api/tickets?source=web")
    assert body == b'{"title":"web ticket","tags":["a","b"]}'
    assert cause.type == "ToolNotAllowed"
    assert "leak" in cause.message and "/admin/export" in cause.message and api + "/api/" in cause.message
    assert len(_Api.received) == 1  # the refused call never left the worker


async def test_spec_errors_name_the_step_id_and_the_field() -> None:
    with pytest.raises(PipelineError) as info:
        parse_pipeline(
            _spec(
                [
                    {"id": "a", "type": "transform", "expression": "1"},
                    {
                        "id": "fan",
                        "type": "parallel",
                        "branches": {"x": [{"id": "draft", "model": "bad model", "prompt": "p"}]},
                    },
                ]
            )
        )
    assert "steps[1] (id 'fan').branches.x[0] (id 'draft').model" in str(info.value)
    assert ".llm." not in str(info.value)
    with pytest.raises(PipelineError, match=r"steps\[0\] \(id 'w'\): unknown step type"):
        parse_pipeline(_spec([{"id": "w", "type": "wait"}]))
    with pytest.raises(PipelineError, match="an approval cannot run inside map 'each'"):
        parse_pipeline(
            _spec(
                [
                    {
                        "id": "each",
                        "type": "map",
                        "items": "{{ [1] }}",
                        "steps": [{"id": "ok", "type": "approval"}],
                    }
                ]
            )
        )


async def test_result_of_a_mixed_pipeline_is_plain_json(client: Client, task_queue: str) -> None:
    spec = _spec([{"id": "t", "type": "transform", "expression": "{'a': [1, 2]}"}])
    handle, _ = await _run(client, spec, task_queue)
    raw = await client.get_workflow_handle(handle.id, result_type=dict).result()
    assert raw["steps"][0]["output"] == {"a": [1, 2]}
    assert isinstance(PipelineResult.model_validate(raw), PipelineResult)
