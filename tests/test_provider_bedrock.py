"""Bedrock: SigV4 against botocore's signer, event-stream framing, Converse mapping over
`httpx.MockTransport`, and whole conversations against the simulator's Bedrock wire."""

from __future__ import annotations

import binascii
import json
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from unittest import mock

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import botocore.eventstream
import httpx
import pytest

from kernel.contracts import (
    ChatRequest,
    EmbedRequest,
    StreamDone,
    StreamError,
    StreamStart,
    TextDelta,
    ToolCallDelta,
)
from kernel.errors import (
    AuthenticationFailed,
    ContentFiltered,
    ContextLengthExceeded,
    InvalidRequest,
    MalformedResponse,
    MissingCredentials,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from kernel.provider import collect_stream
from kernel.registry import Registry
from providers._sigv4 import AwsCredentials, EventStreamDecoder, sign
from providers.bedrock import BedrockProvider
from simulator.bedrock_wire import EVENT_STREAM, encode_event
from simulator.server import SimulatorServer

pytestmark = pytest.mark.timeout(60)

MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
ENV = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_REGION": "us-west-2"}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
}
Handler = Callable[[httpx.Request], httpx.Response]


def provider(handler: Handler, environ: dict[str, str] | None = None) -> BedrockProvider:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return BedrockProvider(environ=ENV if environ is None else environ, http_client=client)


def user(text: str, **extra: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}
    )


def converse_body(content: list[dict[str, Any]], stop: str = "end_turn", **usage: int) -> dict[str, Any]:
    counts = {"inputTokens": 10, "outputTokens": 4, "totalTokens": 14, **usage}
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": stop,
        "usage": counts,
        "metrics": {"latencyMs": 12},
    }


# ---- SigV4 --------------------------------------------------------------------------------------


def botocore_authorization(
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    token: str | None,
    now: datetime,
    region: str,
    secret: str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
) -> dict[str, str]:
    request = botocore.awsrequest.AWSRequest(method=method, url=url, data=body, headers=headers)
    credentials = botocore.credentials.Credentials("AKIDEXAMPLE", secret, token)
    with mock.patch("botocore.auth.get_current_datetime", return_value=now.replace(tzinfo=None)):
        botocore.auth.SigV4Auth(credentials, "bedrock", region).add_auth(request)
    return {k.lower(): v for k, v in request.headers.items()}


@pytest.mark.parametrize(
    ("url", "body", "token", "region"),
    [
        (
            f"https://bedrock-runtime.us-east-1.amazonaws.com/model/{MODEL.replace(':', '%3A')}/converse",
            b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}',
            None,
            "us-east-1",
        ),
        (
            "https://bedrock-runtime.eu-central-1.amazonaws.com/model/amazon.nova-pro-v1%3A0/converse-stream",
            '{"messages":[{"role":"user","content":[{"text":"grüße"}]}]}'.encode(),
            "FQoGZXIvYXdzEJr//////////wEaDOSESSIONTOKEN",
            "eu-central-1",
        ),
        ("http://127.0.0.1:8765/model/sim-echo/invoke?b=2&a=1", b'{"inputText":"x"}', None, "ap-south-1"),
        (
            "https://bedrock-runtime.us-west-2.amazonaws.com/model/arn%3Aaws%3Abedrock%3Aus-west-2%3A1%3Ainference-profile%2Fus.x/converse",
            b"",
            "token",
            "us-west-2",
        ),
    ],
)
def test_sigv4_matches_botocore(url: str, body: bytes, token: str | None, region: str) -> None:
    now = datetime(2025, 9, 30, 12, 34, 56, tzinfo=UTC)
    headers = {"content-type": "application/json", "accept": "application/json"}
    credentials = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    ours = sign(
        "POST", url, headers, body, credentials=credentials, region=region, service="bedrock", now=now
    )
    theirs = botocore_authorization(
        "POST",
        url,
        {**headers, "X-Amz-Content-SHA256": ours["x-amz-content-sha256"]},
        body,
        token,
        now,
        region,
    )
    assert ours["authorization"] == theirs["authorization"]
    assert ours["x-amz-date"] == theirs["x-amz-date"] == "20250930T123456Z"
    assert ours.get("x-amz-security-token") == theirs.get("x-amz-security-token") == token
    assert f"/{region}/bedrock/aws4_request" in ours["authorization"]


