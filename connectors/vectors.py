"""A per-document cache of chunk vectors for exact ranking over permitted supersets.

The pre-filter ranks every chunk of the permitted documents; reading those vectors
from the store is most of its time. Entries are keyed by (tenant, source, document) and
labelled with the document's *content version*, as the gateway's catalog records it
once an ingestion has fully landed. An entry answers only a request that presents the
same version, read from the catalog before the search, so a re-ingested document is
read again. A label is attached only when the catalog showed the same version before
and after the vectors were read (:class:`VersionedSearch`); a document whose update was
in flight meanwhile is not cached.

A vector only orders candidates: texts and stamps are always read from the store for
the winners, and the gateway checks every returned document. A wrong vector could
misrank, never admit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from connectors.base import Candidate

#: document ids -> the catalog's content version of each (None while an update is in
#: flight; absent when the catalog does not place the document in this source).
ContentVersions = Callable[[Sequence[str]], Awaitable[Mapping[str, str | None]]]

DEFAULT_MAX_BYTES = 256 << 20
_KEY_OVERHEAD = 200  # bytes of bookkeeping per entry and per chunk id, roughly


@runtime_checkable
class VersionedSearch(Protocol):
    """A store whose exact search can reuse vectors of unchanged documents."""

    async def search_documents_versioned(
        self,
        tenant: str,
        source: str,
        embedding: Sequence[float],
        n: int,
        document_ids: Sequence[str],
        versions: ContentVersions,
    ) -> list[Candidate]:
        """:meth:`VectorStore.search_documents`, reusing vectors whose version holds."""
        ...


@dataclass(frozen=True, slots=True)
class DocumentVectors:
    """The chunk ids of one document and their vectors (one float32 row each), read
    from one collection (``collection``: the store's id for it) under ``version``."""

    collection: str
    version: str
    chunk_ids: tuple[str, ...]
    matrix: npt.NDArray[np.float32]

    @property
    def nbytes(self) -> int:
        return int(self.matrix.nbytes) + _KEY_OVERHEAD * (1 + len(self.chunk_ids))


Key = tuple[str, str, str]


class VectorCache:
    """Least recently used entries up to ``max_bytes`` (0 turns the cache off).

    Thread-safe: stores read and fill it from their worker threads. Every write a
    store makes to a (tenant, source) pair calls :meth:`forget`, which also voids fills
    that started before it (:meth:`generation`).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Key, DocumentVectors] = OrderedDict()
        self._bytes = 0
        self._generations: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def generation(self, tenant: str, source: str) -> int:
        with self._lock:
            return self._generations.get((tenant, source), 0)

    def get(self, key: Key, version: str | None, collection: str) -> DocumentVectors | None:
        """The entry of ``key`` if it was read from ``collection`` under ``version``."""
        return self.get_many([(key, version)], collection)[0]

    def get_many(
        self, wanted: Sequence[tuple[Key, str | None]], collection: str
    ) -> list[DocumentVectors | None]:
        """:meth:`get` for many keys at once (one lock)."""
        if self.max_bytes <= 0:
            return [None] * len(wanted)
        found: list[DocumentVectors | None] = []
        with self._lock:
            for key, version in wanted:
                entry = self._entries.get(key) if version is not None else None
                if entry is None or entry.version != version or entry.collection != collection:
                    self.misses += version is not None
                    found.append(None)
                    continue
                self._entries.move_to_end(key)
                self.hits += 1
                found.append(entry)
        return found

    def put(self, key: Key, entry: DocumentVectors, generation: int) -> None:
        """Keep ``entry`` unless the pair was written since ``generation`` was read."""
        size = entry.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if self._generations.get(key[:2], 0) != generation:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes

    def forget(self, tenant: str, source: str, document_ids: Sequence[str] | None = None) -> None:
        """Drop the entries of ``document_ids`` (None: the whole pair)."""
        with self._lock:
            pair = (tenant, source)
            self._generations[pair] = self._generations.get(pair, 0) + 1
            keys = (
                [k for k in self._entries if k[:2] == pair]
                if document_ids is None
                else [(tenant, source, d) for d in document_ids]
            )
            for key in keys:
                old = self._entries.pop(key, None)
                if old is not None:
                    self._bytes -= old.nbytes


async def confirmed(versions: ContentVersions, labelled: Mapping[str, str]) -> list[str]:
    """The documents whose catalog version is still the one they were labelled with."""
    if not labelled:
        return []
    after = await versions(list(labelled))
    return [d for d, v in labelled.items() if after.get(d) == v]
