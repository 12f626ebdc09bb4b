"""The Chroma connector: embedded (a persistent path) or a Chroma server (a URL).

Scoping is physical: each (tenant, source) pair has its own cosine collection, named
from a hash of the pair and carrying the pair in its metadata, which is verified every
time the collection is opened. Every chunk is stamped with ``tenant``, ``source``,
``document_id`` and (when its id is ``<document_id>#<n>``) ``chunk_index``.

:meth:`ChromaStore.search` is one unfiltered nearest-neighbour query. The pre-filter
path, :meth:`ChromaStore.search_documents`, never uses a metadata filter (a full scan
in Chroma): a second collection per pair maps each document id to its chunk ids, the
chunks are fetched by id and ranked exactly in numpy. That index is written before the
chunks and cleared after them, so it always lists at least every stored chunk.

Chroma's client is synchronous; every call runs in a worker thread under a deadline,
and every failure leaves through :func:`chroma_errors` as SourceUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import os
import sqlite3
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import chromadb
import httpx
import numpy as np
import numpy.typing as npt
from chromadb.api import ClientAPI
from chromadb.api.client import Client
from chromadb.api.models.Collection import Collection
from chromadb.api.types import Include
from chromadb.config import Settings
from chromadb.errors import ChromaError, NotFoundError

from connectors.base import Candidate, ChunkRecord, Metadata
from connectors.chunking import chunk_index
from connectors.memory import STAMP_KEYS, Matrix, check_chunks, cosine_top_n
from connectors.vectors import (
    DEFAULT_MAX_BYTES,
    ContentVersions,
    DocumentVectors,
    VectorCache,
    confirmed,
)
from gateway.errors import ScopegateError, SourceUnavailable

T = TypeVar("T")

CHUNKS = "chunks"
# HNSW search breadth of new chunk collections. Chroma's default (100) misses true
# neighbours inside windows the gateway trusts (top 20 of 40 at 100k chunks: recall
# 0.997); 500 finds them all in bench/ and costs no measurable latency, because a
# query's time is dominated by reading metadata, not by the graph walk.
HNSW_EF_SEARCH = 500
# The HNSW graph itself: with Chroma's defaults (16 neighbours per node, ef_construction
# 100) the graph misses true neighbours once distances flatten out beyond the nearest
# cluster (bench/hnsw_recall.py, 10k chunks: in windows of 250, 9 to 12 of 30 queries
# miss one of the exact top 125; raising ef_search to 2000 still left 1). 32 neighbours
# and ef_construction 400 brought it to 0 or 1 of 30 at ef_search 500, for about twice
# the indexing time.
# Collections keep the parameters they were created with.
HNSW_MAX_NEIGHBORS = 32
HNSW_EF_CONSTRUCTION = 400
DOCUMENT_INDEX = "document_index"
_TEXT: Include = ["documents", "metadatas"]
_STACKS = 2  # stacked supersets remembered per store (float64: 3 kB per 384-dim chunk)
_WORKERS = 8  # threads per store; Chroma's embedded client releases the GIL in Rust

# Everything a Chroma call can raise: its own errors; every httpx exception (HTTPError
# and the two that do not derive from it); the disk and SQLite under the embedded mode;
# a server or deadline timeout (TimeoutError is an OSError); argument validation
# (ValueError, TypeError); numpy; answers of the wrong shape (LookupError,
# AttributeError).
UPSTREAM_ERRORS: tuple[type[Exception], ...] = (
    ChromaError,
    httpx.HTTPError,
    httpx.InvalidURL,
    httpx.CookieConflict,
    OSError,
    sqlite3.Error,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    ArithmeticError,
    RuntimeError,
)


@contextlib.contextmanager
def chroma_errors(action: str) -> Iterator[None]:
    """Translate every failure of a Chroma call into SourceUnavailable (fail closed)."""
    try:
        yield
    except ScopegateError:
        raise
    except TimeoutError as exc:
        raise SourceUnavailable(f"Chroma {action} timed out") from exc
    except UPSTREAM_ERRORS as exc:
        raise SourceUnavailable(
            f"Chroma {action} failed: {type(exc).__name__}", detail=str(exc)[:500] or None
        ) from exc


def collection_name(tenant: str, source: str, kind: str = CHUNKS) -> str:
    """The collection of (tenant, source): distinct pairs never share a name."""
    digest = hashlib.sha256(json.dumps([tenant, source]).encode()).hexdigest()[:32]
    return f"sg_{digest}" if kind == CHUNKS else f"sg_{digest}_docs"


class ChromaStore:
    """A :class:`~connectors.base.VectorStore` on Chroma.

    Give exactly one of ``path`` (embedded, persistent, telemetry off) or ``url`` (a
    Chroma server, ``http://host:port``; ``headers`` are sent with every request).
    Nothing connects until the first call. ``timeout`` bounds each read and
    ``write_timeout`` each write, in seconds (None: no deadline); Chroma writes cost
    about a millisecond per chunk, so ingest in batches the write deadline allows.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        url: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = 10.0,
        write_timeout: float | None = 300.0,
        vector_cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if path is not None and url is None:
            self._connect = _persistent_connector(path)
        elif url is not None and path is None:
            self._connect = _http_connector(url, headers)
        else:
            raise ValueError("ChromaStore needs exactly one of path or url")
        self.timeout = timeout
        self.write_timeout = write_timeout
        self._client: ClientAPI | None = None
        self._batch = 0
        self._collections: dict[tuple[str, str, str], Collection] = {}
        # Chroma's HTTP client has no timeout, so a hung server holds a thread until the
        # connection dies: give the store its own threads instead of the shared default
        # executor, and never let the event loop wait on a lock held across I/O.
        self._executor = ThreadPoolExecutor(_WORKERS, thread_name_prefix="chroma")
        self._lock = threading.Lock()  # guards _collections only, never held across I/O
        self._connect_lock = threading.Lock()
        # Index entries are read, merged and written back: one writer at a time.
        self._write_lock = threading.Lock()
        self._vector_cache = VectorCache(vector_cache_bytes)
        self._stacks: OrderedDict[
            tuple[str, str, tuple[int, ...]], tuple[list[DocumentVectors], list[str], Matrix]
        ] = OrderedDict()

    @property
    def vector_cache(self) -> VectorCache:
        """The chunk vectors kept for :meth:`search_documents_versioned`."""
        return self._vector_cache

    async def upsert(self, tenant: str, source: str, chunks: Sequence[ChunkRecord]) -> None:
        """Insert or replace chunks by chunk id (InvalidRequest for a malformed batch)."""
        check_chunks(tenant, source, chunks)
        if chunks:
            await self._write("upsert", self._upsert, tenant, source, list(chunks))

    async def delete_documents(self, tenant: str, source: str, document_ids: Sequence[str]) -> int:
        """Remove the chunks stamped with ``document_ids``; return how many there were."""
        if not document_ids:
            return 0
        wanted = list(dict.fromkeys(document_ids))
        return await self._write("delete", self._delete_documents, tenant, source, wanted)

    async def search(
        self, tenant: str, source: str, embedding: Sequence[float], n: int
    ) -> list[Candidate]:
        """The ``n`` nearest chunks by cosine distance, nearest first (no filter)."""
        return await self._run("query", self._search, tenant, source, embedding, n)

    async def search_documents(
        self,
        tenant: str,
        source: str,
        embedding: Sequence[float],
        n: int,
        document_ids: Sequence[str],
    ) -> list[Candidate]:
        """The exact ``n`` nearest chunks of ``document_ids``, nearest first."""
        hits, _ = await self._run(
            "get by document", self._search_documents, tenant, source, embedding, n, document_ids
        )
        return hits

    async def search_documents_versioned(
        self,
        tenant: str,
        source: str,
        embedding: Sequence[float],
        n: int,
        document_ids: Sequence[str],
        versions: ContentVersions,
    ) -> list[Candidate]:
        """:meth:`search_documents`, reusing the vectors of documents whose content
        version (``versions``, the gateway's catalog) is the one they were read under.

        Vectors read here are kept only for documents whose version was the same before
        and after the read (an update in flight clears it, a finished one changes it).
        """
        ids = list(dict.fromkeys(document_ids))
        before = await versions(ids) if ids and n > 0 and self._vector_cache.max_bytes else {}
        hits, fill = await self._run(
            "get by document", self._search_documents, tenant, source, embedding, n, ids, before
        )
        labelled = {d: e.version for d, e in fill.read.items()}
        for d in await confirmed(versions, labelled):
            self._vector_cache.put((tenant, source, d), fill.read[d], fill.generation)
        return hits

    async def count(self, tenant: str, source: str) -> int:
        """How many chunks (tenant, source) holds."""
        return await self._run("count", self._count, tenant, source)

    async def drop(self, tenant: str, source: str) -> None:
        """Delete both collections of (tenant, source)."""
        await self._write("drop", self._drop, tenant, source)

    async def healthy(self) -> bool:
        """Whether Chroma answers a heartbeat within the deadline."""
        try:
            await self._run("heartbeat", lambda: self._connected().heartbeat())
        except SourceUnavailable:
            return False
        return True

    def close(self) -> None:
        """Release the client (the embedded database's files once its last user closes)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        client, self._client = self._client, None
        self._forget_collections()
        if isinstance(client, Client):
            client.close()

    # -- running -----------------------------------------------------------------

    async def _run(self, action: str, call: Callable[..., T], *args: Any) -> T:
        return await self._call(action, self.timeout, call, *args)

    async def _write(self, action: str, call: Callable[..., T], *args: Any) -> T:
        return await self._call(action, self.write_timeout, call, *args)

    async def _call(
        self, action: str, deadline: float | None, call: Callable[..., T], *args: Any
    ) -> T:
        with chroma_errors(action):
            try:
                async with asyncio.timeout(deadline):
                    try:
                        return await self._in_thread(call, *args)
                    except NotFoundError:
                        # A collection this process holds was dropped (and maybe made
                        # again) by another process, such as another gateway replica:
                        # open it by name and run the call once more (every call here
                        # is an upsert, a delete or a read, so running it twice is safe).
                        self._forget_collections()
                        return await self._in_thread(call, *args)
            except Exception:
                # A collection dropped or recreated elsewhere: reopen on the next call.
                self._forget_collections()
                raise

    async def _in_thread(self, call: Callable[..., T], *args: Any) -> T:
        """``asyncio.to_thread`` on the store's own threads (context variables included)."""
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, context.run, call, *args)

    def _connected(self) -> ClientAPI:
        client = self._client
        if client is None:
            with self._connect_lock:
                client = self._client or self._new_client()
        return client

    def _new_client(self) -> ClientAPI:
        client = self._connect()
        self._batch = client.get_max_batch_size()
        self._client = client
        return client

    def _forget_collections(self) -> None:
        with self._lock:
            self._collections.clear()

    def _open(self, tenant: str, source: str, kind: str, *, create: bool) -> Collection | None:
        """The verified collection, None if it does not exist and ``create`` is false."""
        key = (tenant, source, kind)
        with self._lock:
            cached = self._collections.get(key)
        if cached is not None:
            return cached
        collection = _open_collection(self._connected(), tenant, source, kind, create)
        if collection is not None:
            _verify(collection, tenant, source, kind)
            with self._lock:
                self._collections[key] = collection
        return collection

    def _writable(self, tenant: str, source: str, kind: str) -> Collection:
        collection = self._open(tenant, source, kind, create=True)
        if collection is None:
            raise SourceUnavailable(f"Chroma did not create the {kind} collection")
        return collection

    @contextlib.contextmanager
    def _forgetting(
        self, tenant: str, source: str, document_ids: Sequence[str] | None = None
    ) -> Iterator[None]:
        """Forget the kept vectors of what a write touches, before and after it, so
        that no search that read during the write keeps what it read."""
        self._vector_cache.forget(tenant, source, document_ids)
        try:
            yield
        finally:
            self._vector_cache.forget(tenant, source, document_ids)

    def _open_pair(self, tenant: str, source: str) -> tuple[Collection, Collection] | None:
        chunks = self._open(tenant, source, CHUNKS, create=False)
        index = self._open(tenant, source, DOCUMENT_INDEX, create=False)
        return None if chunks is None or index is None else (chunks, index)

    # -- operations (worker thread) ----------------------------------------------

    def _upsert(self, tenant: str, source: str, chunks: list[ChunkRecord]) -> None:
        collection = self._writable(tenant, source, CHUNKS)
        index = self._writable(tenant, source, DOCUMENT_INDEX)
        with self._write_lock, self._forgetting(tenant, source, [c.document_id for c in chunks]):
            self._index_chunks(index, tenant, source, chunks)
            for batch in _batches(chunks, self._batch):
                collection.upsert(
                    ids=[c.chunk_id for c in batch],
                    embeddings=np.asarray([c.embedding for c in batch], dtype=np.float32),
                    documents=[c.text for c in batch],
                    metadatas=[_stamped_metadata(c) for c in batch],
                )

    def _index_chunks(
        self, index: Collection, tenant: str, source: str, chunks: list[ChunkRecord]
    ) -> None:
        documents = list(dict.fromkeys(c.document_id for c in chunks))
        listed = _listed_chunk_ids(index, documents)
        for chunk in chunks:
            listed.setdefault(chunk.document_id, []).append(chunk.chunk_id)
        for batch in _batches(documents, self._batch):
            index.upsert(
                ids=batch,
                # Chroma stores a vector with every record; the index needs none.
                embeddings=np.ones((len(batch), 1), dtype=np.float32),
                metadatas=[
                    _index_metadata(tenant, source, d, list(dict.fromkeys(listed[d])))
                    for d in batch
                ],
            )

    def _delete_documents(self, tenant: str, source: str, document_ids: list[str]) -> int:
        pair = self._open_pair(tenant, source)
        if pair is None:
            return 0
        collection, index = pair
        wanted = set(document_ids)
        with self._write_lock, self._forgetting(tenant, source, document_ids):
            listed = _listed_chunk_ids(index, document_ids)
            if not listed:
                return 0  # none of them is stored: nothing to read or delete
            chunk_ids = list(dict.fromkeys(cid for ids in listed.values() for cid in ids))
            stored = _records(collection, chunk_ids, ["metadatas"], self._batch)
            # The index may still list a chunk that has moved to another document.
            owned = [
                cid for cid, (_, meta) in stored.items() if _stamp(meta, "document_id") in wanted
            ]
            for batch in _batches(owned, self._batch):
                collection.delete(ids=batch)
            for batch in _batches(list(listed), self._batch):
                index.delete(ids=batch)
        return len(owned)

    def _search(
        self, tenant: str, source: str, embedding: Sequence[float], n: int
    ) -> list[Candidate]:
        collection = self._open(tenant, source, CHUNKS, create=False)
        if collection is None or n <= 0:
            return []
        found = collection.query(
            query_embeddings=_query_vector(embedding),
            n_results=n,
            include=["documents", "metadatas", "distances"],
        )
        return [
            _candidate(cid, text, meta, distance)
            for cid, text, meta, distance in zip(
                found["ids"][0],
                _first(found["documents"]),
                _first(found["metadatas"]),
                _first(found["distances"]),
                strict=True,
            )
        ]

    def _search_documents(
        self,
        tenant: str,
        source: str,
        embedding: Sequence[float],
        n: int,
        document_ids: Sequence[str],
        versions: Mapping[str, str | None] | None = None,
    ) -> tuple[list[Candidate], _Fill]:
        """The exact ``n`` nearest chunks, and the vectors read for documents that have
        a version in ``versions`` (to be cached once the version is confirmed)."""
        wanted = set(document_ids)
        pair = self._open_pair(tenant, source) if wanted and n > 0 else None
        if pair is None:
            return [], _Fill(0, {})
        collection, index = pair
        generation = self._vector_cache.generation(tenant, source)
        known = versions or {}
        where = str(collection.id)
        ordered = sorted(wanted)
        entries = self._vector_cache.get_many(
            [((tenant, source, d), known.get(d)) for d in ordered], where
        )
        cached = [e for e in entries if e is not None]
        unread = [d for d, e in zip(ordered, entries, strict=True) if e is None]
        listed = _listed_chunk_ids(index, unread) if unread else {}
        chunk_ids = list(dict.fromkeys(cid for ids in listed.values() for cid in ids))
        # Rank on the vectors alone, then read texts and stamps for the winners only:
        # fetching everything for every listed chunk costs about twice as much.
        fresh_ids, fresh = _vectors(collection, chunk_ids, self._batch)
        fill = _Fill(generation, _read_documents(where, known, listed, fresh_ids, fresh))
        if fresh_ids:
            ids, vectors = _stack(cached, fresh_ids, fresh)
        else:
            ids, vectors = self._stacked(tenant, source, cached)
        hits: list[Candidate] = []
        for page in _ranked_pages(embedding, ids, vectors, n):
            stored = _records(collection, [ids[row] for row, _ in page], _TEXT, self._batch)
            for row, distance in page:
                text, meta = stored.get(ids[row], (None, None))
                # The index may still list a chunk that has moved to another document.
                if _stamp(meta, "document_id") in wanted:
                    hits.append(_candidate(ids[row], text, meta, distance))
            if len(hits) >= n:
                break
        return hits[:n], fill

    def _stacked(
        self, tenant: str, source: str, cached: list[DocumentVectors]
    ) -> tuple[list[str], Matrix]:
        """:func:`_stack` of kept entries only, remembered for the last few supersets
        (a task's retrievals rank the same documents again and again)."""
        key = (tenant, source, tuple(map(id, cached)))
        with self._lock:
            memo = self._stacks.get(key)
            if memo is not None:
                self._stacks.move_to_end(key)
                return memo[1], memo[2]
        ids, matrix = _stack(cached, [], np.zeros((0, 0)))
        with self._lock:
            # The entries are kept with it: their ids cannot be reused while it lives.
            self._stacks[key] = (cached, ids, matrix)
            while len(self._stacks) > _STACKS:
                self._stacks.popitem(last=False)
        return ids, matrix

    def _count(self, tenant: str, source: str) -> int:
        collection = self._open(tenant, source, CHUNKS, create=False)
        return 0 if collection is None else collection.count()

    def _drop(self, tenant: str, source: str) -> None:
        client = self._connected()
        with self._forgetting(tenant, source):
            for kind in (CHUNKS, DOCUMENT_INDEX):
                # Opening verifies the owner first: never drop a collection we did not make.
                if self._open(tenant, source, kind, create=False) is not None:
                    with contextlib.suppress(NotFoundError):
                        client.delete_collection(collection_name(tenant, source, kind))
        self._forget_collections()


