"""Reviewers: browse, explain, replay and export recorded decisions (DESIGN §4, §7).

Every call needs ``tenant#reviewer`` in OpenFGA (tenant admins are reviewers too) and
only ever sees the caller's own tenant: the tenant comes from the verified token and
every store query is scoped by it. The async functions are the library form, shared by
the HTTP routes below and by ``scopegate audit``; :func:`register_review_routes` wires
them, and the static reviewer page, into the app.

Replays never return document text; see :mod:`gateway.replay`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from gateway.audit import OUTCOMES, AuditEntry, canonical_json
from gateway.changelog import ArchiveCollector, ChangeArchiver, ModelGraph
from gateway.deps import GatewayDep, PrincipalCaller
from gateway.errors import InvalidRequest, NotFound
from gateway.fga import Tuple, load_model
from gateway.identity import PrincipalContext
from gateway.ids import REF_PATTERN, parse_ref
from gateway.relationships import admin_tuple, principal
from gateway.replay import (
    candidate_explanations,
    change_history,
    replay_as_of_decision,
    replay_decision,
)
from gateway.service import Gateway

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Objects whose access history ``/v1/audit/history`` tells.
HISTORY_TYPES = frozenset({"document", "folder", "source", "group", "task"})
# OpenFGA accepts at most 100 contextual tuples per check.
MAX_WHAT_IF_WRITES = 100
_ASSETS = {
    "review.css": "text/css; charset=utf-8",
    "review.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# The page runs only its own script and talks only to this origin; data is rendered
# with textContent, and the CSP is the second line of defence should that ever slip.
PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

Ref = Annotated[
    str, Field(min_length=3, max_length=300, json_schema_extra={"pattern": REF_PATTERN})
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WhatIfWrite(_Strict):
    user: Ref
    relation: str = Field(max_length=32)
    object: Ref


class WhatIf(_Strict):
    writes: list[WhatIfWrite] = Field(min_length=1, max_length=MAX_WHAT_IF_WRITES)


class ReplayBody(_Strict):
    what_if: WhatIf | None = None
    # "decision": also rebuild the verdicts as they stood when the request was decided.
    as_of: Literal["now", "decision"] = "now"


# -- the library form ---------------------------------------------------------------------


def _filter_id(tenant: str, value: str | None, type_name: str) -> str | None:
    """A list filter as the record stores it: ``alice`` or ``user:alice`` -> ``alice``."""
    if value is None or value == "":
        return None
    return principal(tenant, value, type_name)


def summary(entry: AuditEntry) -> dict[str, Any]:
    """One line of a decision list: who, what, and how many candidates were blocked."""
    r = entry.record
    return {
        "request_id": r.request_id,
        "seq": entry.seq,
        "time": r.time,
        "kind": r.kind,
        "user": r.user,
        "agent": r.agent,
        "task": r.task,
        "outcome": r.outcome,
        "strategy": r.strategy,
        "sources": list(r.sources),
        "candidates": len(r.candidates),
        "blocked": sum(1 for c in r.candidates if c.verdict != "allow"),
        "returned": len(r.returned_chunk_ids),
        "error_code": r.error_code,
    }


async def list_decisions(
    g: Gateway,
    p: PrincipalContext,
    *,
    outcome: str | None = None,
    user: str | None = None,
    agent: str | None = None,
    task: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """A page of the tenant's decisions, newest first, and the next page's cursor."""
    await g.require_reviewer(p)
    if outcome is not None and outcome not in OUTCOMES:
        raise InvalidRequest(f"outcome must be one of {sorted(OUTCOMES)}")
    entries, next_cursor = await g.audit.list(
        p.tenant,
        outcome=outcome,
        user=_filter_id(p.tenant, user, "user"),
        agent=_filter_id(p.tenant, agent, "agent"),
        task=_filter_id(p.tenant, task, "task"),
        since=since or None,
        until=until or None,
        limit=limit,
        cursor=cursor or None,
    )
    return {"decisions": [summary(e) for e in entries], "next_cursor": next_cursor}


async def _entry(g: Gateway, p: PrincipalContext, request_id: str) -> AuditEntry:
    await g.require_reviewer(p)
    entry = await g.audit.get(p.tenant, request_id)
    if entry is None:
        raise NotFound(f"decision {request_id[:128]} not found")
    return entry


async def show_decision(g: Gateway, p: PrincipalContext, request_id: str) -> dict[str, Any]:
    """The whole record, each candidate with explanations of its failed checks."""
    entry = await _entry(g, p, request_id)
    record = entry.record
    body = {"seq": entry.seq, "prev_hash": entry.prev_hash, "hash": entry.hash}
    body.update(record.to_dict())
    body["candidates"] = [
        {**c.to_dict(), "explanations": candidate_explanations(record, c)}
        for c in record.candidates
    ]
    return body


def what_if_tuples(tenant: str, writes: Sequence[Mapping[str, Any]]) -> list[Tuple]:
    """Reviewer what-if writes, validated and namespaced exactly like admin writes."""
    if len(writes) > MAX_WHAT_IF_WRITES:
        raise InvalidRequest(f"what_if takes at most {MAX_WHAT_IF_WRITES} writes")
    return list(dict.fromkeys(admin_tuple(tenant, w) for w in writes))


async def replay(
    g: Gateway,
    p: PrincipalContext,
    request_id: str,
    what_if_writes: Sequence[Mapping[str, Any]] = (),
    as_of: str = "now",
) -> dict[str, Any]:
    """Re-evaluate a recorded retrieval now and at its model; optionally what-if.

    ``as_of="decision"`` also rebuilds each verdict as of the decision from the
    change-log archive (``then``) and lists the changes since (:mod:`gateway.replay`).
    """
    if as_of not in ("now", "decision"):
        raise InvalidRequest('as_of must be "now" or "decision"')
    entry = await _entry(g, p, request_id)
    contextual = what_if_tuples(p.tenant, what_if_writes)
    if as_of == "decision":
        return await replay_as_of_decision(
            g.fga, g.audit, _archiver_of(g), entry.record, contextual
        )
    return await replay_decision(g.fga, entry.record, contextual)


async def history(g: Gateway, p: PrincipalContext, ref: str) -> dict[str, Any]:
    """Every tuple change that touched the access to ``ref`` (``document:d1``), oldest
    first, each with OpenFGA's time and the admin request that made it."""
    await g.require_reviewer(p)
    target = parse_ref(ref, p.tenant, HISTORY_TYPES).to_fga(p.tenant)
    await _archiver_of(g).sync()
    return await change_history(
        g.audit, g.fga.store_id, p.tenant, target, graph=ModelGraph(load_model())
    )


