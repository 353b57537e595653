"""The simulator speaks OpenAI's wire format: the official SDK drives it over real HTTP."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator, Iterator
from enum import StrEnum

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel

from simulator.server import SimulatorProcess, SimulatorServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorServer]:
    with SimulatorServer() as server:
        yield server


@pytest.fixture
async def client(sim: SimulatorServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="sk-test", max_retries=0) as client:
        yield client


def _user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def _key() -> str:
    return uuid.uuid4().hex  # a fresh `times` budget per test


class Weather(BaseModel):
    city: str
    days: int


class Status(StrEnum):
    draft = "draft"
    final = "final"


class Step(BaseModel):
    title: str
    minutes: int


class Plan(BaseModel):
    goal: str
    status: Status
    steps: list[Step]
    urgent: bool
    note: str | None


# ---- chat -----------------------------------------------------------------------------------------


async def test_chat_echoes_and_reports_usage(client: openai.AsyncOpenAI) -> None:
    text = "Hello   there [[sim: cached=3]]"
    completion = await client.chat.completions.create(model="gpt-4o", messages=_user(text))
    [choice] = completion.choices
    assert choice.message.content == "Simulated reply from gpt-4o: Hello there"
    assert choice.finish_reason == "stop"
    assert completion.object == "chat.completion"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == math.ceil(len(text) / 4) + 4
    assert completion.usage.completion_tokens == math.ceil(len(choice.message.content) / 4)
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 3
    again = await client.chat.completions.create(model="gpt-4o", messages=_user(text))
    assert again.id == completion.id and again.choices == completion.choices


async def test_reply_directive_and_max_tokens(client: openai.AsyncOpenAI) -> None:
    fixed = await client.chat.completions.create(
        model="gpt-4o-mini", messages=_user('[[sim: reply="Paris."]]')
    )
    assert fixed.choices[0].message.content == "Paris."
    cut = await client.chat.completions.create(
        model="gpt-4o-mini", messages=_user("tell me more"), max_tokens=2
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == "Simulate"


async def test_stream_assembles_to_the_same_text_with_usage_last(client: openai.AsyncOpenAI) -> None:
    messages = _user("stream this answer please")
    whole = await client.chat.completions.create(model="o3", messages=messages)
    stream = await client.chat.completions.create(
        model="o3", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert whole.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert last.usage.completion_tokens_details is not None
    assert last.usage.completion_tokens_details.reasoning_tokens == last.usage.completion_tokens


async def test_tool_call_arguments_match_the_schema(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.parse(
        model="gpt-4.1",
        messages=_user("weather in Lyon?"),
        tools=[openai.pydantic_function_tool(Weather)],
    )
    [choice] = completion.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "Weather"
    assert call.function.parsed_arguments == Weather(city="sample city", days=0)


async def test_tool_choice_picks_the_named_tool(client: openai.AsyncOpenAI) -> None:
    tools = [openai.pydantic_function_tool(Weather), openai.pydantic_function_tool(Step)]
    completion = await client.chat.completions.create(
        model="gpt-4.1",
        messages=_user("plan"),
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "Step"}},
    )
    tool_calls = completion.choices[0].message.tool_calls
    assert tool_calls is not None
    assert [c.function.name for c in tool_calls if c.type == "function"] == ["Step"]


async def test_streamed_tool_call_assembles_to_valid_arguments(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4.1-mini",
        messages=_user("weather?"),
        tools=[openai.pydantic_function_tool(Weather)],
        stream=True,
    )
    ids, names, arguments, finish = [], [], "", None
    async for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            assert delta.index == 0
            if delta.id:
                ids.append(delta.id)
            if delta.function and delta.function.name:
                names.append(delta.function.name)
            if delta.function and delta.function.arguments:
                arguments += delta.function.arguments
        finish = choice.finish_reason or finish
    assert len(ids) == 1 and ids[0].startswith("call_")
    assert names == ["Weather"]
    assert Weather.model_validate_json(arguments) == Weather(city="sample city", days=0)
    assert finish == "tool_calls"


async def test_tool_results_come_back_as_text(client: openai.AsyncOpenAI) -> None:
    first = await client.chat.completions.create(
        model="gpt-4o", messages=_user("weather?"), tools=[openai.pydantic_function_tool(Weather)]
    )
    assert first.choices[0].message.tool_calls is not None
    [call] = first.choices[0].message.tool_calls
    follow_up = await client.chat.completions.create(
        model="gpt-4o",
        messages=[
            {"role": "user", "content": "weather?"},
            first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "sunny and 21C"},
        ],
        tools=[openai.pydantic_function_tool(Weather)],
    )
    assert follow_up.choices[0].finish_reason == "stop"
    assert "sunny and 21C" in (follow_up.choices[0].message.content or "")


async def test_json_schema_response_validates(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.parse(
        model="gpt-5-mini", messages=_user("make a plan"), response_format=Plan
    )
    parsed = completion.choices[0].message.parsed
    assert parsed == Plan(
        goal="sample goal",
        status=Status.draft,
        steps=[Step(title="sample title", minutes=0)],
        urgent=True,
        note="sample note",
    )


async def test_json_object_response(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o", messages=_user("json please"), response_format={"type": "json_object"}
    )
    content = completion.choices[0].message.content or ""
    assert json.loads(content) == {"answer": "Simulated reply from gpt-4o: json please"}


async def test_embeddings_are_deterministic_unit_vectors(client: openai.AsyncOpenAI) -> None:
    result = await client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    assert [len(d.embedding) for d in result.data] == [1536, 1536]
    assert all(math.isclose(sum(v * v for v in d.embedding), 1.0, rel_tol=1e-4) for d in result.data)
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens == 2 + 1
    as_floats = await client.embeddings.create(
        model="text-embedding-3-large", input="alpha", encoding_format="float", dimensions=8
    )
    assert len(as_floats.data[0].embedding) == 8
    repeat = await client.embeddings.create(model="text-embedding-3-small", input="alpha")
    assert repeat.data[0].embedding == result.data[0].embedding


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    names = [m.id async for m in client.models.list()]
    assert "gpt-4o" in names and "text-embedding-3-small" in names
    assert (await client.models.retrieve("o4-mini")).id == "o4-mini"


# ---- faults ---------------------------------------------------------------------------------------


async def test_rate_limit_carries_retry_after(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(
            model="gpt-4o", messages=_user("hi [[sim: fault=429 retry_after=2 retry_after_ms=1500]]")
        )
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.response.headers["retry-after-ms"] == "1500"
    assert caught.value.code == "rate_limit_exceeded"


async def test_times_one_fails_once_then_succeeds(client: openai.AsyncOpenAI) -> None:
    messages = _user(f"hi [[sim: fault=503 times=1 key={_key()}]]")
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o", messages=messages)
    completion = await client.chat.completions.create(model="gpt-4o", messages=messages)
    assert completion.choices[0].message.content == "Simulated reply from gpt-4o: hi"


async def test_unknown_model_is_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-2", messages=_user("hi"))
    assert caught.value.code == "model_not_found"
    assert caught.value.body == {
        "message": "The model `gpt-2` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }


async def test_auth_is_required(sim: SimulatorServer) -> None:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="sk-invalid", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model="gpt-4o", messages=_user("hi"))
    assert caught.value.code == "invalid_api_key"
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{sim.url}/v1/chat/completions", json={"model": "gpt-4o", "messages": []})
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("fault", "error", "code"),
    [
        ("context_length", openai.BadRequestError, "context_length_exceeded"),
        ("content_filter", openai.BadRequestError, "content_filter"),
        ("403", openai.PermissionDeniedError, "permission_denied"),
        ("500", openai.InternalServerError, None),
    ],
)
async def test_vendor_error_codes(
    client: openai.AsyncOpenAI, fault: str, error: type[openai.APIStatusError], code: str | None
) -> None:
    with pytest.raises(error) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=_user(f"[[sim: fault={fault}]]"))
    assert getattr(caught.value, "code", None) == code


async def test_fault_header_and_model_scoped_rules(sim: SimulatorServer, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="gpt-4o", messages=_user("hi"), extra_headers={"x-sim-fault": "fault=429"}
        )
    async with httpx.AsyncClient() as http:
        added = await http.post(f"{sim.url}/_sim/faults", json=[{"fault": "529", "model": "sim-primary"}])
        assert added.status_code == 200
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="sim-primary", messages=_user("hi"))
        assert caught.value.status_code == 529
        fallback = await client.chat.completions.create(model="sim-fallback", messages=_user("hi"))
        assert fallback.choices[0].message.content == "Simulated reply from sim-fallback: hi"
    finally:
        sim.reset()


async def test_cut_stream_ends_without_a_finish_reason(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=_user("one two three four five six seven [[sim: fault=cut]]"), stream=True
    )
    seen: list[str | None] = []
    # The SDK wraps a refused connection, but a body cut mid-stream escapes as httpx's own error.
    with pytest.raises((openai.APIConnectionError, httpx.TransportError)):
        async for chunk in stream:
            seen.append(chunk.choices[0].finish_reason)
    assert seen and all(reason is None for reason in seen)


async def test_cut_body_is_a_connection_error(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="gpt-4o", messages=_user("[[sim: fault=cut]]"))


async def test_malformed_body_cannot_be_parsed(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(ValueError):
        await client.chat.completions.create(model="gpt-4o", messages=_user("[[sim: fault=malformed]]"))


async def test_hang_outlasts_the_client_timeout(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(
            model="gpt-4o", messages=_user("[[sim: fault=hang hang_seconds=30]]"), timeout=0.3
        )


async def test_bad_directive_is_a_bad_request(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="colour"):
        await client.chat.completions.create(model="gpt-4o", messages=_user("[[sim: colour=red]]"))


# ---- stats and admin ------------------------------------------------------------------------------


async def test_stats_count_by_tag_model_and_wire_and_reset(
    sim: SimulatorServer, client: openai.AsyncOpenAI
) -> None:
    sim.reset()
    for step in ("plan", "plan", "write"):
        await client.chat.completions.create(model="gpt-4o-mini", messages=_user(f"[[sim: tag={step}]] go"))
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o", messages=_user("[[sim: tag=write fault=429]]"))
    expected = {
        "requests": 4,
        "by_model": {"gpt-4o-mini": 3, "gpt-4o": 1},
        "by_tag": {"plan": 2, "write": 2},
        "by_wire": {"openai": 4},
        "faults_injected": 1,
    }
    assert sim.stats() == expected
    async with httpx.AsyncClient(base_url=sim.url) as http:
        assert (await http.get("/_sim/health")).status_code == 200
        assert (await http.get("/_sim/stats")).json() == expected
        assert (await http.post("/_sim/reset")).status_code == 200
        assert (await http.get("/_sim/stats")).json()["requests"] == 0


async def test_bad_fault_rules_are_refused(sim: SimulatorServer) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        response = await http.post("/_sim/faults", json=[{"fault": "418"}])
    assert response.status_code == 400
    assert "418" in response.json()["error"]["message"]
    assert sim.simulator.faults() == []


def test_simulator_process_serves_and_stops() -> None:
    with SimulatorProcess(faults=[{"fault": "429", "times": 1}]) as process:
        client = openai.OpenAI(base_url=f"{process.url}/v1", api_key="sk-test", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o", messages=_user("hi"))
        completion = client.chat.completions.create(model="gpt-4o", messages=_user("hi"))
        assert completion.choices[0].message.content == "Simulated reply from gpt-4o: hi"
        assert process.stats()["requests"] == 2
        client.close()


async def test_in_process_rules(sim: SimulatorServer, client: openai.AsyncOpenAI) -> None:
    sim.add_faults([{"fault": "400", "match": "refuse me", "times": 1, "key": _key()}])
    try:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="gpt-4o", messages=_user("please refuse me"))
        ok = await client.chat.completions.create(model="gpt-4o", messages=_user("please refuse me"))
        assert ok.choices[0].finish_reason == "stop"
    finally:
        sim.reset()
    assert sim.simulator.faults() == []
