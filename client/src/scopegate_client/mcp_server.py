"""scopegate retrieval as MCP tools (official ``mcp`` SDK, 2.x API), in front of a gateway.

Tools:

- ``retrieve(query, k=5, sources=None)``: the permitted chunks, as numbered text
  for the model and as structured content (``request_id``, ``chunks``);
- ``list_sources()``: the source ids that ``sources`` may name.

Identity never comes from tool arguments. Over streamable HTTP the delegation
token is the ``Authorization: Bearer`` header of each MCP request (so a client may
rotate it mid-session); over stdio it is ``SCOPEGATE_TOKEN`` in the server
process's environment. A call without a valid token fails with a JSON-RPC error
(``invalid_token``) and no content. Mistakes the model can fix (an unknown
source, a bad ``k``) and gateway outages come back as ``isError`` results that
carry only the error message.

``scopegate-mcp --url URL`` serves the tools for a gateway reached over HTTP; the
server distribution's ``scopegate mcp`` serves the same tools, also in-process.
Needs the ``mcp`` extra: ``pip install 'scopegate-client[mcp]'``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Protocol

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_REQUEST, CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from scopegate_client.client import AsyncScopegateClient
from scopegate_client.errors import Forbidden, InvalidToken, ScopegateError
from scopegate_client.models import Retrieval
from scopegate_client.tool_output import error_for_model, format_passages

TOKEN_ENV = "SCOPEGATE_TOKEN"
INSTRUCTIONS = (
    "scopegate returns only the document passages that the delegating user, this agent "
    "and its task are all permitted to read. Call `retrieve` with a natural-language query; "
    "cite passages by their source and document id."
)

TokenFinder = Callable[[Context], str | None]
"""Where a tool call's delegation token comes from (never from its arguments)."""


# -- tokens -------------------------------------------------------------------------


def bearer_from_request(ctx: Context) -> str | None:
    """The ``Authorization: Bearer`` token of the HTTP request carrying this call."""
    headers: Mapping[str, str] | None = ctx.headers
    value = headers.get("authorization") if headers is not None else None
    scheme, _, token = (value or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def token_from_environment(environ: Mapping[str, str]) -> TokenFinder:
    """The token the stdio server was started with (read once, at start)."""
    token = environ.get(TOKEN_ENV, "").strip() or None
    return lambda ctx: token


# -- backends -----------------------------------------------------------------------


class Backend(Protocol):
    async def retrieve(
        self, token: str, query: str, k: int, sources: list[str] | None
    ) -> Retrieval: ...

    async def sources(self, token: str) -> list[str]: ...


class HttpBackend:
    """A running gateway, over HTTP, one connection pool for every caller."""

    def __init__(self, client: AsyncScopegateClient) -> None:
        self._client = client

    async def retrieve(
        self, token: str, query: str, k: int, sources: list[str] | None
    ) -> Retrieval:
        return await self._client.with_token(token).retrieve(query, k, sources)

    async def sources(self, token: str) -> list[str]:
        return await self._client.with_token(token).retrievable_sources()


# -- tool results -------------------------------------------------------------------


class ChunkOut(BaseModel):
    chunk_id: str
    document_id: str
    source: str
    text: str
    score: float
    tokens: int
    metadata: dict[str, Any] = Field(default_factory=dict)


class RetrieveOutput(BaseModel):
    request_id: str = Field(description="The audit record of this retrieval.")
    chunks: list[ChunkOut]


class SourcesOutput(BaseModel):
    sources: list[str]


def _require(token: str | None, transport_hint: str) -> str:
    if token is None:
        raise _rejected(InvalidToken(f"no delegation token: {transport_hint}"))
    return token


def _rejected(exc: ScopegateError) -> MCPError:
    return MCPError(INVALID_REQUEST, error_for_model(exc), {"code": exc.code})


def _failed(exc: ScopegateError) -> Exception:
    """Identity errors fail the call itself; anything else is an error result."""
    if isinstance(exc, InvalidToken | Forbidden):
        return _rejected(exc)
    return ToolError(error_for_model(exc))


# -- the server ---------------------------------------------------------------------


def build_server(backend: Backend, tokens: TokenFinder, *, token_hint: str) -> MCPServer:
    """The MCP server; ``token_hint`` tells a caller without a token where to put it."""
    server: MCPServer = MCPServer(
        "scopegate", instructions=INSTRUCTIONS, version="1", log_level="WARNING"
    )
    read_only = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)

    @server.tool(
        name="retrieve",
        description="Retrieve the passages most relevant to `query` that this task may read.",
        annotations=read_only,
    )
    async def retrieve(
        query: Annotated[str, Field(min_length=1, max_length=8000)],
        ctx: Context,
        k: Annotated[int, Field(ge=1, le=100)] = 5,
        sources: Annotated[list[str] | None, Field(max_length=50)] = None,
    ) -> Annotated[CallToolResult, RetrieveOutput]:
        token = _require(tokens(ctx), token_hint)
        try:
            found = await backend.retrieve(token, query, k, sources)
        except ScopegateError as exc:
            raise _failed(exc) from exc
        output = RetrieveOutput(
            request_id=found.request_id, chunks=[ChunkOut(**c.to_dict()) for c in found.chunks]
        )
        return CallToolResult(
            content=[TextContent(type="text", text=format_passages(found.chunks))],
            structured_content=output.model_dump(mode="json"),
        )

    @server.tool(
        name="list_sources",
        description="List the source ids that `retrieve` may be restricted to.",
        annotations=read_only,
    )
    async def list_sources(ctx: Context) -> SourcesOutput:
        token = _require(tokens(ctx), token_hint)
        try:
            return SourcesOutput(sources=await backend.sources(token))
        except ScopegateError as exc:
            raise _failed(exc) from exc

    return server


