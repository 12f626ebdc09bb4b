"""The catalog on both backends: exclusive ownership, leases, folder trees, migrations.

Every test runs on SQLite (the embedded default) and on PostgreSQL (the scaled-out
shape). "Replicas" are separate catalog objects on the same database, as separate
gateway processes would hold.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.catalog import SourceCatalog, open_catalog
from gateway.errors import Conflict
from tests.conftest import pg_schema_dsn

Opener = Callable[[], SourceCatalog]


@pytest.fixture(params=["sqlite", "postgres"])
async def open_replica(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    if request.param == "sqlite":
        dsn = None
    else:
        dsn = pg_schema_dsn(request.getfixturevalue("pg_dsn"), "catalog")
    opened: list[SourceCatalog] = []

    def opener() -> SourceCatalog:
        catalog = open_catalog(dsn, tmp_path)
        opened.append(catalog)
        return catalog

    yield opener
    for catalog in opened:
        await catalog.close()


async def _two_sources(catalog: SourceCatalog) -> None:
    await catalog.add_source("acme", "hr", "chroma", {})
    await catalog.add_source("acme", "wiki", "chroma", {})


async def test_claims_are_all_or_nothing(open_replica: Opener) -> None:
    catalog = open_replica()
    await _two_sources(catalog)
    claim = await catalog.claim("acme", "hr", ["payroll"], ["pay"])
    await catalog.release(claim)
    with pytest.raises(Conflict, match="folder payroll"):
        await catalog.claim("acme", "wiki", ["fresh", "payroll"], ["w1"])
    with pytest.raises(Conflict, match="document pay"):
        await catalog.claim("acme", "wiki", ["fresh"], ["w1", "pay"])
    # Nothing of the refused claims stayed behind.
    assert await catalog.folder_source("acme", "fresh") is None
    assert await catalog.document("acme", "w1") is None
    assert await catalog.folder_source("acme", "payroll") == "hr"
    # Other tenants have their own names.
    await catalog.add_source("globex", "wiki", "chroma", {})
    await catalog.release(await catalog.claim("globex", "wiki", ["payroll"], ["pay"]))


async def test_content_versions_are_read_per_source(open_replica: Opener) -> None:
    """What the vector cache keys on: a document's version, only in its own source."""
    catalog = open_replica()
    await _two_sources(catalog)
    await catalog.claim("acme", "hr", [], ["pay", "leave"], lease=False)
    await catalog.claim("acme", "wiki", [], ["w1"], lease=False)
    await catalog.complete_documents(
        "acme", [("pay", 1, "fp-pay", None, {}), ("w1", 1, "fp-w1", None, {})]
    )
    ids = ["pay", "leave", "w1", "unknown"]
    assert await catalog.content_versions("acme", ids, source="hr") == {
        "pay": "fp-pay",
        "leave": None,  # claimed, not complete: an update in flight
    }
    assert await catalog.content_versions("acme", ids, source="wiki") == {"w1": "fp-w1"}
    assert await catalog.content_versions("acme", ids) == {
        "pay": "fp-pay",
        "leave": None,
        "w1": "fp-w1",
    }
    assert await catalog.content_versions("globex", ids, source="hr") == {}
    many = [f"x{i}" for i in range(1200)]  # more than one statement's worth
    await catalog.claim("acme", "wiki", [], many, lease=False)
    await catalog.complete_documents("acme", [(d, 1, f"fp-{d}", None, {}) for d in many])
    found = await catalog.content_versions("acme", ["pay", *many], source="wiki")
    assert found == {d: f"fp-{d}" for d in many}


async def test_leases_keep_two_requests_off_one_document(open_replica: Opener) -> None:
    catalog = open_replica()
    await _two_sources(catalog)
    first = await catalog.claim("acme", "hr", [], ["pay"])
    with pytest.raises(Conflict, match="being updated"):
        await catalog.claim("acme", "hr", [], ["pay"])
    await catalog.release(first)
    await catalog.release(await catalog.claim("acme", "hr", [], ["pay"]))


async def test_concurrent_replicas_cannot_both_claim_a_name(open_replica: Opener) -> None:
    replicas = [open_replica() for _ in range(3)]
    await _two_sources(replicas[0])
    for round_ in range(5):
        attempts = [
            replica.claim("acme", source, [f"f{round_}"], [f"d{round_}"], lease=False)
            for replica in replicas
            for source in ("hr", "wiki")
        ]
        results = await asyncio.gather(*attempts, return_exceptions=True)
        winners = {r.source for r in results if not isinstance(r, BaseException)}
        assert len(winners) == 1, results
        assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))


