"""Replay as of the decision: what one costs for a record with 100 candidates.

    .venv/bin/python bench/replay.py [--documents 120] [--changes 300] [--runs 5]

The embedded default for everything a replay touches: a managed OpenFGA on SQLite and
the SQLite audit store holding the change-log archive (an in-memory vector store and
hashing embeddings: the search is not what is measured). Builds a tenant with nested
folders, groups and mixed grants, retrieves with k=100 under the post-filter (so every
candidate is recorded: at least 100), writes a history of random relationship changes
(grants, revocations, group memberships), then measures, in the same run:

- a replay now (for comparison) and a replay as of the decision, ``--settle`` seconds
  after the history (longer than the archiver's 10 s overlap, as for any decision a
  reviewer looks at later; 0 makes every replay sweep the log first): medians of
  ``--runs``, with the phases the answer reports (``as_of.timings_ms``: bringing the
  archive up to date, rebuilding the tuples, asking the scratch store; the replay now
  runs beside them);
- the archiver's lag while the history was written (sampled every 50 ms);
- retrieval latency with the archiver running and stopped: what archiving costs the
  retrieval path;
- the archive's size on disk per change (the SQLite table and its indexes, from
  ``dbstat``): how the audit database grows with OpenFGA's change log.

Prints a table and a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.embeddings import HashEmbeddings  # noqa: E402
from gateway.identity import DelegationContext, PrincipalContext  # noqa: E402
from gateway.replay import replay_as_of_decision, replay_decision  # noqa: E402
from gateway.service import Gateway  # noqa: E402
from gateway.settings import load_settings  # noqa: E402

TENANT = "acme"
ADMIN = PrincipalContext(tenant=TENANT, user="admin", token_id="bench")
USERS = [f"u{i}" for i in range(8)]
AGENTS = ["bot", "helper"]
GROUPS = [f"g{i}" for i in range(4)]
FOLDERS = [f"f{i}" for i in range(10)]


def _doc(i: int, rng: random.Random) -> dict[str, Any]:
    viewers = rng.sample(["user:alice", *(f"user:{u}" for u in USERS)], 2)
    viewers.append(rng.choice([f"group:{g}#member" for g in GROUPS]))
    if i % 7 == 0:
        viewers.append(f"tenant:{TENANT}#member")
    return {
        "id": f"d{i}",
        "text": f"quarterly revenue forecast memo number {i}",
        "folder": FOLDERS[i % len(FOLDERS)],
        "acl": {"viewers": viewers, "agents": ["agent:bot"] if i % 3 else []},
    }


async def setup(g: Gateway, documents: int, rng: random.Random) -> DelegationContext:
    await g.create_tenant(TENANT, "admin")
    members = [
        {"user": f"user:{u}", "relation": "member", "object": f"tenant:{TENANT}"}
        for u in ["alice", *USERS]
    ]
    members += [
        {"user": f"agent:{a}", "relation": "member", "object": f"tenant:{TENANT}"} for a in AGENTS
    ]
    members += [
        {"user": "user:alice", "relation": "member", "object": f"group:{g}"} for g in GROUPS[:2]
    ]
    await g.write_relationships(ADMIN, members, [])
    await g.register_source(ADMIN, "docs", "memory", {})
    docs = [_doc(i, rng) for i in range(documents)]
    # One document per folder in each call: an ingestion naming a new folder for two
    # documents at once writes the folder's tuples twice (OpenFGA refuses the call).
    for start in range(0, documents, len(FOLDERS)):
        await g.ingest(ADMIN, "docs", docs[start : start + len(FOLDERS)])
    # Folders in a chain of two levels; the agent reads whole folders.
    links = [
        {"user": f"folder:{FOLDERS[i - 1]}", "relation": "parent", "object": f"folder:{FOLDERS[i]}"}
        for i in range(1, len(FOLDERS), 2)
    ]
    links += [
        {"user": "agent:bot", "relation": "agent_viewer", "object": f"folder:{f}"}
        for f in FOLDERS[:4]
    ]
    await g.write_relationships(ADMIN, links, [])
    task = await g.create_task(ADMIN, "user:alice", "agent:bot", ["source:docs"])
    return DelegationContext(
        tenant=TENANT, user="alice", agent="bot", task=task, token_id="bench", expires_at=0
    )


def _random_change(rng: random.Random, documents: int) -> dict[str, str]:
    kind = rng.random()
    if kind < 0.4:
        who = rng.choice(["user:alice", *(f"user:{u}" for u in USERS)])
        return {
            "user": who,
            "relation": "viewer",
            "object": f"document:d{rng.randrange(documents)}",
        }
    if kind < 0.6:
        return {
            "user": "agent:bot",
            "relation": "agent_viewer",
            "object": f"document:d{rng.randrange(documents)}",
        }
    if kind < 0.8:
        return {
            "user": rng.choice(["user:alice", *(f"user:{u}" for u in USERS)]),
            "relation": "member",
            "object": f"group:{rng.choice(GROUPS)}",
        }
    return {
        "user": f"group:{rng.choice(GROUPS)}#member",
        "relation": "viewer",
        "object": f"folder:{rng.choice(FOLDERS)}",
    }


async def history(g: Gateway, changes: int, documents: int, rng: random.Random) -> list[float]:
    """Write ``changes`` random changes (in calls of 1-5); sample the archiver's lag."""
    assert g.changelog is not None
    lags: list[float] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            lag = g.changelog.lag_s() if g.changelog is not None else None
            if lag is not None:
                lags.append(lag)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    written = 0
    while written < changes:
        batch = [_random_change(rng, documents) for _ in range(rng.randint(1, 5))]
        batch = list({tuple(sorted(c.items())): c for c in batch}.values())
        writes = [c for c in batch if rng.random() < 0.5]
        deletes = [c for c in batch if c not in writes]
        await g.write_relationships(ADMIN, writes, deletes)
        written += len(batch)
    done.set()
    await sampler
    return lags


