"""Retrieval benchmark: strategies vs baselines against the real OpenFGA and Chroma.

    .venv/bin/python bench/retrieval.py            # 10k and 100k chunks (long)
    .venv/bin/python bench/retrieval.py --quick    # 10k only, fewer queries (minutes)

A synthetic multi-tenant corpus is generated (no embedding model: 384-dim clustered
float32 vectors written straight to Chroma as ChunkRecords), its relationships are
written to a managed OpenFGA (SQLite) in parallel streams of 100-tuple writes, and
four request profiles with exactly 50%, 10%, 1% and 0.1% of the tenant's chunks
permitted are measured. For each profile, every method runs the same queries:

- ``raw``: one unfiltered vector query for k, no authorization (leaks);
- ``naive``: that query, then one OpenFGA round trip per document (fewer than k);
- ``floor``: one unfiltered vector query plus one BatchCheck round trip, the least a
  correct retrieval can cost, measured in the same run;
- ``anchor``: auth0-ai-langchain's ``FGARetriever`` (bench/anchor.py, in its own
  virtualenv that this script creates from PyPI): the top k from the same Chroma
  collection, one BatchCheck of ``user_can_read`` per document, no refill;
- ``postfilter``, ``prefilter``, ``adaptive``: the gateway's strategies, configured
  and bounded as the gateway is by default (``gateway/settings.py``: 10 s per request,
  2 s per OpenFGA call, the exact decision cache); a request that fails closed counts
  as an error and as a query that returned nothing;
- ``adaptive-nocache``: the default strategy with every request demanding fresh
  answers (``Cache-Control: no-cache``): what the exact cache adds;
- ``adaptive-noscreen``: the default strategy asking every conjunct of every document
  in one round (no screen): what screening a task's documents adds;
- ``adaptive-nolist``: the default strategy without listed post-filters (a task too
  wide for the pre-filter is post-filtered by checks alone): what keeping its
  narrowest ListObjects answer adds.

The exact decision cache is emptied before every cell, and the warm-up queries are not
among the measured ones, so a cell measures one task's different queries (documents,
request-level checks and the task's ListObjects answers may repeat; queries do not).
After the profiles, the revoke -> first denial figure: warm requests, a grant deleted,
and the very next request must already deny (stale requests are counted).

Each (profile, method) cell runs ``--warmup`` queries, then up to ``--queries``
sequential queries (latency, recall, OpenFGA round trips; stopping after
``--cell-seconds`` once five are done), then the same number of requests from 8
concurrent clients (same time bound). Throughput with one client is the sequential run:
requests per second of busy time.

Recall@k is against an exact oracle (numpy over the permitted chunks, computed from the
generator's own description of the grants), tie-aware: a returned chunk counts when it
is permitted and no farther than the oracle's k-th distance + 1e-5 (Chroma ranks in
float32). Corpus and relationships are cached in ``--data-dir`` and reused when the
generator parameters match. Results go to docs/benchmarks.md between the
``bench:begin``/``bench:end`` markers; the rest of that file is left alone.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.base import ChunkRecord  # noqa: E402
from connectors.chroma import (  # noqa: E402
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_MAX_NEIGHBORS,
    ChromaStore,
    collection_name,
)
from gateway.catalog import SourceCatalog, open_catalog  # noqa: E402
from gateway.decision import plan_checks  # noqa: E402
from gateway.errors import ScopegateError  # noqa: E402
from gateway.fga import FgaClient, FgaStats, Tuple  # noqa: E402
from gateway.fga_server import CHECK_CACHE_TTL_S, ManagedOpenFGA, cache_quiet_s  # noqa: E402
from gateway.fga_server import REQUEST_TIMEOUT_S as REQUEST_TIMEOUT_S_FGA  # noqa: E402
from gateway.identity import DelegationContext  # noqa: E402
from gateway.retrieval import (  # noqa: E402
    Adaptive,
    PostFilter,
    PreFilter,
    RequestOptions,
    RetrievalOutcome,
    SourceHandle,
)
from gateway.settings import Settings  # noqa: E402

VERSION = 3  # bump when the generator changes: cached corpora and tuples are rebuilt
INDEX_VERSION = 2  # bump when the connector's collection settings change: chunks reloaded
DIM = 384
CHUNKS_PER_DOC = 5
TOP_FOLDERS = 50
LEAVES_PER_TOP = 20  # 1000 leaf folders: permitted fractions are exact multiples of 0.1%
CLUSTERS = 200
NOISE = 0.6
USERS = 200
GROUPS = 50
AGENTS = 20
OTHER_TENANT_SHARE = 0.05
EPS = 1e-5
TENANT = "acme"
OTHER = "globex"
METHODS = (
    "raw",
    "naive",
    "floor",
    "anchor",
    "postfilter",
    "prefilter",
    "adaptive",
    "adaptive-nocache",
    "adaptive-noscreen",
    "adaptive-nolist",
)
STRATEGIES = METHODS[METHODS.index("postfilter") :]  # the gateway's own
#: The baseline's package (its own virtualenv: it pins langchain-core < 0.4 and
#: openfga-sdk < 0.10) and the chromadb it reads the gateway's collections with.
ANCHOR_PACKAGES = ("auth0-ai-langchain==1.0.1",)
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
DEFAULTS = Settings.model_fields
REQUEST_TIMEOUT_S = float(DEFAULTS["request_timeout_s"].default)


# -- corpus ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """A request (user, agent, task) and the leaf folders it may read: exactly."""

    name: str
    selectivity: float
    user: str
    agent: str
    task: str
    leaves: frozenset[int]


def leaf(top: int, i: int) -> int:
    return top * LEAVES_PER_TOP + i


def profiles() -> list[Profile]:
    """Four profiles whose selectivity comes from different conjuncts.

    - 50%: task on the whole source; user reads half the top folders through a group.
    - 10%: task on 5 top folders; user and agent read everything (tenant-wide).
    - 1%: task on the source; user reads 5 top folders (10%), the agent 20 leaves (2%)
      of which 10 lie inside the user's: the intersection is 10 leaves.
    - 0.1%: task on one leaf folder; user and agent read everything.
    """
    half = frozenset(leaf(t, i) for t in range(25) for i in range(LEAVES_PER_TOP))
    tenth = frozenset(leaf(t, i) for t in range(5, 10) for i in range(LEAVES_PER_TOP))
    user_1 = frozenset(leaf(t, i) for t in range(10, 15) for i in range(LEAVES_PER_TOP))
    agent_1 = frozenset(leaf(10 + i % 5, i) for i in range(10)) | frozenset(
        leaf(30 + i % 5, i) for i in range(10)
    )
    return [
        Profile("50%", 0.5, "p50u", "p50a", "p50t", half),
        Profile("10%", 0.1, "p10u", "p10a", "p10t", tenth),
        Profile("1%", 0.01, "p1u", "p1a", "p1t", user_1 & agent_1),
        Profile("0.1%", 0.001, "p01u", "p01a", "p01t", frozenset({leaf(40, 7)})),
    ]


@dataclass
class Corpus:
    size: int
    source: str
    vectors: np.ndarray  # float32 (size, DIM), row i is chunk i of the tenant
    chunk_ids: list[str]
    leaf_of_chunk: np.ndarray  # leaf folder of each chunk
    centers: np.ndarray
    other: int  # chunks of the other tenant

    @property
    def documents(self) -> int:
        return self.size // CHUNKS_PER_DOC


def build_corpus(size: int, seed: int) -> Corpus:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(CLUSTERS, DIM)).astype(np.float32)
    documents = size // CHUNKS_PER_DOC
    cluster = rng.integers(0, CLUSTERS, documents)
    doc_of_chunk = np.repeat(np.arange(documents), CHUNKS_PER_DOC)
    vectors = centers[cluster[doc_of_chunk]] + NOISE * rng.normal(size=(size, DIM)).astype(
        np.float32
    )
    leaves = TOP_FOLDERS * LEAVES_PER_TOP
    leaf_of_doc = np.arange(documents) % leaves  # equal-size folders
    chunk_ids = [f"d{d:06d}#{c}" for d in range(documents) for c in range(CHUNKS_PER_DOC)]
    return Corpus(
        size,
        f"docs{size}",
        vectors.astype(np.float32),
        chunk_ids,
        leaf_of_doc[doc_of_chunk],
        centers,
        int(size * OTHER_TENANT_SHARE),
    )


def relationship_tuples(corpus: Corpus, seed: int) -> list[Tuple]:
    """Every tuple of both tenants: structure, memberships, grants, the four tasks."""
    rng = np.random.default_rng(seed + 1)
    out: list[Tuple] = []
    for tenant, documents in ((TENANT, corpus.documents), (OTHER, corpus.other // 5)):
        t = f"tenant:{tenant}"
        source = f"source:{tenant}/{corpus.source}"
        out.append(Tuple(t, "tenant", source))
        for top in range(TOP_FOLDERS):
            folder = f"folder:{tenant}/top{top}"
            out += [Tuple(t, "tenant", folder), Tuple(source, "parent", folder)]
            for i in range(LEAVES_PER_TOP):
                child = f"folder:{tenant}/leaf{leaf(top, i)}"
                out += [Tuple(t, "tenant", child), Tuple(folder, "parent", child)]
        leaves = TOP_FOLDERS * LEAVES_PER_TOP
        for d in range(documents):
            document = f"document:{tenant}/d{d:06d}"
            out += [
                Tuple(t, "tenant", document),
                Tuple(f"folder:{tenant}/leaf{d % leaves}", "parent", document),
            ]
        # Background population: users in groups, groups granted a few folders each.
        for u in range(USERS):
            user = f"user:{tenant}/user{u}"
            out.append(Tuple(user, "member", t))
            for g in rng.choice(GROUPS, size=int(rng.integers(1, 4)), replace=False):
                out.append(Tuple(user, "member", f"group:{tenant}/group{g}"))
        for a in range(AGENTS):
            out.append(Tuple(f"agent:{tenant}/agent{a}", "member", t))
        for g in range(GROUPS):
            for top in rng.choice(TOP_FOLDERS, size=3, replace=False):
                out.append(
                    Tuple(f"group:{tenant}/group{g}#member", "viewer", f"folder:{tenant}/top{top}")
                )
            for lf in rng.choice(leaves, size=10, replace=False):
                out.append(
                    Tuple(
                        f"group:{tenant}/group{g}#member",
                        "agent_viewer",
                        f"folder:{tenant}/leaf{lf}",
                    )
                )
    out += profile_tuples(corpus)
    return out


def profile_tuples(corpus: Corpus) -> list[Tuple]:
    t = f"tenant:{TENANT}"
    source = f"source:{TENANT}/{corpus.source}"

    def top(i: int) -> str:
        return f"folder:{TENANT}/top{i}"

    def lf(i: int) -> str:
        return f"folder:{TENANT}/leaf{i}"

    out: list[Tuple] = []
    p50, p10, p1, p01 = profiles()
    for p in (p50, p10, p1, p01):
        user, agent, task = (
            f"user:{TENANT}/{p.user}",
            f"agent:{TENANT}/{p.agent}",
            f"task:{TENANT}/{p.task}",
        )
        out += [
            Tuple(user, "member", t),
            Tuple(agent, "member", t),
            Tuple(t, "tenant", task),
            Tuple(t, "live", task),
            Tuple(user, "delegator", task),
            Tuple(agent, "executor", task),
        ]
    # 50%: group grant on 25 top folders; the agent reads the source; task = source.
    group = f"group:{TENANT}/half"
    out.append(Tuple(f"user:{TENANT}/{p50.user}", "member", group))
    out += [Tuple(f"{group}#member", "viewer", top(i)) for i in range(25)]
    out += [
        Tuple(f"agent:{TENANT}/{p50.agent}", "agent_viewer", source),
        Tuple(f"task:{TENANT}/{p50.task}", "scoped_task", source),
    ]
    # 10% and 0.1%: user and agent read the whole source; the task narrows.
    for p in (p10, p01):
        out += [
            Tuple(f"user:{TENANT}/{p.user}", "viewer", source),
            Tuple(f"agent:{TENANT}/{p.agent}", "agent_viewer", source),
        ]
    out += [Tuple(f"task:{TENANT}/{p10.task}", "scoped_task", top(i)) for i in range(5, 10)]
    # 1%: the user through 5 top folders, the agent through 20 leaves; task = source.
    out += [Tuple(f"user:{TENANT}/{p1.user}", "viewer", top(i)) for i in range(10, 15)]
    out += [
        Tuple(f"agent:{TENANT}/{p1.agent}", "agent_viewer", lf(i))
        for i in sorted(
            {leaf(10 + i % 5, i) for i in range(10)} | {leaf(30 + i % 5, i) for i in range(10)}
        )
    ]
    out.append(Tuple(f"task:{TENANT}/{p1.task}", "scoped_task", source))
    # 0.1%: the task on one leaf folder.
    out.append(Tuple(f"task:{TENANT}/{p01.task}", "scoped_task", lf(leaf(40, 7))))
    return out


# -- loading --------------------------------------------------------------------------


async def load_fga(fga: FgaClient, tuples: list[Tuple], streams: int = 4) -> float:
    """Write in ``streams`` parallel sequences of 100-tuple transactions."""
    started = time.monotonic()
    batches = [tuples[i : i + 100] for i in range(0, len(tuples), 100)]
    queue: asyncio.Queue[list[Tuple]] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)

    async def worker() -> None:
        while not queue.empty():
            await fga.write(queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(streams)))
    return time.monotonic() - started


async def load_chroma(store: ChromaStore, corpus: Corpus, seed: int) -> float:
    started = time.monotonic()
    batch = 5000
    for i in range(0, corpus.size, batch):
        rows = range(i, min(corpus.size, i + batch))
        await store.upsert(
            TENANT,
            corpus.source,
            [
                ChunkRecord(
                    corpus.chunk_ids[r],
                    corpus.chunk_ids[r].split("#")[0],
                    TENANT,
                    corpus.source,
                    f"chunk {corpus.chunk_ids[r]}",
                    corpus.vectors[r].tolist(),
                )
                for r in rows
            ],
        )
    rng = np.random.default_rng(seed + 2)
    other = corpus.centers[rng.integers(0, CLUSTERS, corpus.other)] + NOISE * rng.normal(
        size=(corpus.other, DIM)
    ).astype(np.float32)
    for i in range(0, corpus.other, batch):
        await store.upsert(
            OTHER,
            corpus.source,
            [
                ChunkRecord(
                    f"d{r // 5:06d}#{r % 5}",
                    f"d{r // 5:06d}",
                    OTHER,
                    corpus.source,
                    "other tenant",
                    other[r].tolist(),
                )
                for r in range(i, min(corpus.other, i + batch))
            ],
        )
    return time.monotonic() - started


async def prepare(
    args: argparse.Namespace, size: int, url: str, chroma: ChromaStore, log: Callable[[str], None]
) -> tuple[Corpus, FgaClient, dict[str, Any]]:
    corpus = build_corpus(size, args.seed)
    name = f"bench-{size}-{args.seed}-v{VERSION}"
    manifest_path = Path(args.data_dir) / f"{name}.json"
    fga = FgaClient(url, timeout_s=60.0)  # generous while loading (a busy machine)
    await fga.ensure_store_and_model(name)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    chunks_ok = (
        await chroma.count(TENANT, corpus.source) == size
        and manifest.get("index_version", 1) == INDEX_VERSION
    )
    tuples_ok = bool(manifest.get("fga_loaded"))
    if not (chunks_ok and tuples_ok):
        log(
            f"loading {size} chunks into Chroma ({'cached' if chunks_ok else 'new'}) and "
            f"their tuples into OpenFGA ({'cached' if tuples_ok else 'new'}) ..."
        )
        tuples = relationship_tuples(corpus, args.seed)

        async def chunks() -> float:
            await chroma.drop(TENANT, corpus.source)
            await chroma.drop(OTHER, corpus.source)
            return await load_chroma(chroma, corpus, args.seed)

        fga_s, chroma_s = await asyncio.gather(
            asyncio.sleep(0, manifest.get("fga_load_s")) if tuples_ok else load_fga(fga, tuples),
            asyncio.sleep(0, manifest.get("chroma_load_s")) if chunks_ok else chunks(),
        )
        manifest = {
            "fga_loaded": True,
            "tuples": len(tuples),
            "fga_load_s": round(fga_s, 1),
            "chroma_load_s": round(chroma_s, 1),
            "store_id": fga.store_id,
            "index_version": INDEX_VERSION,
        }
        manifest_path.write_text(json.dumps(manifest))
        log(f"loaded: {len(tuples)} tuples in {fga_s:.0f}s, chunks in {chroma_s:.0f}s")
    await fga.close()
    # Requests are measured with the gateway's own client settings (gateway/settings.py).
    measuring = FgaClient(
        url,
        fga.store_id,
        fga.model_id,
        timeout_s=DEFAULTS["openfga_timeout_s"].default,
        max_parallel_batches=DEFAULTS["openfga_max_parallel_batches"].default,
        consistency=DEFAULTS["openfga_consistency"].default,
        exact_cache=DEFAULTS["decision_cache_exact"].default,
        # The managed OpenFGA runs its check cache, trusted under the gateway's rule.
        server_cache_quiet_s=cache_quiet_s(CHECK_CACHE_TTL_S, REQUEST_TIMEOUT_S_FGA),
    )
    return corpus, measuring, manifest


# -- the auth0-ai-langchain baseline ----------------------------------------------------


def anchor_python(data: Path, log: Callable[[str], None]) -> Path | None:
    """The baseline's virtualenv (created from PyPI on first use), or None."""
    import chromadb

    venv = data.parent / "anchor-venv"
    python = venv / "bin" / "python"
    wanted = [*ANCHOR_PACKAGES, f"chromadb=={chromadb.__version__}"]
    marker = venv / "scopegate-anchor.json"
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return python
    log(f"creating the baseline's virtualenv {venv} ({', '.join(wanted)}) ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        log(f"baseline unavailable: {exc}")
        return None
    marker.write_text(json.dumps(wanted))
    return python


class Anchor:
    """bench/anchor.py in the baseline's virtualenv, one request at a time."""

    def __init__(self, python: Path, chroma_dir: Path, corpus: Corpus, fga: FgaClient) -> None:
        self.process = subprocess.Popen(
            [
                str(python),
                str(ROOT / "bench" / "anchor.py"),
                "--chroma",
                str(chroma_dir),
                "--collection",
                collection_name(TENANT, corpus.source),
                "--fga-url",
                fga.api_url,
                "--store",
                fga.store_id,
                "--model",
                fga.model_id,
                "--tenant",
                TENANT,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"baseline did not start: {ready}")

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("baseline process ended")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def retrieve(self, user: str, vector: np.ndarray, k: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(
            json.dumps({"user": user, "vector": vector.tolist(), "k": k}) + "\n"
        )
        self.process.stdin.flush()
        return await asyncio.to_thread(self._read)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- oracle ---------------------------------------------------------------------------


@dataclass
class Oracle:
    corpus: Corpus
    unit: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        v = self.corpus.vectors.astype(np.float32)
        self.unit = v / np.linalg.norm(v, axis=1, keepdims=True)

    def top(self, query: np.ndarray, mask: np.ndarray, k: int) -> tuple[list[str], float]:
        """Exact top-k permitted chunk ids, ties by chunk id, and the k-th distance."""
        rows = np.flatnonzero(mask)
        q = query / np.linalg.norm(query)
        distances = 1.0 - (self.unit[rows] @ q).astype(np.float64)
        ids = np.asarray(self.corpus.chunk_ids)[rows]
        order = np.lexsort((ids, distances))[:k]
        kth = float(distances[order[-1]]) if len(order) else 0.0
        return [str(ids[i]) for i in order], kth

    def distance(self, query: np.ndarray, chunk_id: str) -> float:
        d, c = chunk_id.split("#")
        row = int(d[1:]) * CHUNKS_PER_DOC + int(c)
        return float(1.0 - self.unit[row] @ (query / np.linalg.norm(query)))


def recall(
    oracle: Oracle,
    query: np.ndarray,
    permitted: set[str],
    k: int,
    returned: Sequence[str],
    expected: tuple[list[str], float],
) -> tuple[float, int]:
    """(tie-aware recall@k, chunks returned that are not permitted)."""
    ids, kth = expected
    leaks = sum(1 for c in returned if c not in permitted)
    if not ids:
        return 1.0, leaks
    good = sum(1 for c in returned[:k] if c in permitted and oracle.distance(query, c) <= kth + EPS)
    return min(1.0, good / len(ids)), leaks


# -- methods --------------------------------------------------------------------------

Run = Callable[[np.ndarray], Awaitable[tuple[list[str], int, str]]]


@dataclass
class Sample:
    ms: float
    recall: float
    leaks: int
    rounds: int
    calls: int
    checks: int
    strategy: str
    error: str | None = None
    cached: int = 0


@dataclass
class Budget:
    """How much of one (profile, method) cell is measured: ``queries`` sequential
    requests, stopping early once ``seconds`` have passed and ``floor`` are done; then
    ``queries`` requests (same stop rule) from each concurrency level."""

    queries: int
    seconds: float
    floor: int = 5


class Bench:
    def __init__(
        self,
        fga: FgaClient,
        chroma: ChromaStore,
        corpus: Corpus,
        k: int,
        anchor: Anchor | None = None,
        catalog: SourceCatalog | None = None,
    ) -> None:
        self.fga = fga
        self.chroma = chroma
        self.corpus = corpus
        self.k = k
        self.anchor = anchor
        #: Set by a method that times itself (the baseline, in its own process).
        self.reported_ms: float | None = None
        self.anchor_checks = 0
        #: Per strategy request, ms spent in each phase (logged per cell: where time goes).
        self.phases: list[dict[str, float]] = []
        #: When the last cell that sent checks to OpenFGA ended (monotonic).
        self.checked_until: float | None = None
        # The content versions come from a catalog, as the gateway's do: the store keeps
        # the vectors it read for documents whose version stays the same.
        versions = (
            None
            if catalog is None
            else functools.partial(catalog.content_versions, TENANT, source=corpus.source)
        )
        self.handle = SourceHandle(
            TENANT, corpus.source, chroma, corpus.documents, exact=False, versions=versions
        )
        # Configured as the gateway is by default (gateway/settings.py).
        post = PostFilter(fga, DEFAULTS["overfetch"].default, DEFAULTS["max_candidates"].default)
        pre = PreFilter(
            fga,
            post,
            DEFAULTS["prefilter_max_documents"].default,
            listed_max=DEFAULTS["listed_max_documents"].default,
        )
        self.strategies: dict[str, Any] = {
            "postfilter": post,
            "prefilter": pre,
            "adaptive": Adaptive(post, pre),
            # Its own statistics: what it learns must not steer the cached one.
            "adaptive-nocache": Adaptive(post, pre),
            # Every conjunct of every document in one round, as before screens.
            "adaptive-noscreen": Adaptive(post, pre, screening=False),
            # A task too wide for the pre-filter post-filtered by checks alone.
            "adaptive-nolist": Adaptive(post, pre, listing=False),
        }

    async def forget_checks(self, log: Callable[[str], None]) -> None:
        """Wait until OpenFGA's check cache has dropped what the previous cell asked.

        Every method asks about the same queries' documents: without this wait a cell
        run within the cache's TTL of the one before it reads that cell's answers (the
        floor after ``naive``, adaptive after the post-filter) and looks cheaper than
        it is. Each cell starts as the first to ask about its queries' documents."""
        if self.checked_until is None or self.fga.server_cache_quiet_s is None:
            return
        wait = self.checked_until + CHECK_CACHE_TTL_S + 0.5 - time.monotonic()
        if wait > 0:
            log(f"  waiting {wait:.0f} s: OpenFGA's check cache forgets the last cell's answers")
            await asyncio.sleep(wait)

    def method(self, name: str, ctx: DelegationContext) -> Run:
        """An async callable: query vector -> (chunk ids, sequential FGA rounds, label)."""
        k, source = self.k, self.corpus.source

        async def raw(v: np.ndarray) -> tuple[list[str], int, str]:
            found = await self.chroma.search(TENANT, source, v, k)
            return [c.chunk_id for c in found], 0, "raw"

        async def naive(v: np.ndarray) -> tuple[list[str], int, str]:
            # One round trip per distinct document, in rank order; the request-level
            # checks ride along with the first.
            found = await self.chroma.search(TENANT, source, v, k)
            allowed: dict[str, bool] = {}
            for c in found:
                doc = str(c.document_id)
                if doc not in allowed:
                    items = plan_checks(ctx, [doc], include_request=not allowed)
                    answers = await self.fga.batch_check(items)
                    allowed[doc] = all(a.allowed is True for a in answers.values())
            kept = [c.chunk_id for c in found if allowed[str(c.document_id)]]
            return kept, len(allowed), "naive"

        async def floor(v: np.ndarray) -> tuple[list[str], int, str]:
            # The least a correct retrieval costs: one vector query for k and one
            # BatchCheck round (request checks + the documents of those k chunks). It
            # may use OpenFGA's check cache whenever the server has one, without the
            # gateway's quiet-time rule: a lower bound, never a fair fight.
            found = await self.chroma.search(TENANT, source, v, k)
            items = plan_checks(ctx, [str(c.document_id) for c in found])
            server_cache = self.fga.server_cache_quiet_s is not None
            answers = await self.fga.batch_check(items, server_cache=server_cache)
            denied = {i.document_id for i, a in answers.items() if a.allowed is not True}
            return [c.chunk_id for c in found if c.document_id not in denied], 1, "floor"

        async def anchor(v: np.ndarray) -> tuple[list[str], int, str]:
            assert self.anchor is not None
            answer = await self.anchor.retrieve(f"user:{TENANT}/{ctx.user}", v, k)
            if "error" in answer:
                raise ScopegateError(f"baseline failed: {answer['error']}")
            self.reported_ms = float(answer["ms"])
            self.anchor_checks = int(answer["checks"])
            return list(answer["ids"]), 1, "anchor"

        def strategy(s: Any, consistency: str | None) -> Run:
            async def run(v: np.ndarray) -> tuple[list[str], int, str]:
                # The gateway's request deadline (request_timeout_s): past it the
                # request fails closed and returns nothing.
                options = RequestOptions(time.monotonic() + REQUEST_TIMEOUT_S, consistency)
                out: RetrievalOutcome = await s.retrieve(ctx, v, k, [self.handle], options)
                spent: dict[str, float] = {}
                for phase in out.phases:
                    spent[phase.name] = spent.get(phase.name, 0.0) + phase.ms
                self.phases.append(spent)
                if os.environ.get("SCOPEGATE_BENCH_TRACE"):  # why each request went its way
                    shown = " ".join(f"{n}={ms:.0f}" for n, ms in spent.items())
                    print(f"    {out.strategy}: {' | '.join(out.notes)} [{shown}]", flush=True)
                rounds = out.batch_rounds + (1 if out.list_objects_calls else 0)
                return [c.chunk_id for c in out.chunks], rounds, out.strategy

            return run

        table: dict[str, Run] = {"raw": raw, "naive": naive, "floor": floor, "anchor": anchor}
        if name in table:
            return table[name]
        # adaptive-nocache: every request demands fresh answers (Cache-Control: no-cache).
        fresh = "HIGHER_CONSISTENCY" if name.endswith("-nocache") else None
        return strategy(self.strategies[name], fresh)


async def attempt(run: Run, query: np.ndarray) -> tuple[list[str], int, str, str | None]:
    """One request; a gateway error (fail closed: nothing returned) is a result."""
    try:
        ids, rounds, label = await run(query)
    except ScopegateError as exc:
        return [], 0, "error", f"{type(exc).__name__}: {exc.message}"
    return ids, rounds, label, None


async def measure(
    bench: Bench,
    oracle: Oracle,
    profile: Profile,
    queries: np.ndarray,
    warmup: int,
    concurrency: Sequence[int],
    budget: Budget,
    log: Callable[[str], None],
    methods: Sequence[str] = METHODS,
) -> dict[str, dict[str, Any]]:
    ctx = DelegationContext(TENANT, profile.user, profile.agent, profile.task, "bench", 0)
    mask = np.isin(bench.corpus.leaf_of_chunk, list(profile.leaves))
    permitted = set(np.asarray(bench.corpus.chunk_ids)[mask].tolist())
    expected = [oracle.top(q, mask, bench.k) for q in queries[warmup:]]
    results: dict[str, dict[str, Any]] = {}
    measured = queries[warmup:]
    for name in methods:
        if name == "anchor" and bench.anchor is None:
            continue
        if name != "raw":
            await bench.forget_checks(log)
        run = bench.method(name, ctx)
        if bench.fga.cache is not None:
            bench.fga.cache.invalidate()  # every cell starts with an empty cache
        bench.chroma.vector_cache.forget(TENANT, bench.corpus.source)  # and no vectors kept
        started = time.monotonic()
        for q in queries[:warmup]:  # never among the measured queries
            await attempt(run, q)
        samples: list[Sample] = []
        bench.phases = []
        for q, exp in zip(measured[: budget.queries], expected, strict=False):
            if len(samples) >= budget.floor and time.monotonic() - started > budget.seconds:
                break
            before = bench.fga.stats.snapshot()
            bench.reported_ms = None
            t0 = time.perf_counter()
            ids, rounds, label, error = await attempt(run, q)
            ms = (time.perf_counter() - t0) * 1000
            if bench.reported_ms is not None:
                ms = bench.reported_ms
            spent: FgaStats = bench.fga.stats.since(before)
            r, leaks = recall(oracle, q, permitted, bench.k, ids, exp)
            checks = bench.anchor_checks if name == "anchor" else spent.checks_sent
            calls = 1 if name == "anchor" else spent.batch_check_calls + spent.list_objects_calls
            samples.append(
                Sample(
                    ms,
                    r,
                    leaks,
                    rounds,
                    calls,
                    checks,
                    label,
                    error,
                    spent.cache_hits + spent.list_cache_hits,
                )
            )
        # One client: the sequential run above, requests per second of busy time.
        qps: dict[int, float] = {1: 1000 * len(samples) / sum(s.ms for s in samples)}
        errors = {1: sum(1 for s in samples if s.error)}
        for c in concurrency:
            if c > 1 and name != "anchor":  # the baseline serves one request at a time
                qps[c], errors[c] = await throughput(run, measured, c, budget)
            elif c > 1:
                qps[c], errors[c] = math.nan, 0
        phases = bench.phases[: len(samples)]
        results[name] = summarize(samples, qps, errors)
        names = sorted({n for spent in phases for n in spent})
        where = " ".join(
            f"{n}={statistics.median(spent.get(n, 0.0) for spent in phases):.1f}" for n in names
        )
        if name != "raw":
            bench.checked_until = time.monotonic()
        log(
            f"  {profile.name} {name}: n={len(samples)} p50={results[name]['p50']:.1f}ms "
            f"recall={results[name]['recall']:.3f} errors={errors} "
            f"({time.monotonic() - started:.0f}s)" + (f" phases p50 ms: {where}" if where else "")
        )
    return results


async def revoke_trials(bench: Bench, queries: np.ndarray, trials: int) -> dict[str, Any]:
    """Revoke -> first denial with the gateway's default strategy and cache.

    Each trial warms the cache for a 50% request (the second identical request is
    answered mostly from the cache), deletes the group grant on the top folder of its
    first chunk, and retrieves again at once, up to five times: every answer that
    still holds a chunk of that folder is a stale request. The grant is then restored.
    """
    p50 = profiles()[0]
    ctx = DelegationContext(TENANT, p50.user, p50.agent, p50.task, "bench", 0)
    run = bench.method("adaptive", ctx)

    def top(chunk: str) -> int:
        return (int(chunk.split("#")[0][1:]) % (TOP_FOLDERS * LEAVES_PER_TOP)) // LEAVES_PER_TOP

    stale, firsts, hits = 0, [], []
    for i in range(trials):
        q = queries[i % len(queries)]
        await attempt(run, q)
        before = bench.fga.stats.snapshot()
        ids = (await attempt(run, q))[0]
        hits.append(bench.fga.stats.since(before).cache_hits)
        folder = top(ids[0])
        grant = Tuple(f"group:{TENANT}/half#member", "viewer", f"folder:{TENANT}/top{folder}")
        await bench.fga.write(deletes=[grant])
        try:
            for n in range(5):
                t0 = time.perf_counter()
                after = (await attempt(run, q))[0]
                if n == 0:
                    firsts.append((time.perf_counter() - t0) * 1000)
                if not any(top(c) == folder for c in after):
                    break
                stale += 1
        finally:
            await bench.fga.write(writes=[grant])
    return {
        "trials": trials,
        "stale": stale,
        "p50": statistics.median(firsts),
        "max": max(firsts),
        "hits": statistics.median(hits),
    }


async def throughput(
    run: Run, queries: np.ndarray, clients: int, budget: Budget
) -> tuple[float, int]:
    """``clients`` closed-loop clients over the queries: (requests/s, failed requests)."""
    total = max(budget.queries, clients)
    issued = done = errors = 0
    started = time.perf_counter()

    async def client() -> None:
        nonlocal issued, done, errors
        while issued < total:
            if issued >= clients and time.perf_counter() - started > budget.seconds:
                return
            q = queries[issued % len(queries)]
            issued += 1
            error = (await attempt(run, q))[3]
            done += 1
            errors += error is not None

    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - started), errors


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]


def summarize(
    samples: list[Sample], qps: dict[int, float], errors: dict[int, int]
) -> dict[str, Any]:
    ms = [s.ms for s in samples]
    failures = Counter(s.error for s in samples if s.error)
    return {
        "n": len(samples),
        "p50": statistics.median(ms),
        "p95": pct(ms, 0.95),
        "recall": statistics.fmean(s.recall for s in samples),
        "recall_min": min(s.recall for s in samples),
        "leaks": sum(s.leaks for s in samples),
        "rounds": statistics.median(s.rounds for s in samples),
        "rounds_max": max(s.rounds for s in samples),
        "rounds_within_2": sum(1 for s in samples if s.rounds <= 2),
        "calls": statistics.median(s.calls for s in samples),
        "calls_max": max(s.calls for s in samples),
        "checks": statistics.median(s.checks for s in samples),
        "cached": statistics.median(s.cached for s in samples),
        "qps": qps,
        "errors": errors,
        "failures": dict(failures),
        "strategies": dict(Counter(s.strategy for s in samples)),
    }


# -- report ---------------------------------------------------------------------------

Results = dict[str, dict[str, dict[str, Any]]]  # selectivity -> method -> figures


def machine_notes(load_before: tuple[float, float, float]) -> list[str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import chromadb

    load_after = os.getloadavg()
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores, shared with other work while measuring "
        f"(1-minute load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} "
        "at the end)",
        f"- Python {platform.python_version()}, chromadb {chromadb.__version__} (embedded, "
        f"persistent; HNSW {HNSW_MAX_NEIGHBORS} neighbours, ef_construction "
        f"{HNSW_EF_CONSTRUCTION}, ef_search {HNSW_EF_SEARCH}); OpenFGA from "
        "`.tools/bin/openfga` managed on SQLite on the same machine",
        "- the gateway's defaults: one FgaClient (one connection pool, at most "
        f"{DEFAULTS['openfga_max_parallel_batches'].default} BatchCheck calls in flight, 50 "
        f"checks per call, {DEFAULTS['openfga_timeout_s'].default:g} s per OpenFGA call), "
        f"{DEFAULTS['openfga_consistency'].default}, {REQUEST_TIMEOUT_S:g} s per request "
        "(a request past it fails closed and counts as an error), the exact decision cache "
        "(one ReadChanges probe per request; emptied before every cell); OpenFGA's check "
        f"query cache on ({CHECK_CACHE_TTL_S:g} s TTL), asked for once the change log has "
        "been quiet long enough (docs/cache.md; the run waits that out once before its first "
        "cell, and nothing is written while cells run); every cell that asks OpenFGA "
        "starts a TTL after the last one ended, so none reads another's answers. "
        "`floor`, `naive` and the anchor reach the same OpenFGA; `floor` asks its cache "
        "whenever it is on. `adaptive-nocache` sends every check to OpenFGA as "
        "HIGHER_CONSISTENCY",
        "- `anchor`: auth0-ai-langchain " + ANCHOR_PACKAGES[0].split("==")[1] + " "
        "`FGARetriever` in its own virtualenv (langchain-core < 0.4, openfga-sdk < 0.10), "
        "same OpenFGA store and Chroma collection; its p50 is timed inside its process",
    ]


def table(size: int, res: Results, k: int, concurrency: Sequence[int]) -> list[str]:
    qps_head = " | ".join(f"QPS c={c}" for c in concurrency)
    head = (
        f"| selectivity | method | n | recall@{k} (min) | errors | p50 ms | p95 ms "
        f"| FGA rounds (max) | FGA calls | checks | cached | {qps_head} | x floor | x raw "
        "| chosen |"
    )
    lines = [f"### {size:,} chunks", "", head, "|" + "---|" * (14 + len(concurrency))]
    for sel, methods in res.items():
        floor, raw = methods["floor"]["p50"], methods["raw"]["p50"]
        for name, m in methods.items():
            chosen = (
                ", ".join(f"{s.split(':')[-1]} {n}" for s, n in m["strategies"].items())
                if name in STRATEGIES
                else ""
            )
            rec = f"{m['recall']:.3f} ({m['recall_min']:.3f})"
            if m["leaks"]:
                rec += f", {m['leaks']} leaked"
            errors = "/".join(str(m["errors"][c]) for c in concurrency)
            qps = " | ".join(
                "n/a" if math.isnan(m["qps"][c]) else f"{m['qps'][c]:.1f}" for c in concurrency
            )
            lines.append(
                f"| {sel} | {name} | {m['n']} | {rec} | {errors} | {m['p50']:.1f} | "
                f"{m['p95']:.1f} | {m['rounds']:g} ({m['rounds_max']}) | {m['calls']:g} | "
                f"{m['checks']:g} | {m['cached']:g} | {qps} | {m['p50'] / floor:.2f} | "
                f"{m['p50'] / raw:.1f} | {chosen} |"
            )
    return [*lines, ""]


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def targets(all_res: dict[int, Results], revoke: dict[str, Any] | None = None) -> list[str]:
    """The performance targets, evaluated for the gateway's default strategy (adaptive)."""
    out = []
    for size, res in all_res.items():
        a = {sel: m["adaptive"] for sel, m in res.items()}
        for sel, m in res.items():
            if "anchor" not in m:
                continue
            mine, anchor = m["adaptive"], m["anchor"]
            ok = mine["p50"] <= anchor["p50"] and mine["recall_min"] >= 1.0 and mine["leaks"] == 0
            out.append(
                f"- {size:,} {sel}: as fast as the anchor with full recall: adaptive p50 "
                f"{mine['p50']:.1f} ms (recall {mine['recall_min']:.3f}, {mine['leaks']} "
                f"leaked, {mine['checks']:g} checks) vs anchor {anchor['p50']:.1f} ms "
                f"(recall {anchor['recall']:.3f}, {anchor['leaks']} leaked, "
                f"{anchor['checks']:g} checks) = {mine['p50'] / anchor['p50']:.2f}x: "
                f"{verdict(ok)}"
            )
        for sel, m in res.items():
            ratio = m["adaptive"]["p50"] / m["floor"]["p50"]
            out.append(
                f"- {size:,} {sel}: adaptive p50 {m['adaptive']['p50']:.1f} ms = "
                f"{ratio:.2f}x the floor {m['floor']['p50']:.1f} ms (target <= 1.5x; "
                f"checks {m['adaptive']['checks']:g} vs {m['floor']['checks']:g}): "
                f"{verdict(ratio <= 1.5)}"
            )
        for name in (n for n in STRATEGIES if all(n in m for m in res.values())):
            worst = min(m[name]["recall_min"] for m in res.values())
            leaks = sum(m[name]["leaks"] for m in res.values())
            failed = sum(m[name]["errors"][1] for m in res.values())
            where = ", ".join(
                f"{sel} {m[name]['recall_min']:.3f}"
                for sel, m in res.items()
                if m[name]["recall_min"] < 1.0
            )
            out.append(
                f"- {size:,}: recall@k = 1.000 for every {name} query: worst "
                f"{worst:.3f}{f' ({where})' if where else ''}, {leaks} leaked, "
                f"{failed} failed closed: {verdict(worst >= 1.0)}"
            )
        for sel, limit in (("50%", 1.5), ("10%", 1.5), ("1%", 3.0), ("0.1%", 3.0)):
            if sel not in res:
                continue
            ratio = a[sel]["p50"] / res[sel]["raw"]["p50"]
            floor = a[sel]["p50"] / res[sel]["floor"]["p50"]
            out.append(
                f"- {size:,} {sel}: adaptive p50 {a[sel]['p50']:.1f} ms = {ratio:.1f}x raw "
                f"(target <= {limit}x): {verdict(ratio <= limit)}; {floor:.2f}x the floor"
            )
        for sel in (s for s in ("50%", "10%") if s in res):
            m = a[sel]
            out.append(
                f"- {size:,} {sel}: adaptive OpenFGA round trips per request (sequential) "
                f"median {m['rounds']:g}, max {m['rounds_max']}, "
                f"{m['rounds_within_2']} of {m['n']} within 2 (target <= 2): "
                f"{verdict(m['rounds_max'] <= 2)}; HTTP calls median {m['calls']:g}, "
                f"max {m['calls_max']}"
            )
        if "0.1%" not in a or "10%" not in a:
            continue
        ratio = a["0.1%"]["p95"] / a["10%"]["p95"]
        out.append(
            f"- {size:,}: adaptive p95 at 0.1% / p95 at 10% = {a['0.1%']['p95']:.1f} / "
            f"{a['10%']['p95']:.1f} ms = {ratio:.2f} (target <= 3): {verdict(ratio <= 3)}"
        )
    sizes = sorted(all_res)
    if len(sizes) > 1:
        small, big = all_res[sizes[0]], all_res[sizes[-1]]
        grow = sizes[-1] / sizes[0]
        for sel in (s for s in small if s in big):
            r = big[sel]["adaptive"]["p50"] / small[sel]["adaptive"]["p50"]
            raw = big[sel]["raw"]["p50"] / small[sel]["raw"]["p50"]
            out.append(
                f"- {sizes[0]:,} -> {sizes[-1]:,} chunks ({grow:g}x) at {sel}: adaptive "
                f"p50 x{r:.2f} (raw query x{raw:.2f}): {verdict(r < grow)} (sub-linear)"
            )
    if revoke is not None:
        out.append(
            f"- revoke -> first denial, default configuration (exact cache): "
            f"{revoke['trials']} trials, {revoke['stale']} stale requests (target 0), "
            f"first request after the revoke answered in median {revoke['p50']:.1f} ms "
            f"(max {revoke['max']:.1f} ms) with {revoke['hits']:g} cache hits before "
            f"the revoke: {verdict(revoke['stale'] == 0)}"
        )
    return out


def write_report(
    path: Path,
    command: str,
    notes: list[str],
    sections: list[str],
    target_lines: list[str],
    summary: str,
    elapsed_s: float,
) -> None:
    block = "\n".join(
        [
            BEGIN,
            f"Command: `{command}`  ",
            f"Run: {time.strftime('%Y-%m-%d %H:%M %Z')}, {elapsed_s / 60:.1f} minutes end to end "
            "(corpora cached from earlier runs are reused)",
            "",
            *notes,
            "",
            *sections,
            "Targets, evaluated by the script from the figures above:",
            "",
            *target_lines,
            "",
            f"Summary: `{summary}`",
            END,
        ]
    )
    text = path.read_text() if path.exists() else f"# Retrieval benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text += "\n" + block + "\n"
    path.write_text(text)


def one_line(all_res: dict[int, Results], k: int) -> str:
    parts = []
    for size, res in all_res.items():
        ran = [s for s in STRATEGIES if all(s in m for m in res.values())]
        worst = "/".join(f"{min(m[s]['recall_min'] for m in res.values()):.3f}" for s in ran)
        cells = " ".join(
            f"{sel}={m['adaptive']['p50']:.0f}ms/{m['adaptive']['p50'] / m['floor']['p50']:.1f}"
            "xfloor"
            + (f"/{m['adaptive']['p50'] / m['anchor']['p50']:.2f}xanchor" if "anchor" in m else "")
            for sel, m in res.items()
        )
        parts.append(
            f"{size // 1000}k: recall@{k} min {'/'.join(ran)} {worst}, adaptive p50 {cells}"
        )
    return "bench: " + "; ".join(parts)


# -- main -----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k chunks only, fewer queries")
    parser.add_argument("--sizes", default=None, help="comma-separated chunk counts")
    parser.add_argument("--queries", type=int, default=None, help="measured queries per cell")
    parser.add_argument(
        "--cell-seconds",
        type=float,
        default=None,
        help="stop a cell's sequential or concurrent run after this long "
        "(at least 5 sequential queries are measured)",
    )
    parser.add_argument(
        "--profiles",
        default=None,
        help="comma-separated selectivities to measure (50%%,10%%,1%%,0.1%%; default all)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data-dir", default=str(ROOT / "bench" / "results" / "data"))
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="methods to measure (raw, floor and adaptive always run)",
    )
    parser.add_argument(
        "--revoke-trials", type=int, default=10, help="revoke -> first denial trials (0: none)"
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("10000" if args.quick else "10000,100000")).split(",")]
    budget = Budget(
        args.queries or (10 if args.quick else 30),
        args.cell_seconds or (8.0 if args.quick else 20.0),
    )
    concurrency = [int(c) for c in args.concurrency.split(",")]
    if 1 not in concurrency:
        concurrency.insert(0, 1)
    command = " ".join([".venv/bin/python", "bench/retrieval.py", *sys.argv[1:]])
    asyncio.run(run(args, sizes, concurrency, budget, command))


