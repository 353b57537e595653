"""Admission control: the ledger's decisions, then the limiter workflow on a real Temporal server with
the simulator enforcing the same limit with 429s, across worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowQueryFailedError
from temporalio.service import RPCError

from kernel.limits import Ledger, LimitsConfig, RateLimit, Waiting
from kernel.pipeline import PipelineSpec
from kernel.registry import Registry
from simulator.core import RateLimitRule, SimulatorConfig
from simulator.server import SimulatorServer
from tests.worker_process import WorkerProcess
from worker.app import build_registry, build_worker, simulator_settings
from worker.client import start_pipeline
from workflows.limiter import limiter_id

pytestmark = pytest.mark.timeout(240)

MODEL = "openai/gpt-4o-mini"
LIMIT = RateLimit(requests_per_second=5, tokens_per_second=2000, output_tokens=200)


@pytest.fixture(autouse=True)
def _limits_switch_restored() -> Iterator[None]:
    """Workers built here switch admission on for this process; later tests get it back as it was."""
    from workflows.limiter import install_limits, limits_enabled

    before = limits_enabled()
    yield
    install_limits(before)


def max_in_window(times: Sequence[float], window: float) -> int:
    """The most timestamps in any half-open window ``[t, t + window)``."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, at in enumerate(ordered):
        while ordered[start] <= at - window:
            start += 1
        best = max(best, end - start + 1)
    return best


# --- the ledger (pure) ---------------------------------------------------------------------------


def _waiting(n: int, tenant: str = "", tokens: int = 10, lease_s: float = 60.0) -> Waiting:
    return Waiting(id=f"{tenant}{n}", requester="wf", tenant=tenant, tokens=tokens, lease_s=lease_s, since=0)


def test_a_call_counts_from_admission_until_a_period_after_its_release() -> None:
    ledger = Ledger(limit=RateLimit(requests_per_second=2))
    for n in range(5):
        assert ledger.request(_waiting(n))
    assert [g.id for g in ledger.admit(100.0)] == ["0", "1"]
    ledger.release("0", None, 100.2)
    assert ledger.admit(100.5) == [], "a released call still counts for a period after its release"
    assert ledger.next_change(100.5) == pytest.approx(101.2)
    assert [g.id for g in ledger.admit(101.2)] == ["2"], "call 1, never released, still counts"
    ledger.release("1", None, 101.3)
    assert ledger.admit(102.2) == []
    assert [g.id for g in ledger.admit(102.3)] == ["3"]


def test_a_reported_answer_time_starts_the_trailing_window_earlier_than_the_release() -> None:
    ledger = Ledger(limit=RateLimit(requests_per_second=1))
    for n in range(3):
        ledger.request(_waiting(n))
    assert [g.id for g in ledger.admit(100.0)] == ["0"]
    ledger.release("0", None, 100.5, answered_at=100.2)
    assert ledger.next_change(100.5) == pytest.approx(101.2), "the provider had the request by 100.2"
    assert ledger.admit(101.1) == []
    assert [g.id for g in ledger.admit(101.2)] == ["1"]
    ledger.release("1", None, 101.4, answered_at=101.9)  # a worker clock ahead: the release stands
    assert ledger.admit(102.3) == []
    assert [g.id for g in ledger.admit(102.4)] == ["2"]


@pytest.mark.parametrize("seed", range(20))
def test_calls_granted_ahead_never_put_more_than_the_limit_in_any_window_at_the_provider(seed: int) -> None:
    """A simulated fleet: calls are granted (ahead when a slot opens soon), sent after a random
    dispatch delay from their grant but never before their not-before, answered, and report back
    later still. Whatever the delays, no window of a second at the
    provider holds more than the limit, and granting ahead fills the limit better than not."""
    import random

    def run(ahead: bool) -> tuple[int, float]:
        rng = random.Random(seed)
        limit = RateLimit(requests_per_second=5)
        ledger = Ledger(limit=limit)
        now, sends, pending = 0.0, [], []  # pending: (report time, id, answered)
        for n in range(120):
            ledger.request(
                Waiting(id=str(n), requester="wf", tokens=1, since=now, schedules=ahead, lease_s=60)
            )
        while ledger.waiting or pending:
            for grant in ledger.admit(now):
                # The grant travels to the worker and the activity is dispatched meanwhile; the
                # request waits for its not-before, never less.
                send = max(grant.starts, grant.at + rng.uniform(0.05, 0.3))
                answered = send + rng.uniform(0.001, 0.2)
                sends.append(send)
                pending.append((answered + rng.uniform(0.01, 0.3), grant.id, answered))
            pending.sort()
            wake = ledger.next_change(now)
            if pending and (wake is None or pending[0][0] <= wake):
                now, request_id, answered = pending.pop(0)
                ledger.release(request_id, None, now, answered_at=answered)
            elif wake is not None:
                now = wake
        return max_in_window(sends, 1.0), (len(sends) - 1) / (max(sends) - min(sends))

    most, rate = run(ahead=True)
    most_without, rate_without = run(ahead=False)
    assert most <= 5 and most_without <= 5
    assert rate > rate_without


