"""Provider batches against the simulator over HTTP: the kernel's batch contract (idempotent submission
under a tag, status, per-item results in order with errors classified like realtime calls, expiry,
cancellation) as the OpenAI provider speaks it, and the simulator's batch endpoints and counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from kernel.batch import BatchItem, BatchJob, BatchLimits, batch_tag, split_batch
from kernel.contracts import ChatRequest, UserMessage
from kernel.errors import InvalidRequest, UnsupportedCapability
from kernel.provider import Provider, ProviderSettings
from providers.gemini import GeminiProvider
from providers.mistral import MistralProvider
from providers.openai import OpenAIProvider
from simulator.server import SimulatorServer

pytestmark = pytest.mark.timeout(60)


def _items(count: int, model: str = "gpt-4o-mini", prefix: str = "item") -> list[BatchItem]:
    return [
        BatchItem(
            custom_id=f"{prefix}-{i}",
            request=ChatRequest(model=model, messages=[UserMessage(content=f"question {i}")]),
        )
        for i in range(count)
    ]


def _control(sim: SimulatorServer, **control: object) -> dict[str, object]:
    response = httpx.post(f"{sim.url}/_sim/batches", json=control)
    response.raise_for_status()
    data: dict[str, object] = response.json()
    return data


def _counts(sim: SimulatorServer) -> dict[str, object]:
    data: dict[str, object] = httpx.get(f"{sim.url}/_sim/batches").json()
    return data


@pytest.fixture(autouse=True)
def _default_batch_control_after(sim: SimulatorServer) -> Iterator[None]:
    """The simulator is shared by the session: leave its batches behaving by default for later tests."""
    yield
    _control(sim)


@pytest.fixture
async def openai(sim: SimulatorServer) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider(
        settings=ProviderSettings(api_key="sk-test", base_url=f"{sim.url}/v1"), environ={}
    )
    try:
        yield provider
    finally:
        await provider.aclose()


async def _until_ended(provider: Provider, batch_id: str) -> BatchJob:
    while True:
        job = await provider.batch_status(batch_id)
        if job.ended:
            return job
        await asyncio.sleep(0.05)


async def test_openai_batch_answers_every_item_in_order(sim: SimulatorServer, openai: OpenAIProvider) -> None:
    items = _items(5)
    job = await openai.batch_submit(batch_tag("wf-1", "step", "0"), items)
    assert job.provider == "openai" and job.tag == batch_tag("wf-1", "step", "0")
    ended = await _until_ended(openai, job.id)
    assert ended.state == "completed" and ended.counts.total == 5 and ended.counts.completed == 5
    results = await openai.batch_results(job.id, [i.custom_id for i in items], "gpt-4o-mini")
    assert [r.custom_id for r in results] == [i.custom_id for i in items]
    assert all(r.outcome == "succeeded" and r.response is not None for r in results)
    # The simulator echoes the prompt, so each answer is its own item's.
    for index, result in enumerate(results):
        assert result.response is not None and f"question {index}" in (result.response.text or "")
        assert result.response.usage.prompt_tokens > 0
    assert _counts(sim)["created"] == 1


async def test_submitting_again_under_the_same_tag_finds_the_batch(
    sim: SimulatorServer, openai: OpenAIProvider
) -> None:
    _control(sim, complete_after_s=30)
    items = _items(3)
    tag = batch_tag("wf-2", "summaries", "0")
    first = await openai.batch_submit(tag, items)
    # A second worker, knowing only the tag, as after a crash right after the provider accepted.
    other = OpenAIProvider(settings=ProviderSettings(api_key="sk-test", base_url=f"{sim.url}/v1"), environ={})
    try:
        found = await other.batch_find(tag)
        again = await other.batch_submit(tag, items)
    finally:
        await other.aclose()
    assert found is not None and found.id == first.id
    assert again.id == first.id and again.state == "in_progress"
    assert await openai.batch_find(batch_tag("wf-2", "summaries", "1")) is None
    assert _counts(sim)["created"] == 1


async def test_item_failures_are_classified_like_realtime_calls(
    sim: SimulatorServer, openai: OpenAIProvider
) -> None:
    items = _items(3)
    items[1] = BatchItem(
        custom_id="item-1",
        request=ChatRequest(model="gpt-4o-mini", messages=[UserMessage(content="[[sim: fault=429]] hi")]),
    )
    items[2] = BatchItem(
        custom_id="item-2",
        request=ChatRequest(model="gpt-4o-mini", messages=[UserMessage(content="[[sim: fault=400]] hi")]),
    )
    job = await openai.batch_submit(batch_tag("wf-3"), items)
    ended = await _until_ended(openai, job.id)
    assert ended.counts.completed == 1 and ended.counts.failed == 2
    results = await openai.batch_results(job.id, [i.custom_id for i in items], "gpt-4o-mini")
    assert [r.outcome for r in results] == ["succeeded", "errored", "errored"]
    assert (results[1].error_type, results[1].retryable) == ("RateLimited", True)
    assert (results[2].error_type, results[2].retryable) == ("InvalidRequest", False)


async def test_an_expired_batch_answers_some_items_and_expires_the_rest(
    sim: SimulatorServer, openai: OpenAIProvider
) -> None:
    _control(sim, expire=True, expire_keep=2)
    items = _items(5)
    job = await openai.batch_submit(batch_tag("wf-4"), items)
    ended = await _until_ended(openai, job.id)
    assert ended.state == "expired"
    results = await openai.batch_results(job.id, [i.custom_id for i in items], "gpt-4o-mini")
    assert [r.outcome for r in results] == ["succeeded", "succeeded", "expired", "expired", "expired"]


async def test_cancelling_stops_the_batch(sim: SimulatorServer, openai: OpenAIProvider) -> None:
    _control(sim, complete_after_s=30)
    items = _items(4)
    job = await openai.batch_submit(batch_tag("wf-5"), items)
    cancelled = await openai.batch_cancel(job.id)
    assert cancelled.state == "cancelled"
    assert (await openai.batch_status(job.id)).ended
    results = await openai.batch_results(job.id, [i.custom_id for i in items], "gpt-4o-mini")
    assert {r.outcome for r in results} == {"cancelled"}
    assert _counts(sim)["cancelled"] == 1
    assert sim.stats()["requests"] == 0  # no item ran


async def test_refusals_before_any_call(sim: SimulatorServer, openai: OpenAIProvider) -> None:
    mistral = MistralProvider(settings=ProviderSettings(api_key="k", base_url=f"{sim.url}/v1"), environ={})
    with pytest.raises(UnsupportedCapability, match="does not take batches"):
        await mistral.batch_submit(batch_tag("x"), _items(1, model="mistral-small-latest"))
    await mistral.aclose()
    doubled = _items(1) + _items(1)
    with pytest.raises(InvalidRequest, match="appears twice"):
        await openai.batch_submit(batch_tag("y"), doubled)
    with pytest.raises(ValueError, match="custom_id"):
        BatchItem(custom_id="has space", request=doubled[0].request)
    assert _counts(sim)["created"] == 0


def test_split_respects_count_and_bytes() -> None:
    items = _items(10)
    by_count = split_batch(items, BatchLimits(max_requests=4, max_bytes=10**9), lambda i: 100)
    assert [len(p) for p in by_count] == [4, 4, 2]
    by_bytes = split_batch(items, BatchLimits(max_requests=100, max_bytes=350), lambda i: 100)
    assert [len(p) for p in by_bytes] == [3, 3, 3, 1]
    assert [i.custom_id for p in by_bytes for i in p] == [i.custom_id for i in items]
    with pytest.raises(ValueError, match="at most 50 bytes"):
        split_batch(items, BatchLimits(max_requests=100, max_bytes=50), lambda i: 100)


def test_tags_are_deterministic() -> None:
    assert batch_tag("a", "b") == batch_tag("a", "b")
    assert batch_tag("a", "b") != batch_tag("ab")
    assert len(batch_tag("x")) <= 64


@pytest.fixture
async def gemini(sim: SimulatorServer) -> AsyncIterator[GeminiProvider]:
    provider = GeminiProvider(settings=ProviderSettings(api_key="AIza-test", base_url=sim.url), environ={})
    try:
        yield provider
    finally:
        await provider.aclose()


async def test_gemini_batch_mode_answers_in_order_finds_by_tag_and_classifies_failures(
    sim: SimulatorServer, gemini: GeminiProvider
) -> None:
    _control(sim, complete_after_s=0.3)
    items = _items(4, model="gemini-2.5-flash", prefix="g")
    items[2] = BatchItem(
        custom_id="g-2",
        request=ChatRequest(model="gemini-2.5-flash", messages=[UserMessage(content="[[sim: fault=400]] x")]),
    )
    tag = batch_tag("wf-g", "step")
    job = await gemini.batch_submit(tag, items)
    assert job.state == "in_progress" and job.tag == tag
    assert (await gemini.batch_submit(tag, items)).id == job.id
    await _until_ended(gemini, job.id)
    results = await gemini.batch_results(job.id, [i.custom_id for i in items], "gemini-2.5-flash")
    assert [r.outcome for r in results] == ["succeeded", "succeeded", "errored", "succeeded"]
    assert results[2].error_type == "InvalidRequest" and not results[2].retryable
    assert results[3].response is not None and "question 3" in (results[3].response.text or "")
    assert _counts(sim)["by_wire"] == {"gemini": 1}


async def test_gemini_cancel_and_expiry(sim: SimulatorServer, gemini: GeminiProvider) -> None:
    _control(sim, complete_after_s=30)
    items = _items(2, model="gemini-2.5-flash", prefix="c")
    job = await gemini.batch_submit(batch_tag("wf-gc"), items)
    assert (await gemini.batch_cancel(job.id)).state == "cancelled"
    results = await gemini.batch_results(job.id, [i.custom_id for i in items], "gemini-2.5-flash")
    assert [r.outcome for r in results] == ["cancelled", "cancelled"]
    _control(sim, expire=True, expire_keep=1)
    expired = await gemini.batch_submit(batch_tag("wf-ge"), items)
    await _until_ended(gemini, expired.id)
    results = await gemini.batch_results(expired.id, [i.custom_id for i in items], "gemini-2.5-flash")
    assert [r.outcome for r in results] == ["succeeded", "expired"]
