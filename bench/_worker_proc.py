"""A worker in its own process, for measuring its memory:
`python -m bench._worker_proc TARGET QUEUE PAYLOAD_DIR`.

Serves the pipeline engine and the baseline workflows with the composition a production worker uses
(``worker.app.connect`` / ``build_worker``). Prints ``ready <pid>`` once polling, then runs until its
stdin closes.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from bench._workflows import BenchMinimalWorkflow, BenchWaitingWorkflow
from worker.app import build_registry, build_worker, connect
from worker.config import PayloadSettings

__all__ = ["main"]


async def _serve(target: str, queue: str, payload_dir: str) -> None:
    client = await connect(target, payloads=PayloadSettings(dir=Path(payload_dir)))
    registry = build_registry()
    worker = build_worker(
        client,
        task_queue=queue,
        registry=registry,
        extra_workflows=[BenchMinimalWorkflow, BenchWaitingWorkflow],
    )
    loop = asyncio.get_running_loop()
    async with worker:
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
    await registry.aclose()


def main() -> None:
    from bench.__main__ import _quiet_worker_logs

    _quiet_worker_logs()
    asyncio.run(_serve(sys.argv[1], sys.argv[2], sys.argv[3]))


if __name__ == "__main__":
    main()
