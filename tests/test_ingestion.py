"""Re-ingestion never serves text under the wrong ACL (DESIGN §4, THREATS "Re-ingestion").

The gateway talks to the real OpenFGA through a fault proxy, so a write can fail for
real half-way through an update.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api import create_app
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from tests.conftest import make_settings
from tests.faultproxy import Fault, FaultProxy
from tests.world import World, doc

OLD = "Reorganisation plan draft: the platform team keeps all twelve engineers next year."
NEW = "Reorganisation plan final: the platform team shrinks to four engineers in March."
QUERY = "reorganisation plan platform team engineers"


@pytest.fixture
def proxy(openfga: ManagedOpenFGA) -> Iterator[FaultProxy]:
    with FaultProxy(port=openfga.http_port) as p:
        yield p


@pytest.fixture
async def world(
    openfga: ManagedOpenFGA, proxy: FaultProxy, tmp_path: Path, embeddings: Any
) -> AsyncIterator[World]:
    settings = make_settings(openfga, tmp_path / "data", openfga_url=proxy.url)
    g = await Gateway.start(settings, embeddings=embeddings)
    transport = httpx.ASGITransport(app=create_app(gateway=g))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as http:
            w = await World(g, http, "acme").setup(members=["alice", "bob"], agents=["helper"])
            yield w
    finally:
        await g.close()


async def texts(w: World, user: str, task: str) -> set[str]:
    response = await w.retrieve(user, "helper", task, QUERY, k=5)
    assert response.status_code == 200, response.text
    return {c["text"] for c in response.json()["chunks"]}


def plan(text: str, *viewers: str) -> dict[str, Any]:
    return doc("plan", text, viewers=[f"user:{v}" for v in viewers], agents=["agent:helper"])


async def ingest(w: World, *docs: dict[str, Any]) -> httpx.Response:
    return await w.http.post(
        "/v1/sources/docs/documents",
        json={"documents": list(docs)},
        headers={"authorization": f"Bearer {w.admin_token}"},
    )


@contextlib.contextmanager
def fail_write_number(w: World, proxy: FaultProxy, number: int) -> Iterator[list[int]]:
    """Make the ``number``-th OpenFGA write from now fail (503 from the proxy, not applied)."""
    calls: list[int] = []
    original = w.g.fga.write

    async def write(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == number:
            proxy.set(Fault.respond(503, {"code": "unavailable"}, path="/write"))
        try:
            await original(*args, **kwargs)
        finally:
            proxy.clear()

    w.g.fga.write = write  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        w.g.fga.write = original  # type: ignore[method-assign]


async def test_unchanged_documents_are_skipped_without_embedding(world: World) -> None:
    w = world
    first = (await ingest(w, plan(OLD, "alice"), doc("other", "unrelated text"))).json()
    assert first == {"documents": 2, "chunks": 2, "skipped": 0}
    embedded: list[str] = []
    original = w.g.ingestor.embeddings.embed_documents

    def counting(texts: list[str]) -> list[list[float]]:
        embedded.extend(texts)
        return original(texts)

    w.g.ingestor.embeddings.embed_documents = counting  # type: ignore[method-assign]
    try:
        again = (await ingest(w, plan(OLD, "alice"), doc("other", "unrelated text"))).json()
        assert again == {"documents": 2, "chunks": 2, "skipped": 2}
        assert embedded == []
        acl_only = (await ingest(w, plan(OLD, "alice", "bob"))).json()
        assert acl_only["skipped"] == 0 and embedded == []  # grants moved, text kept
        changed = (await ingest(w, plan(NEW, "alice", "bob"))).json()
        assert changed["skipped"] == 0 and embedded == [NEW]
    finally:
        w.g.ingestor.embeddings.embed_documents = original  # type: ignore[method-assign]


async def test_narrowing_reingest_never_shows_new_text_to_the_old_audience(world: World) -> None:
    w = world
    await ingest(w, plan(OLD, "alice", "bob"))
    alice = await w.task("alice", "helper", ["source:docs"])
    bob = await w.task("bob", "helper", ["source:docs"])
    assert await texts(w, "alice", alice) == {OLD}
    seen_by_alice: set[str] = set()
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            seen_by_alice.update(await texts(w, "alice", alice))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        response = await ingest(w, plan(NEW, "bob"))
        assert response.status_code == 200, response.text
    finally:
        done.set()
        await watcher
    assert NEW not in seen_by_alice
    assert await texts(w, "alice", alice) == set()
    assert await texts(w, "bob", bob) == {NEW}


@pytest.mark.parametrize("failing_write", [1, 2])
async def test_a_failed_update_leaves_old_state_or_hidden_and_a_rerun_repairs(
    world: World, proxy: FaultProxy, failing_write: int
) -> None:
    w = world
    await ingest(w, plan(OLD, "alice", "bob"))
    alice = await w.task("alice", "helper", ["source:docs"])
    bob = await w.task("bob", "helper", ["source:docs"])
    with fail_write_number(w, proxy, failing_write):
        response = await ingest(w, plan(NEW, "bob"))
    assert response.status_code == 503, response.text
    seen_alice, seen_bob = await texts(w, "alice", alice), await texts(w, "bob", bob)
    assert NEW not in seen_alice
    # Old text under the old ACL, or hidden from everyone: never a mix.
    assert (seen_alice, seen_bob) in [({OLD}, {OLD}), (set(), set())]
    repaired = await ingest(w, plan(NEW, "bob"))
    assert repaired.status_code == 200 and repaired.json()["skipped"] == 0
    assert await texts(w, "alice", alice) == set()
    assert await texts(w, "bob", bob) == {NEW}


async def test_chunks_whose_tuples_never_landed_are_unreachable(
    world: World, proxy: FaultProxy
) -> None:
    w = world
    alice = await w.task("alice", "helper", ["source:docs"])
    with fail_write_number(w, proxy, 1):
        response = await ingest(w, plan(NEW, "alice"))
    assert response.status_code == 503
    info = await w.g.catalog.get_source("acme", "docs")
    assert info is not None
    assert await w.g.stores.for_source(info).count("acme", "docs") == 1  # stored, not served
    assert await texts(w, "alice", alice) == set()
    assert (await ingest(w, plan(NEW, "alice"))).json()["skipped"] == 0
    assert await texts(w, "alice", alice) == {NEW}


async def test_text_read_before_an_update_is_never_served_under_the_new_acl(world: World) -> None:
    """Search reads the old text, an update widens the ACL with new text, then the checks
    run: the old text (meant for bob only) must not reach alice."""
    w = world
    await ingest(w, plan(OLD, "bob"))
    task = await w.task("alice", "helper", ["source:docs"])
    ctx = await w.g.verifier.averify_delegation(w.agent_token("alice", "helper", task))
    reached, release = asyncio.Event(), asyncio.Event()
    original = w.g.fga.batch_check

    async def held(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        await release.wait()
        return await original(*args, **kwargs)

    w.g.fga.batch_check = held  # type: ignore[method-assign]
    try:
        retrieval = asyncio.create_task(w.g.retrieve(ctx, QUERY, 5, strategy="postfilter"))
        await reached.wait()  # the store has answered with the old text
        w.g.fga.batch_check = original  # type: ignore[method-assign]
        response = await ingest(w, plan(NEW, "alice", "bob"))
        assert response.status_code == 200, response.text
        release.set()
        result = await retrieval
    finally:
        w.g.fga.batch_check = original  # type: ignore[method-assign]
    assert [c.text for c in result.chunks] == []
    entry = await w.g.audit.get("acme", result.request_id)
    assert entry is not None
    assert [c.failed_checks for c in entry.record.candidates] == [("content_changed",)]
    assert await texts(w, "alice", task) == {NEW}
