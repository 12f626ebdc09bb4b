"""Fronted collections and ACL sync (DESIGN §4 ``/sync``, THREATS "A store's metadata can lie").

Collections are filled by plain chromadb and qdrant-client code, never by scopegate;
the gateway is registered in front of them, syncs their ACL metadata into the real
OpenFGA, and every retrieval is compared with an exact oracle over the upstream chunks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import chromadb
import httpx
import numpy as np
import pytest
from chromadb.config import Settings as ChromaSettings
from qdrant_client import QdrantClient, models

from connectors.embeddings import HashEmbeddings
from connectors.mapping import folder_chain, parse_mapping
from gateway.api import create_app
from gateway.errors import InvalidRequest
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from tests.conftest import make_settings
from tests.faultproxy import Fault, FaultProxy
from tests.world import World, bearer

TOPICS = [
    "incident runbook for the payments database failover",
    "quarterly hiring plan for the platform engineering team",
    "salary bands and compensation review for engineers",
    "how to rotate the TLS certificates of the public gateway",
    "offsite agenda and travel booking for the sales team",
    "postmortem of the search outage caused by a bad deploy",
    "security review checklist for new vendor integrations",
    "onboarding guide for new support agents",
]
QUERIES = [
    "database failover incident",
    "engineering hiring and compensation",
    "certificate rotation on the gateway",
    "outage postmortem",
]
CHROMA_MAPPING = {
    "document_id": "doc",
    "folder": "path",
    "viewers": "readers",
    "agents": "bots",
    "prefixes": {"grp:": "group:{}#member", "usr:": "user:{}"},
}
QDRANT_MAPPING = {"document_id": "doc_id", "viewers": "readers", "agents": "bots"}


class Upstream:
    """What the platform team's own pipeline wrote: chunks with text, vector and ACL."""

    def __init__(self, embeddings: Any) -> None:
        self.embeddings = embeddings
        # chunk id -> (source, document id or None, text, vector)
        self.chunks: dict[str, tuple[str, str | None, str, list[float]]] = {}
        # (source, document id) -> (viewers, agents)
        self.acl: dict[str, tuple[set[str], set[str]]] = {}

    def vectors(self, texts: Sequence[str]) -> list[list[float]]:
        return [list(map(float, v)) for v in self.embeddings.embed_documents(list(texts))]

    def permitted(self, user: str, groups: set[str], agent: str) -> set[str]:
        who = {f"user:{user}"} | {f"group:{g}#member" for g in groups}
        return {
            d
            for d, (viewers, agents) in self.acl.items()
            if viewers & who and f"agent:{agent}" in agents
        }

    def oracle(self, query: str, permitted: set[str], k: int) -> list[str]:
        q = np.asarray(self.embeddings.embed_query(query), dtype=np.float64)
        scored = []
        for cid, (_, doc, _, vec) in self.chunks.items():
            if doc in permitted:
                v = np.asarray(vec, dtype=np.float64)
                scored.append((1.0 - float(v @ q / (np.linalg.norm(v) * np.linalg.norm(q))), cid))
        return [cid for _, cid in sorted(scored)[:k]]


def fill_chroma(path: Path, up: Upstream) -> chromadb.Collection:
    """Plain chromadb: 8 documents of 2 chunks, plus two chunks naming no valid document."""
    client = chromadb.PersistentClient(
        path=str(path), settings=ChromaSettings(anonymized_telemetry=False)
    )
    kb = client.create_collection(
        "team-kb", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
    )
    ids, texts, metas = [], [], []
    for i, topic in enumerate(TOPICS):
        doc = f"c{i}"
        readers = "usr:alice,grp:eng" if i % 3 != 2 else "usr:bob"
        up.acl[doc] = (
            {"user:alice", "group:eng#member"} if i % 3 != 2 else {"user:bob"},
            {"agent:helper"},
        )
        for part in range(2):
            ids.append(f"{doc}-{part}")
            texts.append(f"{topic} (part {part}) from the wiki")
            metas.append(
                {
                    "doc": doc,
                    "path": "eng/runbooks" if i < 4 else "sales",
                    "readers": readers,
                    "bots": "agent:helper",
                    "team": "eng",
                }
            )
    # Chunks that must never be served: no document id, and an id OpenFGA cannot take.
    ids += ["orphan-0", "orphan-1"]
    texts += [f"{TOPICS[0]} orphan copy", f"{TOPICS[0]} malformed copy"]
    metas += [
        {"readers": "usr:alice", "bots": "agent:helper"},
        {"doc": "bad#id", "readers": "usr:alice", "bots": "agent:helper"},
    ]
    vectors = up.vectors(texts)
    kb.add(ids=ids, embeddings=vectors, documents=texts, metadatas=metas)
    for cid, text, meta, vec in zip(ids, texts, metas, vectors, strict=True):
        up.chunks[cid] = ("wiki", meta.get("doc"), text, vec)
    return kb


