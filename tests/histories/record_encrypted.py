"""Record encrypted histories for ``tests/test_encryption.py``: the example pipelines run with encryption
and compression on, under the test-only key ring ``tests/histories/encrypted/default.keys``.

    .venv/bin/python tests/histories/record_encrypted.py             # every recording
    .venv/bin/python tests/histories/record_encrypted.py ticket-triage

They pin the encrypted format: a later change to the codec must still read them. The key ring exists
for these recordings only and protects nothing.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

HERE = Path(__file__).resolve().parent
OUT = HERE / "encrypted"
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from record import RECORDINGS, record  # noqa: E402

from simulator.server import SimulatorServer  # noqa: E402
from worker.app import connect  # noqa: E402
from worker.config import CompressionSettings, EncryptionSettings, PayloadSettings  # noqa: E402
from worker.search_attributes import ensure_search_attributes  # noqa: E402


def settings(payloads_dir: Path) -> PayloadSettings:
    """What the recordings were written with (and what replays them)."""
    return PayloadSettings(
        dir=payloads_dir,
        encryption=EncryptionSettings(
            enabled=True, provider="file", options={"dir": str(OUT)}, allow_plaintext=False
        ),
        compression=CompressionSettings(enabled=True, min_bytes=256),
    )


async def main(names: list[str]) -> None:
    chosen = [r for r in RECORDINGS if not names or r.name in names]
    temporal = shutil.which("temporal") or str(Path(sys.executable).parent / "temporal")
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal, dev_server_extra_args=["--log-level", "error"]
    ) as env:
        target = env.client.service_client.config.target_host
        with tempfile.TemporaryDirectory() as store:
            client = await connect(target, payloads=settings(Path(store)))
            await ensure_search_attributes(client, "default")
            with SimulatorServer() as sim:
                for recording in chosen:
                    print(f"recorded {await record(recording, client, sim, OUT)}")


if __name__ == "__main__":
    import os

    asyncio.run(main(sys.argv[1:]))
    sys.stdout.flush()
    os._exit(0)
