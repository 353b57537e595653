"""A workflow of your own that calls Kernelflow's models: two parties negotiate a contract clause.

The buyer's counsel and the seller's counsel take turns over one shared conversation until the
seller answers with ``AGREED`` or the rounds run out. Every turn is a Kernelflow model call with
fallbacks and Temporal retries (``workflows.api``), so a crashed worker resumes after the last
answered turn and nothing answered is paid for twice.

Run it on a worker next to Kernelflow's own workflows::

    worker = build_worker(client, task_queue="kernelflow", registry=registry,
                          extra_workflows=[NegotiateClause])
    result = await client.execute_workflow(
        NegotiateClause.run, NegotiationInput(clause="Liability is capped at fees paid."),
        id="negotiate-1", task_queue="kernelflow")
"""

from __future__ import annotations

from pydantic import BaseModel, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    import kernelflow
    from kernelflow import Usage

__all__ = ["NEGOTIATE_CLAUSE", "NegotiateClause", "NegotiationInput", "NegotiationResult", "Turn"]

NEGOTIATE_CLAUSE = "NegotiateClause"


class NegotiationInput(BaseModel):
    clause: str
    buyer_models: list[str] = Field(default_factory=lambda: ["openai/gpt-4o", "openai/gpt-4o-mini"])
    seller_models: list[str] = Field(default_factory=lambda: ["openai/gpt-4o-mini"])
    max_rounds: int = Field(default=4, ge=1, le=50)
    timeout_s: float = Field(default=60.0, gt=0)


class Turn(BaseModel):
    round: int
    party: str
    model: str
    text: str


class NegotiationResult(BaseModel):
    agreed: bool
    rounds: int
    turns: list[Turn]
    final_text: str
    usage: Usage
    cost_usd: float


@workflow.defn(name=NEGOTIATE_CLAUSE)
class NegotiateClause:
    def __init__(self) -> None:
        self._turns: list[Turn] = []

    @workflow.query(name="turns")
    def turns(self) -> list[Turn]:
        return self._turns

    @workflow.run
    async def run(self, request: NegotiationInput) -> NegotiationResult:
        talk = kernelflow.Conversation(
            system="Two lawyers negotiate one contract clause. Reply with a revised clause; "
            "the seller starts the reply with AGREED when the clause is acceptable."
        )
        proposal = request.clause
        agreed = False
        for number in range(1, request.max_rounds + 1):
            workflow.set_current_details(f"round {number}/{request.max_rounds}")
            buyer = await talk.ask(
                f"Buyer, round {number}: propose a revision of: {proposal}",
                models=request.buyer_models,
                timeout_s=request.timeout_s,
                label=f"round {number} buyer",
            )
            self._turns.append(Turn(round=number, party="buyer", model=buyer.model, text=buyer.text))
            seller = await talk.ask(
                f"Seller, round {number}: accept (start with AGREED) or counter: {buyer.text}",
                models=request.seller_models,
                timeout_s=request.timeout_s,
                label=f"round {number} seller",
            )
            self._turns.append(Turn(round=number, party="seller", model=seller.model, text=seller.text))
            proposal = seller.text
            if seller.text.lstrip().startswith("AGREED"):
                agreed = True
                break
        return NegotiationResult(
            agreed=agreed,
            rounds=len(self._turns) // 2,
            turns=self._turns,
            final_text=proposal,
            usage=talk.usage,
            cost_usd=talk.cost_usd,
        )
