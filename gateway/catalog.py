"""The catalog: tenants, registered sources, and which source owns each folder and document.

Ownership is exclusive and enforced here, where it cannot race: a folder id and a
document id belong to at most one source of their tenant (primary keys), and an
ingestion claims every name it will write in one transaction before anything else is
written (:meth:`SourceCatalog.claim`). The same transaction takes a short lease on each
document, so two requests never rewrite one document at the same time; leases expire,
so a crashed request blocks nobody for long.

A document row is *complete* once its fingerprint is set: only then did its chunks and
tuples land. A row without one is a claim (a new document, or an update that failed
half-way) and a rerun of the same ingestion repairs it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import Conflict, SourceUnavailable

T = TypeVar("T")

SCHEMA_VERSION = 2
LEASE_S = 120.0

_V1 = """
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

_V2 = """
ALTER TABLE sources ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
ALTER TABLE documents ADD COLUMN fingerprint TEXT;
ALTER TABLE documents ADD COLUMN folder TEXT;
ALTER TABLE documents ADD COLUMN acl TEXT;
ALTER TABLE documents ADD COLUMN lease_owner TEXT;
ALTER TABLE documents ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
UPDATE documents SET fingerprint = 'v1' WHERE chunks > 0;
CREATE INDEX IF NOT EXISTS documents_source ON documents (tenant, source);
CREATE TABLE IF NOT EXISTS folders (
  tenant TEXT NOT NULL,
  id TEXT NOT NULL,
  source TEXT,
  created_at REAL NOT NULL,
  PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS folder_links (
  tenant TEXT NOT NULL,
  parent TEXT NOT NULL,
  child TEXT NOT NULL,
  PRIMARY KEY (tenant, parent, child)
);
CREATE INDEX IF NOT EXISTS folders_source ON folders (tenant, source);
CREATE TABLE IF NOT EXISTS tenants (
  id TEXT PRIMARY KEY,
  created_at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class SourceInfo:
    tenant: str
    id: str
    kind: str
    config: dict[str, Any]
    created_at: float
    state: str = "active"


@dataclass(frozen=True, slots=True)
class DocumentEntry:
    """What the catalog knows of one document; ``fingerprint`` is None until complete."""

    id: str
    source: str
    chunks: int
    fingerprint: str | None
    folder: str | None


@dataclass(frozen=True, slots=True)
class Claim:
    """Names an ingestion holds: ``lease`` releases the documents' leases."""

    tenant: str
    source: str
    lease: str
    documents: dict[str, DocumentEntry]


