"""NATS JetStream as the event platform (the built-in broker, ``nats://host:port``).

Streams are JetStream streams; deduplication is JetStream's ``Nats-Msg-Id`` header within the
stream's duplicate window; a consumer group is a durable pull consumer with explicit acks
(``max_ack_pending`` bounds what is in flight, ``ack_wait`` redelivers what a dead consumer held).
``retry`` is a NAK with a delay and ``reject`` a TERM.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, ClassVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from kernel.broker import Broker, BrokerError, BrokerUnavailable, Delivery, Published, Subscription

__all__ = ["NatsBroker"]

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
    OSError,
)


class _NatsDelivery(Delivery):
    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self.subject = msg.subject
        self.data = msg.data
        self.headers = dict(msg.headers or {})
        self.attempt = msg.metadata.num_delivered or 1

    async def ack(self) -> None:
        await self._settle(self._msg.ack())

    async def retry(self, delay_s: float = 0.0) -> None:
        await self._settle(self._msg.nak(delay=delay_s if delay_s > 0 else None))

    async def reject(self) -> None:
        await self._settle(self._msg.term())

    async def _settle(self, call: Any) -> None:
        try:
            await call
        except nats.errors.MsgAlreadyAckdError:
            return
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"NATS: could not settle a message on {self.subject!r}: {exc!r}") from exc


class _NatsSubscription(Subscription):
    def __init__(self, psub: Any) -> None:
        self._psub = psub

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Delivery]:
        try:
            messages = await self._psub.fetch(batch=max_messages, timeout=timeout_s)
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"NATS: fetch failed: {exc!r}") from exc
        return [_NatsDelivery(m) for m in messages]

    async def close(self) -> None:
        try:
            await self._psub.unsubscribe()
        except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
            return


class NatsBroker(Broker):
    name: ClassVar[str] = "nats"

    def __init__(self, url: str = "nats://127.0.0.1:4222", *, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self._nc: NatsClient | None = None

    @property
    def _connection(self) -> NatsClient:
        if self._nc is None:
            raise BrokerError("NATS: connect() first")
        return self._nc

    @property
    def _js(self) -> Any:
        return self._connection.jetstream()

    async def connect(self) -> None:
        if self._nc is not None:
            return
        try:
            self._nc = await nats.connect(
                servers=[self.url],
                connect_timeout=self.connect_timeout_s,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                # No buffering while reconnecting: a publication the caller already gave up on must
                # not reach the stream later, after its duplicate window (it would be stored twice).
                pending_size=0,
                error_cb=_quiet,
                disconnected_cb=_noop,
                reconnected_cb=_noop,
            )
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"NATS at {self.url} cannot be reached: {exc!r}") from exc

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            try:
                await asyncio.wait_for(nc.drain(), timeout=5)
            except _UNAVAILABLE:
                await nc.close()

    async def ensure_stream(
        self,
        name: str,
        subjects: Sequence[str],
        *,
        duplicate_window_s: float = 120.0,
        max_age_s: float | None = None,
    ) -> None:
        config = StreamConfig(
            name=name,
            subjects=list(subjects),
            duplicate_window=duplicate_window_s,
            max_age=max_age_s or 0,
        )
        try:
            try:
                await self._js.stream_info(name)
            except nats.js.errors.NotFoundError:
                await self._js.add_stream(config)
            else:
                await self._js.update_stream(config)
        except nats.js.errors.APIError as exc:
            raise BrokerError(
                f"NATS: stream {name!r} over {list(subjects)} refused: {exc.description}"
            ) from exc
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"NATS: stream {name!r} could not be set up: {exc!r}") from exc

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        dedup_id: str | None = None,
        timeout_s: float = 5.0,
    ) -> Published:
        all_headers = dict(headers or {})
        if dedup_id is not None:
            all_headers["Nats-Msg-Id"] = dedup_id
        try:
            ack = await self._js.publish(subject, data, timeout=timeout_s, headers=all_headers or None)
        except nats.js.errors.NoStreamResponseError as exc:
            raise BrokerError(f"NATS: no stream stores subject {subject!r}") from exc
        except nats.js.errors.APIError as exc:
            raise BrokerError(f"NATS: publication to {subject!r} refused: {exc.description}") from exc
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"NATS: publication to {subject!r} not confirmed: {exc!r}") from exc
        return Published(stream=ack.stream, sequence=ack.seq, duplicate=bool(ack.duplicate))

    async def watch(
        self, subject: str, *, from_start: bool = False
    ) -> AsyncIterator[tuple[str, bytes, dict[str, str]]]:
        try:
            try:
                stream = await self._js.find_stream_name_by_subject(subject)
            except nats.js.errors.NotFoundError:
                sub = await self._connection.subscribe(subject)  # not stored: live messages only
            else:
                policy = DeliverPolicy.ALL if from_start else DeliverPolicy.NEW
                sub = await self._js.subscribe(
                    subject, stream=stream, ordered_consumer=True, deliver_policy=policy
                )
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"NATS: cannot watch {subject!r}: {exc!r}") from exc
        try:
            async for msg in sub.messages:
                yield msg.subject, msg.data, dict(msg.headers or {})
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def subscribe(
        self,
        stream: str,
        group: str,
        *,
        subjects: Sequence[str] = (),
        max_in_flight: int = 64,
        ack_wait_s: float = 30.0,
    ) -> Subscription:
        config = ConsumerConfig(
            durable_name=group,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_deliver=-1,
            max_ack_pending=max_in_flight,
            max_waiting=512,
        )
        if len(subjects) == 1:
            config.filter_subject = subjects[0]
        elif subjects:
            config.filter_subjects = list(subjects)
        try:
            try:
                await self._js.consumer_info(stream, group)
            except nats.js.errors.NotFoundError:
                await self._js.add_consumer(stream, config)
            psub = await self._js.pull_subscribe_bind(durable=group, stream=stream)
        except nats.js.errors.APIError as exc:
            raise BrokerError(
                f"NATS: consumer {group!r} on stream {stream!r} refused: {exc.description}"
            ) from exc
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"NATS: consumer {group!r} could not be set up: {exc!r}") from exc
        return _NatsSubscription(psub)


async def _quiet(exc: Exception) -> None:
    """Connection errors surface on the calls that need the connection; nats-py would log each one."""


async def _noop() -> None:
    return None
