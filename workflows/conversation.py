"""``ConversationWorkflow``: N model calls over one growing conversation, each re-sending all of it.

The workload that once ended at call 53 on Temporal's 50 MB history limit, kept as a workflow so
tests and ``bench/`` can measure history bytes with payload storage on and off. Register it on a
worker with ``build_worker(..., extra_workflows=[ConversationWorkflow])``; the workflow name is
public API and never changes.
"""

from __future__ import annotations

from pydantic import BaseModel, Field
from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from kernel.contracts import Usage
    from kernel.pipeline import RetrySpec
    from workflows.api import Conversation

__all__ = [
    "CONVERSATION_WORKFLOW",
    "ConversationInput",
    "ConversationResult",
    "ConversationWorkflow",
    "user_turn",
]

CONVERSATION_WORKFLOW = "KernelflowConversation"

_FILLER = (
    "The parties agree that delivery dates, acceptance criteria and liability caps are set out in the "
    "schedules, and that any change to them needs the written consent of both sides. "
)


def user_turn(number: int, chars: int) -> str:
    """Turn ``number``'s user text, ``chars`` long (at least its heading): deterministic filler."""
    head = f"Turn {number}: please review the next paragraph. "
    body = (_FILLER * (chars // len(_FILLER) + 1))[: max(chars - len(head), 0)]
    return head + body


class ConversationInput(BaseModel):
    models: list[str] = Field(min_length=1, description="Tried in order on every call.")
    calls: int = Field(default=200, ge=1, le=10_000)
    user_turn_chars: int = Field(default=1800, ge=1, description="Length of each user turn.")
    system: str = "You are reviewing a contract, one paragraph at a time."
    timeout_s: float = Field(default=60.0, gt=0)
    retry: RetrySpec = Field(default_factory=RetrySpec)


class ConversationResult(BaseModel):
    calls: int
    messages: int
    chars: int = Field(description="Final conversation length in characters (~4 per token).")
    request_chars: list[int] = Field(description="Conversation length sent with each call, in order.")
    models: list[str] = Field(description="The model that answered each call, in order.")
    last_reply: str
    usage: Usage


@workflow.defn(name=CONVERSATION_WORKFLOW)
class ConversationWorkflow:
    def __init__(self) -> None:
        self._done = 0

    @workflow.query(name="progress")
    def progress(self) -> int:
        return self._done

    @workflow.run
    async def run(self, request: ConversationInput) -> ConversationResult:
        conversation = Conversation(system=request.system)
        sent: list[int] = []
        answered_by: list[str] = []
        reply = ""
        for number in range(1, request.calls + 1):
            text = user_turn(number, request.user_turn_chars)
            sent.append(conversation.chars + len(text))
            result = await conversation.ask(
                text,
                models=request.models,
                timeout_s=request.timeout_s,
                retry=request.retry,
                label=f"turn {number}",
            )
            answered_by.append(result.model)
            reply = result.text
            self._done = number
        return ConversationResult(
            calls=request.calls,
            messages=len(conversation.messages),
            chars=conversation.chars,
            request_chars=sent,
            models=answered_by,
            last_reply=reply,
            usage=conversation.usage,
        )
