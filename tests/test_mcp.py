"""``scopegate mcp`` driven by the official MCP SDK client, against a real gateway.

- stdio: the SDK launches ``scopegate mcp --url ...`` (HTTP backend), or the client
  distribution's ``scopegate-mcp --url ...``; the token is ``SCOPEGATE_TOKEN`` in the
  server's environment;
- streamable HTTP: ``scopegate mcp --transport http --data-dir ...`` (in-process
  backend); the token is each MCP request's ``Authorization: Bearer`` header.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from gateway.fga_server import ManagedOpenFGA
from tests.served import (
    ALICE_DOCS,
    BOB_DOCS,
    DENIED_TEXT,
    Served,
    acme_fixture,
    build_acme,
    serve_gateway,
)

SCOPEGATE = Path(sys.executable).with_name("scopegate")
# The same tools from the client distribution alone (HTTP backend only).
SCOPEGATE_MCP = Path(sys.executable).with_name("scopegate-mcp")
STDIO_COMMANDS = {"scopegate mcp": [SCOPEGATE, "mcp"], "scopegate-mcp": [SCOPEGATE_MCP]}
QUERY = "revenue forecast and the salary bands"


acme = acme_fixture("mcp-gw")


@pytest.fixture(params=sorted(STDIO_COMMANDS))
def command(request: pytest.FixtureRequest) -> list[Path | str]:
    return STDIO_COMMANDS[request.param]


def _stdio(command: list[Path | str], url: str, token: str | None) -> Client:
    program, *args = command
    assert Path(program).exists(), f"console script missing: {program} (make setup)"
    env = {"SCOPEGATE_TOKEN": token} if token is not None else {}
    return Client(
        StdioServerParameters(command=str(program), args=[*map(str, args), "--url", url], env=env)
    )


def _documents(result: Any) -> set[str]:
    assert not result.is_error, result.content
    return {c["document_id"] for c in result.structured_content["chunks"]}


def _text(result: Any) -> str:
    return "\n".join(block.text for block in result.content)


# -- stdio ----------------------------------------------------------------------------------


async def test_stdio_returns_only_permitted_chunks(acme: Served, command: list[Path | str]) -> None:
    async with _stdio(command, acme.url, acme.agent_token("alice")) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"retrieve", "list_sources"}
        # Identity is not an argument a model could set.
        assert set(tools["retrieve"].input_schema["properties"]) == {"query", "k", "sources"}

        result = await client.call_tool("retrieve", {"query": QUERY, "k": 10})
        assert _documents(result) == ALICE_DOCS
        assert DENIED_TEXT not in _text(result) and DENIED_TEXT not in str(
            result.structured_content
        )
        assert result.structured_content["request_id"]

        narrowed = await client.call_tool("retrieve", {"query": QUERY, "k": 2, "sources": ["docs"]})
        assert len(_documents(narrowed)) == 2
        unknown = await client.call_tool("retrieve", {"query": QUERY, "sources": ["nope"]})
        assert unknown.is_error and "not_found" in _text(unknown)

        sources = await client.call_tool("list_sources", {})
        assert sources.structured_content == {"sources": ["docs"]}


async def test_stdio_without_a_token_rejects_every_call(
    acme: Served, command: list[Path | str]
) -> None:
    async with _stdio(command, acme.url, None) as client:
        for name, args in (("retrieve", {"query": QUERY}), ("list_sources", {})):
            with pytest.raises(MCPError, match="invalid_token") as rejected:
                await client.call_tool(name, args)
            assert rejected.value.data == {"code": "invalid_token"}


# -- streamable HTTP, in-process gateway on a data directory ----------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + 120  # a bound against hanging, not a timing assertion
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"scopegate mcp exited {process.returncode}:\n{log.read_text()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"scopegate mcp never listened:\n{log.read_text()}")


@pytest.fixture(scope="module")
def mcp_http(
    openfga: ManagedOpenFGA, embeddings: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, dict[str, str]]]:
    """``scopegate mcp --transport http --data-dir D``: the MCP URL and tokens by name."""
    data_dir = tmp_path_factory.mktemp("mcp-data")
    bg = serve_gateway(openfga, data_dir, embeddings)
    try:
        served = build_acme(bg)
        tokens = {user: served.agent_token(user) for user in ("alice", "bob")}
        tokens["admin"] = served.admin_token()  # a principal token: no agent, no task
        store = bg.gateway.settings.openfga_store_name
    finally:
        bg.close()  # one process at a time drives the data directory
    port = _free_port()
    log = data_dir / "mcp.log"
    env = {
        **os.environ,
        "SCOPEGATE_OPENFGA_URL": openfga.url,
        "SCOPEGATE_OPENFGA_STORE_NAME": store,
    }
    env.pop("SCOPEGATE_TOKEN", None)
    args = ["mcp", "--transport", "http", "--port", str(port), "--data-dir", str(data_dir)]
    with log.open("wb") as out:
        process = subprocess.Popen([str(SCOPEGATE), *args], env=env, stdout=out, stderr=out)
    try:
        _wait_listening(process, port, log)
        yield f"http://127.0.0.1:{port}/mcp", tokens
    finally:
        process.terminate()
        process.wait(timeout=30)


@asynccontextmanager
async def _http(url: str, token: str | None, mode: str = "auto") -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        yield client


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_http_token_comes_from_each_request(
    mcp_http: tuple[str, dict[str, str]], mode: str
) -> None:
    url, tokens = mcp_http
    async with _http(url, tokens["alice"], mode) as alice:
        result = await alice.call_tool("retrieve", {"query": QUERY, "k": 10})
        assert _documents(result) == ALICE_DOCS
        assert DENIED_TEXT not in _text(result)
        assert (await alice.call_tool("list_sources", {})).structured_content == {
            "sources": ["docs"]
        }
    async with _http(url, tokens["bob"], mode) as bob:
        result = await bob.call_tool("retrieve", {"query": QUERY, "k": 10})
        assert _documents(result) == BOB_DOCS


async def test_http_rejects_calls_without_a_valid_delegation(
    mcp_http: tuple[str, dict[str, str]],
) -> None:
    url, tokens = mcp_http
    for token in (None, "not-a-token", tokens["alice"] + "x", tokens["admin"]):
        async with _http(url, token) as client:
            with pytest.raises(MCPError, match="invalid_token"):
                await client.call_tool("retrieve", {"query": QUERY})
            with pytest.raises(MCPError, match="invalid_token"):
                await client.call_tool("list_sources", {})
