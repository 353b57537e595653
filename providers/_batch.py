"""What the batch wires share: reading a batch job's body, and a GET of a JSON document."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kernel.errors import MalformedResponse
from providers._http import HttpProvider, WireShapeError

__all__ = ["get_json", "reading_batch_job"]


@contextmanager
def reading_batch_job(provider: str) -> Iterator[None]:
    """Read a vendor's batch job body inside: a body of another shape is the vendor's malformed answer."""
    try:
        yield
    except (KeyError, TypeError, ValueError, WireShapeError) as exc:
        raise MalformedResponse(
            f"{provider} answered a batch request with an unexpected body: {exc}", provider=provider
        ) from exc


async def get_json(provider: HttpProvider, path: str) -> Any:
    """GET ``path`` on the provider's API with its credentials; the answer's JSON."""
    request = provider.client.build_request("GET", provider._url(path), headers=provider._auth_headers())
    return provider._json_body(await provider._send(request, model=None), None)