# -- clients and collections ---------------------------------------------------------


def _persistent_connector(path: str | os.PathLike[str]) -> Callable[[], ClientAPI]:
    location = os.fspath(path)
    return lambda: chromadb.PersistentClient(
        path=location, settings=Settings(anonymized_telemetry=False)
    )


def _http_connector(url: str, headers: Mapping[str, str] | None) -> Callable[[], ClientAPI]:
    parts = urllib.parse.urlsplit(url)
    if (
        parts.scheme not in {"http", "https"}
        or not parts.hostname
        or parts.path not in {"", "/"}
        or parts.query
        or parts.username
    ):
        raise ValueError("Chroma url must look like http(s)://host[:port]")
    secure = parts.scheme == "https"
    host, port = parts.hostname, parts.port or (443 if secure else 80)
    return lambda: chromadb.HttpClient(
        host=host,
        port=port,
        ssl=secure,
        headers=dict(headers or {}),
        settings=Settings(anonymized_telemetry=False),
    )


def _open_collection(
    client: ClientAPI, tenant: str, source: str, kind: str, create: bool
) -> Collection | None:
    name = collection_name(tenant, source, kind)
    if create:
        return client.get_or_create_collection(
            name,
            configuration={
                "hnsw": {
                    "space": "cosine",
                    "ef_search": HNSW_EF_SEARCH,
                    "ef_construction": HNSW_EF_CONSTRUCTION,
                    "max_neighbors": HNSW_MAX_NEIGHBORS,
                }
                if kind == CHUNKS
                else {"space": "l2"}
            },
            metadata={"scopegate": kind, "tenant": tenant, "source": source},
            embedding_function=None,
        )
    try:
        return client.get_collection(name, embedding_function=None)
    except NotFoundError:
        return None


