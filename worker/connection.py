"""Where Temporal is and how to reach it: the ``temporal`` CLI's environment configuration.

Every Kernelflow process (worker, ``kernelflow run``/``watch``) resolves its connection through the
SDK's ``temporalio.envconfig``: the same TOML profiles (``~/.config/temporalio/temporal.toml``, or
``TEMPORAL_CONFIG_FILE``) and environment variables (``TEMPORAL_ADDRESS``, ``TEMPORAL_NAMESPACE``,
``TEMPORAL_API_KEY``, ``TEMPORAL_TLS``, ``TEMPORAL_TLS_CA_CERT_PATH``, ``TEMPORAL_TLS_CLIENT_CERT_PATH``,
``TEMPORAL_TLS_CLIENT_KEY_PATH``, ``TEMPORAL_TLS_SERVER_NAME``, ``TEMPORAL_PROFILE``, …) as the official
CLI, so one profile serves both tools. Precedence: ``--address``/``--namespace`` flags, then the
environment, then the profile, then ``localhost:7233`` and ``default``.

A connection that cannot be made (wrong CA, missing client certificate, bad key, refused API key,
nothing listening) fails within ``timeout`` seconds with a message naming the profile, the address,
the TLS set-up and what failed: never a silent hang.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import Client, Interceptor
from temporalio.envconfig import ClientConfigProfile
from temporalio.runtime import Runtime
from temporalio.service import TLSConfig

from kernel.errors import ConfigurationError, KernelflowError
from worker.config import PayloadSettings, WorkerSettings, payload_settings_from_env
from worker.storage import build_data_converter

__all__ = ["ConnectFailed", "TemporalConnection", "open_client", "resolve_connection"]

DEFAULT_ADDRESS = "localhost:7233"
DEFAULT_NAMESPACE = "default"


class ConnectFailed(KernelflowError):
    """Temporal could not be reached with the resolved connection."""


@dataclass(frozen=True)
class TemporalConnection:
    """A resolved connection: what ``Client.connect`` is given, and where it came from."""

    profile: str
    target: str
    namespace: str
    tls: bool | TLSConfig = False
    api_key: str | None = None
    rpc_metadata: Mapping[str, str] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    """Where the TLS material came from (file paths), for messages."""

    def describe(self) -> str:
        """One line for logs and errors; never the API key or key material."""
        if self.tls is False:
            security = "plaintext"
        elif isinstance(self.tls, TLSConfig) and self.tls.client_cert is not None:
            security = "mutual TLS"
        else:
            security = "TLS"
        if isinstance(self.tls, TLSConfig) and self.tls.server_root_ca_cert is not None:
            security += " with a custom CA"
        if self.api_key:
            security += " + API key"
        where = f", from {', '.join(self.sources)}" if self.sources else ""
        return f"profile {self.profile!r}: {self.target}, namespace {self.namespace!r}, {security}{where}"


def _explicit(settings: WorkerSettings, name: str) -> Any:
    return getattr(settings, name) if name in settings.model_fields_set else None


def resolve_connection(
    settings: WorkerSettings | None = None,
    *,
    profile: str | None = None,
    address: str | None = None,
    namespace: str | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> TemporalConnection:
    """The connection of ``profile`` (or ``TEMPORAL_PROFILE``, or ``default``) from the TOML file and
    the environment; ``address``/``namespace`` (and the same fields of ``settings`` when they were set
    explicitly) win over both."""
    env = dict(os.environ if environ is None else environ)
    if settings is not None:
        profile = profile or settings.profile
        address = address or _explicit(settings, "temporal_address")
        namespace = namespace or _explicit(settings, "namespace")
    name = profile or env.get("TEMPORAL_PROFILE") or "default"
    try:
        loaded = ClientConfigProfile.load(profile=profile, config_source=config_file, override_env_vars=env)
        connect = loaded.to_client_connect_config()
    except (RuntimeError, ValueError, OSError) as exc:
        where = config_file or env.get("TEMPORAL_CONFIG_FILE") or "the default Temporal config file"
        raise ConfigurationError(
            f"Temporal connection profile {name!r} ({where}) cannot be used: {exc}"
        ) from exc
    sources: list[str] = []
    if loaded.tls is not None:
        for source in (loaded.tls.server_root_ca_cert, loaded.tls.client_cert, loaded.tls.client_private_key):
            if isinstance(source, Path):  # a str or bytes source is the PEM itself: never shown
                sources.append(str(source))
    return TemporalConnection(
        profile=name,
        target=address or connect.get("target_host") or DEFAULT_ADDRESS,
        namespace=namespace or connect.get("namespace") or DEFAULT_NAMESPACE,
        tls=connect.get("tls", False),
        api_key=connect.get("api_key"),
        rpc_metadata=dict(connect.get("rpc_metadata") or {}),
        sources=tuple(sources),
    )


async def open_client(
    connection: TemporalConnection,
    *,
    payloads: PayloadSettings | None = None,
    runtime: Runtime | None = None,
    interceptors: Sequence[Interceptor] = (),
    timeout: float = 10.0,  # noqa: ASYNC109 - the message names it
) -> Client:
    """A client with Kernelflow's converter on ``connection``; raises ``ConnectFailed`` naming the
    profile and the cause when the server cannot be reached within ``timeout`` seconds."""
    settings = payloads if payloads is not None else payload_settings_from_env()
    try:
        return await asyncio.wait_for(
            Client.connect(
                connection.target,
                namespace=connection.namespace,
                api_key=connection.api_key,
                tls=connection.tls,
                rpc_metadata=connection.rpc_metadata,
                data_converter=build_data_converter(settings),
                runtime=runtime,
                interceptors=interceptors,
            ),
            timeout=timeout,
        )
    except TimeoutError:
        raise ConnectFailed(
            f"cannot reach Temporal ({connection.describe()}): no answer within {timeout:g}s"
        ) from None
    except Exception as exc:  # the SDK raises RuntimeError / RPCError with the transport's reason
        raise ConnectFailed(f"cannot connect to Temporal ({connection.describe()}): {_reason(exc)}") from exc


_HINTS = (
    (
        "UnknownIssuer",
        "the server's certificate is not signed by the CA this profile trusts (tls server_ca_cert)",
    ),
    ("NotValidForName", "the server's certificate does not name this address (tls server_name overrides it)"),
    ("failed to parse private key", "the client key (tls client_key) is not a readable PEM private key"),
    ("Connection refused", "nothing listens at this address"),
    ("Unauthenticated", "the server refused the credentials (API key or client certificate)"),
    ("invalid compression flag", "the server answered something other than gRPC (a proxy error page?)"),
)


def _reason(exc: BaseException) -> str:
    text = " ".join((str(exc).strip() or type(exc).__name__).split())
    hints = [hint for marker, hint in _HINTS if marker in text]
    return ("; ".join(hints) + " — " if hints else "") + text
