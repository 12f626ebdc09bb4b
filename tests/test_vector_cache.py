"""The chunk vectors kept for exact ranking: reused only under the same content version.

Store-level tests run on embedded Chroma; the last test runs two gateways on one data
directory (one catalog, one Chroma), as two replicas would, over HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from connectors.chroma import ChromaStore, collection_name
from connectors.vectors import DocumentVectors, VectorCache, VersionedSearch
from gateway.api import create_app
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from tests.conftest import make_settings
from tests.test_cache import _over_http
from tests.test_chroma_store import assert_matches, corpus, oracle, raw_client, vector
from tests.world import World, bearer, doc


class Catalog:
    """Content versions as the gateway's catalog would give them, with a call log."""

    def __init__(self, versions: Mapping[str, str | None]) -> None:
        self.versions = dict(versions)
        self.calls: list[list[str]] = []
        self.after_first: dict[str, str | None] = {}

    async def __call__(self, ids: Sequence[str]) -> dict[str, str | None]:
        self.calls.append(list(ids))
        current = {**self.versions, **(self.after_first if len(self.calls) > 1 else {})}
        return {d: current[d] for d in ids if d in current}


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    store = ChromaStore(tmp_path / "chroma")
    yield store
    store.close()


def test_the_chroma_store_reuses_vectors(store: ChromaStore) -> None:
    assert isinstance(store, VersionedSearch)


async def test_versioned_search_equals_the_oracle_and_reuses_what_it_read(
    store: ChromaStore,
) -> None:
    chunks = corpus(documents=30, chunks=4)
    await store.upsert("acme", "docs", chunks)
    catalog = Catalog({f"d{i}": "v1" for i in range(30)})
    wanted = [f"d{i}" for i in range(0, 30, 2)] + ["unknown"]
    for trial in range(3):
        query = vector(500 + trial)
        found = await store.search_documents_versioned("acme", "docs", query, 9, wanted, catalog)
        assert_matches(found, oracle(chunks, query, 9, wanted))
        assert found == await store.search_documents("acme", "docs", query, 9, wanted)
    cache = store.vector_cache
    assert len(cache) == 15  # every wanted document the store holds, once
    assert cache.hits == 2 * 15


async def test_cached_vectors_answer_until_the_version_changes(
    store: ChromaStore, tmp_path: Path
) -> None:
    """Vectors rewritten behind the store's back (another replica) are not seen while
    the catalog presents the old version, and are read once it presents a new one."""
    chunks = corpus(documents=6, chunks=2)
    await store.upsert("acme", "docs", chunks)
    catalog = Catalog({f"d{i}": "v1" for i in range(6)})
    wanted = [f"d{i}" for i in range(6)]
    target = vector(4242)
    first = await store.search_documents_versioned("acme", "docs", target, 1, wanted, catalog)
    assert first[0].document_id != "d5"

    client = raw_client(tmp_path / "chroma")
    client.get_collection(collection_name("acme", "docs")).update(ids=["d5#0"], embeddings=[target])
    client.close()
    assert (await store.search_documents("acme", "docs", target, 1, wanted))[0].chunk_id == "d5#0"
    kept = await store.search_documents_versioned("acme", "docs", target, 1, wanted, catalog)
    assert kept == first  # the catalog still says v1: the kept vectors rank

    catalog.versions["d5"] = "v2"
    moved = await store.search_documents_versioned("acme", "docs", target, 1, wanted, catalog)
    assert moved[0].chunk_id == "d5#0"
    assert moved[0].distance == pytest.approx(0.0, abs=1e-6)


async def test_a_version_that_changed_during_the_read_is_not_kept(store: ChromaStore) -> None:
    await store.upsert("acme", "docs", corpus(documents=4, chunks=2))
    catalog = Catalog({"d0": "v1", "d1": "v1", "d2": None})  # d2: an update in flight
    catalog.after_first = {"d1": None}  # an update of d1 began during the read
    await store.search_documents_versioned(
        "acme", "docs", vector(1), 3, ["d0", "d1", "d2", "d3"], catalog
    )
    assert len(catalog.calls) == 2 and sorted(catalog.calls[1]) == ["d0", "d1"]
    assert len(store.vector_cache) == 1  # d0 only: d3 is not in this source's catalog
    assert store.vector_cache.get(("acme", "docs", "d0"), "v1", _collection_id(store)) is not None