def _verify(collection: Collection, tenant: str, source: str, kind: str) -> None:
    """Refuse a collection made for another pair or purpose, or not ranked by cosine."""
    expected = {"scopegate": kind, "tenant": tenant, "source": source}
    metadata = collection.metadata or {}
    if any(metadata.get(key) != value for key, value in expected.items()):
        raise SourceUnavailable(f"collection {collection.name} belongs to another tenant/source")
    if kind == CHUNKS and _space(collection) != "cosine":
        raise SourceUnavailable(f"collection {collection.name} is not a cosine collection")


def _space(collection: Collection) -> str | None:
    configuration = collection.configuration_json or {}
    for index in ("hnsw", "spann"):
        space = (configuration.get(index) or {}).get("space")
        if space is not None:
            return str(space)
    return None


# -- records ---------------------------------------------------------------------------


def _stamped_metadata(chunk: ChunkRecord) -> dict[str, str | int | float | bool]:
    stamps: dict[str, str | int | float | bool] = {
        "tenant": chunk.tenant,
        "source": chunk.source,
        "document_id": chunk.document_id,
    }
    index = chunk_index(chunk.chunk_id, chunk.document_id)
    if index is not None:
        stamps["chunk_index"] = index
    return {**chunk.metadata, **stamps}


def _index_metadata(
    tenant: str, source: str, document_id: str, chunk_ids: list[str]
) -> dict[str, str | int]:
    return {
        "tenant": tenant,
        "source": source,
        "document_id": document_id,
        "chunk_ids": json.dumps(chunk_ids),
        "chunks": len(chunk_ids),
    }


