"""Tenant cost budgets: the ledger's arithmetic, then pipelines on a real Temporal server whose tenant's
budget runs out mid-pipeline and that fail, pause until resumed with a new budget, or wait for an
approval that raises it. The tenant's ledger must equal the sum of the calls' costs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from kernel.limits import (
    BudgetRefusal,
    Ledger,
    LimitsConfig,
    RateLimit,
    TenantBudgetRaise,
    Waiting,
    budget_periods,
)
from kernel.pipeline import PipelineSpec
from kernel.pricing import PriceTable
from kernel.registry import Registry
from simulator.server import SimulatorServer
from tests.worker_process import WorkerProcess, kernelflow_binary
from worker.app import build_registry, build_worker, simulator_settings
from worker.client import start_pipeline
from workflows.contract import PipelineResult
from workflows.limiter import limiter_id

pytestmark = pytest.mark.timeout(240)

MODEL = "openai/gpt-4o-mini"
PRICES = PriceTable().with_overrides({"openai": {"gpt-4o-mini": {"input": 1000.0, "output": 1000.0}}})
"""$0.001 a token: a few cents a call, so a small budget runs out after a couple of calls."""


@pytest.fixture(autouse=True)
def _limits_switch_restored() -> Iterator[None]:
    from workflows.limiter import install_limits, limits_enabled

    before = limits_enabled()
    yield
    install_limits(before)


# --- the ledger (pure) ---------------------------------------------------------------------------

NOON = 1_795_000_000.0  # 2026-11-18 (UTC)


def _call(n: int, cost: float, at: float = NOON) -> Waiting:
    return Waiting(
        id=str(n),
        requester="wf",
        tenant="acme",
        tokens=1,
        since=at,
        cost_usd=cost,
        periods=list(budget_periods(at).values()),
    )


def test_periods_are_the_utc_day_and_month() -> None:
    assert budget_periods(NOON) == {"day": "2026-11-18", "month": "2026-11"}


def test_a_call_is_refused_when_spend_reservations_and_its_estimate_pass_the_budget() -> None:
    limit = RateLimit(cost_per_day_usd=1.0, cost_per_month_usd=10.0)
    ledger = Ledger(limit=limit)
    assert ledger.budget_refusal(limit, "acme", 0.6, NOON) is None
    ledger.request(_call(1, 0.6))
    assert [g.id for g in ledger.admit(NOON)] == ["1"]
    refusal = ledger.budget_refusal(limit, "acme", 0.5, NOON)
    assert refusal is not None, "0.6 reserved + 0.5 passes $1 a day"
    assert (refusal.period, refusal.period_id, refusal.reserved_usd) == ("day", "2026-11-18", 0.6)
    assert "tenant 'acme'" in refusal.message() and "$1.00 for 2026-11-18" in refusal.message()
    ledger.release("1", None, NOON + 1, cost_usd=0.25)
    assert ledger.spend == {"2026-11-18": 0.25, "2026-11": 0.25}, "the actual cost replaces the estimate"
    assert ledger.budget_refusal(limit, "acme", 0.5, NOON) is None
    assert not ledger.release("1", None, NOON + 2, cost_usd=0.25), "a second release settles nothing"
    assert ledger.spend["2026-11-18"] == 0.25
    assert ledger.budget_refusal(limit, "acme", 0.5, NOON + 86_400) is None, "a new day, a new budget"


def test_a_raise_holds_for_the_current_period_and_an_expired_lease_settles_its_estimate() -> None:
    limit = RateLimit(cost_per_day_usd=1.0)
    ledger = Ledger(limit=limit)
    waiting = _call(1, 0.9)
    waiting.lease_s = 10
    ledger.request(waiting)
    ledger.admit(NOON)
    ledger.admit(NOON + 11)
    assert ledger.spend["2026-11-18"] == 0.9, "never reported: the estimate is settled"
    refusal = ledger.budget_refusal(limit, "acme", 0.2, NOON + 12)
    assert refusal is not None
    assert refusal.covering().cost_per_day_usd == pytest.approx(1.1)
    ledger.raise_budget(TenantBudgetRaise(cost_per_day_usd=2.0), NOON + 12)
    assert ledger.budget_refusal(limit, "acme", 0.2, NOON + 12) is None
    assert ledger.budget_refusal(limit, "acme", 1.2, NOON + 86_400) is not None, "tomorrow: $1 again"


def test_budgets_are_per_tenant_and_named_when_misplaced() -> None:
    assert RateLimit(cost_per_month_usd=5).budgets() == {"month": 5}
    with pytest.raises(ValueError, match=r"limits.models.openai/gpt-4o-mini.cost_per_day_usd"):
        LimitsConfig.model_validate({"models": {MODEL: {"cost_per_day_usd": 1}}})
    with pytest.raises(ValueError, match="cost_per_day_usd or cost_per_month_usd"):
        TenantBudgetRaise()
    with pytest.raises(ValueError, match="on_exceed"):
        PipelineSpec.model_validate(
            {"name": "x", "tenant_budget": {"on_exceed": "ignore"}, "steps": _steps(1)}
        )


# --- on Temporal ---------------------------------------------------------------------------------


@pytest.fixture
async def priced_registry(sim: SimulatorServer) -> AsyncIterator[Registry]:
    reg = build_registry(provider_settings=simulator_settings(sim.url))
    try:
        yield reg
    finally:
        await reg.aclose()


def _steps(count: int, retried: str | None = None) -> list[dict[str, Any]]:
    """``count`` one-call steps; with ``retried`` (a fault key), the second call fails once with a 500
    and is retried by Temporal under the same reservation."""
    steps: list[dict[str, Any]] = [
        {"id": f"s{n}", "model": MODEL, "prompt": f"Step {n}.", "max_tokens": 8} for n in range(count)
    ]
    if retried is not None and count > 1:
        steps[1]["prompt"] += f" [[sim: fault=500 times=1 key={retried}]]"
        steps[1]["retry"] = {"initial_interval_s": 0.2}
    return steps


def _spec(
    name: str, on_exceed: str | None, steps: int = 5, retried: str | None = None, **policy: Any
) -> PipelineSpec:
    data: dict[str, Any] = {"name": name, "steps": _steps(steps, retried)}
    if on_exceed is not None:
        data["tenant_budget"] = {"on_exceed": on_exceed, **policy}
    return PipelineSpec.model_validate(data)


async def _until(
    handle: WorkflowHandle[Any, Any],
    check: Callable[[dict[str, Any]], bool],
    what: str,
    *,
    within: float = 60,
) -> dict[str, Any]:
    """Poll the status query until ``check`` holds; fail with the last status seen."""
    deadline = time.monotonic() + within
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = await handle.query("status")
        if check(status):
            return status
        if status.get("status") not in ("running", "paused"):
            break
        await asyncio.sleep(0.1)
    pytest.fail(f"{what}: not seen; last status: {status}")


async def _ledger(client: Client, queue: str, tenant: str) -> dict[str, Any]:
    state: dict[str, Any] = await client.get_workflow_handle(limiter_id(f"tenant:{tenant}", queue)).query(
        "state"
    )
    return state


def _day_spend(state: dict[str, Any]) -> float:
    return sum(v for k, v in state["spend_usd"].items() if len(k) == 10)


async def _with_worker(
    client: Client, registry: Registry, budget: float, body: Callable[[str], Awaitable[None]]
) -> None:
    queue = f"budget-{uuid.uuid4().hex[:8]}"
    limits = LimitsConfig(tenants={"acme": RateLimit(cost_per_day_usd=budget)}, default_output_tokens=8)
    async with build_worker(client, task_queue=queue, registry=registry, prices=PRICES, limits=limits):
        await body(queue)


async def _one_call_cost(client: Client, registry: Registry) -> float:
    """What one step of the pipelines below costs, measured on a tenant without a budget."""
    queue = f"budget-{uuid.uuid4().hex[:8]}"
    async with build_worker(client, task_queue=queue, registry=registry, prices=PRICES):
        handle = await start_pipeline(client, _spec("probe", None, steps=1), {}, task_queue=queue)
        result = await asyncio.wait_for(handle.result(), timeout=60)
    assert result.cost_usd > 0
    return float(result.cost_usd)


async def test_a_tenant_over_its_budget_pauses_mid_pipeline_and_a_resume_with_a_new_budget_completes_it(
    client: Client, priced_registry: Registry
) -> None:
    per_call = await _one_call_cost(client, priced_registry)
    outcome: dict[str, Any] = {}

    async def scenario(queue: str) -> None:
        workflow_id = f"tenant/acme/paused-{uuid.uuid4().hex[:8]}"
        spec = _spec("paused", "pause", retried=uuid.uuid4().hex)
        await client.start_workflow(
            "PipelineWorkflow",
            {
                "pipeline": spec.model_dump(mode="json", by_alias=True, exclude_none=True),
                "tenant": "acme",
                "continue_as_new_after": 1,  # a new run before every later step: the ledger must not care
            },
            id=workflow_id,
            task_queue=queue,
        )
        handle = client.get_workflow_handle(workflow_id, result_type=PipelineResult)
        status = await _until(handle, lambda s: s["paused"], "the pause at the tenant's budget")
        outcome["paused"] = status
        outcome["ledger_paused"] = await _ledger(client, queue, "acme")
        await handle.signal(
            "resume", {"reason": "finance agreed", "tenant_budget": {"cost_per_day_usd": 100 * per_call}}
        )
        outcome["result"] = await asyncio.wait_for(handle.result(), timeout=60)
        outcome["ledger"] = await _ledger(client, queue, "acme")
        outcome["run"] = (await handle.query("status"))["run"]

    # Room for two calls' estimates (each a little above its actual cost), not for five.
    await _with_worker(client, priced_registry, 3 * per_call, scenario)
    paused = outcome["paused"]
    done = [s["id"] for s in paused["steps"] if s["status"] == "completed"]
    assert 1 <= len(done) < 5, f"the budget ran out mid-pipeline (completed before the pause: {done})"
    assert paused["pause_reason"].startswith("tenant budget exceeded: tenant 'acme' is over its cost budget")
    assert "per day" in paused["pause_reason"]
    assert outcome["ledger_paused"]["waiting"] == 0 and outcome["ledger_paused"]["active"] == 0
    result = outcome["result"]
    assert result.status == "completed" and len(result.steps) == 5
    assert outcome["run"] > 1, "the pipeline continued as new between its steps"
    assert _day_spend(outcome["ledger"]) == pytest.approx(result.cost_usd, abs=1e-9), (
        "the tenant's ledger equals the sum of the calls' costs"
    )
    assert result.cost_usd == pytest.approx(sum(s.cost_usd for s in result.steps), abs=1e-9)
    assert list(outcome["ledger"]["raised_usd"].values()) == [pytest.approx(100 * per_call)]


async def test_on_exceed_fail_fails_the_step_naming_tenant_budget_period_and_spend(
    client: Client, priced_registry: Registry
) -> None:
    per_call = await _one_call_cost(client, priced_registry)
    outcome: dict[str, Any] = {}

    async def scenario(queue: str) -> None:
        handle = await start_pipeline(client, _spec("failing", None), {}, task_queue=queue, tenant="acme")
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), timeout=60)
        outcome["error"] = failed.value.cause
        outcome["status"] = await handle.query("status")
        outcome["ledger"] = await _ledger(client, queue, "acme")

    await _with_worker(client, priced_registry, 3 * per_call, scenario)
    error = outcome["error"]
    assert isinstance(error, ApplicationError) and error.type == "TenantBudgetExceeded"
    assert "tenant 'acme' is over its cost budget per day" in error.message
    assert f"for {budget_periods(time.time())['day']} (UTC)" in error.message
    assert "spent" in error.message and "on_exceed: fail" in error.message
    steps = outcome["status"]["steps"]
    spent = sum(s["cost_usd"] or 0 for s in steps)
    failed_steps = [s for s in steps if s["status"] == "failed"]
    assert len(failed_steps) == 1 and failed_steps[0]["id"] != "s0"
    assert _day_spend(outcome["ledger"]) == pytest.approx(spent, abs=1e-9)
    assert outcome["ledger"]["active"] == 0


async def test_on_exceed_approval_waits_for_a_person_who_raises_the_budget(
    client: Client, temporal_target: str, priced_registry: Registry
) -> None:
    per_call = await _one_call_cost(client, priced_registry)
    outcome: dict[str, Any] = {}

    async def scenario(queue: str) -> None:
        spec = _spec("approved", "approval", retried=uuid.uuid4().hex, approvers=["finance"])
        handle = await start_pipeline(client, spec, {}, task_queue=queue, tenant="acme")
        status = await _until(
            handle,
            lambda s: any(a["status"] == "waiting" for a in s["approvals"]),
            "a tenant budget approval",
        )
        approval = next(a for a in status["approvals"] if a["status"] == "waiting")
        outcome["approval"] = approval
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update("approve", {"step_id": approval["step_id"], "by": "mallory"})
        outcome["refused"] = refused.value.cause
        # As a person would: the CLI, with the new budget.
        approved = await asyncio.to_thread(
            subprocess.run,
            [kernelflow_binary(), "approve", handle.id, approval["step_id"], "--by", "finance",
             "--cost-per-day-usd", str(100 * per_call), "--address", temporal_target, "--json"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "KERNELFLOW_PAYLOADS_STORAGE": "off", "KERNELFLOW_TASK_QUEUE": queue},
        )  # fmt: skip
        assert approved.returncode == 0, approved.stderr
        outcome["approved"] = json.loads(approved.stdout)
        outcome["result"] = await asyncio.wait_for(handle.result(), timeout=60)
        outcome["ledger"] = await _ledger(client, queue, "acme")

    await _with_worker(client, priced_registry, 3 * per_call, scenario)
    refused = outcome["refused"]
    assert isinstance(refused, ApplicationError) and refused.type == "NotAnApprover"
    assert "'mallory' may not decide approval 'tenant-budget-1'" in refused.message
    approval = outcome["approval"]
    assert approval["step_id"] == "tenant-budget-1"
    assert BudgetRefusal.model_validate(approval["budget"]).tenant == "acme"
    assert "tenant 'acme' is over its cost budget per day" in approval["message"]
    assert outcome["approved"]["status"] == "approved" and outcome["approved"]["by"] == "finance"
    assert outcome["approved"]["raised"] == {
        "cost_per_day_usd": pytest.approx(100 * per_call),
        "cost_per_month_usd": None,
    }
    result = outcome["result"]
    assert result.status == "completed"
    assert [f.error_type for f in result.steps[1].failures] == [], "the 500 was retried, not failed over"
    assert _day_spend(outcome["ledger"]) == pytest.approx(result.cost_usd, abs=1e-9)


# --- reload without a restart --------------------------------------------------------------------


async def test_a_worker_process_applies_a_changed_limits_section_on_sighup(
    client: Client, temporal_target: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    queue = f"reload-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "kernelflow.yaml"

    def write(limits: dict[str, Any]) -> None:
        config.write_text(
            json.dumps(
                {"prices": {"openai": {"gpt-4o-mini": {"input": 1000, "output": 1000}}}, "limits": limits}
            )
        )

    before = {"models": {MODEL: {"requests_per_second": 50}}}
    after = {
        "models": {MODEL: {"requests_per_second": 2}},
        "tenants": {"acme": {"cost_per_day_usd": 0.000001}},
    }
    write(before)
    env = {
        "TEMPORAL_ADDRESS": temporal_target,
        "KERNELFLOW_TASK_QUEUE": queue,
        "KERNELFLOW_CONFIG": str(config),
        "KERNELFLOW_PAYLOADS_STORAGE": "off",
        "OPENAI_BASE_URL": sim.url.rstrip("/") + "/v1",
        "OPENAI_API_KEY": "sim-key",
    }
    with WorkerProcess(env, cwd=tmp_path) as worker:
        worker.wait_started(within=60)
        spec = _spec("reloaded", None, steps=1)
        first = await start_pipeline(client, spec, {}, task_queue=queue, tenant="acme")
        assert (await asyncio.wait_for(first.result(), timeout=60)).status == "completed"
        limiter = client.get_workflow_handle(limiter_id(MODEL, queue))
        assert (await limiter.query("state"))["limit"]["requests_per_second"] == 50

        write(after)
        assert worker.process is not None
        worker.process.send_signal(signal.SIGHUP)
        reloaded = worker.wait_for(lambda r: r.get("event") == "config reloaded", within=30)
        assert "limits changed" in reloaded["changes"]

        second = await start_pipeline(client, spec, {}, task_queue=queue, tenant="acme")
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(second.result(), timeout=60)
        others = [await start_pipeline(client, spec, {}, task_queue=queue, tenant="beta") for _ in range(5)]
        results = await asyncio.gather(*(asyncio.wait_for(h.result(), timeout=60) for h in others))
        assert all(r.status == "completed" for r in results)
        state = await limiter.query("state")
    cause = failed.value.cause
    assert isinstance(cause, ApplicationError) and cause.type == "TenantBudgetExceeded", (
        "the tenant budget added by the reload refuses the call"
    )
    assert state["limit"]["requests_per_second"] == 2, "the reloaded rate reached the limiter"
    waited = [
        e
        for h in others
        async for e in h.fetch_history_events()
        if e.HasField("workflow_execution_signaled_event_attributes")
        and e.workflow_execution_signaled_event_attributes.signal_name == "kernelflow_capacity"
    ]
    assert waited, "5 calls at once at the reloaded 2/s: some waited for capacity"


# --- what the interpreter does with a refusal (in-memory effects) ---------------------------------


def _refusal() -> BudgetRefusal:
    return BudgetRefusal(
        tenant="acme",
        period="month",
        period_id="2026-01",
        budget_usd=10.0,
        spent_usd=9.5,
        reserved_usd=0.25,
        estimate_usd=0.5,
    )


async def test_the_interpreter_fails_pauses_or_asks_for_an_approval_as_the_spec_says() -> None:
    from kernel.engine import Engine, RunInfo
    from kernel.errors import FailureType
    from kernel.pipeline import parse_pipeline
    from kernel.run import PipelineStatus, RunState
    from kernel.steps import StepFailure
    from tests.test_engine_unit import FakeEffects

    def engine(policy: dict[str, Any] | None, effects: FakeEffects) -> Engine:
        data: dict[str, Any] = {"name": "p", "steps": _steps(1)}
        if policy is not None:
            data["tenant_budget"] = policy
        spec = parse_pipeline(data)
        return Engine(spec, RunState(status=PipelineStatus(pipeline="p")), effects, RunInfo("wf", "p"))

    with pytest.raises(StepFailure) as failed:
        await engine(None, FakeEffects()).tenant_budget_exceeded(_refusal())
    assert failed.value.type == FailureType.TENANT_BUDGET_EXCEEDED
    assert "per month: $10.00 for 2026-01 (UTC), $9.50 spent and $0.25 reserved" in failed.value.message

    pausing = FakeEffects()
    paused = engine({"on_exceed": "pause"}, pausing)

    def resume() -> None:
        assert paused.state.status.pause_reason is not None
        assert paused.state.status.pause_reason.startswith("tenant budget exceeded: tenant 'acme'")
        paused.state.tenant_budget_raise = TenantBudgetRaise(cost_per_month_usd=20)
        paused.state.status.paused = False

    pausing.on_wait = resume
    assert await paused.tenant_budget_exceeded(_refusal()) == TenantBudgetRaise(cost_per_month_usd=20)

    for decision, raised in (("approved", None), ("rejected", None), ("approved", 15.0)):
        asking = FakeEffects()
        asked = engine({"on_exceed": "approval", "approvers": ["finance"]}, asking)

        def decide(asked: Engine = asked, decision: str = decision, raised: float | None = raised) -> None:
            approval = asked.state.decisions["tenant-budget-1"]
            assert approval.status == "waiting" and approval.approvers == ["finance"]
            approval.status, approval.by = decision, "finance"  # type: ignore[assignment]
            approval.raised = TenantBudgetRaise(cost_per_month_usd=raised) if raised else None

        asking.on_wait = decide
        if decision == "rejected":
            with pytest.raises(StepFailure, match="raising it was rejected by finance"):
                await asked.tenant_budget_exceeded(_refusal())
        else:
            got = await asked.tenant_budget_exceeded(_refusal())
            assert got is not None and got.cost_per_month_usd == pytest.approx(raised or 10.25)
        assert [e.type for e in asking.events] == ["approval.requested", "approval.decided"]
