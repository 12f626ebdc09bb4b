"""The interface every vector-store connector implements.

Connectors are scoped physically: every call names the tenant and the source, and a
connector keeps each (tenant, source) pair in its own collection. They know nothing
about authorization; the gateway re-checks every candidate they return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Metadata = Mapping[str, str | int | float | bool]


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """A chunk as stored: the tenant/source/document stamps travel with it."""

    chunk_id: str
    document_id: str
    tenant: str
    source: str
    text: str
    embedding: Sequence[float]
    metadata: Metadata = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A search hit. ``distance`` is the store's (smaller is closer)."""

    chunk_id: str
    document_id: str | None
    tenant: str | None
    source: str | None
    text: str
    distance: float
    metadata: Metadata = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Cosine similarity for cosine-distance stores: 1 - distance."""
        return 1.0 - self.distance


@runtime_checkable
class VectorStore(Protocol):
    """What the gateway needs from a store. All methods are async and may raise
    :class:`gateway.errors.SourceUnavailable` (and nothing else) on failure."""

    async def upsert(self, tenant: str, source: str, chunks: Sequence[ChunkRecord]) -> None: ...

    async def delete_documents(self, tenant: str, source: str, document_ids: Sequence[str]) -> int:
        """Remove every chunk stamped with one of ``document_ids``; return how many."""
        ...

    async def search(
        self, tenant: str, source: str, embedding: Sequence[float], n: int
    ) -> list[Candidate]:
        """The ``n`` nearest chunks, nearest first (a prefix of the store's ranking)."""
        ...

    async def search_documents(
        self,
        tenant: str,
        source: str,
        embedding: Sequence[float],
        n: int,
        document_ids: Sequence[str],
    ) -> list[Candidate]:
        """Exact nearest chunks restricted to ``document_ids`` (pre-filter path)."""
        ...

    async def count(self, tenant: str, source: str) -> int: ...

    async def drop(self, tenant: str, source: str) -> None: ...

    async def healthy(self) -> bool: ...


def describe_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Source config as shown to admins: secrets masked."""
    return {k: ("***" if "key" in k or "token" in k else v) for k, v in config.items()}