async def test_requests_are_signed_for_the_region_and_model() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=converse_body([{"text": "hi"}]))

    env = {**ENV, "AWS_SESSION_TOKEN": "session"}
    await provider(handler, env).chat(user("hello"))
    [sent] = seen
    assert sent.url.host == "bedrock-runtime.us-west-2.amazonaws.com"
    assert sent.url.raw_path == b"/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse"
    assert sent.headers["x-amz-security-token"] == "session"
    now = datetime.strptime(sent.headers["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    signed = {k: sent.headers[k] for k in ("content-type", "accept", "x-amz-content-sha256")}
    theirs = botocore_authorization(
        "POST", str(sent.url), signed, sent.content, "session", now, "us-west-2", "secret"
    )
    assert sent.headers["authorization"] == theirs["authorization"]


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"AWS_REGION": "us-east-1"}, "AWS_ACCESS_KEY_ID"),
        ({"AWS_ACCESS_KEY_ID": "AKID", "AWS_REGION": "us-east-1"}, "AWS_SECRET_ACCESS_KEY"),
        ({"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "s"}, "AWS_REGION"),
    ],
)
async def test_missing_credentials_make_no_request(environ: dict[str, str], named: str) -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json=converse_body([{"text": "hi"}]))

    p = provider(handler, environ)
    with pytest.raises(MissingCredentials, match=named) as caught:
        await p.chat(user("hi"))
    assert caught.value.env_var == named
    with pytest.raises(MissingCredentials, match=named):
        p.stream(user("hi"))
    assert calls == []


def test_region_falls_back_to_default_region_and_options() -> None:
    env = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b", "AWS_DEFAULT_REGION": "eu-west-1"}
    assert BedrockProvider(environ=env).base_url == "https://bedrock-runtime.eu-west-1.amazonaws.com"
    assert (
        BedrockProvider(environ={**env, "BEDROCK_ENDPOINT_URL": "http://127.0.0.1:9/"}).base_url
        == "http://127.0.0.1:9"
    )
    registry = Registry()
    registry.register(BedrockProvider)
    assert registry.provider_class("bedrock") is BedrockProvider
    assert BedrockProvider(environ={}).describe()["credentials_present"] is False


# ---- event-stream framing -----------------------------------------------------------------------


def test_decoder_reads_frames_split_anywhere() -> None:
    frames = encode_event("messageStart", {"role": "assistant"}) + encode_event(
        "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "héllo"}}
    )
    decoder = EventStreamDecoder()
    messages = []
    for position in range(len(frames)):  # one byte at a time
        messages.extend(decoder.feed(frames[position : position + 1]))
    assert [m.headers[":event-type"] for m in messages] == ["messageStart", "contentBlockDelta"]
    assert json.loads(messages[1].payload)["delta"]["text"] == "héllo"
    assert messages[0].headers[":message-type"] == "event"
    assert decoder.pending == 0


def test_simulator_frames_are_real_event_stream_framing() -> None:
    frames = encode_event("metadata", {"usage": {"inputTokens": 1}}) + encode_event(
        "throttlingException", {"message": "slow down"}, message_type="exception"
    )
    buffer = botocore.eventstream.EventStreamBuffer()
    buffer.add_data(frames)
    first, second = list(buffer)
    assert first.headers[":event-type"] == "metadata"
    assert json.loads(first.payload) == {"usage": {"inputTokens": 1}}
    assert second.headers[":exception-type"] == "throttlingException"


def test_decoder_reads_every_header_type() -> None:
    headers = (
        b"\x01a\x00"  # bool true
        + b"\x01b\x01"  # bool false
        + b"\x01c\x02\x7f"  # byte
        + b"\x01d\x03"
        + struct.pack(">h", -2)
        + b"\x01e\x04"
        + struct.pack(">i", 70000)
        + b"\x01f\x05"
        + struct.pack(">q", 1 << 40)
        + b"\x01g\x06"
        + struct.pack(">H", 3)
        + b"\x00\x01\x02"
        + b"\x01h\x07"
        + struct.pack(">H", 2)
        + b"ok"
        + b"\x01i\x08"
        + struct.pack(">q", 1700000000000)
        + b"\x01j\x09"
        + bytes(range(16))
    )
    prelude = struct.pack(">II", 12 + len(headers) + 4, len(headers))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + headers
    frame = message + struct.pack(">I", binascii.crc32(message))
    [decoded] = list(EventStreamDecoder().feed(frame))
    ours = decoded.headers
    [theirs] = list(_botocore_messages(frame))
    assert set(ours) == set(theirs.headers)
    assert ours["j"] == bytes(range(16))
    assert (ours["a"], ours["b"], ours["c"], ours["d"], ours["e"], ours["f"], ours["g"], ours["h"]) == (
        True,
        False,
        127,
        -2,
        70000,
        1 << 40,
        b"\x00\x01\x02",
        "ok",
    )


