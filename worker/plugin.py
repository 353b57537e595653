"""Kernelflow as one Temporal plugin: add it to a client (and so to every worker made from that client)
or to a worker, and it brings Kernelflow's data converter, sandbox pass-through, activities and
``PipelineWorkflow``, composing with what is already there::

    client = await Client.connect("localhost:7233", plugins=[KernelflowPlugin(registry=registry)])
    worker = Worker(client, task_queue="my-queue", workflows=[MyWorkflow], activities=[my_activity])

What it composes with:
- the data converter: Kernelflow needs pydantic payload conversion and its payload storage; a
  converter that already converts with pydantic keeps its class, and its codec, failure converter and
  external storage are kept (a user's own external storage then serves Kernelflow's large payloads).
- the workflow runner: a sandboxed runner keeps its restrictions and gains Kernelflow's pass-through
  modules (each with its reason below); an unsandboxed runner stays unsandboxed.
- workflows and activities: appended to the user's own.

A client-only use (``kernelflow run``, a business system starting pipelines) needs no registry: the
plugin then only sets the data converter, and adds ``PipelineWorkflow`` for replayers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import DataConverter, DefaultFailureConverter, DefaultPayloadConverter
from temporalio.plugin import SimplePlugin
from temporalio.worker import WorkerConfig, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.batch import BatchActivities
from activities.batcher import BatcherActivities
from activities.embed import EmbedActivities
from activities.events import EventPublisher, publish_events_unconfigured
from activities.limits import LimitsActivities
from activities.live import LiveProviders
from activities.llm import LlmActivities
from activities.mcp import McpActivities, McpServerConfig
from activities.shadow import ShadowActivities
from activities.tool import ToolActivities
from kernel.errors import KernelflowError
from kernel.limits import LimitsConfig
from kernel.model_checks import batch_mode_problem
from kernel.pricing import PriceTable
from kernel.registry import Registry
from kernel.routing import BreakerBoard
from kernel.shadow_rules import ShadowConfig
from worker.codec import ChainedCodec
from worker.config import PayloadSettings, payload_settings_from_env
from worker.pipelines import PipelineCatalog
from worker.shadow_worker import StoreWriter, check_shadow_rules, shadow_store_url
from worker.storage import build_data_converter
from workflows.batcher import BatcherWorkflow, BatchRunWorkflow
from workflows.engine.checks import install_model_check, install_spec_check
from workflows.engine.shadow import install_shadow
from workflows.limiter import LimiterWorkflow, install_limits
from workflows.pipeline import PipelineWorkflow
from workflows.shadow_budget import ShadowBudgetWorkflow

__all__ = ["PASSTHROUGH_MODULES", "PLUGIN_NAME", "KernelflowPlugin", "kernelflow_converter", "sandbox_runner"]

PLUGIN_NAME = "kernelflow"

PASSTHROUGH_MODULES: dict[str, str] = {
    "pydantic": "payload models; re-importing pydantic per workflow costs memory and time",
    "pydantic_core": "pydantic's compiled core",
    "jinja2": "templates and expressions (a sandboxed environment of its own, no I/O)",
    "markupsafe": "jinja2's escaping",
    "yaml": "registered pipelines are parsed from YAML",
    "structlog": "logging configuration is process-wide",
    "httpx": "imported by activity modules the workflows reference by name",
    "kernel": "the pure kernel: contracts, step kinds and their table, the interpreter (deterministic)",
    "activities": "activity input and result models (the activities themselves run outside the sandbox)",
    "workflows.calls": "deterministic model-call helper shared with users' workflows",
    "workflows.engine.effects": "the interpreter's Temporal effects (deterministic)",
    "workflows.engine.checks": "the worker's model check read by update validators (never on replay)",
    "workflows.engine.outbox": "the lifecycle events' outbox (deterministic; per-run state lives in instances)",
    "workflows.limiter": "the limiter workflow's models and the worker's limits switch (same on every worker)",
    "workflows.engine.shadow": "shadow decisions and the worker's shadow rules (each decision is recorded in "
    "the history, so replay does not read the rules)",
    "workflows.shadow_budget": "the shadow budget workflow's models",
    "workflows.batcher": "the batcher's names and payload models, read by the pipeline's effects (deterministic)",
    "workflows.contract": "names and payload models of the public surface",
    "workflows.search_attributes": "search attribute keys",
    "workflows.api": "code-defined workflows' helpers",
    "workflows.conversation": "the conversation workflow's models",
    "kernelflow": "the public facade users' workflows import chat and Conversation from",
    "workflows": "the package itself, whose __init__ would otherwise be re-run in every sandbox",
    "workflows.pipeline": "PipelineWorkflow itself: re-importing its module into every run's sandbox cost "
    "most of a waiting pipeline's memory and of a workflow task's latency; its determinism rests on the "
    "kernel's purity and the replayed histories, like the passed-through engine it drives",
    "opentelemetry": "tracing context carried through workflows by the SDK's tracing interceptor",
}
"""Modules shared with the host instead of re-imported into every workflow's sandbox, and why each
is safe to share. The workflow class module itself (``workflows.pipeline``) stays sandboxed."""


def _mcp_activities(mcp: McpActivities) -> list[Callable[..., Any]]:
    return [mcp.list_tools, mcp.call_tool]


def sandbox_runner(existing: WorkflowRunner | None = None) -> WorkflowRunner:
    """``existing`` with Kernelflow's pass-through modules added (a new sandboxed runner if none)."""
    if existing is None:
        return SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH_MODULES)
        )
    if isinstance(existing, SandboxedWorkflowRunner):
        return dataclasses.replace(
            existing, restrictions=existing.restrictions.with_passthrough_modules(*PASSTHROUGH_MODULES)
        )
    return existing


