"""A `kernelflow worker` started as its own process, configured only through its environment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["WorkerProcess", "kernelflow_binary"]


def kernelflow_binary() -> str:
    found = shutil.which("kernelflow") or str(Path(sys.executable).parent / "kernelflow")
    return found


class WorkerProcess:
    """Starts ``kernelflow worker`` with ``env`` (on top of a clean PATH/HOME), collects its stderr
    lines as they come, and stops it with SIGTERM."""

    def __init__(self, env: Mapping[str, str], *, cwd: Path, args: tuple[str, ...] = ()) -> None:
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        self.env = {**base, "KERNELFLOW_LOG_FORMAT": "json", **env}
        self.cwd = cwd
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.process: subprocess.Popen[str] | None = None
        self.eof = False
        """Whether every line the process wrote has been read."""

    def start(self) -> WorkerProcess:
        self.process = subprocess.Popen(
            [kernelflow_binary(), "worker", *self.args],
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def records(self) -> list[dict[str, Any]]:
        """The lines that parse as JSON objects."""
        found = []
        for line in list(self.lines):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                found.append(value)
        return found

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], *, within: float = 30) -> dict[str, Any]:
        """The first JSON record matching ``predicate``; fails with the output if none comes in time
        or the process ends first."""
        deadline = time.monotonic() + within
        with self._cond:
            while True:
                for record in self.records():
                    if predicate(record):
                        return record
                exited = self.eof  # the process closed stderr: every line is in, none will come
                left = deadline - time.monotonic()
                if left <= 0 or exited:
                    raise AssertionError(
                        ("worker exited" if exited else "timed out") + ":\n" + "\n".join(self.lines[-40:])
                    )
                self._cond.wait(timeout=min(left, 0.5))

    def wait_started(self, within: float = 30) -> dict[str, Any]:
        return self.wait_for(lambda r: r.get("event") == "worker started", within=within)

    def stop(self, sig: int = signal.SIGTERM, within: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
