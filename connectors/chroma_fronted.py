"""A Chroma collection scopegate did not create, fronted read-only through a field mapping.

The collection belongs to the one (tenant, source) it is registered for: every chunk
it returns is stamped with that pair, and its document id comes from the mapping's
field (a chunk without a usable one is a candidate the gateway denies). Metadata is
read scalar-only (see :mod:`connectors.mapping`). scopegate never writes, deletes or
drops anything here: content changes upstream, and ``sources sync`` follows the ACLs.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from chromadb.api import ClientAPI
from chromadb.api.client import Client
from chromadb.api.models.Collection import Collection
from chromadb.errors import NotFoundError

from connectors.base import Candidate, ChunkRecord
from connectors.chroma import (
    _batches,
    _first,
    _http_connector,
    _persistent_connector,
    _query_vector,
    _space,
    chroma_errors,
)
from connectors.mapping import AclScan, FieldMapping, acl_of, document_id_of, scalar_metadata
from connectors.memory import cosine_top_n
from gateway.errors import InvalidRequest, SourceUnavailable

T = TypeVar("T")
READ_ONLY = "a fronted collection is written upstream: change it there, then sync the source"
SCAN_PAGE = 1000


class FrontedChromaStore:
    """A :class:`~connectors.base.VectorStore` over one existing cosine collection."""

    exact = False

    def __init__(
        self,
        tenant: str,
        source: str,
        collection: str,
        mapping: FieldMapping,
        *,
        path: str | os.PathLike[str] | None = None,
        url: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        if (path is None) == (url is None):
            raise ValueError("FrontedChromaStore needs exactly one of path or url")
        self._connect = (
            _persistent_connector(path) if path is not None else _http_connector(str(url), headers)
        )
        self.tenant = tenant
        self.source = source
        self.collection_name = collection
        self.mapping = mapping
        self.timeout = timeout
        self._client: ClientAPI | None = None
        self._lock = threading.Lock()
        self._hidden = mapping.fields()

    # -- reads ---------------------------------------------------------------------

    async def search(
        self, tenant: str, source: str, embedding: Sequence[float], n: int
    ) -> list[Candidate]:
        if not self._mine(tenant, source) or n <= 0:
            return []
        return await self._run("query", self._search, embedding, n)

    async def search_documents(
        self,
        tenant: str,
        source: str,
        embedding: Sequence[float],
        n: int,
        document_ids: Sequence[str],
    ) -> list[Candidate]:
        if not self._mine(tenant, source) or n <= 0 or not document_ids:
            return []
        return await self._run(
            "get by document", self._search_documents, embedding, n, document_ids
        )

    async def count(self, tenant: str, source: str) -> int:
        if not self._mine(tenant, source):
            return 0
        return await self._run("count", lambda: self._collection().count())

    async def scan_acls(self, since: float | None = None) -> AclScan:
        """The ACL every chunk states, grouped by document (for ``sources sync``).

        With ``since`` (and an ``updated_at`` mapping), only the documents one of whose
        chunks was written at or after it, all their chunks read (a partial scan).
        """
        if since is not None and self.mapping.updated_at is not None:
            return await self._scan_since(since)
        scan = AclScan()
        async for page in self._pages(None):
            scan.stamp(page, self.mapping)
            for meta in page:
                scan.add(acl_of(meta, self.mapping))
        return scan

    async def healthy(self) -> bool:
        try:
            await self._run("heartbeat", lambda: self._connected().heartbeat())
        except SourceUnavailable:
            return False
        return True

    # -- never written by scopegate ---------------------------------------------------

    async def upsert(self, tenant: str, source: str, chunks: Sequence[ChunkRecord]) -> None:
        raise InvalidRequest(READ_ONLY)

    async def delete_documents(self, tenant: str, source: str, document_ids: Sequence[str]) -> int:
        raise InvalidRequest(READ_ONLY)

    async def drop(self, tenant: str, source: str) -> None:
        """Removing the source forgets the collection; it is never deleted."""

    def close(self) -> None:
        """Release the client (the embedded database's files once its last user closes)."""
        client, self._client = self._client, None
        if isinstance(client, Client):
            client.close()

    # -- worker thread ---------------------------------------------------------------

    def _mine(self, tenant: str, source: str) -> bool:
        return (tenant, source) == (self.tenant, self.source)

    async def _run(self, action: str, call: Callable[..., T], *args: Any) -> T:
        with chroma_errors(action):
            async with asyncio.timeout(self.timeout):
                return await asyncio.to_thread(call, *args)

    def _connected(self) -> ClientAPI:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _collection(self) -> Collection:
        try:
            collection = self._connected().get_collection(
                self.collection_name, embedding_function=None
            )
        except NotFoundError as exc:
            raise SourceUnavailable(f"collection {self.collection_name} not found") from exc
        if _space(collection) not in (None, "cosine"):
            raise SourceUnavailable(f"collection {self.collection_name} is not cosine")
        return collection

    def _search(self, embedding: Sequence[float], n: int) -> list[Candidate]:
        found = self._collection().query(
            query_embeddings=_query_vector(embedding),
            n_results=n,
            include=["documents", "metadatas", "distances"],
        )
        return [
            self._candidate(cid, text, meta, distance)
            for cid, text, meta, distance in zip(
                found["ids"][0],
                _first(found["documents"]),
                _first(found["metadatas"]),
                _first(found["distances"]),
                strict=True,
            )
        ]

    def _search_documents(
        self, embedding: Sequence[float], n: int, document_ids: Sequence[str]
    ) -> list[Candidate]:
        collection = self._collection()
        wanted = sorted(set(document_ids))
        ids: list[str] = []
        texts: list[str | None] = []
        metas: list[Mapping[str, Any] | None] = []
        rows: list[Any] = []
        for part in _batches(wanted, 500):
            where: Any = {self.mapping.document_id: {"$in": part}}
            found = collection.get(where=where, include=["embeddings", "documents", "metadatas"])
            documents: Sequence[str | None] = found["documents"] or [None] * len(found["ids"])
            vectors: Any = found["embeddings"]
            for i, cid in enumerate(found["ids"]):
                meta = (found["metadatas"] or [])[i]
                # Re-read through the mapping: the filter is the store's, the rule ours.
                if document_id_of(meta, self.mapping) in part:
                    ids.append(cid)
                    texts.append(documents[i])
                    metas.append(meta)
                    rows.append(np.asarray(vectors[i], dtype=np.float64))
        if not ids:
            return []
        matrix = np.vstack(rows)
        return [
            self._candidate(ids[row], texts[row], metas[row], distance)
            for row, distance in cosine_top_n(embedding, ids, matrix, n)
        ]

    async def _scan_since(self, since: float) -> AclScan:
        assert self.mapping.updated_at is not None
        scan = AclScan(partial=True, high_water=since)
        changed: set[str] = set()
        async for page in self._pages({self.mapping.updated_at: {"$gte": since}}):
            scan.stamp(page, self.mapping)
            changed.update(d for d in (document_id_of(m, self.mapping) for m in page) if d)
        for part in _batches(sorted(changed), 500):
            async for page in self._pages({self.mapping.document_id: {"$in": part}}):
                # Re-read through the mapping: the filter is the store's, the rule ours.
                for meta in page:
                    if document_id_of(meta, self.mapping) in changed:
                        scan.add(acl_of(meta, self.mapping))
        return scan

    async def _pages(self, where: Any) -> AsyncIterator[list[Mapping[str, Any] | None]]:
        """Every chunk's metadata (matching ``where``), a page per call: the timeout
        bounds one page, not a scan of the whole collection."""
        offset = 0
        while True:
            count, metas = await self._run("scan", self._page, where, offset)
            yield metas
            if count < SCAN_PAGE:
                return
            offset += SCAN_PAGE

    def _page(self, where: Any, offset: int) -> tuple[int, list[Mapping[str, Any] | None]]:
        found = self._collection().get(
            where=where, include=["metadatas"], limit=SCAN_PAGE, offset=offset
        )
        return len(found["ids"]), list(found["metadatas"] or [])

    def _candidate(
        self, chunk_id: str, text: str | None, meta: Mapping[str, Any] | None, distance: float
    ) -> Candidate:
        return Candidate(
            chunk_id,
            document_id_of(meta, self.mapping),
            self.tenant,
            self.source,
            text or "",
            float(distance),
            scalar_metadata(meta, self._hidden),
        )
