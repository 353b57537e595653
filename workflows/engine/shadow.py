"""Shadow traffic from workflow code: after a primary model answered, start the ``shadow_chat``
activity for a sampled fraction of calls, never awaited by the step, and give the ones still running
a short bound (``close_wait_s``) to finish when the pipeline closes or continues as new; a call still
running after it goes on on its worker and records its pair there.

Deterministic. Runs that may shadow (the spec has a ``shadow`` rule, or the worker a ``shadow``
section) record the ``shadow-traffic`` patch marker when they start and read the worker's rules once,
through the ``shadow_rules`` local activity (its answer is in the history, so a replay, or a worker
whose section differs, decides as the run did). Each call's decision then follows from the step's
rule, those rules and a hash of the workflow, run, step and call number: never the run's seeded
random, whose draws the pipeline's own choices depend on.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.llm import LlmCallResult
    from activities.shadow import (
        SHADOW_CHAT,
        SHADOW_RULES,
        ShadowCallInput,
        ShadowOutcome,
        ShadowRules,
        ShadowRulesInput,
        side_of,
    )
    from kernel.engine import ModelCall
    from kernel.errors import FailureType
    from kernel.shadow_rules import ShadowConfig, ShadowSpec, sampled
    from kernel.steps.base import StepFailure

__all__ = [
    "CLOSE_BOUND_PATCH",
    "CLOSE_WAIT_SUMMARY",
    "SHADOW_PATCH",
    "Shadows",
    "install_shadow",
    "shadow_config",
    "spec_candidates",
]

SHADOW_PATCH = "shadow-traffic"
CLOSE_BOUND_PATCH = "shadow-close-bound"
"""Runs with this marker wait at most ``close_wait_s`` for their shadow calls when they close."""
CLOSE_WAIT_SUMMARY = "shadow calls at close"
"""The summary of the timer bounding that wait."""

_config: ShadowConfig | None = None


def install_shadow(config: ShadowConfig | None) -> None:
    """Called by the worker: its ``shadow`` section (None: no worker-wide rules, no opt-outs)."""
    global _config
    _config = config


def shadow_config() -> ShadowConfig | None:
    return _config


def spec_candidates(steps: list[tuple[str, ShadowSpec]]) -> list[str]:
    return sorted({rule.model for _, rule in steps})


class Shadows:
    """The shadow calls of one pipeline run."""

    def __init__(self, *, tenant: str | None) -> None:
        self.tenant = tenant
        self.rules: ShadowRules | None = None
        """The worker's rules as this run read them at its start; None: the run never shadows."""
        self.pending = 0
        self._answered = 0
        self._tasks: set[asyncio.Future[None]] = set()

    async def begin(self, shadowed_steps: list[tuple[str, ShadowSpec]]) -> None:
        """At the run's start: whether it may shadow, and the worker's rules if so. Raises
        ``StepFailure`` naming the step whose candidate this worker cannot call."""
        config = _config
        if config is not None and (not config.enabled or config.opted_out(self.tenant)):
            may = False  # nothing recorded at all: an opted-out tenant's history is as without shadowing
        else:
            may = bool(shadowed_steps) or (config is not None and bool(config.models))
        may = may or workflow.unsafe.is_replaying()
        if not (may and workflow.patched(SHADOW_PATCH)):
            return
        try:
            rules: ShadowRules = await workflow.execute_local_activity(
                SHADOW_RULES,
                ShadowRulesInput(tenant=self.tenant, candidates=spec_candidates(shadowed_steps)),
                result_type=ShadowRules,
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_attempts=3),
                summary="shadow rules",
            )
        except (ActivityError, ApplicationError) as exc:  # a local activity's failure may arrive unwrapped
            workflow.logger.warning("shadow rules not read, this run is not shadowed: %s", exc.cause or exc)
            return
        for step_id, rule in shadowed_steps:
            problem = rules.problems.get(rule.model)
            if problem is not None:
                raise StepFailure(
                    f"step {step_id!r} shadow.model: {rule.model!r}: {problem}", FailureType.PIPELINE_ERROR
                )
        self.rules = rules

    def after_call(self, call: ModelCall, called: str, result: LlmCallResult) -> None:
        """``called`` (the model or alias asked, after reroutes) answered ``call`` with ``result``.

        The shadow call is started once the step's own code has yielded, so the step's commands (its
        search attribute updates, the next step's call) come out exactly as in a run without shadowing
        and the shadow activity follows them."""
        self._answered += 1
        rule = self._decide(call, called, result, self._answered)
        if rule is None:
            return
        self.pending += 1
        task = asyncio.ensure_future(self._run(self._input(call, result, rule, self._answered), rule))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _decide(self, call: ModelCall, called: str, result: LlmCallResult, number: int) -> ShadowSpec | None:
        rules = self.rules
        if rules is None or not rules.enabled or rules.opted_out or call.shadow is False:
            return None
        rule = call.shadow if isinstance(call.shadow, ShadowSpec) else None
        if rule is None:
            rule = rules.models.get(called) or rules.models.get(result.model_ref)
        if rule is None:
            return None
        info = workflow.info()
        if not sampled(rule.rate, info.workflow_id, info.run_id, call.step_id, str(number)):
            return None
        return rule

    def _input(
        self, call: ModelCall, result: LlmCallResult, rule: ShadowSpec, number: int
    ) -> ShadowCallInput:
        info = workflow.info()
        primary = side_of(
            result.model_ref,
            result.response,
            cost_usd=result.cost_usd,
            latency_ms=result.latency_ms,
            output_schema=call.output_schema,
        )
        return ShadowCallInput(
            pair_id=f"{info.workflow_id}/{info.run_id}/{number}",
            candidate=rule.model,
            request=call.request,
            primary=primary,
            output_schema=call.output_schema,
            pipeline=call.pipeline,
            step_id=call.step_id,
            workflow_id=info.workflow_id,
            run_id=info.run_id,
            tenant=self.tenant,
            timeout_s=rule.timeout_s,
            max_attempts=rule.max_attempts,
            per_hour=rule.per_hour,
            max_cost_usd_per_hour=rule.max_cost_usd_per_hour,
        )

    async def _run(self, request: ShadowCallInput, rule: ShadowSpec) -> None:
        # Per attempt: the candidate's own timeout inside the activity records a hang; the activity's
        # timeout (a little longer) is the bound when the worker itself is lost.
        attempt = timedelta(seconds=rule.timeout_s + 15)
        try:
            outcome: ShadowOutcome = await workflow.execute_activity(
                SHADOW_CHAT,
                request,
                result_type=ShadowOutcome,
                start_to_close_timeout=attempt,
                schedule_to_close_timeout=attempt * rule.max_attempts + timedelta(seconds=5),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1),
                    maximum_interval=timedelta(seconds=5),
                    maximum_attempts=rule.max_attempts,
                ),
                summary=f"shadow · {request.step_id} · {rule.model}",
            )
            if outcome.outcome != "recorded":
                workflow.logger.info("shadow call %s skipped: %s", request.pair_id, outcome.outcome)
        except (ActivityError, ApplicationError) as exc:  # recorded nowhere but the log: never raised
            workflow.logger.warning("shadow call %s gave up: %s", request.pair_id, exc.cause or exc)
        finally:
            self.pending -= 1

    async def drain(self) -> None:
        """Before the run closes or continues as new: give the shadow calls still running at most the
        rules' ``close_wait_s`` to finish, then return. A call still running then keeps running on its
        worker (``shadow_chat`` never heartbeats, so nothing cancels it) and writes its pair itself;
        only its retries are lost, since Temporal refuses the result of a closed run's activity.

        Runs started before the ``shadow-close-bound`` patch wait for every call, each bounded by its
        own timeouts, as they did."""
        if not self.pending:
            return
        if not workflow.patched(CLOSE_BOUND_PATCH):
            await workflow.wait_condition(lambda: self.pending == 0)
            return
        bound = self.rules.close_wait_s if self.rules is not None else 0.0
        if bound > 0:
            with contextlib.suppress(TimeoutError):  # the bound passed: the calls go on without the run
                await workflow.wait_condition(
                    lambda: self.pending == 0,
                    timeout=timedelta(seconds=bound),
                    timeout_summary=CLOSE_WAIT_SUMMARY,
                )
        if self.pending:
            workflow.logger.info(
                "closing with %d shadow call(s) still running: they record their pairs on their workers",
                self.pending,
            )
