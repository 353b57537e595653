"""Running the simulator: in a background thread (tests) or as a separate process (benchmarks)."""

from __future__ import annotations

import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import httpx
import uvicorn

from simulator.app import create_app, quiet_server_logs
from simulator.core import Simulator, SimulatorConfig

__all__ = ["SimulatorProcess", "SimulatorServer", "base_url", "bind_socket", "build_server"]

_STARTUP_TIMEOUT = 30.0
_LISTEN_LINE = re.compile(r"(http://\S+)")


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound socket; with port 0 the system picks a free port (read it with `getsockname`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets created with it, and
    # without that every response waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def build_server(sim: Simulator) -> uvicorn.Server:
    """A quiet uvicorn server for the simulator app: no access log, no lifespan, short drain."""
    quiet_server_logs()
    config = uvicorn.Config(
        create_app(simulator=sim),
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=1,
    )
    return uvicorn.Server(config)


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class SimulatorServer:
    """The simulator on a uvicorn server in a background thread of this process."""

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, config: SimulatorConfig | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.simulator = Simulator(config if config is not None else SimulatorConfig.from_env())
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the simulator server is not started; call start() first")
        return self._url

    def start(self) -> str:
        """Start serving and return the base URL, e.g. `http://127.0.0.1:53211`."""
        if self._url is not None:
            return self._url
        sock = bind_socket(self.host, self.port)
        server = build_server(self.simulator)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="kernelflow-simulator", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"the simulator server did not start on {self.host}:{self.port}")
            time.sleep(0.005)
        self._server, self._thread = server, thread
        self.port = sock.getsockname()[1]
        self._url = base_url(sock)
        return self._url

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=_STARTUP_TIMEOUT)
        self._server = self._thread = self._url = None

    def stats(self) -> dict[str, Any]:
        return self.simulator.stats()

    def reset(self) -> None:
        self.simulator.reset()

    def add_faults(self, rules: Iterable[Mapping[str, Any]]) -> None:
        self.simulator.add_faults(rules)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class SimulatorProcess:
    """`python -m simulator` as a subprocess, so the upstream does not share the client's GIL."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Iterable[Mapping[str, Any]] = (),
        python: str = sys.executable,
    ) -> None:
        self.host = host
        self.port = port
        self.faults = list(faults)
        self.python = python
        self._process: subprocess.Popen[str] | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the simulator process is not started; call start() first")
        return self._url

    @property
    def pid(self) -> int:
        """The simulator process's id (to measure its CPU or memory)."""
        if self._process is None:
            raise RuntimeError("the simulator process is not started; call start() first")
        return self._process.pid

    def start(self) -> str:
        """Start the process, wait until `/_sim/health` answers, and return the base URL."""
        if self._url is not None:
            return self._url
        command = [self.python, "-m", "simulator", "--host", self.host, "--port", str(self.port)]
        if self.faults:
            command += ["--faults", json.dumps(self.faults)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self._process = process
        try:
            self._url = self._read_url(process)
            self._wait_healthy(self._url)
        except BaseException:
            self.stop()
            raise
        return self._url

    def _read_url(self, process: subprocess.Popen[str]) -> str:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], _STARTUP_TIMEOUT)
        line = process.stdout.readline() if ready else ""
        found = _LISTEN_LINE.search(line)
        if found is None:
            raise RuntimeError(f"the simulator process did not report where it listens (got {line!r})")
        return found.group(1)

    def _wait_healthy(self, url: str) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while True:
            try:
                if httpx.get(f"{url}/_sim/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self._process is None or self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the simulator process at {url} did not become healthy")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self._process, self._url = self._process, None, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/_sim/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def reset(self) -> None:
        httpx.post(f"{self.url}/_sim/reset").raise_for_status()

    def add_faults(self, rules: Iterable[Mapping[str, Any]]) -> None:
        httpx.post(f"{self.url}/_sim/faults", json=list(rules)).raise_for_status()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
