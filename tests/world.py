"""Helpers that build small worlds through the public HTTP API."""

from __future__ import annotations

from typing import Any

import httpx

from gateway.service import Gateway


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


class World:
    """A tenant set up through the API: admin token, helpers for tasks and retrieval."""

    def __init__(
        self, gateway: Gateway, http: httpx.AsyncClient, tenant: str, admin: str = "admin"
    ) -> None:
        self.g = gateway
        self.http = http
        self.tenant = tenant
        self.admin = admin

    @property
    def admin_token(self) -> str:
        return self.g.mint_token(tenant=self.tenant, user=self.admin)

    async def setup(
        self,
        members: list[str] = (),
        agents: list[str] = (),  # type: ignore[assignment]
        source: str = "docs",
    ) -> World:
        await self.g.create_tenant(self.tenant, self.admin)
        writes = [
            {"user": f"user:{u}", "relation": "member", "object": f"tenant:{self.tenant}"}
            for u in members
        ]
        writes += [
            {"user": f"agent:{a}", "relation": "member", "object": f"tenant:{self.tenant}"}
            for a in agents
        ]
        if writes:
            await self.relationships(writes=writes)
        await self.admin_call("POST", "/v1/sources", {"id": source, "kind": "chroma"})
        return self

    async def admin_call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        response = await self.http.request(
            method, path, json=body, headers=bearer(self.admin_token)
        )
        assert response.status_code < 300, response.text
        return response

    async def relationships(
        self,
        writes: list[dict[str, str]] = (),  # type: ignore[assignment]
        deletes: list[dict[str, str]] = (),
    ) -> None:  # type: ignore[assignment]
        await self.admin_call(
            "POST", "/v1/relationships", {"writes": list(writes), "deletes": list(deletes)}
        )

    async def ingest(self, documents: list[dict[str, Any]], source: str = "docs") -> None:
        await self.admin_call("POST", f"/v1/sources/{source}/documents", {"documents": documents})

    async def task(
        self, user: str, agent: str, scope: list[str], expires_at: str | None = None
    ) -> str:
        body: dict[str, Any] = {"user": f"user:{user}", "agent": f"agent:{agent}", "scope": scope}
        if expires_at:
            body["expires_at"] = expires_at
        response = await self.admin_call("POST", "/v1/tasks", body)
        return str(response.json()["task_id"])

    def agent_token(self, user: str, agent: str, task: str) -> str:
        return self.g.mint_token(tenant=self.tenant, user=user, agent=agent, task=task)

    async def retrieve(
        self, user: str, agent: str, task: str, query: str, k: int = 5, **extra: Any
    ) -> httpx.Response:
        return await self.http.post(
            "/v1/retrieve",
            json={"query": query, "k": k, **extra},
            headers=bearer(self.agent_token(user, agent, task)),
        )

    async def retrieved_docs(
        self, user: str, agent: str, task: str, query: str, k: int = 5
    ) -> list[str]:
        response = await self.retrieve(user, agent, task, query, k)
        assert response.status_code == 200, response.text
        return [c["document_id"] for c in response.json()["chunks"]]


def doc(
    doc_id: str,
    text: str,
    viewers: list[str] = (),
    agents: list[str] = (),  # type: ignore[assignment]
    folder: str | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    acl: dict[str, Any] = {"viewers": list(viewers), "agents": list(agents)}
    if owner:
        acl["owner"] = owner
    d: dict[str, Any] = {"id": doc_id, "text": text, "acl": acl}
    if folder:
        d["folder"] = folder
    return d
