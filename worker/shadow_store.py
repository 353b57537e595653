"""The shadow store: pairs of answers kept outside pipelines' histories.

``open_store("sqlite:///path/shadow.db")`` (the default, a file under ``.state/``) or a plain path opens
SQLite; ``open_store("postgresql://user:password@host:5432/db")`` opens PostgreSQL (psycopg 3), for
workers on several hosts writing to one store. Each pair is one row: the columns a query filters on in the clear (pipeline, step, models,
time, tenant), the whole pair as JSON in ``body``, sealed by a ``Sealer`` when encryption is on (prompts
and answers are never stored in the clear then).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from kernel.errors import ConfigurationError
from kernel.shadow import PairSource, ShadowPair, ShadowStore

__all__ = ["DEFAULT_STORE", "PostgresShadowStore", "Sealer", "SqliteShadowStore", "open_store"]

DEFAULT_STORE = "sqlite:///.state/shadow.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS shadow_pairs (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    recorded_at TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    step_id TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    tenant TEXT,
    primary_model TEXT NOT NULL,
    candidate_model TEXT NOT NULL,
    sealed INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS shadow_pairs_by_step ON shadow_pairs (pipeline, step_id, recorded_at);
CREATE INDEX IF NOT EXISTS shadow_pairs_by_time ON shadow_pairs (recorded_at);
"""


class Sealer(Protocol):
    """Encrypts a pair's body at rest (the worker's key ring); ``unseal`` reverses ``seal``."""

    def seal(self, data: bytes) -> bytes: ...

    def unseal(self, data: bytes) -> bytes: ...


