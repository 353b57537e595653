"""Composition: a Temporal client with the pydantic converter and payload storage, the provider
registry, and the worker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import structlog
from temporalio.client import Client, Interceptor
from temporalio.runtime import Runtime
from temporalio.worker import Worker, WorkflowRunner

from activities.events import EventPublisher
from activities.llm import LlmActivities
from activities.mcp import mcp_servers_from_env
from activities.tool import parse_allow_list
from kernel.limits import LimitsConfig
from kernel.pricing import PriceTable
from kernel.provider import ProviderSettings
from kernel.registry import Registry
from kernel.routing import BreakerBoard, BreakerState, BreakerStatus
from kernel.shadow_rules import ShadowConfig
from worker.config import (
    ConfigWatcher,
    KernelflowConfig,
    PayloadSettings,
    WorkerSettings,
    describe_payload_store,
    load_config,
    payload_settings,
    payload_settings_from_env,
)
from worker.devkeys import check_encryption, log_encryption_state
from worker.devserver import free_port
from worker.pipelines import PipelineCatalog, load_catalog, pipelines_dir
from worker.plugin import KernelflowPlugin, sandbox_runner
from worker.redaction import redact_error_logs
from worker.search_attributes import ensure_search_attributes
from worker.storage import build_data_converter
from worker.telemetry import build_runtime

__all__ = [
    "SIMULATED_PROVIDERS",
    "ConfigReloader",
    "build_registry",
    "build_worker",
    "connect",
    "run_worker",
    "simulator_settings",
    "workflow_runner",
]

_log = structlog.get_logger("kernelflow.worker")

SIMULATED_PROVIDERS: dict[str, str] = {
    "openai": "/v1",
    "anthropic": "",
    "gemini": "",
    "azure_openai": "",
    "mistral": "/v1",
    "ollama": "",
    "bedrock": "",
    **{
        preset: "/v1"
        for preset in ("groq", "together", "deepseek", "openrouter", "fireworks", "xai", "vllm", "lmstudio")
    },
}
"""Built-in providers the simulator speaks, with the path their base URL needs."""
_SIMULATED_OPTIONS: dict[str, dict[str, Any]] = {"bedrock": {"region": "us-east-1"}}
"""Settings options a simulated provider needs besides its URL and key. Bedrock signs with the AWS
keys of the environment (any well-formed signature passes the simulator) and needs a region."""


async def connect(
    address: str,
    namespace: str = "default",
    *,
    payloads: PayloadSettings | None = None,
    runtime: Runtime | None = None,
    interceptors: Sequence[Interceptor] = (),
) -> Client:
    """A client with Kernelflow's converter. ``payloads`` defaults to the ``payloads:`` section of
    ``KERNELFLOW_CONFIG`` (what ``run_worker`` uses), so clients and workers store payloads alike."""
    settings = payloads if payloads is not None else payload_settings_from_env()
    return await Client.connect(
        address,
        namespace=namespace,
        data_converter=build_data_converter(settings),
        runtime=runtime,
        interceptors=interceptors,
    )


def simulator_settings(simulator_url: str) -> dict[str, ProviderSettings]:
    """Provider settings that point every simulated provider at a simulator, with placeholder keys."""
    return {
        name: ProviderSettings(
            base_url=simulator_url.rstrip("/") + path,
            api_key="sim-key",
            options=dict(_SIMULATED_OPTIONS.get(name, {})),
        )
        for name, path in SIMULATED_PROVIDERS.items()
    }


def build_registry(
    config: KernelflowConfig | None = None,
    *,
    provider_settings: Mapping[str, ProviderSettings] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Registry:
    """A registry with every plugin of the entry-point group, configured from ``config``;
    ``provider_settings`` override the config's (used to point providers at the simulator)."""
    config = config or KernelflowConfig()
    settings = {**config.providers, **(provider_settings or {})}
    registry = Registry(settings=settings, aliases=config.aliases, environ=environ)
    registry.load_entry_points()
    if config.presets:
        from providers.presets import user_presets

        for cls in user_presets(config.presets):
            registry.register(cls, source="user preset from config")
    return registry


def workflow_runner() -> WorkflowRunner:
    """The workflow sandbox every worker uses (and the replay tests replay with)."""
    return sandbox_runner()