async def export_lines(g: Gateway, p: PrincipalContext) -> AsyncIterator[str]:
    """JSON Lines of the tenant's full entries, oldest first (authorized up front).

    Each line is ``canonical_json`` of ``{"seq", "prev_hash", "hash", "record"}``, so a
    SIEM can check every line: ``hash == sha256(prev_hash + canonical_json(record))``.
    """
    await g.require_reviewer(p)
    return _lines(g, p.tenant)


async def _lines(g: Gateway, tenant: str) -> AsyncIterator[str]:
    async for entry in g.audit.iter_all(tenant):
        yield canonical_json(entry.to_dict()) + "\n"


# -- HTTP -----------------------------------------------------------------------------------


def _archiver_of(g: Gateway) -> ChangeArchiver:
    """The gateway's archiver, or, when archiving in the background is off
    (``SCOPEGATE_CHANGELOG_ARCHIVE``), one for this request only: it brings the archive
    up to date from OpenFGA's log before answering (records then carry no position and
    are placed by their time)."""
    return g.changelog or ChangeArchiver(g.fga, g.audit, g.fga.store_id)


def _archiver(app: FastAPI) -> ChangeArchiver | None:
    gateway = getattr(app.state, "gateway", None)
    return gateway.changelog if isinstance(gateway, Gateway) else None


def register_review_routes(app: FastAPI) -> None:
    """Attach the /v1/audit routes and the /review page, and count the change-log
    archiver's lag into the app's metrics (served on the operators' listener)."""
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None:
        metrics.registry.register(ArchiveCollector(lambda: _archiver(app)))

    @app.get("/v1/audit/decisions")
    async def list_route(
        p: PrincipalCaller,
        g: GatewayDep,
        outcome: str | None = None,
        user: str | None = Query(default=None, max_length=300),
        agent: str | None = Query(default=None, max_length=300),
        task: str | None = Query(default=None, max_length=300),
        since: str | None = Query(default=None, max_length=64),
        until: str | None = Query(default=None, max_length=64),
        limit: int = Query(default=50, ge=1, le=500),
        cursor: str | None = Query(default=None, max_length=64),
    ) -> dict[str, Any]:
        return await list_decisions(
            g,
            p,
            outcome=outcome,
            user=user,
            agent=agent,
            task=task,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )

    @app.get("/v1/audit/decisions/{request_id}")
    async def show_route(request_id: str, p: PrincipalCaller, g: GatewayDep) -> dict[str, Any]:
        return await show_decision(g, p, request_id)

    @app.post("/v1/audit/decisions/{request_id}/replay")
    async def replay_route(
        request_id: str, p: PrincipalCaller, g: GatewayDep, body: ReplayBody | None = None
    ) -> dict[str, Any]:
        writes = body.what_if.writes if body is not None and body.what_if is not None else []
        as_of = body.as_of if body is not None else "now"
        return await replay(g, p, request_id, [w.model_dump() for w in writes], as_of)

    @app.get("/v1/audit/history")
    async def history_route(
        p: PrincipalCaller, g: GatewayDep, object: str = Query(min_length=3, max_length=300)
    ) -> dict[str, Any]:
        return await history(g, p, object)

    @app.get("/v1/audit/export")
    async def export_route(p: PrincipalCaller, g: GatewayDep) -> StreamingResponse:
        lines = await export_lines(g, p)
        return StreamingResponse(
            lines, media_type="application/x-ndjson", headers={"cache-control": "no-store"}
        )

    @app.get("/review", include_in_schema=False)
    async def review_page() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "review.html",
            media_type="text/html; charset=utf-8",
            headers=PAGE_HEADERS,
        )

    @app.get("/review/static/{name}", include_in_schema=False)
    async def review_asset(name: str) -> FileResponse:
        media_type = _ASSETS.get(name)
        if media_type is None:
            raise NotFound("no such asset")
        return FileResponse(STATIC_DIR / name, media_type=media_type, headers=PAGE_HEADERS)