def kernelflow_converter(
    existing: DataConverter | None = None, *, payloads: PayloadSettings | None = None
) -> DataConverter:
    """Kernelflow's converter, or ``existing`` made able to carry Kernelflow's payloads."""
    ours = build_data_converter(payloads if payloads is not None else payload_settings_from_env())
    if existing is None or existing == DataConverter.default:
        return ours
    converter_class = existing.payload_converter_class
    if converter_class is DefaultPayloadConverter:
        converter_class = ours.payload_converter_class
    elif not issubclass(converter_class, PydanticPayloadConverter):
        raise KernelflowError(
            f"the client's payload converter {converter_class.__qualname__} does not convert pydantic "
            "models; Kernelflow's payloads need temporalio.contrib.pydantic's PydanticPayloadConverter "
            "(or a subclass of it)"
        )
    codec = existing.payload_codec or ours.payload_codec
    if (
        existing.payload_codec is not None
        and ours.payload_codec is not None
        and getattr(ours.payload_codec, "encrypting", False)
        and not getattr(existing.payload_codec, "encrypting", False)  # not ours, nor already chained
    ):
        # The user's codec runs first, Kernelflow's encryption last.
        codec = ChainedCodec(existing.payload_codec, ours.payload_codec)
    failure_class = existing.failure_converter_class
    if failure_class is DefaultFailureConverter:
        # With encryption on, failure messages (which may quote a prompt) are encrypted too.
        failure_class = ours.failure_converter_class
    return dataclasses.replace(
        existing,
        payload_converter_class=converter_class,
        external_storage=existing.external_storage or ours.external_storage,
        payload_codec=codec,
        failure_converter_class=failure_class,
    )


