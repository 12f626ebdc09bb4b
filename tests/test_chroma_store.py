import inspect
import json
import math
import socket
import sqlite3
import subprocess
import sys
import time
import zlib
from pathlib import Path

import chromadb
import chromadb.errors
import httpx
import numpy as np
import pytest
from chromadb.config import Settings

from connectors.base import ChunkRecord, VectorStore
from connectors.chroma import (
    DOCUMENT_INDEX,
    UPSTREAM_ERRORS,
    ChromaStore,
    chroma_errors,
    collection_name,
)
from gateway.errors import InvalidRequest, SourceUnavailable

DIM = 16
CHROMA_CLI = Path(sys.executable).with_name("chroma")


def vector(seed: int) -> list[float]:
    return np.random.default_rng(seed).normal(size=DIM).tolist()


def document(tenant: str, document_id: str, chunks: int, source: str = "docs", **metadata):
    return [
        ChunkRecord(
            f"{document_id}#{i}",
            document_id,
            tenant,
            source,
            f"{tenant} {document_id} chunk {i}",
            vector(zlib.crc32(f"{tenant}/{source}/{document_id}/{i}".encode())),
            metadata,
        )
        for i in range(chunks)
    ]


def corpus(tenant: str = "acme", documents: int = 12, chunks: int = 4) -> list[ChunkRecord]:
    return [c for d in range(documents) for c in document(tenant, f"d{d}", chunks)]


def oracle(chunks, query, n, document_ids=None):
    """Brute force, one cosine at a time: [(distance, chunk_id)] nearest first."""
    scored = []
    for c in chunks:
        if document_ids is None or c.document_id in document_ids:
            cos = np.dot(c.embedding, query) / (np.linalg.norm(c.embedding) * np.linalg.norm(query))
            scored.append((1.0 - cos, c.chunk_id))
    return sorted(scored)[:n]


def assert_matches(found, expected):
    assert [c.chunk_id for c in found] == [cid for _, cid in expected]
    assert all(
        math.isclose(c.distance, d, abs_tol=1e-5) for c, (d, _) in zip(found, expected, strict=True)
    )


def raw_client(path: Path) -> chromadb.api.ClientAPI:
    return chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "chroma"


@pytest.fixture
async def store(path):
    store = ChromaStore(path)
    yield store
    store.close()


# -- embedded --------------------------------------------------------------------------


def test_it_is_a_vector_store(path):
    assert isinstance(ChromaStore(path), VectorStore)


async def test_search_returns_the_nearest_chunks_first_with_their_stamps(store):
    chunks = corpus()
    await store.upsert("acme", "docs", chunks)
    assert await store.count("acme", "docs") == len(chunks)
    query = vector(12345)
    found = await store.search("acme", "docs", query, 6)
    assert_matches(found, oracle(chunks, query, 6))
    assert {(c.tenant, c.source) for c in found} == {("acme", "docs")}
    assert all(c.document_id == c.chunk_id.split("#")[0] for c in found)
    assert found[0].text == f"acme {found[0].chunk_id.replace('#', ' chunk ')}"
    assert await store.search("acme", "docs", query, 0) == []
    assert len(await store.search("acme", "docs", query, 500)) == len(chunks)


async def test_every_chunk_is_stamped_and_user_metadata_kept_apart(store, path):
    await store.upsert("acme", "docs", document("acme", "d1", 2, lang="en"))
    custom = ChunkRecord("custom-id", "d2", "acme", "docs", "t", vector(1), {"lang": "de"})
    await store.upsert("acme", "docs", [custom])
    client = raw_client(path)
    stored = client.get_collection(collection_name("acme", "docs")).get(ids=["d1#1", "custom-id"])
    client.close()
    assert stored["metadatas"] == [
        {"tenant": "acme", "source": "docs", "document_id": "d1", "chunk_index": 1, "lang": "en"},
        {"tenant": "acme", "source": "docs", "document_id": "d2", "lang": "de"},
    ]
    hits = await store.search("acme", "docs", vector(1), 1)
    assert hits[0].chunk_id == "custom-id"
    assert hits[0].metadata == {"lang": "de"}


async def test_missing_stamps_come_back_as_none(store, path):
    await store.upsert("acme", "docs", document("acme", "d1", 1))
    client = raw_client(path)
    collection = client.get_collection(collection_name("acme", "docs"))
    collection.upsert(ids=["bare"], embeddings=[vector(77)], documents=["no stamps"])
    collection.upsert(
        ids=["odd"], embeddings=[vector(78)], metadatas=[{"tenant": 7, "document_id": "d9"}]
    )
    client.close()
    bare = (await store.search("acme", "docs", vector(77), 1))[0]
    assert (bare.chunk_id, bare.tenant, bare.source, bare.document_id) == ("bare", None, None, None)
    odd = (await store.search("acme", "docs", vector(78), 1))[0]
    assert (odd.tenant, odd.document_id, odd.text) == (None, "d9", "")


