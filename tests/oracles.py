"""Request-body oracles built from each vendor's own published types (all dev dependencies, nothing
fetched at test time): the official OpenAI and Anthropic SDKs' request ``TypedDict``s, google-genai's
pydantic models, botocore's service model and parameter validator, and the ``mistralai`` package's
models.

An oracle must be able to fail. Pydantic validating a ``TypedDict`` ignores unknown keys and checks
``Iterable`` fields lazily (a generator nobody consumes), so the SDK types are rebuilt here with
unknown keys forbidden at every level and every ``Iterable``/``Sequence`` read as a ``list``.
``mistralai``'s models ignore unknown keys too, so a body must survive validation and dumping
unchanged. Each oracle returns nothing and raises ``AssertionError`` naming what the vendor's type
refuses.
"""

from __future__ import annotations

import collections.abc
import json
import os
import typing
from functools import cache
from typing import Any

import typing_extensions
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

__all__ = [
    "anthropic_oracle",
    "bedrock_oracle",
    "gemini_oracle",
    "mistral_oracle",
    "openai_oracle",
    "openai_responses_oracle",
    "strict",
]

_SEQUENCES = {collections.abc.Iterable, collections.abc.Sequence, list, typing.List}  # noqa: UP006
_UNION_TYPES = {typing.Union}
try:
    import types as _types

    _UNION_TYPES.add(_types.UnionType)  # type: ignore[arg-type]
except AttributeError:  # pragma: no cover
    pass


def strict(tp: Any, _memo: dict[Any, Any] | None = None) -> Any:
    """``tp`` with every ``TypedDict`` forbidding unknown keys and every iterable a ``list``."""
    memo = {} if _memo is None else _memo
    if typing_extensions.is_typeddict(tp):
        if tp in memo:
            return memo[tp]
        memo[tp] = typing.ForwardRef(tp.__name__)  # recursion (rare) falls back to a forward reference
        hints = typing.get_type_hints(tp, include_extras=True)
        fields: dict[str, Any] = {}
        for name, hint in hints.items():
            inner = _unwrap_required(hint)
            wrapper = (
                typing_extensions.Required if name in tp.__required_keys__ else typing_extensions.NotRequired
            )
            fields[name] = wrapper[strict(inner, memo)]
        rebuilt = typing_extensions.TypedDict(tp.__name__, fields)  # type: ignore[operator]
        rebuilt.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
        memo[tp] = rebuilt
        return rebuilt
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return typing.Annotated[(strict(args[0], memo), *tp.__metadata__)]  # type: ignore[misc]
    if origin in _SEQUENCES:
        return list[strict(args[0], memo)] if args else list[Any]  # type: ignore[misc]
    if origin in _UNION_TYPES:
        # The SDKs let a response object (a pydantic model that keeps unknown keys) stand for a request
        # block; a JSON body holds plain objects, so only the request TypedDicts may match.
        kept = [arg for arg in args if not _is_model(arg)]
        return typing.Union[tuple(strict(arg, memo) for arg in kept or args)]  # noqa: UP007
    if origin in (dict, collections.abc.Mapping, typing.Dict):  # noqa: UP006
        return dict[args[0], strict(args[1], memo)] if args else dict[str, Any]  # type: ignore[misc]
    if tp is object:
        return Any
    if origin in (typing.IO, os.PathLike) or tp in (typing.IO, typing.BinaryIO):
        return bytes  # file arguments of other endpoints; never in a JSON body
    return tp