def _botocore_messages(frame: bytes) -> Iterator[Any]:
    buffer = botocore.eventstream.EventStreamBuffer()
    buffer.add_data(frame)
    yield from buffer


@pytest.mark.parametrize("corrupt", [-1, 9])  # the message CRC, then the prelude CRC
def test_decoder_refuses_a_bad_crc(corrupt: int) -> None:
    frame = bytearray(encode_event("messageStart", {"role": "assistant"}))
    frame[corrupt] ^= 0x01
    with pytest.raises(ValueError, match="CRC"):
        list(EventStreamDecoder().feed(bytes(frame)))


async def test_bad_crc_in_a_stream_is_malformed_response() -> None:
    frame = bytearray(encode_event("messageStart", {"role": "assistant"}))
    frame[-1] ^= 0xFF

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=bytes(frame), headers={"content-type": EVENT_STREAM})

    with pytest.raises(MalformedResponse):
        [e async for e in provider(handler).stream(user("hi"))]


# ---- Converse mapping ---------------------------------------------------------------------------


async def test_request_mapping() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=converse_body([{"text": "done"}]))

    request = ChatRequest.model_validate(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Weather?"},
                        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {"id": "t1", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
                        {"id": "t2", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
                    ],
                },
                {"role": "tool", "tool_call_id": "t1", "content": "rain"},
                {"role": "tool", "tool_call_id": "t2", "content": "sun"},
            ],
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
            "max_tokens": 100,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop": ["END"],
        }
    )
    await provider(handler).chat(request)
    [body] = bodies
    assert body["system"] == [{"text": "Be brief."}]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"text": "Weather?"},
                {"image": {"format": "jpeg", "source": {"bytes": "/9j/4AAQ"}}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"text": "Checking."},
                {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Oslo"}}},
                {"toolUse": {"toolUseId": "t2", "name": "get_weather", "input": {"city": "Rome"}}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"toolResult": {"toolUseId": "t1", "content": [{"text": "rain"}]}},
                {"toolResult": {"toolUseId": "t2", "content": [{"text": "sun"}]}},
            ],
        },
    ]
    assert body["inferenceConfig"] == {
        "maxTokens": 100,
        "temperature": 0.5,
        "topP": 0.9,
        "stopSequences": ["END"],
    }
    assert body["toolConfig"] == {
        "tools": [
            {
                "toolSpec": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "inputSchema": {"json": WEATHER_TOOL["function"]["parameters"]},  # type: ignore[index]
                }
            }
        ],
        "toolChoice": {"any": {}},
    }


async def test_tool_use_response_and_usage_with_cache_reads() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        content = [
            {"text": "Let me look."},
            {"toolUse": {"toolUseId": "tooluse_abc", "name": "get_weather", "input": {"city": "Oslo"}}},
        ]
        body = converse_body(
            content, "tool_use", inputTokens=5, cacheReadInputTokens=100, cacheWriteInputTokens=7
        )
        return httpx.Response(200, json=body, headers={"x-amzn-RequestId": "req-1"})

    response = await provider(handler).chat(user("Oslo?", tools=[WEATHER_TOOL]))
    assert response.id == "req-1"
    assert response.text == "Let me look."
    assert response.finish_reason == "tool_calls"
    [call] = response.tool_calls
    assert (call.id, call.function.name, call.function.arguments) == (
        "tooluse_abc",
        "get_weather",
        '{"city":"Oslo"}',
    )
    usage = response.usage
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, usage.total_tokens) == (
        112,
        100,
        4,
        116,
    )


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
    ],
)
async def test_finish_reasons(stop: str, finish: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=converse_body([{"text": "x"}], stop))

    assert (await provider(handler).chat(user("hi"))).finish_reason == finish


async def test_guardrail_with_no_answer_is_content_filtered() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=converse_body([], "guardrail_intervened"))

    with pytest.raises(ContentFiltered):
        await provider(handler).chat(user("hi"))


