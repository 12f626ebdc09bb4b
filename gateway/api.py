"""HTTP API v1 (DESIGN section 4): a thin web layer over :class:`gateway.service.Gateway`.

Tokens are verified here and turned into contexts; everything else is the gateway's.
Errors always have the shape ``{"error": {"code", "message", "request_id"}}``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import tracing
from gateway.deps import AgentCaller, GatewayDep, PrincipalCaller, agent_context
from gateway.errors import (
    Forbidden,
    InvalidRequest,
    PayloadTooLarge,
    RateLimited,
    ScopegateError,
)
from gateway.identity import DelegationContext
from gateway.ids import ID_PATTERN, REF_PATTERN
from gateway.metrics import Metrics
from gateway.ratelimit import Rate, RetrievalLimiter
from gateway.service import Gateway
from gateway.settings import Settings

log = logging.getLogger("scopegate.api")

MAX_JSON_DEPTH = 32


async def verified_agent(request: Request) -> DelegationContext:
    """The caller's delegation context, verified inside a ``scopegate.verify`` span."""
    with tracing.span("scopegate.verify"):
        return await agent_context(request)


VerifiedAgent = Annotated[DelegationContext, Depends(verified_agent)]
Id = Annotated[str, Field(min_length=1, max_length=128, json_schema_extra={"pattern": ID_PATTERN})]
Ref = Annotated[
    str, Field(min_length=3, max_length=300, json_schema_extra={"pattern": REF_PATTERN})
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str


class ErrorBody(BaseModel):
    """The shape of every error response (DESIGN section 4)."""

    error: ErrorDetail


# Published in the OpenAPI document for every operation, so that clients and schema-driven
# fuzzers see the real error shape (FastAPI's default 422 schema is not what we send).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "invalid request (malformed body)",
        401: "invalid_token",
        403: "forbidden",
        404: "not_found",
        409: "conflict",
        413: "payload_too_large",
        422: "invalid_request",
        429: "rate_limited",
        503: "authorization_unavailable, source_unavailable, audit_unavailable or identity_stale",
    }.items()
}


class RetrieveBody(_Strict):
    query: str = Field(min_length=1, max_length=8000)
    k: int = Field(default=5, ge=1, le=100)
    sources: list[Id] | None = Field(default=None, max_length=50)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)


class TaskBody(_Strict):
    user: Ref
    agent: Ref
    scope: list[Ref] = Field(min_length=1, max_length=200)
    expires_at: datetime | None = None


class SourceBody(_Strict):
    id: Id
    kind: str = Field(default="chroma", max_length=32)
    # A fronted collection's field mapping nests one level (its prefix map two).
    config: dict[str, str | int | float | bool | dict[str, str | dict[str, str]]] = Field(
        default_factory=dict
    )


class SyncBody(_Strict):
    dry_run: bool = False
    full: bool = False  # also re-read documents whose ACL did not change upstream


class AclBody(_Strict):
    viewers: list[Ref] = Field(default_factory=list, max_length=1000)
    agents: list[Ref] = Field(default_factory=list, max_length=1000)
    owner: Ref | None = None


class DocumentBody(_Strict):
    id: Id
    text: str = Field(max_length=2_000_000)
    metadata: dict[str, str | int | float | bool] | None = None
    folder: Id | None = None
    acl: AclBody = Field(default_factory=AclBody)


class IngestBody(_Strict):
    documents: list[DocumentBody] = Field(min_length=1, max_length=1000)


class TenantBody(_Strict):
    id: Id
    admin: Id


class RelationshipBody(_Strict):
    user: Ref
    relation: str = Field(max_length=32)
    object: Ref


class RelationshipsBody(_Strict):
    writes: list[RelationshipBody] = Field(default_factory=list, max_length=500)
    deletes: list[RelationshipBody] = Field(default_factory=list, max_length=500)


class RequestIds:
    """Gives every HTTP request its id (``request.state.request_id``; a handler may
    replace it), returns it as ``x-request-id`` and records the request's latency.

    Plain ASGI: it only wraps ``send``, so the request body is not copied through
    task groups and streams on its way to the handler."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = uuid.uuid4().hex
        started = time.monotonic()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = time.monotonic() - started
                self.metrics.observe_http(scope["path"], message["status"], elapsed)
                MutableHeaders(scope=message)["x-request-id"] = state["request_id"]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyGuard:
    """Bounds request bodies (413) and JSON nesting (400) before anything parses them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in {"GET", "HEAD", "DELETE", "OPTIONS"}:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body"))
            if len(body) > self.max_bytes:
                await _send_error(scope, send, PayloadTooLarge("request body too large"))
                return
        if _json_depth(bytes(body)) > MAX_JSON_DEPTH:
            await _send_error(scope, send, InvalidRequest("JSON nested too deeply"))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _json_depth(raw: bytes) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


_HTTP_CODES = {401: "invalid_token", 403: "forbidden", 404: "not_found", 413: "payload_too_large"}