@pytest.mark.parametrize("seed", range(10))
def test_the_sweep_agrees_with_checking_every_instant(seed: int) -> None:
    """``_fits_at`` (a sweep) against the rule written out: at every instant from ``at`` on, the calls
    counting there plus the new one stay within requests and tokens."""
    import random

    from kernel.limits import Grant

    rng = random.Random(seed)
    limit = RateLimit(requests_per_second=4, tokens_per_second=1000)
    for _ in range(50):
        grants = []
        for n in range(rng.randint(0, 7)):
            at = rng.uniform(0, 3)
            ahead = rng.random() < 0.3
            start = at + rng.uniform(0, 1) if ahead else at
            released = rng.random() < 0.7
            end = start + rng.uniform(0, 1)
            grants.append(
                Grant(
                    id=str(n),
                    requester="wf",
                    tokens=rng.randint(0, 600),
                    at=at,
                    expires=at + 60,
                    not_before=start if ahead else None,
                    released_at=end + rng.uniform(0, 0.3) if released else None,
                    answered_at=end if released else None,
                )
            )
        ledger = Ledger(limit=limit, grants=grants)
        item = _waiting(99, tokens=rng.randint(1, 600))
        at = rng.uniform(0, 4)
        instants = [at, *(g.starts for g in grants if g.starts > at)]

        def fits_at_every_instant(grants: list[Grant], item: Waiting, instants: list[float]) -> bool:
            for instant in instants:
                covering = [
                    g
                    for g in grants
                    if g.starts <= instant
                    and (
                        (since := g.counted_from) is None
                        or (since + 1.0 > instant and since + 1.0 > g.starts)
                    )
                ]
                if len(covering) + 1 > 4:
                    return False
                if covering and sum(g.tokens for g in covering) + item.tokens > 1000:
                    return False
            return True

        assert ledger._fits_at(item, at) == fits_at_every_instant(grants, item, instants)


def test_the_same_request_id_reserves_once() -> None:
    ledger = Ledger(limit=RateLimit(requests_per_second=10))
    assert ledger.request(_waiting(1))
    assert not ledger.request(_waiting(1))
    assert len(ledger.admit(0.0)) == 1
    assert not ledger.request(_waiting(1)), "a granted id asked again (a retried activity) is not queued"
    assert ledger.admit(0.0) == []


def test_reported_usage_replaces_the_estimate_in_the_token_window() -> None:
    ledger = Ledger(limit=RateLimit(tokens_per_second=1000))
    ledger.request(_waiting(1, tokens=900))
    ledger.request(_waiting(2, tokens=900))
    assert [g.id for g in ledger.admit(0.0)] == ["1"]
    assert ledger.admit(0.1) == [], "the estimate holds the window"
    assert ledger.release("1", 50, 0.2)
    assert [g.id for g in ledger.admit(0.2)] == ["2"], "the reported 50 tokens leave room"


def test_concurrency_and_leases_that_expire() -> None:
    ledger = Ledger(limit=RateLimit(concurrent=1))
    ledger.request(_waiting(1, lease_s=30))
    ledger.request(_waiting(2, lease_s=30))
    assert [g.id for g in ledger.admit(0.0)] == ["1"]
    assert ledger.admit(10.0) == []
    assert ledger.next_change(10.0) == pytest.approx(30.0)
    assert [g.id for g in ledger.admit(30.0)] == ["2"], "a reservation never released expires"
    assert ledger.expired == 1


