"""Sealing shadow pairs at rest exactly as payloads are encrypted: the pair's JSON becomes a Temporal
``Payload`` (encoding ``binary/kernelflow-shadow-pair``) that the payload codec encodes (optional zlib,
then AES-256-GCM under the ring's current key, the key id in the clear metadata); the stored body is
that encoded payload, serialized. Any key of the ring unseals (rotation keeps old pairs readable while
their key stays in the ring), and a missing key or altered bytes fail with the codec's own errors.

The same format is written by the live side (``shadow_chat``) and by ``kernelflow compare``, so a
report reads both. The codec is asynchronous and a store is not: each call runs the codec on an event
loop of its own when the calling thread already has one running.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from temporalio.api.common.v1 import Payload

__all__ = ["SHADOW_PAIR_ENCODING", "CodecSealer"]

SHADOW_PAIR_ENCODING = b"binary/kernelflow-shadow-pair"

_T = TypeVar("_T")


class CodecSealer:
    """A ``worker.shadow_store.Sealer`` over a payload codec that encrypts."""

    def __init__(self, codec: Any) -> None:
        self.codec = codec

    @classmethod
    def of(cls, codec: Any) -> CodecSealer | None:
        """``codec`` as a sealer when it encrypts; None with encryption off."""
        return cls(codec) if codec is not None and getattr(codec, "encrypting", False) else None

    def seal(self, data: bytes) -> bytes:
        payload = Payload(metadata={"encoding": SHADOW_PAIR_ENCODING}, data=data)
        (sealed,) = _run(self.codec.encode([payload]))
        return bytes(sealed.SerializeToString())

    def unseal(self, data: bytes) -> bytes:
        (payload,) = _run(self.codec.decode([Payload.FromString(data)]))
        return bytes(payload.data)


def _run(work: Coroutine[Any, Any, _T]) -> _T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(work)
    result: list[_T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(work))
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="shadow-sealer")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]
