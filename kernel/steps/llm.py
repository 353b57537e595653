"""``llm``: ask a model, with ordered fallbacks or weighted balance, optional structured output with
re-asks, streaming, and per-step timeouts and retries."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from kernel.contracts import ChatRequest, PromptCache, ResponseFormat, Tool
from kernel.errors import FailureType
from kernel.routing import Balance, weighted_order
from kernel.schema import schema_errors
from kernel.shadow_rules import ShadowSpec
from kernel.steps.base import MODEL_PATTERN, RetrySpec, StepFailure, StepKind, StepSpec, _Spec
from kernel.steps.batching import BatchCollector, BatchOptions, BatchSlot
from kernel.steps.context import CallResult, ModelCall, StepRun

__all__ = ["KIND", "DocumentTemplate", "LlmStep", "MessageTemplate", "order_models"]


class MessageTemplate(_Spec):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class DocumentTemplate(_Spec):
    """A document (PDF) sent with the last user message, by exactly one of: ``file_data``, a
    ``data:application/pdf;base64,...`` URL; ``url``, an https URL the vendor fetches; ``file_id``, a
    file uploaded to the vendor. Each is a template (``{{ inputs.contract_pdf }}``)."""

    file_data: str | None = None
    url: str | None = None
    file_id: str | None = None
    filename: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DocumentTemplate:
        given = [name for name in ("file_data", "url", "file_id") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of file_data, url or file_id (got {', '.join(given) or 'none'})"
            )
        return self


class LlmStep(StepSpec):
    """Ask a model. ``model`` is ``provider/model`` or an alias configured on the worker; ``fallbacks``
    are tried in order when a model's retries are exhausted or its error cannot be retried.
    ``output_schema`` asks for JSON of that schema, validates the answer and re-asks up to
    ``max_repairs`` times with the validation error before the model counts as failed."""

    versioned_defaults: ClassVar[dict[str, dict[int, Any]]] = {"heartbeat_timeout_s": {2: 8.0}}

    type: Literal["llm"] = "llm"
    model: str = Field(pattern=MODEL_PATTERN)
    fallbacks: list[Annotated[str, Field(pattern=MODEL_PATTERN)]] = Field(default_factory=list, max_length=10)
    balance: Balance | None = Field(
        default=None, description="Spread calls by weight over equivalent models."
    )
    system: str | None = None
    prompt: str | None = None
    messages: list[MessageTemplate] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    response_format: ResponseFormat | None = None
    output_schema: dict[str, Any] | None = Field(default=None, description="JSON Schema of the answer.")
    max_repairs: int = Field(default=2, ge=0, le=10)
    tools: list[Tool] | None = None
    output: Literal["text", "json"] = "text"
    stream: bool = Field(default=False, description="Stream tokens (heartbeating as they arrive).")
    local_activity: bool = Field(default=False, description="Run as a local activity (lower latency).")
    timeout_s: float = Field(default=120.0, gt=0, le=86400, description="Per attempt.")
    heartbeat_timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="How soon a lost worker is noticed (the call then runs again elsewhere).",
    )
    retry: RetrySpec | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = Field(
        default=None,
        description="How hard a reasoning model thinks (OpenAI reasoning_effort, Gemini 3 level).",
    )
    thinking_budget: int | None = Field(
        default=None,
        ge=0,
        description="Tokens a model may spend thinking (Anthropic, Gemini); 0 turns it off.",
    )
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    cache: PromptCache | None = Field(
        default=None, description="Prompt caching: key, breakpoints (message positions) and ttl."
    )
    provider_options: dict[str, dict[str, Any]] | None = Field(
        default=None,
        description="Vendor fields the contract does not type, by provider name; each is checked.",
    )
    lenient: bool = Field(
        default=False,
        description="Drop options a provider or model cannot honour (recorded as warnings) instead of failing.",
    )
    documents: list[DocumentTemplate] | None = Field(
        default=None, max_length=20, description="Documents sent with the last user message."
    )
    mode: Literal["realtime", "batch"] = Field(
        default="realtime",
        description="batch: inside a map, the items' calls go to the provider's batch API (half price, "
        "answered within hours); the pipeline waits on durable timers.",
    )
    batch: BatchOptions | None = Field(default=None, description="How batch mode waits and retries.")
    shadow: ShadowSpec | Literal[False] | None = Field(
        default=None,
        description="Also send a sampled fraction of this step's answered calls to a candidate model, "
        "off the pipeline's path (docs/shadow.md); false: never shadow this step, whatever the worker's rules.",
    )

    @field_validator("shadow", mode="before")
    @classmethod
    def _shadow_spec(cls, value: Any) -> Any:
        """One message naming the wrong field of the rule (not one per member of the union)."""
        if value is None or value is False or isinstance(value, ShadowSpec):
            return value
        if not isinstance(value, dict):
            raise ValueError(
                f"give a rule {{model: provider/model, rate: 0.25, ...}} or false (got {value!r:.60})"
            )
        try:
            return ShadowSpec.model_validate(value)
        except ValidationError as exc:
            problems = [
                f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
                + (f" (got {error.get('input')!r})" if error["type"] == "string_pattern_mismatch" else "")
                for error in exc.errors(include_url=False)
            ]
            raise ValueError("; ".join(problems)) from None

    @model_validator(mode="after")
    def _batch_mode(self) -> LlmStep:
        if self.mode == "batch":
            refused = [name for name in ("stream", "local_activity") if getattr(self, name)]
            if self.balance:
                refused.append("balance")
            if self.shadow:
                refused.append("shadow")
            if refused:
                raise ValueError(
                    f"mode: batch cannot be combined with {', '.join(refused)} "
                    "(batch answers come whole, through the provider's batch API, from one model at a time)"
                )
        elif self.batch is not None:
            raise ValueError("'batch' options go with mode: batch")
        return self

    @model_validator(mode="after")
    def _cache_breakpoints_are_messages(self) -> LlmStep:
        count = len(self.message_templates()) if (self.prompt is None) != (self.messages is None) else 0
        for position in self.cache.breakpoints if self.cache else []:
            if count and not 0 <= position < count:
                raise ValueError(
                    f"cache.breakpoints: {position} is not a message position (0 to {count - 1})"
                )
        return self

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> LlmStep:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None and self.system is not None:
            raise ValueError("'system' goes with 'prompt'; with 'messages' add a message of role system")
        if self.output_schema is not None:
            if self.response_format is not None:
                raise ValueError("give 'output_schema' or 'response_format', not both")
            if not isinstance(self.output_schema.get("type", "object"), str | list):
                raise ValueError("'output_schema' must be a JSON Schema object")
            self.output = "json"
        return self

    def message_templates(self) -> list[MessageTemplate]:
        if self.messages is not None:
            return self.messages
        templates = [MessageTemplate(role="system", content=self.system)] if self.system else []
        return [*templates, MessageTemplate(role="user", content=self.prompt or "")]

    def templates(self) -> list[tuple[str, Any]]:
        found: list[tuple[str, Any]] = [
            (f"messages[{i}].content", m.content) for i, m in enumerate(self.message_templates())
        ]
        for i, document in enumerate(self.documents or []):
            for name in ("file_data", "url", "file_id", "filename"):
                value = getattr(document, name)
                if value is not None:
                    found.append((f"documents[{i}].{name}", value))
        return found

    def models(self) -> list[str]:
        return list(dict.fromkeys([self.model, *self.fallbacks, *(b.model for b in self.balance or [])]))

    def chat_request(self, messages: list[dict[str, Any]]) -> ChatRequest:
        response_format: Any = self.response_format
        if self.output_schema is not None:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": self.id, "schema": self.output_schema},
            }
        try:
            return ChatRequest.model_validate(
                {
                    "model": self.model,
                    "messages": messages,
                    "temperature": self.temperature,
                    "max_tokens": self.max_tokens,
                    "response_format": response_format,
                    "tools": self.tools,
                    "reasoning_effort": self.reasoning_effort,
                    "thinking_budget": self.thinking_budget,
                    "service_tier": self.service_tier,
                    "cache": self.cache,
                    "provider_options": self.provider_options,
                    "lenient": self.lenient,
                }
            )
        except ValueError as exc:
            raise StepFailure(
                f"step {self.id!r} builds an invalid request: {exc}", FailureType.PIPELINE_ERROR
            ) from None


def attach_documents(step: LlmStep, messages: list[dict[str, Any]], render: Any) -> None:
    """The step's documents, rendered, as ``file`` parts before the text of the last user message."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last_user is None:
        raise StepFailure(
            f"step {step.id!r} has documents but no user message to send them with",
            FailureType.PIPELINE_ERROR,
        )
    parts: list[dict[str, Any]] = []
    for i, document in enumerate(step.documents or []):
        source = {
            name: render(value, f"documents[{i}].{name}")
            for name in ("file_data", "url", "file_id", "filename")
            if (value := getattr(document, name)) is not None
        }
        parts.append({"type": "file", "file": source})
    text = messages[last_user]["content"]
    messages[last_user]["content"] = [*parts, {"type": "text", "text": text}]