async def test_tenants_with_colliding_ids_are_physically_separate(store):
    acme, globex = document("acme", "d1", 3), document("globex", "d1", 3)
    await store.upsert("acme", "docs", acme)
    await store.upsert("globex", "docs", globex)
    assert collection_name("acme", "docs") != collection_name("globex", "docs")
    for tenant, chunks in (("acme", acme), ("globex", globex)):
        query = chunks[0].embedding
        hits = await store.search(tenant, "docs", query, 10)
        assert {(h.tenant, h.text.split()[0]) for h in hits} == {(tenant, tenant)}
        assert_matches(hits, oracle(chunks, query, 10))
        by_document = await store.search_documents(tenant, "docs", query, 10, ["d1"])
        assert_matches(by_document, oracle(chunks, query, 10))
    assert await store.delete_documents("globex", "docs", ["d1"]) == 3
    assert await store.count("acme", "docs") == 3
    assert await store.search("globex", "docs", vector(1), 5) == []


def test_collection_names_cannot_alias():
    assert collection_name("a/b", "c") != collection_name("a", "b/c")
    assert collection_name("acme", "docs") != collection_name("acme", "docs", DOCUMENT_INDEX)


async def test_search_documents_equals_the_brute_force_oracle(store):
    chunks = corpus(documents=40, chunks=5)
    await store.upsert("acme", "docs", chunks)
    rng = np.random.default_rng(5)
    for trial in range(3):
        wanted = [f"d{i}" for i in rng.choice(40, size=12, replace=False)] + ["unknown"]
        query = vector(1000 + trial)
        found = await store.search_documents("acme", "docs", query, 7, wanted)
        assert_matches(found, oracle(chunks, query, 7, wanted))
        everything = await store.search_documents("acme", "docs", query, 1000, wanted)
        assert_matches(everything, oracle(chunks, query, 1000, wanted))
    assert await store.search_documents("acme", "docs", vector(1), 5, []) == []
    assert await store.search_documents("acme", "docs", vector(1), 0, ["d1"]) == []
    assert await store.search_documents("acme", "other", vector(1), 5, ["d1"]) == []


async def test_delete_document_removes_its_chunks_and_index_entry(store):
    chunks = corpus()
    await store.upsert("acme", "docs", chunks)
    assert await store.delete_documents("acme", "docs", ["d3"]) == 4
    assert await store.delete_documents("acme", "docs", ["d3"]) == 0
    assert await store.delete_documents("acme", "never", ["d3"]) == 0
    assert await store.count("acme", "docs") == len(chunks) - 4
    assert await store.search_documents("acme", "docs", vector(1), 5, ["d3"]) == []
    hits = await store.search("acme", "docs", vector(1), 100)
    assert "d3" not in {h.document_id for h in hits}


async def test_a_chunk_moved_to_another_document_belongs_to_that_one_only(store):
    await store.upsert("acme", "docs", document("acme", "a", 2))
    moved = ChunkRecord("a#1", "b", "acme", "docs", "now in b", vector(9))
    await store.upsert("acme", "docs", [moved])
    in_a = await store.search_documents("acme", "docs", vector(9), 5, ["a"])
    assert [c.chunk_id for c in in_a] == ["a#0"]
    in_b = await store.search_documents("acme", "docs", vector(9), 5, ["b"])
    assert [(c.chunk_id, c.text) for c in in_b] == [("a#1", "now in b")]
    assert await store.delete_documents("acme", "docs", ["a"]) == 1
    assert await store.count("acme", "docs") == 1


async def test_upsert_is_idempotent_and_replaces_by_id(store):
    chunks = document("acme", "d1", 3)
    await store.upsert("acme", "docs", chunks)
    await store.upsert("acme", "docs", chunks)
    assert await store.count("acme", "docs") == 3
    await store.upsert("acme", "docs", [ChunkRecord("d1#0", "d1", "acme", "docs", "v2", vector(4))])
    (hit,) = await store.search("acme", "docs", vector(4), 1)
    assert (hit.chunk_id, hit.text) == ("d1#0", "v2")
    assert await store.delete_documents("acme", "docs", ["d1"]) == 3


async def test_data_survives_reopening(path):
    chunks = corpus()
    first = ChromaStore(path)
    await first.upsert("acme", "docs", chunks)
    first.close()
    second = ChromaStore(path)
    try:
        assert await second.count("acme", "docs") == len(chunks)
        query = vector(3)
        assert_matches(await second.search("acme", "docs", query, 5), oracle(chunks, query, 5))
        found = await second.search_documents("acme", "docs", query, 5, ["d2", "d5"])
        assert_matches(found, oracle(chunks, query, 5, ["d2", "d5"]))
    finally:
        second.close()


