"""Any LangChain ``VectorStore`` behind scopegate's connector interface.

Users bring the store they have: :class:`LangChainStore` takes a factory that makes one
LangChain store per (tenant, source), so scoping stays physical. The factory gets an
``Embeddings`` object it must hand to the store: scopegate embeds the chunks itself,
and that object answers the store's ``embed_documents`` call with the vectors
scopegate computed (and refuses any other text).

What the adapter relies on, and where it falls back:

- search with scores: ``similarity_search_with_score_by_vector`` (scores as cosine
  similarity, the store's convention for ``InMemoryVectorStore``; other conventions
  are declared with ``score="distance"``);
- exact restriction to documents: a callable ``filter`` when the store takes one
  (``InMemoryVectorStore``); otherwise the whole pair is searched and filtered here;
- deletion and counts: by the chunk ids the adapter wrote (kept in this process; a
  store it did not fill from the start has to be fronted instead).

Every failure of the wrapped store leaves as SourceUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore as LangChainVectorStore

from connectors.base import Candidate, ChunkRecord
from connectors.mapping import scalar_metadata
from connectors.memory import STAMP_KEYS, check_chunks
from gateway.errors import ScopegateError, SourceUnavailable

StoreFactory = Callable[[Embeddings], LangChainVectorStore]


@contextlib.contextmanager
def langchain_errors(action: str) -> Iterator[None]:
    try:
        yield
    except ScopegateError:
        raise
    except Exception as exc:  # a foreign store may raise anything: fail closed
        raise SourceUnavailable(
            f"LangChain store {action} failed: {type(exc).__name__}", detail=str(exc)[:500]
        ) from exc


class _Precomputed(Embeddings):
    """Hands the wrapped store the vectors scopegate computed for the texts it adds."""

    def __init__(self) -> None:
        self._pending: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def vectors(self, texts: Sequence[str], vectors: Sequence[Sequence[float]]) -> Iterator[None]:
        with self._lock:
            self._pending = {t: [float(x) for x in v] for t, v in zip(texts, vectors, strict=True)}
            try:
                yield
            finally:
                self._pending = {}

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        try:
            return [self._pending[t] for t in texts]
        except KeyError as exc:
            raise RuntimeError("scopegate embeds chunks itself; no vector for this text") from exc

    def embed_query(self, text: str) -> list[float]:
        raise RuntimeError("scopegate passes query vectors, never query text")


class LangChainStore:
    """A :class:`~connectors.base.VectorStore` over LangChain stores, one per pair."""

    exact = False

    def __init__(
        self, factory: StoreFactory, *, score: Literal["similarity", "distance"] = "similarity"
    ) -> None:
        self._factory = factory
        self._score = score
        self._stores: dict[tuple[str, str], LangChainVectorStore] = {}
        self._embeddings: dict[tuple[str, str], _Precomputed] = {}
        # (tenant, source) -> document id -> chunk ids written through this adapter
        self._index: dict[tuple[str, str], dict[str, set[str]]] = {}

    async def upsert(self, tenant: str, source: str, chunks: Sequence[ChunkRecord]) -> None:
        check_chunks(tenant, source, chunks)
        if not chunks:
            return
        key = (tenant, source)
        store = self._store(key)
        docs = [
            Document(
                id=c.chunk_id,
                page_content=c.text,
                metadata={
                    **c.metadata,
                    "tenant": tenant,
                    "source": source,
                    "document_id": c.document_id,
                },
            )
            for c in chunks
        ]
        with (
            langchain_errors("upsert"),
            self._embeddings[key].vectors([c.text for c in chunks], [c.embedding for c in chunks]),
        ):
            await asyncio.to_thread(store.add_documents, docs, ids=[c.chunk_id for c in chunks])
        index = self._index.setdefault(key, {})
        for c in chunks:
            for ids in index.values():
                ids.discard(c.chunk_id)
            index.setdefault(c.document_id, set()).add(c.chunk_id)

    async def delete_documents(self, tenant: str, source: str, document_ids: Sequence[str]) -> int:
        key = (tenant, source)
        index = self._index.get(key, {})
        ids = sorted({cid for d in document_ids for cid in index.pop(d, set())})
        if ids:
            with langchain_errors("delete"):
                await asyncio.to_thread(self._store(key).delete, ids)
        return len(ids)

    async def search(
        self, tenant: str, source: str, embedding: Sequence[float], n: int
    ) -> list[Candidate]:
        key = (tenant, source)
        if n <= 0 or key not in self._stores:
            return []
        return await self._search(key, embedding, n, None)

    async def search_documents(
        self,
        tenant: str,
        source: str,
        embedding: Sequence[float],
        n: int,
        document_ids: Sequence[str],
    ) -> list[Candidate]:
        key = (tenant, source)
        if n <= 0 or not document_ids or key not in self._stores:
            return []
        return await self._search(key, embedding, n, frozenset(document_ids))

    async def count(self, tenant: str, source: str) -> int:
        return sum(len(ids) for ids in self._index.get((tenant, source), {}).values())

    async def drop(self, tenant: str, source: str) -> None:
        key = (tenant, source)
        ids = [i for chunk_ids in self._index.pop(key, {}).values() for i in chunk_ids]
        store = self._stores.pop(key, None)
        self._embeddings.pop(key, None)
        if store is not None and ids:
            with langchain_errors("drop"):
                await asyncio.to_thread(store.delete, ids)

    async def healthy(self) -> bool:
        return True

    def _store(self, key: tuple[str, str]) -> LangChainVectorStore:
        if key not in self._stores:
            embeddings = _Precomputed()
            self._embeddings[key] = embeddings
            self._stores[key] = self._factory(embeddings)
        return self._stores[key]

    async def _search(
        self,
        key: tuple[str, str],
        embedding: Sequence[float],
        n: int,
        wanted: frozenset[str] | None,
    ) -> list[Candidate]:
        store = self._stores[key]
        vector = [float(x) for x in embedding]
        search: Any = store.similarity_search_with_score_by_vector  # type: ignore[attr-defined]
        with langchain_errors("search"):
            if wanted is None:
                found = await asyncio.to_thread(search, vector, n)
            else:
                try:
                    found = await asyncio.to_thread(
                        search, vector, n, filter=lambda d: d.metadata.get("document_id") in wanted
                    )
                except TypeError:  # no callable filter: rank the whole pair, keep the wanted
                    everything = await self.count(*key)
                    found = await asyncio.to_thread(search, vector, max(everything, n))
        hits = [self._candidate(doc, float(score)) for doc, score in found]
        if wanted is not None:
            hits = [h for h in hits if h.document_id in wanted][:n]
        return sorted(hits, key=lambda c: (c.distance, c.chunk_id))

    def _candidate(self, doc: Document, score: float) -> Candidate:
        meta = doc.metadata or {}

        def stamp(name: str) -> str | None:
            value = meta.get(name)
            return value if isinstance(value, str) else None

        return Candidate(
            str(doc.id),
            stamp("document_id"),
            stamp("tenant"),
            stamp("source"),
            doc.page_content,
            1.0 - score if self._score == "similarity" else score,
            scalar_metadata(meta, STAMP_KEYS),
        )
