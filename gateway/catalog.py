"""The catalog: tenants, registered sources, and which source owns each folder and document.

Ownership is exclusive and enforced here, where it cannot race: a folder id and a
document id belong to at most one source of their tenant (primary keys), and an
ingestion claims every name it will write in one transaction before anything else is
written (:meth:`SourceCatalog.claim`). Ownership changes of one tenant take turns (the
SQLite write lock; a per-tenant advisory lock in PostgreSQL), and the same transaction
takes a short lease on each document, so two requests never rewrite one document at the
same time; leases expire, so a crashed request blocks nobody for long.

A document row is *complete* once its fingerprint is set: only then did its chunks and
tuples land. A row without one is a claim (a new document, or an update that failed
half-way) and a rerun of the same ingestion repairs it.

Two backends run the same statements: SQLite in the data directory (the embedded
default; several processes on one machine may share the file) and PostgreSQL
(``SCOPEGATE_CATALOG_DSN``), shared by every replica of a scaled-out deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.rows import TupleRow

from gateway.errors import Conflict, SourceUnavailable

Row = tuple[Any, ...]
LEASE_S = 120.0

# Versioned schema: each entry is applied once, in order, inside one transaction.
_MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE IF NOT EXISTS sources (
  tenant TEXT NOT NULL,
  id TEXT NOT NULL,
  kind TEXT NOT NULL,
  config TEXT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS documents (
  tenant TEXT NOT NULL,
  source TEXT NOT NULL,
  id TEXT NOT NULL,
  chunks INTEGER NOT NULL,
  updated_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (tenant, id)
)
""",
    ),
    (
        2,
        """
ALTER TABLE sources ADD COLUMN state TEXT NOT NULL DEFAULT 'active';
ALTER TABLE documents ADD COLUMN fingerprint TEXT;
ALTER TABLE documents ADD COLUMN folder TEXT;
ALTER TABLE documents ADD COLUMN acl TEXT;
ALTER TABLE documents ADD COLUMN lease_owner TEXT;
ALTER TABLE documents ADD COLUMN lease_until DOUBLE PRECISION NOT NULL DEFAULT 0;
UPDATE documents SET fingerprint = 'v1' WHERE chunks > 0;
CREATE INDEX IF NOT EXISTS documents_source ON documents (tenant, source);
CREATE TABLE IF NOT EXISTS folders (
  tenant TEXT NOT NULL,
  id TEXT NOT NULL,
  source TEXT,
  created_at DOUBLE PRECISION NOT NULL,
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
  created_at DOUBLE PRECISION NOT NULL
)
""",
    ),
    (
        3,
        """
CREATE TABLE IF NOT EXISTS scim_users (
  tenant TEXT NOT NULL,
  id TEXT NOT NULL,
  user_id TEXT NOT NULL,
  user_name TEXT NOT NULL,
  user_name_key TEXT NOT NULL,
  external_id TEXT,
  active INTEGER NOT NULL,
  attributes TEXT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL,
  updated_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (tenant, id),
  UNIQUE (tenant, user_name_key),
  UNIQUE (tenant, user_id)
);
CREATE INDEX IF NOT EXISTS scim_users_external ON scim_users (tenant, external_id);
CREATE TABLE IF NOT EXISTS scim_groups (
  tenant TEXT NOT NULL,
  id TEXT NOT NULL,
  group_id TEXT NOT NULL,
  display_name TEXT NOT NULL,
  display_key TEXT NOT NULL,
  external_id TEXT,
  attributes TEXT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL,
  updated_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (tenant, id),
  UNIQUE (tenant, group_id)
);
CREATE INDEX IF NOT EXISTS scim_groups_display ON scim_groups (tenant, display_key);
CREATE INDEX IF NOT EXISTS scim_groups_external ON scim_groups (tenant, external_id);
CREATE TABLE IF NOT EXISTS scim_members (
  tenant TEXT NOT NULL,
  group_ref TEXT NOT NULL,
  member TEXT NOT NULL,
  PRIMARY KEY (tenant, group_ref, member)
);
CREATE INDEX IF NOT EXISTS scim_members_member ON scim_members (tenant, member);
CREATE TABLE IF NOT EXISTS scim_secrets (
  id TEXT PRIMARY KEY,
  tenant TEXT NOT NULL,
  digest TEXT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS scim_secrets_tenant ON scim_secrets (tenant);
CREATE TABLE IF NOT EXISTS directories (
  tenant TEXT PRIMARY KEY,
  source TEXT NOT NULL DEFAULT 'none',
  max_silence_s DOUBLE PRECISION,
  declared_at DOUBLE PRECISION,
  heard_at DOUBLE PRECISION
)
""",
    ),
    (
        4,
        """
CREATE TABLE IF NOT EXISTS sync_state (
  tenant TEXT NOT NULL,
  source TEXT NOT NULL,
  source_created DOUBLE PRECISION NOT NULL,
  high_water DOUBLE PRECISION NOT NULL,
  synced_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (tenant, source)
)
""",
    ),
)
SCHEMA_VERSION = _MIGRATIONS[-1][0]


def _statements(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]


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