async def test_structured_output_goes_through_a_forced_tool() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        use = {"toolUseId": "tooluse_1", "name": "forecast", "input": {"city": "Oslo", "days": 3}}
        return httpx.Response(200, json=converse_body([{"toolUse": use}], "tool_use"))

    response = await provider(handler).chat(
        user(
            "Forecast",
            response_format={"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}},
        )
    )
    config = bodies[0]["toolConfig"]
    assert config["toolChoice"] == {"tool": {"name": "forecast"}}
    assert config["tools"][0]["toolSpec"]["inputSchema"] == {"json": SCHEMA}
    assert json.loads(response.text) == {"city": "Oslo", "days": 3}
    assert response.finish_reason == "stop" and response.tool_calls == []


async def test_http_image_is_refused_before_any_call() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, json=converse_body([{"text": "x"}]))

    request = ChatRequest.model_validate(
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
            ],
        }
    )
    with pytest.raises(InvalidRequest, match="data: URL"):
        await provider(handler).chat(request)
    assert calls == []


def _error_response(status: int, error_type: str, message: str, **headers: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status,
            json={"message": message},
            headers={
                "x-amzn-ErrorType": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/",
                **headers,
            },
        )

    return handler


@pytest.mark.parametrize(
    ("status", "error_type", "message", "error"),
    [
        (429, "ThrottlingException", "Too many requests, please wait before trying again.", RateLimited),
        (503, "ServiceUnavailableException", "Bedrock is unable to process your request.", Overloaded),
        (429, "ModelNotReadyException", "Model is not ready.", Overloaded),
        (400, "ValidationException", "Malformed input request: extraneous key [foo]", InvalidRequest),
        (400, "ValidationException", "Input is too long for requested model.", ContextLengthExceeded),
        (
            400,
            "ValidationException",
            "The model returned the following errors: prompt is too long: 250000 tokens > 200000 maximum",
            ContextLengthExceeded,
        ),
        (
            403,
            "AccessDeniedException",
            "You don't have access to the model with the specified model ID.",
            PermissionDenied,
        ),
        (404, "ResourceNotFoundException", "Could not resolve the foundation model.", ModelNotFound),
        (
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
            AuthenticationFailed,
        ),
        (408, "ModelTimeoutException", "Model has timed out in processing the request.", UpstreamTimeout),
        (500, "InternalServerException", "Internal error.", UpstreamError),
    ],
)
async def test_errors_map_by_aws_error_type(
    status: int, error_type: str, message: str, error: type[Exception]
) -> None:
    handler = _error_response(status, error_type, message)
    with pytest.raises(error) as caught:
        await provider(handler).chat(user("hi"))
    assert message in str(caught.value)
    assert getattr(caught.value, "code", None) == error_type
    with pytest.raises(error):
        [e async for e in provider(handler).stream(user("hi"))]


async def test_error_type_from_body_and_retry_after() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"__type": "com.amazon.bedrock#ThrottlingException", "message": "slow down"}
        return httpx.Response(429, json=body, headers={"retry-after": "2"})

    with pytest.raises(RateLimited) as caught:
        await provider(handler).chat(user("hi"))
    assert caught.value.retry_after == 2.0


async def test_malformed_body_is_malformed_response() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"output": {}})

    with pytest.raises(MalformedResponse):
        await provider(handler).chat(user("hi"))


def _stream_handler(*frames: bytes) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith("/converse-stream")
        assert request.headers["accept"] == EVENT_STREAM
        return httpx.Response(
            200, content=b"".join(frames), headers={"content-type": EVENT_STREAM, "x-amzn-RequestId": "r"}
        )

    return handler


