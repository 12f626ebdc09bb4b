"""How much of an HNSW window can be trusted: Chroma's graph vs the connector's.

    .venv/bin/python bench/hnsw_recall.py [--size 10000] [--queries 30]

Builds throw-away Chroma collections from the retrieval benchmark's corpus generator
(``bench/retrieval.py``) with Chroma's default HNSW graph (16 neighbours,
ef_construction 100) and with the connector's (``connectors/chroma.py``), and reports,
for windows of n results, the recall of the exact top n/2 inside the window: the part
:class:`gateway.retrieval.PostFilter` trusts (``ANN_TRUST``). The retrieval benchmark
measures the consequence end to end; this script shows the cause.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import chromadb
import numpy as np
from chromadb.config import Settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import retrieval as corpus_generator  # noqa: E402

from connectors.chroma import (  # noqa: E402
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_MAX_NEIGHBORS,
)

GRAPHS = {"chroma default": (16, 100), "connector": (HNSW_MAX_NEIGHBORS, HNSW_EF_CONSTRUCTION)}
WINDOWS = (80, 250, 500, 1000)


def measure(path: str, neighbours: int, construction: int, size: int, queries: int) -> None:
    client = chromadb.PersistentClient(path=path, settings=Settings(anonymized_telemetry=False))
    hnsw = {
        "space": "cosine",
        "ef_search": HNSW_EF_SEARCH,
        "ef_construction": construction,
        "max_neighbors": neighbours,
    }
    collection = client.create_collection(
        f"graph-{neighbours}-{construction}", configuration={"hnsw": hnsw}, embedding_function=None
    )
    corpus = corpus_generator.build_corpus(size, 7)
    started = time.monotonic()
    for i in range(0, size, 5000):
        collection.add(
            ids=corpus.chunk_ids[i : i + 5000],
            embeddings=corpus.vectors[i : i + 5000],
            metadatas=[{"n": j} for j in range(i, min(size, i + 5000))],
        )
    built = time.monotonic() - started
    rng = np.random.default_rng(7 + 100 + size)  # the retrieval benchmark's queries
    vectors = corpus.centers[
        rng.integers(0, corpus_generator.CLUSTERS, queries)
    ] + corpus_generator.NOISE * rng.normal(size=(queries, corpus_generator.DIM))
    unit = corpus.vectors / np.linalg.norm(corpus.vectors, axis=1, keepdims=True)
    print(
        f"{neighbours} neighbours, ef_construction {construction}, ef_search "
        f"{HNSW_EF_SEARCH}: indexed {size:,} chunks in {built:.0f} s"
    )
    for n in WINDOWS:
        recalls, ms = [], []
        for q in vectors.astype(np.float32):
            t0 = time.perf_counter()
            found = collection.query(query_embeddings=[q], n_results=n, include=["distances"])
            ms.append((time.perf_counter() - t0) * 1000)
            exact = np.argsort(1.0 - unit @ (q / np.linalg.norm(q)))[: n // 2]
            wanted = {corpus.chunk_ids[j] for j in exact}
            recalls.append(len(wanted & set(found["ids"][0])) / len(wanted))
        misses = sum(1 for r in recalls if r < 1.0)
        print(
            f"  window {n:>4}: exact top {n // 2} found {statistics.fmean(recalls):.3f} "
            f"(worst query {min(recalls):.3f}, {misses} of {queries} queries miss one); "
            f"query p50 {statistics.median(ms):.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args()
    for neighbours, construction in GRAPHS.values():
        with tempfile.TemporaryDirectory() as path:
            measure(path, neighbours, construction, args.size, args.queries)


if __name__ == "__main__":
    main()
