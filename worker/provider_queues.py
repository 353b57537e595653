"""Separate task queues per provider, so one provider's slowness cannot take every activity slot.

With ``KERNELFLOW_PROVIDER_QUEUES=openai,anthropic`` a workflow interceptor schedules the ``llm_chat``
activities of those providers on ``<task queue>.<provider>`` (``kernelflow.openai``) instead of the
pipeline's task queue, and every worker polls each of those queues with a worker of its own, holding
only the chat activity and ``max_concurrent_activities`` slots of its own. A provider that hangs then
fills its own slots; calls to the others keep theirs. Models named through an alias, local
activities and other activities stay on the pipeline's queue.

Every worker of a task queue must use the same list: an activity scheduled on a provider queue no
worker polls waits there (until its schedule-to-close timeout). The queue of a scheduled activity is
not part of what replay checks, so changing the list affects the calls scheduled afterwards only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from temporalio import workflow
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.worker import (
    Interceptor,
    StartActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

__all__ = ["ProviderQueues", "provider_queue"]

LLM_CHAT = "llm_chat"


def provider_queue(task_queue: str, provider: str) -> str:
    return f"{task_queue}.{provider}"


class ProviderQueues(ClientInterceptor, Interceptor):
    def __init__(self, providers: Iterable[str]) -> None:
        self.providers = frozenset(providers)

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        providers = self.providers

        class _Inbound(WorkflowInboundInterceptor):
            def init(self, outbound: WorkflowOutboundInterceptor) -> None:
                super().init(_Outbound(outbound, providers))

        return _Inbound


class _Outbound(WorkflowOutboundInterceptor):
    def __init__(self, next: WorkflowOutboundInterceptor, providers: frozenset[str]) -> None:
        super().__init__(next)
        self.providers = providers

    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        if input.activity == LLM_CHAT and input.args:
            provider, sep, _ = str(getattr(input.args[0], "model", "")).partition("/")
            if sep and provider in self.providers:
                base = input.task_queue or workflow.info().task_queue
                input.task_queue = provider_queue(base, provider)
        return super().start_activity(input)
