"""The worker's HTTP port: ``/metrics`` (Prometheus), ``/healthz`` (alive) and ``/readyz`` (ready).

The Temporal SDK core serves its Prometheus metrics on an address of its own; the worker binds that
to a loopback port nobody else needs to know and serves its content on this one port, next to the
health endpoints, so operators configure one port (``--metrics-port`` / ``KERNELFLOW_METRICS_PORT``).

- ``/healthz``: 200 while the process runs its event loop (a liveness probe: restart when it fails).
- ``/readyz``: 200 while the worker is connected to Temporal and polling its task queue (a poller
  with this worker's identity is listed on the task queue, checked every ``probe_every`` seconds),
  503 with the reason otherwise, and from the moment a drain starts (SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

__all__ = ["HealthServer", "Readiness"]

_log = structlog.get_logger("kernelflow.health")


class _QuietServer(uvicorn.Server):
    """Leaves SIGTERM and SIGINT to the worker, which drains on them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Readiness:
    """What ``/readyz`` answers: polling seen recently, and not draining."""

    stale_after: float = 30.0
    draining: bool = False
    last_seen_polling: float | None = None
    reason: str = "starting: the worker has not polled yet"
    started: float = field(default_factory=time.monotonic)

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: finishing in-flight work before exit"
        if self.last_seen_polling is None or time.monotonic() - self.last_seen_polling > self.stale_after:
            return False, self.reason
        return True, "polling"


class HealthServer:
    """Serves the port; ``probe`` keeps ``readiness`` current by asking Temporal who polls the queue."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        sdk_metrics_url: str | None,
        readiness: Readiness,
        client: Client | None = None,
        task_queue: str | None = None,
        probe_every: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.sdk_metrics_url = sdk_metrics_url
        self.readiness = readiness
        self.client = client
        self.task_queue = task_queue
        self.probe_every = probe_every
        self._server: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._http = httpx.AsyncClient(timeout=10)
        self.bound_port: int | None = None

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/healthz", self._healthz),
                Route("/readyz", self._readyz),
                Route("/metrics", self._metrics),
            ]
        )

    async def _healthz(self, _: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def _readyz(self, _: Request) -> Response:
        ok, reason = self.readiness.ready()
        return JSONResponse({"status": "ready" if ok else "not ready", "reason": reason}, 200 if ok else 503)

    async def _metrics(self, _: Request) -> Response:
        if self.sdk_metrics_url is None:
            return PlainTextResponse("metrics are off\n", status_code=404)
        try:
            upstream = await self._http.get(self.sdk_metrics_url)
        except httpx.HTTPError as exc:
            return PlainTextResponse(f"metrics unavailable: {exc}\n", status_code=503)
        return Response(
            upstream.content,
            status_code=upstream.status_code,
            media_type=upstream.headers.get("content-type", "text/plain; version=0.0.4"),
        )

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)
        sock.setblocking(False)
        self.bound_port = sock.getsockname()[1]
        config = uvicorn.Config(self.app(), log_level="warning", access_log=False, lifespan="off")
        self._server = _QuietServer(config)
        self._tasks.append(asyncio.create_task(self._server.serve(sockets=[sock])))
        if self.client is not None and self.task_queue is not None:
            self._tasks.append(asyncio.create_task(self._probe()))

    async def _probe(self) -> None:
        assert self.client is not None and self.task_queue is not None
        identity = self.client.identity
        while True:
            try:
                described = await self.client.workflow_service.describe_task_queue(
                    DescribeTaskQueueRequest(
                        namespace=self.client.namespace,
                        task_queue=TaskQueue(name=self.task_queue),
                        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                    ),
                    timeout=timedelta(seconds=self.probe_every * 2),
                )
                if any(p.identity == identity for p in described.pollers):
                    self.readiness.last_seen_polling = time.monotonic()
                else:
                    self.readiness.reason = f"not polling task queue {self.task_queue!r} yet"
            except Exception as exc:  # any failure to reach Temporal makes the worker not ready
                self.readiness.reason = f"Temporal unreachable: {' '.join(str(exc).split())}"
            # Quick until first seen polling (a starting worker becomes ready at once), then every probe_every.
            seen = self.readiness.last_seen_polling is not None
            await asyncio.sleep(self.probe_every if seen else min(self.probe_every, 0.25))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        for task in self._tasks[1:]:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.aclose()
