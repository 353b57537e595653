"""The step interpreter: how each step type runs, inside ``PipelineWorkflow``.

Deterministic workflow code: it renders templates, evaluates sandboxed expressions, waits on
conditions and timers, and schedules activities and child workflows. ``StepRunner`` is a mixin; the
workflow class owns the state it reads (declared below) and the handlers that change it.
"""

from __future__ import annotations

import asyncio
import json
from collections import ChainMap
from collections.abc import Coroutine, MutableMapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, ChildWorkflowError

with workflow.unsafe.imports_passed_through():
    from activities.embed import LLM_EMBED, EmbedCallInput, EmbedCallResult
    from activities.llm import LlmCallResult
    from activities.tool import HTTP_TOOL, ToolCallInput, ToolCallResult
    from kernel.contracts import ChatRequest, EmbedRequest, Usage
    from kernel.errors import PipelineError
    from kernel.expressions import evaluate, render_value
    from kernel.pipeline import (
        ApprovalStep,
        BudgetSpec,
        EmbedStep,
        LlmStep,
        MapStep,
        ParallelStep,
        PipelineSpec,
        PipelineStep,
        SleepStep,
        Step,
        SwitchStep,
        ToolStep,
        TransformStep,
        WaitEventStep,
    )
    from kernel.routing import apply_routes
    from kernel.templating import render
    from workflows import search_attributes as sa
    from workflows.calls import AllModelsFailed, CallOptions, call_model, order_models, retry_policy
    from workflows.engine.models import (
        ApprovalState,
        PipelineRequest,
        PipelineResult,
        PipelineStatus,
        StepState,
    )
    from workflows.engine.schema import schema_errors

__all__ = ["PIPELINE_WORKFLOW", "Scope", "StepRunner", "error"]

PIPELINE_WORKFLOW = "PipelineWorkflow"


def error(message: str, error_type: str) -> ApplicationError:
    return ApplicationError(message, type=error_type, non_retryable=True)


@dataclass
class Scope:
    """Where steps run: the template context, whether their states are listed in the status (not
    inside a map, whose steps run once per item), the enclosing step, and a label for ids."""

    context: dict[str, Any]
    listed: bool = True
    parent: str | None = None
    label: str = ""
    scratch: dict[str, StepState] = field(default_factory=dict)

    @property
    def steps(self) -> MutableMapping[str, Any]:
        steps: MutableMapping[str, Any] = self.context["steps"]
        return steps