def test_tenants_take_turns_and_each_is_first_come_first_served() -> None:
    ledger = Ledger(limit=RateLimit(requests_per_second=1))
    for n in range(3):
        ledger.request(_waiting(n, tenant="a"))
    ledger.request(_waiting(0, tenant="b"))
    order: list[str] = []
    for t in range(4):
        for grant in ledger.admit(2.0 * t):
            order.append(grant.id)
            ledger.release(grant.id, None, 2.0 * t)
    assert order == ["a0", "b0", "a1", "a2"]


def test_a_limit_needs_a_bound_and_bad_keys_are_named() -> None:
    with pytest.raises(ValueError, match="at least one of"):
        RateLimit()
    with pytest.raises(ValueError, match="requests_per_hour"):
        LimitsConfig.model_validate({"models": {MODEL: {"requests_per_hour": 5}}})
    config = LimitsConfig.model_validate(
        {"models": {"anthropic": {"concurrent": 2}, MODEL: {"concurrent": 1}}}
    )
    assert config.key_for("anthropic/claude-sonnet-4") == "anthropic"
    assert config.key_for(MODEL) == MODEL
    assert config.key_for("openai/gpt-4.1") is None


def test_a_sharded_key_splits_every_limit_and_a_request_always_picks_the_same_shard() -> None:
    limit = RateLimit(requests_per_second=6, tokens_per_minute=9000, concurrent=4, shards=3)
    shards = [limit.shard(str(uuid.uuid4())) for _ in range(200)]
    assert {shard[0] for shard in shards if shard is not None} == {0, 1, 2}
    request_id = str(uuid.uuid4())
    picked = limit.shard(request_id)
    assert picked is not None and picked == limit.shard(request_id)
    share = picked[1]
    assert (share.requests_per_second, share.tokens_per_minute, share.concurrent, share.shards) == (
        2,
        3000,
        1,
        1,
    )
    assert RateLimit(requests_per_second=5).shard(request_id) is None
    with pytest.raises(ValueError, match="concurrent"):
        RateLimit(concurrent=2, shards=3)
    with pytest.raises(ValueError, match="only a model's limit is sharded"):
        LimitsConfig.model_validate({"tenants": {"a": {"requests_per_second": 4, "shards": 2}}})


# --- on Temporal ---------------------------------------------------------------------------------


@pytest.fixture
def limited_sim() -> Iterator[SimulatorServer]:
    """A simulator that answers 429 beyond 5 requests / 2,000 tokens per second on gpt-4o-mini."""
    config = SimulatorConfig(
        rate_limits={"gpt-4o-mini": RateLimitRule(requests=5, tokens=2000, window_s=1.0)}
    )
    with SimulatorServer(config=config) as server:
        yield server


@pytest.fixture
async def limited_registry(limited_sim: SimulatorServer) -> AsyncIterator[Registry]:
    reg = build_registry(provider_settings=simulator_settings(limited_sim.url))
    try:
        yield reg
    finally:
        await reg.aclose()


def _spec(name: str, *, local: bool = False, steps: int = 3) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": name,
            "steps": [
                {
                    "id": f"s{n}",
                    "model": MODEL,
                    "prompt": f"Step {n}.",
                    "local_activity": local and n % 2 == 0,
                }
                for n in range(steps)
            ],
        }
    )


async def _current_details(handle: Any) -> str:
    """What the Web UI shows as the workflow's current details."""
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return str(metadata.current_details)


def _assert_within_limit(sim: SimulatorServer, calls: int, *, lost_in_flight: int = 0) -> list[float]:
    stats = sim.simulator.stats()
    times = sim.simulator.admitted_times("gpt-4o-mini")
    assert stats["rate_limited"] == 0, "no request may go over the provider's limit"
    assert calls <= len(times) <= calls + lost_in_flight, f"{len(times)} requests for {calls} calls"
    assert max_in_window(times, 1.0) <= 5
    return times


