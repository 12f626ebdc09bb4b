"""The in-memory store: exact cosine search in numpy, and the public test seam.

:class:`InMemoryStore` is the reference :class:`~connectors.base.VectorStore`: every
(tenant, source) pair has its own space, search is exact, ties are broken by chunk
id. Like httpx's ``MockTransport`` it is meant for tests of the code above the store:
:meth:`InMemoryStore.plant` stores a chunk with wrong or missing stamps and
``unavailable`` makes every call fail.

The stamp rules and the exact top-n here are shared by every connector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from connectors.base import Candidate, ChunkRecord, Metadata
from gateway.errors import InvalidRequest, SourceUnavailable

#: Metadata keys a connector writes on every chunk; user metadata may not use them.
STAMP_KEYS = frozenset({"tenant", "source", "document_id", "chunk_index"})

Matrix = npt.NDArray[np.float64]


def check_chunks(tenant: str, source: str, chunks: Sequence[ChunkRecord]) -> None:
    """Refuse (InvalidRequest) a batch no connector should store.

    Each chunk must be stamped for this tenant and source, use no reserved metadata
    key, carry a non-empty finite embedding of the batch's dimension, and appear once.
    """
    seen: set[str] = set()
    dimensions = {len(c.embedding) for c in chunks}
    if len(dimensions) > 1:
        raise InvalidRequest(f"embeddings of one batch differ in dimension: {sorted(dimensions)}")
    for chunk in chunks:
        if chunk.tenant != tenant or chunk.source != source:
            raise InvalidRequest(f"chunk {chunk.chunk_id!r} is stamped for another tenant/source")
        if reserved := STAMP_KEYS.intersection(chunk.metadata):
            raise InvalidRequest(f"metadata keys {sorted(reserved)} are reserved")
        if not chunk.embedding or not all(math.isfinite(x) for x in chunk.embedding):
            raise InvalidRequest(f"chunk {chunk.chunk_id!r} has an empty or non-finite embedding")
        if chunk.chunk_id in seen:
            raise InvalidRequest(f"chunk {chunk.chunk_id!r} appears twice in one batch")
        seen.add(chunk.chunk_id)


def cosine_top_n(
    query: Sequence[float], ids: Sequence[str], matrix: Matrix, n: int
) -> list[tuple[int, float]]:
    """``(row, cosine distance)`` of the ``n`` rows nearest ``query``, nearest first.

    Exact; equal distances are ordered by id. ``matrix`` has one row per id.
    """
    if n <= 0 or not ids:
        return []
    q = np.asarray(query, dtype=np.float64)
    if q.ndim != 1 or not np.isfinite(q).all():
        raise SourceUnavailable("query embedding is not a finite vector")
    if matrix.ndim != 2 or matrix.shape[1] != q.shape[0]:
        raise SourceUnavailable(
            f"query has {q.shape[0]} dimensions, the source holds {matrix.shape[-1]}"
        )
    # einsum computes the row norms about three times faster than linalg.norm.
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix)) * float(np.linalg.norm(q))
    # Not ``matrix @ q``: BLAS kernels round rows differently by their position in
    # the block, so identical vectors would get distances 1e-16 apart and an exact tie
    # would be broken by position instead of by id. einsum computes every row alike.
    distances = 1.0 - np.einsum("ij,j->i", matrix, q) / np.clip(norms, 1e-12, None)
    order = np.lexsort((np.asarray(ids), distances))[:n]
    return [(int(row), float(distances[row])) for row in order]


@dataclass(frozen=True, slots=True)
class _Stored:
    candidate: Candidate
    vector: tuple[float, ...]


@dataclass(slots=True)
class _Space:
    chunks: dict[str, _Stored] = field(default_factory=dict)
    _matrix: Matrix | None = None

    def check_dimension(self, dimension: int) -> None:
        first = next(iter(self.chunks.values()), None)
        if first is not None and len(first.vector) != dimension:
            raise SourceUnavailable(
                f"embedding has {dimension} dimensions, the source holds {len(first.vector)}"
            )

    def put(self, stored: _Stored) -> None:
        self.chunks[stored.candidate.chunk_id] = stored
        self._matrix = None

    def remove(self, chunk_ids: Sequence[str]) -> None:
        for chunk_id in chunk_ids:
            del self.chunks[chunk_id]
        self._matrix = None

    def matrix(self) -> Matrix:
        if self._matrix is None:
            self._matrix = np.array([s.vector for s in self.chunks.values()], dtype=np.float64)
        return self._matrix


class InMemoryStore:
    """A :class:`~connectors.base.VectorStore` in process memory, exact and deterministic.

    Set ``unavailable = True`` to make every call raise SourceUnavailable (and
    :meth:`healthy` answer False), as a failing store would.
    """

    def __init__(self) -> None:
        self._spaces: dict[tuple[str, str], _Space] = {}
        self.unavailable = False

    async def upsert(self, tenant: str, source: str, chunks: Sequence[ChunkRecord]) -> None:
        """Insert or replace chunks by chunk id."""
        self._check_available()
        check_chunks(tenant, source, chunks)
        if not chunks:
            return
        space = self._spaces.setdefault((tenant, source), _Space())
        space.check_dimension(len(chunks[0].embedding))
        for chunk in chunks:
            space.put(_stored(chunk))

    async def delete_documents(self, tenant: str, source: str, document_ids: Sequence[str]) -> int:
        """Remove the chunks stamped with ``document_ids``; return how many there were."""
        self._check_available()
        space = self._spaces.get((tenant, source), _Space())
        wanted = set(document_ids)
        doomed = [cid for cid, s in space.chunks.items() if s.candidate.document_id in wanted]
        space.remove(doomed)
        return len(doomed)

    async def search(
        self, tenant: str, source: str, embedding: Sequence[float], n: int
    ) -> list[Candidate]:
        """The ``n`` nearest chunks, nearest first (exact)."""
        self._check_available()
        space = self._spaces.get((tenant, source))
        if space is None or not space.chunks:
            return []
        return _ranked(embedding, list(space.chunks.values()), space.matrix(), n)

    async def search_documents(
        self,
        tenant: str,
        source: str,
        embedding: Sequence[float],
        n: int,
        document_ids: Sequence[str],
    ) -> list[Candidate]:
        """The ``n`` nearest chunks among those of ``document_ids``, nearest first."""
        self._check_available()
        wanted = set(document_ids)
        space = self._spaces.get((tenant, source), _Space())
        kept = [s for s in space.chunks.values() if s.candidate.document_id in wanted]
        if not kept:
            return []
        matrix = np.array([s.vector for s in kept], dtype=np.float64)
        return _ranked(embedding, kept, matrix, n)

    async def count(self, tenant: str, source: str) -> int:
        """How many chunks (tenant, source) holds."""
        self._check_available()
        return len(self._spaces.get((tenant, source), _Space()).chunks)

    async def drop(self, tenant: str, source: str) -> None:
        """Forget everything (tenant, source) holds."""
        self._check_available()
        self._spaces.pop((tenant, source), None)

    async def healthy(self) -> bool:
        """False while ``unavailable`` is set."""
        return not self.unavailable

    def plant(
        self,
        tenant: str,
        source: str,
        *,
        chunk_id: str,
        text: str,
        embedding: Sequence[float],
        document_id: str | None = None,
        stamped_tenant: str | None = None,
        stamped_source: str | None = None,
        metadata: Metadata | None = None,
    ) -> None:
        """Test seam: store a chunk in (tenant, source) with exactly these stamps.

        Nothing is checked, so a chunk can carry another tenant's stamp or none at all,
        as a corrupted or foreign collection would; the gateway must never release it.
        """
        candidate = Candidate(
            chunk_id, document_id, stamped_tenant, stamped_source, text, 0.0, metadata or {}
        )
        space = self._spaces.setdefault((tenant, source), _Space())
        space.check_dimension(len(embedding))
        space.put(_Stored(candidate, tuple(float(x) for x in embedding)))

    def _check_available(self) -> None:
        if self.unavailable:
            raise SourceUnavailable("in-memory store marked unavailable")


def _stored(chunk: ChunkRecord) -> _Stored:
    candidate = Candidate(
        chunk.chunk_id,
        chunk.document_id,
        chunk.tenant,
        chunk.source,
        chunk.text,
        0.0,
        dict(chunk.metadata),
    )
    return _Stored(candidate, tuple(float(x) for x in chunk.embedding))


def _ranked(
    embedding: Sequence[float], stored: list[_Stored], matrix: Matrix, n: int
) -> list[Candidate]:
    ids = [s.candidate.chunk_id for s in stored]
    return [
        replace(stored[row].candidate, distance=distance)
        for row, distance in cosine_top_n(embedding, ids, matrix, n)
    ]
