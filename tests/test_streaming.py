"""Token streaming end to end: a real Temporal server and worker, the simulator slowing the stream, and
watchers reading the workflow's stream (in process, and as the real ``kernelflow watch`` command)."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import uuid
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.workflow_streams import WorkflowStreamClient

from activities.streaming import TokenEvent, is_tokens_topic, tokens_topic
from kernel.pipeline import parse_pipeline
from simulator.server import SimulatorServer
from worker.client import start_pipeline
from worker.watch import PipelineWatch
from workflows.pipeline import PIPELINE_WORKFLOW, PipelineRequest, PipelineResult, PipelineStatus

MODEL = "openai/gpt-4o-mini"


def _reply(words: int) -> str:
    return " ".join(f"word{i}" for i in range(words))


def _step(step_id: str, prompt: str, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "model": MODEL, "prompt": prompt, **extra}


async def _start(
    client: Client, task_queue: str, *steps: dict[str, Any]
) -> WorkflowHandle[Any, PipelineResult]:
    spec = parse_pipeline({"name": "streaming", "steps": list(steps)})
    return await start_pipeline(client, spec, {}, task_queue=task_queue)


async def _token_events(client: Client, workflow_id: str) -> list[TokenEvent]:
    """Everything the finished workflow's stream holds, in order."""
    stream = WorkflowStreamClient.create(client, workflow_id)
    return [
        item.data
        async for item in stream.subscribe(None, result_type=TokenEvent)
        if is_tokens_topic(item.topic)
    ]


async def _watch(
    client: Client, workflow_id: str, *, as_json: bool = False
) -> tuple[PipelineWatch, str, str]:
    out = io.StringIO()
    watcher = PipelineWatch(client, workflow_id, out=out, as_json=as_json)
    status = await watcher.run()
    return watcher, status, out.getvalue()