def build_worker(
    client: Client,
    *,
    task_queue: str,
    registry: Registry | None = None,
    prices: PriceTable | None = None,
    max_concurrent_activities: int = 200,
    max_concurrent_workflow_tasks: int = 100,
    extra_workflows: Sequence[type] = (),
    extra_activities: Sequence[Any] = (),
    activity_executor: ThreadPoolExecutor | None = None,
    breakers: BreakerBoard | None = None,
    llm_activities: LlmActivities | None = None,
    payloads: PayloadSettings | None = None,
    max_cached_workflows: int = 1000,
    pipelines: PipelineCatalog | None = None,
    tool_allow: Sequence[str] = (),
    graceful_shutdown_s: float = 20.0,
    mcp_servers: Mapping[str, Any] | None = None,
    events: EventPublisher | None = None,
    limits: LimitsConfig | None = None,
    shadow: ShadowConfig | None = None,
) -> Worker:
    """A worker on ``task_queue`` with ``KernelflowPlugin``. It converts payloads with ``client``'s
    converter, or with one built from ``payloads`` when given (which must match the clients')."""
    if llm_activities is None:
        if registry is None:
            raise ValueError("build_worker needs a registry or llm_activities")
        llm_activities = LlmActivities(
            registry, prices=prices, breakers=breakers if breakers is not None else default_breakers()
        )
    if payloads is not None:
        config = client.config()
        config["data_converter"] = build_data_converter(payloads)
        client = Client(**config)
    if events is not None and events.data_converter is None:
        events.data_converter = client.data_converter  # opted-in event content is encoded like payloads
    plugin = KernelflowPlugin(
        chat=llm_activities,
        pipelines=pipelines,
        tool_allow=tool_allow,
        mcp_servers=mcp_servers,
        extra_activities=extra_activities,
        events=events,
        limits=limits,
        shadow=shadow,
    )
    return Worker(
        client,
        task_queue=task_queue,
        workflows=list(extra_workflows),
        activity_executor=activity_executor,
        plugins=[plugin],
        max_concurrent_activities=max_concurrent_activities,
        max_concurrent_workflow_tasks=max_concurrent_workflow_tasks,
        graceful_shutdown_timeout=timedelta(seconds=graceful_shutdown_s),
        max_cached_workflows=max_cached_workflows,
    )


def event_publisher(config: KernelflowConfig, *, broker_url: str | None = None) -> EventPublisher | None:
    """The ``publish_events`` activity's publisher when the config has an ``events:`` section (the
    broker is connected at the first publication)."""
    if config.events is None and broker_url is None:
        return None
    from brokers import broker_for_url
    from kernel.triggers import EventsConfig

    events = config.events or EventsConfig()
    return EventPublisher(broker_for_url(broker_url or events.broker), events.outbound, close_broker=True)


def default_breakers(
    config: KernelflowConfig | None = None,
    *,
    observer: Callable[[BreakerStatus, BreakerState], None] | None = None,
) -> BreakerBoard:
    """The worker's circuit breakers, with the config's thresholds, logging every transition (and
    telling ``observer``, the breaker-state metric)."""
    settings = config.routing.breaker if config is not None else None
    if observer is None:
        return BreakerBoard(settings, listener=_log_breaker)

    def both(status: BreakerStatus, left: BreakerState) -> None:
        _log_breaker(status, left)
        observer(status, left)

    return BreakerBoard(settings, listener=both)


def _log_breaker(status: BreakerStatus, left: BreakerState) -> None:
    if status.state == "open":
        _log.warning(
            "circuit opened: calls to the model are refused",
            model=status.key,
            reason=status.reason,
            open_until=status.open_until,
            was=left,
        )
    elif status.state == "half_open":
        _log.info("circuit half-open: one probe call goes through", model=status.key)
    else:
        _log.info("circuit closed: the model answers again", model=status.key)


def _prices(config: KernelflowConfig) -> PriceTable:
    return PriceTable().with_overrides({p: dict(m) for p, m in config.prices.items()})