@dataclass(frozen=True, slots=True)
class ScimUserRecord:
    """A User the tenant's directory provisioned: ``id`` is the SCIM resource id."""

    tenant: str
    id: str
    user_id: str
    user_name: str
    external_id: str | None
    active: bool
    attributes: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class ScimGroupRecord:
    """A Group the tenant's directory provisioned (members are kept apart)."""

    tenant: str
    id: str
    group_id: str
    display_name: str
    external_id: str | None
    attributes: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class DirectoryState:
    """Whether a tenant's directory is its source of truth, and when it last spoke."""

    tenant: str
    source: str  # "scim" or "none"
    max_silence_s: float | None
    declared_at: float | None
    heard_at: float | None

    def stale(self, now: float) -> bool:
        """Silent past the bound; a directory never heard from counts from its declaration
        (declaring never makes a silent directory fresh: only the directory does)."""
        if self.source != "scim" or self.max_silence_s is None:
            return False
        last = self.heard_at if self.heard_at is not None else self.declared_at
        return now - (last or 0.0) > self.max_silence_s


@dataclass(frozen=True, slots=True)
class RetrievalView:
    """A tenant's directory state and active sources (with document counts), read
    together at the start of a retrieval (:meth:`SourceCatalog.retrieval_view`)."""

    directory: DirectoryState | None
    sources: list[tuple[SourceInfo, int]]


#: How long per-source document counts are reused (selectivity estimates only).
COUNTS_TTL_S = 10.0
COUNTS_MAX_TENANTS = 10_000

_USER_COLUMNS = (
    "tenant, id, user_id, user_name, external_id, active, attributes, created_at, updated_at"
)
_GROUP_COLUMNS = (
    "tenant, id, group_id, display_name, external_id, attributes, created_at, updated_at"
)
#: Filters a SCIM query may use, as columns (the values are bound, never spliced).
_USER_FILTERS = frozenset({"id", "user_name_key", "external_id", "user_id"})
_GROUP_FILTERS = frozenset({"id", "display_key", "external_id", "group_id"})


