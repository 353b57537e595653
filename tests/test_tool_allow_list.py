"""The tool allow-list against a real server that decodes and normalises paths (the standard library's
file server): what the check reads is what is sent, so no encoding walks around it."""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from kernel.pipeline import parse_pipeline
from kernel.registry import Registry
from worker.app import build_worker
from worker.client import start_pipeline


class _Files(SimpleHTTPRequestHandler):
    requested: list[str] = []

    def do_GET(self) -> None:
        _Files.requested.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def files(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "public").mkdir()
    (tmp_path / "public" / "hello.txt").write_text("hello")
    (tmp_path / "secret.txt").write_text("TOP-SECRET")
    handler = functools.partial(_Files, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    _Files.requested = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_server_itself_normalises_encoded_dot_segments(files: str) -> None:
    """Without this the test below would prove nothing: the server does serve the secret."""
    import httpx

    assert httpx.get(files + "/public/%2e%2e/secret.txt").text == "TOP-SECRET"


def _tool(url: str) -> dict[str, Any]:
    return {
        "name": "fetch",
        "inputs": {"path": {"type": "string"}},
        "steps": [{"id": "get", "type": "tool", "url": url}],
    }


@pytest.mark.parametrize(
    ("url", "path", "says"),
    [
        ("{base}/public/%2e%2e/secret.txt", "", "encoded dot segment"),
        ("{base}/public/%2E%2e/secret.txt", "", "encoded dot segment"),
        ("{base}/public/{{{{ inputs.path }}}}", "%2e%2e/secret.txt", "encoded dot segment"),
        ("{base}/public/..%2Fsecret.txt", "", "encoded slash"),
        ("{base}/public/../secret.txt", "", "not on the worker's tool allow-list"),
    ],
)
async def test_paths_that_leave_the_allowed_prefix_are_refused_before_sending(
    client: Client, registry: Registry, files: str, url: str, path: str, says: str
) -> None:
    queue = f"tool-{uuid.uuid4().hex[:8]}"
    spec = parse_pipeline(_tool(url.format(base=files)))
    async with build_worker(client, task_queue=queue, registry=registry, tool_allow=[files + "/public/"]):
        handle = await start_pipeline(client, spec, {"path": path}, task_queue=queue)
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        ok = await start_pipeline(
            client, parse_pipeline(_tool(files + "/public/%68ello.txt")), {"path": ""}, task_queue=queue
        )
        result = await ok.result()
    cause = failure.value.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type in ("ToolRequestInvalid", "ToolNotAllowed")
    assert says in cause.message
    assert result.steps[0].output == "hello"  # an allowed path (percent-encoded letters are fine) works
    assert all("secret" not in p and "%2" not in p.lower() for p in _Files.requested)