class KernelflowPlugin(SimplePlugin):
    """Adds Kernelflow to a Temporal client and its workers.

    With ``registry`` (or ``providers``), workers get the activities (``llm_chat``, ``llm_embed``,
    ``http_tool``, ``load_pipeline``, ``publish_events`` on ``events``' broker, or a refusal without
    one) and update validators check reroute targets against it.
    ``payloads`` must match on the client and every worker (default: the environment's
    ``KERNELFLOW_PAYLOADS_*`` / ``payloads:`` settings).
    """

    def __init__(
        self,
        *,
        registry: Registry | None = None,
        providers: LiveProviders | None = None,
        prices: PriceTable | None = None,
        breakers: BreakerBoard | None = None,
        payloads: PayloadSettings | None = None,
        pipelines: PipelineCatalog | None = None,
        tool_allow: Sequence[str] = (),
        mcp_servers: Mapping[str, McpServerConfig] | None = None,
        chat: LlmActivities | None = None,
        extra_activities: Sequence[Callable[..., Any]] = (),
        events: EventPublisher | None = None,
        limits: LimitsConfig | None = None,
        shadow: ShadowConfig | None = None,
    ) -> None:
        if chat is not None:
            providers = chat.live
        elif providers is None and registry is not None:
            providers = LiveProviders(registry, prices=prices, breakers=breakers)
        self.providers = providers
        self.payloads = payloads
        self.limits = limits
        self.limits_activities: LimitsActivities | None = None
        self.shadow = shadow
        self.shadow_activities: ShadowActivities | None = None
        activities: list[Callable[..., Any]] | None = None
        if providers is not None:
            chat = chat or LlmActivities(live=providers)
            activities = [
                chat.chat,
                EmbedActivities(live=providers).embed,
                ToolActivities(tool_allow).call,
                *_mcp_activities(McpActivities(mcp_servers)),
                (pipelines or PipelineCatalog()).load,
                events.publish_events if events is not None else publish_events_unconfigured,
                *BatchActivities(providers).all(),
                *BatcherActivities().all(),
                *extra_activities,
            ]
            self.limits_activities = LimitsActivities(limits or LimitsConfig(), providers)
            activities.append(self.limits_activities.acquire)
            self.shadow_activities = ShadowActivities(
                providers,
                shadow or ShadowConfig(),
                StoreWriter(shadow_store_url(shadow)),
                limits=self.limits_activities,
            )
            activities += [self.shadow_activities.chat, self.shadow_activities.rules]
            chat.rate_limited = self.limits_activities.back_off  # a no-op for keys without a limit
        self.chat_activities = chat
        super().__init__(
            PLUGIN_NAME,
            data_converter=lambda existing: kernelflow_converter(existing, payloads=payloads),
            workflows=[
                PipelineWorkflow,
                LimiterWorkflow,
                ShadowBudgetWorkflow,
                BatcherWorkflow,
                BatchRunWorkflow,
            ],
            activities=activities,
            workflow_runner=sandbox_runner,
        )

    def configure_worker(self, config: WorkerConfig) -> WorkerConfig:
        config = super().configure_worker(config)
        if self.providers is not None:  # a client's plugin (no providers) leaves the switch alone
            install_model_check(self._model_problem)
            registry = self.providers.registry
            install_spec_check(lambda spec: batch_mode_problem(spec, registry))
            install_limits(_limits_on(self.limits))
            if self.shadow is not None:
                check_shadow_rules(self.shadow, self.providers.registry)
            install_shadow(self.shadow)
            client = config.get("client")
            if self.shadow_activities is not None and client is not None:
                writer = self.shadow_activities.record
                if isinstance(writer, StoreWriter):
                    writer.codec = client.data_converter.payload_codec
        return config

    def set_limits(self, limits: LimitsConfig) -> None:
        """A reloaded config's ``limits``: calls that ask for admission from now on use them."""
        self.limits = limits
        if self.limits_activities is not None:
            self.limits_activities.limits = limits
            install_limits(_limits_on(limits))

    def _model_problem(self, model: str) -> str | None:
        """Why this worker cannot call ``model`` (unknown provider or alias), or None."""
        if self.providers is None:
            return None
        try:
            self.providers.registry.resolve_ref(model)
        except KernelflowError as exc:
            return str(exc)
        return None


def _limits_on(limits: LimitsConfig | None) -> bool:
    return bool(limits is not None and (limits.models or limits.tenants))
