"""Decision cache: how long a revoked grant can still be served, and what a hit saves.

    .venv/bin/python bench/staleness.py [--trials 20] [--poll 0.5] [--max-staleness 2]

Runs a gateway with the decision cache on (managed OpenFGA on SQLite, in-memory vector
store, hashing embeddings: only the authorization path is measured). Each trial warms
the cache for a fresh document, deletes the user's grant, and retrieves every 10 ms
until the document is no longer returned; the time from the committed delete to the
first denial is the observed staleness. Beside it, in the same run: retrieval latency
with the cache off, with the cache hit, and with ``consistency=HIGHER_CONSISTENCY``
(what ``Cache-Control: no-cache`` asks for). Prints a table and a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.embeddings import HashEmbeddings  # noqa: E402
from gateway.fga_server import ManagedOpenFGA  # noqa: E402
from gateway.identity import DelegationContext, PrincipalContext  # noqa: E402
from gateway.service import Gateway  # noqa: E402
from gateway.settings import load_settings  # noqa: E402

TENANT = "acme"
ADMIN = PrincipalContext(tenant=TENANT, user="admin", token_id="bench")


async def setup(g: Gateway, documents: int) -> DelegationContext:
    await g.create_tenant(TENANT, "admin")
    await g.write_relationships(
        ADMIN,
        [
            {"user": "user:alice", "relation": "member", "object": f"tenant:{TENANT}"},
            {"user": "agent:bot", "relation": "member", "object": f"tenant:{TENANT}"},
        ],
        [],
    )
    await g.register_source(ADMIN, "docs", "memory", {})
    docs = [
        {
            "id": f"d{i}",
            "text": text(i),
            "acl": {"viewers": ["user:alice"], "agents": ["agent:bot"]},
        }
        for i in range(documents)
    ]
    await g.ingest(ADMIN, "docs", docs)
    task = await g.create_task(ADMIN, "user:alice", "agent:bot", ["source:docs"])
    return DelegationContext(
        tenant=TENANT, user="alice", agent="bot", task=task, token_id="bench", expires_at=0
    )


def text(i: int) -> str:
    return f"quarterly revenue forecast memo number {i}"


async def returned(
    g: Gateway, ctx: DelegationContext, query: str = "revenue forecast memo", **kw: Any
) -> set[str]:
    result = await g.retrieve(ctx, query, 5, **kw)
    return {c.document_id for c in result.chunks}


async def latencies(g: Gateway, ctx: DelegationContext, n: int, **kw: Any) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await returned(g, ctx, **kw)
        out.append((time.perf_counter() - t) * 1000)
    return out


async def staleness_trials(g: Gateway, ctx: DelegationContext, trials: int) -> list[float]:
    assert g.watcher is not None
    observed = []
    for i in range(trials):
        d = f"d{i}"
        for _ in range(500):  # until the whole retrieval is answered from the cache
            calls = g.fga.stats.batch_check_calls
            if d in await returned(g, ctx, text(i)) and g.fga.stats.batch_check_calls == calls:
                break
            await asyncio.sleep(0.02)
        else:
            raise RuntimeError("the cache never answered a whole retrieval")
        grant = {"user": "user:alice", "relation": "viewer", "object": f"document:{d}"}
        await g.write_relationships(ADMIN, [], [grant])
        revoked = time.perf_counter()
        while d in await returned(g, ctx, text(i)):
            await asyncio.sleep(0.01)
        observed.append((time.perf_counter() - revoked) * 1000)
    return observed


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="scopegate-staleness-") as tmp:
        server = ManagedOpenFGA(Path(tmp) / "openfga")
        url = server.start()
        try:
            common = {"openfga_url": url, "strategy": "postfilter"}
            off = await Gateway.start(
                load_settings(
                    data_dir=Path(tmp) / "off", openfga_store_name="bench-cache-off", **common
                ),
                embeddings=HashEmbeddings(),
            )
            on = await Gateway.start(
                load_settings(
                    data_dir=Path(tmp) / "on",
                    openfga_store_name="bench-cache-on",
                    decision_cache=True,
                    decision_cache_poll_s=args.poll,
                    decision_cache_max_staleness_s=args.max_staleness,
                    **common,
                ),
                embeddings=HashEmbeddings(),
            )
            try:
                ctx_off = await setup(off, args.trials + 5)
                ctx_on = await setup(on, args.trials + 5)
                await asyncio.sleep(args.poll * 2)
                await returned(on, ctx_on)  # fill the cache
                rows = {
                    "cache off": await latencies(off, ctx_off, args.samples),
                    "cache on (hit)": await latencies(on, ctx_on, args.samples),
                    "cache on, no-cache request": await latencies(
                        on, ctx_on, args.samples, consistency="HIGHER_CONSISTENCY"
                    ),
                }
                stale = await staleness_trials(on, ctx_on, args.trials)
            finally:
                await on.close()
                await off.close()
        finally:
            server.stop()
    print(f"decision cache: poll every {args.poll:g} s, max staleness {args.max_staleness:g} s")
    print(f"{'retrieval (k=5)':<30} {'p50 ms':>8} {'p95 ms':>8}")
    for name, values in rows.items():
        p95 = statistics.quantiles(values, n=20)[-1]
        print(f"{name:<30} {statistics.median(values):>8.2f} {p95:>8.2f}")
    print(
        f"revoke -> first denial over {len(stale)} trials:"
        f" median {statistics.median(stale):.0f} ms, max {max(stale):.0f} ms"
        f" (bound {args.max_staleness * 1000:.0f} ms)"
    )
    hit = statistics.median(rows["cache on (hit)"])
    miss = statistics.median(rows["cache off"])
    print(
        f"summary: staleness max {max(stale):.0f} ms <= bound {args.max_staleness * 1000:.0f} ms:"
        f" {max(stale) <= args.max_staleness * 1000}; cache hit {hit:.2f} ms vs off"
        f" {miss:.2f} ms ({miss / hit:.1f}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--max-staleness", type=float, default=2.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
