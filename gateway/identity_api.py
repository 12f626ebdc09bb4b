"""HTTP routes of the identity foundation: SCIM 2.0, token exchange, directory admin.

- ``/scim/v2/...`` (RFC 7644): Users, Groups, ServiceProviderConfig, ResourceTypes and
  Schemas, authenticated by the tenant's SCIM bearer secret (which also names the
  tenant). Answers use ``application/scim+json`` and SCIM's error shape (RFC 7644
  section 3.12), which is what identity providers parse. Every request the secret
  authenticates, and that the gateway could serve, counts as the directory speaking.
- ``POST /v1/token`` (RFC 8693, form-encoded): delegation tokens by token exchange;
  errors in the gateway's own shape (DESIGN section 4).
- ``POST /v1/tenants/{tenant}/scim-token``, ``GET|PUT /v1/tenants/{tenant}/directory``:
  for platform operators and the tenant's admins.

Decisions are the gateway's (:mod:`gateway.service`); the mapping is :mod:`gateway.scim`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qsl

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from gateway import scim
from gateway.catalog import ScimGroupRecord, ScimUserRecord
from gateway.deps import GatewayDep, PrincipalCaller, current_gateway
from gateway.errors import (
    Conflict,
    InvalidRequest,
    InvalidToken,
    NotFound,
    ScopegateError,
)
from gateway.identity import PrincipalContext
from gateway.service import Gateway
from gateway.token_exchange import parse_exchange

SCIM_BASE = "/scim/v2"
MAX_FORM_FIELDS = 20
_NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}

log = logging.getLogger("scopegate.identity")

ScimWork = Callable[[Gateway, PrincipalContext], Awaitable[Response]]


# -- SCIM plumbing -------------------------------------------------------------------------


def scim_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, media_type=scim.MEDIA_TYPE, headers=headers)


def _scim_error(exc: ScopegateError | scim.ScimError) -> Response:
    if isinstance(exc, scim.ScimError):
        return scim_response(exc.body(), exc.status)
    scim_type, status = None, exc.status
    if isinstance(exc, Conflict):
        scim_type = "uniqueness"
    elif isinstance(exc, InvalidRequest):
        scim_type, status = "invalidValue", 400  # SCIM's status for a value it refuses
    headers = {"www-authenticate": 'Bearer realm="scim"'} if isinstance(exc, InvalidToken) else None
    return scim_response(scim.error_body(status, exc.message, scim_type), status, headers)


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidToken("missing bearer token")
    return token.strip()


async def _scim(request: Request, work: ScimWork) -> Response:
    """Authenticate the tenant's directory, run ``work``, answer in SCIM's shape."""
    g = await current_gateway(request)
    try:
        p = await g.authenticate_scim(_bearer(request))
    except ScopegateError as exc:
        return _scim_error(exc)
    try:
        response = await work(g, p)
    except (ScopegateError, scim.ScimError) as exc:
        response = _scim_error(exc)
    if response.status_code < 500:
        try:
            await g.scim_heard(p)
        except ScopegateError as exc:  # the answer stands; freshness is retried next call
            log.warning("scim: tenant %s's directory spoke, not recorded: %s", p.tenant, exc)
    return response


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise scim.invalid("the body is not JSON", "invalidSyntax") from exc
    if not isinstance(body, dict):
        raise scim.invalid("the body must be a JSON object", "invalidSyntax")
    return body


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + SCIM_BASE


def _stamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


async def _user_json(g: Gateway, p: PrincipalContext, r: ScimUserRecord, base: str) -> Any:
    state = scim.UserState(r.user_name, r.external_id, r.active, r.attributes)
    return scim.render_user(
        r.id,
        state,
        created=_stamp(r.created_at),
        modified=_stamp(r.updated_at),
        location=f"{base}/Users/{r.id}",
        groups=await g.scim_user_groups(p, r.id),
    )


async def _group_json(
    g: Gateway, p: PrincipalContext, r: ScimGroupRecord, base: str, *, members: bool = True
) -> Any:
    ids = await g.scim_group_members(p, r.id) if members else []
    state = scim.GroupState(r.display_name, r.external_id, tuple(ids), r.attributes)
    return scim.render_group(
        r.id,
        state,
        created=_stamp(r.created_at),
        modified=_stamp(r.updated_at),
        location=f"{base}/Groups/{r.id}",
        with_members=members,
    )


def _without_members(request: Request) -> bool:
    excluded = request.query_params.get("excludedAttributes", "")
    return "members" in {a.strip().lower() for a in excluded.split(",")}


# -- admin bodies ------------------------------------------------------------------------


class ScimTokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_previous: bool = False


class DirectoryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    directory: Literal["scim", "none"]
    max_silence_s: float | None = Field(default=None, gt=0, le=366 * 86400)


def register_identity_routes(app: FastAPI) -> None:
    """SCIM 2.0 under ``/scim/v2``, ``POST /v1/token`` and the tenant directory admin."""
    router = APIRouter()

    # -- SCIM discovery --

    @router.get(f"{SCIM_BASE}/ServiceProviderConfig", include_in_schema=False)
    async def service_provider_config(request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            return scim_response(scim.service_provider_config(_base(request)))

        return await _scim(request, work)

    @router.get(f"{SCIM_BASE}/ResourceTypes", include_in_schema=False)
    async def resource_types(request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            found = scim.resource_types(_base(request))
            return scim_response(scim.list_response(found, len(found), 1))

        return await _scim(request, work)

    @router.get(f"{SCIM_BASE}/ResourceTypes/{{name}}", include_in_schema=False)
    async def resource_type(name: str, request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            for found in scim.resource_types(_base(request)):
                if found["id"] == name:
                    return scim_response(found)
            raise NotFound(f"resource type {name[:64]} not found")

        return await _scim(request, work)

    @router.get(f"{SCIM_BASE}/Schemas", include_in_schema=False)
    async def schemas(request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            found = scim.schemas(_base(request))
            return scim_response(scim.list_response(found, len(found), 1))

        return await _scim(request, work)

    @router.get(f"{SCIM_BASE}/Schemas/{{schema_id}}", include_in_schema=False)
    async def schema(schema_id: str, request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            for found in scim.schemas(_base(request)):
                if found["id"] == schema_id:
                    return scim_response(found)
            raise NotFound(f"schema {schema_id[:100]} not found")

        return await _scim(request, work)

    # -- SCIM Users --

    @router.get(f"{SCIM_BASE}/Users", include_in_schema=False)
    async def list_users(request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            q = request.query_params
            start, count = scim.page(q.get("startIndex"), q.get("count"))
            found, total = await g.scim_users(p, q.get("filter"), start, count)
            base = _base(request)
            users = [await _user_json(g, p, r, base) for r in found]
            return scim_response(scim.list_response(users, total, start))

        return await _scim(request, work)

    @router.post(f"{SCIM_BASE}/Users", include_in_schema=False)
    async def create_user(request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            record = await g.scim_create_user(p, await _body(request))
            body = await _user_json(g, p, record, _base(request))
            return scim_response(body, 201, {"location": body["meta"]["location"]})

        return await _scim(request, work)

    @router.get(f"{SCIM_BASE}/Users/{{resource_id}}", include_in_schema=False)
    async def get_user(resource_id: str, request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            record = await g.scim_user(p, resource_id)
            return scim_response(await _user_json(g, p, record, _base(request)))

        return await _scim(request, work)

    @router.put(f"{SCIM_BASE}/Users/{{resource_id}}", include_in_schema=False)
    async def replace_user(resource_id: str, request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            record = await g.scim_replace_user(p, resource_id, await _body(request))
            return scim_response(await _user_json(g, p, record, _base(request)))

        return await _scim(request, work)

    @router.patch(f"{SCIM_BASE}/Users/{{resource_id}}", include_in_schema=False)
    async def patch_user(resource_id: str, request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            record = await g.scim_patch_user(p, resource_id, await _body(request))
            return scim_response(await _user_json(g, p, record, _base(request)))

        return await _scim(request, work)

    @router.delete(f"{SCIM_BASE}/Users/{{resource_id}}", include_in_schema=False)
    async def delete_user(resource_id: str, request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            await g.scim_delete_user(p, resource_id)
            return Response(status_code=204)

        return await _scim(request, work)

    # -- SCIM Groups --

    @router.get(f"{SCIM_BASE}/Groups", include_in_schema=False)
    async def list_groups(request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            q = request.query_params
            start, count = scim.page(q.get("startIndex"), q.get("count"))
            found, total = await g.scim_groups(p, q.get("filter"), start, count)
            base, members = _base(request), not _without_members(request)
            groups = [await _group_json(g, p, r, base, members=members) for r in found]
            return scim_response(scim.list_response(groups, total, start))

        return await _scim(request, work)

    @router.post(f"{SCIM_BASE}/Groups", include_in_schema=False)
    async def create_group(request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            record = await g.scim_create_group(p, await _body(request))
            body = await _group_json(g, p, record, _base(request))
            return scim_response(body, 201, {"location": body["meta"]["location"]})

        return await _scim(request, work)

    @router.get(f"{SCIM_BASE}/Groups/{{resource_id}}", include_in_schema=False)
    async def get_group(resource_id: str, request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            record = await g.scim_group(p, resource_id)
            members = not _without_members(request)
            return scim_response(await _group_json(g, p, record, _base(request), members=members))

        return await _scim(request, work)

    @router.put(f"{SCIM_BASE}/Groups/{{resource_id}}", include_in_schema=False)
    async def replace_group(resource_id: str, request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            record = await g.scim_replace_group(p, resource_id, await _body(request))
            return scim_response(await _group_json(g, p, record, _base(request)))

        return await _scim(request, work)

    @router.patch(f"{SCIM_BASE}/Groups/{{resource_id}}", include_in_schema=False)
    async def patch_group(resource_id: str, request: Request) -> Response:
        # 204: what Entra ID asks for (a body listing every member is not advisable),
        # and what Okta accepts.
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            await g.scim_patch_group(p, resource_id, await _body(request))
            return Response(status_code=204)

        return await _scim(request, work)

    @router.delete(f"{SCIM_BASE}/Groups/{{resource_id}}", include_in_schema=False)
    async def delete_group(resource_id: str, request: Request) -> Response:
        async def work(g: Gateway, p: PrincipalContext) -> Response:
            await g.scim_delete_group(p, resource_id)
            return Response(status_code=204)

        return await _scim(request, work)

    # -- token exchange --

    @router.post("/v1/token")
    async def token(request: Request, g: GatewayDep) -> JSONResponse:
        """OAuth 2.0 Token Exchange (RFC 8693): a short-lived delegation token."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise InvalidRequest("the body must be application/x-www-form-urlencoded")
        try:
            text = (await request.body()).decode("utf-8")
            fields = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequest("the form body cannot be read") from exc
        exchange = parse_exchange(fields, g.settings.token_audience)
        answer = await g.exchange_token(exchange, request_id=request.state.request_id)
        return JSONResponse(answer, headers=_NO_STORE)

    # -- the tenant's directory (operators and the tenant's admins) --

    @router.post("/v1/tenants/{tenant}/scim-token", status_code=201)
    async def scim_token(
        tenant: str, p: PrincipalCaller, g: GatewayDep, body: ScimTokenBody | None = None
    ) -> JSONResponse:
        """A new SCIM bearer secret for the tenant (shown once; previous ones revoked)."""
        keep = body.keep_previous if body is not None else False
        issued = await g.issue_scim_secret(tenant, p, keep_previous=keep)
        return JSONResponse(issued, status_code=201, headers=_NO_STORE)

    @router.put("/v1/tenants/{tenant}/directory")
    async def declare_directory(
        tenant: str, body: DirectoryBody, p: PrincipalCaller, g: GatewayDep
    ) -> dict[str, Any]:
        """Declare the tenant's directory its source of truth, with a freshness bound."""
        return await g.declare_directory(tenant, body.directory, body.max_silence_s, p)

    @router.get("/v1/tenants/{tenant}/directory")
    async def directory(tenant: str, p: PrincipalCaller, g: GatewayDep) -> dict[str, Any]:
        return await g.directory_status(tenant, p)

    app.include_router(router)
