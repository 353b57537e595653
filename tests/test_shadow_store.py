"""The shadow store keeps pairs once, filters them, and never holds sealed pairs in the clear."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kernel.errors import ConfigurationError
from kernel.shadow import ShadowPair, ShadowSide, request_digest
from worker.shadow_store import SqliteShadowStore, open_store


def _pair(n: int, *, step: str = "triage", at: datetime | None = None) -> ShadowPair:
    request = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"ticket {n} secret-prompt"}]}
    return ShadowPair(
        id=f"wf-{n}/run/{step}",
        source="shadow",
        recorded_at=at or datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=n),
        pipeline="support",
        step_id=step,
        workflow_id=f"wf-{n}",
        request_digest=request_digest(request),
        request=request,
        primary=ShadowSide(model="openai/gpt-4o-mini", output="refund", cost_usd=0.001, latency_ms=80),
        candidate=ShadowSide(model="anthropic/claude-sonnet-4-5", error_type="RateLimited", error="429"),
    )


class _Xor:
    def seal(self, data: bytes) -> bytes:
        return bytes(b ^ 0x5A for b in data)

    def unseal(self, data: bytes) -> bytes:
        return bytes(b ^ 0x5A for b in data)


def test_pairs_are_stored_once_and_filtered(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/shadow.db")
    assert store.add([_pair(1), _pair(2), _pair(3, step="reply")]) == 3
    assert store.add([_pair(1)]) == 0
    assert [p.workflow_id for p in store.pairs()] == ["wf-1", "wf-2", "wf-3"]
    assert [p.workflow_id for p in store.pairs(step_id="triage")] == ["wf-1", "wf-2"]
    since = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=2)
    assert [p.workflow_id for p in store.pairs(since=since)] == ["wf-2", "wf-3"]
    assert store.pairs(candidate="openai/gpt-4.1") == []
    (first,) = store.pairs(limit=1)
    assert first == _pair(1) and not first.candidate.ok
    store.close()


def test_sealed_pairs_never_hold_the_prompt_in_the_clear(tmp_path: Path) -> None:
    path = tmp_path / "shadow.db"
    store = SqliteShadowStore(path, sealer=_Xor())
    store.add([_pair(1)])
    assert store.pairs()[0].request == _pair(1).request
    files = [path, tmp_path / "shadow.db-wal"]
    assert b"secret-prompt" not in b"".join(f.read_bytes() for f in files if f.exists())
    store.close()
    assert b"secret-prompt" not in path.read_bytes()
    plain = SqliteShadowStore(tmp_path / "plain.db")
    plain.add([_pair(1)])
    plain.close()
    assert b"secret-prompt" in (tmp_path / "plain.db").read_bytes()  # the check above can fail
    with pytest.raises(ConfigurationError, match="holds encrypted pairs"):
        SqliteShadowStore(path).pairs()


def test_the_digest_ignores_the_model() -> None:
    a = {"model": "a", "messages": [{"role": "user", "content": "x"}]}
    assert request_digest(a) == request_digest({**a, "model": "b"})
    assert request_digest(a) != request_digest({**a, "temperature": 0})


def test_an_unknown_store_names_what_is_allowed() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown shadow store 'redis'.*sqlite:///"):
        open_store("redis://localhost/0")
