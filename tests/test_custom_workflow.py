"""A user's own workflow calling Kernelflow's models, on a real server with the simulator."""

from __future__ import annotations

import uuid

from temporalio.client import Client

from examples.custom_workflow import NegotiateClause, NegotiationInput, NegotiationResult
from kernel.registry import Registry
from simulator.server import SimulatorServer
from worker.app import build_worker
from workflows.pipeline import PipelineWorkflow


async def _negotiate(client: Client, registry: Registry, request: NegotiationInput) -> NegotiationResult:
    queue = f"custom-{uuid.uuid4().hex[:8]}"
    worker = build_worker(client, task_queue=queue, registry=registry, extra_workflows=[NegotiateClause])
    async with worker:
        return await client.execute_workflow(
            NegotiateClause.run, request, id=f"negotiate-{uuid.uuid4().hex[:8]}", task_queue=queue
        )


async def test_negotiation_runs_every_round_over_one_growing_conversation(
    client: Client, registry: Registry, sim: SimulatorServer
) -> None:
    result = await _negotiate(
        client, registry, NegotiationInput(clause="Liability is capped at fees paid.", max_rounds=3)
    )

    assert not result.agreed and result.rounds == 3
    assert [(t.round, t.party) for t in result.turns] == [
        (1, "buyer"),
        (1, "seller"),
        (2, "buyer"),
        (2, "seller"),
        (3, "buyer"),
        (3, "seller"),
    ]
    assert result.turns[0].model == "openai/gpt-4o" and result.turns[1].model == "openai/gpt-4o-mini"
    assert result.turns[0].text.startswith("Simulated reply from gpt-4o: Buyer, round 1")
    assert "Liability is capped" in result.turns[0].text
    assert result.usage.total_tokens > 0 and result.cost_usd > 0
    assert sim.stats()["requests"] == 6


async def test_fallback_model_answers_and_agreement_ends_the_loop(
    client: Client, registry: Registry, sim: SimulatorServer
) -> None:
    clause = (
        "Liability is capped at fees paid. [[sim: fault=400 model=gpt-4o]] "
        '[[sim: model=gpt-4o-mini reply="AGREED: liability capped at twice the fees paid."]]'
    )
    result = await _negotiate(client, registry, NegotiationInput(clause=clause, max_rounds=4))

    assert result.agreed and result.rounds == 1
    assert result.final_text == "AGREED: liability capped at twice the fees paid."
    assert [t.model for t in result.turns] == ["openai/gpt-4o-mini", "openai/gpt-4o-mini"]
    assert sim.stats()["by_model"] == {"gpt-4o": 1, "gpt-4o-mini": 2}


async def test_user_workflow_shares_the_worker_with_pipelines(
    client: Client, registry: Registry, sim: SimulatorServer
) -> None:
    queue = f"shared-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry, extra_workflows=[NegotiateClause]):
        negotiation = await client.start_workflow(
            NegotiateClause.run,
            NegotiationInput(clause="Payment within 30 days.", max_rounds=1),
            id=f"negotiate-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
        )
        pipeline = await client.start_workflow(
            PipelineWorkflow.run,
            {
                "pipeline": {
                    "name": "side-by-side",
                    "steps": [{"id": "a", "model": "openai/gpt-4o-mini", "prompt": "hello"}],
                },
            },
            id=f"pipeline-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
        )
        negotiated = await negotiation.result()
        piped = await pipeline.result()
    assert negotiated.rounds == 1 and piped.status == "completed"
