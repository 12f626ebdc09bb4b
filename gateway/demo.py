"""``scopegate demo``: a realistic two-tenant setup, an agent's retrievals allowed and
blocked, the audit trail, revocation and deprovisioning, and a replay.

Everything goes through the real HTTP API (in-process ASGI transport), the real
managed OpenFGA, embedded Chroma and the audit store in the data directory.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from gateway.api import create_app
from gateway.corpus import TenantWorld, demo_worlds
from gateway.service import Gateway
from gateway.settings import load_settings

QUERIES = [
    "What is the revenue forecast for next quarter?",
    "How do we rotate the API signing keys?",
    "What are the salary bands for engineers?",
]


def _say(text: str = "") -> None:
    print(text, flush=True)


def _title(text: str) -> None:
    _say()
    _say(text)
    _say("=" * len(text))


class DemoClient:
    def __init__(self, http: httpx.AsyncClient, gateway: Gateway) -> None:
        self.http = http
        self.gateway = gateway

    def token(
        self, tenant: str, user: str, agent: str | None = None, task: str | None = None
    ) -> str:
        return self.gateway.mint_token(tenant=tenant, user=user, agent=agent, task=task)

    async def call(
        self,
        method: str,
        path: str,
        token: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        response = await self.http.request(
            method, path, json=body, params=params, headers={"authorization": f"Bearer {token}"}
        )
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json() if response.content else None


async def _setup_tenant(c: DemoClient, world: TenantWorld) -> None:
    await c.gateway.create_tenant(world.tenant, world.admin)
    admin = c.token(world.tenant, world.admin)
    members = [
        {"user": f"user:{u}", "relation": "member", "object": f"tenant:{world.tenant}"}
        for u in world.users
    ]
    members += [
        {"user": f"agent:{a}", "relation": "member", "object": f"tenant:{world.tenant}"}
        for a in world.agents
    ]
    members.append(
        {
            "user": f"user:{world.reviewer}",
            "relation": "reviewer",
            "object": f"tenant:{world.tenant}",
        }
    )
    await c.call("POST", "/v1/relationships", admin, {"writes": members})
    await c.call("POST", "/v1/sources", admin, {"id": "wiki", "kind": "chroma"})
    await c.call("POST", "/v1/relationships", admin, {"writes": world.relationships})
    docs = [{k: v for k, v in d.items() if k != "private"} for d in world.documents]
    with tqdm(total=len(docs), desc=f"ingest {world.tenant}", unit="doc", file=sys.stdout) as bar:
        for i in range(0, len(docs), 30):
            batch = docs[i : i + 30]
            await c.call("POST", "/v1/sources/wiki/documents", admin, {"documents": batch})
            bar.update(len(batch))


async def _task(
    c: DemoClient, tenant: str, admin: str, user: str, agent: str, scope: list[str]
) -> str:
    body = {"user": f"user:{user}", "agent": f"agent:{agent}", "scope": scope}
    result = await c.call("POST", "/v1/tasks", c.token(tenant, admin), body)
    return str(result["task_id"])


async def _retrieve(
    c: DemoClient, tenant: str, user: str, agent: str, task: str, query: str, k: int = 4
) -> dict[str, Any]:
    token = c.token(tenant, user, agent, task)
    result: dict[str, Any] = await c.call("POST", "/v1/retrieve", token, {"query": query, "k": k})
    return result


def _show(label: str, result: dict[str, Any]) -> None:
    _say(f"  {label}")
    if not result["chunks"]:
        _say("      (no chunks: nothing this user, agent and task may all read)")
    for chunk in result["chunks"]:
        text = textwrap.shorten(chunk["text"], 78, placeholder="...")
        _say(f"      {chunk['document_id']:<12} {chunk['score']:.3f}  {text}")


async def run_demo(data_dir: Path, documents: int = 360) -> int:
    """Build the demo world in ``data_dir`` (recreated) and narrate what happens."""
    if data_dir.exists():
        shutil.rmtree(data_dir)
    started = time.monotonic()
    _title("scopegate demo")
    _say(f"data directory: {data_dir} (managed OpenFGA on SQLite, embedded Chroma, audit log)")
    gateway = await Gateway.start(load_settings(data_dir=data_dir))
    try:
        app = create_app(gateway=gateway)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as http:
            await _narrate(DemoClient(http, gateway), documents)
    finally:
        await gateway.close()
    _say(f"\ndemo finished in {time.monotonic() - started:.1f}s")
    return 0


async def _narrate(c: DemoClient, documents: int) -> None:
    acme, globex = demo_worlds(documents // 2)
    _title("1. Two tenants with near-identical corpora")
    for world in (acme, globex):
        await _setup_tenant(c, world)
        _say(
            f"  tenant {world.tenant}: {len(world.documents)} documents, users "
            f"{', '.join(world.users)}, agents {', '.join(world.agents)}"
        )

    _title("2. Tasks: who delegates what to which agent")
    t_alice = await _task(c, "acme", "carol", "alice", "summarizer", ["source:wiki"])
    t_bob = await _task(c, "acme", "carol", "bob", "summarizer", ["folder:finance"])
    t_bob_fin = await _task(c, "acme", "carol", "bob", "finance-analyst", ["source:wiki"])
    t_dave = await _task(c, "acme", "carol", "dave", "summarizer", ["source:wiki"])
    t_globex = await _task(c, "globex", "grace", "alice", "summarizer", ["source:wiki"])
    _say(f"  acme/alice -> summarizer, scope source:wiki       task {t_alice}")
    _say(f"  acme/bob   -> summarizer, scope folder:finance    task {t_bob}")
    _say(f"  acme/bob   -> finance-analyst, scope source:wiki  task {t_bob_fin}")
    _say(f"  acme/dave  -> summarizer (dave is in no group)    task {t_dave}")
    _say(f"  globex/alice -> summarizer, scope source:wiki     task {t_globex}")

    _title("3. The same questions, different delegations")
    for query in QUERIES:
        _say(f"\nQ: {query}")
        _show(
            "acme alice via summarizer (engineering member):",
            await _retrieve(c, "acme", "alice", "summarizer", t_alice, query),
        )
        _show(
            "acme bob via summarizer, task limited to folder:finance:",
            await _retrieve(c, "acme", "bob", "summarizer", t_bob, query),
        )
        _show(
            "acme bob via finance-analyst (agent reads finance only):",
            await _retrieve(c, "acme", "bob", "finance-analyst", t_bob_fin, query),
        )
        _show(
            "acme dave via summarizer (no group, no grants):",
            await _retrieve(c, "acme", "dave", "summarizer", t_dave, query),
        )
        _show(
            "globex alice via summarizer (same ids, other tenant):",
            await _retrieve(c, "globex", "alice", "summarizer", t_globex, query),
        )

    _title("4. What was blocked, from the audit trail (reviewer rita)")
    reviewer = c.token("acme", "rita")
    listing = await c.call("GET", "/v1/audit/decisions", reviewer, params={"limit": 200})
    blocked = [d for d in listing["decisions"] if d["blocked"]]
    _say(
        f"  {len(listing['decisions'])} acme records (retrievals and admin actions), "
        f"{len(blocked)} retrievals with blocked candidates"
    )
    if blocked:
        worst = max(blocked, key=lambda d: d["blocked"])
        detail = await c.call("GET", f"/v1/audit/decisions/{worst['request_id']}", reviewer)
        _say(
            f"  request {detail['request_id']} (user {detail['user']}, agent {detail['agent']}, "
            f"strategy {detail['strategy']}):"
        )
        for cand in detail["candidates"][:8]:
            checks = ", ".join(cand["failed_checks"]) or "-"
            _say(f"      {cand['document_id']:<18} {cand['verdict']:<6} failed: {checks}")

    _title("5. Revoking a task takes effect on the next retrieval")
    query = QUERIES[0]
    before = await _retrieve(c, "acme", "bob", "finance-analyst", t_bob_fin, query)
    await c.call("DELETE", f"/v1/tasks/{t_bob_fin}", c.token("acme", "carol"))
    after = await _retrieve(c, "acme", "bob", "finance-analyst", t_bob_fin, query)
    _say(f"  before revoke: {len(before['chunks'])} chunks; after revoke: {len(after['chunks'])}")

    _title("6. Deprovisioning a user takes effect on the next retrieval")
    before = await _retrieve(c, "acme", "alice", "summarizer", t_alice, QUERIES[1])
    removed = await c.call("DELETE", "/v1/principals/user:alice", c.token("acme", "carol"))
    after = await _retrieve(c, "acme", "alice", "summarizer", t_alice, QUERIES[1])
    _say(
        f"  removed {removed['relations_removed']} relations of alice, revoked "
        f"{removed['tasks_revoked']} task(s)"
    )
    _say(f"  before: {len(before['chunks'])} chunks; after deprovisioning: {len(after['chunks'])}")

    _title("6b. A second source cannot take over a folder of the first")
    wiki_folder = next(d["folder"] for d in acme.documents if d.get("folder"))
    await c.call("POST", "/v1/sources", c.token("acme", "carol"), {"id": "notes", "kind": "chroma"})
    clash = await c.http.post(
        "/v1/sources/notes/documents",
        json={"documents": [{"id": "note-1", "text": "team notes", "folder": wiki_folder}]},
        headers={"authorization": f"Bearer {c.token('acme', 'carol')}"},
    )
    _say(
        f"  ingesting into 'notes' with folder {wiki_folder!r}: {clash.status_code} "
        f"{clash.json()['error']['code']} (nothing written)"
    )

    _title("7. Replay: would the earlier decision still be allowed today?")
    replay = await c.call("POST", f"/v1/audit/decisions/{before['request_id']}/replay", reviewer)
    for doc in replay["documents"][:4]:
        _say(
            f"  {doc['document_id']:<12} was {doc['was']:<5} now {doc['now']:<5} "
            f"{'; '.join(doc['explanations'][:1])}"
        )

    _title("8. The audit log is hash-chained")
    verdict = await c.gateway.audit.verify()
    _say(f"  chain verified: {verdict.ok} ({verdict.checked} records)")
