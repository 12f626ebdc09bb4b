"""Ingestion and ACL-sync throughput, side by side with the embedding model's own.

    .venv/bin/python bench/ingest.py --documents 10000 --sync-documents 100000

In one run, on the same generated documents:

1. ``embed``: the embedding model alone (``embed_documents`` over every chunk text of
   the corpus, in the batches ingestion uses) -> chunks per second;
2. ``ingest``: end-to-end ``Gateway.ingest`` into embedded Chroma and a managed OpenFGA
   (chunking, embedding, store writes, tuples, catalog) -> chunks per second, and the
   ratio to (1);
3. ``sync``: a fronted Chroma collection of ``--sync-documents`` one-chunk documents,
   filled by plain chromadb with random vectors and ACL metadata, synced into OpenFGA
   (first run: every tuple written; second run: incremental, nothing changed; third:
   ``full``, every document read back from OpenFGA) -> seconds.

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


def embed_rate(embeddings: Any, docs: list[dict[str, Any]]) -> dict[str, float]:
    texts = [piece[2] for d in docs for piece in chunk_document(d["id"], d["text"])]
    started = time.perf_counter()
    for start in range(0, len(texts), 256):
        embeddings.embed_documents(texts[start : start + 256])
    seconds = time.perf_counter() - started
    return {
        "chunks": len(texts),
        "seconds": round(seconds, 2),
        "chunks_per_s": len(texts) / seconds,
    }


async def ingest_rate(
    g: Gateway, p: PrincipalContext, docs: list[dict[str, Any]]
) -> dict[str, float]:
    await g.register_source(p, "bench", "chroma", {})
    chunks = 0
    started = time.perf_counter()
    for start in range(0, len(docs), BATCH):
        chunks += (await g.ingest(p, "bench", docs[start : start + BATCH]))["chunks"]
    seconds = time.perf_counter() - started
    return {"chunks": chunks, "seconds": round(seconds, 2), "chunks_per_s": chunks / seconds}


def fill_fronted(path: Path, n: int) -> None:
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


async def sync_rate(g: Gateway, p: PrincipalContext, path: Path, n: int) -> dict[str, Any]:
    fill_fronted(path, n)
    mapping = {"document_id": "doc", "folder": "path", "viewers": "readers", "agents": "bots"}
    config = {"collection": "kb-bench", "path": str(path), "mapping": mapping}
    await g.register_source(p, "fronted", "chroma", config)
    started = time.perf_counter()
    first = await g.sync_source(p, "fronted")
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    second = await g.sync_source(p, "fronted")
    second_s = time.perf_counter() - started
    started = time.perf_counter()
    full = await g.sync_source(p, "fronted", full=True)
    full_s = time.perf_counter() - started
    return {
        "documents": n,
        "first": {"seconds": round(first_s, 1), "writes": first["writes"]},
        "second": {
            "seconds": round(second_s, 1),
            "writes": second["writes"],
            "skipped": second["skipped"],
        },
        "full": {
            "seconds": round(full_s, 1),
            "writes": full["writes"],
            "unchanged": full["unchanged"],
        },
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--sync-documents", type=int, default=10000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    embeddings = default_embeddings()
    docs = corpus(args.documents)
    result: dict[str, Any] = {"documents": args.documents}
    with tempfile.TemporaryDirectory() as tmp:
        # A generous OpenFGA deadline: a sync reads every document once, 16 at a time.
        settings = load_settings(data_dir=Path(tmp) / "data", openfga_timeout_s=60)
        g = await Gateway.start(settings, embeddings=embeddings)
        try:
            await g.create_tenant("bench", "admin")
            p = PrincipalContext("bench", "admin", "bench")
            if args.documents:
                result["embed"] = embed_rate(embeddings, docs)
                print(json.dumps(result["embed"]), flush=True)
                result["ingest"] = await ingest_rate(g, p, docs)
                result["ingest_vs_embed"] = (
                    result["ingest"]["chunks_per_s"] / result["embed"]["chunks_per_s"]
                )
            if args.sync_documents:
                result["sync"] = await sync_rate(g, p, Path(tmp) / "fronted", args.sync_documents)
        finally:
            await g.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    asyncio.run(main())