class SourceCatalog:
    """Tenants, sources, folder and document ownership, on a :class:`CatalogDatabase`."""

    def __init__(self, db: CatalogDatabase) -> None:
        self.db = db
        # tenant -> (monotonic time read, documents per source): see document_counts.
        self._counts: dict[str, tuple[float, dict[str, int]]] = {}

    async def _rows(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return await self.db.execute(sql, params)

    # -- tenants -----------------------------------------------------------------------

    async def add_tenant(self, tenant: str) -> None:
        """Record a new tenant; Conflict if it exists."""
        await self._rows("INSERT INTO tenants VALUES (?, ?)", (tenant, time.time()))

    # -- sources -----------------------------------------------------------------------

    async def add_source(
        self, tenant: str, source_id: str, kind: str, config: dict[str, Any]
    ) -> SourceInfo:
        now = time.time()
        await self._rows(
            "INSERT INTO sources (tenant, id, kind, config, created_at) VALUES (?, ?, ?, ?, ?)",
            (tenant, source_id, kind, json.dumps(config, sort_keys=True), now),
        )
        return SourceInfo(tenant, source_id, kind, config, now)

    async def get_source(self, tenant: str, source_id: str) -> SourceInfo | None:
        """The source, also while it is being removed (``state`` says so)."""
        rows = await self._rows(
            "SELECT tenant, id, kind, config, created_at, state FROM sources "
            "WHERE tenant=? AND id=?",
            (tenant, source_id),
        )
        return _source(rows[0]) if rows else None

    async def list_sources(self, tenant: str) -> list[SourceInfo]:
        """Active sources only: a source being removed serves nothing."""
        rows = await self._rows(
            "SELECT tenant, id, kind, config, created_at, state FROM sources "
            "WHERE tenant=? AND state='active' ORDER BY id",
            (tenant,),
        )
        return [_source(r) for r in rows]

    async def retrieval_view(self, tenant: str) -> RetrievalView:
        """What a retrieval needs before it searches, in one statement: the tenant's
        directory state and its active sources (read fresh every time: a source removed
        or a directory gone stale through another replica counts at once), with
        document counts from :meth:`document_counts`."""
        rows = await self._rows(
            "SELECT s.tenant, s.id, s.kind, s.config, s.created_at, s.state, "
            "d.tenant, d.source, d.max_silence_s, d.declared_at, d.heard_at "
            "FROM (SELECT CAST(? AS TEXT) AS tenant) t "
            "LEFT JOIN sources s ON s.tenant = t.tenant AND s.state = 'active' "
            "LEFT JOIN directories d ON d.tenant = t.tenant ORDER BY s.id",
            (tenant,),
        )
        first = rows[0] if rows else None
        directory = None
        if first is not None and first[6] is not None:
            r = first[6:]
            directory = DirectoryState(
                str(r[0]), str(r[1]), _float(r[2]), _float(r[3]), _float(r[4])
            )
        sources = [_source(r[:6]) for r in rows if r[1] is not None]
        counts = await self.document_counts(tenant) if sources else {}
        return RetrievalView(directory, [(s, counts.get(s.id, 0)) for s in sources])

    async def document_counts(self, tenant: str) -> dict[str, int]:
        """Complete documents per source of ``tenant``, in one grouped query, reused for
        :data:`COUNTS_TTL_S`: the counts only size selectivity estimates (never what
        is searched, checked or released), so a few seconds behind is harmless."""
        now = time.monotonic()
        cached = self._counts.get(tenant)
        if cached is not None and now - cached[0] < COUNTS_TTL_S:
            return cached[1]
        rows = await self._rows(
            "SELECT source, COUNT(*) FROM documents WHERE tenant=? "
            "AND fingerprint IS NOT NULL GROUP BY source",
            (tenant,),
        )
        counts = {str(r[0]): int(r[1]) for r in rows}
        self._counts[tenant] = (now, counts)
        while len(self._counts) > COUNTS_MAX_TENANTS:
            self._counts.pop(next(iter(self._counts)))
        return counts

    async def mark_removing(self, tenant: str, source_id: str) -> None:
        async with self.db.transaction(tenant) as tx:
            await tx.execute(
                "UPDATE sources SET state='removing' WHERE tenant=? AND id=?", (tenant, source_id)
            )

    async def source_contents(self, tenant: str, source_id: str) -> tuple[list[str], list[str]]:
        """Ids of the documents and folders the source owns."""
        async with self.db.transaction() as tx:
            docs = await tx.execute(
                "SELECT id FROM documents WHERE tenant=? AND source=? ORDER BY id",
                (tenant, source_id),
            )
            folders = await tx.execute(
                "SELECT id FROM folders WHERE tenant=? AND source=? ORDER BY id",
                (tenant, source_id),
            )
        return [str(r[0]) for r in docs], [str(r[0]) for r in folders]

    async def forget_source(self, tenant: str, source_id: str) -> None:
        """Drop the source and every ownership claim it held (its names become free)."""
        async with self.db.transaction(tenant) as tx:
            await tx.execute(
                "DELETE FROM documents WHERE tenant=? AND source=?", (tenant, source_id)
            )
            await tx.execute(
                "DELETE FROM folder_links WHERE tenant=? AND (parent IN (SELECT id FROM folders "
                "WHERE tenant=? AND source=?) OR child IN (SELECT id FROM folders "
                "WHERE tenant=? AND source=?))",
                (tenant, tenant, source_id, tenant, source_id),
            )
            await tx.execute("DELETE FROM folders WHERE tenant=? AND source=?", (tenant, source_id))
            await tx.execute("DELETE FROM sources WHERE tenant=? AND id=?", (tenant, source_id))

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
        now = time.time()
        entries: dict[str, DocumentEntry] = {}
        async with self.db.transaction(tenant) as tx:
            await _require_active(tx, tenant, source)
            for folder in dict.fromkeys(folders):
                await _own_folders(tx, tenant, folder, source)
            for doc in dict.fromkeys(documents):
                await tx.execute(
                    "INSERT INTO documents (tenant, source, id, chunks, updated_at) "
                    "VALUES (?, ?, ?, 0, ?) ON CONFLICT DO NOTHING",
                    (tenant, source, doc, now),
                )
                (row,) = await tx.execute(
                    "SELECT source, chunks, fingerprint, folder, lease_owner, lease_until "
                    "FROM documents WHERE tenant=? AND id=?",
                    (tenant, doc),
                )
                if row[0] != source:
                    raise Conflict(f"document {doc} belongs to another source")
                if lease and row[4] is not None and row[5] > now:
                    raise Conflict(f"document {doc} is being updated by another request")
                entries[doc] = DocumentEntry(doc, source, int(row[1]), row[2], row[3])
                if lease:
                    await tx.execute(
                        "UPDATE documents SET lease_owner=?, lease_until=? WHERE tenant=? AND id=?",
                        (token, now + LEASE_S, tenant, doc),
                    )
        return Claim(tenant, source, token, entries)

    async def link(self, tenant: str, parent: str, child: str) -> None:
        """Record an admin ``parent`` link (``type:id`` both); Conflict across sources.

        Folders linked to each other form one tree, owned by one source: linking two
        owned by different sources, or a document under a folder of another source, is
        refused. Links between names no source owns yet are kept, so that the first
        source to claim any of them claims the whole tree.
        """
        parent_type, _, parent_id = parent.partition(":")
        child_type, _, child_id = child.partition(":")
        async with self.db.transaction(tenant) as tx:
            if parent_type == "source":
                owner: str | None = parent_id
                await _require_active(tx, tenant, parent_id)
            else:
                await _ensure_folder(tx, tenant, parent_id)
                owner = await _tree_owner(tx, tenant, parent_id)
            if child_type == "folder":
                await _link_folder(tx, tenant, parent_type, parent_id, child_id, owner)
            else:
                await _link_document(tx, tenant, parent_type, parent_id, child_id, owner)

    async def unlink(self, tenant: str, parent: str, child: str) -> None:
        async with self.db.transaction(tenant) as tx:
            await tx.execute(
                "DELETE FROM folder_links WHERE tenant=? AND parent=? AND child=?",
                (tenant, parent.partition(":")[2], child.partition(":")[2]),
            )

    async def release(self, claim: Claim) -> None:
        await self._rows(
            "UPDATE documents SET lease_owner=NULL, lease_until=0 WHERE tenant=? AND lease_owner=?",
            (claim.tenant, claim.lease),
        )

    async def folder_source(self, tenant: str, folder: str) -> str | None:
        rows = await self._rows(
            "SELECT source FROM folders WHERE tenant=? AND id=?", (tenant, folder)
        )
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    # -- documents ---------------------------------------------------------------------

    async def start_update(self, tenant: str, document_id: str) -> None:
        """Mark a document incomplete: a failure from here on is repaired by a rerun."""
        await self._rows(
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
        await self._rows(
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
        rows = await self._rows(
            "SELECT id, source, chunks, fingerprint, folder FROM documents WHERE tenant=? AND id=?",
            (tenant, document_id),
        )
        if not rows:
            return None
        r = rows[0]
        return DocumentEntry(str(r[0]), str(r[1]), int(r[2]), r[3], r[4])

    async def content_versions(
        self, tenant: str, document_ids: Sequence[str], source: str | None = None
    ) -> dict[str, str | None]:
        """document id -> catalog fingerprint (None while an update is in flight), for
        the ids the catalog knows (in ``source``, when given)."""
        found: dict[str, str | None] = {}
        for i in range(0, len(document_ids), 500):
            part = list(document_ids[i : i + 500])
            marks = ", ".join("?" for _ in part)
            # By primary key; the source is compared here, not in SQL, where SQLite
            # would pick the (tenant, source) index and scan the whole source.
            rows = await self._rows(
                f"SELECT id, source, fingerprint FROM documents WHERE tenant=? AND id IN ({marks})",  # noqa: S608
                (tenant, *part),
            )
            found.update({str(r[0]): r[2] for r in rows if source is None or r[1] == source})
        return found

    async def document_source(self, tenant: str, document_id: str) -> str | None:
        entry = await self.document(tenant, document_id)
        return entry.source if entry is not None else None

    async def forget_document(self, tenant: str, document_id: str) -> None:
        await self._rows("DELETE FROM documents WHERE tenant=? AND id=?", (tenant, document_id))

    async def document_count(self, tenant: str, source: str | None = None) -> int:
        """Complete documents (of one source, or of the tenant)."""
        if source is None:
            rows = await self._rows(
                "SELECT COUNT(*) FROM documents WHERE tenant=? AND fingerprint IS NOT NULL",
                (tenant,),
            )
        else:
            rows = await self._rows(
                "SELECT COUNT(*) FROM documents WHERE tenant=? AND source=? "
                "AND fingerprint IS NOT NULL",
                (tenant, source),
            )
        return int(rows[0][0])

    # -- directory (SCIM) ------------------------------------------------------------

    async def tenant_exists(self, tenant: str) -> bool:
        return bool(await self._rows("SELECT 1 FROM tenants WHERE id=?", (tenant,)))

    async def add_scim_secret(
        self, tenant: str, secret_id: str, digest: str, *, keep_previous: bool = False
    ) -> int:
        """Store a SCIM secret's digest; unless ``keep_previous``, the tenant's others go.

        Returns how many previous secrets were revoked.
        """
        async with self.db.transaction(tenant) as tx:
            revoked = 0
            if not keep_previous:
                rows = await tx.execute("SELECT id FROM scim_secrets WHERE tenant=?", (tenant,))
                revoked = len(rows)
                await tx.execute("DELETE FROM scim_secrets WHERE tenant=?", (tenant,))
            await tx.execute(
                "INSERT INTO scim_secrets VALUES (?, ?, ?, ?)",
                (secret_id, tenant, digest, time.time()),
            )
        return revoked

    async def scim_secret(self, secret_id: str) -> tuple[str, str] | None:
        """``(tenant, digest)`` of a SCIM secret by its public id."""
        rows = await self._rows("SELECT tenant, digest FROM scim_secrets WHERE id=?", (secret_id,))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    async def directory(self, tenant: str) -> DirectoryState | None:
        rows = await self._rows(
            "SELECT tenant, source, max_silence_s, declared_at, heard_at FROM directories "
            "WHERE tenant=?",
            (tenant,),
        )
        if not rows:
            return None
        r = rows[0]
        return DirectoryState(str(r[0]), str(r[1]), _float(r[2]), _float(r[3]), _float(r[4]))

    async def declare_directory(
        self, tenant: str, source: str, max_silence_s: float | None
    ) -> DirectoryState:
        """Declare (``scim``) or withdraw (``none``) the tenant's source of truth."""
        await self._rows(
            "INSERT INTO directories (tenant, source, max_silence_s, declared_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (tenant) DO UPDATE SET source=excluded.source, "
            "max_silence_s=excluded.max_silence_s, declared_at=excluded.declared_at",
            (tenant, source, max_silence_s, time.time()),
        )
        state = await self.directory(tenant)
        assert state is not None
        return state

    async def directory_heard(self, tenant: str, at: float | None = None) -> None:
        """The directory spoke (a SCIM request authenticated with the tenant's secret)."""
        await self._rows(
            "INSERT INTO directories (tenant, heard_at) VALUES (?, ?) "
            "ON CONFLICT (tenant) DO UPDATE SET heard_at=excluded.heard_at",
            (tenant, time.time() if at is None else at),
        )

    async def scim_users(
        self, tenant: str, filters: Mapping[str, str], start: int = 1, count: int = 100
    ) -> tuple[list[ScimUserRecord], int]:
        """Users matching every ``column: value`` filter, a page of them and the total."""
        where, params = _where(tenant, filters, _USER_FILTERS)
        rows = await self._rows(
            f"SELECT {_USER_COLUMNS} FROM scim_users WHERE {where} "  # noqa: S608
            "ORDER BY created_at, id LIMIT ? OFFSET ?",
            (*params, count, start - 1),
        )
        total = await self._rows(f"SELECT COUNT(*) FROM scim_users WHERE {where}", params)  # noqa: S608
        return [_scim_user(r) for r in rows], int(total[0][0])

    async def scim_user(self, tenant: str, **filters: str) -> ScimUserRecord | None:
        found, _ = await self.scim_users(tenant, filters, 1, 1)
        return found[0] if found else None

    async def save_scim_user(self, user: ScimUserRecord, user_name_key: str) -> None:
        """Insert or update; Conflict when another User holds the name or the user id."""
        await self._rows(
            f"INSERT INTO scim_users ({_USER_COLUMNS}, user_name_key) "  # noqa: S608
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, id) DO UPDATE SET "
            "user_id=excluded.user_id, user_name=excluded.user_name, "
            "user_name_key=excluded.user_name_key, external_id=excluded.external_id, "
            "active=excluded.active, attributes=excluded.attributes, "
            "updated_at=excluded.updated_at",
            (
                user.tenant,
                user.id,
                user.user_id,
                user.user_name,
                user.external_id,
                int(user.active),
                json.dumps(user.attributes, sort_keys=True),
                user.created_at,
                user.updated_at,
                user_name_key,
            ),
        )

    async def forget_scim_user(self, tenant: str, resource_id: str) -> None:
        async with self.db.transaction(tenant) as tx:
            await tx.execute(
                "DELETE FROM scim_members WHERE tenant=? AND member=?", (tenant, resource_id)
            )
            await tx.execute(
                "DELETE FROM scim_users WHERE tenant=? AND id=?", (tenant, resource_id)
            )

    async def scim_groups(
        self,
        tenant: str,
        filters: Mapping[str, str],
        start: int = 1,
        count: int = 100,
        *,
        member: str | None = None,
    ) -> tuple[list[ScimGroupRecord], int]:
        """Groups matching every filter (and holding ``member``), a page and the total."""
        where, params = _where(tenant, filters, _GROUP_FILTERS)
        if member is not None:
            where += (
                " AND EXISTS (SELECT 1 FROM scim_members m WHERE m.tenant=scim_groups.tenant "
                "AND m.group_ref=scim_groups.id AND m.member=?)"
            )
            params = (*params, member)
        rows = await self._rows(
            f"SELECT {_GROUP_COLUMNS} FROM scim_groups WHERE {where} "  # noqa: S608
            "ORDER BY created_at, id LIMIT ? OFFSET ?",
            (*params, count, start - 1),
        )
        total = await self._rows(f"SELECT COUNT(*) FROM scim_groups WHERE {where}", params)  # noqa: S608
        return [_scim_group(r) for r in rows], int(total[0][0])

    async def scim_group(self, tenant: str, **filters: str) -> ScimGroupRecord | None:
        found, _ = await self.scim_groups(tenant, filters, 1, 1)
        return found[0] if found else None

    async def save_scim_group(
        self, group: ScimGroupRecord, display_key: str, members: Sequence[str]
    ) -> None:
        """Insert or update a Group and set its members, in one transaction."""
        async with self.db.transaction(group.tenant) as tx:
            await tx.execute(
                f"INSERT INTO scim_groups ({_GROUP_COLUMNS}, display_key) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, id) DO UPDATE SET "
                "group_id=excluded.group_id, display_name=excluded.display_name, "
                "display_key=excluded.display_key, external_id=excluded.external_id, "
                "attributes=excluded.attributes, updated_at=excluded.updated_at",
                (
                    group.tenant,
                    group.id,
                    group.group_id,
                    group.display_name,
                    group.external_id,
                    json.dumps(group.attributes, sort_keys=True),
                    group.created_at,
                    group.updated_at,
                    display_key,
                ),
            )
            await tx.execute(
                "DELETE FROM scim_members WHERE tenant=? AND group_ref=?", (group.tenant, group.id)
            )
            for member in dict.fromkeys(members):
                await tx.execute(
                    "INSERT INTO scim_members VALUES (?, ?, ?)", (group.tenant, group.id, member)
                )

    async def forget_scim_group(self, tenant: str, resource_id: str) -> None:
        async with self.db.transaction(tenant) as tx:
            await tx.execute(
                "DELETE FROM scim_members WHERE tenant=? AND (group_ref=? OR member=?)",
                (tenant, resource_id, resource_id),
            )
            await tx.execute(
                "DELETE FROM scim_groups WHERE tenant=? AND id=?", (tenant, resource_id)
            )

    async def scim_members(self, tenant: str, group: str) -> list[str]:
        """Resource ids of a Group's members (sorted)."""
        rows = await self._rows(
            "SELECT member FROM scim_members WHERE tenant=? AND group_ref=? ORDER BY member",
            (tenant, group),
        )
        return [str(r[0]) for r in rows]

    async def scim_memberships(self, tenant: str, member: str) -> list[ScimGroupRecord]:
        """The Groups ``member`` (a User or Group resource id) belongs to."""
        found, _ = await self.scim_groups(tenant, {}, 1, 1_000_000, member=member)
        return found

    async def forget_scim_memberships(self, tenant: str, member: str) -> None:
        await self._rows("DELETE FROM scim_members WHERE tenant=? AND member=?", (tenant, member))

    # -- sync (gateway/sync.py) ---------------------------------------------------------

    async def owners(self, tenant: str, kind: str, names: Sequence[str]) -> dict[str, str | None]:
        """Owning source of each named folder or document that has a row (read only)."""
        table = {"folder": "folders", "document": "documents"}[kind]
        found: dict[str, str | None] = {}
        wanted = list(dict.fromkeys(names))
        for start in range(0, len(wanted), 500):
            part = wanted[start : start + 500]
            marks = ", ".join("?" for _ in part)
            rows = await self._rows(
                f"SELECT id, source FROM {table} WHERE tenant=? AND id IN ({marks})",  # noqa: S608
                (tenant, *part),
            )
            found.update({str(r[0]): r[1] for r in rows})
        return found

    async def source_documents(
        self, tenant: str, source: str
    ) -> list[tuple[str, str | None, str | None, str | None]]:
        """``(id, folder, acl json, fingerprint)`` of every document the source owns."""
        rows = await self._rows(
            "SELECT id, folder, acl, fingerprint FROM documents WHERE tenant=? AND source=? "
            "ORDER BY id",
            (tenant, source),
        )
        return [(str(r[0]), r[1], r[2], r[3]) for r in rows]

    async def complete_documents(
        self, tenant: str, entries: Sequence[tuple[str, int, str, str | None, dict[str, Any]]]
    ) -> None:
        """Record synced documents ``(id, chunks, fingerprint, folder, acl)`` at once."""
        now = time.time()
        async with self.db.transaction(tenant) as tx:
            for document_id, chunks, fingerprint, folder, acl in entries:
                await tx.execute(
                    "UPDATE documents SET chunks=?, fingerprint=?, folder=?, acl=?, updated_at=? "
                    "WHERE tenant=? AND id=?",
                    (chunks, fingerprint, folder, json.dumps(acl, sort_keys=True), now, tenant,
                     document_id),
                )  # fmt: skip

    async def start_updates(self, tenant: str, ids: Sequence[str]) -> None:
        """:meth:`start_update` for several documents in one transaction."""
        async with self.db.transaction(tenant) as tx:
            for document_id in ids:
                await tx.execute(
                    "UPDATE documents SET fingerprint=NULL WHERE tenant=? AND id=?",
                    (tenant, document_id),
                )

    async def forget_documents(self, tenant: str, source: str, ids: Sequence[str]) -> None:
        """Drop the rows of documents gone from the source (their names become free)."""
        async with self.db.transaction(tenant) as tx:
            for document_id in ids:
                await tx.execute(
                    "DELETE FROM documents WHERE tenant=? AND source=? AND id=?",
                    (tenant, source, document_id),
                )

    async def sync_mark(self, source: SourceInfo) -> float | None:
        """The high-water mark of the source's last completed sync (``updated_at``
        mappings only); None before the first one, and for a source registered again
        under the same name (its mark belongs to the old registration)."""
        rows = await self._rows(
            "SELECT high_water FROM sync_state WHERE tenant=? AND source=? AND source_created=?",
            (source.tenant, source.id, source.created_at),
        )
        return float(rows[0][0]) if rows else None

    async def set_sync_mark(self, source: SourceInfo, high_water: float) -> None:
        await self._rows(
            "INSERT INTO sync_state (tenant, source, source_created, high_water, synced_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, source) DO UPDATE SET "
            "source_created=excluded.source_created, high_water=excluded.high_water, "
            "synced_at=excluded.synced_at",
            (source.tenant, source.id, source.created_at, high_water, time.time()),
        )

    async def fronting(self, kind: str, location: str, collection: str) -> list[tuple[str, str]]:
        """``(tenant, source)`` of every source that fronts this collection."""
        rows = await self._rows("SELECT tenant, id, config FROM sources WHERE kind=?", (kind,))
        found = []
        for tenant, source, raw in rows:
            config = json.loads(raw)
            where = str(config.get("url") or config.get("path") or "")
            if config.get("collection") == collection and where == location:
                found.append((str(tenant), str(source)))
        return found

    async def close(self) -> None:
        await self.db.close()


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _where(
    tenant: str, filters: Mapping[str, str], allowed: frozenset[str]
) -> tuple[str, tuple[object, ...]]:
    unknown = set(filters) - allowed
    if unknown:
        raise ValueError(f"unknown filter columns {sorted(unknown)}")
    clauses = ["tenant=?", *(f"{column}=?" for column in sorted(filters))]
    return " AND ".join(clauses), (tenant, *(filters[c] for c in sorted(filters)))


def _scim_user(r: Row) -> ScimUserRecord:
    return ScimUserRecord(
        str(r[0]), str(r[1]), str(r[2]), str(r[3]), r[4], bool(r[5]), json.loads(r[6]),
        float(r[7]), float(r[8]),
    )  # fmt: skip


def _scim_group(r: Row) -> ScimGroupRecord:
    return ScimGroupRecord(
        str(r[0]), str(r[1]), str(r[2]), str(r[3]), r[4], json.loads(r[5]), float(r[6]),
        float(r[7]),
    )  # fmt: skip


def _source(row: Row) -> SourceInfo:
    return SourceInfo(row[0], row[1], row[2], json.loads(row[3]), float(row[4]), row[5])


async def _require_active(tx: Tx, tenant: str, source: str) -> None:
    state = await tx.execute("SELECT state FROM sources WHERE tenant=? AND id=?", (tenant, source))
    if not state or state[0][0] != "active":
        raise Conflict(f"source {source} is not active")


async def _ensure_folder(tx: Tx, tenant: str, folder: str) -> None:
    await tx.execute(
        "INSERT INTO folders VALUES (?, ?, NULL, ?) ON CONFLICT DO NOTHING",
        (tenant, folder, time.time()),
    )


_TREE = """
WITH RECURSIVE tree(id) AS (
  SELECT CAST(? AS TEXT)
  UNION
  SELECT CASE WHEN l.parent = tree.id THEN l.child ELSE l.parent END
  FROM folder_links l JOIN tree ON l.parent = tree.id OR l.child = tree.id
  WHERE l.tenant = ?
)
SELECT f.id, f.source FROM tree JOIN folders f ON f.tenant = ? AND f.id = tree.id
"""


async def _tree(tx: Tx, tenant: str, folder: str) -> list[tuple[str, str | None]]:
    """The folders linked to ``folder`` (itself included), with their owners."""
    return [(str(r[0]), r[1]) for r in await tx.execute(_TREE, (folder, tenant, tenant))]


async def _tree_owner(tx: Tx, tenant: str, folder: str) -> str | None:
    owners = {owner for _, owner in await _tree(tx, tenant, folder)} - {None}
    return owners.pop() if len(owners) == 1 else None


async def _own_folders(tx: Tx, tenant: str, folder: str, source: str) -> None:
    """Claim ``folder`` and every folder linked to it for ``source``, or raise Conflict."""
    await _ensure_folder(tx, tenant, folder)
    tree = await _tree(tx, tenant, folder)
    if any(owner not in (None, source) for _, owner in tree):
        raise Conflict(f"folder {folder} belongs to another source")
    for name, owner in tree:
        if owner is None:
            await tx.execute(
                "UPDATE folders SET source=? WHERE tenant=? AND id=?", (source, tenant, name)
            )


async def _link_folder(
    tx: Tx, tenant: str, parent_type: str, parent_id: str, child: str, owner: str | None
) -> None:
    await _ensure_folder(tx, tenant, child)
    if parent_type == "folder":
        owners = {owner, await _tree_owner(tx, tenant, child)} - {None}
        if len(owners) > 1:
            raise Conflict(f"folder {child} belongs to another source")
        await tx.execute(
            "INSERT INTO folder_links VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (tenant, parent_id, child),
        )
        owner = owners.pop() if owners else None
    if owner is not None:
        await _own_folders(tx, tenant, child, owner)


async def _link_document(
    tx: Tx, tenant: str, parent_type: str, parent_id: str, child: str, owner: str | None
) -> None:
    rows = await tx.execute("SELECT source FROM documents WHERE tenant=? AND id=?", (tenant, child))
    current = str(rows[0][0]) if rows else None
    if current is not None and owner is not None and current != owner:
        raise Conflict(f"document {child} belongs to another source")
    if current is not None and owner is None and parent_type == "folder":
        await _own_folders(tx, tenant, parent_id, current)
    elif current is None and owner is not None:
        await tx.execute(
            "INSERT INTO documents (tenant, source, id, chunks, updated_at) VALUES (?, ?, ?, 0, ?)",
            (tenant, owner, child, time.time()),
        )


class Tx(Protocol):
    """One transaction (or one statement) on the catalog's database."""

    async def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]: ...


class CatalogDatabase(Protocol):
    """Where the catalog lives. Every failure raises SourceUnavailable (or Conflict)."""

    def transaction(self, tenant: str | None = None) -> contextlib.AbstractAsyncContextManager[Tx]:
        """A transaction; with ``tenant``, ownership changes of that tenant wait their turn."""
        ...

    async def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """One statement on its own (autocommit)."""
        ...

    async def close(self) -> None: ...


class SqliteCatalogDatabase:
    """The embedded catalog: one SQLite file; BEGIN IMMEDIATE serialises writers."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._lock = asyncio.Lock()
        self._migrate()

    def _migrate(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            for target, script in _MIGRATIONS:
                if version < target:
                    for statement in _statements(script):
                        self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    @contextlib.asynccontextmanager
    async def transaction(self, tenant: str | None = None) -> AsyncIterator[Tx]:
        async with self._lock:
            with _sqlite_errors():
                await self._in_thread(lambda: self._db.execute("BEGIN IMMEDIATE"))
                try:
                    yield self
                except BaseException:
                    await self._in_thread(lambda: self._db.execute("ROLLBACK"))
                    raise
                await self._in_thread(lambda: self._db.execute("COMMIT"))

    async def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        with _sqlite_errors():
            rows: list[Row] = await self._in_thread(
                lambda: self._db.execute(sql, tuple(params)).fetchall()
            )
            return rows

    async def _in_thread(self, work: Callable[[], Any]) -> Any:
        return await asyncio.to_thread(work)

    async def close(self) -> None:
        self._db.close()


@contextlib.contextmanager
def _sqlite_errors() -> Any:
    try:
        yield
    except sqlite3.IntegrityError as exc:
        raise Conflict("already exists") from exc
    except sqlite3.Error as exc:
        raise SourceUnavailable("source catalog unavailable", detail=str(exc)) from exc


PgConnection = psycopg.AsyncConnection[TupleRow]
_PG_MIGRATION_LOCK = 0x5C09E_CA7A1  # advisory lock id: replicas migrate one at a time


class PostgresCatalogDatabase:
    """The shared catalog of scaled-out deployments (one database for every replica).

    Statements run in autocommit unless inside :meth:`transaction`; a transaction for a
    tenant first takes a transaction-level advisory lock on it, so two replicas never
    change one tenant's ownership at the same time. Migrations run under their own
    advisory lock, so replicas may start together.
    """

    def __init__(self, dsn: str, *, pool_size: int = 4, connect_timeout_s: int = 5) -> None:
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: list[PgConnection] = []
        self._migrated = False
        self._closed = False

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[PgConnection]:
        async with self._slots:
            conn = await self._take()
            try:
                yield conn
            finally:
                clean = not conn.closed and conn.info.transaction_status == 0  # IDLE
                if clean and not self._closed:
                    self._idle.append(conn)
                else:
                    await conn.close()

    async def _take(self) -> PgConnection:
        if self._closed:
            raise SourceUnavailable("source catalog is closed")
        if self._idle:
            return self._idle.pop()
        conn = await PgConnection.connect(
            self._dsn, autocommit=True, connect_timeout=self._connect_timeout_s
        )
        try:
            if not self._migrated:
                await _pg_migrate(conn)
                self._migrated = True
        except BaseException:
            await conn.close()
            raise
        return conn

    @contextlib.asynccontextmanager
    async def transaction(self, tenant: str | None = None) -> AsyncIterator[Tx]:
        with _pg_errors():
            async with self._connection() as conn, conn.transaction():
                tx = _PgTx(conn)
                if tenant is not None:
                    await tx.execute("SELECT pg_advisory_xact_lock(?)", (_tenant_lock(tenant),))
                yield tx

    async def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        with _pg_errors():
            async with self._connection() as conn:
                return await _PgTx(conn).execute(sql, params)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


class _PgTx:
    def __init__(self, conn: PgConnection) -> None:
        self._conn = conn

    async def execute(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        cursor = await self._conn.execute(sql.replace("?", "%s"), tuple(params))
        return list(await cursor.fetchall()) if cursor.description else []


def _tenant_lock(tenant: str) -> int:
    """A stable 32-bit advisory lock key per tenant (collisions only serialise more)."""
    return zlib.crc32(f"scopegate-catalog:{tenant}".encode())


async def _pg_migrate(conn: PgConnection) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_MIGRATION_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS catalog_schema (version INTEGER PRIMARY KEY)"
        )
        cursor = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM catalog_schema")
        row = await cursor.fetchone()
        current = int(row[0]) if row else 0
        for version, script in _MIGRATIONS:
            if version > current:
                for statement in _statements(script):
                    await conn.execute(statement)
                await conn.execute("INSERT INTO catalog_schema VALUES (%s)", (version,))


@contextlib.contextmanager
def _pg_errors() -> Any:
    try:
        yield
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict("already exists") from exc
    except (psycopg.Error, OSError) as exc:
        raise SourceUnavailable("source catalog unavailable", detail=str(exc)) from exc


def open_catalog(dsn: str | None, data_dir: Path) -> SourceCatalog:
    """The PostgreSQL catalog for a ``postgresql://`` DSN, else SQLite in ``data_dir``."""
    if dsn is None:
        return SourceCatalog(SqliteCatalogDatabase(data_dir / "catalog.db"))
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ValueError("SCOPEGATE_CATALOG_DSN must be a postgresql:// URL")
    return SourceCatalog(PostgresCatalogDatabase(dsn))