def _listed_chunk_ids(index: Collection, document_ids: list[str]) -> dict[str, list[str]]:
    """document id -> chunk ids, for the documents the index knows."""
    listed: dict[str, list[str]] = {}
    for batch in _batches(document_ids, 1000):
        found = index.get(ids=batch, include=["metadatas"])
        for document_id, meta in zip(found["ids"], found["metadatas"] or [], strict=True):
            ids = json.loads(str((meta or {})["chunk_ids"]))
            listed[document_id] = [str(cid) for cid in ids]
    return listed


def _vectors(collection: Collection, ids: list[str], batch: int) -> tuple[list[str], Matrix]:
    """The ids found among ``ids`` and their embeddings, one row each."""
    found_ids: list[str] = []
    rows: list[Matrix] = []
    for part in _batches(ids, batch):
        found = collection.get(ids=part, include=["embeddings"])
        if found["ids"]:
            found_ids += found["ids"]
            rows.append(np.asarray(found["embeddings"], dtype=np.float64))
    return found_ids, (np.vstack(rows) if rows else np.zeros((0, 0), dtype=np.float64))


@dataclass(frozen=True, slots=True)
class _Fill:
    """Vectors read by one search, by document, labelled with the version presented;
    ``generation``: the pair's write generation when the read began."""

    generation: int
    read: dict[str, DocumentVectors]