# -- running ------------------------------------------------------------------------


async def serve(backend: Backend, *, transport: str, host: str, port: int) -> None:
    """Serve the tools on stdio or streamable HTTP until stopped."""
    http = transport == "http"
    tokens = bearer_from_request if http else token_from_environment(os.environ)
    hint = (
        "send 'Authorization: Bearer <delegation token>' with the MCP request"
        if http
        else f"start the MCP server with {TOKEN_ENV} set to a delegation token"
    )
    server = build_server(backend, tokens, token_hint=hint)
    if not http:
        await server.run_stdio_async()
        return
    await _serve_http(server, host, port)


async def _serve_http(server: MCPServer, host: str, port: int) -> None:
    import uvicorn

    # Stateless: every request stands alone (and carries its own token), so replicas
    # behind a load balancer need no session affinity.
    app = server.streamable_http_app(stateless_http=True, json_response=True, host=host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    print(f"scopegate: MCP (streamable HTTP) on http://{host}:{port}/mcp", file=sys.stderr)
    await uvicorn.Server(config).serve()


def warn_without_token(transport: str, environ: Mapping[str, str]) -> None:
    """Over stdio a server started without a token can only reject: say so at start."""
    if transport != "http" and not environ.get(TOKEN_ENV):
        print(
            f"scopegate: {TOKEN_ENV} is not set: every tool call will be rejected",
            file=sys.stderr,
        )


async def _serve_over_http(args: argparse.Namespace) -> None:
    async with AsyncScopegateClient(args.url) as client:
        await serve(HttpBackend(client), transport=args.transport, host=args.host, port=args.port)


def main(argv: Sequence[str] | None = None) -> int:
    """``scopegate-mcp --url URL [--transport stdio|http] [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(
        prog="scopegate-mcp", description="serve scopegate's MCP tools for a running gateway"
    )
    parser.add_argument("--url", required=True, help="base URL of the gateway")
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP transport bind address")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args(argv)
    warn_without_token(args.transport, os.environ)
    try:
        anyio.run(_serve_over_http, args)
    except KeyboardInterrupt:
        return 130
    return 0
