"""Deprovisioning, source removal, tenant bootstrap and the admin audit trail, over HTTP.

A principal removed from the tenant keeps no right; a removed source serves nothing and
frees its names; every admin mutation is recorded with its tuples before it is applied.
"""

from __future__ import annotations

import socket

import httpx

from gateway.audit import PostgresAuditStore
from gateway.identity import issue_token
from gateway.service import Gateway
from tests.world import World, bearer, doc

QUERY = "quarterly roadmap for the platform"


async def _world(gateway: Gateway, http: httpx.AsyncClient) -> World:
    w = await World(gateway, http, "acme").setup(
        members=["alice", "bob"], agents=["helper", "other"]
    )
    await w.relationships(
        writes=[
            {"user": "user:alice", "relation": "member", "object": "group:eng"},
            {"user": "user:alice", "relation": "admin", "object": "tenant:acme"},
            {"user": "user:alice", "relation": "reviewer", "object": "tenant:acme"},
            {"user": "agent:helper", "relation": "member", "object": "group:bots"},
        ]
    )
    await w.ingest(
        [
            doc(
                "d-eng",
                "Quarterly roadmap: the platform ships the new scheduler.",
                viewers=["group:eng#member"],
                agents=["group:bots#member"],
            ),
            doc(
                "d-alice",
                "Quarterly roadmap notes for the platform review.",
                viewers=["user:alice"],
                agents=["agent:helper"],
            ),
            doc(
                "d-all",
                "Quarterly roadmap overview for the platform, open to all.",
                viewers=["tenant:acme#member"],
                agents=["tenant:acme#member"],
            ),
        ]
    )
    return w


async def _relations_of(http: httpx.AsyncClient, w: World, ref: str) -> list[dict[str, str]]:
    response = await http.get(
        "/v1/relationships", params={"user": ref}, headers=bearer(w.admin_token)
    )
    assert response.status_code == 200, response.text
    return list(response.json()["relationships"])


