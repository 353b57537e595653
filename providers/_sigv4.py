"""AWS wire helpers with the standard library only: Signature Version 4 and event-stream framing.

``sign`` returns the headers to add to a request (``x-amz-date``, ``x-amz-content-sha256``,
``x-amz-security-token`` when a session token is used, and ``Authorization``). Every header passed in
is signed, plus ``host`` taken from the URL. The path is URI-encoded once more for the canonical
request, as AWS expects for every service but S3 (a model id's ``:`` travels as ``%3A`` and is signed
as ``%253A``); for ``s3`` the path is signed as it travels.

``EventStreamDecoder`` reads ``application/vnd.amazon.eventstream`` responses incrementally.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from providers._http import WireShapeError

__all__ = [
    "ALGORITHM",
    "AwsCredentials",
    "EventStreamDecoder",
    "EventStreamMessage",
    "canonical_request",
    "sign",
    "signing_key",
]

ALGORITHM = "AWS4-HMAC-SHA256"
_UNSIGNED_HEADERS = frozenset({"authorization", "expect", "user-agent", "x-amzn-trace-id", "connection"})


@dataclass(frozen=True, slots=True)
class AwsCredentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret_access_key: str, date: str, region: str, service: str) -> bytes:
    """The key derived for one day, region and service (``date`` is ``YYYYMMDD``)."""
    key = _hmac(f"AWS4{secret_access_key}".encode(), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def _host(url: str) -> str:
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is None or parts.port == default_port:
        return parts.hostname or ""
    return parts.netloc.rpartition("@")[2]


def _canonical_path(path: str) -> str:
    return quote(path or "/", safe="/~")


def _canonical_query(query: str) -> str:
    pairs: list[tuple[str, str]] = []
    for item in query.split("&") if query else []:
        key, _, value = item.partition("=")
        pairs.append((quote(unquote(key), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{key}={value}" for key, value in sorted(pairs))


def _trim(value: str) -> str:
    return " ".join(value.split())


def canonical_request(
    method: str, url: str, headers: Mapping[str, str], payload_hash: str, *, encode_path: bool = True
) -> tuple[str, str]:
    """(canonical request, signed header list) for a request whose headers are final."""
    parts = urlsplit(url)
    signed: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower().strip()
        if lowered not in _UNSIGNED_HEADERS:
            signed[lowered] = _trim(value) if lowered not in signed else f"{signed[lowered]},{_trim(value)}"
    signed.setdefault("host", _host(url))
    names = sorted(signed)
    canonical_headers = "".join(f"{name}:{signed[name]}\n" for name in names)
    signed_headers = ";".join(names)
    request = "\n".join(
        [
            method.upper(),
            _canonical_path(parts.path) if encode_path else (parts.path or "/"),
            _canonical_query(parts.query),
            canonical_headers,
            signed_headers,
            payload_hash,
        ]
    )
    return request, signed_headers


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    credentials: AwsCredentials,
    region: str,
    service: str,
    now: datetime | None = None,
) -> dict[str, str]:
    """The headers that sign this request; send them together with ``headers`` and ``body``."""
    moment = (now or datetime.now(UTC)).astimezone(UTC)
    amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    added = {"x-amz-date": amz_date, "x-amz-content-sha256": payload_hash}
    if credentials.session_token:
        added["x-amz-security-token"] = credentials.session_token
    lowered = {name.lower(): value for name, value in headers.items()}
    request, signed_headers = canonical_request(
        method, url, {**lowered, **added}, payload_hash, encode_path=service != "s3"
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(request.encode("utf-8")).hexdigest()]
    )
    key = signing_key(credentials.secret_access_key, date, region, service)
    signature = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    added["authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return added


# --- event-stream framing ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventStreamMessage:
    headers: dict[str, Any]
    payload: bytes


class EventStreamDecoder:
    """Incremental decoder of ``application/vnd.amazon.eventstream``: each message is a 12-byte
    prelude (total length, headers length, prelude CRC32), headers, payload and a CRC32 of it all."""

    _MAX_MESSAGE = 16 * 1024 * 1024

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[EventStreamMessage]:
        self._buffer.extend(data)
        while len(self._buffer) >= 12:
            total, headers_length, prelude_crc = struct.unpack_from(">III", self._buffer, 0)
            if binascii.crc32(self._buffer[:8]) != prelude_crc:
                raise WireShapeError("event-stream prelude CRC mismatch")
            if total < 16 or total > self._MAX_MESSAGE or headers_length > total - 16:
                raise WireShapeError(f"event-stream message length {total} is not valid")
            if len(self._buffer) < total:
                return
            frame = bytes(self._buffer[:total])
            del self._buffer[:total]
            (message_crc,) = struct.unpack_from(">I", frame, total - 4)
            if binascii.crc32(frame[:-4]) != message_crc:
                raise WireShapeError("event-stream message CRC mismatch")
            try:
                headers = _decode_headers(frame[12 : 12 + headers_length])
            except (IndexError, struct.error, UnicodeDecodeError) as exc:  # the bytes, not our code
                raise WireShapeError(f"event-stream headers cannot be read ({exc})") from exc
            yield EventStreamMessage(headers, frame[12 + headers_length : -4])

    @property
    def pending(self) -> int:
        return len(self._buffer)


def _decode_headers(data: bytes) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    position = 0
    fixed = {2: ">b", 3: ">h", 4: ">i", 5: ">q", 8: ">q"}
    while position < len(data):
        name_length = data[position]
        name = data[position + 1 : position + 1 + name_length].decode("utf-8")
        position += 1 + name_length
        kind = data[position]
        position += 1
        value: Any
        if kind in (0, 1):
            value = kind == 0
        elif kind in fixed:
            size = struct.calcsize(fixed[kind])
            (value,) = struct.unpack_from(fixed[kind], data, position)
            position += size
        elif kind in (6, 7):
            (length,) = struct.unpack_from(">H", data, position)
            raw = data[position + 2 : position + 2 + length]
            value = raw.decode("utf-8") if kind == 7 else raw
            position += 2 + length
        elif kind == 9:
            value = data[position : position + 16]
            position += 16
        else:
            raise WireShapeError(f"event-stream header {name!r} has unknown type {kind}")
        headers[name] = value
    if position != len(data):
        raise WireShapeError("event-stream headers overrun their length")
    return headers