async def timed(coro: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await coro
    return (time.perf_counter() - started) * 1000, result


async def retrieval_latency(g: Gateway, ctx: DelegationContext, n: int) -> list[float]:
    out = []
    for _ in range(n):
        ms, _ = await timed(g.retrieve(ctx, "revenue forecast memo", 10))
        out.append(ms)
    return out


def archive_size(path: Path) -> int:
    """Bytes of the change-log archive's table and indexes in a SQLite audit database."""
    with sqlite3.connect(path) as conn:
        (size,) = conn.execute(
            "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat"
            " WHERE name LIKE 'changelog_archive%'"
            " OR name LIKE 'sqlite_autoindex_changelog_archive%'"
        ).fetchone()
    return int(size)


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="scopegate-bench-replay-") as tmp:
        settings = load_settings(
            data_dir=Path(tmp),
            strategy="postfilter",
            openfga_url=None,
            openfga_timeout_s=args.timeout,
            changelog_archive=True,
        )
        g = await Gateway.start(settings, embeddings=HashEmbeddings())
        try:
            ctx = await setup(g, args.documents, rng)
            assert g.changelog is not None
            await g.changelog.sync()
            decision = await g.retrieve(ctx, "quarterly revenue forecast memo", 100)
            entry = await g.audit.get(TENANT, decision.request_id)
            assert entry is not None
            record = entry.record
            lags = await history(g, args.changes, args.documents, rng)
            # A replay of a decision older than the archiver's overlap needs no sweep
            # (the background one has covered it): the usual case for a reviewer.
            await asyncio.sleep(args.settle)
            await g.changelog.sync()
            head = await g.audit.archive_head(g.fga.store_id)

            now_ms = [(await timed(replay_decision(g.fga, record)))[0] for _ in range(args.runs)]
            as_of_runs = [
                await timed(replay_as_of_decision(g.fga, g.audit, g.changelog, record))
                for _ in range(args.runs)
            ]
            as_of_ms = [ms for ms, _ in as_of_runs]
            answer = as_of_runs[-1][1]
            phases = {
                k: p50([r["as_of"]["timings_ms"][k] for _, r in as_of_runs])
                for k in answer["as_of"]["timings_ms"]
            }

            running = await retrieval_latency(g, ctx, args.retrievals)
            await g.changelog.stop()
            stopped = await retrieval_latency(g, ctx, args.retrievals)
        finally:
            await g.close()
        archive_bytes = archive_size(Path(tmp) / "audit.db")

    flipped = sum(1 for d in answer["documents"] if d["flipped_checks"])
    archived = head.seq if head else 0
    rows = [
        ("candidates in the record", f"{len(record.candidates)}"),
        ("archived changes (whole store)", f"{head.seq if head else 0}"),
        ("relationships rebuilt for the replay", f"{answer['as_of']['tuples_reconstructed']}"),
        ("objects walked", f"{answer['as_of']['objects_walked']}"),
        ("changes since the decision (relevant)", f"{len(answer['changes'])}"),
        ("documents whose verdict inputs flipped", f"{flipped}"),
        ("as-of replay matches the record", f"{answer['as_of']['exact']}"),
        ("replay now, p50", f"{p50(now_ms):.0f} ms"),
        ("replay as of the decision, p50", f"{p50(as_of_ms):.0f} ms (max {max(as_of_ms):.0f})"),
        *((f"  phase {k}, p50", f"{v:.0f} ms") for k, v in phases.items()),
        (
            "archiver lag while writing the history, p50 / max",
            f"{p50(lags) * 1000:.0f} / {max(lags, default=0) * 1000:.0f} ms",
        ),
        (
            "retrieval p50, archiver running / stopped",
            f"{p50(running):.1f} / {p50(stopped):.1f} ms",
        ),
        (
            "archive on disk (table and indexes), per change",
            f"{archive_bytes / 1024:.0f} KiB, {archive_bytes / max(1, archived):.0f} B",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(
        f"\nas-of replay of {len(record.candidates)} candidates: p50 {p50(as_of_ms):.0f} ms "
        f"over {head.seq if head else 0} archived changes (replay now: {p50(now_ms):.0f} ms); "
        f"exact: {answer['as_of']['exact']}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=120)
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--retrievals", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--settle", type=float, default=15.0, help="seconds between the history and the replays"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="OpenFGA call timeout (s) on a busy machine"
    )
    asyncio.run(main(parser.parse_args()))
