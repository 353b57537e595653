"""Composition: a Temporal client with the pydantic converter, the provider registry, and the worker."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import structlog
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.llm import LlmActivities
from kernel.pricing import PriceTable
from kernel.provider import ProviderSettings
from kernel.registry import Registry
from worker.config import KernelflowConfig, WorkerSettings, load_config
from worker.search_attributes import ensure_search_attributes
from workflows.pipeline import PipelineWorkflow

__all__ = [
    "SIMULATED_PROVIDERS",
    "build_registry",
    "build_worker",
    "connect",
    "run_worker",
    "simulator_settings",
]

_log = structlog.get_logger("kernelflow.worker")

_PASSTHROUGH = (
    "pydantic",
    "pydantic_core",
    "jinja2",
    "markupsafe",
    "yaml",
    "structlog",
    "httpx",
    "kernel",
    "activities",
)

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


async def connect(address: str, namespace: str = "default") -> Client:
    return await Client.connect(address, namespace=namespace, data_converter=pydantic_data_converter)


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


def build_worker(
    client: Client,
    *,
    task_queue: str,
    registry: Registry,
    prices: PriceTable | None = None,
    max_concurrent_activities: int = 200,
    max_concurrent_workflow_tasks: int = 100,
    extra_workflows: Sequence[type] = (),
    extra_activities: Sequence[Any] = (),
    activity_executor: ThreadPoolExecutor | None = None,
) -> Worker:
    activities = LlmActivities(registry, prices=prices)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[PipelineWorkflow, *extra_workflows],
        activities=[activities.chat, *extra_activities],
        activity_executor=activity_executor,
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*_PASSTHROUGH)
        ),
        max_concurrent_activities=max_concurrent_activities,
        max_concurrent_workflow_tasks=max_concurrent_workflow_tasks,
        graceful_shutdown_timeout=timedelta(seconds=20),
    )


async def run_worker(
    settings: WorkerSettings, *, provider_settings: Mapping[str, ProviderSettings] | None = None
) -> None:
    """Run until SIGTERM or SIGINT, then finish in-flight activities (up to the graceful timeout)."""
    config = load_config(settings.config_file)
    registry = build_registry(config, provider_settings=provider_settings)
    prices = PriceTable().with_overrides({p: dict(m) for p, m in config.prices.items()})
    client = await connect(settings.temporal_address, settings.namespace)
    added = await ensure_search_attributes(client, settings.namespace)
    if added:
        _log.info("registered search attributes", names=added, namespace=settings.namespace)
    worker = build_worker(
        client,
        task_queue=settings.task_queue,
        registry=registry,
        prices=prices,
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    _log.info(
        "worker started",
        temporal=settings.temporal_address,
        namespace=settings.namespace,
        task_queue=settings.task_queue,
        providers=registry.names,
    )
    try:
        async with worker:
            await stop.wait()
            _log.info("worker stopping: finishing in-flight work")
    finally:
        await registry.aclose()
        _log.info("worker stopped")
