"""Amazon Bedrock's Converse wire format: `POST /model/{modelId}/converse` (JSON),
`/model/{modelId}/converse-stream` (AWS event-stream binary framing) and `/model/{modelId}/invoke`
for Titan text embeddings.

Every request must carry a well-formed SigV4 `Authorization` header whose credential scope names a
region and the `bedrock` service; the signature itself is not checked (the simulator knows no secret).
Errors are `{"message": ...}` with the AWS error type in `x-amzn-ErrorType`. Usage reports
`inputTokens` without the cached part, which travels as `cacheReadInputTokens` (as Bedrock does).
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
import struct
import uuid
from typing import Any, ClassVar

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from simulator.app import ErrorReply, JSONReply, Reply, StreamReply, Wire, WireError, dump_json, exchange
from simulator.core import (
    Admission,
    Completion,
    Fault,
    Message,
    ResponseFormat,
    SimRequest,
    Simulator,
    Tool,
    count_tokens,
    generate,
)

__all__ = ["EVENT_STREAM", "INVALID_ACCESS_KEY", "BedrockWire", "encode_event", "routes"]

EVENT_STREAM = "application/vnd.amazon.eventstream"
INVALID_ACCESS_KEY = "AKIDINVALID"
_TITAN_DIMENSIONS = 1024
_WORD = re.compile(r"\s*\S+|\s+")
_ARGUMENT_FRAGMENT = 16
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/\s]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/(?P<service>[a-z0-9-]+)"
    r"/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?Signature=[0-9a-f]{64}$"
)
_FAULTS: dict[str, tuple[int, str, str]] = {
    "400": (400, "ValidationException", "Simulated bad request."),
    "401": (403, "UnrecognizedClientException", "The security token included in the request is invalid."),
    "403": (403, "AccessDeniedException", "You don't have access to the model with the specified model ID."),
    "404": (
        404,
        "ResourceNotFoundException",
        "Could not resolve the foundation model from the provided model identifier.",
    ),
    "429": (429, "ThrottlingException", "Too many requests, please wait before trying again."),
    "500": (500, "InternalServerException", "The server encountered an error processing your request."),
    "503": (503, "ServiceUnavailableException", "Bedrock is unable to process your request."),
    "529": (
        429,
        "ModelNotReadyException",
        "The model is not ready to serve inference requests. Try again later.",
    ),
    "quota": (
        400,
        "ServiceQuotaExceededException",
        "Your request exceeds the service quota for your account. You can view your quotas at "
        "Viewing service quotas.",
    ),
    "context_length": (400, "ValidationException", "Input is too long for requested model."),
    "content_filter": (400, "ValidationException", "Output blocked by content filtering policy"),
}


def encode_event(event_type: str, payload: dict[str, Any], *, message_type: str = "event") -> bytes:
    """One event-stream message: prelude (lengths + CRC32), string headers, JSON payload, CRC32."""
    type_header = ":exception-type" if message_type == "exception" else ":event-type"
    headers = {type_header: event_type, ":content-type": "application/json", ":message-type": message_type}
    header_bytes = b"".join(
        bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value.encode())) + value.encode()
        for name, value in headers.items()
    )
    body = dump_json(payload)
    prelude = struct.pack(">II", 12 + len(header_bytes) + len(body) + 4, len(header_bytes))
    message = prelude + struct.pack(">I", binascii.crc32(prelude)) + header_bytes + body
    return message + struct.pack(">I", binascii.crc32(message))


def _error(status: int, error_type: str, message: str, request_id: str = "") -> ErrorReply:
    headers = {"x-amzn-ErrorType": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
    headers["x-amzn-RequestId"] = request_id or str(uuid.uuid4())
    return ErrorReply(status, {"message": message}, headers)


class BedrockWire(Wire):
    name: ClassVar[str] = "bedrock"

    def auth_error(self, headers: Headers) -> ErrorReply | None:
        authorization = headers.get("authorization")
        if not authorization:
            return _error(403, "UnrecognizedClientException", "Missing Authentication Token")
        match = _AUTHORIZATION.match(authorization)
        if match is None or not headers.get("x-amz-date"):
            return _error(
                403,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method.",
            )
        signed = match["signed"].split(";")
        if match["service"] != "bedrock" or "host" not in signed or "x-amz-date" not in signed:
            return _error(
                403,
                "InvalidSignatureException",
                f"Credential should be scoped to correct service: 'bedrock' and sign host and x-amz-date "
                f"(got service {match['service']!r}, signed headers {match['signed']!r}).",
            )
        if match["key"] == INVALID_ACCESS_KEY:
            return _error(
                403, "UnrecognizedClientException", "The security token included in the request is invalid."
            )
        return None

    def fault_reply(self, fault: Fault, request: SimRequest) -> ErrorReply:
        status, error_type, message = _FAULTS[fault.kind]
        return _error(status, error_type, message, _request_id(request))

    def bad_request(self, message: str, *, param: str | None = None) -> ErrorReply:
        return _error(400, "ValidationException", message)

    def unknown_model(self, model: str) -> ErrorReply:
        return _error(404, "ResourceNotFoundException", f"The provided model identifier is invalid: {model}.")

    def malformed(self, request: SimRequest) -> tuple[bytes, str]:
        if request.stream:
            frame = bytearray(encode_event("messageStart", {"role": "assistant"}))
            frame[-1] ^= 0xFF  # a message CRC that does not match
            return bytes(frame), EVENT_STREAM
        return b'{"output":{"message":{"role":"assistant","content":[', "application/json"

    def mistyped(self, request: SimRequest) -> tuple[bytes, str]:
        if request.stream:
            start = encode_event("messageStart", {"role": "assistant"})
            use = {"toolUseId": "tooluse_1", "name": "lookup"}
            block = encode_event(
                "contentBlockStart", {"contentBlockIndex": "first", "start": {"toolUse": use}}
            )
            return start + block, EVENT_STREAM
        return dump_json({"output": {"message": {"role": "assistant", "content": "Hi"}}}), "application/json"

    # ---- converse ----------------------------------------------------------------------------------

    def parse_converse(self, payload: Any, request: Request) -> SimRequest:
        if not isinstance(payload, dict):
            raise WireError(self.bad_request("The request body must be a JSON object."))
        model = str(request.path_params["model_id"])
        raw_messages = payload.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise WireError(self.bad_request("The messages field is required and must not be empty."))
        messages = [
            Message("system", str(b.get("text") or ""))
            for b in payload.get("system") or []
            if isinstance(b, dict)
        ]
        previous = None
        for index, raw in enumerate(raw_messages):
            if not isinstance(raw, dict) or raw.get("role") not in ("user", "assistant"):
                raise WireError(self.bad_request(f"messages.{index}.role must be user or assistant."))
            if raw["role"] == previous:
                raise WireError(
                    self.bad_request("A conversation must alternate between user and assistant roles.")
                )
            previous = raw["role"]
            messages.extend(self._blocks(raw, index))
        tool_config = payload.get("toolConfig") or {}
        tools = [
            Tool(
                name=s["name"],
                parameters=(s.get("inputSchema") or {}).get("json") or {},
                description=s.get("description") or "",
            )
            for t in tool_config.get("tools") or []
            if isinstance(t, dict) and isinstance(s := t.get("toolSpec"), dict) and "name" in s
        ]
        inference = payload.get("inferenceConfig") or {}
        max_tokens = inference.get("maxTokens")
        return SimRequest(
            wire=self.name,
            model=model,
            messages=messages,
            tools=tools,
            tool_choice=_tool_choice(tool_config.get("toolChoice")),
            response_format=_output_format(payload.get("outputConfig")),
            max_tokens=int(max_tokens) if isinstance(max_tokens, int) else None,
            stream=request.url.path.endswith("/converse-stream"),
        )

    def _blocks(self, raw: dict[str, Any], index: int) -> list[Message]:
        content = raw.get("content")
        if not isinstance(content, list) or not content:
            raise WireError(
                self.bad_request(f"messages.{index}.content must be a non-empty list of content blocks.")
            )
        found: list[Message] = []
        text: list[str] = []
        for block in content:
            if not isinstance(block, dict):
                raise WireError(
                    self.bad_request(f"messages.{index}.content holds a block that is not an object.")
                )
            if "text" in block:
                text.append(str(block["text"]))
            elif "toolResult" in block:
                parts = block["toolResult"].get("content") or []
                found.append(Message("tool", "".join(_result_text(p) for p in parts if isinstance(p, dict))))
        if text:
            found.insert(0, Message(str(raw["role"]), "".join(text)))
        return found

    def converse_reply(self, request: SimRequest, admission: Admission) -> Reply:
        completion = generate(request, admission)
        headers = {"x-amzn-RequestId": _request_id(request)}
        if request.stream:
            return StreamReply(self._events(completion), media_type=EVENT_STREAM, headers=headers)
        content: list[dict[str, Any]] = [{"text": completion.text}] if completion.text is not None else []
        content += [
            {
                "toolUse": {
                    "toolUseId": _tool_use_id(call.id),
                    "name": call.name,
                    "input": json.loads(call.arguments),
                }
            }
            for call in completion.tool_calls
        ]
        body = {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": _STOP_REASONS[completion.finish_reason],
            "usage": _usage(completion),
            "metrics": {"latencyMs": 0},
        }
        return JSONReply(body, headers=headers)

    def _events(self, completion: Completion) -> list[bytes]:
        frames = [encode_event("messageStart", {"p": "abcd", "role": "assistant"})]
        if completion.tool_calls:
            for index, call in enumerate(completion.tool_calls):
                start = {"toolUse": {"toolUseId": _tool_use_id(call.id), "name": call.name}}
                frames.append(encode_event("contentBlockStart", {"contentBlockIndex": index, "start": start}))
                for offset in range(0, len(call.arguments), _ARGUMENT_FRAGMENT):
                    delta = {"toolUse": {"input": call.arguments[offset : offset + _ARGUMENT_FRAGMENT]}}
                    frames.append(
                        encode_event("contentBlockDelta", {"contentBlockIndex": index, "delta": delta})
                    )
                frames.append(encode_event("contentBlockStop", {"contentBlockIndex": index}))
        else:
            for piece in _WORD.findall(completion.text or ""):
                frames.append(
                    encode_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece}})
                )
            frames.append(encode_event("contentBlockStop", {"contentBlockIndex": 0}))
        frames.append(encode_event("messageStop", {"stopReason": _STOP_REASONS[completion.finish_reason]}))
        frames.append(encode_event("metadata", {"usage": _usage(completion), "metrics": {"latencyMs": 0}}))
        return frames

    # ---- Titan embeddings --------------------------------------------------------------------------

    def parse_invoke(self, payload: Any, request: Request) -> SimRequest:
        model = str(request.path_params["model_id"])
        if not model.startswith(("amazon.titan-embed", "sim-")):
            raise WireError(
                self.bad_request(f"The simulator's InvokeModel serves Titan embeddings only, not {model}.")
            )
        if (
            not isinstance(payload, dict)
            or not isinstance(payload.get("inputText"), str)
            or not payload["inputText"]
        ):
            raise WireError(
                self.bad_request("Malformed input request: #: required key [inputText] not found.")
            )
        dimensions = payload.get("dimensions") or _TITAN_DIMENSIONS
        if dimensions not in (256, 512, 1024):
            raise WireError(
                self.bad_request(
                    f"Malformed input request: dimensions {dimensions} is not one of 256, 512, 1024."
                )
            )
        return SimRequest(
            wire=self.name,
            model=model,
            messages=[Message("user", payload["inputText"])],
            extra={"dimensions": dimensions},
        )

    def invoke_reply(self, request: SimRequest, admission: Admission) -> Reply:
        text = request.messages[0].text
        body = {
            "embedding": _embedding(text, request.extra["dimensions"]),
            "inputTextTokenCount": count_tokens(text),
        }
        return JSONReply(body, headers={"x-amzn-RequestId": _request_id(request)})

    # ---- routes ------------------------------------------------------------------------------------

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        async def converse(request: Request) -> Response:
            return await exchange(request, sim, self, self.parse_converse, self.converse_reply)

        async def invoke(request: Request) -> Response:
            return await exchange(request, sim, self, self.parse_invoke, self.invoke_reply)

        return [
            Route("/model/{model_id:path}/converse", converse, methods=["POST"]),
            Route("/model/{model_id:path}/converse-stream", converse, methods=["POST"]),
            Route("/model/{model_id:path}/invoke", invoke, methods=["POST"]),
        ]


def routes(sim: Simulator) -> list[BaseRoute]:
    return BedrockWire().routes(sim)


def _request_id(request: SimRequest) -> str:
    return str(uuid.UUID(bytes=hashlib.blake2b(request.digest.encode(), digest_size=16).digest()))


def _tool_use_id(call_id: str) -> str:
    return "tooluse_" + call_id.removeprefix("call_")


def _result_text(part: dict[str, Any]) -> str:
    if "text" in part:
        return str(part["text"])
    if "json" in part:
        return json.dumps(part["json"], separators=(",", ":"))
    return ""


def _tool_choice(raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return None
    if "any" in raw:
        return "required"
    if "auto" in raw:
        return "auto"
    tool = raw.get("tool")
    return str(tool["name"]) if isinstance(tool, dict) and "name" in tool else None


def _output_format(raw: Any) -> ResponseFormat | None:
    text_format = raw.get("textFormat") if isinstance(raw, dict) else None
    if not isinstance(text_format, dict) or text_format.get("type") != "json_schema":
        return None
    spec = (text_format.get("structure") or {}).get("jsonSchema") or {}
    try:
        schema = json.loads(spec.get("schema") or "{}")
    except ValueError as exc:
        raise WireError(
            _error(400, "ValidationException", f"outputConfig schema is not valid JSON: {exc}")
        ) from exc
    return ResponseFormat("json_schema", schema, str(spec.get("name") or "response"))


def _usage(completion: Completion) -> dict[str, int]:
    usage = completion.usage
    body = {
        "inputTokens": usage.prompt_tokens - usage.cached_tokens,
        "outputTokens": usage.completion_tokens,
        "totalTokens": usage.total_tokens,
    }
    if usage.cached_tokens:
        body["cacheReadInputTokens"] = usage.cached_tokens
        body["cacheWriteInputTokens"] = 0
    return body


def _embedding(text: str, dimensions: int) -> list[float]:
    raw = hashlib.shake_256(text.encode()).digest(dimensions)
    values = [b - 127.5 for b in raw]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]