async def test_drop_deletes_both_collections(store, path):
    await store.upsert("acme", "docs", corpus())
    await store.drop("acme", "docs")
    await store.drop("acme", "docs")
    assert await store.count("acme", "docs") == 0
    assert await store.search("acme", "docs", vector(1), 3) == []
    client = raw_client(path)
    assert client.list_collections() == []
    client.close()


async def test_malformed_batches_are_refused_before_anything_is_written(store):
    reserved = ChunkRecord("d#0", "d", "acme", "docs", "t", vector(1), {"tenant": "globex"})
    with pytest.raises(InvalidRequest, match="reserved"):
        await store.upsert("acme", "docs", [reserved])
    with pytest.raises(InvalidRequest, match="another tenant"):
        await store.upsert("acme", "docs", document("globex", "d", 1))
    await store.upsert("acme", "docs", [])
    assert await store.count("acme", "docs") == 0


async def test_a_collection_of_another_tenant_or_metric_is_refused(store, path):
    client = raw_client(path)
    client.create_collection(
        collection_name("acme", "docs"),
        metadata={"scopegate": "chunks", "tenant": "globex", "source": "docs"},
        embedding_function=None,
    )
    client.create_collection(
        collection_name("acme", "wiki"),
        configuration={"hnsw": {"space": "l2"}},
        metadata={"scopegate": "chunks", "tenant": "acme", "source": "wiki"},
        embedding_function=None,
    )
    client.close()
    with pytest.raises(SourceUnavailable, match="another tenant"):
        await store.search("acme", "docs", vector(1), 3)
    with pytest.raises(SourceUnavailable, match="another tenant"):
        await store.upsert("acme", "docs", document("acme", "d", 1))
    with pytest.raises(SourceUnavailable, match="cosine"):
        await store.search("acme", "wiki", vector(1), 3)


def test_constructor_needs_one_valid_location(path):
    for bad in ({}, {"path": path, "url": "http://localhost:8000"}):
        with pytest.raises(ValueError, match="exactly one"):
            ChromaStore(**bad)
    for url in ("ftp://host", "http://host:8000/prefix", "http://user@host", "localhost:8000"):
        with pytest.raises(ValueError, match="url"):
            ChromaStore(url=url)


# -- error mapping ---------------------------------------------------------------------


def upstream_error_classes():
    for module in (chromadb.errors, httpx):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Exception):
                yield cls


def test_every_chromadb_and_httpx_exception_is_mapped():
    unmapped = [c for c in upstream_error_classes() if not issubclass(c, UPSTREAM_ERRORS)]
    assert unmapped == []


@pytest.mark.parametrize(
    "error",
    [
        chromadb.errors.NotFoundError("gone"),
        chromadb.errors.InvalidArgumentError("bad"),
        chromadb.errors.InternalError("boom"),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.InvalidURL("bad url"),
        sqlite3.OperationalError("database is locked"),
        OSError("disk full"),
        TimeoutError(),
        np.linalg.LinAlgError("singular"),
        json.JSONDecodeError("bad", "x", 0),
        KeyError("ids"),
        TypeError("None is not subscriptable"),
        RuntimeError("panicked"),
    ],
)
def test_chroma_errors_maps_upstream_failures_to_source_unavailable(error):
    with pytest.raises(SourceUnavailable) as raised, chroma_errors("query"):
        raise error
    assert raised.value.__cause__ is error
    assert raised.value.code == "source_unavailable"


def test_chroma_errors_lets_scopegate_errors_through():
    with pytest.raises(InvalidRequest), chroma_errors("upsert"):
        raise InvalidRequest("reserved key")


async def test_corrupted_calls_surface_as_source_unavailable(store, path):
    await store.upsert("acme", "docs", document("acme", "d1", 2))
    with pytest.raises(SourceUnavailable, match="InvalidArgumentError"):
        await store.search("acme", "docs", [1.0, 2.0], 3)
    with pytest.raises(SourceUnavailable):
        await store.search("acme", "docs", [math.nan] * DIM, 3)
    with pytest.raises(SourceUnavailable):
        await store.upsert("acme", "docs", [ChunkRecord("x#0", "x", "acme", "docs", "t", [1.0])])
    client = raw_client(path)
    index = client.get_collection(collection_name("acme", "docs", DOCUMENT_INDEX))
    index.update(ids=["d1"], metadatas=[{"chunk_ids": "{not json"}])
    client.close()
    with pytest.raises(SourceUnavailable, match="JSONDecodeError"):
        await store.search_documents("acme", "docs", vector(1), 3, ["d1"])
    assert await store.healthy()


