import math
import zlib

import numpy as np
import pytest

from connectors.base import ChunkRecord, VectorStore
from connectors.memory import InMemoryStore, cosine_top_n
from gateway.errors import InvalidRequest, SourceUnavailable

DIM = 8


def vector(seed: int) -> list[float]:
    return np.random.default_rng(seed).normal(size=DIM).tolist()


def chunk(
    document_id: str, index: int, *, tenant="acme", source="docs", seed=None, **metadata
) -> ChunkRecord:
    seed = seed if seed is not None else zlib.crc32(f"{tenant}/{document_id}/{index}".encode())
    return ChunkRecord(
        f"{document_id}#{index}",
        document_id,
        tenant,
        source,
        f"{tenant} {document_id} chunk {index}",
        vector(seed),
        metadata,
    )


def oracle(chunks, query, n, document_ids=None):
    """Brute force, one cosine at a time."""
    scored = []
    for c in chunks:
        if document_ids is None or c.document_id in document_ids:
            cos = np.dot(c.embedding, query) / (np.linalg.norm(c.embedding) * np.linalg.norm(query))
            scored.append((1.0 - cos, c.chunk_id))
    return sorted(scored)[:n]


@pytest.fixture
async def store() -> InMemoryStore:
    store = InMemoryStore()
    corpus = [chunk(f"d{d}", i, seed=d * 10 + i) for d in range(6) for i in range(4)]
    await store.upsert("acme", "docs", corpus)
    return store


def test_it_is_a_vector_store():
    assert isinstance(InMemoryStore(), VectorStore)


async def test_search_is_exact_and_nearest_first(store):
    corpus = [chunk(f"d{d}", i, seed=d * 10 + i) for d in range(6) for i in range(4)]
    query = vector(999)
    found = await store.search("acme", "docs", query, 5)
    expected = oracle(corpus, query, 5)
    assert [c.chunk_id for c in found] == [cid for _, cid in expected]
    assert all(
        math.isclose(c.distance, d, abs_tol=1e-9) for c, (d, _) in zip(found, expected, strict=True)
    )
    assert math.isclose(found[0].score, 1 - found[0].distance)


async def test_search_returns_stamps_and_only_the_users_metadata():
    store = InMemoryStore()
    await store.upsert("acme", "docs", [chunk("d1", 0, lang="en")])
    (hit,) = await store.search("acme", "docs", vector(1), 3)
    assert (hit.tenant, hit.source, hit.document_id) == ("acme", "docs", "d1")
    assert hit.metadata == {"lang": "en"}
    assert hit.text == "acme d1 chunk 0"


async def test_n_bounds_the_answer(store):
    assert await store.search("acme", "docs", vector(1), 0) == []
    assert len(await store.search("acme", "docs", vector(1), 100)) == 24


async def test_equal_distances_are_ordered_by_chunk_id():
    store = InMemoryStore()
    same = [ChunkRecord(cid, "d", "t", "s", cid, [1.0, 0.0]) for cid in ("c", "a", "b")]
    await store.upsert("t", "s", same)
    assert [c.chunk_id for c in await store.search("t", "s", [1.0, 0.0], 3)] == ["a", "b", "c"]


async def test_tenants_and_sources_are_separate_spaces():
    store = InMemoryStore()
    await store.upsert("acme", "docs", [chunk("d1", 0, seed=1)])
    await store.upsert("globex", "docs", [chunk("d1", 0, tenant="globex", seed=1)])
    await store.upsert("acme", "wiki", [chunk("d1", 0, source="wiki", seed=1)])
    for tenant, source in [("acme", "docs"), ("globex", "docs"), ("acme", "wiki")]:
        hits = await store.search(tenant, source, vector(1), 10)
        assert [(h.tenant, h.source) for h in hits] == [(tenant, source)]
    assert await store.delete_documents("globex", "docs", ["d1"]) == 1
    assert await store.count("acme", "docs") == 1
    assert await store.search("nobody", "docs", vector(1), 5) == []


async def test_search_documents_matches_the_oracle(store):
    corpus = [chunk(f"d{d}", i, seed=d * 10 + i) for d in range(6) for i in range(4)]
    query = vector(7)
    wanted = ["d1", "d4", "missing"]
    found = await store.search_documents("acme", "docs", query, 5, wanted)
    assert [c.chunk_id for c in found] == [cid for _, cid in oracle(corpus, query, 5, wanted)]
    assert await store.search_documents("acme", "docs", query, 5, []) == []
    assert await store.search_documents("acme", "docs", query, 0, wanted) == []