def _utc(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class _SqlShadowStore:
    """What both stores share: a pair's row, the query for a filter, reading a row back. Subclasses
    give the placeholder, how a time is stored and where the store is (for messages)."""

    _mark = "?"
    _sealer: Sealer | None

    def _where(self) -> str:
        raise NotImplementedError

    def _time(self, moment: datetime) -> object:
        raise NotImplementedError

    def _rows(self, pairs: Iterable[ShadowPair]) -> list[tuple[object, ...]]:
        rows: list[tuple[object, ...]] = []
        for pair in pairs:
            body = pair.model_dump_json().encode()
            if self._sealer is not None:
                body = self._sealer.seal(body)
            rows.append(
                (
                    pair.id,
                    pair.source,
                    self._time(pair.recorded_at),
                    pair.pipeline,
                    pair.step_id,
                    pair.workflow_id,
                    pair.tenant,
                    pair.primary.model,
                    pair.candidate.model,
                    self._sealer is not None,
                    body,
                )
            )
        return rows

    def _insert(self) -> str:
        return f"INSERT INTO shadow_pairs VALUES ({', '.join([self._mark] * 11)})"

    def _select(
        self,
        pipeline: str | None,
        step_id: str | None,
        candidate: str | None,
        source: PairSource | None,
        since: datetime | None,
        limit: int | None,
    ) -> tuple[str, list[object]]:
        where: list[str] = []
        args: list[object] = []
        for column, value in (
            ("pipeline", pipeline),
            ("step_id", step_id),
            ("candidate_model", candidate),
            ("source", source),
        ):
            if value is not None:
                where.append(f"{column} = {self._mark}")
                args.append(value)
        if since is not None:
            where.append(f"recorded_at >= {self._mark}")
            args.append(self._time(since))
        query = "SELECT sealed, body FROM shadow_pairs"
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY recorded_at, id"
        if limit is not None:
            query += f" LIMIT {self._mark}"
            args.append(limit)
        return query, args

    def _read(self, sealed: bool, body: bytes) -> ShadowPair:
        if sealed:
            if self._sealer is None:
                raise ConfigurationError(
                    f"the shadow store {self._where()} holds encrypted pairs: configure the encryption "
                    "keys (KERNELFLOW_ENCRYPTION_KEYS or the config's encryption section) to read them"
                )
            body = self._sealer.unseal(body)
        return ShadowPair.model_validate_json(body)


class SqliteShadowStore(_SqlShadowStore):
    """A ``ShadowStore`` in one SQLite file (WAL mode: a worker writes while a report reads)."""

    def __init__(self, path: str | Path, *, sealer: Sealer | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sealer = sealer
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def _where(self) -> str:
        return str(self.path)

    def _time(self, moment: datetime) -> object:
        return _utc(moment)

    def add(self, pairs: Iterable[ShadowPair]) -> int:
        rows = self._rows(pairs)
        with self._lock, self._db:
            before = self._db.total_changes
            self._db.executemany(self._insert().replace("INSERT", "INSERT OR IGNORE", 1), rows)
            return self._db.total_changes - before

    def pairs(
        self,
        *,
        pipeline: str | None = None,
        step_id: str | None = None,
        candidate: str | None = None,
        source: PairSource | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[ShadowPair]:
        query, args = self._select(pipeline, step_id, candidate, source, since, limit)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [self._read(bool(sealed), body) for sealed, body in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


_PG_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS shadow_pairs (
        id TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        recorded_at TIMESTAMPTZ NOT NULL,
        pipeline TEXT NOT NULL,
        step_id TEXT NOT NULL,
        workflow_id TEXT NOT NULL,
        tenant TEXT,
        primary_model TEXT NOT NULL,
        candidate_model TEXT NOT NULL,
        sealed BOOLEAN NOT NULL,
        body BYTEA NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS shadow_pairs_by_step ON shadow_pairs (pipeline, step_id, recorded_at)",
    "CREATE INDEX IF NOT EXISTS shadow_pairs_by_time ON shadow_pairs (recorded_at)",
)


class PostgresShadowStore(_SqlShadowStore):
    """A ``ShadowStore`` in a PostgreSQL table of the same columns as SQLite's (``recorded_at`` a
    ``timestamptz``, ``body`` a ``bytea``): one connection, used under a lock, opened again once if
    the server dropped it."""

    _mark = "%s"

    def __init__(self, url: str, *, sealer: Sealer | None = None) -> None:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - a runtime dependency
            raise ConfigurationError(
                "the PostgreSQL shadow store needs psycopg 3: pip install 'psycopg[binary]'"
            ) from exc
        self._psycopg = psycopg
        self.url = url
        self._sealer = sealer
        self._lock = threading.Lock()
        self._db = self._connect()
        with self._db.transaction():
            for statement in _PG_SCHEMA:
                self._db.execute(statement)

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except self._psycopg.OperationalError as exc:
            raise ConfigurationError(
                f"cannot connect to the shadow store {_redacted(self.url)}: {exc}"
            ) from exc

    def _run(self, work: Any) -> Any:
        with self._lock:
            try:
                return work(self._db)
            except self._psycopg.OperationalError:
                if not self._db.closed:
                    raise
                self._db = self._connect()
                return work(self._db)

    def _where(self) -> str:
        return _redacted(self.url)

    def _time(self, moment: datetime) -> object:
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)

    def add(self, pairs: Iterable[ShadowPair]) -> int:
        rows = self._rows(pairs)
        statement = self._insert() + " ON CONFLICT (id) DO NOTHING"

        def insert(db: Any) -> int:
            added = 0
            with db.transaction(), db.cursor() as cursor:
                for row in rows:
                    cursor.execute(statement, row)
                    added += cursor.rowcount
            return added

        return int(self._run(insert))

    def pairs(
        self,
        *,
        pipeline: str | None = None,
        step_id: str | None = None,
        candidate: str | None = None,
        source: PairSource | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[ShadowPair]:
        query, args = self._select(pipeline, step_id, candidate, source, since, limit)
        rows = self._run(lambda db: db.execute(query, args).fetchall())
        return [self._read(bool(sealed), bytes(body)) for sealed, body in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _redacted(url: str) -> str:
    """``url`` without its password."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"


def open_store(url: str | None = None, *, sealer: Sealer | None = None) -> ShadowStore:
    """Open the store a URL names: ``sqlite:///relative/or/absolute/path.db``, a plain file path, or
    ``postgresql://user:password@host:port/database`` (also ``postgres://``)."""
    url = url or DEFAULT_STORE
    if url.startswith("sqlite:///"):
        return SqliteShadowStore(url.removeprefix("sqlite:///"), sealer=sealer)
    if "://" not in url:
        return SqliteShadowStore(url, sealer=sealer)
    scheme = url.split("://", 1)[0]
    if scheme in ("postgresql", "postgres"):
        return PostgresShadowStore(url, sealer=sealer)
    raise ConfigurationError(
        f"unknown shadow store {scheme!r} in {_redacted(url)!r}: use sqlite:///path/to/shadow.db, a file path, "
        "or postgresql://user:password@host:5432/database"
    )