class SourceCatalog:
    """Tenants, sources, folder and document ownership (SQLite, shared by processes)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._lock = asyncio.Lock()
        self._migrate()

    def _migrate(self) -> None:
        """Bring the schema to :data:`SCHEMA_VERSION`, one version per transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            for target, script in ((1, _V1), (2, _V2)):
                if version < target:
                    for statement in filter(str.strip, script.split(";")):
                        self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            try:
                return await asyncio.to_thread(work, self._db)
            except sqlite3.IntegrityError as exc:
                raise Conflict("already exists") from exc
            except sqlite3.Error as exc:
                raise SourceUnavailable("source catalog unavailable", detail=str(exc)) from exc

    async def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return await self._call(lambda db: db.execute(sql, params).fetchall())

    async def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work`` inside BEGIN IMMEDIATE: the write lock is held from the first read."""

        def run(db: sqlite3.Connection) -> T:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

        return await self._call(run)

    # -- tenants -----------------------------------------------------------------------

    async def add_tenant(self, tenant: str) -> None:
        """Record a new tenant; Conflict if it exists."""
        await self._run("INSERT INTO tenants VALUES (?, ?)", (tenant, time.time()))

    # -- sources -----------------------------------------------------------------------

    async def add_source(
        self, tenant: str, source_id: str, kind: str, config: dict[str, Any]
    ) -> SourceInfo:
        now = time.time()
        await self._run(
            "INSERT INTO sources (tenant, id, kind, config, created_at) VALUES (?, ?, ?, ?, ?)",
            (tenant, source_id, kind, json.dumps(config, sort_keys=True), now),
        )
        return SourceInfo(tenant, source_id, kind, config, now)

    async def get_source(self, tenant: str, source_id: str) -> SourceInfo | None:
        """The source, also while it is being removed (``state`` says so)."""
        rows = await self._run(
            "SELECT tenant, id, kind, config, created_at, state FROM sources "
            "WHERE tenant=? AND id=?",
            (tenant, source_id),
        )
        return _source(rows[0]) if rows else None

    async def list_sources(self, tenant: str) -> list[SourceInfo]:
        """Active sources only: a source being removed serves nothing."""
        rows = await self._run(
            "SELECT tenant, id, kind, config, created_at, state FROM sources "
            "WHERE tenant=? AND state='active' ORDER BY id",
            (tenant,),
        )
        return [_source(r) for r in rows]

    async def mark_removing(self, tenant: str, source_id: str) -> None:
        await self._run(
            "UPDATE sources SET state='removing' WHERE tenant=? AND id=?", (tenant, source_id)
        )

    async def source_contents(self, tenant: str, source_id: str) -> tuple[list[str], list[str]]:
        """Ids of the documents and folders the source owns."""

        def read(db: sqlite3.Connection) -> tuple[list[str], list[str]]:
            docs = db.execute(
                "SELECT id FROM documents WHERE tenant=? AND source=? ORDER BY id",
                (tenant, source_id),
            ).fetchall()
            folders = db.execute(
                "SELECT id FROM folders WHERE tenant=? AND source=? ORDER BY id",
                (tenant, source_id),
            ).fetchall()
            return [str(r[0]) for r in docs], [str(r[0]) for r in folders]

        return await self._call(read)

    async def forget_source(self, tenant: str, source_id: str) -> None:
        """Drop the source and every ownership claim it held (its names become free)."""

        def forget(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM documents WHERE tenant=? AND source=?", (tenant, source_id))
            db.execute(
                "DELETE FROM folder_links WHERE tenant=? AND (parent IN (SELECT id FROM folders "
                "WHERE tenant=? AND source=?) OR child IN (SELECT id FROM folders "
                "WHERE tenant=? AND source=?))",
                (tenant, tenant, source_id, tenant, source_id),
            )
            db.execute("DELETE FROM folders WHERE tenant=? AND source=?", (tenant, source_id))
            db.execute("DELETE FROM sources WHERE tenant=? AND id=?", (tenant, source_id))

        await self._transaction(forget)

    # -- ownership ---------------------------------------------------------------------

    async def claim(
        self,
        tenant: str,
        source: str,
        folders: Sequence[str],
        documents: Sequence[str],
        *,
        lease: bool = True,
    ) -> Claim:
        """Claim ``folders`` and ``documents`` for ``source``, all or nothing.

        Raises Conflict, having written nothing, when a name belongs to another source,
        the source is not active, or (with ``lease``) another request holds a document.
        """
        token = uuid.uuid4().hex

        def claim(db: sqlite3.Connection) -> Claim:
            now = time.time()
            _require_active(db, tenant, source)
            for folder in dict.fromkeys(folders):
                _own_folders(db, tenant, folder, source)
            entries: dict[str, DocumentEntry] = {}
            for doc in dict.fromkeys(documents):
                db.execute(
                    "INSERT INTO documents (tenant, source, id, chunks, updated_at) "
                    "VALUES (?, ?, ?, 0, ?) ON CONFLICT DO NOTHING",
                    (tenant, source, doc, now),
                )
                row = db.execute(
                    "SELECT source, chunks, fingerprint, folder, lease_owner, lease_until "
                    "FROM documents WHERE tenant=? AND id=?",
                    (tenant, doc),
                ).fetchone()
                if row[0] != source:
                    raise Conflict(f"document {doc} belongs to another source")
                if lease and row[4] is not None and row[5] > now:
                    raise Conflict(f"document {doc} is being updated by another request")
                entries[doc] = DocumentEntry(doc, source, int(row[1]), row[2], row[3])
                if lease:
                    db.execute(
                        "UPDATE documents SET lease_owner=?, lease_until=? WHERE tenant=? AND id=?",
                        (token, now + LEASE_S, tenant, doc),
                    )
            return Claim(tenant, source, token, entries)

        return await self._transaction(claim)

    async def link(self, tenant: str, parent: str, child: str) -> None:
        """Record an admin ``parent`` link (``type:id`` both); Conflict across sources.

        Folders linked to each other form one tree, owned by one source: linking two
        owned by different sources, or a document under a folder of another source, is
        refused. Links between names no source owns yet are kept, so that the first
        source to claim any of them claims the whole tree.
        """
        parent_type, _, parent_id = parent.partition(":")
        child_type, _, child_id = child.partition(":")

        def link(db: sqlite3.Connection) -> None:
            if parent_type == "source":
                owner: str | None = parent_id
                _require_active(db, tenant, parent_id)
            else:
                _ensure_folder(db, tenant, parent_id)
                owner = _tree_owner(db, tenant, parent_id)
            if child_type == "folder":
                _ensure_folder(db, tenant, child_id)
                if parent_type == "folder":
                    others = {owner, _tree_owner(db, tenant, child_id)} - {None}
                    if len(others) > 1:
                        raise Conflict(f"folder {child_id} belongs to another source")
                    db.execute(
                        "INSERT INTO folder_links VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                        (tenant, parent_id, child_id),
                    )
                    owner = others.pop() if others else None
                if owner is not None:
                    _own_folders(db, tenant, child_id, owner)
                return
            row = db.execute(
                "SELECT source FROM documents WHERE tenant=? AND id=?", (tenant, child_id)
            ).fetchone()
            if row is not None and owner is not None and row[0] != owner:
                raise Conflict(f"document {child_id} belongs to another source")
            if row is not None and owner is None:
                _own_folders(db, tenant, parent_id, str(row[0]))
            elif row is None and owner is not None:
                db.execute(
                    "INSERT INTO documents (tenant, source, id, chunks, updated_at) "
                    "VALUES (?, ?, ?, 0, ?)",
                    (tenant, owner, child_id, time.time()),
                )

        await self._transaction(link)

    async def unlink(self, tenant: str, parent: str, child: str) -> None:
        await self._run(
            "DELETE FROM folder_links WHERE tenant=? AND parent=? AND child=?",
            (tenant, parent.partition(":")[2], child.partition(":")[2]),
        )

    async def release(self, claim: Claim) -> None:
        await self._run(
            "UPDATE documents SET lease_owner=NULL, lease_until=0 WHERE tenant=? AND lease_owner=?",
            (claim.tenant, claim.lease),
        )

    async def folder_source(self, tenant: str, folder: str) -> str | None:
        rows = await self._run(
            "SELECT source FROM folders WHERE tenant=? AND id=?", (tenant, folder)
        )
        return str(rows[0][0]) if rows else None

    # -- documents ---------------------------------------------------------------------

    async def start_update(self, tenant: str, document_id: str) -> None:
        """Mark a document incomplete: a failure from here on is repaired by a rerun."""
        await self._run(
            "UPDATE documents SET fingerprint=NULL WHERE tenant=? AND id=?", (tenant, document_id)
        )

    async def complete_document(
        self,
        tenant: str,
        document_id: str,
        *,
        chunks: int,
        fingerprint: str,
        folder: str | None,
        acl: dict[str, Any],
    ) -> None:
        await self._run(
            "UPDATE documents SET chunks=?, fingerprint=?, folder=?, acl=?, updated_at=? "
            "WHERE tenant=? AND id=?",
            (
                chunks,
                fingerprint,
                folder,
                json.dumps(acl, sort_keys=True),
                time.time(),
                tenant,
                document_id,
            ),
        )

    async def document(self, tenant: str, document_id: str) -> DocumentEntry | None:
        rows = await self._run(
            "SELECT id, source, chunks, fingerprint, folder FROM documents WHERE tenant=? AND id=?",
            (tenant, document_id),
        )
        if not rows:
            return None
        r = rows[0]
        return DocumentEntry(str(r[0]), str(r[1]), int(r[2]), r[3], r[4])

    async def document_source(self, tenant: str, document_id: str) -> str | None:
        entry = await self.document(tenant, document_id)
        return entry.source if entry is not None else None

    async def forget_document(self, tenant: str, document_id: str) -> None:
        await self._run("DELETE FROM documents WHERE tenant=? AND id=?", (tenant, document_id))

    async def document_count(self, tenant: str, source: str | None = None) -> int:
        """Complete documents (of one source, or of the tenant)."""
        if source is None:
            rows = await self._run(
                "SELECT COUNT(*) FROM documents WHERE tenant=? AND fingerprint IS NOT NULL",
                (tenant,),
            )
        else:
            rows = await self._run(
                "SELECT COUNT(*) FROM documents WHERE tenant=? AND source=? "
                "AND fingerprint IS NOT NULL",
                (tenant, source),
            )
        return int(rows[0][0])

    def close(self) -> None:
        self._db.close()


def _source(row: tuple[Any, ...]) -> SourceInfo:
    return SourceInfo(row[0], row[1], row[2], json.loads(row[3]), float(row[4]), row[5])


def _require_active(db: sqlite3.Connection, tenant: str, source: str) -> None:
    state = db.execute(
        "SELECT state FROM sources WHERE tenant=? AND id=?", (tenant, source)
    ).fetchone()
    if state is None or state[0] != "active":
        raise Conflict(f"source {source} is not active")


def _ensure_folder(db: sqlite3.Connection, tenant: str, folder: str) -> None:
    db.execute(
        "INSERT INTO folders VALUES (?, ?, NULL, ?) ON CONFLICT DO NOTHING",
        (tenant, folder, time.time()),
    )


_TREE = """
WITH RECURSIVE tree(id) AS (
  SELECT ?
  UNION
  SELECT CASE WHEN l.parent = tree.id THEN l.child ELSE l.parent END
  FROM folder_links l JOIN tree ON l.parent = tree.id OR l.child = tree.id
  WHERE l.tenant = ?
)
SELECT f.id, f.source FROM tree JOIN folders f ON f.tenant = ? AND f.id = tree.id
"""


def _tree(db: sqlite3.Connection, tenant: str, folder: str) -> list[tuple[str, str | None]]:
    """The folders linked to ``folder`` (itself included), with their owners."""
    return [(str(r[0]), r[1]) for r in db.execute(_TREE, (folder, tenant, tenant)).fetchall()]


def _tree_owner(db: sqlite3.Connection, tenant: str, folder: str) -> str | None:
    owners = {owner for _, owner in _tree(db, tenant, folder)} - {None}
    return owners.pop() if len(owners) == 1 else None


def _own_folders(db: sqlite3.Connection, tenant: str, folder: str, source: str) -> None:
    """Claim ``folder`` and every folder linked to it for ``source``, or raise Conflict."""
    _ensure_folder(db, tenant, folder)
    tree = _tree(db, tenant, folder)
    if any(owner not in (None, source) for _, owner in tree):
        raise Conflict(f"folder {folder} belongs to another source")
    db.executemany(
        "UPDATE folders SET source=? WHERE tenant=? AND id=?",
        [(source, tenant, f) for f, owner in tree if owner is None],
    )
