"""Admin side of the API: tenants, sources, tasks, relationships, health."""

from __future__ import annotations

import httpx

from gateway.service import Gateway
from tests.world import World, bearer, doc


async def test_operator_creates_tenants_others_cannot(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    operator = gateway.mint_token(tenant="platform", user="ops")
    response = await http.post(
        "/v1/tenants", json={"id": "acme", "admin": "carol"}, headers=bearer(operator)
    )
    assert response.status_code == 403
    from gateway.identity import issue_token

    op = issue_token(
        gateway.signing_key,
        issuer=gateway.settings.token_issuer,
        audience=gateway.settings.token_audience,
        tenant="platform",
        user="ops",
        operator=True,
    )
    response = await http.post(
        "/v1/tenants", json={"id": "acme", "admin": "carol"}, headers=bearer(op)
    )
    assert response.status_code == 201
    carol = gateway.mint_token(tenant="acme", user="carol")
    response = await http.post("/v1/sources", json={"id": "docs"}, headers=bearer(carol))
    assert response.status_code == 201


async def test_sources_lifecycle_and_errors(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await World(gateway, http, "acme").setup()
    token = bearer(w.admin_token)
    listed = (await http.get("/v1/sources", headers=token)).json()["sources"]
    assert [s["id"] for s in listed] == ["docs"]
    dup = await http.post("/v1/sources", json={"id": "docs"}, headers=token)
    assert dup.status_code == 409
    missing = await http.get("/v1/sources/nope", headers=token)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad_kind = await http.post("/v1/sources", json={"id": "x", "kind": "pinecone"}, headers=token)
    assert bad_kind.status_code == 422
    await w.ingest([doc("d1", "hello world", viewers=["user:a"])])
    info = (await http.get("/v1/sources/docs", headers=token)).json()
    assert info["documents"] == 1
    # Other tenants do not see acme's sources.
    globex = await World(gateway, http, "globex").setup(source="other")
    theirs = (await http.get("/v1/sources", headers=bearer(globex.admin_token))).json()
    assert [s["id"] for s in theirs["sources"]] == ["other"]
    assert (
        await http.get("/v1/sources/docs", headers=bearer(globex.admin_token))
    ).status_code == 404


async def test_tasks_by_delegator_or_admin_only(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await World(gateway, http, "acme").setup(members=["alice", "bob"], agents=["bot"])
    alice = bearer(gateway.mint_token(tenant="acme", user="alice"))
    bob = bearer(gateway.mint_token(tenant="acme", user="bob"))
    body = {"user": "user:alice", "agent": "agent:bot", "scope": ["source:docs"]}
    own = await http.post("/v1/tasks", json=body, headers=alice)
    assert own.status_code == 201
    other = await http.post("/v1/tasks", json=body, headers=bob)
    assert other.status_code == 403
    task = own.json()["task_id"]
    assert (await http.delete(f"/v1/tasks/{task}", headers=bob)).status_code == 403
    assert (await http.delete(f"/v1/tasks/{task}", headers=alice)).status_code == 204
    assert (await http.delete("/v1/tasks/nope", headers=bearer(w.admin_token))).status_code == 404
    empty = await http.post("/v1/tasks", json={**body, "scope": []}, headers=alice)
    assert empty.status_code == 422
    naive = await http.post(
        "/v1/tasks", json={**body, "expires_at": "2030-01-01T00:00:00"}, headers=alice
    )
    assert naive.status_code == 422


async def test_health_and_no_metrics(gateway: Gateway, http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["openfga"] is True
    # Metrics are for operators, on their own listener (tests/test_metrics.py).
    assert (await http.get("/metrics")).status_code == 404


async def test_openapi_published(http: httpx.AsyncClient) -> None:
    spec = (await http.get("/openapi.json")).json()
    for path in (
        "/v1/retrieve",
        "/v1/tasks",
        "/v1/sources",
        "/v1/sources/{source_id}/documents",
        "/v1/relationships",
        "/v1/audit/decisions",
        "/healthz",
        "/readyz",
    ):
        assert path in spec["paths"], path