async def test_pipelines_over_the_limit_wait_and_the_provider_sees_at_most_the_limit(
    client: Client, limited_sim: SimulatorServer, limited_registry: Registry
) -> None:
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    limits = LimitsConfig(models={MODEL: LIMIT})
    async with build_worker(client, task_queue=queue, registry=limited_registry, limits=limits):
        handles = [
            await start_pipeline(client, _spec("burst", local=True), {}, task_queue=queue) for _ in range(6)
        ]
        # Someone waits: its current details say on what.
        waiting_seen = status_seen = False
        for _ in range(200):
            for handle in handles:
                details = await _current_details(handle)
                if details.startswith("waiting for capacity on"):
                    assert details == f"waiting for capacity on {MODEL}"
                    status = await handle.query("status")
                    waiting_seen = True
                    status_seen = status["waiting_for_capacity"] == [MODEL] or status_seen
            if waiting_seen and status_seen:
                break
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*(asyncio.wait_for(h.result(), timeout=120) for h in handles))
        assert all(r.status == "completed" for r in results)
        limiter = client.get_workflow_handle(limiter_id(MODEL, queue))
        state = await limiter.query("state")
    _assert_within_limit(limited_sim, 18)
    assert waiting_seen, "18 calls at 5/s: some pipeline must have been seen waiting"
    assert status_seen, "the status query names the key a waiting call waits on"
    assert state["admitted"] == 18 and state["active"] == 0 and state["waiting"] == 0


async def test_a_terminated_pipeline_gives_its_reservation_back_when_its_lease_expires(
    client: Client, limited_sim: SimulatorServer, limited_registry: Registry
) -> None:
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    model = "openai/gpt-4.1-mini"
    limits = LimitsConfig(models={model: RateLimit(concurrent=1)}, lease_s=2)
    spec = PipelineSpec.model_validate(
        {"name": "hold", "steps": [{"id": "slow", "model": model, "prompt": "Slow [[sim: latency=30]]"}]}
    )
    quick = PipelineSpec.model_validate(
        {"name": "quick", "steps": [{"id": "q", "model": model, "prompt": "Hi"}]}
    )
    async with build_worker(client, task_queue=queue, registry=limited_registry, limits=limits):
        holder = await start_pipeline(client, spec, {}, task_queue=queue)
        limiter = client.get_workflow_handle(limiter_id(model, queue))
        for _ in range(400):
            with_state: dict[str, Any] = {}
            with contextlib.suppress(RPCError, WorkflowQueryFailedError):  # not started yet
                with_state = await limiter.query("state")
            if with_state.get("active") == 1:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the first call never took the only slot")
        await holder.terminate("gone")
        after = await start_pipeline(client, quick, {}, task_queue=queue)
        result = await asyncio.wait_for(after.result(), timeout=60)
        state = await limiter.query("state")
    assert result.status == "completed"
    assert state["expired"] >= 1, "the terminated holder's lease expired and its slot came back"


def _worker_env(temporal_target: str, sim: SimulatorServer, queue: str, config: Path) -> dict[str, str]:
    return {
        "TEMPORAL_ADDRESS": temporal_target,
        "KERNELFLOW_TASK_QUEUE": queue,
        "KERNELFLOW_CONFIG": str(config),
        "KERNELFLOW_PAYLOADS_STORAGE": "off",
        "OPENAI_BASE_URL": sim.url.rstrip("/") + "/v1",
        "OPENAI_API_KEY": "sim-key",
    }


async def test_four_worker_processes_share_one_limit_and_a_killed_worker_loses_no_capacity(
    client: Client, temporal_target: str, limited_sim: SimulatorServer, tmp_path: Path
) -> None:
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "kernelflow.yaml"
    config.write_text(json.dumps({"limits": {"models": {MODEL: LIMIT.model_dump(exclude_none=True)}}}))
    env = _worker_env(temporal_target, limited_sim, queue, config)
    workers = [WorkerProcess(env, cwd=tmp_path).start() for _ in range(4)]
    try:
        for worker in workers:
            worker.wait_started(within=60)
        pipelines = 16
        handles = [
            await start_pipeline(client, _spec("fleet", local=True), {}, task_queue=queue)
            for _ in range(pipelines)
        ]
        # Kill one worker mid-burst: what it held is finished by the others, nothing is leaked.
        while len(limited_sim.simulator.admitted_times("gpt-4o-mini")) < 10:  # noqa: ASYNC110 - the simulator's count
            await asyncio.sleep(0.05)
        victim = workers.pop(0)
        assert victim.process is not None
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=30)
        results = await asyncio.gather(*(asyncio.wait_for(h.result(), timeout=180) for h in handles))
        assert all(r.status == "completed" for r in results)
        limiter = client.get_workflow_handle(limiter_id(MODEL, queue))
        state = await limiter.query("state")
        described = await limiter.describe()
    finally:
        for worker in workers:
            worker.stop()
    # A call the killed worker had sent reaches the provider and its answer is lost with the worker:
    # the call runs again elsewhere, admitted again, so still within the limit. The calls in flight at
    # the kill are at most those admitted in the last second: the per-second limit, 5.
    times = _assert_within_limit(limited_sim, pipelines * 3, lost_in_flight=5)
    assert state["active"] == 0 and state["waiting"] == 0, "every reservation was released"
    assert described.status == WorkflowExecutionStatus.RUNNING
    span = max(times) - min(times)
    assert span >= (pipelines * 3 - 5) / 5 - 0.5, "the limiter, not the machine, held the rate"