def order_models(primary: str, fallbacks: list[str], balance: Balance | None, rand: float) -> list[str]:
    """The models a step tries, in order. Without ``balance``: ``primary`` then ``fallbacks``. With it
    (each model once): one balanced model picked by weight with ``rand`` (the run's seeded random, so
    replay picks the same), the other balanced ones, then ``primary`` and ``fallbacks``."""
    if not balance:
        return [primary, *fallbacks]
    return list(dict.fromkeys([*weighted_order(balance, rand), primary, *fallbacks]))


async def run(step: LlmStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    engine, state = run.engine, run.state
    messages: list[dict[str, Any]] = [
        {"role": m.role, "content": run.render(m.content, f"messages[{i}]")}
        for i, m in enumerate(step.message_templates())
    ]
    if step.documents:
        attach_documents(step, messages, run.render)
    rand = engine.effects.random() if step.balance else 0.0
    models = order_models(step.model, step.fallbacks, step.balance, rand)
    schema = step.output_schema

    def on_attempt(model: str, number: int) -> None:
        state.model = model
        suffix = f" (fallback {number - 1} of {len(models) - 1})" if number > 1 else ""
        if number > 1:
            engine.lifecycle("model.fallback", step.id, {"model": model, "attempt": number})
        run.details(f"{step.id} · {model}{suffix}")

    def validate(result: CallResult) -> Any:
        run.account(result.response.usage, result.cost_usd, result.model_ref)
        if step.output == "text":
            return result.response.text
        try:
            value = json.loads(result.response.text or "")
        except ValueError as exc:
            raise ValueError(f"the answer is not JSON: {exc}") from exc
        problems = schema_errors(value, schema) if schema is not None else []
        if problems:
            raise ValueError("the answer does not match output_schema: " + "; ".join(problems))
        return value

    call = ModelCall(
        models=models,
        request=step.chat_request(messages),
        step_id=step.id,
        pipeline=engine.spec.name,
        label=f"step {step.id!r}",
        timeout_s=step.timeout_s,
        heartbeat_timeout_s=step.heartbeat_timeout_s,
        retry=step.retry or engine.spec.retry,
        local_activity=step.local_activity,
        stream=step.stream,
        max_repairs=step.max_repairs if schema is not None else 0,
        validate=validate,
        on_attempt=on_attempt,
        on_failure=state.failures.append,
        on_repair=lambda failure: run.details(f"{step.id} · re-asking {failure.model}"),
        route=engine.route,
        shadow=step.shadow,
        output_schema=schema,
    )
    if step.mode == "batch":
        options = step.batch or BatchOptions()
        slot = run.scope.batches
        if not isinstance(slot, BatchSlot) and options.window_s is not None:
            # One call of its own, gathered with other pipelines' by the shared batcher.
            lone = BatchCollector(
                engine, state, f"{run.scope.label}{step.id}", expected=1, limit=asyncio.Semaphore(1)
            )
            slot = BatchSlot(lone, 0)
        if not isinstance(slot, BatchSlot):
            raise run.fail(
                f"step {step.id!r} has mode: batch but runs outside a map: batch mode gathers the calls of a "
                "map's items into one provider batch (or, with batch.window_s, many pipelines' calls)",
                FailureType.PIPELINE_ERROR,
            )
        result, output = await slot.collector.ask(slot.index, call, options)
    else:
        result, output = await engine.effects.call_model(call)
    state.model = result.model_ref
    state.provider = result.provider
    engine.note_provider(result.provider)
    await engine.check_budget()
    extras: dict[str, Any] = {
        "text": result.response.text,
        "model": result.model_ref,
        "provider": result.provider,
    }
    if result.response.warnings:
        extras["warnings"] = list(result.response.warnings)  # options dropped in lenient mode
    return output, extras


KIND = StepKind("llm", LlmStep, run, "ask a model (fallbacks, balance, structured output, streaming)")
