"""One conformance suite for every connector behind :class:`connectors.base.VectorStore`.

Runs against Chroma embedded, Chroma server (a real ``chroma run``), Qdrant local mode,
the LangChain adapter over ``InMemoryVectorStore`` and the in-memory reference store:
search order and scores against an exact oracle, paging, id lookup, deletion, tenant
isolation, stamps, and refusal of malformed batches. Fronted collections (Chroma and
Qdrant) are checked for missing or malformed metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings as ChromaSettings
from langchain_core.vectorstores import InMemoryVectorStore
from qdrant_client import QdrantClient, models

from connectors.base import Candidate, ChunkRecord, VectorStore
from connectors.chroma import ChromaStore
from connectors.chroma_fronted import FrontedChromaStore
from connectors.langchain_store import LangChainStore
from connectors.mapping import parse_mapping
from connectors.memory import InMemoryStore
from connectors.qdrant import QdrantStore
from gateway.errors import InvalidRequest
from tests.test_faults import ChromaServer

DIM = 16
KINDS = ["chroma-embedded", "chroma-server", "qdrant-local", "langchain", "memory"]


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    server = ChromaServer(tmp_path_factory.mktemp("conformance-chroma") / "data")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _open(kind: str, tmp_path: Path, server: Callable[[], ChromaServer]) -> VectorStore:
    if kind == "chroma-embedded":
        return ChromaStore(path=tmp_path / "chroma")
    if kind == "chroma-server":
        return ChromaStore(url=f"http://127.0.0.1:{server().port}")
    if kind == "qdrant-local":
        return QdrantStore(path=tmp_path / "qdrant")
    if kind == "langchain":
        return LangChainStore(InMemoryVectorStore)
    return InMemoryStore()


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorStore]:
    s = _open(request.param, tmp_path, lambda: request.getfixturevalue("chroma_server"))
    try:
        yield s
    finally:
        for pair in (("t1", "s"), ("t2", "s")):
            with contextlib.suppress(Exception):
                await s.drop(*pair)
        close = getattr(s, "close", None)
        if close is not None:
            close()


def vectors(n: int, seed: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.random.default_rng(seed).normal(size=(n, DIM))


def corpus(tenant: str = "t1", source: str = "s", seed: int = 1) -> list[ChunkRecord]:
    rows = vectors(20, seed)
    return [
        ChunkRecord(
            f"d{i % 5}#{i // 5}",
            f"d{i % 5}",
            tenant,
            source,
            f"text {i}",
            [float(x) for x in rows[i]],
            {"n": i, "kind": "even" if i % 2 == 0 else "odd"},
        )
        for i in range(20)
    ]


def oracle(chunks: list[ChunkRecord], query: list[float], n: int) -> list[tuple[str, float]]:
    q = np.asarray(query)
    scored = sorted(
        (
            1.0 - float(np.dot(c.embedding, q) / (np.linalg.norm(c.embedding) * np.linalg.norm(q))),
            c.chunk_id,
        )
        for c in chunks
    )
    return [(cid, d) for d, cid in scored[:n]]


def query(seed: int = 99) -> list[float]:
    return [float(x) for x in vectors(1, seed)[0]]


def assert_matches(found: list[Candidate], expected: list[tuple[str, float]]) -> None:
    assert [c.chunk_id for c in found] == [cid for cid, _ in expected]
    for c, (_, distance) in zip(found, expected, strict=True):
        assert c.distance == pytest.approx(distance, abs=1e-4)
        assert c.score == pytest.approx(1.0 - distance, abs=1e-4)


async def test_search_order_scores_and_stamps(store: VectorStore) -> None:
    chunks = corpus()
    await store.upsert("t1", "s", chunks)
    assert await store.count("t1", "s") == 20
    for seed in (7, 8, 9):
        found = await store.search("t1", "s", query(seed), 8)
        assert_matches(found, oracle(chunks, query(seed), 8))
    by_id = {c.chunk_id: c for c in chunks}
    for c in await store.search("t1", "s", query(), 20):
        assert (c.tenant, c.source, c.document_id) == ("t1", "s", by_id[c.chunk_id].document_id)
        assert c.text == by_id[c.chunk_id].text
        assert dict(c.metadata) == dict(by_id[c.chunk_id].metadata)


async def test_paging_is_a_prefix(store: VectorStore) -> None:
    await store.upsert("t1", "s", corpus())
    small = await store.search("t1", "s", query(), 4)
    large = await store.search("t1", "s", query(), 12)
    assert [c.chunk_id for c in large[:4]] == [c.chunk_id for c in small]
    assert len(await store.search("t1", "s", query(), 100)) == 20
    assert await store.search("t1", "s", query(), 0) == []


async def test_search_documents_is_exact_and_restricted(store: VectorStore) -> None:
    chunks = corpus()
    await store.upsert("t1", "s", chunks)
    wanted = [c for c in chunks if c.document_id in {"d1", "d3"}]
    found = await store.search_documents("t1", "s", query(), 5, ["d1", "d3", "nope"])
    assert_matches(found, oracle(wanted, query(), 5))
    assert await store.search_documents("t1", "s", query(), 5, []) == []


async def test_delete_document_and_replace(store: VectorStore) -> None:
    chunks = corpus()
    await store.upsert("t1", "s", chunks)
    assert await store.delete_documents("t1", "s", ["d2"]) == 4
    assert await store.delete_documents("t1", "s", ["d2"]) == 0
    assert await store.count("t1", "s") == 16
    found = await store.search("t1", "s", query(), 20)
    assert "d2" not in {c.document_id for c in found}
    assert await store.search_documents("t1", "s", query(), 5, ["d2"]) == []
    # Several documents at once, unknown ones and repeats counted once; others untouched.
    assert await store.delete_documents("t1", "s", ["d1", "nope", "d3", "d1"]) == 8
    assert await store.delete_documents("t1", "s", []) == 0
    assert await store.count("t1", "s") == 8
    left = {c.document_id for c in await store.search("t1", "s", query(), 20)}
    assert left == {c.document_id for c in chunks} - {"d1", "d2", "d3"}
    await store.upsert("t1", "s", [c for c in chunks if c.document_id in {"d1", "d3"}])
    # Upserting by chunk id replaces the chunk, never duplicates it.
    moved = ChunkRecord("d0#0", "d0", "t1", "s", "new text", chunks[0].embedding, {})
    await store.upsert("t1", "s", [moved])
    assert await store.count("t1", "s") == 16
    (hit,) = await store.search_documents("t1", "s", list(chunks[0].embedding), 1, ["d0"])
    assert (hit.chunk_id, hit.text) == ("d0#0", "new text")


async def test_tenant_isolation_and_drop(store: VectorStore) -> None:
    await store.upsert("t1", "s", corpus("t1"))
    await store.upsert("t2", "s", corpus("t2"))  # the same vectors in another tenant
    for tenant in ("t1", "t2"):
        found = await store.search(tenant, "s", query(), 40)
        assert len(found) == 20 and {c.tenant for c in found} == {tenant}
        found = await store.search_documents(tenant, "s", query(), 40, ["d1"])
        assert {c.tenant for c in found} == {tenant}
    await store.drop("t1", "s")
    assert await store.count("t1", "s") == 0
    assert await store.search("t1", "s", query(), 5) == []
    assert await store.count("t2", "s") == 20
    assert await store.search("t3", "s", query(), 5) == []


async def test_malformed_batches_are_refused(store: VectorStore) -> None:
    good = corpus()[0]
    bad = [
        ChunkRecord("x#0", "x", "t2", "s", "t", good.embedding, {}),  # another tenant's stamp
        ChunkRecord("x#0", "x", "t1", "s", "t", good.embedding, {"tenant": "t2"}),  # reserved key
        ChunkRecord("x#0", "x", "t1", "s", "t", [float("nan")] * DIM, {}),
    ]
    for chunk in bad:
        with pytest.raises(InvalidRequest):
            await store.upsert("t1", "s", [chunk])
    with pytest.raises(InvalidRequest):
        await store.upsert("t1", "s", [good, good])
    assert await store.count("t1", "s") == 0


# -- fronted collections --------------------------------------------------------------

MAPPING = parse_mapping({"document_id": "doc", "viewers": "readers"})


def _fronted_rows() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("a", {"doc": "d1", "readers": "user:alice", "team": "x"}),
        ("b", {"readers": "user:alice"}),  # no document id
        ("c", {"doc": 7, "readers": "user:alice"}),  # not a string
        ("d", {"doc": "d2"}),
    ]


def _fronted_chroma(tmp_path: Path, server: ChromaServer | None) -> FrontedChromaStore:
    settings = ChromaSettings(anonymized_telemetry=False)
    client = (
        chromadb.PersistentClient(path=str(tmp_path / "fc"), settings=settings)
        if server is None
        else chromadb.HttpClient(host="127.0.0.1", port=server.port, settings=settings)
    )
    name = f"kb-{tmp_path.name[-20:]}"
    kb = client.create_collection(
        name, embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
    )
    rows = _fronted_rows()
    kb.add(
        ids=[r[0] for r in rows],
        embeddings=[list(v) for v in vectors(4, 3)],
        documents=[f"text {r[0]}" for r in rows],
        metadatas=[r[1] for r in rows],  # type: ignore[misc]
    )
    if server is not None:
        url = f"http://127.0.0.1:{server.port}"
        return FrontedChromaStore("t1", "s", name, MAPPING, url=url)
    return FrontedChromaStore("t1", "s", name, MAPPING, path=tmp_path / "fc")


def _fronted_qdrant(tmp_path: Path) -> QdrantStore:
    client = QdrantClient(path=str(tmp_path / "fq"))
    client.create_collection(
        "kb", vectors_config=models.VectorParams(size=DIM, distance=models.Distance.COSINE)
    )
    rows = _fronted_rows()
    client.upsert(
        "kb",
        points=[
            models.PointStruct(id=i + 1, vector=list(v), payload={**r[1], "text": f"text {r[0]}"})
            for i, (r, v) in enumerate(zip(rows, vectors(4, 3), strict=True))
        ],
    )
    client.close()
    return QdrantStore(
        path=tmp_path / "fq", collection="kb", mapping=MAPPING, tenant="t1", source="s"
    )


@pytest.mark.parametrize("kind", ["chroma-embedded", "chroma-server", "qdrant-local"])
async def test_fronted_missing_or_malformed_ids_and_scope(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store: FrontedChromaStore | QdrantStore
    if kind == "qdrant-local":
        store = _fronted_qdrant(tmp_path)
    else:
        server = request.getfixturevalue("chroma_server") if kind == "chroma-server" else None
        store = _fronted_chroma(tmp_path, server)
    try:
        found = await store.search("t1", "s", query(), 10)
        assert len(found) == 4
        assert {c.tenant for c in found} == {"t1"} and {c.source for c in found} == {"s"}
        ids = {c.text: c.document_id for c in found}
        assert ids == {"text a": "d1", "text b": None, "text c": None, "text d": "d2"}
        meta = {c.document_id: dict(c.metadata) for c in found}
        assert meta["d1"] == {"team": "x"}  # mapping fields never reach agents
        assert await store.search("t2", "s", query(), 10) == []  # bound to one tenant
        only = await store.search_documents("t1", "s", query(), 10, ["d2"])
        assert [c.document_id for c in only] == ["d2"]
        scan = await store.scan_acls()
        assert sorted(scan.documents) == ["d1", "d2"] and scan.orphans == 2
        assert scan.documents["d1"].viewers == ("user:alice",)
        with pytest.raises(InvalidRequest):
            await store.upsert("t1", "s", corpus()[:1])
        with pytest.raises(InvalidRequest):
            await store.delete_documents("t1", "s", ["d1"])
        await store.drop("t1", "s")  # never drops what it did not create
        assert await store.count("t1", "s") == 4
    finally:
        store.close()
