"""Shared fixtures: one real OpenFGA server per session, one store per test.

A missing OpenFGA binary, Chroma or PostgreSQL makes the tests that need them fail
with the reason; nothing here skips.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api import create_app
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from gateway.settings import Settings, load_settings


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run long soak/property/load tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    deselected = [i for i in items if i.get_closest_marker("soak")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [i for i in items if not i.get_closest_marker("soak")]


#: The session OpenFGA runs its check query cache with a short TTL, and every gateway of
#: the tests declares it: after a quiet time (docs/cache.md) retrievals may use it.
SESSION_CHECK_CACHE_TTL_S = 0.5
SESSION_REQUEST_TIMEOUT_S = 3.0


@pytest.fixture(scope="session")
def openfga(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedOpenFGA]:
    server = ManagedOpenFGA(
        tmp_path_factory.mktemp("openfga"),
        check_cache_ttl_s=SESSION_CHECK_CACHE_TTL_S,
        request_timeout_s=SESSION_REQUEST_TIMEOUT_S,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def embeddings() -> Any:
    from connectors.embeddings import default_embeddings

    return default_embeddings()


def make_settings(openfga: ManagedOpenFGA, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "openfga_url": openfga.url,
        "openfga_store_name": f"test-{uuid.uuid4().hex[:12]}",
        "openfga_check_cache_ttl_s": openfga.check_cache_ttl_s,
        "openfga_request_timeout_s": openfga.request_timeout_s,
        # Two test workers share two cores with their servers: a call of 2 s (the
        # default) can run out on a busy machine. Tests about timeouts set their own.
        "openfga_timeout_s": 10.0,
    }
    return load_settings(**{**values, **overrides})


@pytest.fixture
async def gateway(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any
) -> AsyncIterator[Gateway]:
    g = await Gateway.start(make_settings(openfga, tmp_path / "data"), embeddings=embeddings)
    try:
        yield g
    finally:
        await g.close()


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(gateway=gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as client:
        yield client


@pytest.fixture(scope="session")
def pg_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One throwaway PostgreSQL server for the session (tests/pg.py)."""
    from tests.pg import running_postgres

    with running_postgres(tmp_path_factory.mktemp("postgres")) as dsn:
        yield dsn


def pg_schema_dsn(server_dsn: str, prefix: str) -> str:
    """A DSN whose search_path is a fresh schema: one isolated database per test."""
    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{server_dsn}?options=-csearch_path%3D{schema}"