class ConfigReloader:
    """Applies a reloaded config file to a running worker's activities: a new registry (aliases,
    providers, presets), prices and breaker thresholds, for every call that starts afterwards,
    including the next steps of pipelines already running. Calls in flight finish on the registry they
    started with; it is closed ``retire_after`` seconds later (or at shutdown)."""

    def __init__(
        self,
        activities: LlmActivities,
        *,
        provider_settings: Mapping[str, ProviderSettings] | None = None,
        environ: Mapping[str, str] | None = None,
        registry_factory: Callable[[KernelflowConfig], Registry] | None = None,
        retire_after: float = 900.0,
        set_limits: Callable[[LimitsConfig], None] | None = None,
    ) -> None:
        self.activities = activities
        self.set_limits = set_limits
        self.retire_after = retire_after
        self._factory = registry_factory or (
            lambda config: build_registry(config, provider_settings=provider_settings, environ=environ)
        )
        self._retiring: set[asyncio.Task[None]] = set()

    async def apply(self, config: KernelflowConfig) -> None:
        """Raises ``ConfigurationError`` (the running set-up is then unchanged) for a broken preset."""
        registry = self._factory(config)
        retired, self.activities.registry = self.activities.registry, registry
        self.activities.prices = _prices(config)
        if self.activities.breakers is not None:
            self.activities.breakers.configure(config.routing.breaker)
        if self.set_limits is not None:
            self.set_limits(config.limits)
        task = asyncio.create_task(self._retire(retired))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, registry: Registry) -> None:
        try:
            await asyncio.sleep(self.retire_after)
        finally:
            await registry.aclose()

    async def aclose(self) -> None:
        """Close every retired registry now."""
        tasks = list(self._retiring)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_worker(
    settings: WorkerSettings, *, provider_settings: Mapping[str, ProviderSettings] | None = None
) -> None:
    """Run until SIGTERM or SIGINT, then drain: stop polling, let in-flight activities finish within
    ``settings.shutdown_grace_s`` (then cancel them), and exit."""
    from worker.connection import open_client, resolve_connection
    from worker.health import HealthServer, Readiness
    from worker.observability import Observability

    config = load_config(settings.config_file)
    connection = resolve_connection(settings)
    payloads = payload_settings(config)
    sdk_metrics = f"127.0.0.1:{free_port()}" if settings.metrics_port is not None else None
    runtime = build_runtime(metrics_bind=sdk_metrics)
    observability = Observability.from_settings(settings, runtime)
    registry = build_registry(config, provider_settings=provider_settings)
    prices = _prices(config)
    breakers = default_breakers(config, observer=observability.metrics.breaker_changed)
    activities = LlmActivities(registry, prices=prices, breakers=breakers)
    activities.observer = observability.metrics
    if payloads.encryption.enabled and payloads.encryption.redact_logs:
        redact_error_logs()
    await check_encryption(payloads)
    log_encryption_state(payloads)
    interceptors = observability.interceptors()
    if settings.provider_queues:
        from worker.provider_queues import ProviderQueues

        interceptors.append(ProviderQueues(settings.provider_queues))
    client = await open_client(connection, payloads=payloads, runtime=runtime, interceptors=interceptors)
    added = await ensure_search_attributes(client, connection.namespace)
    if added:
        _log.info("registered search attributes", names=added, namespace=connection.namespace)
    publisher = event_publisher(config)
    worker = build_worker(
        client,
        task_queue=settings.task_queue,
        llm_activities=activities,
        events=publisher,
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        max_cached_workflows=settings.max_cached_workflows,
        graceful_shutdown_s=settings.shutdown_grace_s,
        pipelines=load_catalog(
            pipelines_dir(config.pipelines_dir),
            events_default=bool(config.events and config.events.outbound.default),
        ),
        tool_allow=[*config.tool_allow, *parse_allow_list(os.environ.get("KERNELFLOW_TOOL_ALLOWLIST"))],
        mcp_servers={**config.mcp_servers, **mcp_servers_from_env()},
        limits=config.limits,
        shadow=config.shadow,
    )
    workers = [worker, *_provider_workers(client, settings, activities)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    plugin = next(p for p in worker.config()["plugins"] if isinstance(p, KernelflowPlugin))
    reloader = ConfigReloader(activities, provider_settings=provider_settings, set_limits=plugin.set_limits)
    watching: asyncio.Task[None] | None = None
    if settings.config_file is not None:
        watcher = ConfigWatcher(settings.config_file, config, reloader.apply)
        watching = asyncio.create_task(watcher.run())
        with contextlib.suppress(NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, watcher.request_reload)
    readiness = Readiness()
    health: HealthServer | None = None
    if settings.metrics_port is not None:
        health = HealthServer(
            host=settings.metrics_host,
            port=settings.metrics_port,
            sdk_metrics_url=f"http://{sdk_metrics}/metrics",
            readiness=readiness,
            client=client,
            task_queue=settings.task_queue,
        )
        await health.start()
    observability.start(client)
    _log.info(
        "worker started",
        temporal=connection.describe(),
        namespace=connection.namespace,
        task_queue=settings.task_queue,
        providers=registry.names,
        payload_store=describe_payload_store(payloads),
        http=(
            f"http://{settings.metrics_host}:{health.bound_port} (/metrics /healthz /readyz)"
            if health is not None
            else "off (--metrics-port to serve /metrics, /healthz, /readyz)"
        ),
        tracing="OTLP (OTEL_* variables)" if settings.tracing else "off",
        provider_queues=[w.task_queue for w in workers[1:]],
    )
    try:
        async with contextlib.AsyncExitStack() as running:
            for each in workers:
                await running.enter_async_context(each)
            await stop.wait()
            readiness.draining = True
            _log.info(
                "worker draining: polling stopped, in-flight work finishing",
                grace_s=settings.shutdown_grace_s,
            )
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        await observability.aclose()
        if health is not None:
            await health.stop()
        await reloader.aclose()
        await activities.registry.aclose()
        if publisher is not None:
            await publisher.aclose()
        _log.info("worker stopped")


def _provider_workers(client: Client, settings: WorkerSettings, activities: LlmActivities) -> list[Worker]:
    """One activity-only worker per provider queue (``worker.provider_queues``), each with its own slots."""
    from worker.provider_queues import provider_queue

    return [
        Worker(
            client,
            task_queue=provider_queue(settings.task_queue, provider),
            activities=[activities.chat],
            max_concurrent_activities=settings.max_concurrent_activities,
            graceful_shutdown_timeout=timedelta(seconds=settings.shutdown_grace_s),
        )
        for provider in settings.provider_queues
    ]