async def test_stream_text_tool_and_usage() -> None:
    handler = _stream_handler(
        encode_event("messageStart", {"role": "assistant"}),
        encode_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Looking"}}),
        encode_event("contentBlockStop", {"contentBlockIndex": 0}),
        encode_event(
            "contentBlockStart",
            {"contentBlockIndex": 1, "start": {"toolUse": {"toolUseId": "tooluse_9", "name": "get_weather"}}},
        ),
        encode_event(
            "contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"city":'}}}
        ),
        encode_event(
            "contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '"Oslo"}'}}}
        ),
        encode_event("contentBlockStop", {"contentBlockIndex": 1}),
        encode_event("messageStop", {"stopReason": "tool_use"}),
        encode_event(
            "metadata",
            {"usage": {"inputTokens": 3, "outputTokens": 2, "totalTokens": 5, "cacheReadInputTokens": 4}},
        ),
    )
    p = provider(handler)
    events = [e async for e in p.stream(user("Oslo?", tools=[WEATHER_TOOL]))]
    assert isinstance(events[0], StreamStart) and events[0].id == "r"
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["Looking"]
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    assert (deltas[0].index, deltas[0].id, deltas[0].name) == (0, "tooluse_9", "get_weather")
    done = events[-1]
    assert isinstance(done, StreamDone)
    assert done.finish_reason == "tool_calls"
    assert (done.usage.prompt_tokens, done.usage.cached_tokens, done.usage.completion_tokens) == (7, 4, 2)
    collected = await collect_stream(p.stream(user("Oslo?", tools=[WEATHER_TOOL])), provider="bedrock")
    assert collected.tool_calls[0].function.arguments == '{"city":"Oslo"}'


async def test_exception_event_after_start_is_stream_error() -> None:
    handler = _stream_handler(
        encode_event("messageStart", {"role": "assistant"}),
        encode_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}}),
        encode_event(
            "throttlingException",
            {"message": "Too many requests, please wait before trying again."},
            message_type="exception",
        ),
    )
    events = [e async for e in provider(handler).stream(user("hi"))]
    error = events[-1]
    assert isinstance(error, StreamError)
    assert error.error_type == "RateLimited" and error.retryable


async def test_titan_embeddings() -> None:
    seen: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.raw_path, json.loads(request.content)))
        text = json.loads(request.content)["inputText"]
        return httpx.Response(
            200, json={"embedding": [float(len(text)), 0.5], "inputTextTokenCount": len(text)}
        )

    response = await provider(handler).embed(
        EmbedRequest(model="amazon.titan-embed-text-v2:0", input=["ab", "abcd"], dimensions=256)
    )
    assert seen[0] == (
        b"/model/amazon.titan-embed-text-v2%3A0/invoke",
        {"inputText": "ab", "dimensions": 256},
    )
    assert response.embeddings == [[2.0, 0.5], [4.0, 0.5]]
    assert response.usage.prompt_tokens == 6
    with pytest.raises(InvalidRequest, match="Titan"):
        await provider(handler).embed(EmbedRequest(model="cohere.embed-english-v3", input=["x"]))


# ---- against the simulator ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorServer]:
    with SimulatorServer() as server:
        yield server


@pytest.fixture
async def bedrock(sim: SimulatorServer) -> AsyncIterator[BedrockProvider]:
    p = BedrockProvider(environ={**ENV, "BEDROCK_ENDPOINT_URL": sim.url})
    yield p
    await p.aclose()


async def test_sim_chat_and_stream_agree(bedrock: BedrockProvider) -> None:
    request = user("Hello   there [[sim: cached=3]]")
    chat = await bedrock.chat(request)
    assert chat.text == f"Simulated reply from {MODEL}: Hello there"
    assert chat.usage.cached_tokens == 3 and chat.usage.prompt_tokens > 3
    streamed = await collect_stream(bedrock.stream(request), provider="bedrock")
    assert streamed.model_dump() == chat.model_dump()


async def test_sim_tool_round_trip(bedrock: BedrockProvider) -> None:
    request = user("Weather in Oslo?", tools=[WEATHER_TOOL])
    first = await bedrock.chat(request)
    [call] = first.tool_calls
    assert first.finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "sample city"}
    streamed = await collect_stream(bedrock.stream(request), provider="bedrock")
    assert streamed.tool_calls == first.tool_calls
    follow_up = ChatRequest.model_validate(
        {
            "model": MODEL,
            "tools": [WEATHER_TOOL],
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "rain, 4 degrees"},
            ],
        }
    )
    answer = await bedrock.chat(follow_up)
    assert answer.text == f"Simulated reply from {MODEL}: rain, 4 degrees"
    assert answer.finish_reason == "stop"


