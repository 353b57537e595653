"""The ASGI application: admin routes, the request flow every wire shares, and wire discovery.

A wire module (`simulator/<vendor>_wire.py`) subclasses `Wire` for its error shapes and exposes
`routes(sim: Simulator) -> list[BaseRoute]`; each generation route calls `exchange`, which runs
auth, parsing, directives, latency and faults, then renders through the wire's callbacks.
Every `simulator/*_wire.py` module is mounted: adding a vendor needs no change here.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from simulator.batches import BatchControl
from simulator.catalog import is_known_model
from simulator.core import (
    Admission,
    DirectiveError,
    Fault,
    SimRequest,
    Simulator,
    SimulatorConfig,
    request_digest,
)

__all__ = [
    "FAULT_HEADER",
    "ErrorReply",
    "JSONReply",
    "Reply",
    "StreamReply",
    "Wire",
    "WireError",
    "create_app",
    "dump_json",
    "exchange",
    "quiet_server_logs",
    "run_offline",
    "sse_frame",
    "wire_modules",
]

FAULT_HEADER = "x-sim-fault"
WIRE_MODULES = (
    "simulator.openai_wire",
    "simulator.openai_batch_wire",
    "simulator.openai_responses_wire",
    "simulator.anthropic_wire",
    "simulator.gemini_wire",
    "simulator.gemini_batch_wire",
    "simulator.ollama_wire",
    "simulator.bedrock_wire",
    "simulator.bedrock_batch_wire",
    "simulator.azure_wire",
)
_ABORT_MESSAGE = "ASGI callable returned without completing response."


def dump_json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)


class WireError(Exception):
    """Raised by a wire's parser to refuse a request with the vendor's own error body."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(reply.status, reply.body)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class JSONReply:
    body: Any
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamReply:
    frames: list[bytes]  # already framed (`data: ...\n\n` for SSE, one line for NDJSON)
    media_type: str = "text/event-stream; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)


Reply = JSONReply | StreamReply


class Wire:
    """Vendor error shapes; a wire module subclasses this and overrides what its vendor does."""

    name: ClassVar[str] = ""  # stats key (`by_wire`) and catalog vendor

    def auth_error(self, headers: Headers) -> ErrorReply | None:
        """The vendor's 401 when the request's credentials are missing or refused."""
        return None

    def fault_reply(self, fault: Fault, request: SimRequest) -> ErrorReply:
        """The vendor's error for an injected fault (every kind in `FAULT_STATUS` answering >= 400)."""
        return ErrorReply(fault.status, {"error": {"message": f"Simulated {fault.kind} fault."}})

    def bad_request(self, message: str, *, param: str | None = None) -> ErrorReply:
        return ErrorReply(400, {"error": {"message": message}})

    def unknown_model(self, model: str) -> ErrorReply:
        return ErrorReply(404, {"error": {"message": f"model {model!r} not found"}})

    def malformed(self, request: SimRequest) -> tuple[bytes, str]:
        """A 200 body that is neither valid JSON nor valid SSE, with its content type."""
        if request.stream:
            return b'data: {"id": "sim-malformed", "choices": [\n\n', "text/event-stream"
        return b'{"id": "sim-malformed", "choices": [{"message": ', "application/json"

    def mistyped(self, request: SimRequest) -> tuple[bytes, str]:
        """A 200 body that parses, in which one documented field has the wrong type, with its content type.
        A stream's first chunk is sound and the second is not."""
        if request.stream:
            first = {
                "id": "sim-mistyped",
                "model": request.model,
                "choices": [{"index": 0, "delta": {"content": "Hi"}}],
            }
            call = {"index": "first", "id": "call_1", "function": {"name": "lookup", "arguments": ""}}
            second = {
                "id": "sim-mistyped",
                "model": request.model,
                "choices": [{"index": 0, "delta": {"tool_calls": [call]}}],
            }
            return sse_frame(first) + sse_frame(second) + b"data: [DONE]\n\n", "text/event-stream"
        return dump_json(
            {"id": "sim-mistyped", "choices": [{"index": 0, "message": ["Hi"]}]}
        ), "application/json"


Parse = Callable[[Any, Request], SimRequest]
Succeed = Callable[[SimRequest, Admission], Reply]


async def exchange(request: Request, sim: Simulator, wire: Wire, parse: Parse, succeed: Succeed) -> Response:
    """Serve one generation request: auth, parse, admit, latency, faults, then `succeed`'s reply."""
    refused = wire.auth_error(request.headers)
    if refused is not None:
        return _error(refused)
    raw = await request.body()
    try:
        payload = json.loads(raw)
    except ValueError:
        return _error(wire.bad_request("We could not parse the JSON body of your request."))
    try:
        sim_request = parse(payload, request)
    except WireError as exc:
        return _error(exc.reply)
    sim_request.digest = request_digest(raw)
    try:
        admission = sim.admit(sim_request, header=request.headers.get(FAULT_HEADER))
    except DirectiveError as exc:
        return _error(wire.bad_request(str(exc)))
    if admission.latency > 0:
        await asyncio.sleep(admission.latency)
    fault = admission.fault
    if fault is not None and fault.status >= 400:
        return _error(wire.fault_reply(fault, sim_request), fault)
    if fault is not None and fault.kind == "hang":
        await _hold(request, admission.hang_seconds)
    if not is_known_model(wire.name, sim_request.model, sim.extra_models(wire.name)):
        return _error(wire.unknown_model(sim_request.model))
    reply = succeed(sim_request, admission)
    if fault is not None and fault.kind in ("malformed", "mistyped"):
        body, media_type = (
            wire.malformed(sim_request) if fault.kind == "malformed" else wire.mistyped(sim_request)
        )
        return Response(body, media_type=media_type)
    cut = fault is not None and fault.kind == "cut"
    if isinstance(reply, StreamReply):
        keep = max(1, len(reply.frames) // 2) if cut else None
        return _FramesResponse(reply.frames, reply.media_type, reply.headers, admission.token_delay, keep)
    body = dump_json(reply.body)
    if cut:
        return _FramesResponse([body[: len(body) // 2]], "application/json", reply.headers, 0.0, 1, len(body))
    return Response(
        body, status_code=reply.status, headers=dict(reply.headers), media_type="application/json"
    )


def run_offline(
    sim: Simulator, wire: Wire, parse: Parse, succeed: Succeed, payload: Any, request: Request
) -> tuple[int, Any]:
    """One request of a batch, run as the batch ends: (status, JSON body) as `exchange` would answer it.
    Directives and fault rules apply; latency, hangs and broken bodies do not (nobody waits on the line)."""
    try:
        sim_request = parse(payload, request)
    except WireError as exc:
        return exc.reply.status, exc.reply.body
    sim_request.digest = request_digest(dump_json(payload))
    try:
        admission = sim.admit(sim_request)
    except DirectiveError as exc:
        reply = wire.bad_request(str(exc))
        return reply.status, reply.body
    fault = admission.fault
    if fault is not None and fault.status >= 400:
        reply = wire.fault_reply(fault, sim_request)
        return reply.status, reply.body
    if not is_known_model(wire.name, sim_request.model, sim.extra_models(wire.name)):
        reply = wire.unknown_model(sim_request.model)
        return reply.status, reply.body
    answer = succeed(sim_request, admission)
    if not isinstance(answer, JSONReply):
        raise TypeError("a batch item cannot stream")
    return answer.status, answer.body


def _error(reply: ErrorReply, fault: Fault | None = None) -> Response:
    headers = dict(reply.headers)
    if fault is not None and fault.retry_after is not None:
        headers["retry-after"] = f"{fault.retry_after:g}"
    if fault is not None and fault.retry_after_ms is not None:
        headers["retry-after-ms"] = str(fault.retry_after_ms)
    return Response(
        dump_json(reply.body), status_code=reply.status, headers=headers, media_type="application/json"
    )


async def _hold(request: Request, seconds: float) -> None:
    """Wait `seconds`, or until the client goes away (then nobody reads what follows)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(disconnected(), timeout=seconds)


class _FramesResponse(Response):
    """Sends frames with an optional delay; with `keep`, sends that many and drops the connection."""

    def __init__(
        self,
        frames: list[bytes],
        media_type: str,
        headers: Mapping[str, str],
        delay: float,
        keep: int | None,
        content_length: int | None = None,
    ) -> None:
        self.frames = frames if keep is None else frames[:keep]
        self.delay = delay
        self.abort = keep is not None
        self.status_code = 200
        raw_headers = [(b"content-type", media_type.encode())]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        if content_length is not None:
            raw_headers.append((b"content-length", str(content_length).encode()))
        elif not self.abort:
            raw_headers.append((b"cache-control", b"no-cache"))
        self.raw_headers = raw_headers
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            if self.delay <= 0 and not self.abort:
                await send({"type": "http.response.body", "body": b"".join(self.frames)})
                return
            for index, frame in enumerate(self.frames):
                if index and self.delay > 0:
                    await asyncio.sleep(self.delay)
                await send({"type": "http.response.body", "body": frame, "more_body": True})
            if not self.abort:
                await send({"type": "http.response.body", "body": b""})
            # Returning with the body incomplete makes the server drop the connection: a cut stream.
        except OSError:
            return  # the client went away


class _QuietAbort(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _ABORT_MESSAGE


def quiet_server_logs() -> None:
    """Keep the deliberate `cut` aborts out of the server's error log."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietAbort) for f in logger.filters):
        logger.addFilter(_QuietAbort())


def wire_modules() -> list[str]:
    """The wire modules of this package (`simulator.<vendor>_wire`), in name order."""
    package = __name__.rpartition(".")[0]
    found = pkgutil.iter_modules(importlib.import_module(package).__path__)
    return sorted(f"{package}.{m.name}" for m in found if m.name.endswith("_wire"))


def create_app(config: SimulatorConfig | None = None, *, simulator: Simulator | None = None) -> Starlette:
    """The simulator's ASGI app; `app.state.simulator` holds its rules and statistics."""
    sim = simulator if simulator is not None else Simulator(config)
    routes: list[BaseRoute] = [
        Route("/_sim/health", _health, methods=["GET"]),
        Route("/_sim/stats", _stats, methods=["GET"]),
        Route("/_sim/faults", _faults, methods=["GET", "POST"]),
        Route("/_sim/reset", _reset, methods=["POST"]),
        Route("/_sim/batches", _batches, methods=["GET", "POST"]),
    ]
    for module_name in wire_modules():
        routes.extend(importlib.import_module(module_name).routes(sim))
    app = Starlette(routes=routes)
    app.state.simulator = sim
    return app


def _sim(request: Request) -> Simulator:
    sim: Simulator = request.app.state.simulator
    return sim


async def _health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _stats(request: Request) -> Response:
    return JSONResponse(_sim(request).stats())


async def _faults(request: Request) -> Response:
    sim = _sim(request)
    if request.method == "POST":
        try:
            rules = json.loads(await request.body())
            sim.add_faults([rules] if isinstance(rules, dict) else rules)
        except (ValueError, TypeError, AttributeError) as exc:
            return JSONResponse({"error": {"message": f"bad fault rules: {exc}"}}, status_code=400)
    return JSONResponse({"faults": sim.faults()})


async def _batches(request: Request) -> Response:
    """GET: the batch counts; POST: how the next batches behave (`BatchControl`)."""
    sim = _sim(request)
    if request.method == "POST":
        try:
            sim.batches.set_control(BatchControl.from_mapping(json.loads(await request.body())))
        except (ValueError, TypeError, AttributeError) as exc:
            return JSONResponse({"error": {"message": f"bad batch control: {exc}"}}, status_code=400)
    return JSONResponse(sim.batches.stats())


async def _reset(request: Request) -> Response:
    _sim(request).reset()
    return JSONResponse({"status": "reset"})


def sse_frame(data: Any, event: str | None = None) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {dump_json(data).decode()}\n\n".encode()