async def run(
    args: argparse.Namespace, sizes: list[int], concurrency: list[int], budget: Budget, command: str
) -> None:
    started = time.monotonic()
    load_before = os.getloadavg()
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    asked = set(args.methods.split(",")) | {"raw", "floor", "adaptive"}
    methods = [m for m in METHODS if m in asked]

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    python = anchor_python(data, log) if "anchor" in methods else None
    revoke: dict[str, Any] | None = None

    server = ManagedOpenFGA(data / "openfga")
    url = await asyncio.to_thread(server.start)
    chroma = ChromaStore(data / "chroma", timeout=120.0, write_timeout=1800.0)
    all_res: dict[int, Results] = {}
    sections: list[str] = []
    try:
        for size in sizes:
            corpus, fga, manifest = await prepare(args, size, url, chroma, log)
            anchor, catalog = None, None
            try:
                oracle = Oracle(corpus)
                rng = np.random.default_rng(args.seed + 100 + size)
                n = budget.queries + args.warmup
                queries = (
                    corpus.centers[rng.integers(0, CLUSTERS, n)] + NOISE * rng.normal(size=(n, DIM))
                ).astype(np.float32)
                anchor = Anchor(python, data / "chroma", corpus, fga) if python else None
                catalog = await content_catalog(data, corpus)
                bench = Bench(fga, chroma, corpus, args.k, anchor, catalog)
                await chroma.search(TENANT, corpus.source, queries[0], args.k)  # open index
                await settle(bench.fga, log)
                res: Results = {}
                chosen = args.profiles.split(",") if args.profiles else None
                for profile in profiles():
                    if chosen is not None and profile.name not in chosen:
                        continue
                    log(f"{size}: profile {profile.name}")
                    res[profile.name] = await measure(
                        bench,
                        oracle,
                        profile,
                        queries,
                        args.warmup,
                        concurrency,
                        budget,
                        log,
                        methods,
                    )
                all_res[size] = res
                sections += [
                    *table(size, res, args.k, concurrency),
                    corpus_note(corpus, manifest),
                    "",
                ]
                if revoke is None and args.revoke_trials:
                    revoke = await revoke_trials(bench, queries, args.revoke_trials)
                    log(f"revoke -> first denial: {revoke}")
            finally:
                if anchor is not None:
                    anchor.close()
                if catalog is not None:
                    await catalog.close()
                await fga.close()
    finally:
        chroma.close()
        await asyncio.to_thread(server.stop)
    summary = one_line(all_res, args.k)
    write_report(
        Path(args.out),
        command,
        machine_notes(load_before),
        sections,
        targets(all_res, revoke),
        summary,
        time.monotonic() - started,
    )
    print(summary)


