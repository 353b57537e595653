"""The contract every provider speaks: OpenAI's chat-completions shape as the lingua franca.

Requests refuse unknown fields (a typo such as ``temprature`` is an error naming the field, not a
silently ignored option). Responses are built by providers from their vendor's wire format.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "AssistantMessage",
    "ChatRequest",
    "ChatResponse",
    "Choice",
    "ContentPart",
    "DeveloperMessage",
    "DocumentPart",
    "DocumentSource",
    "EmbedRequest",
    "EmbedResponse",
    "FinishReason",
    "FunctionCall",
    "FunctionDefinition",
    "ImagePart",
    "ImageURL",
    "JsonSchemaFormat",
    "Message",
    "NamedToolChoice",
    "PromptCache",
    "ProviderState",
    "ProviderStateEvent",
    "ResponseFormat",
    "ResponseFormatJsonObject",
    "ResponseFormatJsonSchema",
    "ResponseFormatText",
    "StreamDone",
    "StreamError",
    "StreamEvent",
    "StreamStart",
    "SystemMessage",
    "TextDelta",
    "TextPart",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "ToolMessage",
    "Usage",
    "UserMessage",
    "message_text",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# --- content parts -------------------------------------------------------------------------------


class TextPart(_Strict):
    type: Literal["text"] = "text"
    text: str


class ImageURL(_Strict):
    url: str = Field(description="An https URL or a data: URL with base64 image bytes.")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL


class DocumentSource(_Strict):
    """A document (PDF) by exactly one of: ``file_data``, a ``data:`` URL with base64 bytes;
    ``file_id``, a file uploaded to the vendor; ``url``, an https URL the vendor fetches itself."""

    file_data: str | None = Field(default=None, pattern=r"^data:[\w/+.-]+;base64,")
    file_id: str | None = None
    url: str | None = Field(default=None, pattern=r"^https?://")
    filename: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DocumentSource:
        given = [name for name in ("file_data", "file_id", "url") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of file_data, file_id or url (got {', '.join(given) or 'none'})"
            )
        return self

    @property
    def media_type(self) -> str:
        if self.file_data is not None:
            return self.file_data[5:].split(";", 1)[0]
        return "application/pdf"


class DocumentPart(_Strict):
    """A document in a user turn (OpenAI's ``file`` content part)."""

    type: Literal["file"] = "file"
    file: DocumentSource


ContentPart = Annotated[TextPart | ImagePart | DocumentPart, Field(discriminator="type")]


# --- messages ------------------------------------------------------------------------------------


class FunctionCall(_Strict):
    name: str
    arguments: str = Field(description="JSON-encoded arguments, exactly as the model produced them.")

    def parsed_arguments(self) -> Any:
        return json.loads(self.arguments) if self.arguments else {}


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Strict):
    role: Literal["system"] = "system"
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(_Strict):
    """Instructions from the application (OpenAI's ``developer`` role, which its reasoning models use
    in place of ``system``). Providers without the role send it as system text."""

    role: Literal["developer"] = "developer"
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"] = "user"
    content: str | list[ContentPart]
    name: str | None = None


class ProviderState(_Strict):
    """What a provider attached to an assistant turn and needs back, unchanged, when that turn is sent
    again: Gemini's thought signatures and call ids, Anthropic's signed thinking blocks. Only the
    provider named here reads ``data``; every other provider ignores it. It travels with the message
    through workflow history like any other field, so keep the message as the answer returned it."""

    provider: str = Field(min_length=1)
    data: dict[str, Any] = Field(default_factory=dict)


class AssistantMessage(_Strict):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None
    refusal: str | None = None
    provider_state: ProviderState | None = Field(
        default=None, description="Opaque state the answering provider needs back on the next turn."
    )

    def state_for(self, provider: str) -> dict[str, Any] | None:
        """``provider_state.data`` when ``provider`` wrote it, else ``None``."""
        state = self.provider_state
        return state.data if state is not None and state.provider == provider else None


class ToolMessage(_Strict):
    role: Literal["tool"] = "tool"
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
    Field(discriminator="role"),
]


def message_text(
    message: SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage,
) -> str:
    """The text of a message, with parts joined and images left out."""
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if isinstance(part, TextPart))


# --- tools and output formats --------------------------------------------------------------------


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class _NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: _NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormatText(_Strict):
    type: Literal["text"] = "text"


class ResponseFormatJsonObject(_Strict):
    type: Literal["json_object"] = "json_object"


class ResponseFormatJsonSchema(_Strict):
    type: Literal["json_schema"] = "json_schema"
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


# --- request -------------------------------------------------------------------------------------


class PromptCache(_Strict):
    """Prompt caching hints. ``key`` groups requests that share a prefix (OpenAI and Mistral
    ``prompt_cache_key``); ``breakpoints`` are positions in ``messages`` whose end closes a cached prefix
    (Anthropic ``cache_control``, Bedrock ``cachePoint``; at most 4); ``ttl`` is that cache's lifetime.
    Each provider uses the hints it has a field for: a hint without one changes nothing in the answer
    (OpenAI and Gemini cache prefixes on their own, Anthropic and Bedrock need no key), except a
    ``ttl`` a provider cannot set, which is refused."""

    key: str | None = Field(default=None, min_length=1, max_length=1024)
    breakpoints: list[int] = Field(default_factory=list, max_length=4)
    ttl: Literal["5m", "1h"] | None = None


