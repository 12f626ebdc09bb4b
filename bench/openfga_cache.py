"""OpenFGA's check query cache, side by side: what one BatchCheck round costs.

    .venv/bin/python bench/openfga_cache.py            # after bench/retrieval.py built its data

On the retrieval benchmark's 10k-chunk store (bench/results/data, built by
``bench/retrieval.py``; copied, never modified), a managed OpenFGA runs with its check
query cache on, and the gateway's own ``FgaClient`` sends the checks of the 50% profile
(the user reads half the folders through a group) for 12 documents drawn at random per
round: 6 request-level and 4 x 12 document-level checks, one BatchCheck. Three ways to
send them, interleaved round by round (so the machine's load falls on all three alike):

- ``higher``: ``HIGHER_CONSISTENCY`` with the clock on every check (before);
- ``minimize+clock``: ``MINIMIZE_LATENCY`` with the clock on every check: OpenFGA keys
  its cache by the request's context, so entries are reused within one call only;
- ``minimize``: ``MINIMIZE_LATENCY`` with the clock only on the checks that can depend
  on it (what the gateway sends once the quiet-time rule allows the cache).

The exact decision cache of the gateway is off here: every check goes to OpenFGA.
Prints the median and p95 per way and the ratio to ``higher``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.decision import plan_checks  # noqa: E402
from gateway.fga import FgaClient, now_context  # noqa: E402
from gateway.fga_server import ManagedOpenFGA  # noqa: E402
from gateway.identity import DelegationContext  # noqa: E402

WAYS = ("higher", "minimize+clock", "minimize")


async def model_id(url: str, store: str) -> str:
    async with httpx.AsyncClient(base_url=url) as http:
        answer = (await http.get(f"/stores/{store}/authorization-models")).json()
    return str(answer["authorization_models"][0]["id"])


async def run(args: argparse.Namespace) -> dict[str, object]:
    data = Path(args.data_dir)
    manifest = json.loads(next(data.glob("bench-10000-*.json")).read_text())
    with tempfile.TemporaryDirectory(prefix="openfga-cache-") as tmp:
        shutil.copytree(data / "openfga", Path(tmp) / "openfga")
        server = ManagedOpenFGA(Path(tmp) / "openfga", check_cache_ttl_s=10.0)
        url = await asyncio.to_thread(server.start)
        try:
            store = manifest["store_id"]
            fga = FgaClient(url, store, await model_id(url, store), timeout_s=30.0)
            ctx = DelegationContext("acme", "p50u", "p50a", "p50t", "bench", 0)
            rng = random.Random(args.seed)
            documents = manifest.get("documents", 2000)
            spent: dict[str, list[float]] = {w: [] for w in WAYS}
            allowed: dict[str, list[int]] = {w: [] for w in WAYS}
            for number in range(args.rounds + args.warmup):
                picked = [f"d{d:06d}" for d in rng.sample(range(documents), args.documents)]
                items = plan_checks(ctx, picked)
                ways = list(WAYS)
                rng.shuffle(ways)
                for way in ways:
                    started = time.perf_counter()
                    answers = await fga.batch_check(
                        items,
                        context=now_context() if way != "minimize" else None,
                        consistency="MINIMIZE_LATENCY" if way == "minimize+clock" else None,
                        server_cache=way == "minimize",
                    )
                    if number >= args.warmup:
                        spent[way].append((time.perf_counter() - started) * 1000)
                        allowed[way].append(sum(a.allowed is True for a in answers.values()))
            await fga.close()
        finally:
            await asyncio.to_thread(server.stop)
    if len({tuple(v) for v in allowed.values()}) != 1:
        raise SystemExit(f"the three ways answered differently: {allowed}")
    base = statistics.median(spent["higher"])
    return {
        way: {
            "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(sorted(ms)[int(0.95 * (len(ms) - 1))], 1),
            "x_higher": round(statistics.median(ms) / base, 2),
        }
        for way, ms in spent.items()
    } | {"rounds": args.rounds, "checks_per_round": 6 + 4 * args.documents}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT / "bench" / "results" / "data"))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--documents", type=int, default=11, help="documents per BatchCheck")
    parser.add_argument("--seed", type=int, default=1)
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
