"""Amazon Bedrock's Converse API (``/model/{id}/converse`` and ``/converse-stream``) and Titan embeddings.

Requests are signed with AWS Signature Version 4 (``providers._sigv4``) from ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and an optional ``AWS_SESSION_TOKEN``. The stream is AWS event-stream binary
framing, decoded here with its CRCs checked. Structured output goes through a forced tool whose input
schema is the requested JSON schema; its input comes back as the answer's text. Bedrock reports
``inputTokens`` without the cache reads and writes, so they are added to ``prompt_tokens``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from kernel.batch import BatchItem, BatchItemResult, BatchJob, BatchLimits
from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    DeveloperMessage,
    DocumentPart,
    EmbedRequest,
    EmbedResponse,
    FinishReason,
    FunctionCall,
    ImagePart,
    Message,
    NamedToolChoice,
    ProviderState,
    ProviderStateEvent,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    StreamDone,
    StreamEvent,
    StreamStart,
    SystemMessage,
    TextDelta,
    TextPart,
    ToolCall,
    ToolCallDelta,
    ToolMessage,
    Usage,
    UserMessage,
    message_text,
)
from kernel.errors import (
    ContentFiltered,
    InvalidRequest,
    MalformedResponse,
    MissingCredentials,
    ProviderError,
    StreamInterrupted,
    UnsupportedCapability,
    error_from_status,
)
from kernel.provider import Capabilities
from providers import bedrock_batch
from providers._bedrock_content import add_reasoning, breakpoints, cache_point, document_block, image_block
from providers._http import HttpProvider, as_int, as_list, as_object, loads_object, required
from providers._sigv4 import AwsCredentials, EventStreamDecoder, EventStreamMessage, sign

__all__ = ["BedrockProvider"]

_FINISH_REASONS: dict[str | None, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
    "malformed_model_output": "error",
    "malformed_tool_use": "error",
    None: "stop",
}
# AWS error type -> the HTTP status whose kernel class fits it (Bedrock's own statuses disagree in places:
# ModelNotReadyException is a 429 but means the model is loading; a bad access key is a 403).
_ERROR_STATUS: dict[str, int] = {
    "ThrottlingException": 429,
    "ServiceQuotaExceededException": 402,  # the account's quota: QuotaExceeded, not a rate limit
    "ServiceUnavailableException": 503,
    "ModelNotReadyException": 503,
    "ValidationException": 400,
    "AccessDeniedException": 403,
    "ResourceNotFoundException": 404,
    "UnrecognizedClientException": 401,
    "InvalidSignatureException": 401,
    "ExpiredTokenException": 401,
    "IncompleteSignatureException": 401,
    "MissingAuthenticationTokenException": 401,
    "ModelTimeoutException": 408,
    "InternalServerException": 500,
    "ModelErrorException": 500,
    "ModelStreamErrorException": 500,
}
_JSON_OBJECT_TOOL = "json_object"
_MIN_THINKING_BUDGET = 1024
_DEFAULT_ANSWER_TOKENS = 4096
"""Room left for the answer when thinking is on and the request sets no max_tokens."""
_PROVIDER_OPTIONS = frozenset(
    {
        "additionalModelRequestFields",
        "additionalModelResponseFieldPaths",
        "guardrailConfig",
        "performanceConfig",
        "promptVariables",
        "requestMetadata",
    }
)
"""Converse request fields the contract does not type, accepted under ``provider_options.bedrock``
(https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_Converse.html)."""
_CONTENT_FILTER_WORDING = "content filtering policy"


# --- the provider --------------------------------------------------------------------------------


class BedrockProvider(HttpProvider):
    name = "bedrock"
    version = "1.0.0"
    kernel_api = (1, 1)
    description = "Amazon Bedrock Converse API (SigV4) and Titan text embeddings"
    capabilities = Capabilities(
        embeddings=True, vision=True, documents=True, json_schema_mode="tool", batch=True
    )
    batch_limits: ClassVar[BatchLimits | None] = bedrock_batch.LIMITS
    unsupported_options: ClassVar[frozenset[str]] = frozenset(
        {
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "user",
            "parallel_tool_calls",
            "reasoning_effort",
        }
    )
    api_key_env: ClassVar[str | None] = "AWS_ACCESS_KEY_ID"
    secret_key_env: ClassVar[str] = "AWS_SECRET_ACCESS_KEY"
    base_url_env: ClassVar[str | None] = "BEDROCK_ENDPOINT_URL"
    service: ClassVar[str] = "bedrock"

    # --- connection ------------------------------------------------------------------------------

    @property
    def region(self) -> str:
        region = (
            self.settings.options.get("region")
            or self._environ.get("AWS_REGION")
            or self._environ.get("AWS_DEFAULT_REGION")
        )
        if not region:
            raise MissingCredentials(
                f"provider {self.name!r} needs an AWS region: set the environment variable AWS_REGION "
                "on the worker (or options.region in the provider settings)",
                provider=self.name,
                env_var="AWS_REGION",
            )
        return str(region)

    @property
    def base_url(self) -> str:
        if self.settings.base_url:
            return self.settings.base_url.rstrip("/")
        override = self._environ.get("BEDROCK_ENDPOINT_URL")
        if override:
            return override.rstrip("/")
        return f"https://bedrock-runtime.{self.region}.amazonaws.com"

    def has_credentials(self) -> bool:
        return bool(self._environ.get("AWS_ACCESS_KEY_ID") and self._environ.get(self.secret_key_env))

    def credentials(self) -> AwsCredentials:
        """The AWS keys, or ``MissingCredentials`` naming the variables to set."""
        access = self._environ.get("AWS_ACCESS_KEY_ID")
        secret = self._environ.get(self.secret_key_env)
        if not access or not secret:
            missing = [n for n, v in (("AWS_ACCESS_KEY_ID", access), (self.secret_key_env, secret)) if not v]
            raise MissingCredentials(
                f"provider {self.name!r} has no AWS credentials: set the environment variables "
                f"{' and '.join(missing)} on the worker (AWS_SESSION_TOKEN too for temporary credentials)",
                provider=self.name,
                env_var=missing[0],
            )
        return AwsCredentials(access, secret, self._environ.get("AWS_SESSION_TOKEN") or None)

    def _signed_request(self, path: str, payload: Mapping[str, Any], accept: str) -> httpx.Request:
        credentials, region = self.credentials(), self.region
        url = self._url(path)
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"content-type": "application/json", "accept": accept}
        headers.update(
            sign("POST", url, headers, body, credentials=credentials, region=region, service=self.service)
        )
        return self.client.build_request("POST", url, content=body, headers=headers)

    async def _post_signed(self, path: str, payload: Mapping[str, Any], *, model: str) -> tuple[Any, str]:
        response = await self._send(self._signed_request(path, payload, "application/json"), model=model)
        return self._json_body(response, model), response.headers.get("x-amzn-requestid", "")

    def _open_signed_stream(
        self, path: str, payload: Mapping[str, Any], *, model: str
    ) -> AbstractAsyncContextManager[httpx.Response]:
        request = self._signed_request(path, payload, "application/vnd.amazon.eventstream")
        return self._send_stream(request, model=model)

    def _status_error(self, response: httpx.Response, text: str, model: str | None) -> ProviderError:
        try:
            body: Any = json.loads(text) if text else None
        except ValueError:
            body = None
        error_type = _error_type(response.headers.get("x-amzn-errortype"), body)
        message = body.get("message") or body.get("Message") if isinstance(body, dict) else None
        return self._aws_error(error_type, str(message or text[:300] or "(empty body)"), model, response)

    def _aws_error(
        self, error_type: str, message: str, model: str | None, response: httpx.Response | None = None
    ) -> ProviderError:
        status = _ERROR_STATUS.get(error_type) or (response.status_code if response is not None else 500)
        # A model's content-filter refusal arrives as a ValidationException; only the wording says so.
        code = "content_filter" if _CONTENT_FILTER_WORDING in message.lower() else error_type or None
        return error_from_status(
            status,
            f"{error_type}: {message}" if error_type else message,
            provider=self.name,
            model=model,
            code=code,
            headers=response.headers if response is not None else None,
        )

    # --- calls -----------------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResponse:
        self.check_chat(request)
        payload = self._map_request(request)
        data, request_id = await self._post_signed(
            _model_path(request.model, "converse"), payload, model=request.model
        )
        return self._parse_response(data, request, request_id)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.check_chat(request, stream=True)
        payload = self._map_request(request)
        self.credentials()  # refuse before the first event when no keys or region are set
        _ = self.region
        return self._guard_stream(self._stream_events(request, payload), model=request.model)

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        self.check_embed(request)
        if not request.model.startswith("amazon.titan-embed-text"):
            raise InvalidRequest(
                f"model {request.model!r}: {self.name} embeds with Amazon Titan text models only "
                "(amazon.titan-embed-text-v2:0 or amazon.titan-embed-text-v1)",
                provider=self.name,
                model=request.model,
            )
        vectors: list[list[float]] = []
        tokens = 0
        for text in request.input:  # Titan embeds one text per call
            payload: dict[str, Any] = {"inputText": text}
            if request.dimensions:
                payload["dimensions"] = request.dimensions
            data, _ = await self._post_signed(
                _model_path(request.model, "invoke"), payload, model=request.model
            )
            try:
                vectors.append([float(x) for x in data["embedding"]])
                tokens += int(data.get("inputTextTokenCount") or 0)
            except (KeyError, TypeError, ValueError) as exc:
                raise self._malformed(request.model, exc) from exc
        return EmbedResponse(
            model=request.model, provider=self.name, embeddings=vectors, usage=Usage(prompt_tokens=tokens)
        )

    # --- batches (providers/bedrock_batch.py) ------------------------------------------------------

    def batch_problem(self) -> str | None:
        missing = bedrock_batch.missing_settings(self)
        if not missing:
            return None
        return (
            "batch inference reads its input from S3 and writes its results there, through an IAM "
            f"service role: {bedrock_batch.missing_message(missing)}"
        )

    def batch_min_requests(self) -> int:
        return bedrock_batch.settings_of(self).min_records

    def batch_item_size(self, item: BatchItem) -> int:
        return len(json.dumps(bedrock_batch.record(self, item), separators=(",", ":")).encode()) + 1

    async def batch_find(self, tag: str) -> BatchJob | None:
        return await bedrock_batch.batch_find(self, tag)

    async def batch_create(self, tag: str, items: list[BatchItem]) -> BatchJob:
        return await bedrock_batch.batch_create(self, tag, items)

    async def batch_status(self, batch_id: str) -> BatchJob:
        return await bedrock_batch.batch_status(self, batch_id)

    async def batch_results(self, batch_id: str, custom_ids: list[str], model: str) -> list[BatchItemResult]:
        return await bedrock_batch.batch_results(self, batch_id, custom_ids, model)

    async def batch_cancel(self, batch_id: str) -> BatchJob:
        return await bedrock_batch.batch_cancel(self, batch_id)

    # --- mapping ---------------------------------------------------------------------------------

    def _output_tool(self, request: ChatRequest) -> str | None:
        """The name of the forced tool that carries structured output, if the request asks for it."""
        if isinstance(request.response_format, ResponseFormatJsonSchema):
            return request.response_format.json_schema.name
        if isinstance(request.response_format, ResponseFormatJsonObject):
            return _JSON_OBJECT_TOOL
        return None

    def _map_request(self, request: ChatRequest) -> dict[str, Any]:
        cache = cache_point(request)
        system: list[dict[str, Any]] = []
        for position, m in enumerate(request.messages):
            if isinstance(m, SystemMessage | DeveloperMessage) and message_text(m):
                system.append({"text": message_text(m)})
                if cache is not None and position in breakpoints(request):
                    system.append({"cachePoint": dict(cache)})
        payload: dict[str, Any] = {"messages": self._map_messages(request)}
        if system:
            payload["system"] = system
        inference = {
            "maxTokens": request.max_tokens,
            "temperature": request.temperature,
            "topP": request.top_p,
            "stopSequences": request.stop,
        }
        inference = {key: value for key, value in inference.items() if value is not None}
        if inference:
            payload["inferenceConfig"] = inference
        tool_config = self._map_tools(request, payload["messages"])
        if tool_config:
            payload["toolConfig"] = tool_config
        options = dict((request.provider_options or {}).get(self.name) or {})
        unknown = sorted(set(options) - _PROVIDER_OPTIONS)
        if unknown:
            raise InvalidRequest(
                f"provider_options.{self.name}: {', '.join(unknown)} not accepted; it accepts "
                f"{', '.join(sorted(_PROVIDER_OPTIONS))}",
                provider=self.name,
                model=request.model,
            )
        if request.service_tier is not None:
            if request.service_tier == "auto":
                raise InvalidRequest(
                    f"service_tier='auto': {self.name} offers default, flex and priority (no automatic choice)",
                    provider=self.name,
                    model=request.model,
                )
            payload["serviceTier"] = {"type": request.service_tier}
        thinking = self._thinking(request, payload)
        if thinking is not None:
            extra = dict(options.get("additionalModelRequestFields") or {})
            options["additionalModelRequestFields"] = {**extra, "thinking": thinking}
        payload.update(options)
        return payload

    def _thinking(self, request: ChatRequest, payload: dict[str, Any]) -> dict[str, Any] | None:
        """``thinking_budget`` as Claude's extended thinking (Converse passes it through
        ``additionalModelRequestFields``); other model families on Bedrock have no such field."""
        budget = request.thinking_budget
        if budget is None:
            return None
        if "anthropic." not in request.model:
            raise UnsupportedCapability(
                f"thinking_budget: {self.name} passes a thinking budget to Anthropic models only, not "
                f"{request.model!r}",
                provider=self.name,
                model=request.model,
            )
        if budget == 0:
            return {"type": "disabled"}
        if budget < _MIN_THINKING_BUDGET:
            raise InvalidRequest(
                f"thinking_budget={budget} is below Claude's minimum of {_MIN_THINKING_BUDGET} tokens (0 turns it off)",
                provider=self.name,
                model=request.model,
            )
        inference = payload.setdefault("inferenceConfig", {})
        if "maxTokens" not in inference:
            inference["maxTokens"] = budget + _DEFAULT_ANSWER_TOKENS
        elif inference["maxTokens"] <= budget:
            raise InvalidRequest(
                f"max_tokens={inference['maxTokens']} must be above thinking_budget={budget} (the budget is part of it)",
                provider=self.name,
                model=request.model,
            )
        return {"type": "enabled", "budget_tokens": budget}

    def _map_tools(self, request: ChatRequest, messages: list[dict[str, Any]]) -> dict[str, Any] | None:
        tools = [
            {
                "toolSpec": {
                    "name": t.function.name,
                    **({"description": t.function.description} if t.function.description else {}),
                    "inputSchema": {"json": t.function.parameters},
                }
            }
            for t in request.tools or []
        ]
        history_uses_tools = any("toolUse" in b or "toolResult" in b for m in messages for b in m["content"])
        choice: dict[str, Any] | None = None
        if request.tool_choice == "none":
            if history_uses_tools:
                # Converse needs the tools declared whenever the history holds tool blocks, and has no
                # choice that forbids calling them: the request cannot be honoured.
                raise UnsupportedCapability(
                    f"{self.name} cannot forbid tool calls (tool_choice 'none') in a conversation that "
                    "already holds tool calls: Converse has no 'none' choice and needs the tools declared; "
                    "use tool_choice 'auto', or leave the tool turns out of the messages",
                    provider=self.name,
                    model=request.model,
                )
            tools = []
        elif isinstance(request.tool_choice, NamedToolChoice):
            choice = {"tool": {"name": request.tool_choice.function.name}}
        elif request.tool_choice == "required":
            choice = {"any": {}}
        elif tools:
            choice = {"auto": {}}
        output_tool = self._output_tool(request)
        if output_tool is not None:
            schema: dict[str, Any] = {"type": "object"}
            description = "Give the final answer as the input of this tool."
            if isinstance(request.response_format, ResponseFormatJsonSchema):
                schema = request.response_format.json_schema.json_schema
                description = request.response_format.json_schema.description or description
            offered = bool(tools) and request.tool_choice != "none"
            tools.append(
                {
                    "toolSpec": {
                        "name": output_tool,
                        "description": description,
                        "inputSchema": {"json": schema},
                    }
                }
            )
            choice = {"any": {}} if offered else {"tool": {"name": output_tool}}
        if not tools:
            return None
        config: dict[str, Any] = {"tools": tools}
        if choice is not None:
            config["toolChoice"] = choice
        return config

    def _map_messages(self, request: ChatRequest) -> list[dict[str, Any]]:
        """Converse messages alternate user and assistant: consecutive turns of one role are merged and
        tool results travel as ``toolResult`` blocks of a user turn."""
        turns: list[dict[str, Any]] = []
        cache = cache_point(request)
        for index, message in enumerate(request.messages):
            if isinstance(message, SystemMessage | DeveloperMessage):
                continue
            role = "assistant" if message.role == "assistant" else "user"
            blocks = self._map_blocks(message, index, request.model)
            if not blocks:
                continue
            if cache is not None and index in breakpoints(request):
                blocks.append({"cachePoint": dict(cache)})
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"].extend(blocks)
            else:
                turns.append({"role": role, "content": blocks})
        return turns

    def _map_blocks(self, message: Message, index: int, model: str) -> list[dict[str, Any]]:
        where = f"messages[{index}]"
        if isinstance(message, ToolMessage):
            result = {"toolUseId": message.tool_call_id, "content": [{"text": message_text(message)}]}
            return [{"toolResult": result}]
        if isinstance(message, UserMessage):
            if isinstance(message.content, str):
                return [{"text": message.content}] if message.content else []
            blocks: list[dict[str, Any]] = []
            for part in message.content:
                if isinstance(part, TextPart):
                    if part.text:
                        blocks.append({"text": part.text})
                elif isinstance(part, ImagePart):
                    blocks.append({"image": image_block(part.image_url.url, where, model)})
                elif isinstance(part, DocumentPart):
                    blocks.append({"document": document_block(part, len(blocks), where, model)})
            return blocks
        blocks = []
        if isinstance(message, AssistantMessage):
            # Signed reasoning goes back first and unchanged, as Claude requires on a tool-use turn.
            state = message.state_for(self.name) or {}
            blocks.extend(dict(b) for b in state.get("reasoning") or [] if isinstance(b, dict))
            if message.content:
                blocks.append({"text": message.content})
            for call in message.tool_calls or []:
                try:
                    arguments = call.function.parsed_arguments()
                except ValueError as exc:
                    raise InvalidRequest(
                        f"{where}.tool_calls: the arguments of {call.function.name!r} are not valid JSON ({exc})",
                        provider=self.name,
                        model=model,
                    ) from exc
                blocks.append(
                    {"toolUse": {"toolUseId": call.id, "name": call.function.name, "input": arguments}}
                )
        return blocks

    def _map_usage(self, usage: Any) -> Usage:
        if not isinstance(usage, dict):
            return Usage()
        cache_read = as_int(usage.get("cacheReadInputTokens"), "usage.cacheReadInputTokens", optional=True)
        cache_write = as_int(usage.get("cacheWriteInputTokens"), "usage.cacheWriteInputTokens", optional=True)
        prompt = (
            as_int(usage.get("inputTokens"), "usage.inputTokens", optional=True) + cache_read + cache_write
        )
        completion = as_int(usage.get("outputTokens"), "usage.outputTokens", optional=True)
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cache_read,
            cache_write_tokens=cache_write,
        )

    def _parse_response(self, data: Any, request: ChatRequest, request_id: str) -> ChatResponse:
        return self._parse_answer(data, request.model, self._output_tool(request), request_id)

    def _parse_answer(self, data: Any, model: str, output_tool: str | None, request_id: str) -> ChatResponse:
        """A Converse response; ``output_tool`` names the forced tool carrying structured output."""
        try:
            data = as_object(data, "the answer")
            message_data = as_object(as_object(data["output"], "output")["message"], "output.message")
            text: list[str] = []
            calls: list[ToolCall] = []
            reasoning: list[dict[str, Any]] = []
            for raw_block in as_list(message_data["content"], "output.message.content"):
                block = as_object(raw_block, "content[]")
                if "reasoningContent" in block:
                    reasoning.append(
                        {"reasoningContent": as_object(block["reasoningContent"], "reasoningContent")}
                    )
                elif "text" in block:
                    text.append(str(block["text"]))
                elif "toolUse" in block:
                    use = as_object(block["toolUse"], "content[].toolUse")
                    arguments = _dumps(use.get("input") or {})
                    if use["name"] == output_tool:
                        text = [arguments]
                        continue
                    calls.append(
                        ToolCall(
                            id=str(use["toolUseId"]),
                            function=FunctionCall(name=str(use["name"]), arguments=arguments),
                        )
                    )
            stop_reason = data.get("stopReason")
            finish = _FINISH_REASONS.get(stop_reason, "stop")
            if finish == "tool_calls" and not calls:
                finish = "stop"  # only the structured-output tool was called
            usage = self._map_usage(data.get("usage"))
        except (KeyError, TypeError, ValueError) as exc:
            raise self._malformed(model, exc) from exc
        if finish == "content_filter" and not calls and not "".join(text):
            raise ContentFiltered(
                f"{self.name} filtered the answer of model {model!r} ({stop_reason})",
                provider=self.name,
                model=model,
            )
        state = ProviderState(provider=self.name, data={"reasoning": reasoning}) if reasoning else None
        message = AssistantMessage(
            content="".join(text) or None, tool_calls=calls or None, provider_state=state
        )
        return ChatResponse(
            id=request_id or _fallback_id(data),
            model=model,
            provider=self.name,
            choices=[Choice(message=message, finish_reason=finish)],
            usage=usage,
        )

    async def _stream_events(
        self, request: ChatRequest, payload: dict[str, Any]
    ) -> AsyncIterator[StreamEvent]:
        output_tool = self._output_tool(request)
        decoder = EventStreamDecoder()
        tool_index: dict[int, int] = {}  # content block index -> tool call ordinal
        answer_blocks: set[int] = set()  # blocks carrying the structured-output tool's input
        finish: FinishReason | None = None
        started = False
        reasoning: dict[int, dict[str, Any]] = {}  # content block index -> reasoning being built
        path = _model_path(request.model, "converse-stream")
        async with self._open_signed_stream(path, payload, model=request.model) as response:
            request_id = response.headers.get("x-amzn-requestid", "")
            async for chunk in response.aiter_bytes():
                for message in decoder.feed(chunk):
                    kind, body = self._event(message, request.model)
                    if not started:
                        started = True
                        yield StreamStart(
                            id=request_id or _fallback_id(body), model=request.model, provider=self.name
                        )
                    block = as_int(body.get("contentBlockIndex"), f"{kind}.contentBlockIndex", optional=True)
                    if kind == "contentBlockStart":
                        start = as_object(body.get("start"), "contentBlockStart.start", optional=True)
                        use = as_object(
                            start.get("toolUse"), "contentBlockStart.start.toolUse", optional=True
                        )
                        if use and use.get("name") == output_tool:
                            answer_blocks.add(block)
                        elif use:
                            tool_index[block] = len(tool_index)
                            yield ToolCallDelta(
                                index=tool_index[block],
                                id=str(required(use, "toolUseId", "toolUse")),
                                name=str(required(use, "name", "toolUse")),
                            )
                    elif kind == "contentBlockDelta":
                        delta = as_object(body.get("delta"), "contentBlockDelta.delta", optional=True)
                        if "reasoningContent" in delta:
                            add_reasoning(
                                reasoning.setdefault(block, {}),
                                as_object(delta["reasoningContent"], "delta.reasoningContent"),
                            )
                        elif "text" in delta:
                            yield TextDelta(text=str(delta["text"]))
                        elif "toolUse" in delta:
                            use = as_object(delta["toolUse"], "contentBlockDelta.delta.toolUse")
                            fragment = str(use.get("input") or "")
                            if block in answer_blocks:
                                yield TextDelta(text=fragment)
                            elif block in tool_index:
                                yield ToolCallDelta(index=tool_index[block], arguments=fragment)
                    elif kind == "messageStop":
                        finish = _FINISH_REASONS.get(str(body.get("stopReason")), "stop")
                        if finish == "tool_calls" and not tool_index:
                            finish = "stop"
                    elif kind == "metadata" and finish is not None:
                        if reasoning:
                            blocks = [{"reasoningContent": reasoning[i]} for i in sorted(reasoning)]
                            yield ProviderStateEvent(
                                state=ProviderState(provider=self.name, data={"reasoning": blocks})
                            )
                        yield StreamDone(finish_reason=finish, usage=self._map_usage(body.get("usage")))
                        return
        if decoder.pending:
            raise StreamInterrupted(
                f"{self.name} stream ended inside an event ({decoder.pending} bytes left over)",
                provider=self.name,
                model=request.model,
            )
        if finish is not None:
            yield StreamDone(finish_reason=finish)

    def _event(self, message: EventStreamMessage, model: str) -> tuple[str, dict[str, Any]]:
        headers = message.headers
        message_type = headers.get(":message-type", "event")
        if message_type == "exception":
            error_type = str(headers.get(":exception-type") or "InternalServerException")
            body = loads_object(message.payload, f"the {error_type} exception") if message.payload else {}
            error_type = error_type[:1].upper() + error_type[1:]
            raise self._aws_error(error_type, str(body.get("message") or error_type), model)
        if message_type == "error":
            code = str(headers.get(":error-code") or "InternalServerException")
            raise self._aws_error(code, str(headers.get(":error-message") or code), model)
        kind = str(headers.get(":event-type") or "")
        return kind, loads_object(message.payload, f"the {kind} event") if message.payload else {}

    def _malformed(self, model: str, exc: Exception) -> MalformedResponse:
        return MalformedResponse(
            f"{self.name} answered with an unexpected shape ({type(exc).__name__}: {exc})",
            provider=self.name,
            model=model,
        )


def _model_path(model: str, action: str) -> str:
    return f"/model/{quote(model, safe='')}/{action}"


def _error_type(header: str | None, body: Any) -> str:
    raw = header or (body.get("__type") if isinstance(body, dict) else None) or ""
    return str(raw).split(":", 1)[0].rsplit("#", 1)[-1].strip()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _fallback_id(data: Any) -> str:
    return "bedrock-" + hashlib.blake2b(repr(data).encode(), digest_size=8).hexdigest()
