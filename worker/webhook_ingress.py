"""Webhook ingress: CloudEvents over HTTP for systems that cannot speak to the broker.

``POST /events/<subject>`` with a CloudEvent (structured ``application/cloudevents+json``, or binary
mode with ``ce-*`` headers), signed with Standard Webhooks (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``). A valid request is stored on the broker under ``<subject_prefix><subject>``
(deduplicated by the event's ``source#id``) and answered ``202`` once stored; the bridge then maps it
through the same triggers as any event. Answers:

- ``401``: signature missing, wrong, or its timestamp outside the tolerance (nothing is stored);
- ``400``: not a CloudEvent (the reason is in the body);
- ``404``: no inbound subject covers the path's subject;
- ``503`` + ``Retry-After``: the broker could not store the event now; send it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from kernel.broker import Broker, BrokerError, BrokerUnavailable, subject_matches
from kernel.cloudevents import InvalidEvent, decode_event
from kernel.errors import ConfigurationError
from kernel.triggers import EventsConfig, IngressConfig
from kernel.webhooks import SignatureInvalid, verify

__all__ = ["WebhookIngress", "ingress_app"]


def ingress_app(broker: Broker, config: EventsConfig, *, secret: str) -> Starlette:
    ingress = config.ingress or IngressConfig()
    subjects = config.inbound_subjects()
    counts: dict[str, int] = {"accepted": 0, "duplicate": 0, "unauthorized": 0, "invalid": 0}

    async def receive(request: Request) -> JSONResponse:
        body = await request.body()
        headers = dict(request.headers)
        try:
            verify(secret, headers, body, tolerance_s=ingress.tolerance_s)
        except SignatureInvalid as exc:
            counts["unauthorized"] += 1
            return JSONResponse({"error": str(exc)}, status_code=401)
        subject = ingress.subject_prefix + request.path_params["subject"]
        if not any(subject_matches(pattern, subject) for pattern in subjects):
            return JSONResponse(
                {"error": f"no inbound subject covers {subject!r}; inbound subjects: {subjects}"},
                status_code=404,
            )
        try:
            event = decode_event(body, headers)
        except InvalidEvent as exc:
            counts["invalid"] += 1
            return JSONResponse({"error": str(exc)}, status_code=400)
        forwarded = {k: v for k, v in headers.items() if k.startswith("ce-") or k == "content-type"}
        try:
            published = await broker.publish(subject, body, headers=forwarded, dedup_id=event.key)
        except BrokerUnavailable as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})
        except BrokerError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "5"})
        counts["duplicate" if published.duplicate else "accepted"] += 1
        return JSONResponse(
            {
                "subject": subject,
                "id": event.id,
                "sequence": published.sequence,
                "duplicate": published.duplicate,
            },
            status_code=202,
        )

    async def stats(_: Request) -> JSONResponse:
        return JSONResponse(counts)

    return Starlette(
        routes=[
            Route("/events/{subject:path}", receive, methods=["POST"]),
            Route("/stats", stats, methods=["GET"]),
        ]
    )


class _Server(uvicorn.Server):
    """Leaves signal handling to the process that embeds it (the bridge stops it on SIGINT/SIGTERM)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebhookIngress:
    """The ingress as a uvicorn server inside the bridge's event loop."""

    def __init__(
        self, broker: Broker, config: EventsConfig, *, environ: dict[str, str] | None = None
    ) -> None:
        ingress = config.ingress or IngressConfig()
        env = os.environ if environ is None else environ
        secret = env.get(ingress.secret_env)
        if not secret:
            raise ConfigurationError(
                f"events.ingress needs a Standard Webhooks secret (whsec_...) in the environment variable "
                f"{ingress.secret_env}"
            )
        host, _, port = ingress.listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigurationError(f"events.ingress.listen must be host:port, got {ingress.listen!r}")
        self.url = f"http://{host}:{port}"
        app: Any = ingress_app(broker, config, secret=secret)
        self._server = _Server(
            uvicorn.Config(app, host=host, port=int(port), log_level="warning", lifespan="off")
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise ConfigurationError(f"the webhook ingress could not listen on {self.url}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