async def test_linked_folders_are_one_tree_with_one_owner(open_replica: Opener) -> None:
    catalog = open_replica()
    await _two_sources(catalog)
    await catalog.link("acme", "folder:eng", "folder:eng-incidents")  # nobody owns either
    await catalog.release(await catalog.claim("acme", "hr", ["eng-incidents"], ["pay"]))
    assert await catalog.folder_source("acme", "eng") == "hr"
    with pytest.raises(Conflict):
        await catalog.claim("acme", "wiki", ["eng"], [])
    with pytest.raises(Conflict):
        await catalog.link("acme", "source:wiki", "folder:eng")
    await catalog.release(await catalog.claim("acme", "wiki", ["wiki-eng"], ["w1"]))
    with pytest.raises(Conflict):
        await catalog.link("acme", "folder:eng", "folder:wiki-eng")
    with pytest.raises(Conflict):
        await catalog.link("acme", "folder:wiki-eng", "document:pay")
    with pytest.raises(Conflict):
        await catalog.link("acme", "folder:eng", "document:w1")


async def test_removing_a_source_frees_its_names(open_replica: Opener) -> None:
    catalog = open_replica()
    await _two_sources(catalog)
    await catalog.release(await catalog.claim("acme", "hr", ["payroll"], ["pay"]))
    await catalog.mark_removing("acme", "hr")
    assert [s.id for s in await catalog.list_sources("acme")] == ["wiki"]
    with pytest.raises(Conflict, match="not active"):
        await catalog.claim("acme", "hr", [], ["other"])
    assert await catalog.source_contents("acme", "hr") == (["pay"], ["payroll"])
    await catalog.forget_source("acme", "hr")
    await catalog.release(await catalog.claim("acme", "wiki", ["payroll"], ["pay"]))


async def test_replicas_see_each_others_writes(open_replica: Opener) -> None:
    one, two = open_replica(), open_replica()
    await one.add_tenant("acme")
    with pytest.raises(Conflict):
        await two.add_tenant("acme")
    await one.add_source("acme", "docs", "chroma", {"url": "http://chroma:8000"})
    info = await two.get_source("acme", "docs")
    assert info is not None and info.config == {"url": "http://chroma:8000"}
    claim = await two.claim("acme", "docs", [], ["d1"])
    await two.complete_document("acme", "d1", chunks=3, fingerprint="a:b", folder=None, acl={})
    await two.release(claim)
    assert await one.document_count("acme", "docs") == 1


async def test_a_retrievals_view_is_read_fresh_across_replicas(open_replica: Opener) -> None:
    """One statement gives a retrieval the directory state and the active sources: a
    source removed or a directory declared through another replica counts at once."""
    one, two = open_replica(), open_replica()
    empty = await two.retrieval_view("acme")
    assert empty.directory is None and empty.sources == []
    await _two_sources(one)
    claim = await one.claim("acme", "hr", [], ["d1", "d2"])
    for d in ("d1", "d2"):
        await one.complete_document("acme", d, chunks=1, fingerprint="f", folder=None, acl={})
    await one.release(claim)
    view = await two.retrieval_view("acme")
    assert [(s.id, n) for s, n in view.sources] == [("hr", 2), ("wiki", 0)]
    assert view.directory is None
    await one.mark_removing("acme", "hr")
    await one.declare_directory("acme", "scim", 60.0)
    view = await two.retrieval_view("acme")
    assert [s.id for s, _ in view.sources] == ["wiki"]
    assert view.directory is not None and view.directory.source == "scim"
    assert view.directory.max_silence_s == 60.0
    assert (await two.retrieval_view("globex")).sources == []


async def test_replicas_starting_together_migrate_once(open_replica: Opener) -> None:
    replicas = [open_replica() for _ in range(4)]
    await asyncio.gather(*(r.list_sources("acme") for r in replicas))
    await replicas[0].add_source("acme", "docs", "chroma", {})
    assert [s.id for r in replicas for s in await r.list_sources("acme")] == ["docs"] * 4


def test_an_existing_embedded_catalog_is_migrated(tmp_path: Path) -> None:
    legacy = sqlite3.connect(tmp_path / "catalog.db")
    legacy.executescript(
        "CREATE TABLE sources (tenant TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL,"
        " config TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (tenant, id));"
        "CREATE TABLE documents (tenant TEXT NOT NULL, source TEXT NOT NULL, id TEXT NOT NULL,"
        " chunks INTEGER NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (tenant, id));"
        "INSERT INTO sources VALUES ('acme', 'docs', 'chroma', '{}', 1.0);"
        "INSERT INTO documents VALUES ('acme', 'docs', 'd1', 2, 1.0);"
    )
    legacy.close()

    async def check() -> None:
        catalog = open_catalog(None, tmp_path)
        try:
            assert [s.id for s in await catalog.list_sources("acme")] == ["docs"]
            entry = await catalog.document("acme", "d1")
            # Complete, but with an unknown fingerprint: the next ingestion rewrites it.
            assert entry is not None and entry.fingerprint == "v1" and entry.chunks == 2
            assert await catalog.document_count("acme", "docs") == 1
        finally:
            await catalog.close()

    asyncio.run(check())
