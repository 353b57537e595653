"""The simulator in its own process, listening on a socket created with ``IPPROTO_TCP``.

``asyncio`` switches Nagle's algorithm off (``TCP_NODELAY``) only on sockets whose ``proto`` is
``IPPROTO_TCP``; ``simulator.server.bind_socket`` creates its socket with proto 0, so uvicorn's two
writes per response (head, then body) wait on the client's delayed ACK, about 40 ms per request. The
benchmarks want the upstream at zero latency, so they serve the same app from a socket made this way.
`python -m bench._simulator` prints the URL like `python -m simulator`.
"""

from __future__ import annotations

import socket
import subprocess

from simulator.server import SimulatorProcess

__all__ = ["NoDelaySimulatorProcess", "main"]


def main() -> None:
    from simulator.core import Simulator, SimulatorConfig
    from simulator.server import base_url, build_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"Kernelflow simulator listening on {base_url(sock)}", flush=True)
    build_server(Simulator(SimulatorConfig.from_env())).run(sockets=[sock])


class NoDelaySimulatorProcess(SimulatorProcess):
    """``SimulatorProcess`` started through ``bench._simulator``."""

    def start(self) -> str:
        if self._url is not None:
            return self._url
        process = subprocess.Popen([self.python, "-m", "bench._simulator"], stdout=subprocess.PIPE, text=True)
        self._process = process
        try:
            self._url = self._read_url(process)
            self._wait_healthy(self._url)
        except BaseException:
            self.stop()
            raise
        return self._url

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("not started")
        return self._process.pid


if __name__ == "__main__":
    main()