class ChatRequest(_Strict):
    """One chat completion. ``model`` is the provider's own model name (routing has already happened).

    ``lenient`` asks for options the provider or model cannot honour to be dropped, each drop recorded
    in ``ChatResponse.warnings``; by default such a request is refused before the call, naming them.
    ``provider_options`` passes vendor fields the contract does not type, by provider name
    (``{"anthropic": {"top_k": 5}}``); each provider checks its own entry and ignores the others."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, gt=0)
    stop: list[str] | None = Field(default=None, max_length=4)
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    thinking_budget: int | None = Field(
        default=None,
        ge=0,
        description="Tokens the model may spend thinking (Anthropic, Gemini); 0 turns it off.",
    )
    service_tier: Literal["auto", "default", "flex", "priority"] | None = None
    cache: PromptCache | None = None
    provider_options: dict[str, dict[str, Any]] | None = None
    lenient: bool = False

    @model_validator(mode="after")
    def _cache_breakpoints_in_range(self) -> ChatRequest:
        for position in self.cache.breakpoints if self.cache else []:
            if not 0 <= position < len(self.messages):
                raise ValueError(
                    f"cache.breakpoints: {position} is not a message position (0 to {len(self.messages) - 1})"
                )
        return self

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatRequest:
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {tool.function.name for tool in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names {self.tool_choice.function.name!r}, which is not among the "
                    f"tools offered ({sorted(names) or 'none'})"
                )
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs at least one tool")
        return self

    @property
    def needs_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def needs_json_schema(self) -> bool:
        return isinstance(self.response_format, ResponseFormatJsonSchema)

    @property
    def has_images(self) -> bool:
        return self._has_part(ImagePart)

    @property
    def has_documents(self) -> bool:
        return self._has_part(DocumentPart)

    def _has_part(self, kind: type[BaseModel]) -> bool:
        return any(
            isinstance(m, UserMessage)
            and not isinstance(m.content, str)
            and any(isinstance(p, kind) for p in m.content)
            for m in self.messages
        )


# --- response ------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error"]


class Usage(BaseModel):
    """Normalised token counts. ``cached_tokens`` (cache reads) and ``cache_write_tokens`` are part of
    ``prompt_tokens``; ``reasoning_tokens`` are part of ``completion_tokens`` (OpenAI's convention;
    providers convert to it)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0

    @model_validator(mode="after")
    def _fill_total(self) -> Usage:
        if not self.total_tokens:
            self.total_tokens = self.prompt_tokens + self.completion_tokens
        return self

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
        )


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason = "stop"


class ChatResponse(BaseModel):
    id: str
    model: str
    provider: str
    created: int = 0
    choices: list[Choice]
    usage: Usage = Field(default_factory=Usage)
    warnings: list[str] = Field(
        default_factory=list,
        description="Request options that were dropped (lenient mode) or adjusted before the call.",
    )

    @property
    def text(self) -> str:
        """The first choice's text ('' when it only called tools)."""
        return self.choices[0].message.content or "" if self.choices else ""

    @property
    def tool_calls(self) -> list[ToolCall]:
        return list(self.choices[0].message.tool_calls or []) if self.choices else []

    @property
    def finish_reason(self) -> FinishReason:
        return self.choices[0].finish_reason if self.choices else "error"


# --- streaming -----------------------------------------------------------------------------------


class StreamStart(BaseModel):
    type: Literal["start"] = "start"
    id: str
    model: str
    provider: str


class TextDelta(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolCallDelta(BaseModel):
    """A fragment of a tool call: the first fragment of a call carries ``id`` and ``name``."""

    type: Literal["tool_call"] = "tool_call"
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ProviderStateEvent(BaseModel):
    """The provider's opaque state for the answer being streamed (see ``ProviderState``); the last one
    sent wins. Consumers that only show text ignore it."""

    type: Literal["state"] = "state"
    state: ProviderState


class StreamDone(BaseModel):
    type: Literal["done"] = "done"
    finish_reason: FinishReason
    usage: Usage = Field(default_factory=Usage)


class StreamError(BaseModel):
    """The stream broke after it started. The answer so far is incomplete and must not be used."""

    type: Literal["error"] = "error"
    error_type: str
    message: str
    retryable: bool


StreamEvent = Annotated[
    StreamStart | TextDelta | ToolCallDelta | ProviderStateEvent | StreamDone | StreamError,
    Field(discriminator="type"),
]


# --- embeddings ----------------------------------------------------------------------------------


class EmbedRequest(_Strict):
    model: str = Field(min_length=1)
    input: list[str] = Field(min_length=1)
    dimensions: int | None = Field(default=None, gt=0)


class EmbedResponse(BaseModel):
    model: str
    provider: str
    embeddings: list[list[float]]
    usage: Usage = Field(default_factory=Usage)
