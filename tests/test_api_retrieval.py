"""End to end over HTTP against the real OpenFGA and Chroma: every line of DESIGN §2."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from connectors.memory import InMemoryStore
from gateway.api import create_app
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from tests.conftest import make_settings
from tests.world import World, bearer, doc

TOPICS = {
    "rev": "Quarterly revenue forecast: revenue grows eight percent on enterprise renewals.",
    "inc": "Incident postmortem: the primary database failed over after disk saturation.",
    "pay": "Salary bands for engineers are reviewed every year with equity refreshers.",
}


async def _acme(gateway: Gateway, http: httpx.AsyncClient) -> World:
    w = await World(gateway, http, "acme").setup(
        members=["alice", "bob"], agents=["summarizer", "narrow"]
    )
    await w.relationships(
        writes=[
            {"user": "user:alice", "relation": "member", "object": "group:eng"},
            {"user": "folder:eng", "relation": "parent", "object": "folder:eng-incidents"},
            {"user": "group:eng#member", "relation": "viewer", "object": "folder:eng"},
        ]
    )
    await w.ingest(
        [
            doc(
                "rev1",
                TOPICS["rev"],
                viewers=["user:alice", "user:bob"],
                agents=["agent:summarizer"],
                folder="finance",
            ),
            doc(
                "inc1",
                TOPICS["inc"],
                agents=["agent:summarizer", "agent:narrow"],
                folder="eng-incidents",
            ),
            doc("pay1", TOPICS["pay"], viewers=["user:bob"], agents=["agent:summarizer"]),
            doc("note1", "Private note from alice about the revenue forecast.", owner="user:alice"),
        ]
    )
    return w


async def test_user_and_agent_and_task_all_required(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _acme(gateway, http)
    task = await w.task("alice", "summarizer", ["source:docs"])
    docs = await w.retrieved_docs("alice", "summarizer", task, "revenue forecast", k=10)
    # alice reads rev1 (direct), inc1 (group -> folder -> nested folder); not pay1 (bob's);
    # note1 is hers but the summarizer has no grant on it.
    assert set(docs) == {"rev1", "inc1"}


async def test_agent_narrower_than_user(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await _acme(gateway, http)
    task = await w.task("alice", "narrow", ["source:docs"])
    assert set(await w.retrieved_docs("alice", "narrow", task, "revenue", k=10)) == {"inc1"}


async def test_user_narrower_than_agent(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await _acme(gateway, http)
    task = await w.task("bob", "summarizer", ["source:docs"])
    assert set(await w.retrieved_docs("bob", "summarizer", task, "salary", k=10)) == {
        "rev1",
        "pay1",
    }


async def test_task_scope_limits_to_folder(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await _acme(gateway, http)
    task = await w.task("alice", "summarizer", ["folder:eng"])
    assert await w.retrieved_docs("alice", "summarizer", task, "revenue", k=10) == ["inc1"]


async def test_token_for_other_user_of_task_is_denied(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _acme(gateway, http)
    task = await w.task("alice", "summarizer", ["source:docs"])
    # bob presents alice's task: the task is bound to alice, so nothing comes back.
    assert await w.retrieved_docs("bob", "summarizer", task, "revenue", k=10) == []
    assert await w.retrieved_docs("alice", "narrow", task, "revenue", k=10) == []


async def test_revoked_task_denies_next_request(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await _acme(gateway, http)
    task = await w.task("alice", "summarizer", ["source:docs"])
    assert await w.retrieved_docs("alice", "summarizer", task, "revenue")
    await w.admin_call("DELETE", f"/v1/tasks/{task}")
    assert await w.retrieved_docs("alice", "summarizer", task, "revenue") == []


async def test_expired_task_denies(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await _acme(gateway, http)
    soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    task = await w.task("alice", "summarizer", ["source:docs"], expires_at=soon)
    assert await w.retrieved_docs("alice", "summarizer", task, "revenue")
    import asyncio

    await asyncio.sleep(2.5)
    assert await w.retrieved_docs("alice", "summarizer", task, "revenue") == []


async def test_deprovisioned_user_and_agent(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await _acme(gateway, http)
    task = await w.task("alice", "summarizer", ["source:docs"])
    assert await w.retrieved_docs("alice", "summarizer", task, "revenue")
    await w.relationships(
        deletes=[{"user": "agent:summarizer", "relation": "member", "object": "tenant:acme"}]
    )
    assert await w.retrieved_docs("alice", "summarizer", task, "revenue") == []
    await w.relationships(
        writes=[{"user": "agent:summarizer", "relation": "member", "object": "tenant:acme"}]
    )
    assert await w.retrieved_docs("alice", "summarizer", task, "revenue")
    await w.relationships(
        deletes=[{"user": "user:alice", "relation": "member", "object": "tenant:acme"}]
    )
    assert await w.retrieved_docs("alice", "summarizer", task, "revenue") == []


async def test_grant_revoked_then_retrieve_immediately(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _acme(gateway, http)
    task = await w.task("bob", "summarizer", ["source:docs"])
    assert "pay1" in await w.retrieved_docs("bob", "summarizer", task, "salary", k=10)
    await w.relationships(
        deletes=[{"user": "user:bob", "relation": "viewer", "object": "document:pay1"}]
    )
    assert "pay1" not in await w.retrieved_docs("bob", "summarizer", task, "salary", k=10)


async def test_cross_tenant_colliding_ids(gateway: Gateway, http: httpx.AsyncClient) -> None:
    acme = await _acme(gateway, http)
    globex = await World(gateway, http, "globex").setup(members=["alice"], agents=["summarizer"])
    await globex.ingest(
        [
            doc(
                "rev1",
                "GLOBEX revenue forecast: confidential numbers for globex only.",
                viewers=["user:alice"],
                agents=["agent:summarizer"],
            ),
        ]
    )
    g_task = await globex.task("alice", "summarizer", ["source:docs"])
    a_task = await acme.task("alice", "summarizer", ["source:docs"])
    g_resp = await globex.retrieve("alice", "summarizer", g_task, "revenue forecast", k=10)
    texts = [c["text"] for c in g_resp.json()["chunks"]]
    assert texts and all("GLOBEX" in t for t in texts)
    a_resp = await acme.retrieve("alice", "summarizer", a_task, "revenue forecast", k=10)
    assert all("GLOBEX" not in c["text"] for c in a_resp.json()["chunks"])
    # An acme task id presented in a globex token never works.
    assert await globex.retrieved_docs("alice", "summarizer", a_task, "revenue") == []


async def test_k_permitted_chunks_returned_when_they_exist(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["bot"])
    docs = []
    for i in range(60):
        allowed = i % 10 == 0  # 6 permitted among 60 near-identical documents
        docs.append(
            doc(
                f"d{i}",
                f"Revenue forecast memo number {i} for the quarter.",
                viewers=["user:alice"] if allowed else [],
                agents=["agent:bot"],
            )
        )
    await w.ingest(docs)
    task = await w.task("alice", "bot", ["source:docs"])
    got = await w.retrieved_docs("alice", "bot", task, "revenue forecast memo", k=5)
    assert len(got) == 5
    assert set(got) <= {f"d{i}" for i in range(0, 60, 10)}


async def test_response_reveals_nothing_about_denied(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _acme(gateway, http)
    task = await w.task("alice", "narrow", ["source:docs"])
    response = await w.retrieve("alice", "narrow", task, "revenue", k=10)
    body = response.json()
    assert set(body) == {"request_id", "chunks"}
    for chunk in body["chunks"]:
        assert set(chunk) == {
            "chunk_id",
            "document_id",
            "source",
            "text",
            "score",
            "tokens",
            "metadata",
        }
        assert "embedding" not in str(chunk["metadata"])
    assert "rev1" not in response.text and "pay1" not in response.text


async def test_client_filters_rejected(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await _acme(gateway, http)
    task = await w.task("alice", "summarizer", ["source:docs"])
    for extra in (
        {"where": {"tenant": "globex"}},
        {"where": {"$or": [{"tenant": "acme"}, {"tenant": "globex"}]}},
        {"where": {"document_id": {"$nin": ["pay1"]}}},
        {"where": {"classification": {"$ne": "secret"}}},
        {"where_document": {"$contains": "salary"}},
        {"filter": {"$ne": 1}},
        {"metadata": {"tenant": "globex"}},
        {"sources": [{"$ne": "docs"}]},
        {"sources": "docs"},
        {"tenant": "globex"},
        {"user": "bob"},
        {"agent": "narrow"},
        {"task": "another-task"},
        {"strategy": "postfilter"},
        {"consistency": "MINIMIZE_LATENCY"},
    ):
        response = await http.post(
            "/v1/retrieve",
            json={"query": "revenue", "k": 5, **extra},
            headers=bearer(w.agent_token("alice", "summarizer", task)),
        )
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_request"


async def test_chunks_with_missing_or_foreign_stamps_are_never_released(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    """A corrupted or foreign collection: the chunks nearest to the query lack their
    document id, tenant or source stamp, carry another tenant's or source's stamp, or
    name a document that has no access list at all. No strategy releases any of them,
    and the one legitimate chunk still comes back."""
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["bot"])
    await w.admin_call("POST", "/v1/sources", {"id": "mem", "kind": "memory"})
    await w.ingest(
        [
            doc(
                "ok1",
                "Board memo on the quarterly revenue forecast.",
                ["user:alice"],
                ["agent:bot"],
            ),
            {"id": "noacl", "text": "Quarterly revenue forecast draft without an access list."},
        ],
        source="mem",
    )
    info = await gateway.catalog.get_source("acme", "mem")
    assert info is not None
    store = gateway.stores.for_source(info)
    query = "quarterly revenue forecast"
    vector = gateway.embeddings.embed_query(query)
    [legit] = [c for c in await store.search("acme", "mem", vector, 10) if c.document_id == "ok1"]
    stamps = {"document_id": "ok1", "stamped_tenant": legit.tenant, "stamped_source": "mem"}
    planted = {
        "no-document-id": {**stamps, "document_id": None},
        "no-tenant": {**stamps, "stamped_tenant": None},
        "no-source": {**stamps, "stamped_source": None},
        "other-tenant": {**stamps, "stamped_tenant": "globex"},
        "other-source": {**stamps, "stamped_source": "docs"},
        "no-stamps": {},
        "document-without-tuples": {**stamps, "document_id": "ghost"},
    }
    assert isinstance(store, InMemoryStore)
    for name, kwargs in planted.items():
        store.plant(
            "acme", "mem", chunk_id=f"x-{name}", text=f"PLANTED {name}", embedding=vector, **kwargs
        )
    task = await w.task("alice", "bot", ["source:mem"])
    token = w.agent_token("alice", "bot", task)
    response = await w.retrieve("alice", "bot", task, query, k=20)
    assert response.status_code == 200, response.text
    assert "PLANTED" not in response.text
    assert [c["document_id"] for c in response.json()["chunks"]] == ["ok1"]
    ctx = gateway.verifier.verify_delegation(token)
    for strategy in ("postfilter", "prefilter", "adaptive"):
        result = await gateway.retrieve(ctx, query, 20, ["mem"], strategy=strategy)
        assert [c.chunk_id for c in result.chunks] == [legit.chunk_id], strategy
    # Even an admin-wide grant on the source does not release a chunk with bad stamps.
    await w.relationships(
        writes=[
            {"user": "tenant:acme#member", "relation": "viewer", "object": "source:mem"},
            {"user": "tenant:acme#member", "relation": "agent_viewer", "object": "source:mem"},
        ]
    )
    response = await w.retrieve("alice", "bot", task, query, k=20)
    assert "PLANTED" not in response.text
    assert {c["document_id"] for c in response.json()["chunks"]} == {"ok1", "noacl"}


async def test_malformed_document_ids_read_from_a_store_are_denied_never_a_503(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any
) -> None:
    """Document ids read back from a store are validated before they reach OpenFGA: an
    id too long once namespaced in this 120-character tenant (valid on its own or not)
    and ids with separators are denied candidates (``chunk_metadata``) on the record,
    not a 503 for the tenant; the legitimate chunk comes back, in every strategy."""
    settings = make_settings(openfga, tmp_path / "data", strategy="postfilter")
    g = await Gateway.start(settings, embeddings=embeddings)
    transport = httpx.ASGITransport(app=create_app(gateway=g))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            tenant = "m" * 120
            w = await World(g, client, tenant).setup(members=["alice"], agents=["bot"])
            await w.admin_call("POST", "/v1/sources", {"id": "mem", "kind": "memory"})
            memo = "Board memo on the quarterly revenue forecast."
            await w.ingest([doc("ok1", memo, ["user:alice"], ["agent:bot"])], source="mem")
            info = await g.catalog.get_source(tenant, "mem")
            assert info is not None
            store = g.stores.for_source(info)
            assert isinstance(store, InMemoryStore)
            query = "quarterly revenue forecast"
            vector = g.embeddings.embed_query(query)
            # "y" * 128 is a valid id, but document:<tenant>/<id> has 258 characters.
            malformed = ["x" * 140, "y" * 128, "a#b", "a:b", "a/b", "../etc", "a b"]
            for i, bad in enumerate(malformed):
                store.plant(
                    tenant,
                    "mem",
                    chunk_id=f"x-{i}",
                    text=f"PLANTED {i}",
                    embedding=vector,
                    document_id=bad,
                    stamped_tenant=tenant,
                    stamped_source="mem",
                )
            task = await w.task("alice", "bot", ["source:mem"])
            response = await w.retrieve("alice", "bot", task, query, k=20)
            assert response.status_code == 200, response.text
            assert "PLANTED" not in response.text
            assert [c["document_id"] for c in response.json()["chunks"]] == ["ok1"]
            entry = await g.audit.get(tenant, response.json()["request_id"])
            assert entry is not None
            verdicts = {c.document_id: c for c in entry.record.candidates}
            assert verdicts["ok1"].verdict == "allow"
            for bad in malformed:
                assert verdicts[bad].verdict == "deny", bad
                assert verdicts[bad].failed_checks == ("chunk_metadata",), bad
            ctx = await g.verifier.averify_delegation(w.agent_token("alice", "bot", task))
            for strategy in ("postfilter", "prefilter", "adaptive"):
                result = await g.retrieve(ctx, query, 20, ["mem"], strategy=strategy)
                assert [c.document_id for c in result.chunks] == ["ok1"], strategy
    finally:
        await g.close()


async def test_max_tokens_honoured(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await _acme(gateway, http)
    task = await w.task("alice", "summarizer", ["source:docs"])
    response = await w.retrieve("alice", "summarizer", task, "revenue", k=10, max_tokens=15)
    chunks = response.json()["chunks"]
    assert sum(c["tokens"] for c in chunks) <= 15
    scores = [c["score"] for c in chunks]
    assert scores == sorted(scores, reverse=True)


async def test_fails_closed_when_openfga_stops(openfga, tmp_path, embeddings) -> None:  # type: ignore[no-untyped-def]
    from gateway.fga_server import ManagedOpenFGA
    from tests.conftest import make_settings

    server = ManagedOpenFGA(tmp_path / "fga")
    server.start()
    g = await Gateway.start(make_settings(server, tmp_path / "data"), embeddings=embeddings)
    try:
        from gateway.api import create_app

        transport = httpx.ASGITransport(app=create_app(gateway=g))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            w = await _acme(g, client)
            task = await w.task("alice", "summarizer", ["source:docs"])
            assert await w.retrieved_docs("alice", "summarizer", task, "revenue")
            server.stop()
            response = await w.retrieve("alice", "summarizer", task, "revenue")
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "authorization_unavailable"
            assert "chunks" not in response.json()
            entries, _ = await g.audit.list("acme", outcome="error")
            assert entries and entries[0].record.error_code == "authorization_unavailable"
    finally:
        await g.close()
        server.stop()


async def test_admin_api_requires_admin(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await _acme(gateway, http)
    alice = gateway.mint_token(tenant="acme", user="alice")
    response = await http.post(
        "/v1/relationships",
        headers=bearer(alice),
        json={"writes": [{"user": "user:alice", "relation": "viewer", "object": "document:pay1"}]},
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    response = await http.post(
        "/v1/relationships",
        headers=bearer(w.admin_token),
        json={
            "writes": [
                {"user": "tenant:globex#member", "relation": "viewer", "object": "document:rev1"}
            ]
        },
    )
    assert response.status_code == 403
    task = await w.task("alice", "summarizer", ["source:docs"])
    assert "rev1" in await w.retrieved_docs("alice", "summarizer", task, "revenue")


async def test_reingest_replaces_acl_but_keeps_task_scope(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _acme(gateway, http)
    task = await w.task("bob", "summarizer", ["document:pay1"])
    assert await w.retrieved_docs("bob", "summarizer", task, "salary") == ["pay1"]
    # Re-ingest pay1 with alice instead of bob as viewer: bob loses it, the task keeps it.
    await w.ingest(
        [doc("pay1", TOPICS["pay"], viewers=["user:alice"], agents=["agent:summarizer"])]
    )
    assert await w.retrieved_docs("bob", "summarizer", task, "salary") == []
    alice_task = await w.task("alice", "summarizer", ["document:pay1"])
    assert await w.retrieved_docs("alice", "summarizer", alice_task, "salary") == ["pay1"]
    tuples = await gateway.fga.read(object="document:acme/pay1")
    assert any(t.relation == "scoped_task" and t.user == f"task:acme/{task}" for t in tuples)


async def test_deleted_document_is_gone(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await _acme(gateway, http)
    task = await w.task("bob", "summarizer", ["source:docs"])
    assert "pay1" in await w.retrieved_docs("bob", "summarizer", task, "salary", k=10)
    await w.admin_call("DELETE", "/v1/sources/docs/documents/pay1")
    assert "pay1" not in await w.retrieved_docs("bob", "summarizer", task, "salary", k=10)
    assert await gateway.fga.read(object="document:acme/pay1") == []
