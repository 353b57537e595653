"""The baselines: minimal hand-written workflows, as small as Temporal allows.

``BenchMinimalWorkflow`` calls one activity (or local activity) that posts the chat request with raw
httpx; ``BenchWaitingWorkflow`` waits for a signal. Both use the same activity timeouts and retry
policy as a default pipeline step, so the only difference measured is Kernelflow's own machinery.
"""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RetryPolicy

__all__ = [
    "MINIMAL_ACTIVITY",
    "BenchMinimalWorkflow",
    "BenchWaitingWorkflow",
    "MinimalRequest",
    "WaitingRequest",
]

MINIMAL_ACTIVITY = "bench_raw_chat"
_TIMEOUT = timedelta(seconds=120)
_HEARTBEAT = timedelta(seconds=8)  # what a default pipeline step uses (defaults version 2)
_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0, maximum_attempts=4)


class MinimalRequest(BaseModel):
    model: str
    messages: list[dict[str, str]]
    local_activity: bool = False


class WaitingRequest(BaseModel):
    note: str = ""


@workflow.defn(name="BenchMinimalWorkflow")
class BenchMinimalWorkflow:
    @workflow.run
    async def run(self, request: MinimalRequest) -> str:
        if request.local_activity:
            text: str = await workflow.execute_local_activity(
                MINIMAL_ACTIVITY,
                request,
                result_type=str,
                start_to_close_timeout=_TIMEOUT,
                retry_policy=_RETRY,
            )
            return text
        text = await workflow.execute_activity(
            MINIMAL_ACTIVITY,
            request,
            result_type=str,
            start_to_close_timeout=_TIMEOUT,
            heartbeat_timeout=_HEARTBEAT,
            retry_policy=_RETRY,
        )
        return text


@workflow.defn(name="BenchWaitingWorkflow")
class BenchWaitingWorkflow:
    def __init__(self) -> None:
        self._approved = False

    @workflow.signal(name="approve")
    def approve(self) -> None:
        self._approved = True

    @workflow.query(name="waiting")
    def waiting(self) -> bool:
        return not self._approved

    @workflow.run
    async def run(self, request: WaitingRequest) -> str:
        await workflow.wait_condition(lambda: self._approved)
        return "approved"
