"""A user's own workflow, activity and payload codec, as they would live in their code base: the
plugin test adds Kernelflow next to them."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

__all__ = ["Greeter", "ZlibCodec", "shout"]


class ZlibCodec(PayloadCodec):
    """Every payload compressed, marked with its own encoding."""

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [
            Payload(metadata={"encoding": b"binary/zlib"}, data=zlib.compress(p.SerializeToString()))
            for p in payloads
        ]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            if p.metadata.get("encoding") == b"binary/zlib":
                decoded = Payload()
                decoded.ParseFromString(zlib.decompress(p.data))
                out.append(decoded)
            else:
                out.append(p)
        return out


@activity.defn
async def shout(text: str) -> str:
    return text.upper()


@workflow.defn
class Greeter:
    @workflow.run
    async def run(self, name: str) -> str:
        return await workflow.execute_activity(
            shout, f"hello {name}", start_to_close_timeout=timedelta(seconds=10)
        )
