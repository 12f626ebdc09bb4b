"""Configuration that refuses inconsistent shapes (DESIGN §8).

Production refuses every embedded part with a message naming what to set; a pinned
OpenFGA model is used as it is (never replaced) and a missing or foreign one stops the
start; the Chroma server URL and headers reach the connector.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ConfigurationError
from gateway.fga import FgaClient
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from gateway.settings import load_settings
from tests.conftest import make_settings

REPO = Path(__file__).resolve().parent.parent
PEM = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"
SCALED_OUT: dict[str, Any] = {
    "environment": "production",
    "openfga_url": "http://openfga:8080",
    "openfga_store_id": "01STORE",
    "openfga_model_id": "01MODEL",
    "audit_dsn": "postgresql://scopegate@db/audit",
    "catalog_dsn": "postgresql://scopegate@db/catalog",
    "chroma_url": "http://chroma:8000",
    "trusted_issuers_pem": {"idp": PEM},
}


def test_production_accepts_the_scaled_out_shape() -> None:
    settings = load_settings(**SCALED_OUT)
    assert settings.environment == "production"


@pytest.mark.parametrize(
    ("unset", "named"),
    [
        ("openfga_url", "SCOPEGATE_OPENFGA_URL"),
        ("audit_dsn", "SCOPEGATE_AUDIT_DSN"),
        ("catalog_dsn", "SCOPEGATE_CATALOG_DSN"),
        ("chroma_url", "SCOPEGATE_CHROMA_URL"),
        ("trusted_issuers_pem", "SCOPEGATE_TRUSTED_ISSUERS_PEM"),
    ],
)
def test_production_refuses_each_embedded_part_and_says_what_to_set(unset: str, named: str) -> None:
    values = {k: v for k, v in SCALED_OUT.items() if k != unset}
    with pytest.raises(ConfigurationError, match=named):
        load_settings(**values)
    sqlite = {**SCALED_OUT, "audit_dsn": "/var/lib/audit.db", "catalog_dsn": "sqlite:///x"}
    with pytest.raises(ConfigurationError, match="SCOPEGATE_CATALOG_DSN"):
        load_settings(**sqlite)


def test_production_lists_every_problem_at_once() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(environment="production")
    message = str(caught.value)
    for name in ("OPENFGA_URL", "AUDIT_DSN", "CATALOG_DSN", "CHROMA_URL", "JWKS_URL"):
        assert f"SCOPEGATE_{name}" in message


def test_serve_in_production_with_embedded_parts_exits_with_the_message(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "scopegate"), "serve", "--data-dir", str(tmp_path)],
        env={"SCOPEGATE_ENVIRONMENT": "production", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    assert "SCOPEGATE_OPENFGA_URL" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "openfga").exists()  # nothing was started


async def test_a_pinned_model_is_used_as_it_is(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any
) -> None:
    first = await Gateway.start(make_settings(openfga, tmp_path / "a"), embeddings=embeddings)
    store_id, model_id = first.fga.store_id, first.fga.model_id
    await first.close()
    # Someone writes another model into the store afterwards: a pinned gateway ignores it.
    other = FgaClient(openfga.url, store_id)
    try:
        await other.client.write_authorization_model(
            {
                "schema_version": "1.1",
                "type_definitions": [{"type": "user"}, {"type": "document"}],
            }
        )
    finally:
        await other.close()
    pinned = make_settings(
        openfga,
        tmp_path / "b",
        openfga_store_id=store_id,
        openfga_model_id=model_id,
    )
    g = await Gateway.start(pinned, embeddings=embeddings)
    try:
        assert g.fga.model_id == model_id
    finally:
        await g.close()


async def test_a_missing_or_foreign_pinned_model_stops_the_start(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any
) -> None:
    first = await Gateway.start(make_settings(openfga, tmp_path / "a"), embeddings=embeddings)
    store_id = first.fga.store_id
    await first.close()
    missing = make_settings(
        openfga,
        tmp_path / "b",
        openfga_store_id=store_id,
        openfga_model_id="01JZZZZZZZZZZZZZZZZZZZZZZZ",
    )
    with pytest.raises(ConfigurationError, match="SCOPEGATE_OPENFGA_MODEL_ID"):
        await Gateway.start(missing, embeddings=embeddings)
    other = FgaClient(openfga.url, store_id)
    try:
        written = await other.client.write_authorization_model(
            {"schema_version": "1.1", "type_definitions": [{"type": "user"}]}
        )
    finally:
        await other.close()
    foreign = make_settings(
        openfga,
        tmp_path / "c",
        openfga_store_id=store_id,
        openfga_model_id=written.authorization_model_id,
        openfga_store_name=f"unused-{uuid.uuid4().hex[:6]}",
    )
    with pytest.raises(ConfigurationError, match="not the model"):
        await Gateway.start(foreign, embeddings=embeddings)


async def test_sources_without_a_url_use_the_configured_chroma_server(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any
) -> None:
    settings = make_settings(
        openfga,
        tmp_path / "data",
        chroma_url="http://127.0.0.1:9",
        chroma_headers={"X-Chroma-Token": "secret"},
    )
    g = await Gateway.start(settings, embeddings=embeddings)
    try:
        from connectors.chroma import ChromaStore
        from gateway.catalog import SourceInfo

        store = g.stores.for_source(SourceInfo("acme", "docs", "chroma", {}, 0.0))
        assert isinstance(store, ChromaStore)
        # Nothing listens on port 9: the store is unhealthy, never silently embedded.
        assert not await store.healthy()
        assert not (tmp_path / "data" / "chroma").exists()
    finally:
        await g.close()