def fill_qdrant(path: Path, up: Upstream) -> None:
    """Plain qdrant-client in local mode: payloads with a list of readers."""
    client = QdrantClient(path=str(path))
    client.create_collection(
        "vault", vectors_config=models.VectorParams(size=384, distance=models.Distance.COSINE)
    )
    points = []
    texts = [f"{topic} (vault copy)" for topic in TOPICS]
    for i, (text, vec) in enumerate(zip(texts, up.vectors(texts), strict=True)):
        doc = f"q{i}"
        readers = ["user:alice"] if i % 2 == 0 else ["user:carol"]
        up.acl[doc] = (set(readers), {"agent:helper"})
        points.append(
            models.PointStruct(
                id=i + 1,
                vector=vec,
                payload={"doc_id": doc, "text": text, "readers": readers, "bots": "agent:helper"},
            )
        )
        up.chunks[str(i + 1)] = ("vault", doc, text, vec)
    client.upsert("vault", points=points)
    client.close()


@pytest.fixture
async def world(gateway: Gateway) -> AsyncIterator[World]:
    transport = httpx.ASGITransport(app=create_app(gateway=gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as http:
        w = await World(gateway, http, "acme").setup(
            members=["alice", "bob", "carol"], agents=["helper"]
        )
        await w.relationships(
            writes=[{"user": "user:bob", "relation": "member", "object": "group:eng"}]
        )
        yield w


async def sync(w: World, source: str, dry_run: bool = False) -> dict[str, Any]:
    response = await w.http.post(
        f"/v1/sources/{source}/sync", json={"dry_run": dry_run}, headers=bearer(w.admin_token)
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


async def register(w: World, tmp_path: Path, up: Upstream) -> None:
    fill_chroma(tmp_path / "upstream-chroma", up)
    fill_qdrant(tmp_path / "upstream-qdrant", up)
    chroma = {
        "collection": "team-kb",
        "path": str(tmp_path / "upstream-chroma"),
        "mapping": CHROMA_MAPPING,
    }
    qdrant = {
        "collection": "vault",
        "path": str(tmp_path / "upstream-qdrant"),
        "mapping": QDRANT_MAPPING,
    }
    await w.admin_call("POST", "/v1/sources", {"id": "wiki", "kind": "chroma", "config": chroma})
    await w.admin_call("POST", "/v1/sources", {"id": "vault", "kind": "qdrant", "config": qdrant})


async def check_exact(w: World, up: Upstream, user: str, groups: set[str], task: str) -> None:
    permitted = up.permitted(user, groups, "helper")
    for query in QUERIES:
        response = await w.retrieve(user, "helper", task, query, k=5, sources=["wiki", "vault"])
        if response.status_code != 200:
            failed = await w.g.audit.get("acme", response.json()["error"]["request_id"])
            raise AssertionError(failed.record.extra if failed else response.text)
        chunks = response.json()["chunks"]
        assert [c["chunk_id"] for c in chunks] == up.oracle(query, permitted, 5), query
        for c in chunks:
            assert c["document_id"] in permitted
            assert c["source"] == up.chunks[c["chunk_id"]][0]
            # ACL fields never reach agents; plain scalar metadata does.
            assert not {"readers", "bots", "doc", "doc_id"} & set(c["metadata"])


async def test_fronted_chroma_and_qdrant_sync_retrieve_and_follow_upstream_changes(
    world: World, tmp_path: Path, embeddings: Any
) -> None:
    w, up = world, Upstream(embeddings)
    await register(w, tmp_path, up)
    alice_task = await w.task("alice", "helper", ["source:wiki", "source:vault"])
    bob_task = await w.task("bob", "helper", ["source:wiki", "source:vault"])

    # Nothing is served before the first sync: no document carries its tenant stamp yet.
    assert await w.retrieved_docs("alice", "helper", alice_task, QUERIES[0]) == []

    preview = await sync(w, "wiki", dry_run=True)
    assert preview["writes"] > 0 and preview["deletes"] == 0 and preview["unchanged"] == 0
    assert {"user": "user:alice", "relation": "viewer", "object": "document:c0"} in preview["diff"][
        "writes"
    ]
    assert {
        "user": "folder:eng",
        "relation": "parent",
        "object": "folder:eng__runbooks",
    } in preview["diff"]["writes"]
    assert await w.g.fga.read(object="document:acme/c0") == []  # the dry run wrote nothing

    first = {s: await sync(w, s) for s in ("wiki", "vault")}
    assert first["wiki"]["writes"] == preview["writes"]
    assert first["wiki"]["orphans"] == 1  # the chunk without a document id
    again = {s: await sync(w, s) for s in ("wiki", "vault")}
    for s in ("wiki", "vault"):
        assert again[s]["writes"] == 0 and again[s]["deletes"] == 0
        assert again[s]["unchanged"] == first[s]["writes"]

    await check_exact(w, up, "alice", set(), alice_task)
    await check_exact(w, up, "bob", {"eng"}, bob_task)
    returned = {
        c for q in QUERIES for c in await w.retrieved_docs("alice", "helper", alice_task, q, 10)
    }
    assert "bad#id" not in returned and None not in returned

    # Upstream changes: the wiki takes c0 away from alice; the vault gives q1 to alice.
    client = chromadb.PersistentClient(
        path=str(tmp_path / "upstream-chroma"), settings=ChromaSettings(anonymized_telemetry=False)
    )
    kb = client.get_collection("team-kb", embedding_function=None)
    for part in range(2):
        kb.update(
            ids=[f"c0-{part}"],
            metadatas=[
                {"doc": "c0", "path": "eng/runbooks", "readers": "usr:bob", "bots": "agent:helper"}
            ],
        )
    up.acl["c0"] = ({"user:bob"}, {"agent:helper"})
    vault = await w.g.catalog.get_source("acme", "vault")
    assert vault is not None
    w.g.stores.for_source(vault).close()  # type: ignore[attr-defined]  # release the local path
    upstream = QdrantClient(path=str(tmp_path / "upstream-qdrant"))
    upstream.set_payload("vault", payload={"readers": ["user:alice", "user:carol"]}, points=[2])
    upstream.close()
    up.acl["q1"] = ({"user:alice", "user:carol"}, {"agent:helper"})

    wiki_change = await sync(w, "wiki")
    assert wiki_change["deletes"] == 2 and wiki_change["writes"] == 1  # alice, grp:eng out; bob in
    vault_change = await sync(w, "vault")
    assert vault_change["deletes"] == 0 and vault_change["writes"] == 1
    # Incremental: only c0 changed upstream, the other seven were not read back.
    assert wiki_change["skipped"] == 7
    await check_exact(w, up, "alice", set(), alice_task)
    await check_exact(w, up, "bob", {"eng"}, bob_task)

    # A grant removed in OpenFGA behind the source's back: the incremental sync trusts
    # its last run; a full one reads every document and restores it.
    await w.relationships(
        deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:c1"}]
    )
    assert (await sync(w, "wiki"))["writes"] == 0
    response = await w.http.post(
        "/v1/sources/wiki/sync", json={"full": True}, headers=bearer(w.admin_token)
    )
    assert response.json()["writes"] == 1 and response.json()["skipped"] == 0
    await check_exact(w, up, "alice", set(), alice_task)
    # The audit log holds each applied sync with its diff.
    records = [
        e.record
        async for e in w.g.audit.iter_all("acme")
        if e.record.extra.get("action") == "source.sync"
    ]
    assert any(
        ["user:acme/bob", "viewer", "document:acme/c0"] in r.extra.get("writes", [])
        for r in records
    )


async def test_chroma_residue_never_becomes_metadata_or_grants(
    world: World, tmp_path: Path, embeddings: Any
) -> None:
    """chromadb 1.5.9 hands a deleted collection's array metadata to new records."""
    w, up = world, Upstream(embeddings)
    path = tmp_path / "residue"
    client = chromadb.PersistentClient(
        path=str(path), settings=ChromaSettings(anonymized_telemetry=False)
    )
    old = client.create_collection(
        "scratch", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
    )
    texts = [f"{t} (residue)" for t in TOPICS[:4]]
    vectors = up.vectors(texts)
    old.add(
        ids=[f"o{i}" for i in range(4)],
        embeddings=vectors,
        documents=texts,
        metadatas=[{"tags": ["SECRET_A", "hr"], "readers": ["user:bob"]}] * 4,
    )
    client.delete_collection("scratch")
    kb = client.create_collection(
        "fresh-kb", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
    )
    kb.add(
        ids=[f"n{i}" for i in range(4)],
        embeddings=vectors,
        documents=texts,
        metadatas=[
            {"doc": f"r{i}", "readers": "user:alice", "bots": "agent:helper", "team": "x"}
            if i == 0
            else {"doc": f"r{i}", "bots": "agent:helper"}
            for i in range(4)
        ],
    )
    raw = kb.get(include=["metadatas"])["metadatas"] or []
    assert any("tags" in m for m in raw), "chromadb no longer leaks residue: revisit this test"
    assert any(m.get("readers") == ["user:bob"] for m in raw)

    config = {
        "collection": "fresh-kb",
        "path": str(path),
        "mapping": {"document_id": "doc", "viewers": "readers", "agents": "bots"},
    }
    await w.admin_call("POST", "/v1/sources", {"id": "fresh", "kind": "chroma", "config": config})
    result = await sync(w, "fresh")
    assert result["documents"] == 4
    # Only r0 grants a viewer (alice); the residue's array "readers" grants bob nothing.
    viewers = [
        t
        for t in await w.g.fga.read(user="user:acme/bob", object="document:")
        if t.object.startswith("document:acme/r")
    ]
    assert viewers == []
    for doc in ("r1", "r2", "r3"):
        assert not [
            t for t in await w.g.fga.read(object=f"document:acme/{doc}") if t.relation == "viewer"
        ]
    bob = await w.task("bob", "helper", ["source:fresh"])
    assert await w.retrieved_docs("bob", "helper", bob, "payments database failover", 4) == []
    alice = await w.task("alice", "helper", ["source:fresh"])
    response = await w.retrieve("alice", "helper", alice, "payments database failover", k=4)
    chunks = response.json()["chunks"]
    assert [c["document_id"] for c in chunks] == ["r0"]
    assert chunks[0]["metadata"] == {"team": "x"}  # no "tags" residue, no ACL fields


async def test_sync_claims_names_and_refuses_another_sources_documents(
    world: World, tmp_path: Path, embeddings: Any
) -> None:
    w, up = world, Upstream(embeddings)
    await w.ingest(
        [{"id": "c1", "text": "managed copy", "acl": {"viewers": ["user:alice"], "agents": []}}]
    )
    fill_chroma(tmp_path / "up", up)
    config = {"collection": "team-kb", "path": str(tmp_path / "up"), "mapping": CHROMA_MAPPING}
    await w.admin_call("POST", "/v1/sources", {"id": "wiki", "kind": "chroma", "config": config})
    for dry_run in (True, False):
        response = await w.http.post(
            "/v1/sources/wiki/sync", json={"dry_run": dry_run}, headers=bearer(w.admin_token)
        )
        assert response.status_code == 409, response.text
    assert await w.g.fga.read(object="document:acme/c0") == []
    # One tenant per collection: the same collection cannot be registered again.
    again = await w.http.post(
        "/v1/sources",
        json={"id": "wiki2", "kind": "chroma", "config": config},
        headers=bearer(w.admin_token),
    )
    assert again.status_code == 409
    # A fronted source is written upstream, never through scopegate.
    ingest = await w.http.post(
        "/v1/sources/wiki/documents",
        json={"documents": [{"id": "x", "text": "t", "acl": {}}]},
        headers=bearer(w.admin_token),
    )
    assert ingest.status_code == 400 or ingest.status_code == 422
    removal = await w.http.delete("/v1/sources/wiki/documents/c0", headers=bearer(w.admin_token))
    assert removal.status_code in (400, 422)


async def test_managed_sync_restores_ingested_acls(world: World) -> None:
    w = world
    docs = [
        {
            "id": f"m{i}",
            "text": f"{t}",
            "folder": "eng",
            "acl": {"viewers": ["user:alice"], "agents": ["agent:helper"]},
        }
        for i, t in enumerate(TOPICS)
    ]
    await w.ingest(docs)
    assert (await sync(w, "docs"))["writes"] == 0
    # Someone widens and narrows behind the catalog's back.
    await w.relationships(
        writes=[{"user": "user:bob", "relation": "viewer", "object": "document:m1"}],
        deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:m2"}],
    )
    preview = await sync(w, "docs", dry_run=True)
    assert preview["deletes"] == 1 and preview["writes"] == 1
    assert preview["diff"]["deletes"] == [
        {"user": "user:bob", "relation": "viewer", "object": "document:m1"}
    ]

    applied = await sync(w, "docs")
    assert (applied["writes"], applied["deletes"]) == (1, 1)
    final = await sync(w, "docs")
    assert final["writes"] == 0 and final["deletes"] == 0
    task = await w.task("bob", "helper", ["source:docs"])
    assert await w.retrieved_docs("bob", "helper", task, TOPICS[1]) == []


def fill_many(path: Path, count: int) -> dict[str, set[tuple[str, str, str]]]:
    """Plain chromadb: ``count`` one-chunk documents in nested folders; the tuples each
    must end up with in OpenFGA (namespaced as the gateway writes them)."""
    client = chromadb.PersistentClient(
        path=str(path), settings=ChromaSettings(anonymized_telemetry=False)
    )
    kb = client.create_collection(
        "many", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
    )
    hashed = HashEmbeddings()
    texts = [f"{TOPICS[i % len(TOPICS)]} number {i}" for i in range(count)]
    metas: list[Any] = []
    wanted: dict[str, set[tuple[str, str, str]]] = {}
    for i in range(count):
        folder = f"team{i % 3}/sub{i % 2}"
        metas.append(
            {"doc": f"m{i}", "path": folder, "readers": f"usr:u{i % 4}", "bots": "agent:helper"}
        )
        obj = f"document:acme/m{i}"
        wanted[obj] = {
            ("tenant:acme", "tenant", obj),
            (f"folder:acme/team{i % 3}__sub{i % 2}", "parent", obj),
            (f"user:acme/u{i % 4}", "viewer", obj),
            ("agent:acme/helper", "agent_viewer", obj),
        }
    kb.add(
        ids=[f"m{i}-0" for i in range(count)],
        embeddings=hashed.embed_documents(texts),
        documents=texts,
        metadatas=metas,
    )
    return wanted


@pytest.mark.parametrize("cut", ["reset", "answer_lost"])
async def test_sync_cut_off_from_openfga_part_way_converges_on_rerun(
    openfga: ManagedOpenFGA, tmp_path: Path, cut: str
) -> None:
    """The connection to OpenFGA is cut (a real TCP reset, or the write applied and its
    answer lost) after the first of several write transactions: the sync fails, nothing
    is claimed done, a rerun through a healthy connection writes exactly what is
    missing, the tuple set is exact, and a third run writes nothing."""
    wanted = fill_many(tmp_path / "up", 60)
    with FaultProxy(openfga.http_port) as proxy:
        settings = make_settings(openfga, tmp_path / "data", openfga_url=proxy.url)
        g = await Gateway.start(settings, embeddings=HashEmbeddings())
        try:
            transport = httpx.ASGITransport(app=create_app(gateway=g))
            async with httpx.AsyncClient(transport=transport, base_url="http://sg") as http:
                w = await World(g, http, "acme").setup(members=["u0"], agents=["helper"])
                config = {
                    "collection": "many",
                    "path": str(tmp_path / "up"),
                    "mapping": CHROMA_MAPPING,
                }
                await w.admin_call(
                    "POST", "/v1/sources", {"id": "many", "kind": "chroma", "config": config}
                )
                preview = await sync(w, "many", dry_run=True)
                assert preview["writes"] > 200  # three transactions of at most 100
                fault = Fault.reset() if cut == "reset" else Fault.truncate(0)
                earlier = len(proxy.requests("/write"))
                proxy.set(Fault.after(1, dataclasses.replace(fault, path="/write")))
                cut_off = await http.post(
                    "/v1/sources/many/sync", json={}, headers=bearer(w.admin_token)
                )
                assert cut_off.status_code == 503, cut_off.text
                assert cut_off.json()["error"]["code"] == "authorization_unavailable"
                writes = [s.fault for s in proxy.requests("/write")[earlier:]]
                assert writes[:2] == ["none", "reset" if cut == "reset" else "truncate"]
                proxy.clear()
                rerun = await sync(w, "many")
                if cut == "reset":
                    assert rerun["writes"] == preview["writes"] - 100
                else:  # the second transaction was applied too, its answer lost
                    assert rerun["writes"] == preview["writes"] - 200
                assert rerun["deletes"] == 0
                third = await sync(w, "many")
                assert (third["writes"], third["deletes"]) == (0, 0)
                full = await http.post(
                    "/v1/sources/many/sync", json={"full": True}, headers=bearer(w.admin_token)
                )
                assert (full.json()["writes"], full.json()["deletes"]) == (0, 0)
                for obj, expected in wanted.items():
                    found = {(t.user, t.relation, t.object) for t in await g.fga.read(object=obj)}
                    assert found == expected, obj
                for top in range(3):
                    for sub in range(2):
                        obj = f"folder:acme/team{top}__sub{sub}"
                        parents = {
                            t.user for t in await g.fga.read(object=obj) if t.relation == "parent"
                        }
                        assert parents == {f"folder:acme/team{top}"}
        finally:
            await g.close()


async def test_grant_on_a_parent_folder_reaches_documents_in_nested_folders(
    world: World, tmp_path: Path, embeddings: Any
) -> None:
    """``eng/runbooks`` in the folder field: a grant on ``folder:eng`` reaches the
    runbooks over HTTP; without it, nothing; a task scoped to ``folder:eng`` covers them."""
    w, up = world, Upstream(embeddings)
    fill_chroma(tmp_path / "upstream-chroma", up)
    config = {
        "collection": "team-kb",
        "path": str(tmp_path / "upstream-chroma"),
        "mapping": {"document_id": "doc", "folder": "path", "agents": "bots"},  # no viewers
    }
    await w.admin_call("POST", "/v1/sources", {"id": "wiki", "kind": "chroma", "config": config})
    await sync(w, "wiki")
    task = await w.task("carol", "helper", ["folder:eng"])
    runbooks = {f"c{i}" for i in range(4)}  # eng/runbooks; c4..c7 are in sales
    assert await w.retrieved_docs("carol", "helper", task, QUERIES[0], 10) == []
    await w.relationships(
        writes=[{"user": "user:carol", "relation": "viewer", "object": "folder:eng"}]
    )
    found = {d for q in QUERIES for d in await w.retrieved_docs("carol", "helper", task, q, 10)}
    assert found == runbooks
    wide = await w.task("carol", "helper", ["source:wiki"])
    found = {d for q in QUERIES for d in await w.retrieved_docs("carol", "helper", wide, q, 10)}
    assert found == runbooks  # the sales folder has no grant for carol
    await w.relationships(
        deletes=[{"user": "user:carol", "relation": "viewer", "object": "folder:eng"}]
    )
    assert await w.retrieved_docs("carol", "helper", task, QUERIES[0], 10) == []


async def test_qdrant_server_config_keeps_its_api_key_secret(
    world: World, openfga: ManagedOpenFGA, tmp_path: Path
) -> None:
    w = world
    secret = "qd-secret-4f1c9a"
    config = {
        "collection": "vault",
        "url": "http://qdrant.internal:6333",
        "api_key": secret,
        "mapping": QDRANT_MAPPING,
    }
    await w.admin_call("POST", "/v1/sources", {"id": "vault", "kind": "qdrant", "config": config})
    await w.admin_call("POST", "/v1/sources", {"id": "managed", "kind": "qdrant", "config": {
        "url": "https://qdrant.internal:6333", "api_key": secret}})  # fmt: skip
    for path in ("/v1/sources", "/v1/sources/vault", "/v1/sources/managed"):
        response = await w.http.get(path, headers=bearer(w.admin_token))
        assert response.status_code == 200 and secret not in response.text, response.text
        assert '"api_key":"***"' in response.text.replace(" ", "")
    # The store is built with the key (kept in the catalog for the store's client).
    info = await w.g.catalog.get_source("acme", "vault")
    assert info is not None and info.config["api_key"] == secret
    records = [e.record async for e in w.g.audit.iter_all("acme")]
    assert not any(secret in json.dumps(r.extra, default=str) for r in records)
    bad = [
        {"url": "http://q:6333", "path": str(tmp_path)},
        {"path": str(tmp_path), "api_key": "k"},
        {"url": "ftp://q"},
        {"url": "http://q:6333", "api_key": ""},
        {"url": "http://q:6333", "token": "k"},
    ]
    for i, cfg in enumerate(bad):
        response = await w.http.post(
            "/v1/sources",
            json={"id": f"bad{i}", "kind": "qdrant", "config": cfg},
            headers=bearer(w.admin_token),
        )
        assert response.status_code == 422, (cfg, response.text)
    # Production refuses local mode (and embedded Chroma fronting), like embedded Chroma.
    settings = make_settings(openfga, tmp_path / "prod")
    prod = await Gateway.start(settings, embeddings=HashEmbeddings())
    try:
        prod.settings = prod.settings.model_copy(update={"environment": "production"})
        await prod.create_tenant("acme", "admin")
        from gateway.identity import PrincipalContext

        p = PrincipalContext("acme", "admin", "t")
        for kind, cfg in (
            ("qdrant", {"path": str(tmp_path / "q")}),
            ("qdrant", {}),
            ("chroma", {"collection": "c", "path": str(tmp_path), "mapping": {"document_id": "d"}}),
        ):
            with pytest.raises(InvalidRequest, match="production"):
                await prod.register_source(p, "s", kind, cfg)
        await prod.register_source(p, "s", "qdrant", {"url": "https://q:6333", "api_key": "k"})
    finally:
        await prod.close()


class Stamped:
    """A collection whose pipeline stamps every chunk with ``ts`` (plain client code)."""

    def __init__(self, kind: str, path: Path, embeddings: Any) -> None:
        self.kind, self.path, self.embeddings = kind, path, embeddings
        self.texts = [f"{topic} (stamped)" for topic in TOPICS[:6]]

    def config(self) -> dict[str, Any]:
        mapping = {"document_id": "doc", "viewers": "readers", "agents": "bots", "updated_at": "ts"}
        return {"collection": "stamped", "path": str(self.path), "mapping": mapping}

    def fill(self) -> None:
        vectors = [list(map(float, v)) for v in self.embeddings.embed_documents(self.texts)]
        if self.kind == "chroma":
            kb = self._chroma().create_collection(
                "stamped", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
            )
            kb.add(
                ids=[f"s{i}" for i in range(6)],
                embeddings=vectors,
                documents=self.texts,
                metadatas=[self._meta(i, "user:alice", 100 + i) for i in range(6)],
            )
            return
        client = QdrantClient(path=str(self.path))
        client.create_collection(
            "stamped", vectors_config=models.VectorParams(size=384, distance=models.Distance.COSINE)
        )
        client.upsert(
            "stamped",
            points=[
                models.PointStruct(
                    id=i + 1,
                    vector=vectors[i],
                    payload={**self._meta(i, "user:alice", 100 + i), "text": self.texts[i]},
                )
                for i in range(6)
            ],
        )
        client.close()

    def change(self, i: int, reader: str, ts: int, client: QdrantClient | None = None) -> None:
        """New ACL on chunk ``i`` (Qdrant: through ``client`` when the path's is open)."""
        if self.kind == "chroma":
            self._chroma().get_collection("stamped").update(
                ids=[f"s{i}"], metadatas=[self._meta(i, reader, ts)]
            )
            return
        qdrant = client or QdrantClient(path=str(self.path))
        qdrant.set_payload("stamped", payload=self._meta(i, reader, ts), points=[i + 1])
        if client is None:
            qdrant.close()

    def remove(self, i: int) -> None:
        if self.kind == "chroma":
            self._chroma().get_collection("stamped").delete(ids=[f"s{i}"])
            return
        client = QdrantClient(path=str(self.path))
        client.delete("stamped", points_selector=models.PointIdsList(points=[i + 1]))
        client.close()

    def _chroma(self) -> Any:
        return chromadb.PersistentClient(
            path=str(self.path), settings=ChromaSettings(anonymized_telemetry=False)
        )

    @staticmethod
    def _meta(i: int, reader: str, ts: int) -> dict[str, Any]:
        return {"doc": f"u{i}", "readers": reader, "bots": "agent:helper", "ts": ts}


@pytest.mark.parametrize("kind", ["chroma", "qdrant"])
async def test_incremental_sync_reads_only_what_changed_since_the_last_one(
    world: World, tmp_path: Path, embeddings: Any, kind: str
) -> None:
    """With ``updated_at`` mapped, a sync reads the documents written at or after the
    last sync's high-water mark; removals upstream wait for a full sync."""
    w = world
    up = Stamped(kind, tmp_path / "stamped", embeddings)
    up.fill()
    await w.admin_call("POST", "/v1/sources", {"id": "st", "kind": kind, "config": up.config()})
    first = await sync(w, "st")  # no mark yet: everything is read
    assert (first["documents"], first["since"], first["deletes"]) == (6, None, 0)

    def release() -> None:  # Qdrant local mode: one client per path at a time
        if kind == "qdrant":
            for store in w.g.stores._stores.values():
                store.close()  # type: ignore[attr-defined]

    release()
    up.change(2, "user:bob", 200)
    up.remove(4)
    changed = await sync(w, "st")
    # u2 (changed) and u5 (written at the mark itself, read again and skipped) only.
    assert changed["since"] == 105 and changed["documents"] == 2 and changed["skipped"] == 1
    assert (changed["writes"], changed["deletes"]) == (1, 1)  # bob in, alice out
    viewers = {
        t.user for t in await w.g.fga.read(object="document:acme/u2") if t.relation == "viewer"
    }
    assert viewers == {"user:acme/bob"}
    # The removal upstream is not seen by a partial read: u4 keeps its tuples...
    assert await w.g.fga.read(object="document:acme/u4") != []
    again = await sync(w, "st")
    assert (again["since"], again["documents"], again["writes"], again["deletes"]) == (200, 1, 0, 0)
    # ... until a full sync, which reads everything and forgets it.
    response = await w.http.post(
        "/v1/sources/st/sync", json={"full": True}, headers=bearer(w.admin_token)
    )
    full = response.json()
    assert (full["since"], full["documents"], full["writes"]) == (None, 5, 0)
    assert full["deletes"] == 4  # u4's stamp, parent, viewer and agent grant
    assert await w.g.fga.read(object="document:acme/u4") == []
    bob = await w.task("bob", "helper", ["source:st"])
    alice = await w.task("alice", "helper", ["source:st"])
    assert set(await w.retrieved_docs("bob", "helper", bob, TOPICS[2], 10)) == {"u2"}
    assert set(await w.retrieved_docs("alice", "helper", alice, TOPICS[2], 10)) == {
        "u0", "u1", "u3", "u5"
    }  # fmt: skip


@pytest.mark.parametrize("kind", ["chroma", "qdrant"])
async def test_a_chunk_rewritten_in_a_page_a_sync_already_read_is_read_by_the_next(
    world: World, tmp_path: Path, embeddings: Any, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan of several pages is no snapshot: the pipeline revokes alice on u0 after the
    sync read u0's page, then rewrites u4, read later with a newer ``updated_at``. The
    mark is the first page's newest stamp, not u4's, so the next incremental sync reads
    u0 again and takes alice's grant away (a mark from the whole scan never would)."""
    monkeypatch.setattr("connectors.chroma_fronted.SCAN_PAGE", 2)
    monkeypatch.setattr("connectors.qdrant.PAGE", 2)
    w = world
    up = Stamped(kind, tmp_path / "stamped", embeddings)
    up.fill()
    await w.admin_call("POST", "/v1/sources", {"id": "st", "kind": kind, "config": up.config()})
    info = await w.g.catalog.get_source("acme", "st")
    assert info is not None
    store = w.g.stores.for_source(info)
    read_page = store._page  # type: ignore[attr-defined]
    pages_read = 0

    def page_then_pipeline_writes(*args: Any) -> Any:
        nonlocal pages_read
        found = read_page(*args)
        pages_read += 1
        if pages_read == 1:  # u0 and u1 read: the pipeline writes while the scan goes on
            client = store._connected() if kind == "qdrant" else None  # type: ignore[attr-defined]
            up.change(0, "user:bob", 200, client)
            up.change(4, "user:alice", 201, client)
        return found

    monkeypatch.setattr(store, "_page", page_then_pipeline_writes)
    first = await sync(w, "st")
    assert pages_read >= 3 and (first["documents"], first["since"]) == (6, None)

    async def viewers(doc: str) -> set[str]:
        tuples = await w.g.fga.read(object=f"document:acme/{doc}")
        return {t.user for t in tuples if t.relation == "viewer"}

    assert await viewers("u0") == {"user:acme/alice"}  # read before the revocation upstream
    monkeypatch.setattr(store, "_page", read_page)
    second = await sync(w, "st")
    assert await viewers("u0") == {"user:acme/bob"}, second
    assert second["since"] == 101  # the first page's newest, not u4's 201
    assert (second["writes"], second["deletes"]) == (1, 1)  # bob in, alice out, on u0
    alice = await w.task("alice", "helper", ["source:st"])
    assert "u0" not in await w.retrieved_docs("alice", "helper", alice, TOPICS[0], 10)


def test_mapping_is_validated_and_folders_nest() -> None:
    mapping = parse_mapping({"document_id": "doc", "prefixes": {"grp:": "group:{}#member"}})
    assert mapping.principal("grp:eng") == "group:eng#member"
    assert mapping.principal("user:alice") == "user:alice"
    assert folder_chain("eng/runbooks") == ("eng", "eng__runbooks")
    assert folder_chain("eng/../x") == ()
    assert folder_chain("a__b/c") == ()
    for bad in (
        {},
        {"document_id": "doc", "extra": 1},
        {"document_id": "doc", "prefixes": {"g:": "group"}},
    ):
        with pytest.raises(InvalidRequest):
            parse_mapping(bad)


async def test_cli_sources_sync_dry_run(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    del tmp_path
    w = world
    await w.ingest(
        [{"id": "m1", "text": "hello", "acl": {"viewers": ["user:alice"], "agents": []}}]
    )
    await w.relationships(
        writes=[{"user": "user:bob", "relation": "viewer", "object": "document:m1"}]
    )
    from gateway.cli import build_parser
    from gateway.commands import _in_process
    from gateway.identity import PrincipalContext

    args = build_parser().parse_args(
        ["sources", "sync", "docs", "--dry-run", "--tenant", "acme", "--as", "admin"]
    )
    p = PrincipalContext("acme", "admin", "cli-test")
    assert await _in_process("sources_sync", args, w.g, p) == 0
    out = capsys.readouterr().out
    assert '"deletes": 1' in out and "user:bob" in out
    assert any(t.user == "user:acme/bob" for t in await w.g.fga.read(object="document:acme/m1"))
    args = build_parser().parse_args(
        ["sources", "sync", "docs", "--tenant", "acme", "--as", "admin"]
    )
    assert await _in_process("sources_sync", args, w.g, p) == 0
    assert not any(t.user == "user:acme/bob" for t in await w.g.fga.read(object="document:acme/m1"))


_ = (ManagedOpenFGA, make_settings)


USAGE = Path(__file__).resolve().parent.parent / "docs" / "usage.md"
VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"


def usage_block(name: str, language: str) -> str:
    marked = re.compile(rf"<!-- run: {name} -->\n```{language}\n(?P<code>.*?)\n```", re.S)
    found = marked.search(USAGE.read_text())
    assert found is not None, f"docs/usage.md has no block {name}"
    return found["code"]


def test_usage_walkthrough_fronting_a_collection_runs_as_written(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "sg": str(VENV_BIN / "scopegate"),
        "SCOPEGATE_DATA_DIR": str(tmp_path / "data"),
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
    }
    (tmp_path / "fill.py").write_text(usage_block("front-fill", "python"))
    subprocess.run(
        [str(VENV_BIN / "python"), "fill.py"], cwd=tmp_path, env=env, check=True, timeout=300
    )
    script = "set -euo pipefail\n" + usage_block("front-commands", "sh")
    done = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = [json.loads(part) for part in _json_documents(done.stdout)]
    preview, first, second = (o for o in outputs if isinstance(o, dict) and "unchanged" in o)
    assert preview["dry_run"] is True and preview["writes"] == first["writes"] > 0
    assert second["writes"] == 0 and second["deletes"] == 0
    assert f'"writes": {first["writes"]}, "deletes": 0, "unchanged": 0' in usage_block(
        "front-commands", "sh"
    )
    retrieved = outputs[-1]
    assert [c["document_id"] for c in retrieved["chunks"]] == ["runbook-7"]


def _json_documents(text: str) -> list[str]:
    """Split concatenated pretty-printed JSON values (each starts at column 0)."""
    decoder = json.JSONDecoder()
    found, index = [], 0
    while index < len(text):
        while index < len(text) and text[index] in " \n\t\r":
            index += 1
        if index >= len(text):
            break
        if text[index] not in "[{":
            index = text.find("\n", index) + 1 or len(text)  # a plain line of output
            continue
        _, end = decoder.raw_decode(text, index)
        found.append(text[index:end])
        index = end
    return found