def _read_documents(
    collection: str,
    versions: Mapping[str, str | None],
    listed: Mapping[str, list[str]],
    ids: list[str],
    vectors: Matrix,
) -> dict[str, DocumentVectors]:
    """Per-document entries of the vectors just read, for documents with a version."""
    rows = {cid: row for row, cid in enumerate(ids)}
    read: dict[str, DocumentVectors] = {}
    for document_id, chunk_ids in listed.items():
        version = versions.get(document_id)
        found = [cid for cid in dict.fromkeys(chunk_ids) if cid in rows]
        if version is None or not found:
            continue
        matrix = vectors[[rows[cid] for cid in found]].astype(np.float32)
        read[document_id] = DocumentVectors(collection, version, tuple(found), matrix)
    return read


def _ranked_pages(
    embedding: Sequence[float], ids: list[str], vectors: Matrix, n: int
) -> Iterator[list[tuple[int, float]]]:
    """Rows nearest first, in pages of ``n``: the nearest few are ranked first, the
    rest only if the winners run out (chunks stamped for other documents)."""
    first = min(len(ids), max(4 * n, 64))
    yield from _batches(cosine_top_n(embedding, ids, vectors, first), n)
    if first < len(ids):
        yield from _batches(cosine_top_n(embedding, ids, vectors, len(ids))[first:], n)


