"""Anthropic's wire format: `POST /v1/messages`, JSON and server-sent events.

Maps the Messages API to the neutral `SimRequest` / `Completion` of `simulator.core` and back:
`system` becomes a system message, `tool_result` blocks become tool messages, answers come back as
`text` / `tool_use` content blocks with `msg_...` / `toolu_...` ids, errors in Anthropic's
`{"type": "error", "error": {"type", "message"}}` shape, and usage with `input_tokens` counting only
the uncached part of the prompt (as Anthropic does).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any, ClassVar

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from simulator.app import (
    ErrorReply,
    JSONReply,
    Reply,
    StreamReply,
    Wire,
    WireError,
    dump_json,
    exchange,
    sse_frame,
)
from simulator.core import (
    Admission,
    Completion,
    Fault,
    Message,
    ResponseFormat,
    SimRequest,
    Simulator,
    Tool,
    generate,
    prompt_tokens,
)

__all__ = ["CONTEXT_WINDOW", "INVALID_KEY", "AnthropicWire", "routes", "thinking_signature"]

INVALID_KEY = "sk-ant-invalid"
CONTEXT_WINDOW = 200_000
_WORD = re.compile(r"\s*\S+|\s+")
_ARGUMENT_FRAGMENT = 16
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_ONE_SAMPLER = re.compile(r"^claude-(sonnet-4-5|haiku-4-5|opus-4-1)")
"""Models that take temperature or top_p, not both."""
_MIN_THINKING_BUDGET = 1024
_THINKING_TEXT = "The user asked a question; I will answer it or call the tool that can."
_MISSING_THINKING = (
    "messages.{index}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{found}`. When "
    "`thinking` is enabled, a final `assistant` message must start with a thinking block (preceeding the "
    "lastmost set of `tool_use` and `tool_result` blocks). We recommend you include thinking blocks from "
    "previous turns. To avoid this requirement, disable `thinking`. Please consult our documentation at "
    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
)


def thinking_signature(thinking: str) -> str:
    """The simulator's signature of a thinking block (Anthropic's are opaque; these can be checked)."""
    return base64.b64encode(
        b"kf-sim-thinking:" + hashlib.blake2b(thinking.encode(), digest_size=24).digest()
    ).decode()


# fault kind -> (Anthropic error type, message)
_FAULTS: dict[str, tuple[str, str]] = {
    "400": ("invalid_request_error", "Simulated bad request."),
    "401": ("authentication_error", "invalid x-api-key"),
    "403": ("permission_error", "Your API key does not have permission to use the specified resource."),
    "429": (
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 50 requests per minute. "
        "For details, refer to: https://docs.claude.com/en/api/rate-limits.",
    ),
    "500": ("api_error", "Internal server error"),
    "503": ("api_error", "Service unavailable"),
    "529": ("overloaded_error", "Overloaded"),
    "quota": (
        "invalid_request_error",
        "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to "
        "upgrade or purchase credits.",
    ),
    "context_length": ("invalid_request_error", "prompt is too long: {tokens} tokens > {window} maximum"),
    "content_filter": ("invalid_request_error", "Output blocked by content filtering policy"),
}


def _error_body(type_: str, message: str, request_id: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}


def _frame(event: dict[str, Any]) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + dump_json(event) + b"\n\n"


class AnthropicWire(Wire):
    name: ClassVar[str] = "anthropic"

    # ---- errors ----------------------------------------------------------------------------------

    def auth_error(self, headers: Headers) -> ErrorReply | None:
        key = _api_key(headers)
        if not key:
            return ErrorReply(
                401, _error_body("authentication_error", "x-api-key header is required", "req_sim")
            )
        if key == INVALID_KEY:
            return ErrorReply(401, _error_body("authentication_error", "invalid x-api-key", "req_sim"))
        if not headers.get("anthropic-version"):
            return ErrorReply(
                400, _error_body("invalid_request_error", "anthropic-version: header is required", "req_sim")
            )
        return None

    def fault_reply(self, fault: Fault, request: SimRequest) -> ErrorReply:
        request_id = f"req_{request.digest}"
        if fault.kind == "404":
            body = self.unknown_model(request.model).body
            return ErrorReply(404, {**body, "request_id": request_id}, {"request-id": request_id})
        type_, message = _FAULTS[fault.kind]
        message = message.format(
            tokens=max(prompt_tokens(request.messages), CONTEXT_WINDOW + 1), window=CONTEXT_WINDOW
        )
        headers = {"request-id": request_id}
        if fault.kind in ("429", "529", "503", "500"):
            headers["x-should-retry"] = "true"
        status = 400 if fault.kind == "quota" else fault.status  # Anthropic refuses it as a bad request
        return ErrorReply(status, _error_body(type_, message, request_id), headers)

    def bad_request(self, message: str, *, param: str | None = None) -> ErrorReply:
        return ErrorReply(400, _error_body("invalid_request_error", message, "req_sim"))

    def unknown_model(self, model: str) -> ErrorReply:
        return ErrorReply(404, _error_body("not_found_error", f"model: {model}", "req_sim"))

    def malformed(self, request: SimRequest) -> tuple[bytes, str]:
        if request.stream:
            return (
                b'event: message_start\ndata: {"type": "message_start", "message": {"id": \n\n',
                "text/event-stream",
            )
        return b'{"id": "msg_sim_malformed", "type": "message", "content": [{"type": ', "application/json"

    def mistyped(self, request: SimRequest) -> tuple[bytes, str]:
        if request.stream:
            start = {"type": "message_start", "message": "msg_sim_mistyped"}
            return sse_frame(start, "message_start"), "text/event-stream"
        body = {"id": "msg_sim_mistyped", "type": "message", "model": request.model, "content": "Hi"}
        return dump_json(body), "application/json"

    # ---- parsing ---------------------------------------------------------------------------------

    def parse_messages(self, payload: Any, request: Request) -> SimRequest:
        if not isinstance(payload, dict):
            raise WireError(self.bad_request("The request body must be a JSON object."))
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise WireError(self.bad_request("model: Field required"))
        max_tokens = payload.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise WireError(self.bad_request("max_tokens: Field required (an integer of at least 1)"))
        raw_messages = payload.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise WireError(self.bad_request("messages: Field required (at least one message)"))
        messages: list[Message] = []
        system = _blocks_text(payload.get("system"))
        if system:
            messages.append(Message("system", system))
        for index, raw in enumerate(raw_messages):
            messages.extend(self._turn(raw, index))
        if (
            _ONE_SAMPLER.match(model)
            and payload.get("temperature") is not None
            and payload.get("top_p") is not None
        ):
            raise WireError(
                self.bad_request(
                    "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
                )
            )
        thinking = self._thinking(payload, max_tokens)
        if thinking:
            self._check_thinking_blocks(raw_messages)
        tools = [
            Tool(
                name=t["name"], parameters=t.get("input_schema") or {}, description=t.get("description") or ""
            )
            for t in payload.get("tools") or []
            if isinstance(t, dict) and isinstance(t.get("name"), str) and "input_schema" in t
        ]
        return SimRequest(
            wire=self.name,
            model=model,
            messages=messages,
            tools=tools,
            tool_choice=_tool_choice(payload.get("tool_choice")),
            response_format=_response_format(payload),
            max_tokens=max_tokens,
            stream=bool(payload.get("stream")),
            extra={"thinking": thinking},
        )

    def _thinking(self, payload: dict[str, Any], max_tokens: int) -> bool:
        config = payload.get("thinking")
        if not isinstance(config, dict) or config.get("type") != "enabled":
            return False
        budget = config.get("budget_tokens")
        if not isinstance(budget, int) or budget < _MIN_THINKING_BUDGET:
            raise WireError(
                self.bad_request(
                    f"thinking.enabled.budget_tokens: Input should be greater than or equal to {_MIN_THINKING_BUDGET}"
                )
            )
        if max_tokens <= budget:
            raise WireError(self.bad_request("`max_tokens` must be greater than `thinking.budget_tokens`."))
        return True

    def _check_thinking_blocks(self, raw_messages: list[Any]) -> None:
        """With thinking on, the last assistant turn that used tools must start with the signed thinking
        block it was answered with."""
        for index in range(len(raw_messages) - 1, -1, -1):
            turn = raw_messages[index]
            content = turn.get("content") if isinstance(turn, dict) else None
            if not isinstance(turn, dict) or turn.get("role") != "assistant" or not isinstance(content, list):
                continue
            if not any(isinstance(b, dict) and b.get("type") == "tool_use" for b in content):
                return
            first = content[0] if content and isinstance(content[0], dict) else {}
            if first.get("type") == "redacted_thinking":
                return
            if first.get("type") != "thinking":
                raise WireError(
                    self.bad_request(_MISSING_THINKING.format(index=index, found=first.get("type")))
                )
            if first.get("signature") != thinking_signature(str(first.get("thinking") or "")):
                raise WireError(
                    self.bad_request(f"messages.{index}.content.0: Invalid `signature` in `thinking` block")
                )
            return

    def _turn(self, raw: Any, index: int) -> list[Message]:
        if not isinstance(raw, dict) or raw.get("role") not in ("user", "assistant"):
            raise WireError(self.bad_request(f"messages.{index}.role: Input should be 'user' or 'assistant'"))
        role, content = raw["role"], raw.get("content")
        if isinstance(content, str):
            return [Message(role, content)]
        if not isinstance(content, list):
            raise WireError(self.bad_request(f"messages.{index}.content: Field required"))
        found: list[Message] = []
        text: list[str] = []
        for block in content:
            if not isinstance(block, dict):
                raise WireError(
                    self.bad_request(f"messages.{index}.content: Input should be a valid list of blocks")
                )
            kind = block.get("type")
            if kind == "tool_result":
                if role != "user":
                    raise WireError(
                        self.bad_request(f"messages.{index}: tool_result blocks belong in a user turn")
                    )
                found.append(Message("tool", _blocks_text(block.get("content"))))
            elif kind == "text":
                text.append(str(block.get("text") or ""))
            elif kind == "tool_use":
                text.append(json.dumps(block.get("input") or {}, separators=(",", ":")))
        if text or not found:
            found.append(Message(role, "".join(text)))
        return found

    # ---- replies ---------------------------------------------------------------------------------

    def messages_reply(self, request: SimRequest, admission: Admission) -> Reply:
        completion = generate(request, admission)
        message_id = f"msg_{request.digest}"
        headers = {"request-id": f"req_{request.digest}"}
        content = _content(completion)
        if request.extra.get("thinking"):
            thinking = {
                "type": "thinking",
                "thinking": _THINKING_TEXT,
                "signature": thinking_signature(_THINKING_TEXT),
            }
            content = [thinking, *content]
        usage = _usage(completion)
        stop_reason = _STOP_REASONS.get(completion.finish_reason, "end_turn")
        if request.stream:
            return StreamReply(
                self._events(request.model, message_id, content, stop_reason, usage), headers=headers
            )
        body = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        return JSONReply(body, headers=headers)

    def _events(
        self,
        model: str,
        message_id: str,
        content: list[dict[str, Any]],
        stop_reason: str,
        usage: dict[str, Any],
    ) -> list[bytes]:
        start_message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {**usage, "output_tokens": 1},
        }
        frames = [_frame({"type": "message_start", "message": start_message})]
        for index, block in enumerate(content):
            if block["type"] == "thinking":
                opening: dict[str, Any] = {"type": "thinking", "thinking": ""}
                frames.append(
                    _frame({"type": "content_block_start", "index": index, "content_block": opening})
                )
                for piece in _WORD.findall(block["thinking"]):
                    delta = {"type": "thinking_delta", "thinking": piece}
                    frames.append(_frame({"type": "content_block_delta", "index": index, "delta": delta}))
                delta = {"type": "signature_delta", "signature": block["signature"]}
                frames.append(_frame({"type": "content_block_delta", "index": index, "delta": delta}))
            elif block["type"] == "text":
                frames.append(
                    _frame(
                        {
                            "type": "content_block_start",
                            "index": index,
                            "content_block": {"type": "text", "text": ""},
                        }
                    )
                )
                if index == 0:
                    frames.append(_frame({"type": "ping"}))
                for piece in _WORD.findall(block["text"]):
                    delta = {"type": "text_delta", "text": piece}
                    frames.append(_frame({"type": "content_block_delta", "index": index, "delta": delta}))
            else:
                head = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
                frames.append(_frame({"type": "content_block_start", "index": index, "content_block": head}))
                if index == 0:
                    frames.append(_frame({"type": "ping"}))
                arguments = json.dumps(block["input"], separators=(",", ":"))
                pieces = [""] + [
                    arguments[i : i + _ARGUMENT_FRAGMENT]
                    for i in range(0, len(arguments), _ARGUMENT_FRAGMENT)
                ]
                for piece in pieces:
                    delta = {"type": "input_json_delta", "partial_json": piece}
                    frames.append(_frame({"type": "content_block_delta", "index": index, "delta": delta}))
            frames.append(_frame({"type": "content_block_stop", "index": index}))
        delta_usage = {
            "input_tokens": usage["input_tokens"],
            "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
            "cache_read_input_tokens": usage["cache_read_input_tokens"],
            "output_tokens": usage["output_tokens"],
        }
        frames.append(
            _frame(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": delta_usage,
                }
            )
        )
        frames.append(_frame({"type": "message_stop"}))
        return frames

    # ---- routes ----------------------------------------------------------------------------------

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        async def messages(request: Request) -> Response:
            return await exchange(request, sim, self, self.parse_messages, self.messages_reply)

        return [Route("/v1/messages", messages, methods=["POST"])]


def routes(sim: Simulator) -> list[BaseRoute]:
    return AnthropicWire().routes(sim)


def _api_key(headers: Headers) -> str:
    """The key from `x-api-key`, or from `Authorization: Bearer` (which newer official SDKs send)."""
    key = headers.get("x-api-key", "").strip()
    if not key:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
    return key


def _blocks_text(content: Any) -> str:
    """Text of a `system` field or `tool_result` content: a string or a list of text blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(b.get("text") or "") for b in content if isinstance(b, dict) and b.get("type") == "text"
        )
    return str(content)


def _tool_choice(raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return None
    kind = raw.get("type")
    if kind == "tool" and isinstance(raw.get("name"), str):
        return str(raw["name"])
    return {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))


def _response_format(payload: dict[str, Any]) -> ResponseFormat | None:
    config = payload.get("output_config")
    spec = config.get("format") if isinstance(config, dict) else payload.get("output_format")
    if isinstance(spec, dict) and spec.get("type") == "json_schema":
        return ResponseFormat("json_schema", spec.get("schema") or {})
    return None


def _content(completion: Completion) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if completion.text:
        blocks.append({"type": "text", "text": completion.text})
    for call in completion.tool_calls:
        tool_id = "toolu_01" + call.id.removeprefix("call_")
        blocks.append(
            {"type": "tool_use", "id": tool_id, "name": call.name, "input": json.loads(call.arguments)}
        )
    return blocks


def _usage(completion: Completion) -> dict[str, Any]:
    """Anthropic's usage: `input_tokens` leaves out what was read from the cache."""
    usage = completion.usage
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "service_tier": "standard",
    }