async def test_writes_through_the_store_forget_the_documents(store: ChromaStore) -> None:
    chunks = corpus(documents=3, chunks=2)
    await store.upsert("acme", "docs", chunks)
    catalog = Catalog({"d0": "v1", "d1": "v1", "d2": "v1"})
    ids = ["d0", "d1", "d2"]
    await store.search_documents_versioned("acme", "docs", vector(3), 2, ids, catalog)
    assert len(store.vector_cache) == 3
    target = vector(99)
    await store.upsert(
        "acme", "docs", [chunks[0].__class__("d1#0", "d1", "acme", "docs", "new", target)]
    )
    assert len(store.vector_cache) == 2
    found = await store.search_documents_versioned("acme", "docs", target, 1, ids, catalog)
    assert (found[0].chunk_id, found[0].text) == ("d1#0", "new")
    await store.delete_documents("acme", "docs", ["d0"])
    assert ("acme", "docs", "d0") not in {k for k in store.vector_cache._entries}
    await store.drop("acme", "docs")
    assert len(store.vector_cache) == 0
    assert await store.search_documents_versioned("acme", "docs", target, 1, ids, catalog) == []


def _collection_id(store: ChromaStore) -> str:
    collection = store._open("acme", "docs", "chunks", create=False)
    assert collection is not None
    return str(collection.id)


def _entry(version: str, rows: int, collection: str = "c") -> DocumentVectors:
    matrix = np.ones((rows, 8), dtype=np.float32)
    return DocumentVectors(collection, version, tuple(f"x#{i}" for i in range(rows)), matrix)


def test_the_cache_is_bounded_in_bytes_and_drops_the_least_recently_used() -> None:
    size = _entry("v", 4).nbytes
    cache = VectorCache(max_bytes=3 * size)
    for d in ("a", "b", "c"):
        cache.put(("t", "s", d), _entry("v", 4), cache.generation("t", "s"))
    assert cache.get(("t", "s", "a"), "v", "c") is not None  # a is now the most recent
    cache.put(("t", "s", "d"), _entry("v", 4), cache.generation("t", "s"))
    assert cache.get(("t", "s", "b"), "v", "c") is None
    assert cache.get(("t", "s", "a"), "v", "c") is not None
    assert len(cache) == 3 and cache.bytes == 3 * size
    assert cache.get(("t", "s", "a"), "v2", "c") is None  # another version
    assert cache.get(("t", "s", "a"), "v", "other collection") is None
    assert cache.get(("t", "s", "a"), None, "c") is None
    off = VectorCache(max_bytes=0)
    off.put(("t", "s", "a"), _entry("v", 1), 0)
    assert len(off) == 0


def test_a_fill_that_started_before_a_write_is_not_kept() -> None:
    cache = VectorCache()
    began = cache.generation("t", "s")
    cache.forget("t", "s", ["a"])
    cache.put(("t", "s", "a"), _entry("v", 2), began)
    assert len(cache) == 0
    cache.put(("t", "s", "a"), _entry("v", 2), cache.generation("t", "s"))
    cache.put(("t", "other", "a"), _entry("v", 2), cache.generation("t", "other"))
    cache.forget("t", "s")
    assert [k for k in cache._entries] == [("t", "other", "a")]


REVENUE = "Quarterly revenue forecast for the enterprise segment, by region."
INCIDENT = "Incident postmortem: the primary database failed over after disk saturation."


async def test_a_document_rewritten_through_another_replica_is_ranked_by_its_new_text(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any
) -> None:
    """Replica A ranks from its kept vectors; replica B (same catalog, same Chroma)
    swaps two documents' texts; A's very next retrieval ranks by the new texts."""
    data = tmp_path / "data"
    settings = make_settings(openfga, data, strategy="prefilter")
    acl: dict[str, Any] = {"viewers": ["user:alice"], "agents": ["agent:bot"]}
    async with _over_http(settings, embeddings) as (a, http):
        w = await World(a, http, "acme").setup(members=["alice"], agents=["bot"])
        await w.ingest([doc("d1", REVENUE, **acl), doc("d2", INCIDENT, **acl)])
        token = w.agent_token("alice", "bot", await w.task("alice", "bot", ["source:docs"]))

        async def top() -> tuple[str, str]:
            response = await http.post(
                "/v1/retrieve", json={"query": "revenue forecast", "k": 1}, headers=bearer(token)
            )
            assert response.status_code == 200, response.text
            chunk = response.json()["chunks"][0]
            return chunk["document_id"], chunk["text"]

        assert await top() == ("d1", REVENUE)
        (store,) = [s for s in a.stores._stores.values() if isinstance(s, ChromaStore)]
        hits = store.vector_cache.hits
        assert await top() == ("d1", REVENUE)
        assert store.vector_cache.hits > hits  # the second ranking used kept vectors

        other = make_settings(
            openfga,
            data,
            openfga_store_name=settings.openfga_store_name,
            audit_dsn=f"sqlite:///{tmp_path / 'replica-b-audit.db'}",
        )
        b = await Gateway.start(other, embeddings=embeddings)
        try:
            transport = httpx.ASGITransport(app=create_app(gateway=b))
            async with httpx.AsyncClient(transport=transport, base_url="http://b") as http_b:
                swapped = [doc("d1", INCIDENT, **acl), doc("d2", REVENUE, **acl)]
                await World(b, http_b, "acme").ingest(swapped)
        finally:
            await b.close()

        assert await top() == ("d2", REVENUE)
