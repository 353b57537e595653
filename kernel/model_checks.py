"""Before a pipeline starts: would each ``llm`` step's options be accepted by every model it may call?

Uses the same rules as the ``llm_chat`` activity (``Provider.prepare_chat``: what the provider cannot
honour, what the model catalog says a known model refuses, the provider's value ranges), so a
pipeline that would fail on its first call is refused at validation instead, naming the step, the
model and the fields. Unknown models pass; aliases are followed through the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kernel.errors import KernelflowError, PipelineError, UnknownProvider

if TYPE_CHECKING:
    from kernel.pipeline import PipelineSpec
    from kernel.registry import Registry

__all__ = ["check_step_options"]


def check_step_options(spec: PipelineSpec, registry: Registry) -> None:
    """Raise ``PipelineError`` for the first ``llm`` step whose options a model it may call refuses."""
    from kernel.steps.llm import LlmStep

    for step, _ in spec.walk():
        if not isinstance(step, LlmStep):
            continue
        placeholder = [{"role": m.role, "content": "-"} for m in step.message_templates()]
        for model in step.models():
            try:
                provider, name = registry.resolve(model)
            except UnknownProvider:
                continue  # reported by the model check, or resolved by the worker's own aliases
            request = step.chat_request(placeholder).model_copy(update={"model": name})
            try:
                provider.prepare_chat(request)
            except KernelflowError as exc:
                raise PipelineError(
                    f"step {step.id!r} cannot call {model!r}: {exc}", location=f"steps.{step.id}"
                ) from exc
