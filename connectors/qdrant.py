"""The Qdrant connector: local mode (a path, or ``:memory:``) or a Qdrant server (a URL).

Managed sources get one cosine collection per (tenant, source), named from a hash of
the pair, as in Chroma: physical scoping keeps a tenant's search from ever ranking
another tenant's chunks and needs no payload filter on the hot path (a payload-indexed
tenant field would scope as well, but every query would then carry a filter). Points
are keyed by a UUID derived from the chunk id; the payload holds the stamps, the chunk
id, the text and the user metadata (under ``metadata``, so it never shadows a stamp).

:meth:`QdrantStore.search_documents` asks Qdrant for an exact search (``exact=True``)
filtered on the stamped document id. A store given a ``collection`` and a
:class:`~connectors.mapping.FieldMapping` instead fronts an existing collection,
read-only, for the one (tenant, source) it is registered for.

The client is synchronous; calls run in a worker thread, one at a time (local mode
is not thread-safe), and every failure leaves through :func:`qdrant_errors`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import httpx
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ApiException

from connectors.base import Candidate, ChunkRecord, Metadata
from connectors.chunking import chunk_index
from connectors.mapping import AclScan, FieldMapping, acl_of, document_id_of, scalar_metadata
from connectors.memory import check_chunks
from gateway.errors import InvalidRequest, ScopegateError, SourceUnavailable

T = TypeVar("T")
READ_ONLY = "a fronted collection is written upstream: change it there, then sync the source"
PAGE = 512
# One client per local path in this process (Qdrant's local mode locks the path).
_LOCAL_CLIENTS: dict[str, QdrantClient] = {}
_LOCAL_LOCK = threading.RLock()


@atexit.register
def _close_local_clients() -> None:
    """Close local clients before the interpreter tears down what their close needs."""
    with _LOCAL_LOCK:
        clients = list(_LOCAL_CLIENTS.values())
        _LOCAL_CLIENTS.clear()
    for client in clients:
        with contextlib.suppress(Exception):
            client.close()


_CHUNK_NAMESPACE = uuid.UUID("6f1d3b1e-8c2a-4d5e-9b7f-3a2c1d0e5f47")

UPSTREAM_ERRORS: tuple[type[Exception], ...] = (
    ApiException,
    httpx.HTTPError,
    OSError,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    RuntimeError,
    AssertionError,
)


@contextlib.contextmanager
def qdrant_errors(action: str) -> Iterator[None]:
    """Translate every failure of a Qdrant call into SourceUnavailable (fail closed)."""
    try:
        yield
    except ScopegateError:
        raise
    except TimeoutError as exc:
        raise SourceUnavailable(f"Qdrant {action} timed out") from exc
    except UPSTREAM_ERRORS as exc:
        raise SourceUnavailable(
            f"Qdrant {action} failed: {type(exc).__name__}", detail=str(exc)[:500] or None
        ) from exc


def collection_name(tenant: str, source: str) -> str:
    digest = hashlib.sha256(json.dumps([tenant, source]).encode()).hexdigest()[:32]
    return f"sg_{digest}"


def point_id(chunk_id: str) -> str:
    return str(uuid.uuid5(_CHUNK_NAMESPACE, chunk_id))


class QdrantStore:
    """A :class:`~connectors.base.VectorStore` on Qdrant.

    Give one of ``path`` (local mode on disk), ``location=":memory:"`` or ``url``.
    With ``collection`` and ``mapping`` (and ``tenant``, ``source``) the store fronts
    that existing collection read-only; ``text_field`` names the payload field of the
    chunk text and ``vector`` the named vector to search, if any.
    """

    exact = False

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        location: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float | None = 30.0,
        collection: str | None = None,
        mapping: FieldMapping | None = None,
        tenant: str | None = None,
        source: str | None = None,
        text_field: str = "text",
        vector: str | None = None,
    ) -> None:
        if sum(x is not None for x in (path, location, url)) != 1:
            raise ValueError("QdrantStore needs exactly one of path, location or url")
        if (collection is None) != (mapping is None):
            raise ValueError("a fronted Qdrant collection needs both collection and mapping")
        self._connect: Callable[[], QdrantClient]
        self._path = None if path is None else os.path.realpath(path)
        self._remote = url is not None
        if url is not None:
            self._connect = lambda: QdrantClient(url=url, api_key=api_key)
        elif self._path is not None:
            local = self._path
            self._connect = lambda: QdrantClient(path=local)
        else:
            self._connect = lambda: QdrantClient(location=location)
        self.timeout = timeout
        self.fronted = collection is not None
        self.collection = collection
        self.mapping = mapping
        self.tenant = tenant
        self.source = source
        self.text_field = text_field
        self.vector = vector
        self._client: QdrantClient | None = None
        # One call at a time: local mode is not thread-safe (and its client is shared).
        self._lock: threading.RLock | threading.Lock = (
            _LOCAL_LOCK if self._path is not None else threading.Lock()
        )

    # -- the interface -----------------------------------------------------------------

    async def upsert(self, tenant: str, source: str, chunks: Sequence[ChunkRecord]) -> None:
        self._writable()
        check_chunks(tenant, source, chunks)
        if chunks:
            await self._run("upsert", self._upsert, tenant, source, list(chunks))

    async def delete_documents(self, tenant: str, source: str, document_ids: Sequence[str]) -> int:
        self._writable()
        if not document_ids:
            return 0
        wanted = list(dict.fromkeys(document_ids))
        return await self._run("delete", self._delete_documents, tenant, source, wanted)

    async def search(
        self, tenant: str, source: str, embedding: Sequence[float], n: int
    ) -> list[Candidate]:
        if n <= 0 or not self._mine(tenant, source):
            return []
        return await self._run("query", self._query, tenant, source, embedding, n, None)

    async def search_documents(
        self,
        tenant: str,
        source: str,
        embedding: Sequence[float],
        n: int,
        document_ids: Sequence[str],
    ) -> list[Candidate]:
        if n <= 0 or not document_ids or not self._mine(tenant, source):
            return []
        wanted = sorted(set(document_ids))
        return await self._run(
            "query by document", self._query, tenant, source, embedding, n, wanted
        )

    async def count(self, tenant: str, source: str) -> int:
        if not self._mine(tenant, source):
            return 0
        return await self._run("count", self._count, tenant, source)

    async def drop(self, tenant: str, source: str) -> None:
        """Delete the pair's collection (a fronted collection is never deleted)."""
        if not self.fronted:
            await self._run("drop", self._drop, tenant, source)

    async def healthy(self) -> bool:
        try:
            await self._run("health", lambda: self._connected().get_collections())
        except SourceUnavailable:
            return False
        return True

    async def scan_acls(self, since: float | None = None) -> AclScan:
        """Fronted only: the ACL every point states, grouped by document; with ``since``
        (and an ``updated_at`` mapping) only the documents one of whose points was
        written at or after it, all their points read (a partial scan)."""
        if not self.fronted:
            raise InvalidRequest("only a fronted collection has ACLs in its payloads")
        assert self.mapping is not None
        if since is not None and self.mapping.updated_at is not None:
            return await self._scan_since(since)
        scan = AclScan()
        async for page in self._payloads(None):
            scan.stamp(page, self.mapping)
            for payload in page:
                scan.add(acl_of(payload, self.mapping, lists=True))
        return scan

    def close(self) -> None:
        """Release the client (local mode's lock on its path), reopened on the next call.

        Stores on one local path share one client (Qdrant locks the path per client):
        closing one closes it for all of them, and each reopens it when next used.
        """
        with self._lock:
            client, self._client = self._client, None
            if self._path is not None:
                with _LOCAL_LOCK:
                    client = _LOCAL_CLIENTS.pop(self._path, client)
        if client is not None:
            client.close()

    # -- running -----------------------------------------------------------------------

    def _writable(self) -> None:
        if self.fronted:
            raise InvalidRequest(READ_ONLY)

    def _mine(self, tenant: str, source: str) -> bool:
        return not self.fronted or (tenant, source) == (self.tenant, self.source)

    async def _run(self, action: str, call: Callable[..., T], *args: Any) -> T:
        with qdrant_errors(action):
            async with asyncio.timeout(self.timeout):
                return await asyncio.to_thread(self._locked, call, *args)

    def _locked(self, call: Callable[..., T], *args: Any) -> T:
        with self._lock:
            return call(*args)

    def _connected(self) -> QdrantClient:
        if self._path is not None:
            with _LOCAL_LOCK:
                client = _LOCAL_CLIENTS.get(self._path)
                if client is None:
                    client = _LOCAL_CLIENTS[self._path] = self._connect()
            return client
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _name(self, tenant: str, source: str) -> str:
        return self.collection if self.collection is not None else collection_name(tenant, source)

    def _exists(self, name: str) -> bool:
        return bool(self._connected().collection_exists(name))

    # -- operations (worker thread, under the lock) ----------------------------------

    def _upsert(self, tenant: str, source: str, chunks: list[ChunkRecord]) -> None:
        client = self._connected()
        name = collection_name(tenant, source)
        if not client.collection_exists(name):
            client.create_collection(
                name,
                vectors_config=models.VectorParams(
                    size=len(chunks[0].embedding), distance=models.Distance.COSINE
                ),
                metadata={"scopegate": "chunks", "tenant": tenant, "source": source},
            )
            if self._remote:  # local mode scans (and warns about indexes)
                client.create_payload_index(name, "document_id", models.PayloadSchemaType.KEYWORD)
        for start in range(0, len(chunks), PAGE):
            client.upsert(
                name,
                points=[
                    models.PointStruct(
                        id=point_id(c.chunk_id), vector=list(c.embedding), payload=_payload(c)
                    )
                    for c in chunks[start : start + PAGE]
                ],
            )

    def _delete_documents(self, tenant: str, source: str, document_ids: list[str]) -> int:
        client = self._connected()
        name = collection_name(tenant, source)
        if not client.collection_exists(name):
            return 0
        where = _document_filter("document_id", document_ids)
        count = client.count(name, count_filter=where, exact=True).count
        client.delete(name, points_selector=models.FilterSelector(filter=where))
        return int(count)

    def _query(
        self,
        tenant: str,
        source: str,
        embedding: Sequence[float],
        n: int,
        document_ids: list[str] | None,
    ) -> list[Candidate]:
        name = self._name(tenant, source)
        if not self.fronted and not self._exists(name):
            return []
        field = self.mapping.document_id if self.mapping is not None else "document_id"
        found = self._connected().query_points(
            name,
            query=[float(x) for x in embedding],
            using=self.vector,
            query_filter=None if document_ids is None else _document_filter(field, document_ids),
            # Local mode is always exact (and warns about search parameters).
            search_params=models.SearchParams(exact=True)
            if document_ids is not None and self._remote
            else None,
            limit=n,
            with_payload=True,
        )
        hits = [self._candidate(p.id, p.payload, p.score) for p in found.points]
        if document_ids is not None:
            wanted = set(document_ids)
            hits = [h for h in hits if h.document_id in wanted]
        return hits

    def _count(self, tenant: str, source: str) -> int:
        name = self._name(tenant, source)
        if not self.fronted and not self._exists(name):
            return 0
        return int(self._connected().count(name, exact=True).count)

    def _drop(self, tenant: str, source: str) -> None:
        name = collection_name(tenant, source)
        client = self._connected()
        if client.collection_exists(name):
            client.delete_collection(name)

    async def _scan_since(self, since: float) -> AclScan:
        assert self.mapping is not None and self.mapping.updated_at is not None
        scan = AclScan(partial=True, high_water=since)
        newer = models.Filter(
            must=[models.FieldCondition(key=self.mapping.updated_at, range=models.Range(gte=since))]
        )
        changed: set[str] = set()
        async for page in self._payloads(newer):
            scan.stamp(page, self.mapping)
            changed.update(d for d in (document_id_of(p, self.mapping) for p in page) if d)
        ordered = sorted(changed)
        for start in range(0, len(ordered), PAGE):
            part = ordered[start : start + PAGE]
            async for page in self._payloads(_document_filter(self.mapping.document_id, part)):
                for payload in page:
                    if document_id_of(payload, self.mapping) in changed:
                        scan.add(acl_of(payload, self.mapping, lists=True))
        return scan

    async def _payloads(
        self, where: models.Filter | None
    ) -> AsyncIterator[list[Mapping[str, Any] | None]]:
        """Every point's payload (matching ``where``), a page per call: the timeout
        bounds one page, not a scan of the whole collection."""
        offset: Any = None
        while True:
            points, offset = await self._run("scan", self._page, where, offset)
            yield [p.payload for p in points]
            if offset is None:
                return

    def _page(self, where: models.Filter | None, offset: Any) -> tuple[list[Any], Any]:
        assert self.collection is not None
        return self._connected().scroll(
            self.collection, scroll_filter=where, limit=PAGE, offset=offset, with_payload=True
        )

    def _candidate(self, pid: object, payload: Mapping[str, Any] | None, score: float) -> Candidate:
        data = payload or {}
        distance = 1.0 - float(score)
        if self.mapping is not None:
            text = data.get(self.text_field)
            return Candidate(
                str(pid),
                document_id_of(data, self.mapping),
                self.tenant,
                self.source,
                text if isinstance(text, str) else "",
                distance,
                scalar_metadata(data, self.mapping.fields() | {self.text_field}),
            )
        user = data.get("metadata")
        return Candidate(
            _str(data, "chunk_id") or str(pid),
            _str(data, "document_id"),
            _str(data, "tenant"),
            _str(data, "source"),
            _str(data, "text") or "",
            distance,
            scalar_metadata(user if isinstance(user, Mapping) else {}, frozenset()),
        )


def _payload(chunk: ChunkRecord) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "tenant": chunk.tenant,
        "source": chunk.source,
        "document_id": chunk.document_id,
        "chunk_id": chunk.chunk_id,
        "text": chunk.text,
        "metadata": dict(chunk.metadata),
    }
    index = chunk_index(chunk.chunk_id, chunk.document_id)
    if index is not None:
        payload["chunk_index"] = index
    return payload


def _document_filter(field: str, document_ids: Sequence[str]) -> models.Filter:
    return models.Filter(
        must=[models.FieldCondition(key=field, match=models.MatchAny(any=list(document_ids)))]
    )


def _str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


__all__ = ["Metadata", "QdrantStore", "collection_name", "point_id", "qdrant_errors"]
