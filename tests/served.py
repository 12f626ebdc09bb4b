"""A real gateway served over real HTTP, for the client, LangChain and MCP tests.

The gateway runs in a :class:`BackgroundGateway` (its own loop thread) against the
session's managed OpenFGA, with the HTTP API served by uvicorn on a free loopback
port, so sync code, async code on other loops and other processes can all call it.
The tenant is built through the API with the client under test.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.background import BackgroundGateway
from gateway.client import ScopegateClient
from gateway.fga_server import ManagedOpenFGA
from tests.conftest import make_settings
from tests.world import doc

TENANT = "acme"
AGENT = "summarizer"
# Highly relevant to revenue questions, but only bob may read it.
DENIED_TEXT = "Confidential salary bands: staff engineers earn 212k and the revenue bonus is 9%."
CORPUS = [
    doc(
        "rev1",
        "Quarterly revenue forecast: revenue grows eight percent on enterprise renewals.",
        viewers=["user:alice", "user:bob"],
        agents=[f"agent:{AGENT}"],
    ),
    doc(
        "rev2",
        "Revenue by region: EMEA revenue doubled while APAC revenue stayed flat this year.",
        viewers=["user:alice", "user:bob"],
        agents=[f"agent:{AGENT}"],
    ),
    doc(
        "rev3",
        "Revenue recognition policy: multi-year contract revenue is deferred and recognised.",
        viewers=["group:finance#member"],
        agents=[f"agent:{AGENT}"],
    ),
    doc(
        "inc1",
        "Incident postmortem: the primary database failed over after disk saturation.",
        viewers=["user:alice"],
        agents=[f"agent:{AGENT}"],
    ),
    doc("pay1", DENIED_TEXT, viewers=["user:bob"], agents=[f"agent:{AGENT}"]),
]
ALICE_DOCS = {"rev1", "rev2", "rev3", "inc1"}
BOB_DOCS = {"rev1", "rev2", "rev3", "pay1"}


@dataclass
class Served:
    """A served gateway with tenant ``acme``: alice and bob delegate to the summarizer."""

    bg: BackgroundGateway
    url: str
    tasks: dict[str, str] = field(default_factory=dict)

    def admin_token(self) -> str:
        return self.bg.mint_token(tenant=TENANT, user="admin")

    def agent_token(self, user: str, ttl_s: int = 900) -> str:
        return self.bg.mint_token(
            tenant=TENANT, user=user, agent=AGENT, task=self.tasks[user], ttl_s=ttl_s
        )

    def admin(self) -> ScopegateClient:
        return ScopegateClient(self.url, self.admin_token)

    def run(self, coro: Any) -> Any:
        return self.bg.call(coro)


def serve_gateway(
    openfga: ManagedOpenFGA, data_dir: Path, embeddings: Any, **overrides: Any
) -> BackgroundGateway:
    settings = make_settings(openfga, data_dir, **overrides)
    bg = BackgroundGateway.start(settings, embeddings=embeddings)
    bg.serve_http()
    return bg


def build_acme(bg: BackgroundGateway) -> Served:
    assert bg.url is not None
    served = Served(bg, bg.url)
    served.run(bg.gateway.create_tenant(TENANT, "admin"))
    with served.admin() as admin:
        admin.write_relationships(
            writes=[
                *(
                    {"user": f"user:{u}", "relation": "member", "object": f"tenant:{TENANT}"}
                    for u in ("alice", "bob")
                ),
                {"user": f"agent:{AGENT}", "relation": "member", "object": f"tenant:{TENANT}"},
                {"user": "user:alice", "relation": "member", "object": "group:finance"},
                {"user": "user:bob", "relation": "member", "object": "group:finance"},
            ]
        )
        admin.register_source("docs")
        admin.ingest("docs", CORPUS)
        for user in ("alice", "bob"):
            served.tasks[user] = admin.create_task(
                f"user:{user}", f"agent:{AGENT}", ["source:docs"]
            )
    return served


def acme_fixture(prefix: str, **overrides: Any) -> Any:
    """A module-scoped ``acme`` fixture: a gateway served with :func:`build_acme`'s tenant
    (``overrides`` are settings), closed after the module's tests."""

    @pytest.fixture(scope="module")
    def acme(
        openfga: ManagedOpenFGA, embeddings: Any, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Served]:
        bg = serve_gateway(openfga, tmp_path_factory.mktemp(prefix), embeddings, **overrides)
        try:
            yield build_acme(bg)
        finally:
            bg.close()

    return acme
