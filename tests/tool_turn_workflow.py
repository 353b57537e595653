"""A user's workflow with a tool loop: ask, run the tool the model called, answer it, ask again.

Used by ``tests/test_provider_state_e2e.py``: the assistant turn that called the tool travels through
workflow history (as an activity result, then inside the next activity's input), so whatever state
the provider attached to it must survive that round trip."""

from __future__ import annotations

from pydantic import BaseModel
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from kernel.contracts import ToolMessage
    from workflows import api as kernelflow

__all__ = ["ToolTurnInput", "ToolTurnResult", "ToolTurnWorkflow"]

_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class ToolTurnInput(BaseModel):
    model: str
    question: str
    stream: bool = False


class ToolTurnResult(BaseModel):
    called: str
    answer: str
    signed: bool


@workflow.defn(name="KernelflowTestToolTurn")
class ToolTurnWorkflow:
    @workflow.run
    async def run(self, request: ToolTurnInput) -> ToolTurnResult:
        conversation = kernelflow.Conversation()
        first = await conversation.ask(request.question, models=request.model, tools=[_WEATHER], timeout_s=30)
        call = first.tool_calls[0]
        state = first.message.provider_state
        conversation.add(ToolMessage(tool_call_id=call.id, content='{"temp_c": 4}'))
        second = await kernelflow.chat(
            models=request.model, messages=conversation.messages, tools=[_WEATHER], timeout_s=30
        )
        return ToolTurnResult(called=call.function.name, answer=second.text, signed=state is not None)