async def settle(fga: FgaClient, log: Callable[[str], None]) -> None:
    """Wait until the gateway may ask OpenFGA's check cache, as a gateway running for
    longer than its quiet time with no change in the store would: the first probe
    after a start counts as a change (docs/cache.md). Without this wait the first cell
    measured would send every check as HIGHER_CONSISTENCY and the later ones not."""
    probe, quiet = fga.change_probe, fga.server_cache_quiet_s
    if probe is None or quiet is None:
        return
    await probe.fresh()
    log(f"waiting {quiet:.0f} s: the change log must be quiet that long for OpenFGA's cache")
    await asyncio.sleep(quiet + 0.5)


async def content_catalog(data: Path, corpus: Corpus) -> SourceCatalog:
    """A fresh SQLite catalog recording every document of the corpus as ingested (one
    content version each), read as the gateway reads its own."""
    path = data / f"catalog-{corpus.size}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    catalog = open_catalog(None, path)
    await catalog.add_tenant(TENANT)
    await catalog.add_source(TENANT, corpus.source, "chroma", {})
    ids = [f"d{d:06d}" for d in range(corpus.documents)]
    for start in range(0, len(ids), 5000):
        part = ids[start : start + 5000]
        await catalog.claim(TENANT, corpus.source, [], part, lease=False)
        await catalog.complete_documents(
            TENANT, [(d, CHUNKS_PER_DOC, f"bench:{d}", None, {}) for d in part]
        )
    return catalog


def corpus_note(corpus: Corpus, manifest: dict[str, Any]) -> str:
    tuples = manifest.get("tuples")
    count = f"{tuples:,}" if isinstance(tuples, int) else "?"
    return (
        f"Corpus: {corpus.size:,} chunks of tenant {TENANT} ({corpus.documents:,} documents x "
        f"{CHUNKS_PER_DOC} chunks in {TOP_FOLDERS * LEAVES_PER_TOP} leaf folders) and "
        f"{corpus.other:,} chunks of tenant {OTHER}; "
        f"{count} tuples (written in "
        f"{manifest.get('fga_load_s', '?')} s; chunks in {manifest.get('chroma_load_s', '?')} s)."
    )


if __name__ == "__main__":
    main()
