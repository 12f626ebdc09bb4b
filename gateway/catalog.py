"""The source catalog: which sources each tenant registered, and their config.

Small and rarely written, so it lives in SQLite in the data directory (PostgreSQL
shares the audit DSN in the scaled-out shape only if configured later).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import Conflict, SourceUnavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
  tenant TEXT NOT NULL,
  id TEXT NOT NULL,
  kind TEXT NOT NULL,
  config TEXT NOT NULL,
  created_at REAL NOT NULL,
  PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS documents (
  tenant TEXT NOT NULL,
  source TEXT NOT NULL,
  id TEXT NOT NULL,
  chunks INTEGER NOT NULL,
  updated_at REAL NOT NULL,
  PRIMARY KEY (tenant, id)
);
"""


@dataclass(frozen=True, slots=True)
class SourceInfo:
    tenant: str
    id: str
    kind: str
    config: dict[str, Any]
    created_at: float


class SourceCatalog:
    """Registered sources and the documents ingested into each."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._lock = asyncio.Lock()

    async def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        async with self._lock:
            try:
                return await asyncio.to_thread(lambda: self._db.execute(sql, params).fetchall())
            except sqlite3.IntegrityError as exc:
                raise Conflict("already exists") from exc
            except sqlite3.Error as exc:
                raise SourceUnavailable(f"source catalog unavailable: {exc}") from exc

    async def add_source(
        self, tenant: str, source_id: str, kind: str, config: dict[str, Any]
    ) -> SourceInfo:
        now = time.time()
        await self._run(
            "INSERT INTO sources VALUES (?, ?, ?, ?, ?)",
            (tenant, source_id, kind, json.dumps(config, sort_keys=True), now),
        )
        return SourceInfo(tenant, source_id, kind, config, now)

    async def get_source(self, tenant: str, source_id: str) -> SourceInfo | None:
        rows = await self._run(
            "SELECT tenant, id, kind, config, created_at FROM sources WHERE tenant=? AND id=?",
            (tenant, source_id),
        )
        return _source(rows[0]) if rows else None

    async def list_sources(self, tenant: str) -> list[SourceInfo]:
        rows = await self._run(
            "SELECT tenant, id, kind, config, created_at FROM sources WHERE tenant=? ORDER BY id",
            (tenant,),
        )
        return [_source(r) for r in rows]

    async def record_document(
        self, tenant: str, source: str, document_id: str, chunks: int
    ) -> None:
        await self._run(
            "INSERT INTO documents VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, id) DO UPDATE SET "
            "source=excluded.source, chunks=excluded.chunks, updated_at=excluded.updated_at",
            (tenant, source, document_id, chunks, time.time()),
        )

    async def document_source(self, tenant: str, document_id: str) -> str | None:
        rows = await self._run(
            "SELECT source FROM documents WHERE tenant=? AND id=?", (tenant, document_id)
        )
        return str(rows[0][0]) if rows else None

    async def forget_document(self, tenant: str, document_id: str) -> None:
        await self._run("DELETE FROM documents WHERE tenant=? AND id=?", (tenant, document_id))

    async def document_count(self, tenant: str, source: str | None = None) -> int:
        if source is None:
            rows = await self._run("SELECT COUNT(*) FROM documents WHERE tenant=?", (tenant,))
        else:
            rows = await self._run(
                "SELECT COUNT(*) FROM documents WHERE tenant=? AND source=?", (tenant, source)
            )
        return int(rows[0][0])

    def close(self) -> None:
        self._db.close()


def _source(row: tuple[Any, ...]) -> SourceInfo:
    return SourceInfo(row[0], row[1], row[2], json.loads(row[3]), float(row[4]))