def _stack(
    cached: Sequence[DocumentVectors], ids: list[str], vectors: Matrix
) -> tuple[list[str], Matrix]:
    """Cached and freshly read rows as one float64 matrix, each chunk id once."""
    if not cached:
        return ids, vectors
    parts: list[npt.NDArray[Any]] = [e.matrix for e in cached]
    if ids:
        parts.append(vectors)
    all_ids = [cid for e in cached for cid in e.chunk_ids] + ids
    # One pass: the float32 rows are widened as they are copied in.
    matrix: Matrix = np.empty((len(all_ids), parts[0].shape[1]), dtype=np.float64)
    np.concatenate(parts, axis=0, out=matrix)
    if len(set(all_ids)) == len(all_ids):
        return all_ids, matrix
    keep = sorted({cid: row for row, cid in reversed(list(enumerate(all_ids)))}.values())
    return [all_ids[row] for row in keep], matrix[keep]


def _records(
    collection: Collection, ids: list[str], include: Include, batch: int
) -> dict[str, tuple[str | None, Mapping[str, Any] | None]]:
    """chunk id -> (text, metadata) for the ids found among ``ids``."""
    records: dict[str, tuple[str | None, Mapping[str, Any] | None]] = {}
    for part in _batches(ids, batch):
        found = collection.get(ids=part, include=include)
        missing: list[None] = [None] * len(found["ids"])
        texts: Sequence[str | None] = found["documents"] or missing
        metadatas: Sequence[Mapping[str, Any] | None] = found["metadatas"] or missing
        records.update(zip(found["ids"], zip(texts, metadatas, strict=True), strict=True))
    return records


