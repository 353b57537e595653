"""OpenAI's Responses API wire (`POST /v1/responses`): the same keys, faults, error bodies and model
rules as chat completions (`openai_wire`), with the Responses shapes: `input` items in, `output` items
out (`message`, `function_call`, and for reasoning models an encrypted `reasoning` item when asked
with `include: ["reasoning.encrypted_content"]`), and semantic stream events (`response.created`,
`response.output_text.delta`, `response.function_call_arguments.delta`, `response.completed`).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from simulator.app import JSONReply, Reply, StreamReply, WireError, dump_json, exchange, sse_frame
from simulator.core import (
    Admission,
    Completion,
    Message,
    ResponseFormat,
    SimRequest,
    Simulator,
    Tool,
    generate,
    is_reasoning_model,
)
from simulator.openai_wire import OpenAIWire

__all__ = ["OpenAIResponsesWire", "routes"]

_WORD = re.compile(r"\s*\S+|\s+")
_ARGUMENT_FRAGMENT = 16
_ROLES = {"user", "assistant", "system", "developer"}


class OpenAIResponsesWire(OpenAIWire):
    name: ClassVar[str] = "openai"

    def mistyped(self, request: SimRequest) -> tuple[bytes, str]:
        response = {"id": "resp_sim_mistyped", "object": "response", "model": request.model, "output": "Hi"}
        if not request.stream:
            return dump_json(response), "application/json"
        created = {
            "type": "response.created",
            "response": {**response, "status": "in_progress", "output": []},
        }
        call = {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": ""}
        added = {"type": "response.output_item.added", "output_index": "first", "item": call}
        return (
            sse_frame(created, "response.created") + sse_frame(added, "response.output_item.added"),
            "text/event-stream",
        )

    def parse_responses(self, payload: Any, request: Request) -> SimRequest:
        if not isinstance(payload, dict):
            raise WireError(self.bad_request("The request body must be a JSON object."))
        model = self.model_for(payload, request)
        if is_reasoning_model(model):
            self._check_reasoning_parameters(model, payload)
        raw_input = payload.get("input")
        items = [{"role": "user", "content": raw_input}] if isinstance(raw_input, str) else raw_input
        if not isinstance(items, list) or not items:
            raise WireError(self.bad_request("Missing required parameter: 'input'.", param="input"))
        messages: list[Message] = []
        if isinstance(payload.get("instructions"), str):
            messages.append(Message("system", payload["instructions"]))
        for index, item in enumerate(items):
            messages.extend(self._item(item, index))
        tools = [
            Tool(name=t["name"], parameters=t.get("parameters") or {}, description=t.get("description") or "")
            for t in payload.get("tools") or []
            if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("name"), str)
        ]
        max_tokens = payload.get("max_output_tokens")
        include = payload.get("include") or []
        return SimRequest(
            wire=self.name,
            model=model,
            messages=messages,
            tools=tools,
            tool_choice=_tool_choice(payload.get("tool_choice")),
            response_format=_text_format(payload.get("text")),
            max_tokens=int(max_tokens) if max_tokens is not None else None,
            stream=bool(payload.get("stream")),
            extra={"encrypted_reasoning": "reasoning.encrypted_content" in include},
        )

    def _item(self, item: Any, index: int) -> list[Message]:
        if not isinstance(item, dict):
            raise WireError(
                self.bad_request(f"Invalid type for 'input[{index}]': expected an object.", param="input")
            )
        kind = item.get("type", "message")
        if kind == "function_call_output":
            return [Message("tool", str(item.get("output") or ""))]
        if kind == "function_call":
            return [Message("assistant", str(item.get("arguments") or ""))]
        if kind == "reasoning":
            return []
        if kind != "message" or item.get("role") not in _ROLES:
            raise WireError(
                self.bad_request(
                    f"Invalid value: '{item.get('role')}'. Supported values are: 'assistant', 'system', "
                    "'developer', and 'user'.",
                    param=f"input[{index}].role",
                )
            )
        role = "system" if item["role"] == "developer" else str(item["role"])
        content = item.get("content")
        if isinstance(content, list):
            text = "".join(str(p.get("text") or "") for p in content if isinstance(p, dict))
        else:
            text = str(content or "")
        return [Message(role, text)]

    def responses_reply(self, request: SimRequest, admission: Admission) -> Reply:
        completion = generate(request, admission)
        response_id = f"resp_{request.digest}"
        output = self._output(request, completion)
        body = {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "incomplete" if completion.finish_reason == "length" else "completed",
            "incomplete_details": {"reason": "max_output_tokens"}
            if completion.finish_reason == "length"
            else None,
            "model": request.model,
            "output": output,
            "store": False,
            "usage": _usage(completion),
        }
        if not request.stream:
            return JSONReply(body)
        return StreamReply(self._events(body))

    def _output(self, request: SimRequest, completion: Completion) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = []
        if is_reasoning_model(request.model) and request.extra.get("encrypted_reasoning"):
            sealed = base64.b64encode(
                hashlib.blake2b(request.digest.encode(), digest_size=32).digest()
            ).decode()
            output.append(
                {
                    "type": "reasoning",
                    "id": f"rs_{request.digest}",
                    "summary": [],
                    "encrypted_content": sealed,
                }
            )
        for call in completion.tool_calls:
            output.append(
                {
                    "type": "function_call",
                    "id": "fc_" + call.id.removeprefix("call_"),
                    "call_id": call.id,
                    "name": call.name,
                    "arguments": call.arguments,
                    "status": "completed",
                }
            )
        if completion.text is not None:
            text = {"type": "output_text", "text": completion.text, "annotations": []}
            output.append(
                {
                    "type": "message",
                    "id": f"msg_{request.digest}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [text],
                }
            )
        return output

    def _events(self, body: dict[str, Any]) -> list[bytes]:
        sequence = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal sequence
            sequence += 1
            data = {"type": kind, "sequence_number": sequence, **fields}
            return b"event: " + kind.encode() + b"\ndata: " + dump_json(data) + b"\n\n"

        started = {**body, "status": "in_progress", "output": [], "usage": None}
        frames = [
            event("response.created", response=started),
            event("response.in_progress", response=started),
        ]
        for index, item in enumerate(body["output"]):
            if item["type"] == "function_call":
                frames.append(
                    event("response.output_item.added", output_index=index, item={**item, "arguments": ""})
                )
                arguments = item["arguments"]
                for start in range(0, len(arguments), _ARGUMENT_FRAGMENT):
                    fragment = arguments[start : start + _ARGUMENT_FRAGMENT]
                    frames.append(
                        event(
                            "response.function_call_arguments.delta",
                            item_id=item["id"],
                            output_index=index,
                            delta=fragment,
                        )
                    )
            elif item["type"] == "message":
                frames.append(
                    event("response.output_item.added", output_index=index, item={**item, "content": []})
                )
                for piece in _WORD.findall(item["content"][0]["text"]):
                    frames.append(
                        event(
                            "response.output_text.delta",
                            item_id=item["id"],
                            output_index=index,
                            content_index=0,
                            delta=piece,
                        )
                    )
            else:
                frames.append(event("response.output_item.added", output_index=index, item=item))
            frames.append(event("response.output_item.done", output_index=index, item=item))
        final = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        frames.append(event(final, response=body))
        return frames

    def routes(self, sim: Simulator) -> list[BaseRoute]:
        async def responses(request: Request) -> Response:
            return await exchange(request, sim, self, self.parse_responses, self.responses_reply)

        return [Route("/v1/responses", responses, methods=["POST"])]


def routes(sim: Simulator) -> list[BaseRoute]:
    return OpenAIResponsesWire().routes(sim)


def _tool_choice(raw: Any) -> str | None:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        return str(raw["name"])
    return None


def _text_format(raw: Any) -> ResponseFormat | None:
    fmt = raw.get("format") if isinstance(raw, dict) else None
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        return ResponseFormat("json_schema", fmt.get("schema") or {}, fmt.get("name") or "response")
    if fmt.get("type") == "json_object":
        return ResponseFormat("json_object")
    return None


def _usage(completion: Completion) -> dict[str, Any]:
    usage = completion.usage
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }
