"""``kernelflow codec-server``: Temporal's remote codec protocol for the Web UI and the ``temporal`` CLI.

``POST /decode`` and ``POST /encode`` take and return ``{"payloads": [<Payload as protobuf JSON>]}``
with the namespace in the ``X-Namespace`` header. ``/decode`` also fetches payloads kept in the payload
store, so a long prompt stored outside the history is readable too. A payload this server cannot
decrypt (a destroyed tenant key, a key it lacks) is returned as it came, and the response's
``X-Kernelflow-Undecoded`` header counts them.

Every request is refused unless:

- its ``Origin`` (sent by browsers) is one of the configured UI origins; CORS answers only those;
- its namespace is one the server serves;
- it is authenticated: ``Authorization: Bearer <token>`` equal to the shared token
  (``KERNELFLOW_CODEC_TOKEN``), or accepted by the configured verifier (``module:callable`` called
  with the token and the namespace; the Web UI forwards its user's access token when
  ``TEMPORAL_CODEC_PASS_ACCESS_TOKEN=true``).

Without authentication (``--no-auth``, what ``kernelflow dev`` uses because its Web UI sends no
token) the server binds only to loopback, accepts only loopback ``Host`` names (against DNS
rebinding) and a browser only from the configured UI origin: any local process can still decode.
"""

from __future__ import annotations

import hmac
import importlib
import inspect
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog
import uvicorn
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import DataConverter

from kernel.errors import ConfigurationError
from worker.config import PayloadSettings, payload_settings_from_env
from worker.storage import build_data_converter

__all__ = [
    "CodecServer",
    "CodecServerSettings",
    "build_codec_app",
    "describe",
    "load_verifier",
    "serve_forever",
    "settings_from_env",
]

_log = structlog.get_logger("kernelflow.codec_server")

Verifier = Callable[[str, str], bool | Awaitable[bool]]
_MAX_BODY_BYTES = 64 * 1024 * 1024
"""A history's payloads are asked for a few at a time; this bounds what one request can make us hold."""
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


@dataclass
class CodecServerSettings:
    namespaces: Sequence[str] = ("default",)
    ui_origins: Sequence[str] = ()
    """Browser origins allowed to call (e.g. ``http://localhost:8080``); CORS answers only these."""
    token: str | None = None
    verifier: Verifier | None = None
    authenticate: bool = True
    """False only for the loopback dev set-up: then Host must be a loopback name."""
    payloads: PayloadSettings = field(default_factory=PayloadSettings)


def load_verifier(spec: str) -> Verifier:
    """A verifier from ``module:callable``."""
    module_name, _, attribute = spec.partition(":")
    try:
        verifier = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(
            f"codec verifier {spec!r} cannot be loaded ('module:callable'): {exc}"
        ) from exc
    if not callable(verifier):
        raise ConfigurationError(f"codec verifier {spec!r} is not callable")
    return verifier  # type: ignore[no-any-return]


def build_codec_app(settings: CodecServerSettings, converter: DataConverter | None = None) -> Starlette:
    """The codec server's ASGI app; ``converter`` defaults to one built from ``settings.payloads``."""
    if settings.authenticate and settings.token is None and settings.verifier is None:
        raise ConfigurationError(
            "the codec server needs a shared token (KERNELFLOW_CODEC_TOKEN) or a verifier "
            "(--verifier module:callable); --no-auth is for a loopback dev set-up only"
        )
    data_converter = converter or build_data_converter(settings.payloads)
    origins = {origin.rstrip("/") for origin in settings.ui_origins}

    def cors(request: Request) -> dict[str, str]:
        origin = request.headers.get("origin")
        if origin is None or origin.rstrip("/") not in origins:
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type, X-Namespace, Authorization",
            "Access-Control-Expose-Headers": "X-Kernelflow-Undecoded",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        }

    refusals: dict[int, int] = {}

    def refuse(request: Request, status: int, reason: str) -> Response:
        refusals[status] = refusals.get(status, 0) + 1
        _log.warning(
            "codec request refused",
            path=request.url.path,
            status=status,
            reason=reason,
            origin=request.headers.get("origin"),
            namespace=request.headers.get("x-namespace"),
        )
        return JSONResponse({"error": reason}, status_code=status, headers=cors(request))

    async def check(request: Request) -> Response | None:
        origin = request.headers.get("origin")
        if origin is not None and origin.rstrip("/") not in origins:
            return refuse(request, 403, f"origin {origin} is not an allowed UI origin")
        if not settings.authenticate:
            host = (request.headers.get("host") or "").rsplit(":", 1)[0]
            if host not in _LOOPBACK_NAMES:
                return refuse(
                    request, 403, f"host {host!r} is not loopback (the dev codec server is local only)"
                )
        namespace = request.headers.get("x-namespace")
        if not namespace:
            return refuse(request, 400, "the X-Namespace header is missing")
        if settings.authenticate:
            scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                return refuse(request, 401, "authentication required: Authorization: Bearer <token>")
            if not await _authentic(settings, token.strip(), namespace):
                return refuse(request, 401, "the token is not accepted")
        if namespace not in settings.namespaces:
            return refuse(request, 403, f"namespace {namespace!r} is not served by this codec server")
        return None

    async def payloads_of(request: Request) -> list[Payload] | Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_BODY_BYTES:
                return refuse(request, 413, f"the body is over {_MAX_BODY_BYTES} bytes")
        try:
            message = json_format.Parse(bytes(body), Payloads(), ignore_unknown_fields=True)
        except (json_format.ParseError, ValueError, UnicodeDecodeError) as exc:
            return refuse(request, 400, f"the body is not {{'payloads': [...]}} in protobuf JSON: {exc}")
        return list(message.payloads)

    def answer(request: Request, payloads: Sequence[Payload], undecoded: int = 0) -> Response:
        body = json_format.MessageToJson(Payloads(payloads=payloads))
        headers = {**cors(request), "X-Kernelflow-Undecoded": str(undecoded)}
        return Response(body, media_type="application/json", headers=headers)

    async def preflight(request: Request) -> Response:
        headers = cors(request)
        if not headers:
            return refuse(request, 403, f"origin {request.headers.get('origin')} is not an allowed UI origin")
        return Response(status_code=204, headers=headers)

    async def decode(request: Request) -> Response:
        if request.method == "OPTIONS":
            return await preflight(request)
        refused = await check(request)
        if refused is not None:
            return refused
        payloads = await payloads_of(request)
        if isinstance(payloads, Response):
            return payloads
        decoded: list[Payload] = []
        undecoded = 0
        for payload in payloads:
            try:
                decoded.append(await _decode_one(data_converter, payload))
            except Exception as exc:
                undecoded += 1
                decoded.append(payload)
                _log.warning(
                    "payload left encoded", reason=str(exc), namespace=request.headers.get("x-namespace")
                )
        return answer(request, decoded, undecoded)

    async def encode(request: Request) -> Response:
        if request.method == "OPTIONS":
            return await preflight(request)
        refused = await check(request)
        if refused is not None:
            return refused
        payloads = await payloads_of(request)
        if isinstance(payloads, Response):
            return payloads
        codec = data_converter.payload_codec
        encoded = list(payloads) if codec is None else await codec.encode(payloads)
        return answer(request, encoded)

    app = Starlette(
        routes=[
            Route("/decode", decode, methods=["POST", "OPTIONS"]),
            Route("/encode", encode, methods=["POST", "OPTIONS"]),
        ]
    )
    app.state.refusals = refusals
    return app


async def _authentic(settings: CodecServerSettings, token: str, namespace: str) -> bool:
    if settings.token is not None and hmac.compare_digest(token.encode(), settings.token.encode()):
        return True
    if settings.verifier is not None:
        verdict = settings.verifier(token, namespace)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return verdict is True
    return False


async def _decode_one(converter: DataConverter, payload: Payload) -> Payload:
    """A payload as the history holds it → as it was written: the stored payload fetched from the
    payload store if this is a reference, then decrypted. The SDK's inbound path, one payload at a time
    so that one undecodable payload does not hide the others."""
    return await converter._transform_inbound_payload(payload)