async def test_watcher_started_mid_stream_gets_the_whole_answer(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    reply = _reply(80)
    handle = await _start(
        client, task_queue, _step("story", f'[[sim: token_delay=0.05 reply="{reply}"]] tell', stream=True)
    )
    stream = WorkflowStreamClient.create(client, handle.id)
    async for item in stream.subscribe(tokens_topic("story"), result_type=TokenEvent):
        if item.data.kind == "text":
            break
    status = await handle.query("status", result_type=PipelineStatus)
    assert status.steps[0].status == "running", "the watcher would not start mid-stream"

    watcher, final, printed = await _watch(client, handle.id)

    result = await handle.result()
    assert final == "completed"
    assert watcher.texts["story"] == result.steps[0].output == reply
    assert reply in printed
    assert printed.index(reply) < printed.index("✓ story") < printed.index("pipeline streaming: completed")


async def test_cut_stream_is_retried_as_a_restart_without_duplicated_text(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    reply = _reply(40)
    key = uuid.uuid4().hex
    prompt = f'[[sim: fault=cut times=1 key={key} token_delay=0.01 reply="{reply}"]] tell'
    handle = await _start(
        client,
        task_queue,
        _step("story", prompt, stream=True, retry={"max_attempts": 3, "initial_interval_s": 0.1}),
    )
    watcher, final, printed = await _watch(client, handle.id)

    result = await handle.result()
    assert final == "completed"
    assert watcher.texts["story"] == result.steps[0].output == reply
    events = await _token_events(client, handle.id)
    first = [e for e in events if e.attempt == 1]
    second = [e for e in events if e.attempt == 2]
    assert first[-1].kind == "error" and first[-1].error_type == "StreamInterrupted"
    partial = "".join(e.text or "" for e in first)
    assert partial and reply.startswith(partial) and partial != reply
    assert second[0].kind == "restart" and second[-1].kind == "done"
    assert "".join(e.text or "" for e in second) == reply
    assert "↻ story: attempt 2" in printed and f"the {len(partial)} characters above are discarded" in printed


async def test_fallback_model_opens_with_a_restart(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    reply = _reply(30)
    prompt = f'[[sim: fault=cut model=gpt-4.1]] [[sim: token_delay=0.01 reply="{reply}"]] tell'
    handle = await _start(
        client,
        task_queue,
        {
            "id": "story",
            "model": "openai/gpt-4.1",
            "fallbacks": [MODEL],
            "prompt": prompt,
            "stream": True,
            "retry": {"max_attempts": 1},
        },
    )
    watcher, final, _ = await _watch(client, handle.id)

    assert final == "completed"
    events = await _token_events(client, handle.id)
    fallback = [e for e in events if e.model == MODEL]
    assert fallback[0].kind == "restart" and fallback[0].attempt == 1
    assert [e.kind for e in events if e.model == "openai/gpt-4.1"][-1] == "error"
    assert watcher.texts["story"] == reply


async def test_non_streaming_step_publishes_nothing_but_its_completion_is_watched(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    reply = _reply(20)
    handle = await _start(
        client,
        task_queue,
        _step("plain", "a plain answer"),
        _step("local", "streamed locally", stream=True, local_activity=True),
        _step("streamed", f'[[sim: token_delay=0.01 reply="{reply}"]] go', stream=True),
    )
    watcher, final, printed = await _watch(client, handle.id)

    assert final == "completed"
    events = await _token_events(client, handle.id)
    assert {e.step_id for e in events} == {"streamed"}
    assert set(watcher.texts) == {"streamed"}
    lines = printed.splitlines()
    done = [i for i, line in enumerate(lines) if line.startswith("✓ ")]
    assert [lines[i].split()[1] for i in done] == ["plain", "local", "streamed"]
    assert lines.index(reply) == done[2] - 1, "the streamed text belongs right above its step's completion"


async def test_history_grows_per_batch_not_per_token(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    words = 300
    reply = _reply(words)
    handle = await _start(
        client, task_queue, _step("long", f'[[sim: token_delay=0.005 reply="{reply}"]] go', stream=True)
    )
    result = await handle.result()
    assert result.steps[0].output == reply
    signals = 0
    async for event in handle.fetch_history_events():
        signals += event.HasField("workflow_execution_signaled_event_attributes")
    texts = [e for e in await _token_events(client, handle.id) if e.kind == "text"]
    assert "".join(e.text or "" for e in texts) == reply
    assert 1 <= signals < words // 10
    assert len(texts) <= signals, "deltas are coalesced: at most one text event per batch"


async def _kernelflow_watch(target: str, workflow_id: str, *extra: str) -> tuple[int, str, str]:
    binary = shutil.which("kernelflow")
    assert binary, "the kernelflow console script is not installed"
    process = await asyncio.create_subprocess_exec(
        binary,
        "watch",
        workflow_id,
        "--address",
        target,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_kernelflow_watch_command_prints_the_answer_and_exits_when_done(
    client: Client, task_queue: str, sim: SimulatorServer, temporal_target: str
) -> None:
    reply = _reply(40)
    handle = await _start(
        client,
        task_queue,
        _step("first", "a quick one"),
        _step("story", f'[[sim: token_delay=0.03 reply="{reply}"]] tell', stream=True),
    )
    code, stdout, stderr = await _kernelflow_watch(temporal_target, handle.id)
    assert code == 0, stderr
    assert reply in stdout and "✓ first" in stdout and "✓ story" in stdout
    assert stdout.rstrip().splitlines()[-1].startswith("pipeline streaming: completed")

    # Once finished, `--json` replays the stream from its start: one JSON object per line.
    code, stdout, stderr = await _kernelflow_watch(temporal_target, handle.id, "--json")
    assert code == 0, stderr
    records = [json.loads(line) for line in stdout.splitlines()]
    assert "".join(r.get("text", "") for r in records if r["kind"] == "text") == reply
    assert [r["step_id"] for r in records if r["kind"] == "step" and r["status"] == "completed"] == [
        "first",
        "story",
    ]
    assert records[-1]["kind"] == "pipeline" and records[-1]["status"] == "completed"


async def test_kernelflow_watch_names_a_missing_workflow(temporal_target: str) -> None:
    code, _, stderr = await _kernelflow_watch(temporal_target, "no-such-workflow-" + uuid.uuid4().hex)
    assert code == 2 and "no workflow with id" in stderr


async def test_watcher_sees_every_steps_text_across_continue_as_new(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    first, second = _reply(30), _reply(40)
    spec = parse_pipeline(
        {
            "name": "streaming",
            "steps": [
                _step("s1", f'[[sim: token_delay=0.01 reply="{first}"]] one', stream=True),
                _step("s2", f'[[sim: token_delay=0.01 reply="{second}"]] two', stream=True),
            ],
        }
    )
    handle = await client.start_workflow(
        PIPELINE_WORKFLOW,
        PipelineRequest(
            pipeline=spec.model_dump(mode="json", by_alias=True, exclude_none=True),
            continue_as_new_after=5,  # the step boundary continues as new
        ),
        id=f"stream-can-{uuid.uuid4().hex[:8]}",
        task_queue=task_queue,
        result_type=PipelineResult,
    )
    result = await handle.result()
    assert result.status == "completed"
    status = await client.get_workflow_handle(handle.id).query("status", result_type=PipelineStatus)
    assert status.run > 1, "the pipeline did not continue as new"

    watcher, final, _ = await _watch(client, handle.id)
    assert final == "completed"
    assert watcher.texts == {"s1": first, "s2": second}