def _candidate(
    chunk_id: str, text: str | None, metadata: Mapping[str, Any] | None, distance: float
) -> Candidate:
    """A hit with the stamps exactly as stored: a missing or non-text stamp is None."""
    meta = metadata or {}
    user: Metadata = {
        k: v
        for k, v in meta.items()
        if k not in STAMP_KEYS and isinstance(v, str | int | float | bool)
    }
    return Candidate(
        chunk_id,
        _stamp(meta, "document_id"),
        _stamp(meta, "tenant"),
        _stamp(meta, "source"),
        text or "",
        float(distance),
        user,
    )


def _stamp(metadata: Mapping[str, Any] | None, key: str) -> str | None:
    value = (metadata or {}).get(key)
    return value if isinstance(value, str) else None


def _query_vector(embedding: Sequence[float]) -> npt.NDArray[np.float32]:
    # Chroma refuses NaN in stored vectors but ranks a NaN query without complaint.
    vector = np.asarray([embedding], dtype=np.float32)
    if vector.ndim != 2 or not np.isfinite(vector).all():
        raise ValueError("query embedding is not a finite vector")
    return vector


def _first(column: list[list[T]] | None) -> list[T]:
    if column is None:
        raise ValueError("Chroma left out a requested field")
    return column[0]


def _batches(items: Sequence[T], size: int) -> Iterator[list[T]]:
    step = max(size, 1)
    for start in range(0, len(items), step):
        yield list(items[start : start + step])
