"""Figure 9: per-turn time of the durable agent loop against a hand-written loop calling the provider.

Both loops run the same scripted conversation on the simulator: ``turns`` turns in which the model
asks for a tool the loop does not have (answered at once with an error, no tool call is made), then a
final answer. So each turn is one model call and the figure is what durability adds to a turn: the
activity round trip through the Temporal server, the workflow task that appends the answer, and the
payloads. Tool calls add one activity round trip each on top (not measured here).

* ``durable``: an ``agent`` step in ``PipelineWorkflow`` (one ``llm_chat`` activity per turn);
* ``direct``: ``OpenAIProvider.chat`` in a Python loop appending the assistant message and the tool
  error message, the conversation growing alike.

Runs alternate (durable, direct, direct, durable, ...) after a warm-up; the ratio is of the medians
of per-turn time. The floor is Temporal's activity round trip on this machine.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from bench._common import Mode, Progress, Result
from bench._durable import DurableEnv, durable_env
from kernel.contracts import ChatRequest
from kernel.pipeline import PipelineSpec, parse_pipeline
from kernel.provider import ProviderSettings
from providers.openai import OpenAIProvider
from worker.client import start_pipeline

__all__ = ["measure", "run"]

MODEL = "gpt-4o-mini"
_COUNTS: dict[Mode, dict[str, int]] = {
    "full": {"runs": 30, "warmup": 3, "turns": 10},
    "quick": {"runs": 8, "warmup": 1, "turns": 6},
    "smoke": {"runs": 2, "warmup": 1, "turns": 3},
}
_TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}


def _script(turns: int) -> str:
    script = [{"calls": [{"name": "missing", "arguments": {}}]}] * turns + [{"text": "done"}]
    return f"[[sim: script='{json.dumps(script)}']]"


def _spec(turns: int, run: int) -> PipelineSpec:
    # one HTTP tool, never called: the script asks for a tool that is not in the list
    tool = {"type": "http", "name": "lookup", "url": "http://127.0.0.1:9/never", "method": "GET"}
    step = {
        "id": "loop",
        "type": "agent",
        "model": f"openai/{MODEL}",
        "instructions": f"Bench run {run}.",
        "prompt": f"Work through the list. {_script(turns)}",
        "tools": [tool],
        "max_turns": turns + 2,
    }
    return parse_pipeline(
        {"name": "bench-agent", "steps": [step], "outputs": {"answer": "{{ steps.loop.output }}"}}
    )


async def _durable_once(env: DurableEnv, turns: int, run: int) -> float:
    spec = _spec(turns, run)
    started = time.perf_counter()
    handle = await start_pipeline(env.client, spec, {}, task_queue=env.task_queue)
    result = await handle.result()
    elapsed = time.perf_counter() - started
    if result.outputs.get("answer") != "done":
        raise RuntimeError(f"the agent pipeline did not finish its script: {result.outputs}")
    return elapsed / (turns + 1)


async def _direct_once(provider: OpenAIProvider, turns: int, run: int) -> float:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": f"Bench run {run}."},
        {"role": "user", "content": f"Work through the list. {_script(turns)}"},
    ]
    started = time.perf_counter()
    for _ in range(turns + 2):
        request = ChatRequest.model_validate({"model": MODEL, "messages": messages, "tools": [_TOOL]})
        response = await provider.chat(request)
        message = response.choices[0].message
        messages.append(message.model_dump(mode="json", exclude_none=True))
        if not message.tool_calls:
            break
        for call in message.tool_calls:
            error = json.dumps({"error": f"there is no tool {call.function.name!r}; the tools are: lookup"})
            messages.append({"role": "tool", "tool_call_id": call.id, "content": error})
    elapsed = time.perf_counter() - started
    if response.text != "done":
        raise RuntimeError(f"the direct loop did not finish its script: {response.text!r}")
    return elapsed / (turns + 1)


async def measure(env: DurableEnv, mode: Mode, progress: Progress) -> list[Result]:
    counts = _COUNTS[mode]
    turns = counts["turns"]
    provider = OpenAIProvider(
        settings=ProviderSettings(base_url=f"{env.simulator_url}/v1", api_key="sim-key")
    )
    try:
        for number in range(counts["warmup"]):
            await _durable_once(env, turns, -1 - number)
            await _direct_once(provider, turns, -1 - number)
        durable: list[float] = []
        direct: list[float] = []
        for number in range(counts["runs"]):
            if number % 2 == 0:
                durable.append(await _durable_once(env, turns, number))
                direct.append(await _direct_once(provider, turns, number))
            else:
                direct.append(await _direct_once(provider, turns, number))
                durable.append(await _durable_once(env, turns, number))
            progress.step("runs", number + 1, counts["runs"])
    finally:
        await provider.aclose()
    params = {
        "runs_per_side": counts["runs"],
        "turns_per_run": turns + 1,
        "durable": "PipelineWorkflow, one agent step, one llm_chat activity per turn",
        "baseline": "OpenAIProvider.chat in a Python loop, same scripted turns and messages",
        "durable_ms_per_turn": [round(v * 1e3, 2) for v in durable],
        "direct_ms_per_turn": [round(v * 1e3, 2) for v in direct],
    }
    return [
        Result(
            name="9. agent loop, time per turn, p50",
            value=statistics.median(durable) * 1e3,
            unit="ms",
            baseline="hand-written loop calling the provider",
            baseline_value=statistics.median(direct) * 1e3,
            params=params,
        )
    ]


async def run(mode: Mode) -> list[Result]:
    progress = Progress("9 agent loop")
    progress.note("starting dev server, simulator and worker")
    async with durable_env() as env:
        return await measure(env, mode, progress)