def _rid(request: Request) -> str:
    return str(getattr(request.state, "request_id", None) or uuid.uuid4().hex)


def _demanded_consistency(request: Request) -> str | None:
    """``Cache-Control: no-cache`` demands answers straight from OpenFGA (no decision cache)."""
    directives = request.headers.get("cache-control", "").lower()
    no_cache = any(d.strip() in {"no-cache", "no-store"} for d in directives.split(","))
    return "HIGHER_CONSISTENCY" if no_cache else None


def _error_body(exc: ScopegateError, request_id: str) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message, "request_id": request_id}}


async def _send_error(scope: Scope, send: Send, exc: ScopegateError) -> None:
    response = JSONResponse(_error_body(exc, uuid.uuid4().hex), status_code=exc.status)
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(
    settings: Settings | None = None,
    gateway: Gateway | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The ASGI app. Without ``gateway`` it starts one from ``settings`` on startup.

    It counts into ``metrics`` (``app.state.metrics``) but never serves them: that is
    the operator listener's job (:func:`gateway.metrics.create_metrics_app`).
    """
    metrics = metrics or Metrics()
    configured = settings or (gateway.settings if gateway is not None else Settings())
    limiter = RetrievalLimiter(
        Rate.of(configured.rate_limit_agent_per_s, configured.rate_limit_agent_burst),
        Rate.of(configured.rate_limit_tenant_per_s, configured.rate_limit_tenant_burst),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if gateway is not None:
            app.state.gateway = gateway
            yield
            return
        started = await Gateway.start(settings or Settings())
        app.state.gateway = started
        try:
            yield
        finally:
            await started.close()

    app = FastAPI(
        title="scopegate",
        version="1",
        summary="Pre-retrieval authorization gateway for AI agents",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    app.state.metrics = metrics
    if gateway is not None:
        app.state.gateway = gateway

    @app.exception_handler(ScopegateError)
    async def scopegate_error(request: Request, exc: ScopegateError) -> JSONResponse:
        headers = None
        if isinstance(exc, RateLimited) and exc.retry_after_s is not None:
            headers = {"retry-after": str(exc.retry_after_s)}
        body = _error_body(exc, request.state.request_id)
        if exc.status >= 500:
            # The client sees the code and a short message; the operator gets the why.
            log.warning(
                "%s %s failed closed (%s, request %s): %s%s",
                request.method,
                request.url.path,
                exc.code,
                request.state.request_id,
                exc.message,
                f" ({exc.detail})" if exc.detail else "",
            )
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}"[:300]
        err = InvalidRequest(message)
        return JSONResponse(_error_body(err, request.state.request_id), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing (404, 405) and body parsing (400 for undecodable bytes) errors raised by
        # the framework itself get the same error shape as everything else.
        code = _HTTP_CODES.get(exc.status_code, "invalid_request")
        detail = exc.detail if isinstance(exc.detail, str) else "invalid request"
        body = {"error": {"code": code, "message": detail[:300], "request_id": _rid(request)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = ScopegateError("internal error")
        rid = getattr(request.state, "request_id", uuid.uuid4().hex)
        log.error(
            "%s %s: unexpected error (request %s)",
            request.method,
            request.url.path,
            rid,
            exc_info=exc,
        )
        return JSONResponse(_error_body(err, rid), status_code=500)

    app.add_middleware(RequestIds, metrics=metrics)

    @app.post("/v1/retrieve")
    async def retrieve(
        body: RetrieveBody, ctx: VerifiedAgent, g: GatewayDep, request: Request
    ) -> dict[str, Any]:
        """Exact top-k chunks the delegating user, agent, task and tenant all permit."""
        try:
            limiter.admit(ctx.tenant, ctx.agent)
            result = await g.retrieve(
                ctx,
                body.query,
                body.k,
                body.sources,
                body.max_tokens,
                request_id=request.state.request_id,
                consistency=_demanded_consistency(request),
            )
        except ScopegateError as exc:
            metrics.count_error(ctx.tenant, exc.code)
            raise
        if result.outcome is not None:
            metrics.count_verdicts(ctx.tenant, result.outcome.verdicts.values())
        request.state.request_id = result.request_id
        return result.to_dict()

    @app.post("/v1/tenants", status_code=201)
    async def create_tenant(body: TenantBody, p: PrincipalCaller, g: GatewayDep) -> dict[str, str]:
        """Operator only: bootstrap a tenant and its first admin."""
        if not p.operator:
            raise Forbidden("only platform operators may create tenants")
        await g.create_tenant(body.id, body.admin, by=p)
        return {"tenant": body.id, "admin": body.admin}

    @app.get("/v1/retrieve/sources")
    async def retrievable_sources(ctx: AgentCaller, g: GatewayDep) -> dict[str, Any]:
        """The source ids an agent may name in ``sources`` (delegation token)."""
        return {"sources": [{"id": s} for s in await g.retrievable_sources(ctx)]}

    @app.post("/v1/tasks", status_code=201)
    async def create_task(body: TaskBody, p: PrincipalCaller, g: GatewayDep) -> dict[str, str]:
        task_id = await g.create_task(p, body.user, body.agent, body.scope, body.expires_at)
        return {"task_id": task_id}

    @app.delete("/v1/tasks/{task_id}", status_code=204)
    async def revoke_task(task_id: str, p: PrincipalCaller, g: GatewayDep) -> Response:
        await g.revoke_task(p, task_id)
        return Response(status_code=204)

    @app.post("/v1/sources", status_code=201)
    async def register_source(
        body: SourceBody, p: PrincipalCaller, g: GatewayDep
    ) -> dict[str, Any]:
        info = await g.register_source(p, body.id, body.kind, body.config)
        return {"id": info.id, "kind": info.kind, "config": info.config}

    @app.get("/v1/sources")
    async def list_sources(p: PrincipalCaller, g: GatewayDep) -> dict[str, Any]:
        infos = await g.list_sources(p)
        return {"sources": [{"id": i.id, "kind": i.kind, "config": i.config} for i in infos]}

    @app.get("/v1/sources/{source_id}")
    async def get_source(source_id: str, p: PrincipalCaller, g: GatewayDep) -> dict[str, Any]:
        info = await g.get_source(p, source_id)
        documents = await g.catalog.document_count(p.tenant, source_id)
        return {"id": info.id, "kind": info.kind, "config": info.config, "documents": documents}

    @app.delete("/v1/sources/{source_id}", status_code=204)
    async def remove_source(source_id: str, p: PrincipalCaller, g: GatewayDep) -> Response:
        """Remove the source, its chunks, tuples and catalog entries."""
        await g.remove_source(p, source_id)
        return Response(status_code=204)

    @app.post("/v1/sources/{source_id}/sync")
    async def sync_source(
        source_id: str, p: PrincipalCaller, g: GatewayDep, body: SyncBody | None = None
    ) -> dict[str, Any]:
        """Reconcile OpenFGA with the source's ACLs; ``dry_run`` returns the diff only."""
        options = body or SyncBody()
        return await g.sync_source(p, source_id, dry_run=options.dry_run, full=options.full)

    @app.delete("/v1/principals/{ref}")
    async def deprovision(ref: str, p: PrincipalCaller, g: GatewayDep) -> dict[str, int]:
        """Remove every relation of ``user:..`` or ``agent:..`` in the tenant; revoke its tasks."""
        return await g.deprovision(p, ref)

    @app.post("/v1/sources/{source_id}/documents")
    async def ingest(
        source_id: str, body: IngestBody, p: PrincipalCaller, g: GatewayDep
    ) -> dict[str, int]:
        docs = [d.model_dump() for d in body.documents]
        return await g.ingest(p, source_id, docs)

    @app.delete("/v1/sources/{source_id}/documents/{document_id}", status_code=204)
    async def delete_document(
        source_id: str, document_id: str, p: PrincipalCaller, g: GatewayDep
    ) -> Response:
        await g.delete_document(p, source_id, document_id)
        return Response(status_code=204)

    @app.post("/v1/relationships")
    async def relationships(
        body: RelationshipsBody, p: PrincipalCaller, g: GatewayDep
    ) -> dict[str, int]:
        writes = [w.model_dump() for w in body.writes]
        deletes = [d.model_dump() for d in body.deletes]
        await g.write_relationships(p, writes, deletes)
        return {"written": len(writes), "deleted": len(deletes)}

    @app.get("/v1/relationships")
    async def list_relationships(
        p: PrincipalCaller,
        g: GatewayDep,
        object: Annotated[str | None, Query(max_length=300)] = None,
        user: Annotated[str | None, Query(max_length=300)] = None,
    ) -> dict[str, Any]:
        """Tuples naming ``object`` or ``user`` (exactly one), in tenant-local form."""
        return {"relationships": await g.list_relationships(p, object=object, user=user)}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(g: GatewayDep) -> JSONResponse:
        parts = await g.readiness()
        ready = all(parts.values())
        body = {"ready": ready, **parts, "store_id": g.fga.store_id, "model_id": g.fga.model_id}
        # Details only: a lagging change-log archive never makes the gateway unready.
        body["changelog"] = g.changelog.status() if g.changelog is not None else None
        return JSONResponse(body, status_code=200 if ready else 503)

    from gateway.authzen import register_authzen_routes
    from gateway.identity_api import register_identity_routes
    from gateway.review import register_review_routes

    register_review_routes(app)
    register_identity_routes(app)
    register_authzen_routes(app, limiter)
    app.add_middleware(BodyGuard, max_bytes=configured.max_body_bytes)
    # Outermost: the server span covers the whole request, body checks included.
    tracing.configure_from_env()
    app.add_middleware(tracing.TraceContextMiddleware)
    return app
