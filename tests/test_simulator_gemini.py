"""The simulator speaks Gemini's wire format: the official `google-genai` SDK is the client."""

from __future__ import annotations

import json

import httpx
import pytest
from google import genai
from google.genai import errors, types
from pydantic import BaseModel

from simulator.gemini_wire import INVALID_KEY
from simulator.server import SimulatorServer

pytestmark = pytest.mark.timeout(60)

MODEL = "gemini-2.5-flash"


class City(BaseModel):
    name: str
    population: int


def make_client(url: str, api_key: str = "test-key") -> genai.Client:
    # attempts=1: the SDK must surface every error instead of retrying it
    options = types.HttpOptions(base_url=url, retry_options=types.HttpRetryOptions(attempts=1))
    return genai.Client(api_key=api_key, http_options=options)


@pytest.fixture
def server(sim: SimulatorServer) -> SimulatorServer:
    return sim


@pytest.fixture
def gemini(sim: SimulatorServer) -> genai.Client:
    return make_client(sim.url)


WEATHER = types.FunctionDeclaration(
    name="get_weather",
    description="Current weather in a city",
    parameters_json_schema={
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "kelvin"]}},
        "required": ["city"],
    },
)
NO_AUTO_CALLS = types.AutomaticFunctionCallingConfig(disable=True)


async def test_generate_content_answers_with_text_usage_and_finish_reason(gemini: genai.Client) -> None:
    response = await gemini.aio.models.generate_content(
        model=MODEL,
        contents="What is the capital of France?",
        config=types.GenerateContentConfig(system_instruction="Answer briefly.", temperature=0.2),
    )

    assert response.text == f"Simulated reply from {MODEL}: What is the capital of France?"
    assert response.candidates is not None
    assert response.candidates[0].finish_reason == types.FinishReason.STOP
    usage = response.usage_metadata
    assert usage is not None and usage.prompt_token_count and usage.candidates_token_count
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert response.model_version == MODEL


async def test_max_output_tokens_cuts_the_answer_with_max_tokens(gemini: genai.Client) -> None:
    response = await gemini.aio.models.generate_content(
        model=MODEL,
        contents="Tell me a long story about a lighthouse keeper.",
        config=types.GenerateContentConfig(max_output_tokens=3),
    )

    assert response.candidates is not None
    assert response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert response.text is not None and len(response.text) <= 12


async def test_stream_assembles_to_the_same_text_and_ends_with_finish_and_usage(gemini: genai.Client) -> None:
    prompt = "Name three rivers in Europe and say something about each of them."
    whole = await gemini.aio.models.generate_content(model=MODEL, contents=prompt)
    chunks = [c async for c in await gemini.aio.models.generate_content_stream(model=MODEL, contents=prompt)]

    assert len(chunks) > 1
    assert "".join(c.text or "" for c in chunks) == whole.text
    last = chunks[-1]
    assert last.candidates is not None and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata is not None and whole.usage_metadata is not None
    assert last.usage_metadata.candidates_token_count == whole.usage_metadata.candidates_token_count


async def test_function_calling_round_trip(gemini: genai.Client) -> None:
    tools = [types.Tool(function_declarations=[WEATHER])]
    forced = types.ToolConfig(
        function_calling_config=types.FunctionCallingConfig(
            mode=types.FunctionCallingConfigMode.ANY, allowed_function_names=["get_weather"]
        )
    )
    question = types.Content(role="user", parts=[types.Part.from_text(text="Weather in Paris?")])
    first = await gemini.aio.models.generate_content(
        model=MODEL,
        contents=[question],
        config=types.GenerateContentConfig(
            tools=tools, tool_config=forced, automatic_function_calling=NO_AUTO_CALLS
        ),
    )

    assert first.function_calls is not None and len(first.function_calls) == 1
    call = first.function_calls[0]
    assert call.name == "get_weather"
    assert isinstance(call.args, dict) and set(call.args) == {"city", "unit"}
    assert call.args["unit"] == "celsius"

    assert first.candidates is not None and first.candidates[0].content is not None
    answer = types.Part.from_function_response(
        name="get_weather", response={"output": "18 degrees and sunny"}
    )
    second = await gemini.aio.models.generate_content(
        model=MODEL,
        contents=[question, first.candidates[0].content, types.Content(role="user", parts=[answer])],
        config=types.GenerateContentConfig(tools=tools, automatic_function_calling=NO_AUTO_CALLS),
    )

    assert not second.function_calls
    assert second.text == f"Simulated reply from {MODEL}: 18 degrees and sunny"


async def test_function_calling_mode_none_answers_in_text(gemini: genai.Client) -> None:
    response = await gemini.aio.models.generate_content(
        model=MODEL,
        contents="Weather in Paris?",
        config=types.GenerateContentConfig(
            tools=[types.Tool(function_declarations=[WEATHER])],
            tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode="NONE")),
            automatic_function_calling=NO_AUTO_CALLS,
        ),
    )

    assert not response.function_calls
    assert response.text == f"Simulated reply from {MODEL}: Weather in Paris?"


async def test_response_schema_gives_parsed_json(gemini: genai.Client) -> None:
    response = await gemini.aio.models.generate_content(
        model=MODEL,
        contents="Describe a large city.",
        config=types.GenerateContentConfig(response_mime_type="application/json", response_schema=City),
    )

    assert isinstance(response.parsed, City)
    assert json.loads(response.text or "") == response.parsed.model_dump()


