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
from collections.abc import AsyncIterator
from typing import Any

from temporalio.client import Client
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.runtime import Runtime

from activities.llm import LlmActivities
from kernel.registry import Registry
from worker.config import KernelflowConfig, WorkerSettings
from worker.metrics import KernelflowMetrics, MetricsInterceptor

__all__ = ["DevObservability", "Observability"]


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


class DevObservability:
    """``kernelflow dev``'s metrics and health port (on a free port when ``metrics_port`` is taken)."""

    def __init__(self, settings: WorkerSettings, *, metrics_port: int) -> None:
        from worker.devserver import free_port
        from worker.telemetry import build_runtime

        self.port = free_port(metrics_port)
        self.sdk_metrics = f"127.0.0.1:{free_port()}"
        self.runtime = build_runtime(metrics_bind=self.sdk_metrics)
        self.task_queue = settings.task_queue
        self.observability = Observability.from_settings(
            settings.model_copy(update={"metrics_port": self.port}), self.runtime
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def interceptors(self) -> list[ClientInterceptor]:
        return self.observability.interceptors()

    def activities(self, registry: Registry, config: KernelflowConfig) -> LlmActivities:
        from worker.app import _prices, default_breakers

        metrics = self.observability.metrics
        activities = LlmActivities(
            registry,
            prices=_prices(config),
            breakers=default_breakers(config, observer=metrics.breaker_changed),
        )
        activities.observer = metrics
        return activities

    @contextlib.asynccontextmanager
    async def serving(self, client: Client) -> AsyncIterator[None]:
        from worker.health import HealthServer, Readiness

        health = HealthServer(
            host="127.0.0.1",
            port=self.port,
            sdk_metrics_url=f"http://{self.sdk_metrics}/metrics",
            readiness=Readiness(),
            client=client,
            task_queue=self.task_queue,
        )
        await health.start()
        self.observability.start(client)
        try:
            yield
        finally:
            await self.observability.aclose()
            await health.stop()