async def test_sim_structured_output(bedrock: BedrockProvider) -> None:
    request = user(
        "Forecast",
        response_format={"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA}},
    )
    response = await bedrock.chat(request)
    assert json.loads(response.text) == {"city": "sample city", "days": 1}
    streamed = await collect_stream(bedrock.stream(request), provider="bedrock")
    assert streamed.text == response.text


async def test_sim_cut_stream_yields_stream_error(bedrock: BedrockProvider) -> None:
    events = [e async for e in bedrock.stream(user("A long enough answer to cut [[sim: fault=cut]]"))]
    assert isinstance(events[0], StreamStart)
    assert isinstance(events[-1], StreamError) and events[-1].retryable


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("429", RateLimited),
        ("503", Overloaded),
        ("529", Overloaded),
        ("403", PermissionDenied),
        ("401", AuthenticationFailed),
        ("404", ModelNotFound),
        ("500", UpstreamError),
        ("context_length", ContextLengthExceeded),
        ("content_filter", ContentFiltered),
        ("malformed", MalformedResponse),
    ],
)
async def test_sim_faults_map_to_kernel_errors(
    bedrock: BedrockProvider, fault: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await bedrock.chat(user(f"hi [[sim: fault={fault}]]"))
    with pytest.raises(error):
        [e async for e in bedrock.stream(user(f"hi [[sim: fault={fault}]]"))]


async def test_sim_unknown_model_and_bad_credentials(sim: SimulatorServer) -> None:
    p = BedrockProvider(environ={**ENV, "BEDROCK_ENDPOINT_URL": sim.url})
    with pytest.raises(ModelNotFound):
        await p.chat(
            ChatRequest(model="amazon.nova-ultra-v9:0", messages=[{"role": "user", "content": "hi"}])
        )
    bad = BedrockProvider(
        environ={**ENV, "AWS_ACCESS_KEY_ID": "AKIDINVALID", "BEDROCK_ENDPOINT_URL": sim.url}
    )
    with pytest.raises(AuthenticationFailed):
        await bad.chat(user("hi"))
    await p.aclose()
    await bad.aclose()


async def test_sim_refuses_unsigned_and_wrongly_scoped_requests(sim: SimulatorServer) -> None:
    url = f"{sim.url}/model/{MODEL}/converse"
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    async with httpx.AsyncClient() as client:
        unsigned = await client.post(url, content=body)
        assert unsigned.status_code == 403
        assert unsigned.headers["x-amzn-ErrorType"].startswith("UnrecognizedClientException")
        headers = sign(
            "POST",
            url,
            {"content-type": "application/json"},
            body,
            credentials=AwsCredentials("AKID", "s"),
            region="us-east-1",
            service="s3",
        )
        wrong = await client.post(url, content=body, headers={"content-type": "application/json", **headers})
        assert wrong.status_code == 403
        assert wrong.headers["x-amzn-ErrorType"].startswith("InvalidSignatureException")
        assert "bedrock" in wrong.json()["message"]


async def test_sim_stream_is_parsed_by_botocore(sim: SimulatorServer) -> None:
    url = f"{sim.url}/model/{MODEL}/converse-stream"
    body = b'{"messages":[{"role":"user","content":[{"text":"hi there"}]}]}'
    headers = {"content-type": "application/json"}
    headers |= sign(
        "POST",
        url,
        headers,
        body,
        credentials=AwsCredentials("AKID", "s"),
        region="us-east-1",
        service="bedrock",
    )
    async with httpx.AsyncClient() as client:
        response = await client.post(url, content=body, headers=headers)
    assert response.headers["content-type"] == EVENT_STREAM
    buffer = botocore.eventstream.EventStreamBuffer()
    buffer.add_data(response.content)
    events = [(m.headers[":event-type"], json.loads(m.payload)) for m in buffer]
    assert events[0][0] == "messageStart"
    assert [name for name, _ in events][-2:] == ["messageStop", "metadata"]
    text = "".join(p["delta"]["text"] for name, p in events if name == "contentBlockDelta")
    assert text == f"Simulated reply from {MODEL}: hi there"


async def test_sim_titan_embeddings(bedrock: BedrockProvider) -> None:
    response = await bedrock.embed(
        EmbedRequest(model="amazon.titan-embed-text-v2:0", input=["a", "b"], dimensions=256)
    )
    assert [len(v) for v in response.embeddings] == [256, 256]
    assert response.embeddings[0] != response.embeddings[1]
    again = await bedrock.embed(
        EmbedRequest(model="amazon.titan-embed-text-v2:0", input=["a"], dimensions=256)
    )
    assert again.embeddings[0] == response.embeddings[0]
