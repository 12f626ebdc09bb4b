"""Ingestion and ACL-sync throughput, side by side with the embedding model's own.

    .venv/bin/python bench/ingest.py --documents 10000 --sync-documents 100000

In one run, on the same generated documents:

1. ``embed``: the embedding model alone (``embed_documents`` over every chunk text of
   the corpus, in the batches ingestion uses) -> chunks per second;
2. ``ingest``: end-to-end ``Gateway.ingest`` into embedded Chroma and a managed OpenFGA
   (chunking, embedding, store writes, tuples, catalog) -> chunks per second, and the
   ratio to (1). The two are interleaved slice by slice (``--slice`` documents), so a
   change in the shared machine's load falls on both sides alike;
3. ``sync``: a fronted Chroma collection of ``--sync-documents`` one-chunk documents,
   filled by plain chromadb with random vectors and ACL metadata, synced into OpenFGA
   (first run: every tuple written; second run: incremental, nothing changed; third:
   ``full``, every document read back from OpenFGA) -> seconds.

4. ``qdrant_layouts`` (``--qdrant-layouts N``): Qdrant local mode, ``N`` random points
   over 4 tenants, in the two layouts a Qdrant deployment can scope tenants with: one
   collection per (tenant, source), or one collection whose points carry a
   payload-indexed ``tenant`` field that every query filters on -> query p50 (k=10,
   median of 50 queries) and isolation (points of another tenant returned: must be 0).

Prints one JSON object; ``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
from chromadb.config import Settings as ChromaSettings

from connectors.chunking import chunk_document
from connectors.embeddings import default_embeddings
from gateway.identity import PrincipalContext
from gateway.service import Gateway
from gateway.settings import load_settings

WORDS = [
    "database",
    "failover",
    "runbook",
    "payments",
    "replica",
    "quarterly",
    "revenue",
    "forecast",
    "salary",
    "bands",
    "engineering",
    "hiring",
    "plan",
    "certificate",
    "rotation",
    "gateway",
    "outage",
    "postmortem",
    "vendor",
    "review",
    "onboarding",
    "support",
    "agents",
    "travel",
    "booking",
    "sales",
    "offsite",
    "security",
    "checklist",
]
BATCH = 50


def corpus(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 260))) + "."
        docs.append(
            {
                "id": f"d{i}",
                "text": text,
                "folder": f"f{i % 20}",
                "acl": {"viewers": [f"user:u{i % 50}", "group:eng#member"], "agents": ["agent:a"]},
            }
        )
    return docs


def chunk_texts(docs: list[dict[str, Any]]) -> list[str]:
    return [piece[2] for d in docs for piece in chunk_document(d["id"], d["text"])]


def embed_seconds(embeddings: Any, texts: list[str]) -> float:
    started = time.perf_counter()
    for start in range(0, len(texts), 256):
        embeddings.embed_documents(texts[start : start + 256])
    return time.perf_counter() - started


async def ingest_seconds(
    g: Gateway, p: PrincipalContext, docs: list[dict[str, Any]]
) -> tuple[int, float]:
    chunks = 0
    started = time.perf_counter()
    for start in range(0, len(docs), BATCH):
        chunks += (await g.ingest(p, "bench", docs[start : start + BATCH]))["chunks"]
    return chunks, time.perf_counter() - started


async def embed_vs_ingest(
    embeddings: Any, g: Gateway, p: PrincipalContext, docs: list[dict[str, Any]], slice_size: int
) -> dict[str, Any]:
    """The model alone and ingestion, interleaved slice by slice over the same documents.

    Each slice of ``slice_size`` documents is first embedded by the model alone, then
    ingested end to end; the two totals cover the same chunks. Interleaving keeps a
    change in the machine's load (it is shared) from landing on one side only.
    """
    await g.register_source(p, "bench", "chroma", {})
    model_s = ingest_s = 0.0
    chunks = 0
    for number, start in enumerate(range(0, len(docs), slice_size), 1):
        part = docs[start : start + slice_size]
        texts = chunk_texts(part)
        model_s += embed_seconds(embeddings, texts)
        ingested, seconds = await ingest_seconds(g, p, part)
        if ingested != len(texts):
            raise SystemExit(f"ingestion stored {ingested} chunks, the model embedded {len(texts)}")
        ingest_s += seconds
        chunks += ingested
        print(
            json.dumps(
                {
                    "slice": number,
                    "documents": start + len(part),
                    "chunks": chunks,
                    "embed_chunks_per_s": round(chunks / model_s, 2),
                    "ingest_chunks_per_s": round(chunks / ingest_s, 2),
                }
            ),
            flush=True,
        )
    embed = {"chunks": chunks, "seconds": round(model_s, 2), "chunks_per_s": chunks / model_s}
    ingest = {"chunks": chunks, "seconds": round(ingest_s, 2), "chunks_per_s": chunks / ingest_s}
    return {"embed": embed, "ingest": ingest, "ingest_vs_embed": model_s / ingest_s}


def fill_fronted(path: Path, n: int) -> None:
    started = time.perf_counter()
    _fill_fronted(path, n)
    print(json.dumps({"fronted_fill_s": round(time.perf_counter() - started, 1)}), flush=True)


def _fill_fronted(path: Path, n: int) -> None:
    client = chromadb.PersistentClient(
        path=str(path), settings=ChromaSettings(anonymized_telemetry=False)
    )
    kb = client.create_collection(
        "kb-bench", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
    )
    rng = np.random.default_rng(3)
    step = client.get_max_batch_size()
    for start in range(0, n, step):
        ids = range(start, min(n, start + step))
        kb.add(
            ids=[f"c{i}" for i in ids],
            embeddings=rng.normal(size=(len(ids), 384)).astype(np.float32),
            documents=[f"chunk {i}" for i in ids],
            metadatas=[
                {
                    "doc": f"s{i}",
                    "path": f"team{i % 10}/sub{i % 7}",
                    "readers": f"user:u{i % 50}",
                    "bots": "agent:a",
                }
                for i in ids
            ],
        )


async def sync_rate(
    g: Gateway, p: PrincipalContext, path: Path, n: int, full: bool = True
) -> dict[str, Any]:
    fill_fronted(path, n)
    mapping = {"document_id": "doc", "folder": "path", "viewers": "readers", "agents": "bots"}
    config = {"collection": "kb-bench", "path": str(path), "mapping": mapping}
    await g.register_source(p, "fronted", "chroma", config)
    started = time.perf_counter()
    first = await g.sync_source(p, "fronted")
    first_s = time.perf_counter() - started
    print(json.dumps({"first_sync_s": round(first_s, 1), "writes": first["writes"]}), flush=True)
    started = time.perf_counter()
    second = await g.sync_source(p, "fronted")
    second_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "documents": n,
        "first": {"seconds": round(first_s, 1), "writes": first["writes"]},
        "second": {
            "seconds": round(second_s, 1),
            "writes": second["writes"],
            "skipped": second["skipped"],
        },
    }
    print(json.dumps(result), flush=True)
    if full:
        started = time.perf_counter()
        again = await g.sync_source(p, "fronted", full=True)
        result["full"] = {
            "seconds": round(time.perf_counter() - started, 1),
            "writes": again["writes"],
            "unchanged": again["unchanged"],
        }
    return result


def qdrant_layouts(path: Path, n: int, tenants: int = 4, queries: int = 50) -> dict[str, Any]:
    """Query p50 and isolation of per-tenant collections vs one tenant-filtered collection."""
    from qdrant_client import QdrantClient, models

    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(n, 384)).astype(np.float32)
    owner = [f"t{i % tenants}" for i in range(n)]
    client = QdrantClient(path=str(path))
    params = models.VectorParams(size=384, distance=models.Distance.COSINE)
    client.create_collection("shared", vectors_config=params)
    client.create_payload_index("shared", "tenant", models.PayloadSchemaType.KEYWORD)
    for t in range(tenants):
        client.create_collection(f"own_t{t}", vectors_config=params)
    for start in range(0, n, 512):
        rows = range(start, min(n, start + 512))
        client.upsert(
            "shared",
            points=[
                models.PointStruct(id=i, vector=vectors[i].tolist(), payload={"tenant": owner[i]})
                for i in rows
            ],
        )
        for t in range(tenants):
            client.upsert(
                f"own_t{t}",
                points=[
                    models.PointStruct(
                        id=i, vector=vectors[i].tolist(), payload={"tenant": owner[i]}
                    )
                    for i in rows
                    if owner[i] == f"t{t}"
                ],
            )
    asks = rng.normal(size=(queries, 384)).astype(np.float32)
    result: dict[str, Any] = {"points": n, "tenants": tenants, "k": 10}
    for layout in ("collection_per_tenant", "shared_with_tenant_filter"):
        times, foreign = [], 0
        for q, vector in enumerate(asks):
            tenant = f"t{q % tenants}"
            started = time.perf_counter()
            if layout == "collection_per_tenant":
                found = client.query_points(f"own_{tenant}", query=vector.tolist(), limit=10)
            else:
                only = models.Filter(
                    must=[
                        models.FieldCondition(key="tenant", match=models.MatchValue(value=tenant))
                    ]
                )
                found = client.query_points(
                    "shared", query=vector.tolist(), query_filter=only, limit=10
                )
            times.append(time.perf_counter() - started)
            foreign += sum(1 for p in found.points if owner[int(p.id)] != tenant)
        result[layout] = {
            "p50_ms": round(1000 * float(np.median(times)), 2),
            "p95_ms": round(1000 * float(np.percentile(times, 95)), 2),
            "foreign_points_returned": foreign,
        }
    client.close()
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--sync-documents", type=int, default=10000)
    parser.add_argument(
        "--no-full-sync", action="store_true", help="skip the full sync (every document read)"
    )
    parser.add_argument(
        "--slice", type=int, default=500, help="documents per interleaved embed/ingest slice"
    )
    parser.add_argument("--qdrant-layouts", type=int, default=0, metavar="N")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    embeddings = default_embeddings()
    docs = corpus(args.documents)
    result: dict[str, Any] = {"documents": args.documents}
    with tempfile.TemporaryDirectory() as tmp:
        if args.qdrant_layouts:
            result["qdrant_layouts"] = qdrant_layouts(Path(tmp) / "qdrant", args.qdrant_layouts)
            print(json.dumps(result["qdrant_layouts"]), flush=True)
        # A generous OpenFGA deadline: a sync reads every document once, 16 at a time.
        settings = load_settings(data_dir=Path(tmp) / "data", openfga_timeout_s=60)
        g = await Gateway.start(settings, embeddings=embeddings)
        try:
            await g.create_tenant("bench", "admin")
            p = PrincipalContext("bench", "admin", "bench")
            if args.documents:
                result.update(await embed_vs_ingest(embeddings, g, p, docs, args.slice))
            if args.sync_documents:
                result["sync"] = await sync_rate(
                    g, p, Path(tmp) / "fronted", args.sync_documents, not args.no_full_sync
                )
        finally:
            await g.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