async def test_deprovisioned_user_keeps_nothing_and_readding_revives_nothing(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _world(gateway, http)
    task = await w.task("alice", "helper", ["source:docs"])
    assert set(await w.retrieved_docs("alice", "helper", task, QUERY)) == {
        "d-eng",
        "d-alice",
        "d-all",
    }
    alice_admin = bearer(gateway.mint_token(tenant="acme", user="alice"))
    assert (await http.get("/v1/sources", headers=alice_admin)).status_code == 200
    response = await http.delete("/v1/principals/user:alice", headers=bearer(w.admin_token))
    assert response.status_code == 200, response.text
    counts = response.json()
    # member, group eng, admin, reviewer, viewer d-alice, delegator of the task
    assert counts == {"relations_removed": 6, "tasks_revoked": 1}
    assert await _relations_of(http, w, "user:alice") == []
    assert await w.retrieved_docs("alice", "helper", task, QUERY) == []
    assert (await http.get("/v1/sources", headers=alice_admin)).status_code == 403
    assert (await http.get("/v1/audit/decisions", headers=alice_admin)).status_code == 403
    # Re-added as a plain member: no old group, grant, role or task comes back.
    await w.relationships(
        writes=[{"user": "user:alice", "relation": "member", "object": "tenant:acme"}]
    )
    assert await w.retrieved_docs("alice", "helper", task, QUERY) == []
    fresh = await w.task("alice", "helper", ["source:docs"])
    assert await w.retrieved_docs("alice", "helper", fresh, QUERY) == ["d-all"]
    assert (await http.get("/v1/sources", headers=alice_admin)).status_code == 403


async def test_deprovisioned_agent_loses_its_tasks_and_grants(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _world(gateway, http)
    task = await w.task("alice", "helper", ["source:docs"])
    bob_task = await w.task("bob", "helper", ["source:docs"])
    response = await http.delete("/v1/principals/agent:helper", headers=bearer(w.admin_token))
    # member, group bots, agent_viewer d-alice, executor of both tasks
    assert response.json() == {"relations_removed": 5, "tasks_revoked": 2}
    assert await w.retrieved_docs("alice", "helper", task, QUERY) == []
    assert await w.retrieved_docs("bob", "helper", bob_task, QUERY) == []
    other = await w.task("alice", "other", ["source:docs"])
    assert await w.retrieved_docs("alice", "other", other, QUERY) == ["d-all"]


async def test_deprovisioning_needs_an_admin_and_a_user_or_agent(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _world(gateway, http)
    bob = bearer(gateway.mint_token(tenant="acme", user="bob"))
    assert (await http.delete("/v1/principals/user:alice", headers=bob)).status_code == 403
    for bad in ("group:eng", "tenant:acme", "user:a%23member", "alice"):
        response = await http.delete(f"/v1/principals/{bad}", headers=bearer(w.admin_token))
        assert response.status_code == 422, (bad, response.text)


async def test_removed_source_serves_nothing_and_frees_its_names(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _world(gateway, http)
    await w.admin_call("POST", "/v1/sources", {"id": "wiki", "kind": "chroma"})
    await w.ingest(
        [
            doc(
                "w1",
                "Quarterly roadmap wiki page about the platform.",
                viewers=["tenant:acme#member"],
                agents=["tenant:acme#member"],
                folder="plans",
            )
        ],
        source="wiki",
    )
    wiki_task = await w.task("bob", "other", ["source:wiki"])
    both = await w.task("bob", "other", ["source:wiki", "source:docs"])
    assert await w.retrieved_docs("bob", "other", wiki_task, QUERY) == ["w1"]
    response = await http.delete("/v1/sources/wiki", headers=bearer(w.admin_token))
    assert response.status_code == 204
    assert (await http.get("/v1/sources/wiki", headers=bearer(w.admin_token))).status_code == 404
    assert await w.retrieved_docs("bob", "other", wiki_task, QUERY) == []
    assert await w.retrieved_docs("bob", "other", both, QUERY) == ["d-all"]
    assert await gateway.fga.read(object="document:acme/w1") == []
    assert await gateway.fga.read(object="folder:acme/plans") == []
    assert await gateway.fga.read(object="source:acme/wiki") == []
    # The folder and document names are free again, and the old task scope is gone.
    await w.ingest(
        [
            doc(
                "w1",
                "Quarterly roadmap, now in docs.",
                viewers=["tenant:acme#member"],
                agents=["tenant:acme#member"],
                folder="plans",
            )
        ]
    )
    await w.admin_call("POST", "/v1/sources", {"id": "wiki", "kind": "chroma"})
    assert await w.retrieved_docs("bob", "other", wiki_task, QUERY) == []
    again = await http.delete("/v1/sources/wiki", headers=bearer(w.admin_token))
    assert again.status_code == 204
    assert (await http.delete("/v1/sources/wiki", headers=bearer(w.admin_token))).status_code == 404


async def test_bootstrapping_an_existing_tenant_is_a_conflict(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    operator = issue_token(
        gateway.signing_key,
        issuer=gateway.settings.token_issuer,
        audience=gateway.settings.token_audience,
        tenant="platform",
        user="ops",
        operator=True,
    )
    body = {"id": "acme", "admin": "carol"}
    assert (await http.post("/v1/tenants", json=body, headers=bearer(operator))).status_code == 201
    again = await http.post(
        "/v1/tenants", json={"id": "acme", "admin": "mallory"}, headers=bearer(operator)
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    mallory = bearer(gateway.mint_token(tenant="acme", user="mallory"))
    assert (await http.get("/v1/sources", headers=mallory)).status_code == 403


async def test_admin_mutations_are_recorded_with_their_tuples_before_they_apply(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _world(gateway, http)
    write = {"user": "user:bob", "relation": "viewer", "object": "document:d-alice"}
    await w.relationships(writes=[write])
    entries, _ = await gateway.audit.list("acme", limit=200)
    admin = [e.record for e in entries if e.record.kind == "admin"]
    intents = [r for r in admin if r.extra["phase"] == "intent"]
    applied = [r for r in admin if r.extra["phase"] == "applied"]
    assert len(intents) == len(applied)
    bob_viewer = ["user:acme/bob", "viewer", "document:acme/d-alice"]
    last = next(r for r in intents if bob_viewer in r.extra.get("writes", []))
    assert last.extra["action"] == "relationships.write"
    assert any(r.extra.get("intent") == last.request_id for r in applied)
    alice_viewer = ["user:acme/alice", "viewer", "document:acme/d-alice"]
    assert any(
        alice_viewer in r.extra["wanted"]
        for r in intents
        if r.extra["action"] == "documents.ingest"
    )
    # With the audit store down nothing is applied.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        down = PostgresAuditStore(f"postgresql://x@127.0.0.1:{port}/a", connect_timeout_s=2)
        original, gateway.audit = gateway.audit, down
        try:
            carol = {"user": "user:carol", "relation": "viewer", "object": "document:d-eng"}
            response = await http.post(
                "/v1/relationships", json={"writes": [carol]}, headers=bearer(w.admin_token)
            )
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "audit_unavailable"
            removed = await http.delete("/v1/principals/user:bob", headers=bearer(w.admin_token))
            assert removed.status_code == 503
        finally:
            gateway.audit = original
            await down.close()
    assert not [
        t for t in await gateway.fga.read(object="document:acme/d-eng") if "carol" in t.user
    ]
    assert [t for t in await gateway.fga.read(user="user:acme/bob", object="tenant:acme")]