# --- running it ------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class CodecServer:
    """The codec server on uvicorn in a background thread (``kernelflow dev``, tests); the
    ``kernelflow codec-server`` command runs the same app in the foreground."""

    def __init__(self, settings: CodecServerSettings, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if not settings.authenticate and not _is_loopback(host):
            raise ConfigurationError(
                f"the codec server without authentication binds to loopback only, not {host!r}"
            )
        self.settings = settings
        self.host = host
        self.port = port
        self._app = build_codec_app(settings)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def refusals(self) -> dict[int, int]:
        """Refused requests so far, by HTTP status."""
        return dict(self._app.state.refusals)

    def start(self) -> str:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="kernelflow-codec", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"the codec server did not start on {self.host}:{self.port}")
            time.sleep(0.005)
        self._server, self._thread = server, thread
        return self.url

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def describe(settings: CodecServerSettings, url: str) -> str:
    auth = (
        "no authentication: loopback only, browsers only from the UI origin"
        if not settings.authenticate
        else ("shared bearer token" if settings.token else "token verifier")
    )
    return (
        f"codec server {url}  (namespaces {', '.join(settings.namespaces)}; UI origins "
        f"{', '.join(settings.ui_origins) or 'none'}; {auth})"
    )


async def serve_forever(settings: CodecServerSettings, *, host: str, port: int) -> None:
    """The foreground server of ``kernelflow codec-server``, until SIGINT/SIGTERM."""
    if not settings.authenticate and not _is_loopback(host):
        raise ConfigurationError(
            f"the codec server without authentication binds to loopback only, not {host!r}"
        )
    from worker.devkeys import check_encryption

    await check_encryption(settings.payloads)
    converter = build_data_converter(settings.payloads)
    app = build_codec_app(settings, converter)
    if not getattr(converter.payload_codec, "encrypting", False):
        _log.warning("encryption is off in this codec server's settings: it only resolves stored payloads")
    print(describe(settings, f"http://{host}:{port}"), flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    await uvicorn.Server(config).serve()


def settings_from_env(
    environ: Mapping[str, str] | None = None,
    *,
    namespaces: Sequence[str] | None = None,
    ui_origins: Sequence[str] | None = None,
    verifier: str | None = None,
    no_auth: bool = False,
) -> CodecServerSettings:
    """Settings from arguments, else ``KERNELFLOW_CODEC_NAMESPACES`` (default: ``TEMPORAL_NAMESPACE`` or
    ``default``), ``KERNELFLOW_CODEC_UI_ORIGINS``, ``KERNELFLOW_CODEC_TOKEN`` (or a file named by
    ``KERNELFLOW_CODEC_TOKEN_FILE``), ``KERNELFLOW_CODEC_VERIFIER``;
    keys and payload store from the same settings as the workers (``payload_settings_from_env``)."""
    env = os.environ if environ is None else environ

    def listed(name: str) -> list[str]:
        return [item.strip() for item in env.get(name, "").split(",") if item.strip()]

    verifier_spec = verifier or env.get("KERNELFLOW_CODEC_VERIFIER")
    return CodecServerSettings(
        namespaces=list(
            namespaces
            or listed("KERNELFLOW_CODEC_NAMESPACES")
            or [env.get("TEMPORAL_NAMESPACE") or "default"]
        ),
        ui_origins=list(ui_origins or listed("KERNELFLOW_CODEC_UI_ORIGINS")),
        token=env.get("KERNELFLOW_CODEC_TOKEN") or _read_token(env.get("KERNELFLOW_CODEC_TOKEN_FILE")),
        verifier=load_verifier(verifier_spec) if verifier_spec else None,
        authenticate=not no_auth,
        payloads=payload_settings_from_env(env),
    )


def _read_token(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        raise ConfigurationError(
            f"KERNELFLOW_CODEC_TOKEN_FILE {path!r} cannot be read: {exc.strerror}"
        ) from exc
