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

__all__ = ["batch_mode_problem", "batch_providers", "check_step_options"]


def batch_providers(registry: Registry) -> list[str]:
    """The registered providers that take batches (``capabilities.batch`` with ``batch_limits``, and the
    settings their batch API needs: ``Provider.batch_problem``)."""
    return [name for name in registry.names if _batch_refusal(registry, name) is None]


def _batch_refusal(registry: Registry, name: str) -> str | None:
    """None when provider ``name`` takes batches on this registry, else why not ('' when it gives none)."""
    cls = registry.provider_class(name)
    if not cls.capabilities.batch or cls.batch_limits is None:
        return cls.batch_unsupported_reason or ""
    return registry.get(name).batch_problem()


def batch_mode_problem(spec: PipelineSpec, registry: Registry) -> str | None:
    """Why a step in ``mode: batch`` cannot run on ``registry`` (its model's provider takes no batches),
    naming the step, the model, the provider and the providers that do; None when every one can.

    The step's own model is checked, and with ``retry_failed: batch`` its fallbacks too (they are then
    asked in batch rounds); with ``retry_failed: realtime`` fallbacks are asked in realtime only."""
    from kernel.steps.batching import BatchOptions
    from kernel.steps.llm import LlmStep

    for step, _ in spec.walk():
        if not isinstance(step, LlmStep) or step.mode != "batch":
            continue
        options = step.batch or BatchOptions()
        models = step.models() if options.retry_failed == "batch" else [step.model]
        for model in models:
            try:
                ref = registry.resolve_ref(model)
            except UnknownProvider:
                continue  # reported by the model check, or resolved by the worker's own aliases
            refusal = _batch_refusal(registry, ref.provider)
            if refusal is None:
                continue
            reason = f" ({refusal})" if refusal else ""
            via = f" (through {model!r})" if model != f"{ref.provider}/{ref.model}" else ""
            takers = batch_providers(registry)
            return (
                f"step {step.id!r} has mode: batch on model '{ref.provider}/{ref.model}'{via}, but provider "
                f"{ref.provider!r} does not take batches{reason}; providers with batch mode: "
                f"{', '.join(takers) or 'none'} (or drop mode: batch)"
            )
    return None


def check_step_options(spec: PipelineSpec, registry: Registry) -> None:
    """Raise ``PipelineError`` for the first ``llm`` step whose options a model it may call refuses,
    or whose batch mode its provider cannot take."""
    from kernel.steps.llm import LlmStep

    problem = batch_mode_problem(spec, registry)
    if problem is not None:
        raise PipelineError(problem)

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