async def test_response_json_schema_gives_json_of_that_shape(gemini: genai.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string"}}, "score": {"type": "integer"}},
        "required": ["tags", "score"],
    }
    response = await gemini.aio.models.generate_content(
        model=MODEL,
        contents="Tag this text.",
        config=types.GenerateContentConfig(
            response_mime_type="application/json", response_json_schema=schema
        ),
    )

    data = json.loads(response.text or "")
    assert isinstance(data["tags"], list) and isinstance(data["score"], int)


async def test_embeddings_are_deterministic_unit_vectors(gemini: genai.Client) -> None:
    first = await gemini.aio.models.embed_content(model="text-embedding-004", contents=["alpha", "beta"])
    again = await gemini.aio.models.embed_content(model="text-embedding-004", contents=["alpha"])
    small = await gemini.aio.models.embed_content(
        model="gemini-embedding-001",
        contents=["alpha"],
        config=types.EmbedContentConfig(output_dimensionality=16),
    )

    assert first.embeddings is not None and len(first.embeddings) == 2
    alpha, beta = (e.values or [] for e in first.embeddings)
    assert len(alpha) == 768
    assert alpha != beta
    assert again.embeddings is not None and again.embeddings[0].values == alpha
    assert abs(sum(v * v for v in alpha) - 1.0) < 1e-6
    assert small.embeddings is not None and len(small.embeddings[0].values or []) == 16


@pytest.mark.parametrize(
    ("fault", "error_class", "code", "status"),
    [
        ("429", errors.ClientError, 429, "RESOURCE_EXHAUSTED"),
        ("403", errors.ClientError, 403, "PERMISSION_DENIED"),
        ("500", errors.ServerError, 500, "INTERNAL"),
        ("503", errors.ServerError, 503, "UNAVAILABLE"),
    ],
)
async def test_faults_surface_as_sdk_errors(
    gemini: genai.Client, fault: str, error_class: type[errors.APIError], code: int, status: str
) -> None:
    with pytest.raises(error_class) as raised:
        await gemini.aio.models.generate_content(model=MODEL, contents=f"hello [[sim: fault={fault}]]")

    assert raised.value.code == code
    assert raised.value.status == status


async def test_rate_limit_carries_retry_info(gemini: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as raised:
        await gemini.aio.models.generate_content(model=MODEL, contents="hi [[sim: fault=429 retry_after=7]]")

    details = raised.value.details["error"]["details"]
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"} in details


async def test_context_length_is_an_invalid_argument_naming_the_token_limit(gemini: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as raised:
        await gemini.aio.models.generate_content(model=MODEL, contents="hi [[sim: fault=context_length]]")

    assert raised.value.code == 400 and raised.value.status == "INVALID_ARGUMENT"
    assert "exceeds the maximum number of tokens allowed (1048576)" in (raised.value.message or "")


async def test_unknown_model_is_not_found(gemini: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as raised:
        await gemini.aio.models.generate_content(model="gemini-0.1-imaginary", contents="hi")

    assert raised.value.code == 404 and raised.value.status == "NOT_FOUND"


async def test_content_filter_blocks_the_prompt_without_candidates(gemini: genai.Client) -> None:
    response = await gemini.aio.models.generate_content(
        model=MODEL, contents="hi [[sim: fault=content_filter]]"
    )
    chunks = [
        c
        async for c in await gemini.aio.models.generate_content_stream(
            model=MODEL, contents="hi [[sim: fault=content_filter]]"
        )
    ]

    assert not response.candidates
    assert response.prompt_feedback is not None
    assert response.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    assert len(chunks) == 1 and chunks[0].prompt_feedback is not None
    assert chunks[0].prompt_feedback.block_reason == types.BlockedReason.SAFETY


async def test_invalid_key_is_refused_like_google_does(server: SimulatorServer) -> None:
    with pytest.raises(errors.ClientError) as raised:
        await make_client(server.url, api_key=INVALID_KEY).aio.models.generate_content(
            model=MODEL, contents="hi"
        )

    assert raised.value.code == 400 and raised.value.status == "INVALID_ARGUMENT"
    assert raised.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"


async def test_missing_key_is_permission_denied_and_query_key_works(server: SimulatorServer) -> None:
    url = f"{server.url}/v1beta/models/{MODEL}:generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    async with httpx.AsyncClient() as http:
        missing = await http.post(url, json=body)
        with_query_key = await http.post(url, params={"key": "test-key"}, json=body)

    assert missing.status_code == 403
    assert missing.json()["error"]["status"] == "PERMISSION_DENIED"
    assert with_query_key.status_code == 200
    assert with_query_key.json()["candidates"][0]["content"]["parts"][0]["text"].endswith(": hi")


async def test_stream_without_alt_sse_is_one_json_array(server: SimulatorServer) -> None:
    url = f"{server.url}/v1beta/models/{MODEL}:streamGenerateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": "one two three four five six"}]}]}
    async with httpx.AsyncClient(headers={"x-goog-api-key": "test-key"}) as http:
        array = await http.post(url, json=body)
        sse = await http.post(url, params={"alt": "sse"}, json=body)

    chunks = array.json()
    assert isinstance(chunks, list) and len(chunks) > 1
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert sse.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line[len("data: ") :]) for line in sse.text.splitlines() if line.startswith("data: ")
    ]
    assert events == chunks
