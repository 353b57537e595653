"""CloudEvents 1.0: a strict model of the spec and its two encodings on a message bus or over HTTP.

- structured mode: the whole event is the JSON body (content type ``application/cloudevents+json``);
- binary mode: the attributes travel as ``ce-<name>`` headers, ``datacontenttype`` as ``content-type``,
  and the body is the data, as is.

Both the NATS and the HTTP protocol bindings use the same ``ce-`` header names, so one pair of
functions serves both. Everything here is pure: bytes and headers in, a validated event out, or an
``InvalidEvent`` naming the attribute that is wrong and what is allowed.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kernel.errors import KernelflowError

__all__ = [
    "STRUCTURED_CONTENT_TYPE",
    "CloudEvent",
    "InvalidEvent",
    "decode_event",
    "encode_binary",
    "encode_structured",
]

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
_CONTEXT_ATTRIBUTES = (
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
)
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
_HEADER_PREFIX = "ce-"


class InvalidEvent(KernelflowError):
    """The bytes are not a CloudEvents 1.0 event; the message says which attribute and why."""


class CloudEvent(BaseModel):
    """One CloudEvents 1.0 event. Extension attributes are extra fields (lower-case letters and
    digits, at most 20 characters; values are strings, integers or booleans)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1)
    source: str = Field(min_length=1, description="A URI-reference naming the producer.")
    type: str = Field(min_length=1)
    datacontenttype: str | None = None
    dataschema: str | None = Field(default=None, min_length=1)
    subject: str | None = Field(default=None, min_length=1)
    time: datetime | None = None
    data: Any = None
    data_base64: str | None = None

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("time must be an RFC 3339 timestamp with a time zone offset")
        return value

    @model_validator(mode="after")
    def _extensions(self) -> CloudEvent:
        for name, value in (self.model_extra or {}).items():
            if not _EXTENSION_NAME.match(name):
                raise ValueError(f"extension attribute {name!r}: names are 1-20 lower-case letters or digits")
            if not isinstance(value, str | int | bool):
                raise ValueError(
                    f"extension attribute {name!r}: values are strings, integers or booleans, "
                    f"got {type(value).__name__}"
                )
        if self.data is not None and self.data_base64 is not None:
            raise ValueError("an event carries data or data_base64, not both")
        return self

    @property
    def key(self) -> str:
        """What makes the event unique (CloudEvents: ``source`` + ``id``)."""
        return f"{self.source}#{self.id}"

    @property
    def extensions(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def payload(self) -> Any:
        """The data: ``data``, or the decoded bytes of ``data_base64``."""
        if self.data_base64 is not None:
            return base64.b64decode(self.data_base64)
        return self.data

    def context(self) -> dict[str, Any]:
        """The event as template and filter expressions see it (``event.type``, ``event.data``...)."""
        view = self.model_dump(mode="json", exclude_none=True)
        view.pop("data_base64", None)
        view["data"] = self.data if self.data_base64 is None else self.data_base64
        return view


def _invalid(exc: ValidationError, mode: str) -> InvalidEvent:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'event'}: {err['msg']}" for err in exc.errors()
    )
    return InvalidEvent(f"not a CloudEvents 1.0 event ({mode} mode): {problems}")


def decode_event(body: bytes, headers: Mapping[str, str] | None = None) -> CloudEvent:
    """The event in ``body`` + ``headers``: binary mode when a ``ce-specversion`` header is present,
    else structured JSON (a ``content-type`` header, when given, must say ``application/cloudevents+json``
    or ``application/json``)."""
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    if f"{_HEADER_PREFIX}specversion" in lowered:
        return _decode_binary(body, lowered)
    content_type = lowered.get("content-type", "").split(";")[0].strip()
    if content_type and content_type not in (STRUCTURED_CONTENT_TYPE, "application/json"):
        raise InvalidEvent(
            f"content-type {content_type!r} without ce-* headers: send {STRUCTURED_CONTENT_TYPE} "
            "(structured mode) or the ce-specversion, ce-id, ce-source and ce-type headers (binary mode)"
        )
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"not a CloudEvents 1.0 event: the body is not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise InvalidEvent("not a CloudEvents 1.0 event: a structured event is a JSON object")
    if "specversion" not in document:
        raise InvalidEvent("not a CloudEvents 1.0 event: specversion is missing (it must be '1.0')")
    try:
        return CloudEvent.model_validate(document)
    except ValidationError as exc:
        raise _invalid(exc, "structured") from exc


def _decode_binary(body: bytes, headers: Mapping[str, str]) -> CloudEvent:
    attributes: dict[str, Any] = {
        name[len(_HEADER_PREFIX) :]: value
        for name, value in headers.items()
        if name.startswith(_HEADER_PREFIX)
    }
    content_type = headers.get("content-type")
    if content_type:
        attributes["datacontenttype"] = content_type
    if body:
        media = (content_type or "application/json").split(";")[0].strip()
        if media == "application/json" or media.endswith("+json"):
            try:
                attributes["data"] = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidEvent(
                    f"binary-mode event says {media} but its data is not JSON ({exc})"
                ) from exc
        elif media.startswith("text/"):
            attributes["data"] = body.decode("utf-8", errors="replace")
        else:
            attributes["data_base64"] = base64.b64encode(body).decode("ascii")
    try:
        return CloudEvent.model_validate(attributes)
    except ValidationError as exc:
        raise _invalid(exc, "binary") from exc


def encode_structured(event: CloudEvent) -> tuple[bytes, dict[str, str]]:
    """Body and headers of ``event`` in structured mode."""
    body = event.model_dump_json(exclude_none=True).encode()
    return body, {"content-type": STRUCTURED_CONTENT_TYPE}


def encode_binary(event: CloudEvent) -> tuple[bytes, dict[str, str]]:
    """Body and headers of ``event`` in binary mode (JSON data unless ``datacontenttype`` says
    otherwise)."""
    headers: dict[str, str] = {}
    dumped = event.model_dump(mode="json", exclude_none=True)
    for name in _CONTEXT_ATTRIBUTES:
        if name in dumped and name != "datacontenttype":
            headers[_HEADER_PREFIX + name] = str(dumped[name])
    for name, value in event.extensions.items():
        headers[_HEADER_PREFIX + name] = str(value).lower() if isinstance(value, bool) else str(value)
    headers["content-type"] = event.datacontenttype or "application/json"
    if event.data_base64 is not None:
        return base64.b64decode(event.data_base64), headers
    if event.data is None:
        return b"", headers
    if isinstance(event.data, str) and not headers["content-type"].split(";")[0].endswith("json"):
        return event.data.encode(), headers
    return json.dumps(event.data, separators=(",", ":")).encode(), headers
