"""FastAPI dependencies: the gateway and the verified caller of a request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.errors import InvalidToken
from gateway.identity import DelegationContext, PrincipalContext
from gateway.service import Gateway


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidToken("missing bearer token")
    return token.strip()


async def current_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def agent_context(request: Request) -> DelegationContext:
    gateway = await current_gateway(request)
    return await gateway.verifier.averify_delegation(bearer_token(request))


async def principal_context(request: Request) -> PrincipalContext:
    gateway = await current_gateway(request)
    return await gateway.verifier.averify_principal(bearer_token(request))


AgentCaller = Annotated[DelegationContext, Depends(agent_context)]
PrincipalCaller = Annotated[PrincipalContext, Depends(principal_context)]
GatewayDep = Annotated[Gateway, Depends(current_gateway)]
