"""``BrokerConformance``: the semantics every broker plugin must show, as a pytest base class.

Subclass it in a test module and say how to reach a running broker::

    class TestNatsConformance(BrokerConformance):
        @pytest.fixture
        def broker_url(self, nats_server: str) -> str:
            return nats_server

        def make_broker(self, url: str) -> Broker:
            return NatsBroker(url)

Checked: acknowledged messages are not delivered again; ``retry`` redelivers (counting attempts); a
delivery neither acked nor rejected is redelivered after ``ack_wait_s`` to another subscriber of the
group (a crashed consumer loses nothing); ``reject`` never redelivers; dead-lettering keeps the exact
bytes and headers; ``dedup_id`` stores a message once; one subscriber receives one subject's messages
in publication order; subscribers of one group share the messages without overlap.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from kernel.broker import Broker, Delivery, Subscription

__all__ = ["BrokerConformance"]

_ACK_WAIT_S = 1.0


class BrokerConformance:
    """Base class: implement ``make_broker`` and provide a ``broker_url`` fixture."""

    def make_broker(self, url: str) -> Broker:
        raise NotImplementedError("return a (not yet connected) broker for url")

    @pytest_asyncio.fixture
    async def broker(self, broker_url: str) -> AsyncIterator[Broker]:
        broker = self.make_broker(broker_url)
        await broker.connect()
        try:
            yield broker
        finally:
            await broker.close()

    @pytest.fixture
    def names(self) -> tuple[str, str]:
        """A fresh stream name and subject prefix per check."""
        tag = uuid.uuid4().hex[:10]
        return f"CONF_{tag}", f"conf{tag}"

    async def _stream(self, broker: Broker, names: tuple[str, str]) -> tuple[str, str]:
        stream, prefix = names
        await broker.ensure_stream(stream, [prefix + ".>"], duplicate_window_s=60)
        return stream, prefix

    @staticmethod
    async def _take(subscription: Subscription, count: int, *, within: float = 10.0) -> list[Delivery]:
        taken: list[Delivery] = []
        async with asyncio.timeout(within):
            while len(taken) < count:
                taken += await subscription.fetch(count - len(taken), timeout_s=0.5)
        return taken

    async def test_acked_messages_are_not_delivered_again(
        self, broker: Broker, names: tuple[str, str]
    ) -> None:
        stream, prefix = await self._stream(broker, names)
        for n in range(3):
            await broker.publish(f"{prefix}.a", str(n).encode())
        sub = await broker.subscribe(stream, "g", ack_wait_s=_ACK_WAIT_S)
        for delivery in await self._take(sub, 3):
            assert delivery.attempt == 1
            await delivery.ack()
        assert await sub.fetch(3, timeout_s=_ACK_WAIT_S * 2) == []
        await sub.close()

    async def test_retry_redelivers_and_counts_attempts(self, broker: Broker, names: tuple[str, str]) -> None:
        stream, prefix = await self._stream(broker, names)
        await broker.publish(f"{prefix}.a", b"again")
        sub = await broker.subscribe(stream, "g", ack_wait_s=30)
        (first,) = await self._take(sub, 1)
        await first.retry(0.0)
        (second,) = await self._take(sub, 1)
        assert second.data == b"again" and second.attempt == 2
        await second.ack()
        await sub.close()

    async def test_an_unsettled_delivery_comes_back_to_the_group(
        self, broker: Broker, names: tuple[str, str]
    ) -> None:
        stream, prefix = await self._stream(broker, names)
        await broker.publish(f"{prefix}.a", b"orphan")
        crashed = await broker.subscribe(stream, "g", ack_wait_s=_ACK_WAIT_S)
        (held,) = await self._take(crashed, 1)
        assert held.attempt == 1
        await crashed.close()  # gone without acking
        survivor = await broker.subscribe(stream, "g", ack_wait_s=_ACK_WAIT_S)
        (again,) = await self._take(survivor, 1, within=_ACK_WAIT_S * 10)
        assert again.data == b"orphan" and again.attempt == 2
        await again.ack()
        await survivor.close()

    async def test_rejected_and_dead_lettered_keeps_bytes_and_headers(
        self, broker: Broker, names: tuple[str, str]
    ) -> None:
        stream, prefix = await self._stream(broker, names)
        dead_stream = stream + "_DLQ"
        await broker.ensure_stream(dead_stream, [prefix + "-dlq.>"])
        body = b"\x00\xffnot json\n"
        await broker.publish(f"{prefix}.a", body, headers={"ce-id": "1", "x-trace": "abc"})
        sub = await broker.subscribe(stream, "g", ack_wait_s=_ACK_WAIT_S)
        (bad,) = await self._take(sub, 1)
        await broker.publish(
            f"{prefix}-dlq.{bad.subject}", bad.data, headers={**bad.headers, "reason": "bad"}
        )
        await bad.reject()
        assert await sub.fetch(1, timeout_s=_ACK_WAIT_S * 3) == []  # never redelivered
        letters = await broker.subscribe(dead_stream, "reader")
        (letter,) = await self._take(letters, 1)
        assert letter.data == body
        assert letter.subject == f"{prefix}-dlq.{prefix}.a"
        assert (
            letter.headers["ce-id"] == "1"
            and letter.headers["x-trace"] == "abc"
            and letter.headers["reason"] == "bad"
        )
        await letter.ack()
        await sub.close()
        await letters.close()

    async def test_a_dedup_id_is_stored_once(self, broker: Broker, names: tuple[str, str]) -> None:
        stream, prefix = await self._stream(broker, names)
        first = await broker.publish(f"{prefix}.a", b"x", dedup_id="same")
        second = await broker.publish(f"{prefix}.a", b"x", dedup_id="same")
        assert not first.duplicate and second.duplicate
        sub = await broker.subscribe(stream, "g", ack_wait_s=_ACK_WAIT_S)
        (only,) = await self._take(sub, 1)
        await only.ack()
        assert await sub.fetch(1, timeout_s=_ACK_WAIT_S) == []
        await sub.close()

    async def test_one_subject_is_delivered_in_order(self, broker: Broker, names: tuple[str, str]) -> None:
        stream, prefix = await self._stream(broker, names)
        for n in range(20):
            await broker.publish(f"{prefix}.key-7", str(n).encode())
        sub = await broker.subscribe(stream, "g", subjects=[f"{prefix}.key-7"], max_in_flight=20)
        taken = await self._take(sub, 20)
        assert [int(d.data) for d in taken] == list(range(20))
        for delivery in taken:
            await delivery.ack()
        await sub.close()

    async def test_a_group_shares_messages_without_overlap(
        self, broker: Broker, names: tuple[str, str]
    ) -> None:
        stream, prefix = await self._stream(broker, names)
        for n in range(30):
            await broker.publish(f"{prefix}.a", str(n).encode())
        one = await broker.subscribe(stream, "shared", ack_wait_s=30, max_in_flight=30)
        two = await broker.subscribe(stream, "shared", ack_wait_s=30, max_in_flight=30)
        got: list[int] = []
        async with asyncio.timeout(20):
            while len(got) < 30:
                for sub in (one, two):
                    for delivery in await sub.fetch(5, timeout_s=0.2):
                        got.append(int(delivery.data))
                        await delivery.ack()
        assert sorted(got) == list(range(30))  # each once, across both
        await one.close()
        await two.close()
