"""Kernelflow added to a worker that already has its own converter, codec and sandbox rules, with one
plugin; and the public facade that plugin authors and client code import."""

from __future__ import annotations

import ast
import dataclasses
import uuid
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

import kernelflow
from kernel.registry import Registry
from simulator.server import SimulatorServer
from tests.user_workflows import Greeter, ZlibCodec, shout

REPO = Path(__file__).resolve().parents[1]


async def test_plugin_composes_with_the_users_converter_codec_and_sandbox(
    client: Client, registry: Registry, sim: SimulatorServer
) -> None:
    user_converter = dataclasses.replace(pydantic_data_converter, payload_codec=ZlibCodec())
    user_client = await Client.connect(
        client.service_client.config.target_host,
        namespace=client.namespace,
        data_converter=user_converter,
        plugins=[kernelflow.KernelflowPlugin(registry=registry)],
    )
    runner = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("zlib")
    )
    queue = f"plugin-{uuid.uuid4().hex[:8]}"
    spec = kernelflow.parse_pipeline(
        {
            "name": "one",
            "steps": [{"id": "ask", "model": "openai/gpt-4o-mini", "prompt": "[[sim: tag=p]] hi"}],
        }
    )
    async with Worker(
        user_client, task_queue=queue, workflows=[Greeter], activities=[shout], workflow_runner=runner
    ):
        greeting = await user_client.execute_workflow(
            Greeter.run, "ada", id=f"greet-{uuid.uuid4().hex[:8]}", task_queue=queue
        )
        handle = await kernelflow.start_pipeline(user_client, spec, {}, task_queue=queue)
        result = await handle.result()
    assert greeting == "HELLO ADA"
    assert result.status == "completed" and sim.stats()["by_tag"] == {"p": 1}
    # The user's codec still encodes Kernelflow's payloads: the raw history holds only zlib payloads.
    raw = await client.get_workflow_handle(handle.id).fetch_history()
    started = next(e for e in raw.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED)
    encodings = {
        p.metadata["encoding"] for p in started.workflow_execution_started_event_attributes.input.payloads
    }
    assert encodings == {b"binary/zlib"}


def test_the_users_sandbox_restrictions_are_kept_and_extended() -> None:
    from worker.plugin import PASSTHROUGH_MODULES, sandbox_runner

    mine = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules("zlib"))
    composed = sandbox_runner(mine)
    assert isinstance(composed, SandboxedWorkflowRunner)
    assert {"zlib", *PASSTHROUGH_MODULES} <= set(composed.restrictions.passthrough_modules)


def test_a_converter_that_cannot_carry_pydantic_models_is_refused_clearly() -> None:
    from temporalio.converter import DefaultPayloadConverter

    class Custom(DefaultPayloadConverter):
        pass

    with pytest.raises(kernelflow.KernelflowError, match="does not convert pydantic models"):
        from worker.plugin import kernelflow_converter

        kernelflow_converter(DataConverter(payload_converter_class=Custom))


EXPECTED_FACADE = {
    "BatchCounts", "BatchItem", "BatchItemResult", "BatchJob", "BatchLimits", "batch_tag",
    "KERNEL_API_VERSION", "AgentResult", "ApprovalState", "AssistantMessage", "AuthenticationFailed", "Capabilities",
    "ChatRequest", "ChatResponse", "ChatResult", "Choice", "CircuitOpen", "ConfigurationError",
    "ConnectionFailed", "ContentFiltered", "ContextLengthExceeded", "ControlAnswer", "Conversation",
    "EmbedRequest", "EmbedResponse", "FailureType", "FinishReason", "HttpProvider", "ImagePart",
    "InvalidRequest", "KernelflowError", "KernelflowPlugin", "MalformedResponse", "Message",
    "MissingCredentials", "ModelNotFound", "NonRetryableError", "Overloaded", "PermissionDenied",
    "PipelineError", "PipelineRequest", "PipelineResult", "PipelineSpec", "PipelineStatus",
    "PipelineSummary", "PipelineWorkflow", "PluginError", "Price", "PriceTable", "Provider",
    "ProviderConformance", "ProviderError", "ProviderSettings", "Query", "RateLimited", "Registry",
    "RetryableError", "Signal", "StepFailure", "StepKind", "StepSpec", "StepState", "StreamDone",
    "StreamError", "StreamEvent", "StreamInterrupted", "StreamStart", "SystemMessage", "TextDelta",
    "TextPart", "Tool", "ToolCall", "ToolCallDelta", "ToolMessage", "UnknownProvider",
    "UnsupportedCapability", "Update", "UpstreamError", "UpstreamTimeout", "Usage", "UserMessage",
    "__version__", "agent", "approve", "cancel", "chat", "collect_stream", "decide_with_start", "deliver_event",
    "error_from_status", "follow", "iter_ndjson", "iter_sse", "list_pipelines", "load_pipeline",
    "message_text", "outputs", "parse_pipeline", "pause", "register_step_kind", "reject", "reroute",
    "resume", "send_event", "start_pipeline", "start_registered", "status",
}  # fmt: skip
# Provider fidelity: the model catalog, request options, provider state, vendor JSON readers.
EXPECTED_FACADE |= {
    "REQUEST_OPTIONS", "ModelCatalog", "ModelFacts", "default_catalog", "DeveloperMessage", "DocumentPart",
    "DocumentSource", "PromptCache", "ProviderState", "ProviderStateEvent", "QuotaExceeded", "WireShapeError",
    "as_list", "as_object", "as_text",
}  # fmt: skip


def test_the_facade_exports_exactly_its_public_names() -> None:
    assert set(kernelflow.__all__) == EXPECTED_FACADE
    for name in kernelflow.__all__:
        assert getattr(kernelflow, name) is not None, name
    assert kernelflow.ProviderConformance.__name__ == "ProviderConformance"


@pytest.mark.parametrize(
    "path",
    [
        "examples/plugin-echo/kernelflow_echo/__init__.py",
        "examples/wait_until_step.py",
        "examples/custom_workflow.py",
    ],
)
def test_examples_import_kernelflow_only_through_the_facade(path: str) -> None:
    tree = ast.parse((REPO / path).read_text())
    internal = {"kernel", "providers", "activities", "workflows", "worker", "simulator"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] not in internal, f"{path} imports {node.module}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] not in internal, f"{path} imports {alias.name}"
