"""A step kind of your own, in one module: ``wait_until`` sleeps until a moment given by a template
(an ISO 8601 time, say a ticket's SLA deadline), durably, like ``sleep``.

Import this module in the process that validates specs and in the worker (before the worker starts);
``register_step_kind`` adds it to the table, and from then on pipelines may use
``type: wait_until`` anywhere a step may stand, with the same validation and error messages.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from kernelflow import FailureType, StepKind, StepSpec, register_step_kind
from kernelflow import StepFailure as _Failure

__all__ = ["WAIT_UNTIL", "WaitUntilStep"]


class WaitUntilStep(StepSpec):
    """Wait until ``until`` (a template rendering an ISO 8601 time with a zone). A time in the past
    does not wait. Output: ``{"waited_s": seconds}``."""

    type: Literal["wait_until"]
    until: str = Field(min_length=1)

    def templates(self) -> list[tuple[str, Any]]:
        return [("until", self.until)]


async def _run(step: WaitUntilStep, run: Any) -> tuple[Any, dict[str, Any]]:
    text = run.render(step.until, "until")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _Failure(
            f"step {step.id!r} until: {text!r} is not an ISO 8601 time", FailureType.PIPELINE_ERROR
        ) from None
    if moment.tzinfo is None:
        raise _Failure(f"step {step.id!r} until: {text!r} has no time zone", FailureType.PIPELINE_ERROR)
    seconds = max(0.0, (moment - run.effects.now()).total_seconds())
    if seconds:
        run.detail(f"waiting until {moment.isoformat()}")
        await run.effects.sleep(seconds, summary=f"{step.id} · until {moment.isoformat()}")
    return {"waited_s": round(seconds, 3)}, {}


WAIT_UNTIL = register_step_kind(StepKind("wait_until", WaitUntilStep, _run, "wait until a given moment"))
