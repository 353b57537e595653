"""OpenAI chat completions and embeddings, and the base of every OpenAI-compatible service.

The kernel's contract is OpenAI's own shape, so mapping is thin: the request is dumped as is (with
``max_completion_tokens`` for reasoning models), responses and stream chunks are parsed into contracts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

from kernel.batch import BatchItem, BatchItemResult, BatchJob, BatchLimits
from kernel.contracts import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    DocumentPart,
    EmbedRequest,
    EmbedResponse,
    FinishReason,
    FunctionCall,
    StreamDone,
    StreamEvent,
    StreamStart,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
    UserMessage,
)
from kernel.errors import (
    ConfigurationError,
    ContentFiltered,
    InvalidRequest,
    MalformedResponse,
    ProviderError,
    UnsupportedCapability,
    error_from_status,
    status_for_error_code,
)
from kernel.provider import Capabilities
from providers import openai_batch, openai_responses
from providers._http import HttpProvider, as_int, as_list, as_object, as_text, iter_sse, loads_object

__all__ = ["OpenAIProvider"]

_FINISH_REASONS: dict[str | None, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
    None: "stop",
}
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
"""For models the catalog does not list (fine-tunes, snapshots of new releases): the token limit field."""
_WIRE_FIELDS = frozenset(
    {
        "model",
        "messages",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "user",
        "reasoning_effort",
        "service_tier",
    }
)
"""``ChatRequest`` fields that travel as they are (the contract is OpenAI's shape)."""
_PROVIDER_OPTIONS = frozenset(
    {
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "n",
        "metadata",
        "store",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
        "verbosity",
        "safety_identifier",
        "prompt_cache_retention",
    }
)
"""Chat-completions fields the contract does not type, accepted under ``provider_options.openai``
(https://platform.openai.com/docs/api-reference/chat/create)."""


class OpenAIProvider(HttpProvider):
    name = "openai"
    version = "1.0.0"
    kernel_api = (1, 1)
    description = "OpenAI chat completions and embeddings (api.openai.com or any compatible base URL)"
    capabilities = Capabilities(
        embeddings=True, vision=True, documents=True, json_schema_mode="native", batch=True
    )
    batch_limits: ClassVar[BatchLimits | None] = openai_batch.LIMITS
    api_key_env: ClassVar[str | None] = "OPENAI_API_KEY"
    base_url_env: ClassVar[str | None] = "OPENAI_BASE_URL"
    default_base_url: ClassVar[str | None] = "https://api.openai.com/v1"
    chat_path: ClassVar[str] = "/chat/completions"
    embeddings_path: ClassVar[str] = "/embeddings"
    dimensions_field: ClassVar[str] = "dimensions"
    """What the service calls the embedding size parameter."""
    finish_reasons: ClassVar[Mapping[str | None, FinishReason]] = _FINISH_REASONS
    stream_usage: ClassVar[bool] = True
    """Whether the service honours ``stream_options.include_usage`` (some compatible servers refuse it)."""
    unsupported_options: ClassVar[frozenset[str]] = frozenset({"thinking_budget"})
    provider_option_names: ClassVar[frozenset[str]] = _PROVIDER_OPTIONS
    """The keys accepted under ``provider_options[<name>]``."""

    # --- calls -----------------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> ChatResponse:
        self.check_chat(request)
        if self.api == "responses":
            payload = self._responses_payload(request, stream=False)
            data = await self._post_json(openai_responses.RESPONSES_PATH, payload, model=request.model)
            return openai_responses.parse_response(self, data, request.model)
        data = await self._post_json(
            self.chat_path, self._map_request(request, stream=False), model=request.model
        )
        return self._parse_response(data, request.model)

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        self.check_chat(request, stream=True)
        if self.api == "responses":
            events = openai_responses.stream_events(
                self, request, self._responses_payload(request, stream=True)
            )
            return self._guard_stream(events, model=request.model)
        return self._guard_stream(self._stream_events(request), model=request.model)

    @property
    def api(self) -> str:
        """``chat`` (chat completions, the default) or ``responses`` (``options: {api: responses}``)."""
        api = str(self.settings.options.get("api", "chat"))
        if api not in ("chat", "responses"):
            raise ConfigurationError(
                f"provider {self.name!r}: options.api is {api!r}; it is 'chat' (chat completions) or 'responses'"
            )
        return api

    def _responses_payload(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        self._check_cache(request)
        payload = openai_responses.map_request(self, request, stream=stream)
        payload.update(self._provider_options(request, payload))
        return payload

    def _option_names(self) -> frozenset[str]:
        return openai_responses.PROVIDER_OPTIONS if self.api == "responses" else self.provider_option_names

    def _check_cache(self, request: ChatRequest) -> None:
        if request.cache is not None and request.cache.ttl is not None:
            raise UnsupportedCapability(
                f"{self.name} has no cache ttl (it keeps cached prefixes for minutes to hours on its own); "
                "remove cache.ttl",
                provider=self.name,
                model=request.model,
            )

    def refused_options(self) -> frozenset[str]:
        if self.api == "responses":
            return self.unsupported_options | openai_responses.UNSUPPORTED
        return self.unsupported_options

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        self.check_embed(request)
        payload: dict[str, Any] = {"model": request.model, "input": request.input, "encoding_format": "float"}
        if request.dimensions:
            payload[self.dimensions_field] = request.dimensions
        data = await self._post_json(self.embeddings_path, payload, model=request.model)
        try:
            rows = sorted(
                as_list(as_object(data, "the answer")["data"], "data"), key=lambda row: row["index"]
            )
            vectors = [[float(x) for x in row["embedding"]] for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise self._malformed(request.model, exc) from exc
        return EmbedResponse(
            model=str(data.get("model") or request.model),
            provider=self.name,
            embeddings=vectors,
            usage=self._map_usage(data.get("usage")),
        )

    # --- mapping ---------------------------------------------------------------------------------

    # --- batches (providers/openai_batch.py) -------------------------------------------------------

    def batch_item_size(self, item: BatchItem) -> int:
        return len(json.dumps(openai_batch.item_line(self, item), separators=(",", ":")).encode()) + 1

    async def batch_find(self, tag: str) -> BatchJob | None:
        return await openai_batch.batch_find(self, tag)

    async def batch_create(self, tag: str, items: list[BatchItem]) -> BatchJob:
        return await openai_batch.batch_create(self, tag, items)

    async def batch_status(self, batch_id: str) -> BatchJob:
        return await openai_batch.batch_status(self, batch_id)

    async def batch_results(self, batch_id: str, custom_ids: list[str], model: str) -> list[BatchItemResult]:
        return await openai_batch.batch_results(self, batch_id, custom_ids, model)

    async def batch_cancel(self, batch_id: str) -> BatchJob:
        return await openai_batch.batch_cancel(self, batch_id)

    def _map_request(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        payload = request.model_dump(mode="json", exclude_none=True, by_alias=True, include=set(_WIRE_FIELDS))
        for message in payload["messages"]:
            message.pop("provider_state", None)  # state of other providers; OpenAI keeps its own none
        max_tokens = payload.pop("max_tokens", None)
        if max_tokens is not None:
            payload[self._max_tokens_field(request.model)] = max_tokens
        self._map_documents(request, payload)
        self._check_cache(request)
        if request.cache is not None and request.cache.key is not None:
            payload["prompt_cache_key"] = request.cache.key
        payload.update(self._provider_options(request, payload))
        if stream:
            payload["stream"] = True
            if self.stream_usage:
                payload["stream_options"] = {"include_usage": True}
        return payload

    def _map_documents(self, request: ChatRequest, payload: dict[str, Any]) -> None:
        """File parts go as OpenAI's ``file`` parts; a document given by URL cannot (OpenAI takes bytes
        or an uploaded file's id)."""
        for position, message in enumerate(request.messages):
            if not isinstance(message, UserMessage) or isinstance(message.content, str):
                continue
            for part in message.content:
                if isinstance(part, DocumentPart) and part.file.url is not None:
                    raise UnsupportedCapability(
                        f"messages[{position}]: {self.name} takes documents as file_data or file_id, "
                        f"not by url ({part.file.url[:60]!r})",
                        provider=self.name,
                        model=request.model,
                    )
        for message in payload["messages"]:
            content = message.get("content")
            for part in content if isinstance(content, list) else []:
                if part.get("type") == "file":
                    part["file"].pop("url", None)

    def _provider_options(self, request: ChatRequest, payload: Mapping[str, Any]) -> dict[str, Any]:
        """This provider's entry of ``provider_options``, checked: only the keys it accepts, none that
        the typed request already sets."""
        options = (request.provider_options or {}).get(self.name)
        if not options:
            return {}
        unknown = sorted(set(options) - self._option_names())
        if unknown:
            raise InvalidRequest(
                f"provider_options.{self.name}: {', '.join(unknown)} not accepted; it accepts "
                f"{', '.join(sorted(self._option_names())) or 'nothing'} (typed options such as "
                "temperature go in the request itself)",
                provider=self.name,
                model=request.model,
            )
        clash = sorted(set(options) & set(payload))
        if clash:
            raise InvalidRequest(
                f"provider_options.{self.name}: {', '.join(clash)} is already set by the request",
                provider=self.name,
                model=request.model,
            )
        return dict(options)

    def _max_tokens_field(self, model: str) -> str:
        facts = self.model_facts(model)
        if facts is not None and facts.max_tokens_field is not None:
            return facts.max_tokens_field
        if facts is not None:
            return "max_tokens"
        return "max_completion_tokens" if model.startswith(_REASONING_PREFIXES) else "max_tokens"

    def _map_usage(self, usage: Any) -> Usage:
        if not isinstance(usage, dict):
            return Usage()
        prompt_details = as_object(
            usage.get("prompt_tokens_details"), "usage.prompt_tokens_details", optional=True
        )
        completion_details = as_object(
            usage.get("completion_tokens_details"), "usage.completion_tokens_details", optional=True
        )
        return Usage(
            prompt_tokens=as_int(usage.get("prompt_tokens"), "usage.prompt_tokens", optional=True),
            completion_tokens=as_int(
                usage.get("completion_tokens"), "usage.completion_tokens", optional=True
            ),
            total_tokens=as_int(usage.get("total_tokens"), "usage.total_tokens", optional=True),
            cached_tokens=as_int(
                prompt_details.get("cached_tokens"),
                "usage.prompt_tokens_details.cached_tokens",
                optional=True,
            ),
            reasoning_tokens=as_int(
                completion_details.get("reasoning_tokens"),
                "usage.completion_tokens_details.reasoning_tokens",
                optional=True,
            ),
        )

    def _parse_response(self, data: Any, model: str) -> ChatResponse:
        try:
            body = as_object(data, "the answer")
            choices = [
                self._read_choice(raw, f"choices[{i}]")
                for i, raw in enumerate(as_list(body["choices"], "choices"))
            ]
            usage = self._map_usage(body.get("usage"))
            header = (
                str(body.get("id") or ""),
                str(body.get("model") or model),
                int(body.get("created") or 0),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise self._malformed(model, exc) from exc
        if not choices:
            raise MalformedResponse(f"{self.name} answered without choices", provider=self.name, model=model)
        response_id, answered_by, created = header
        response = ChatResponse(
            id=response_id,
            model=answered_by,
            provider=self.name,
            created=created,
            choices=choices,
            usage=usage,
        )
        if response.finish_reason == "content_filter" and not response.text and not response.tool_calls:
            raise ContentFiltered(
                f"{self.name} filtered the answer of model {model!r}", provider=self.name, model=model
            )
        return response

    def _read_choice(self, raw: Any, where: str) -> Choice:
        """One choice. Optional fields the API may omit read as their documented defaults: a tool call
        without ``arguments`` has none (``{}``), one without ``id`` gets one derived from the answer."""
        choice = as_object(raw, where)
        message = as_object(choice["message"], f"{where}.message")
        calls = []
        for position, item in enumerate(
            as_list(message.get("tool_calls"), f"{where}.message.tool_calls", optional=True)
        ):
            call = as_object(item, f"{where}.message.tool_calls[{position}]")
            function = as_object(
                call.get("function"), f"{where}.message.tool_calls[{position}].function", optional=True
            )
            name = function["name"]
            arguments = self._call_arguments(function.get("arguments")) or "{}"
            call_id = call.get("id") or _derived_call_id(position, str(name), arguments)
            calls.append(
                ToolCall(id=str(call_id), function=FunctionCall(name=str(name), arguments=arguments))
            )
        return Choice(
            index=int(choice.get("index") or 0),
            message=AssistantMessage(
                content=as_text(message.get("content"), f"{where}.message.content"),
                tool_calls=calls or None,
                refusal=as_text(message.get("refusal"), f"{where}.message.refusal"),
            ),
            finish_reason=self.finish_reasons.get(choice.get("finish_reason"), "stop"),
        )

    async def _stream_events(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        payload = self._map_request(request, stream=True)
        finish: FinishReason | None = None
        usage = Usage()
        started = False
        calls_seen = 0
        async with self._open_stream(self.chat_path, payload, model=request.model) as response:
            async for sse in iter_sse(response):
                if sse.data == "[DONE]":
                    if finish is not None:
                        yield StreamDone(finish_reason=finish, usage=usage)
                    return
                chunk = loads_object(sse.data, "a stream chunk")
                if chunk.get("object") == "error" or isinstance(chunk.get("error"), dict):
                    raise self._stream_error(chunk, sse.data, request.model)
                if not started:
                    started = True
                    yield StreamStart(
                        id=str(chunk.get("id") or ""),
                        model=str(chunk.get("model") or request.model),
                        provider=self.name,
                    )
                if chunk.get("usage"):
                    usage = self._map_usage(chunk["usage"])
                for item in as_list(chunk.get("choices"), "choices", optional=True):
                    choice = as_object(item, "choices[]")
                    if choice.get("index", 0) != 0:
                        continue
                    delta = as_object(choice.get("delta"), "choices[].delta", optional=True)
                    text = self._delta_text(delta.get("content"))
                    if text:
                        yield TextDelta(text=text)
                    for raw_call in as_list(delta.get("tool_calls"), "delta.tool_calls", optional=True):
                        call = as_object(raw_call, "delta.tool_calls[]")
                        function = as_object(
                            call.get("function"), "delta.tool_calls[].function", optional=True
                        )
                        index = call.get("index")
                        if index is None:  # some services number calls only by their order
                            index = calls_seen
                        if call.get("id"):
                            calls_seen += 1
                        yield ToolCallDelta(
                            index=as_int(index, "delta.tool_calls[].index"),
                            id=as_text(call.get("id"), "delta.tool_calls[].id"),
                            name=as_text(function.get("name"), "delta.tool_calls[].function.name"),
                            arguments=self._call_arguments(function.get("arguments")),
                        )
                    if choice.get("finish_reason"):
                        finish = self.finish_reasons.get(str(choice["finish_reason"]), "stop")

    def _delta_text(self, content: Any) -> str:
        """The text of a streamed ``delta.content``."""
        return content if isinstance(content, str) else ""

    def _call_arguments(self, arguments: Any) -> str:
        """A tool call's arguments as JSON text (some services send an object)."""
        return (
            arguments if isinstance(arguments, str) else ("" if arguments is None else json.dumps(arguments))
        )

    def _stream_error(self, chunk: Mapping[str, Any], text: str, model: str) -> ProviderError:
        """An error sent inside the stream, classified as the same error would be without streaming:
        by the status it carries, else by its ``code`` or ``type``."""
        message, code = self._error_details(chunk, text)
        error = chunk.get("error")
        fields = error if isinstance(error, dict) else chunk
        status = status_for_error_code(
            fields.get("status_code"), fields.get("status"), fields.get("code"), fields.get("type"), code
        )
        return error_from_status(
            status, message, provider=self.name, model=model, code=code, body=text[:2000]
        )

    def _malformed(self, model: str, exc: Exception) -> MalformedResponse:
        return MalformedResponse(
            f"{self.name} answered with an unexpected shape ({type(exc).__name__}: {exc})",
            provider=self.name,
            model=model,
        )


def _derived_call_id(position: int, name: str, arguments: str) -> str:
    digest = hashlib.blake2b(f"{position}:{name}:{arguments}".encode(), digest_size=12).hexdigest()
    return f"call_{digest}"
