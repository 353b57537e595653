"""Running the console: settings from the environment, and the HTTP server as an async context.

Environment: ``KERNELFLOW_CONSOLE_USERS`` (the users file, see ``worker.console.auth``),
``KERNELFLOW_CONSOLE_SECRET`` (signs sessions; random per process when unset, so a restart signs
everyone out), ``KERNELFLOW_CONSOLE_HOST`` / ``KERNELFLOW_CONSOLE_PORT`` (default 127.0.0.1:8500),
``KERNELFLOW_CONSOLE_SECURE_COOKIES=1`` behind HTTPS, ``KERNELFLOW_TEMPORAL_UI_URL`` (links to the
Web UI), ``KERNELFLOW_PROMETHEUS_URL`` or ``KERNELFLOW_METRICS_URLS`` (comma-separated /metrics URLs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

import structlog
import uvicorn
from starlette.applications import Starlette

from kernel.errors import ConfigurationError
from kernel.registry import Registry
from worker.console.app import ConsoleSettings
from worker.console.auth import User, Users, hash_password, load_users
from worker.console.oidc import OidcSettings
from worker.console.sources import MetricsReader, NoMetrics, PrometheusMetrics, ScrapedMetrics

__all__ = ["ConsoleServer", "dev_user", "metrics_from_env", "settings_from_env", "without_credentials"]

_log = structlog.get_logger("kernelflow.console")


def metrics_from_env(environ: Mapping[str, str]) -> MetricsReader:
    if environ.get("KERNELFLOW_PROMETHEUS_URL"):
        return PrometheusMetrics(environ["KERNELFLOW_PROMETHEUS_URL"])
    urls = [u.strip() for u in environ.get("KERNELFLOW_METRICS_URLS", "").split(",") if u.strip()]
    return ScrapedMetrics(urls) if urls else NoMetrics()


def settings_from_env(
    registry: Registry,
    *,
    namespace: str,
    task_queue: str,
    users: Users | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> ConsoleSettings:
    env = os.environ if environ is None else environ
    oidc = OidcSettings.from_env(env)
    if users is None:
        path = env.get("KERNELFLOW_CONSOLE_USERS")
        if not path and oidc is not None:
            users = Users()  # roles come from the provider's tokens
        elif not path:
            raise ConfigurationError(
                "KERNELFLOW_CONSOLE_USERS names no users file; create one with users, roles and password "
                "hashes (`kernelflow console --hash-password`)"
            )
        else:
            users = load_users(path)
    secret = env.get("KERNELFLOW_CONSOLE_SECRET", "").encode() or secrets.token_bytes(32)
    values: dict[str, Any] = {
        "users": users,
        "secret": secret,
        "namespace": namespace,
        "task_queue": task_queue,
        "ui_url": env.get("KERNELFLOW_TEMPORAL_UI_URL") or None,
        "describe_providers": registry.describe,
        "aliases": lambda: dict(registry.aliases),
        "metrics": metrics_from_env(env),
        "secure_cookies": env.get("KERNELFLOW_CONSOLE_SECURE_COOKIES", "") in ("1", "true", "yes"),
        "oidc": oidc,
    }
    values.update(overrides)
    return ConsoleSettings(**values)


def without_credentials(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Provider rows of a console running apart from the workers: it holds no provider keys, so
    whether a worker has them is not known here (the page says so, and a check finds out)."""
    return [{**row, "credentials_present": None} for row in rows]


def dev_user() -> tuple[Users, str]:
    """For ``kernelflow dev`` without a users file: one user ``dev`` with every role and a fresh
    password, printed once."""
    password = secrets.token_urlsafe(12)
    user = User(name="dev", roles=["operator", "approver"], password_hash=hash_password(password))
    return Users(users=[user]), password


class _Server(uvicorn.Server):
    """Leaves signals to the process that embeds it (``kernelflow dev`` stops on its own Ctrl-C)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ConsoleServer:
    """uvicorn serving the console on the running event loop, until the context exits."""

    def __init__(self, app: Starlette, *, host: str = "127.0.0.1", port: int = 8500) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="off", timeout_graceful_shutdown=2
        )
        self._server = _Server(config)
        self.host, self.port = host, port
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> ConsoleServer:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"the console did not start on {self.url}")
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