async def test_a_providers_retry_after_holds_back_every_caller_of_the_key(
    client: Client, sim: SimulatorServer, registry: Registry
) -> None:
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    limits = LimitsConfig(models={MODEL: RateLimit(requests_per_second=100)})
    spec = PipelineSpec.model_validate(
        {
            "name": "told-to-wait",
            "steps": [{"id": "a", "model": MODEL, "prompt": "Hi [[sim: fault=429 retry_after=3 times=1]]"}],
        }
    )
    async with build_worker(client, task_queue=queue, registry=registry, limits=limits):
        first = await start_pipeline(client, spec, {}, task_queue=queue)
        limiter = client.get_workflow_handle(limiter_id(MODEL, queue))
        blocked = 0.0
        for _ in range(200):
            with contextlib.suppress(RPCError, WorkflowQueryFailedError):
                blocked = (await limiter.query("state")).get("blocked_until", 0.0)
            if blocked:
                break
            await asyncio.sleep(0.05)
        other = await start_pipeline(client, _spec("other", steps=1), {}, task_queue=queue)
        seen_waiting = await _current_details(other) == f"waiting for capacity on {MODEL}"
        for _ in range(40):
            if seen_waiting:
                break
            await asyncio.sleep(0.05)
            seen_waiting = await _current_details(other) == f"waiting for capacity on {MODEL}"
        assert (await asyncio.wait_for(first.result(), timeout=60)).status == "completed"
        assert (await asyncio.wait_for(other.result(), timeout=60)).status == "completed"
    assert blocked > 0, "the 429's Retry-After reached the limiter"
    assert seen_waiting, "another pipeline waits out the provider's Retry-After instead of calling"


@pytest.mark.parametrize("limits_on", [False, True])
async def test_a_run_recorded_with_admission_replays_on_workers_with_or_without_limits(
    limits_on: bool,
) -> None:
    from temporalio.client import WorkflowHistory
    from temporalio.contrib.pydantic import pydantic_data_converter
    from temporalio.worker import Replayer

    from worker.app import workflow_runner
    from workflows.limiter import install_limits, limits_enabled
    from workflows.pipeline import PipelineWorkflow

    text = (Path(__file__).parent / "histories" / "limited.json").read_text()
    assert text.count('"signalName": "kernelflow_capacity"') >= 1, "the recording includes a call that waited"
    before = limits_enabled()
    install_limits(limits_on)
    try:
        replayer = Replayer(
            workflows=[PipelineWorkflow],
            data_converter=pydantic_data_converter,
            workflow_runner=workflow_runner(),
        )
        result = await replayer.replay_workflow(
            WorkflowHistory.from_json("limited", text), raise_on_replay_failure=False
        )
    finally:
        install_limits(before)
    assert result.replay_failure is None, str(result.replay_failure)


async def test_the_limiter_continues_as_new_with_its_ledger_and_nothing_is_admitted_twice(
    client: Client, limited_sim: SimulatorServer, limited_registry: Registry
) -> None:
    from workflows.limiter import LimiterInput, LimiterWorkflow

    queue = f"limits-{uuid.uuid4().hex[:8]}"
    limits = LimitsConfig(models={MODEL: LIMIT})
    async with build_worker(client, task_queue=queue, registry=limited_registry, limits=limits):
        limiter = await client.start_workflow(
            LimiterWorkflow.run,
            LimiterInput(key=MODEL, limit=LIMIT, events_per_run=7),
            id=limiter_id(MODEL, queue),
            task_queue=queue,
        )
        handles = [await start_pipeline(client, _spec("carried"), {}, task_queue=queue) for _ in range(5)]
        results = await asyncio.gather(*(asyncio.wait_for(h.result(), timeout=120) for h in handles))
        latest = client.get_workflow_handle(limiter.id)
        state = await latest.query("state")
        described = await latest.describe()
    assert all(r.status == "completed" for r in results)
    assert described.run_id != limiter.first_execution_run_id, "the limiter continued as new"
    assert state["admitted"] == 15 and state["active"] == 0 and state["waiting"] == 0
    _assert_within_limit(limited_sim, 15)