def _is_model(tp: Any) -> bool:
    """A pydantic model, or a (discriminated) union of them."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _is_model(typing.get_args(tp)[0])
    if origin in _UNION_TYPES:
        return all(_is_model(arg) for arg in typing.get_args(tp))
    return False


def _unwrap_required(hint: Any) -> Any:
    while typing.get_origin(hint) in (typing_extensions.Required, typing_extensions.NotRequired):
        hint = typing.get_args(hint)[0]
    return hint


def _check(adapter: TypeAdapter[Any], body: Any, vendor: str) -> None:
    try:
        adapter.validate_python(body)
    except ValidationError as exc:
        raise AssertionError(f"{vendor}'s request type refuses the body: {exc}") from None


# --- OpenAI: the SDK's chat completion request types -------------------------------------------------


@cache
def _openai_adapters() -> tuple[TypeAdapter[Any], TypeAdapter[Any]]:
    from openai.types.chat import completion_create_params as params

    return (
        TypeAdapter(strict(params.CompletionCreateParamsNonStreaming)),
        TypeAdapter(strict(params.CompletionCreateParamsStreaming)),
    )


def openai_oracle(body: dict[str, Any]) -> None:
    plain, streaming = _openai_adapters()
    _check(streaming if body.get("stream") else plain, body, "OpenAI")


@cache
def _openai_responses_adapters() -> tuple[TypeAdapter[Any], TypeAdapter[Any]]:
    from openai.types.responses import response_create_params as params

    return (
        TypeAdapter(strict(params.ResponseCreateParamsNonStreaming)),
        TypeAdapter(strict(params.ResponseCreateParamsStreaming)),
    )


def openai_responses_oracle(body: dict[str, Any]) -> None:
    plain, streaming = _openai_responses_adapters()
    _check(streaming if body.get("stream") else plain, body, "OpenAI Responses")


# --- Anthropic: the SDK's message request types -------------------------------------------------------


class _AnthropicSampling(typing_extensions.TypedDict, total=False):
    """Sampling fields the 1.x SDK dropped from its signatures as deprecated; its migration guide sends
    them through ``extra_body`` because the API still takes them on models that sample
    (https://github.com/anthropics/anthropic-sdk-python/blob/main/MIGRATION.md)."""

    temperature: float
    top_p: float
    top_k: int


@cache
def _anthropic_adapters() -> tuple[TypeAdapter[Any], TypeAdapter[Any]]:
    from anthropic.types import message_create_params as params

    def with_sampling(tp: Any) -> Any:
        fields = dict(typing.get_type_hints(tp, include_extras=True))
        fields.update(typing.get_type_hints(_AnthropicSampling, include_extras=True))
        merged = typing_extensions.TypedDict(tp.__name__, fields, total=False)  # type: ignore[operator]
        merged.__required_keys__ = tp.__required_keys__  # type: ignore[misc]
        return merged

    return (
        TypeAdapter(strict(with_sampling(params.MessageCreateParamsNonStreaming))),
        TypeAdapter(strict(with_sampling(params.MessageCreateParamsStreaming))),
    )


def anthropic_oracle(body: dict[str, Any]) -> None:
    plain, streaming = _anthropic_adapters()
    _check(streaming if body.get("stream") else plain, body, "Anthropic")


# --- Gemini: google-genai's types (shaped like the SDK, so the REST body is checked field by field) ----

_GEMINI_TOP = {
    "contents",
    "systemInstruction",
    "tools",
    "toolConfig",
    "generationConfig",
    "safetySettings",
    "cachedContent",
    "labels",
}


@cache
def _gemini_adapters() -> dict[str, TypeAdapter[Any]]:
    from google.genai import types

    return {
        "contents": TypeAdapter(list[types.Content]),
        "systemInstruction": TypeAdapter(types.Content),
        "tools": TypeAdapter(list[types.Tool]),
        "toolConfig": TypeAdapter(types.ToolConfig),
        "generationConfig": TypeAdapter(types.GenerationConfig),
        "safetySettings": TypeAdapter(list[types.SafetySetting]),
        "cachedContent": TypeAdapter(str),
        "labels": TypeAdapter(dict[str, str]),
    }


def gemini_oracle(body: dict[str, Any]) -> None:
    unknown = sorted(set(body) - _GEMINI_TOP)
    if unknown:
        raise AssertionError(f"Gemini's GenerateContentRequest has no field {', '.join(unknown)}")
    if not body.get("contents"):
        raise AssertionError("Gemini's GenerateContentRequest needs contents")
    adapters = _gemini_adapters()
    for field, value in body.items():
        _check(adapters[field], value, f"Gemini ({field})")
    for content in body["contents"]:
        if content.get("role") not in ("user", "model"):
            raise AssertionError(f"Gemini's Content.role is user or model, got {content.get('role')!r}")


# --- Bedrock: botocore's service model, parameter validator and serializer -----------------------------


@cache
def _bedrock_operation(name: str) -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model("bedrock-runtime").operation_model(name)


def bedrock_oracle(body: dict[str, Any], *, model: str, operation: str = "Converse") -> None:
    """Validate as botocore would before sending, then serialize with botocore and compare bodies:
    what botocore puts on the wire for these parameters is what we sent."""
    import base64

    from botocore.serialize import create_serializer
    from botocore.validate import ParamValidator

    op = _bedrock_operation(operation)
    params = json.loads(json.dumps(body))
    _decode_blobs(params)  # botocore takes bytes where the wire has base64
    report = ParamValidator().validate({**params, "modelId": model}, op.input_shape)
    if report.has_errors():
        raise AssertionError(f"botocore refuses the {operation} parameters: {report.generate_report()}")
    _check_enums(params, op.input_shape, operation)  # botocore's validator leaves enums to the server
    wire = create_serializer("rest-json").serialize_to_request({**params, "modelId": model}, op)
    serialized = json.loads(wire["body"] or b"{}")
    if serialized != body:
        raise AssertionError(
            f"botocore serializes these parameters differently:\n ours: {json.dumps(body)[:600]}\n"
            f"botocore: {json.dumps(serialized)[:600]}"
        )
    assert base64  # blobs were decoded above and re-encoded by botocore


def _check_enums(value: Any, shape: Any, path: str) -> None:
    if shape.type_name == "structure" and isinstance(value, dict):
        for name, item in value.items():
            if name in shape.members:
                _check_enums(item, shape.members[name], f"{path}.{name}")
    elif shape.type_name == "list" and isinstance(value, list):
        for index, item in enumerate(value):
            _check_enums(item, shape.member, f"{path}[{index}]")
    elif shape.type_name == "map" and isinstance(value, dict):
        for key, item in value.items():
            _check_enums(item, shape.value, f"{path}.{key}")
    elif shape.type_name == "string" and shape.enum and value not in shape.enum:
        raise AssertionError(f"botocore's model allows {path} to be one of {shape.enum}, got {value!r}")


def _decode_blobs(value: Any) -> None:
    import base64

    if isinstance(value, dict):
        for key, item in value.items():
            if key == "bytes" and isinstance(item, str):
                value[key] = base64.b64decode(item)
            else:
                _decode_blobs(item)
    elif isinstance(value, list):
        for item in value:
            _decode_blobs(item)


# --- Mistral: the mistralai package's request model ----------------------------------------------------


def mistral_oracle(body: dict[str, Any]) -> None:
    from mistralai.client.models import ChatCompletionRequest, ChatCompletionStreamRequest

    model = ChatCompletionStreamRequest if body.get("stream") else ChatCompletionRequest
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise AssertionError(f"Mistral's request type refuses the body: {exc}") from None
    dumped = json.loads(parsed.model_dump_json(by_alias=True, exclude_unset=True))
    if _without_nulls(dumped) != _without_nulls(body):
        raise AssertionError(
            "Mistral's request type does not keep the body as sent (an unknown key was dropped):\n"
            f" ours: {json.dumps(body)[:600]}\n kept: {json.dumps(dumped)[:600]}"
        )


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