async def test_delete_document_counts_what_it_removed(store):
    assert await store.delete_documents("acme", "docs", ["d2"]) == 4
    assert await store.delete_documents("acme", "docs", ["d2"]) == 0
    assert await store.count("acme", "docs") == 20
    assert await store.search_documents("acme", "docs", vector(1), 5, ["d2"]) == []


async def test_upsert_replaces_by_chunk_id(store):
    replacement = ChunkRecord("d0#0", "d0", "acme", "docs", "new text", vector(500))
    await store.upsert("acme", "docs", [replacement])
    assert await store.count("acme", "docs") == 24
    (hit,) = await store.search("acme", "docs", vector(500), 1)
    assert (hit.chunk_id, hit.text) == ("d0#0", "new text")


async def test_drop_forgets_the_pair(store):
    await store.drop("acme", "docs")
    assert await store.count("acme", "docs") == 0
    await store.drop("acme", "never-existed")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (chunk("d", 0, tenant="globex"), "another tenant"),
        (chunk("d", 0, source="wiki"), "another tenant"),
        (ChunkRecord("d#0", "d", "acme", "docs", "t", [1.0], {"document_id": "x"}), "reserved"),
        (ChunkRecord("d#0", "d", "acme", "docs", "t", [math.nan, 1.0]), "non-finite"),
        (ChunkRecord("d#0", "d", "acme", "docs", "t", []), "empty"),
    ],
)
async def test_malformed_chunks_are_refused(bad, message):
    store = InMemoryStore()
    with pytest.raises(InvalidRequest, match=message):
        await store.upsert("acme", "docs", [bad])
    assert await store.count("acme", "docs") == 0


async def test_a_batch_with_duplicates_or_mixed_dimensions_is_refused():
    store = InMemoryStore()
    with pytest.raises(InvalidRequest, match="twice"):
        await store.upsert("acme", "docs", [chunk("d", 0), chunk("d", 0)])
    short = ChunkRecord("e#0", "e", "acme", "docs", "t", [1.0, 2.0])
    with pytest.raises(InvalidRequest, match="dimension"):
        await store.upsert("acme", "docs", [chunk("d", 0), short])


async def test_a_wrong_dimension_is_a_store_failure(store):
    with pytest.raises(SourceUnavailable, match="dimensions"):
        await store.search("acme", "docs", [1.0, 2.0], 3)
    with pytest.raises(SourceUnavailable, match="dimensions"):
        await store.upsert("acme", "docs", [ChunkRecord("x#0", "x", "acme", "docs", "t", [1.0])])
    with pytest.raises(SourceUnavailable, match="finite"):
        await store.search("acme", "docs", [math.inf] * DIM, 3)


async def test_an_unavailable_store_fails_every_call(store):
    store.unavailable = True
    calls = [
        store.upsert("acme", "docs", [chunk("d9", 0)]),
        store.delete_documents("acme", "docs", ["d1"]),
        store.search("acme", "docs", vector(1), 3),
        store.search_documents("acme", "docs", vector(1), 3, ["d1"]),
        store.count("acme", "docs"),
        store.drop("acme", "docs"),
    ]
    for call in calls:
        with pytest.raises(SourceUnavailable):
            await call
    assert await store.healthy() is False
    store.unavailable = False
    assert await store.healthy() is True
    assert await store.count("acme", "docs") == 24


async def test_planted_chunks_keep_exactly_their_stamps():
    store = InMemoryStore()
    store.plant(
        "acme",
        "docs",
        chunk_id="x",
        text="foreign",
        embedding=[1.0, 0.0],
        document_id="d1",
        stamped_tenant="globex",
        stamped_source="docs",
    )
    store.plant("acme", "docs", chunk_id="y", text="bare", embedding=[0.0, 1.0])
    hits = await store.search("acme", "docs", [1.0, 0.0], 2)
    assert [(h.chunk_id, h.tenant, h.source, h.document_id) for h in hits] == [
        ("x", "globex", "docs", "d1"),
        ("y", None, None, None),
    ]


def test_cosine_top_n_handles_zero_vectors_and_empty_input():
    matrix = np.array([[0.0, 0.0], [1.0, 0.0]])
    assert cosine_top_n([1.0, 0.0], ["zero", "x"], matrix, 2) == [(1, 0.0), (0, 1.0)]
    assert cosine_top_n([1.0, 0.0], [], np.zeros((0, 2)), 2) == []