async def test_waiting_calls_are_counted_in_the_workers_metrics_per_key(
    temporal_target: str, limited_sim: SimulatorServer, limited_registry: Registry
) -> None:
    import httpx

    from worker.app import connect
    from worker.config import PayloadSettings
    from worker.devserver import free_port
    from worker.telemetry import build_runtime

    port = free_port()
    runtime = build_runtime(metrics_bind=f"127.0.0.1:{port}")
    client = await connect(temporal_target, payloads=PayloadSettings(storage="off"), runtime=runtime)
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    limits = LimitsConfig(models={MODEL: RateLimit(requests_per_second=2)})
    async with build_worker(client, task_queue=queue, registry=limited_registry, limits=limits):
        handles = [
            await start_pipeline(client, _spec("metered", steps=1), {}, task_queue=queue) for _ in range(5)
        ]
        await asyncio.gather(*(asyncio.wait_for(h.result(), timeout=60) for h in handles))
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    waits = [line for line in text.splitlines() if line.startswith("kernelflow_admission_waits_total{")]
    assert waits and all(f'key="{MODEL}"' in line for line in waits)
    assert sum(float(line.rsplit(" ", 1)[1]) for line in waits) >= 1, "5 calls at 2/s: some waited"
    assert any(line.startswith("kernelflow_admission_wait_bucket{") for line in text.splitlines())


async def test_a_tenants_own_limit_holds_back_only_that_tenant(
    client: Client, limited_sim: SimulatorServer, limited_registry: Registry
) -> None:
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    model = "openai/gpt-4.1-mini"  # no model limit: only the tenant's
    limits = LimitsConfig(tenants={"a": RateLimit(requests_per_second=1)})
    spec = PipelineSpec.model_validate(
        {"name": "tenanted", "steps": [{"id": "q", "model": model, "prompt": "Hi"}]}
    )
    async with build_worker(client, task_queue=queue, registry=limited_registry, limits=limits):
        handles = {
            tenant: [
                await start_pipeline(
                    client, spec, {}, task_queue=queue, workflow_id=f"tenant/{tenant}/{uuid.uuid4()}"
                )
                for _ in range(4)
            ]
            for tenant in ("a", "b")
        }
        results = {
            tenant: await asyncio.gather(*(asyncio.wait_for(h.result(), timeout=60) for h in group))
            for tenant, group in handles.items()
        }
        tenant_limiter = client.get_workflow_handle(limiter_id("tenant:a", queue))
        state = await tenant_limiter.query("state")
        waited = {
            tenant: [
                e.workflow_execution_signaled_event_attributes.signal_name
                for h in group
                async for e in h.fetch_history_events()
                if e.HasField("workflow_execution_signaled_event_attributes")
            ]
            for tenant, group in handles.items()
        }
    assert all(r.status == "completed" for group in results.values() for r in group)
    assert state["admitted"] == 4 and state["active"] == 0
    assert len(waited["a"]) >= 3, "4 calls at 1/s: at least 3 of tenant a's waited for a grant"
    assert waited["b"] == [], "tenant b has no limit of its own and never waits"


async def test_a_sharded_key_spreads_its_calls_over_its_limiters_and_stays_within_the_limit(
    client: Client, limited_sim: SimulatorServer, limited_registry: Registry
) -> None:
    queue = f"limits-{uuid.uuid4().hex[:8]}"
    sharded = LIMIT.model_copy(update={"shards": 2})
    limits = LimitsConfig(models={MODEL: sharded})
    async with build_worker(client, task_queue=queue, registry=limited_registry, limits=limits):
        handles = [await start_pipeline(client, _spec("sharded"), {}, task_queue=queue) for _ in range(5)]
        results = await asyncio.gather(*(asyncio.wait_for(h.result(), timeout=120) for h in handles))
        states = [
            await client.get_workflow_handle(limiter_id(f"{MODEL}#{n}", queue)).query("state") for n in (0, 1)
        ]
    assert all(r.status == "completed" for r in results)
    assert [s["limit"]["requests_per_second"] for s in states] == [2.5, 2.5]
    assert sum(s["admitted"] for s in states) == 15 and all(s["admitted"] > 0 for s in states)
    _assert_within_limit(limited_sim, 15)