class StepRunner:
    """Runs steps; mixed into ``PipelineWorkflow``, which holds this state."""

    _spec: PipelineSpec | None
    _request: PipelineRequest
    _status: PipelineStatus
    _states: dict[str, StepState]
    _decisions: dict[str, ApprovalState]
    _events: dict[str, list[Any]]
    _routes: dict[str, str]
    _providers: list[str]
    _sa_status: str
    _budget_paused: bool

    # --- running lists of steps -------------------------------------------------------------------

    async def _run_steps(self, steps: list[Step], scope: Scope) -> Any:
        output: Any = None
        for step in steps:
            output = await self._run_step(step, scope)
        return output

    async def _run_step(self, step: Step, scope: Scope) -> Any:
        if self._status.paused:
            await workflow.wait_condition(lambda: not self._status.paused)
        state = self._state(step, scope)
        if step.when is not None and not self._evaluate(step.when, scope, f"step {step.id!r} when"):
            self._skip([step], scope)
            return None
        state.status = "running"
        if scope.listed:
            self._status.current_step = step.id
        self._details(f"{step.id} ({step.type})")
        try:
            output, extras = await self._dispatch(step, scope, state)
        except asyncio.CancelledError:
            state.status = "cancelled"
            raise
        except ApplicationError as exc:
            state.status = "failed"
            state.error = exc.message
            raise
        state.status = "completed"
        state.detail = None
        state.output = output
        scope.steps[step.id] = {"output": output, "status": "completed", **extras}
        return output

    async def _dispatch(self, step: Step, scope: Scope, state: StepState) -> tuple[Any, dict[str, Any]]:
        match step:
            case LlmStep():
                return await self._llm(step, scope, state)
            case ParallelStep():
                return await self._parallel(step, scope, state)
            case MapStep():
                return await self._map(step, scope, state)
            case SwitchStep():
                return await self._switch(step, scope, state)
            case TransformStep():
                value = self._evaluate(step.expression, scope, f"step {step.id!r} expression")
                return _json_value(value, f"step {step.id!r} expression"), {}
            case ApprovalStep():
                return await self._approval(step, scope, state)
            case WaitEventStep():
                return await self._wait_event(step, state)
            case SleepStep():
                state.detail = f"sleeping {step.seconds:g}s"
                await workflow.sleep(timedelta(seconds=step.seconds), summary=f"{step.id} · sleep")
                return None, {}
            case ToolStep():
                return await self._tool(step, scope)
            case EmbedStep():
                return await self._embed(step, scope, state)
            case PipelineStep():
                return await self._child(step, scope, state)
        raise error(f"step {step.id!r}: unknown step type {step.type!r}", "PipelineError")

    def _state(self, step: Step, scope: Scope) -> StepState:
        if scope.listed and step.id in self._states:
            return self._states[step.id]
        return scope.scratch.setdefault(step.id, StepState(id=step.id, type=step.type, parent=scope.parent))

    def _skip(self, steps: list[Step], scope: Scope) -> None:
        for step in steps:
            self._state(step, scope).status = "skipped"
            scope.steps[step.id] = {"output": None, "status": "skipped"}
            if isinstance(step, ApprovalStep) and step.id in self._decisions:
                self._decisions[step.id].status = "skipped"
            if not isinstance(step, MapStep):
                for _, children in step.children():
                    self._skip(children, scope)

    # --- model calls ------------------------------------------------------------------------------

    async def _llm(self, step: LlmStep, scope: Scope, state: StepState) -> tuple[Any, dict[str, Any]]:
        spec = self._require_spec()
        messages = [
            {"role": m.role, "content": self._render(m.content, scope, f"step {step.id!r} messages[{i}]")}
            for i, m in enumerate(step.message_templates())
        ]
        models = order_models(step.model, step.fallbacks, step.balance)
        request = self._chat_request(step, messages)
        options = CallOptions(
            timeout_s=step.timeout_s,
            heartbeat_timeout_s=step.heartbeat_timeout_s,
            retry=step.retry or spec.retry,
            local_activity=step.local_activity,
            stream=step.stream,
        )
        schema = step.output_schema

        def on_attempt(model: str, number: int) -> None:
            state.model = model
            suffix = f" (fallback {number - 1} of {len(models) - 1})" if number > 1 else ""
            self._details(f"{step.id} · {model}{suffix}")

        def validate(result: LlmCallResult) -> Any:
            self._account(state, result.response.usage, result.cost_usd, result.model_ref)
            if step.output == "text":
                return result.response.text
            try:
                value = json.loads(result.response.text)
            except ValueError as exc:
                raise ValueError(f"the answer is not JSON: {exc}") from exc
            problems = schema_errors(value, schema) if schema is not None else []
            if problems:
                raise ValueError("the answer does not match output_schema: " + "; ".join(problems))
            return value

        try:
            result, output = await call_model(
                models,
                request,
                options=options,
                label=f"step {step.id!r}",
                step_id=step.id,
                pipeline=spec.name,
                validate=validate,
                on_attempt=on_attempt,
                on_failure=state.failures.append,
                route=self._route,
                max_repairs=step.max_repairs if schema is not None else 0,
                on_repair=lambda failure: self._details(f"{step.id} · re-asking {failure.model}"),
            )
        except AllModelsFailed as exc:
            raise error(exc.message, "StepFailed") from None
        state.model = result.model_ref
        state.provider = result.provider
        self._note_provider(result.provider)
        await self._check_budget()
        extras = {"text": result.response.text, "model": result.model_ref, "provider": result.provider}
        return output, extras

    def _chat_request(self, step: LlmStep, messages: list[dict[str, Any]]) -> ChatRequest:
        response_format: Any = step.response_format
        if step.output_schema is not None:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": step.id, "schema": step.output_schema},
            }
        try:
            return ChatRequest.model_validate(
                {
                    "model": step.model,
                    "messages": messages,
                    "temperature": step.temperature,
                    "max_tokens": step.max_tokens,
                    "response_format": response_format,
                    "tools": step.tools,
                }
            )
        except ValueError as exc:
            raise error(f"step {step.id!r} builds an invalid request: {exc}", "PipelineError") from None

    async def _embed(self, step: EmbedStep, scope: Scope, state: StepState) -> tuple[Any, dict[str, Any]]:
        spec = self._require_spec()
        value = self._value(step.input, scope, f"step {step.id!r} input")
        texts = value if isinstance(value, list) else [value]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise error(
                f"step {step.id!r} input must be text or a list of texts, got {value!r:.120}", "PipelineError"
            )
        model = self._route(step.model)
        state.model = model
        call = EmbedCallInput(
            model=model,
            request=EmbedRequest(model=model, input=texts, dimensions=step.dimensions),
            step_id=step.id,
            pipeline=spec.name,
        )
        try:
            result: EmbedCallResult = await workflow.execute_activity(
                LLM_EMBED,
                call,
                result_type=EmbedCallResult,
                start_to_close_timeout=timedelta(seconds=step.timeout_s),
                retry_policy=retry_policy(step.retry or spec.retry),
                summary=f"{step.id} · embed · {model}",
            )
        except ActivityError as exc:
            raise error(f"step {step.id!r} failed: {_cause(exc)}", "StepFailed") from None
        state.model, state.provider = result.model_ref, result.provider
        self._account(state, result.response.usage, result.cost_usd, result.model_ref)
        self._note_provider(result.provider)
        await self._check_budget()
        vectors = result.response.embeddings
        return (vectors if isinstance(value, list) else vectors[0]), {"model": result.model_ref}

    def _route(self, model: str) -> str:
        try:
            return apply_routes(model, self._routes)
        except ValueError:
            return model

    # --- composition ------------------------------------------------------------------------------

    async def _parallel(
        self, step: ParallelStep, scope: Scope, state: StepState
    ) -> tuple[Any, dict[str, Any]]:
        names = list(step.branches)
        branch_scope = Scope(scope.context, scope.listed, step.id, scope.label, scope.scratch)
        runs = [self._run_steps(step.branches[name], branch_scope) for name in names]
        if step.on_failure == "fail_fast":
            try:
                results = await _all_or_nothing(runs)
            except ApplicationError as exc:
                raise error(
                    f"parallel step {step.id!r} failed: {exc.message}", exc.type or "StepFailed"
                ) from None
            return dict(zip(names, results, strict=True)), {"errors": {}}
        settled = await asyncio.gather(*runs, return_exceptions=True)
        outputs: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name, outcome in zip(names, settled, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, ApplicationError):
                outputs[name], errors[name] = None, outcome.message
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                outputs[name] = outcome
        if errors:
            state.error = "; ".join(f"branch {name}: {message}" for name, message in errors.items())
        return outputs, {"errors": errors}

    async def _map(self, step: MapStep, scope: Scope, state: StepState) -> tuple[Any, dict[str, Any]]:
        items = self._value(step.items, scope, f"step {step.id!r} items")
        if isinstance(items, dict | str) or not isinstance(items, list | tuple):
            raise error(f"step {step.id!r} items must be a list, got {type(items).__name__}", "PipelineError")
        if len(items) > step.max_items:
            raise error(
                f"step {step.id!r} has {len(items)} items, more than its max_items {step.max_items}",
                "PipelineError",
            )
        limit = asyncio.Semaphore(step.concurrency)
        done = 0

        async def one(index: int, item: Any) -> Any:
            nonlocal done
            async with limit:
                context = {
                    **scope.context,
                    "steps": ChainMap({}, scope.steps),
                    step.item_var: item,
                    step.index_var: index,
                }
                item_scope = Scope(
                    context, listed=False, parent=step.id, label=f"{scope.label}{step.id}-{index}."
                )
                try:
                    output = await self._run_steps(step.steps, item_scope)
                except ApplicationError as exc:
                    raise error(
                        f"map step {step.id!r} item {index}: {exc.message}", exc.type or "StepFailed"
                    ) from None
                done += 1
                state.detail = f"{done}/{len(items)} items done"
                return output

        state.detail = f"0/{len(items)} items done"
        return await _all_or_nothing([one(i, item) for i, item in enumerate(items)]), {"count": len(items)}

    async def _switch(self, step: SwitchStep, scope: Scope, state: StepState) -> tuple[Any, dict[str, Any]]:
        inner = Scope(scope.context, scope.listed, step.id, scope.label, scope.scratch)
        chosen: int | None = None
        for index, case in enumerate(step.cases):
            if self._evaluate(case.when, scope, f"step {step.id!r} cases[{index}].when"):
                chosen = index
                break
        for index, case in enumerate(step.cases):
            if index != chosen:
                self._skip(case.steps, inner)
        if chosen is not None:
            self._skip(step.default, inner)
            state.detail = f"case {chosen}"
            return await self._run_steps(step.cases[chosen].steps, inner), {"case": chosen}
        state.detail = "default"
        return await self._run_steps(step.default, inner), {"case": "default"}

    async def _child(self, step: PipelineStep, scope: Scope, state: StepState) -> tuple[Any, dict[str, Any]]:
        inputs = self._value(step.inputs, scope, f"step {step.id!r} inputs")
        request = PipelineRequest(
            pipeline=step.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
            if step.spec
            else None,
            pipeline_name=step.pipeline,
            pipeline_version=step.version,
            inputs=inputs,
            tenant=self._request.tenant,
            search_attributes=self._request.search_attributes,
        )
        child_id = f"{workflow.info().workflow_id}/{scope.label}{step.id}"
        name = step.pipeline or (step.spec.name if step.spec else "inline")
        state.detail = f"child workflow {child_id}"
        try:
            result: PipelineResult = await workflow.execute_child_workflow(
                PIPELINE_WORKFLOW,
                request,
                id=child_id,
                result_type=PipelineResult,
                static_summary=f"sub-pipeline {name} of step {step.id}",
            )
        except ChildWorkflowError as exc:
            raise error(
                f"step {step.id!r}: sub-pipeline {name!r} failed: {_cause(exc)}", "StepFailed"
            ) from None
        self._account(state, result.usage, result.cost_usd, None)
        for model in result.cost_unknown_models:
            if model not in self._status.cost_unknown_models:
                self._status.cost_unknown_models.append(model)
        await self._check_budget()
        return result.outputs, {"workflow_id": child_id}

    # --- waiting on the outside world -------------------------------------------------------------

    async def _approval(
        self, step: ApprovalStep, scope: Scope, state: StepState
    ) -> tuple[Any, dict[str, Any]]:
        approval = self._decisions.setdefault(step.id, ApprovalState(step_id=step.id))
        if step.message:
            approval.message = self._render(step.message, scope, f"step {step.id!r} message")
        if approval.status not in ("approved", "rejected"):
            approval.status = "waiting"
            state.status = "waiting"
            state.detail = "waiting for approve/reject" + (
                f" (default {step.default} after {step.timeout_s:g}s)" if step.timeout_s else ""
            )
            self._refresh_search_status()
            self._details(f"{step.id} waits for approval")
            try:
                await workflow.wait_condition(
                    lambda: approval.status in ("approved", "rejected"),
                    timeout=step.timeout_s,
                    timeout_summary=f"{step.id} · approval timeout",
                )
            except TimeoutError:
                approval.status = "approved" if step.default == "approve" else "rejected"
                approval.by, approval.timed_out, approval.decided_at = "timeout", True, workflow.now()
            finally:
                state.status = "running"
                self._refresh_search_status()
        decision = {
            "decision": approval.status,
            "by": approval.by,
            "comment": approval.comment,
            "timed_out": approval.timed_out,
        }
        if approval.status == "rejected" and step.on_reject == "fail":
            why = (
                "timed out (default reject)"
                if approval.timed_out
                else f"rejected by {approval.by or 'someone'}"
            )
            raise error(
                f"approval {step.id!r} {why}" + (f": {approval.comment}" if approval.comment else ""),
                "ApprovalRejected",
            )
        return decision, {}

    async def _wait_event(self, step: WaitEventStep, state: StepState) -> tuple[Any, dict[str, Any]]:
        name = step.event
        if not self._events.get(name):
            state.status = "waiting"
            state.detail = f"waiting for event {name!r}"
            self._status.waiting_for_events.append(name)
            self._refresh_search_status()
            self._details(f"{step.id} waits for event {name}")
            try:
                await workflow.wait_condition(
                    lambda: bool(self._events.get(name)),
                    timeout=step.timeout_s,
                    timeout_summary=f"{step.id} · event {name} timeout",
                )
            except TimeoutError:
                if step.on_timeout == "fail":
                    raise error(
                        f"step {step.id!r}: event {name!r} did not arrive within {step.timeout_s:g}s",
                        "EventTimeout",
                    ) from None
                return None, {"timed_out": True}
            finally:
                state.status = "running"
                self._status.waiting_for_events.remove(name)
                self._refresh_search_status()
        return self._events[name].pop(0), {"timed_out": False}

    async def _tool(self, step: ToolStep, scope: Scope) -> tuple[Any, dict[str, Any]]:
        spec = self._require_spec()
        where = f"step {step.id!r}"
        call = ToolCallInput(
            url=self._render(step.url, scope, f"{where} url"),
            method=step.method,
            headers={k: str(v) for k, v in self._value(step.headers, scope, f"{where} headers").items()},
            query={k: str(v) for k, v in self._value(step.query, scope, f"{where} query").items()},
            body=_json_value(self._value(step.body, scope, f"{where} body"), f"{where} body"),
            timeout_s=step.timeout_s,
            step_id=step.id,
        )
        try:
            result: ToolCallResult = await workflow.execute_activity(
                HTTP_TOOL,
                call,
                result_type=ToolCallResult,
                start_to_close_timeout=timedelta(seconds=step.timeout_s + 5),
                retry_policy=retry_policy(step.retry or spec.retry),
                summary=f"{step.id} · {step.method} {call.url.split('?')[0][:120]}",
            )
        except ActivityError as exc:
            cause = exc.cause
            kind = cause.type if isinstance(cause, ApplicationError) and cause.type else "StepFailed"
            raise error(f"{where} failed: {_cause(exc)}", kind) from None
        return result.body, {"status_code": result.status_code}

    # --- budget -----------------------------------------------------------------------------------

    def _account(self, state: StepState, usage: Usage, cost: float | None, model_ref: str | None) -> None:
        state.usage = state.usage + usage
        self._status.usage = self._status.usage + usage
        if cost is not None:
            state.cost_usd = round((state.cost_usd or 0.0) + cost, 10)
            self._status.cost_usd = round(self._status.cost_usd + cost, 10)
        elif model_ref is not None and model_ref not in self._status.cost_unknown_models:
            self._status.cost_unknown_models.append(model_ref)

    def _over_budget(self, budget: BudgetSpec) -> str | None:
        if budget.max_tokens is not None and self._status.usage.total_tokens > budget.max_tokens:
            return f"{self._status.usage.total_tokens} tokens used, over max_tokens {budget.max_tokens}"
        if budget.max_cost_usd is not None and self._status.cost_usd > budget.max_cost_usd:
            return f"${self._status.cost_usd:.6f} spent, over max_cost_usd ${budget.max_cost_usd:g}"
        return None

    async def _check_budget(self) -> None:
        budget = self._status.budget
        over = None if budget is None else self._over_budget(budget)
        if budget is None or over is None:
            return
        name = self._status.pipeline
        if budget.on_exceed == "fail":
            raise error(f"pipeline {name!r} exceeded its budget: {over}", "BudgetExceeded")
        if not self._status.paused:
            self._status.paused, self._status.pause_reason = True, f"budget exceeded: {over}"
            self._budget_paused = True
            self._refresh_search_status()
            self._details(f"paused: budget exceeded: {over}")
        await workflow.wait_condition(lambda: not self._status.paused)

    # --- helpers the workflow provides ------------------------------------------------------------

    def _require_spec(self) -> PipelineSpec:
        if self._spec is None:
            raise error("the pipeline spec is not loaded", "PipelineError")
        return self._spec

    def _render(self, source: str, scope: Scope, location: str) -> str:
        try:
            return render(source, scope.context, location=location)
        except PipelineError as exc:
            raise error(str(exc), "PipelineError") from None

    def _value(self, value: Any, scope: Scope, location: str) -> Any:
        try:
            return render_value(value, scope.context, location=location)
        except PipelineError as exc:
            raise error(str(exc), "PipelineError") from None

    def _evaluate(self, source: str, scope: Scope, location: str) -> Any:
        try:
            return evaluate(source, scope.context, location=location)
        except PipelineError as exc:
            raise error(str(exc), "PipelineError") from None

    def _note_provider(self, provider: str) -> None:
        if provider not in self._providers:
            self._providers.append(provider)
            self._upsert([sa.PROVIDER.value_set(list(self._providers))])

    def _refresh_search_status(self) -> None:
        label = "Running"
        if self._status.paused:
            label = "Paused"
        elif any(a.status == "waiting" for a in self._decisions.values()):
            label = "WaitingForApproval"
        elif self._status.waiting_for_events:
            label = "WaitingForEvent"
        if label != self._sa_status:
            self._sa_status = label
            self._upsert([sa.STATUS.value_set(label)])

    def _upsert(self, updates: list[Any]) -> None:
        raise NotImplementedError

    def _details(self, summary: str) -> None:
        raise NotImplementedError


async def _all_or_nothing(runs: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Run all; on the first failure cancel the others, let them finish cancelling, then re-raise."""
    tasks = [asyncio.ensure_future(run) for run in runs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _cause(exc: BaseException) -> str:
    cause = exc.cause if isinstance(exc, ActivityError | ChildWorkflowError) else None
    while isinstance(cause, ChildWorkflowError | ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        return f"{cause.type}: {cause.message}" if cause.type else cause.message
    return str(cause or exc)


def _json_value(value: Any, location: str) -> Any:
    """Values become JSON data (kept in status and history); anything else is a clear error."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        raise error(
            f"{location}: the value is not JSON data ({type(value).__name__}); a generator needs '| list'",
            "PipelineError",
        ) from None
