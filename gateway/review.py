"""Reviewer endpoints: browse, explain and replay recorded decisions (DESIGN §4, §7)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query

from gateway.deps import GatewayDep, PrincipalCaller
from gateway.errors import InvalidRequest, NotFound
from gateway.replay import replay_decision


def register_review_routes(app: FastAPI) -> None:
    """Attach /v1/audit routes; rights come from ``tenant#reviewer`` in OpenFGA."""

    @app.get("/v1/audit/decisions")
    async def list_decisions(
        p: PrincipalCaller,
        g: GatewayDep,
        outcome: str | None = None,
        user: str | None = None,
        agent: str | None = None,
        task: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = Query(default=50, ge=1, le=500),
        cursor: str | None = None,
    ) -> dict[str, Any]:
        await g.require_reviewer(p)
        entries, next_cursor = await g.audit.list(
            p.tenant,
            outcome=outcome,
            user=user,
            agent=agent,
            task=task,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )
        return {
            "decisions": [_summary(e) for e in entries],
            "next_cursor": next_cursor,
        }

    @app.get("/v1/audit/decisions/{request_id}")
    async def get_decision(request_id: str, p: PrincipalCaller, g: GatewayDep) -> dict[str, Any]:
        await g.require_reviewer(p)
        entry = await g.audit.get(p.tenant, request_id)
        if entry is None:
            raise NotFound(f"decision {request_id} not found")
        return {"seq": entry.seq, "hash": entry.hash, **entry.record.to_dict()}

    @app.post("/v1/audit/decisions/{request_id}/replay")
    async def replay(request_id: str, p: PrincipalCaller, g: GatewayDep) -> dict[str, Any]:
        await g.require_reviewer(p)
        entry = await g.audit.get(p.tenant, request_id)
        if entry is None:
            raise NotFound(f"decision {request_id} not found")
        if entry.record.kind != "retrieve" or entry.record.task is None:
            raise InvalidRequest("only retrievals can be replayed")
        return await replay_decision(g.fga, entry.record)


def _summary(entry: Any) -> dict[str, Any]:
    r = entry.record
    blocked = sum(1 for c in r.candidates if c.verdict != "allow")
    return {
        "request_id": r.request_id,
        "time": r.time,
        "user": r.user,
        "agent": r.agent,
        "task": r.task,
        "outcome": r.outcome,
        "strategy": r.strategy,
        "candidates": len(r.candidates),
        "blocked": blocked,
        "error_code": r.error_code,
    }
