"""Standard Webhooks signatures (https://www.standardwebhooks.com): HMAC-SHA256 over
``<webhook-id>.<webhook-timestamp>.<body>`` with a ``whsec_<base64>`` secret, sent as
``webhook-signature: v1,<base64>`` (several, space-separated, during a key rotation). The receiver
refuses timestamps outside a tolerance, so a captured request cannot be replayed later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

from kernel.errors import KernelflowError

__all__ = ["SignatureInvalid", "decode_secret", "sign", "signature_headers", "verify"]


class SignatureInvalid(KernelflowError):
    """The request's Standard Webhooks signature is missing, wrong or too old/new."""


def decode_secret(secret: str) -> bytes:
    raw = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except ValueError as exc:
        raise SignatureInvalid("the webhook secret is not whsec_ followed by base64") from exc
    if not key:
        raise SignatureInvalid("the webhook secret is empty")
    return key


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` signature of ``body``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(decode_secret(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_headers(
    secret: str, message_id: str, body: bytes, *, now: float | None = None
) -> dict[str, str]:
    timestamp = int(time.time() if now is None else now)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
    }


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_s: int = 300, now: float | None = None
) -> str:
    """Check the signature; returns the ``webhook-id``. Raises ``SignatureInvalid`` saying why."""
    lowered = {k.lower(): v for k, v in headers.items()}
    message_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (message_id and stamp and signatures):
        raise SignatureInvalid("webhook-id, webhook-timestamp and webhook-signature headers are required")
    try:
        timestamp = int(stamp)
    except ValueError as exc:
        raise SignatureInvalid(f"webhook-timestamp {stamp!r} is not Unix seconds") from exc
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise SignatureInvalid(f"webhook-timestamp is more than {tolerance_s}s away from now")
    expected = sign(secret, message_id, timestamp, body).encode()
    for candidate in signatures.split():
        if hmac.compare_digest(candidate.encode(), expected):
            return message_id
    raise SignatureInvalid("no webhook-signature matches the body")
