"""Steps that wait on the outside world: ``approval`` (a person decides), ``wait_event`` (a business
event arrives) and ``sleep`` (a durable timer)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, ClassVar, Literal

from pydantic import Field

from kernel.errors import FailureType
from kernel.steps.base import NAME_PATTERN, StepKind, StepSpec
from kernel.steps.context import StepRun

__all__ = ["APPROVAL", "SLEEP", "WAIT_EVENT", "ApprovalStep", "SleepStep", "WaitEventStep"]


class ApprovalStep(StepSpec):
    """Wait for a person: the ``approve`` / ``reject`` updates decide. After ``timeout_s`` the
    ``default`` decision applies. A rejection fails the pipeline unless ``on_reject: continue``.
    Output: ``{decision, by, comment, timed_out}``."""

    single_instance: ClassVar[bool] = True

    type: Literal["approval"]
    message: str | None = Field(default=None, description="What is to be approved (a template).")
    approvers: list[str] | None = Field(default=None, description="Who may decide; anyone if unset.")
    timeout_s: float | None = Field(default=None, gt=0, le=365 * 86400)
    default: Literal["approve", "reject"] = "reject"
    on_reject: Literal["fail", "continue"] = "fail"

    def templates(self) -> list[tuple[str, Any]]:
        return [("message", self.message)] if self.message else []


async def _approval(step: ApprovalStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    engine, state = run.engine, run.state
    approval = engine.decision(step.id)
    if step.message:
        approval.message = run.render(step.message, "message")
    if approval.status not in ("approved", "rejected"):
        approval.status = "waiting"
        if step.timeout_s:
            approval.deadline = engine.effects.now() + timedelta(seconds=step.timeout_s)
        state.status = "waiting"
        run.detail(
            "waiting for approve/reject"
            + (f" (default {step.default} after {step.timeout_s:g}s)" if step.timeout_s else "")
        )
        engine.awaiting_changed()
        engine.lifecycle(
            "approval.requested",
            step.id,
            {"deadline": approval.deadline.isoformat() if approval.deadline else None},
        )
        run.details(f"{step.id} waits for approval")
        try:
            decided = await engine.effects.wait(
                lambda: approval.status in ("approved", "rejected"),
                timeout=step.timeout_s,
                summary=f"{step.id} · approval timeout",
            )
        except GeneratorExit:  # the run is being evicted from the worker's cache: no workflow calls
            raise
        except BaseException:
            state.status = "running"
            engine.awaiting_changed()
            raise
        if not decided:
            approval.status = "approved" if step.default == "approve" else "rejected"
            approval.by, approval.timed_out = "timeout", True
            approval.decided_at = engine.effects.now()
        state.status = "running"
        engine.awaiting_changed()
        engine.lifecycle(
            "approval.decided",
            step.id,
            {"decision": approval.status, "by": approval.by, "timed_out": approval.timed_out},
        )
    decision = {
        "decision": approval.status,
        "by": approval.by,
        "comment": approval.comment,
        "timed_out": approval.timed_out,
    }
    if approval.status == "rejected" and step.on_reject == "fail":
        why = (
            "timed out (default reject)" if approval.timed_out else f"rejected by {approval.by or 'someone'}"
        )
        raise run.fail(
            f"approval {step.id!r} {why}" + (f": {approval.comment}" if approval.comment else ""),
            FailureType.APPROVAL_REJECTED,
        )
    return decision, {}


APPROVAL = StepKind("approval", ApprovalStep, _approval, "wait for a person to approve or reject")


class WaitEventStep(StepSpec):
    """Wait for the business event ``event`` (the ``event`` signal; an event that arrived earlier is
    kept and taken at once). Output: the event's payload (``None`` after a timeout with
    ``on_timeout: continue``)."""

    type: Literal["wait_event"]
    event: str = Field(pattern=NAME_PATTERN)
    timeout_s: float | None = Field(default=None, gt=0, le=365 * 86400)
    on_timeout: Literal["fail", "continue"] = "fail"


async def _wait_event(step: WaitEventStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    engine, state = run.engine, run.state
    name = step.event
    events = engine.state.events
    waiting = engine.state.status.waiting_for_events
    if not events.get(name):
        state.status = "waiting"
        run.detail(f"waiting for event {name!r}")
        waiting.append(name)
        engine.refresh_search_status()
        run.details(f"{step.id} waits for event {name}")
        try:
            arrived = await engine.effects.wait(
                lambda: bool(events.get(name)),
                timeout=step.timeout_s,
                summary=f"{step.id} · event {name} timeout",
            )
        except GeneratorExit:  # the run is being evicted from the worker's cache: no workflow calls
            raise
        except BaseException:
            state.status = "running"
            waiting.remove(name)
            engine.refresh_search_status()
            raise
        state.status = "running"
        waiting.remove(name)
        engine.refresh_search_status()
        if not arrived:
            if step.on_timeout == "fail":
                raise run.fail(
                    f"step {step.id!r}: event {name!r} did not arrive within {step.timeout_s:g}s",
                    FailureType.EVENT_TIMEOUT,
                )
            return None, {"timed_out": True}
    return events[name].pop(0), {"timed_out": False}


WAIT_EVENT = StepKind("wait_event", WaitEventStep, _wait_event, "wait for a named business event")


class SleepStep(StepSpec):
    """A durable timer: the pipeline waits ``seconds`` (surviving worker restarts)."""

    type: Literal["sleep"]
    seconds: float = Field(gt=0, le=365 * 86400)


async def _sleep(step: SleepStep, run: StepRun) -> tuple[Any, dict[str, Any]]:
    run.detail(f"sleeping {step.seconds:g}s")
    await run.effects.sleep(step.seconds, summary=f"{step.id} · sleep")
    return None, {}


SLEEP = StepKind("sleep", SleepStep, _sleep, "a durable timer")
