"""What a worker process measures and traces, assembled from its settings.

Metrics (``worker.metrics``) are always recorded on the runtime's meter; they leave the process only
when the runtime exports them (``--metrics-port``). Tracing (``KERNELFLOW_TRACING=1``) uses the
SDK's OpenTelemetry integration: the client's start, the workflow and its activities are spans of
one trace, carried across workers and restarts in Temporal headers; each model call adds a span with
the GenAI attributes (``worker.tracing``). The exporter is OTLP, configured by the standard
``OTEL_*`` variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``,
``OTEL_SERVICE_NAME``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from temporalio.client import Client
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.runtime import Runtime

from worker.config import WorkerSettings
from worker.metrics import KernelflowMetrics, MetricsInterceptor

__all__ = ["Observability"]


class Observability:
    def __init__(
        self,
        metrics: KernelflowMetrics,
        *,
        tracing: Any = None,
        watch_approvals: bool = True,
        approvals_every: float = 15.0,
    ) -> None:
        self.metrics = metrics
        self.approvals_every = approvals_every
        self.tracing = tracing
        self.watch_approvals = watch_approvals
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_settings(cls, settings: WorkerSettings, runtime: Runtime) -> Observability:
        tracing = None
        if settings.tracing:
            from worker.tracing import Tracing

            tracing = Tracing.from_environment(record_content=settings.trace_content)
        return cls(
            KernelflowMetrics(runtime.metric_meter, labels=settings.metrics_labels),
            tracing=tracing,
            watch_approvals=settings.metrics_port is not None,
            approvals_every=settings.approvals_poll_s,
        )

    def interceptors(self) -> list[ClientInterceptor]:
        """Client interceptors that are worker interceptors too (the worker takes them from the
        client): tracing outermost, so a model call's span and metrics sit inside its activity span."""
        found: list[ClientInterceptor] = []
        if self.tracing is not None:
            found.extend(self.tracing.interceptors())
        found.append(MetricsInterceptor(self.metrics))
        return found

    def start(self, client: Client) -> None:
        if self.watch_approvals:
            self._tasks.append(
                asyncio.create_task(self.metrics.watch_approvals(client, every=self.approvals_every))
            )

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.tracing is not None:
            with contextlib.suppress(Exception):
                self.tracing.shutdown()
