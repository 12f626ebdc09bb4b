"""``scopegate mcp``: the MCP tools of :mod:`scopegate_client.mcp_server`, also in-process.

The tools, their token rules and both transports live with the client (``scopegate-mcp``
serves them for a gateway reached over HTTP). The server adds where they get their
answers: a gateway over HTTP (``--url``, or the ``serve`` running on ``--data-dir``),
or a gateway started in this process on ``--data-dir``, whose own verifier checks
each call's delegation token.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from scopegate_client.client import AsyncScopegateClient
from scopegate_client.mcp_server import (
    TOKEN_ENV,
    Backend,
    HttpBackend,
    build_server,
    warn_without_token,
)
from scopegate_client.mcp_server import serve as serve_tools
from scopegate_client.models import Retrieval

from gateway.settings import DEFAULT_DATA_DIR, load_settings

__all__ = ["TOKEN_ENV", "Backend", "HttpBackend", "LocalBackend", "build_server", "run_mcp"]


class LocalBackend:
    """A gateway in this process; the token is verified by the gateway's own verifier."""

    def __init__(self, gateway: Any) -> None:
        self._gateway = gateway

    async def retrieve(
        self, token: str, query: str, k: int, sources: list[str] | None
    ) -> Retrieval:
        ctx = await self._gateway.verifier.averify_delegation(token)
        result = await self._gateway.retrieve(ctx, query, k, sources)
        return Retrieval.from_json(result.to_dict())

    async def sources(self, token: str) -> list[str]:
        ctx = await self._gateway.verifier.averify_delegation(token)
        found: list[str] = await self._gateway.retrievable_sources(ctx)
        return found


def _data_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "data_dir", None) is not None:
        return Path(args.data_dir)
    return Path(os.environ.get("SCOPEGATE_DATA_DIR", str(DEFAULT_DATA_DIR)))


@contextlib.asynccontextmanager
async def open_backend(url: str | None, data_dir: Path) -> AsyncIterator[Backend]:
    """HTTP to ``url`` (or to the ``serve`` running on ``data_dir``), else in-process."""
    if url is None:
        from gateway.commands import running_url

        url = running_url(data_dir)
    if url is not None:
        async with AsyncScopegateClient(url) as client:
            yield HttpBackend(client)
        return
    from gateway.service import Gateway

    gateway = await Gateway.start(load_settings(data_dir=data_dir))
    try:
        yield LocalBackend(gateway)
    finally:
        await gateway.close()


async def serve(args: argparse.Namespace) -> None:
    """Open the backend, then serve MCP on stdio or streamable HTTP until stopped."""
    async with open_backend(getattr(args, "url", None), _data_dir(args)) as backend:
        await serve_tools(
            backend,
            transport=args.transport,
            host=getattr(args, "host", "127.0.0.1"),
            port=int(args.port),
        )


def run_mcp(args: argparse.Namespace) -> int:
    """Entry point of ``scopegate mcp`` (``args.url``, ``data_dir``, ``transport``, ``port``)."""
    warn_without_token(args.transport, os.environ)
    anyio.run(serve, args)
    return 0