async def test_an_unusable_path_is_source_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = ChromaStore(blocker / "chroma")
    with pytest.raises(SourceUnavailable):
        await store.count("acme", "docs")
    assert await store.healthy() is False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_an_unreachable_server_is_source_unavailable():
    store = ChromaStore(url=f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(SourceUnavailable):
        await store.search("acme", "docs", vector(1), 3)
    assert await store.healthy() is False


@pytest.fixture
def silent_server():
    """Accepts connections and never answers; closing it resets them."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


async def test_a_server_that_never_answers_times_out(silent_server):
    store = ChromaStore(url=silent_server, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(SourceUnavailable, match="timed out"):
        await store.count("acme", "docs")
    assert time.monotonic() - started < 5


# -- a real Chroma server --------------------------------------------------------------


def wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"chroma run exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    pytest.fail(f"chroma run did not listen on {port} within 30 s:\n{log.read_text()}")


@pytest.fixture
def chroma_server(tmp_path):
    """A real ``chroma run`` process: (process, url)."""
    assert CHROMA_CLI.is_file(), f"the chroma CLI is missing at {CHROMA_CLI}"
    port = free_port()
    log = tmp_path / "chroma-server.log"
    command = [str(CHROMA_CLI), "run", "--path", str(tmp_path / "server"), "--host", "127.0.0.1"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    wait_until_listening(process, port, log)
    yield process, f"http://127.0.0.1:{port}"
    process.kill()
    process.wait()


async def test_http_round_trip_then_the_server_dies(chroma_server):
    process, url = chroma_server
    store = ChromaStore(url=url, timeout=10)
    try:
        assert await store.healthy()
        chunks = corpus(documents=6, chunks=3) + document("globex", "d1", 2)[:0]
        await store.upsert("acme", "docs", chunks)
        await store.upsert("globex", "docs", document("globex", "d1", 2))
        query = vector(42)
        assert_matches(await store.search("acme", "docs", query, 4), oracle(chunks, query, 4))
        found = await store.search_documents("acme", "docs", query, 4, ["d1", "d4"])
        assert_matches(found, oracle(chunks, query, 4, ["d1", "d4"]))
        assert await store.delete_documents("acme", "docs", ["d1"]) == 3
        assert await store.count("acme", "docs") == len(chunks) - 3
        assert await store.count("globex", "docs") == 2
        assert await store.count("acme", "never") == 0

        process.kill()
        process.wait()
        with pytest.raises(SourceUnavailable):
            await store.search("acme", "docs", query, 4)
        with pytest.raises(SourceUnavailable):
            await store.upsert("acme", "docs", document("acme", "d9", 1))
        assert await store.healthy() is False
    finally:
        store.close()


async def test_a_collection_recreated_by_another_replica_is_reopened(chroma_server):
    # Two gateway replicas on one Chroma server: replica A removes the source and
    # registers it again; replica B still holds handles to the dropped collections and
    # must serve the new ones on its very next call, not fail.
    _, url = chroma_server
    a, b = ChromaStore(url=url, timeout=10), ChromaStore(url=url, timeout=10)
    try:
        old = corpus(documents=3, chunks=2)
        await a.upsert("acme", "docs", old)
        query = vector(7)
        assert_matches(await b.search("acme", "docs", query, 3), oracle(old, query, 3))

        await a.drop("acme", "docs")
        new = document("acme", "n1", 3)
        await a.upsert("acme", "docs", new)

        assert_matches(await b.search("acme", "docs", query, 3), oracle(new, query, 3))
        assert await b.count("acme", "docs") == 3
        assert await b.delete_documents("acme", "docs", ["n1"]) == 3
        assert await a.count("acme", "docs") == 0
    finally:
        a.close()
        b.close()


async def test_the_ranking_goes_past_its_first_rows_when_they_belong_elsewhere(store):
    """The nearest rows are ranked first; when every one of them has moved to another
    document, the rest are ranked too and the document's own chunk is still found."""
    far = [1.0] + [0.0] * (DIM - 1)
    near = [0.0, 1.0] + [0.0] * (DIM - 2)
    rng = np.random.default_rng(3)
    chunks = [ChunkRecord("a#0", "a", "acme", "docs", "the last", far)]
    chunks += [
        ChunkRecord(
            f"a#{i}",
            "a",
            "acme",
            "docs",
            f"moved {i}",
            (np.array(near) + 0.01 * rng.normal(size=DIM)).tolist(),
        )
        for i in range(1, 100)
    ]
    await store.upsert("acme", "docs", chunks)
    moved = [ChunkRecord(c.chunk_id, "b", "acme", "docs", c.text, c.embedding) for c in chunks[1:]]
    await store.upsert("acme", "docs", moved)  # the index still lists them under a
    found = await store.search_documents("acme", "docs", near, 1, ["a"])
    assert [c.chunk_id for c in found] == ["a#0"]
    assert len(await store.search_documents("acme", "docs", near, 200, ["b"])) == 99
