"""The new ``llm`` step options end to end: real Temporal server, real worker, real HTTP to the
simulator. Known models' rules refuse a pipeline before it starts; lenient steps drop what a model
refuses and record it; a quota error moves straight to the fallback without retries; documents,
reasoning effort and prompt caching reach the vendor."""

from __future__ import annotations

import json
from typing import Any

import pytest
from temporalio.client import Client

from kernel.errors import PipelineError
from kernel.pipeline import parse_pipeline
from kernel.registry import Registry
from simulator.server import SimulatorServer
from worker.client import check_models, start_pipeline
from workflows.contract import PipelineResult

PDF = "data:application/pdf;base64,JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PD4+CmVuZG9iagp0cmFpbGVyCjw8Pj4KJSVFT0YK"


def _spec(*steps: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "options",
        "inputs": {"topic": {"type": "string"}},
        "steps": list(steps),
        "outputs": {"text": "{{ steps.ask.output }}"},
    }


async def _run(client: Client, spec: dict[str, Any], task_queue: str, **inputs: Any) -> PipelineResult:
    handle = await start_pipeline(
        client, parse_pipeline(spec), inputs or {"topic": "tides"}, task_queue=task_queue
    )
    return await handle.result()


def test_a_known_model_refusing_a_step_option_is_refused_before_start(registry: Registry) -> None:
    spec = parse_pipeline(
        _spec(
            {
                "id": "ask",
                "model": "openai/gpt-4o",
                "fallbacks": ["openai/o4-mini"],
                "prompt": "Hi",
                "temperature": 0.2,
            }
        )
    )
    with pytest.raises(
        PipelineError, match=r"step 'ask' cannot call 'openai/o4-mini': .*refuses 'temperature'"
    ):
        check_models(spec, registry)
    lenient = parse_pipeline(
        _spec({"id": "ask", "model": "openai/o4-mini", "prompt": "Hi", "temperature": 0.2, "lenient": True})
    )
    check_models(lenient, registry)


async def test_lenient_step_drops_what_the_model_refuses_and_records_it(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        {
            "id": "ask",
            "model": "openai/gpt-5-mini",
            "prompt": "Tides? {{ inputs.topic }}",
            "temperature": 0.2,
            "reasoning_effort": "low",
            "lenient": True,
        }
    )
    spec["outputs"]["warnings"] = "{{ steps.ask.warnings }}"
    result = await _run(client, spec, task_queue)
    assert result.status == "completed"
    assert result.outputs["text"].startswith("Simulated reply from gpt-5-mini")
    assert json.loads(result.outputs["warnings"]) == [
        "dropped temperature: model openai/gpt-5-mini refuses 'temperature'"
    ]
    (step,) = result.steps
    assert step.model == "openai/gpt-5-mini" and not step.failures


async def test_strict_step_refused_by_its_model_moves_to_the_fallback_without_a_call(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        {
            "id": "ask",
            "model": "openai/o4-mini",
            "fallbacks": ["anthropic/claude-3-5-haiku-latest"],
            "prompt": "Hi",
            "temperature": 0.2,
        }
    )
    result = await _run(client, spec, task_queue)
    (step,) = result.steps
    assert step.model == "anthropic/claude-3-5-haiku-latest"
    assert [f.error_type for f in step.failures] == ["UnsupportedCapability"]
    assert sim.stats()["by_model"] == {"claude-3-5-haiku-latest": 1}


async def test_quota_exhausted_is_not_retried_and_the_fallback_answers(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        {
            "id": "ask",
            "model": "openai/gpt-4o",
            "fallbacks": ["openai/gpt-4o-mini"],
            "prompt": "Hi [[sim: fault=quota model=gpt-4o]]",
            "retry": {"max_attempts": 5, "initial_interval_s": 0.01},
        }
    )
    result = await _run(client, spec, task_queue)
    (step,) = result.steps
    assert step.model == "openai/gpt-4o-mini"
    assert [f.error_type for f in step.failures] == ["QuotaExceeded"]
    assert sim.stats()["by_model"] == {"gpt-4o": 1, "gpt-4o-mini": 1}


async def test_documents_and_cache_breakpoints_reach_anthropic(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    spec = _spec(
        {
            "id": "ask",
            "model": "anthropic/claude-sonnet-4-5",
            "system": "You review contracts.",
            "prompt": "Summarise {{ inputs.topic }}",
            "documents": [{"file_data": "{{ inputs.pdf }}", "filename": "c.pdf"}],
            "cache": {"breakpoints": [0], "ttl": "1h"},
            "thinking_budget": 2048,
        }
    )
    spec["inputs"]["pdf"] = {"type": "string"}
    result = await _run(client, spec, task_queue, topic="the contract", pdf=PDF)
    assert result.status == "completed"
    assert result.outputs["text"].startswith("Simulated reply from claude-sonnet-4-5")


async def test_the_contract_review_example_runs_and_records_what_it_dropped(
    client: Client, task_queue: str, sim: SimulatorServer
) -> None:
    from kernel.pipeline import load_pipeline

    spec = load_pipeline("examples/contract-review.yaml")
    handle = await start_pipeline(
        client, spec, {"contract_pdf": PDF, "question": "Is liability capped?"}, task_queue=task_queue
    )
    result = await handle.result()
    assert result.status == "completed"
    assert result.outputs["review"] == "Simulated reply from o4-mini: Is liability capped?"
    assert json.loads(result.outputs["dropped"]) == [
        "dropped temperature: model openai/o4-mini refuses 'temperature'"
    ]
