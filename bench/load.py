"""Load: many concurrent agents with mixed permissions against a real uvicorn server.

    python bench/load.py --duration 60 --concurrency 64          # a minute of load
    python bench/load.py --requests 5000 --embeddings minilm     # the real model

The driver starts (or reuses, ``--openfga-url``) an OpenFGA, starts the gateway as a
separate process (``bench/load.py serve ...``: uvicorn on a free loopback port), loads
a multi-tenant world through the public HTTP API (users, agents, nested groups and
folders, owners, grants, tasks of every kind: bound, expired, revoked, deprovisioned
members, tokens presented by the wrong user), then drives ``--concurrency`` agents for
``--duration`` seconds or ``--requests`` requests. Afterwards it checks:

- no leak: every returned chunk belongs to a document the oracle
  (``tests/test_leak_oracle.py``, plain set logic over the world description) permits
  for that user, agent and task, with that tenant's text; with the deterministic
  ``hash`` embeddings each answer must also be exactly the oracle's top-k;
- no miss: as many chunks as the oracle permits, up to k;
- no unexpected error: every response is a 200 (no rate limit is configured);
- the audit log holds exactly one retrieval record per request sent, each 200's record
  lists exactly the chunks returned, and the hash chain verifies;

and reports throughput and latency percentiles. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.load_world import (  # noqa: E402
    VOCAB,
    Doc,
    Oracle,
    Task,
    TenantWorld,
    compare,
)
from connectors.chunking import chunk_document  # noqa: E402
from connectors.embeddings import HashEmbeddings  # noqa: E402
from gateway.audit import AuditStore, SqliteAuditStore  # noqa: E402
from gateway.identity import issue_token, load_or_create_signing_key  # noqa: E402

ADMIN = "admin"
SHED_CODES = {"authorization_unavailable", "source_unavailable", "audit_unavailable"}
TENANTS = ("acme", "globex")


# -- the server process -------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    """Child process: a gateway on uvicorn, tenants bootstrapped, until SIGTERM."""
    import uvicorn

    from gateway.api import create_app
    from gateway.service import Gateway
    from gateway.settings import load_settings

    async def main() -> None:
        settings = load_settings(
            data_dir=Path(args.data_dir),
            openfga_url=args.openfga_url,
            openfga_store_name=args.store,
            openfga_check_cache_ttl_s=args.check_cache_ttl,
            openfga_request_timeout_s=args.request_timeout,
        )
        embeddings = HashEmbeddings() if args.embeddings == "hash" else None
        g = await Gateway.start(settings, embeddings=embeddings)
        try:
            for tenant in args.tenant:
                await g.create_tenant(tenant, ADMIN)
            config = uvicorn.Config(
                create_app(gateway=g),
                host="127.0.0.1",
                port=args.port,
                log_level="warning",
                backlog=4096,
                timeout_keep_alive=30,
            )
            await uvicorn.Server(config).serve()
        finally:
            await g.close()

    if args.profile:
        # The gateway's own CPU per request (the event loop's thread): cProfile stats,
        # read with ``python -m pstats`` or bench/load.py's --profile summary.
        import cProfile

        profiler = cProfile.Profile()

        def dump(*_: object) -> None:
            # uvicorn re-raises the SIGTERM it handled once it has stopped: write the
            # stats then, since no code after serve() runs.
            profiler.disable()
            profiler.dump_stats(args.profile)
            os._exit(0)

        signal.signal(signal.SIGTERM, dump)
        profiler.enable()
        asyncio.run(main())
        dump()
    asyncio.run(main())
    return 0


class ServerProcess:
    def __init__(
        self,
        data_dir: Path,
        openfga_url: str,
        embeddings: str,
        profile: Path | None = None,
        server_cache: tuple[float, float] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.store = f"load-{uuid.uuid4().hex[:10]}"
        self.args = [
            sys.executable,
            str(Path(__file__).resolve()),
            "serve",
            "--data-dir",
            str(data_dir),
            "--openfga-url",
            openfga_url,
            "--store",
            self.store,
            "--port",
            str(self.port),
            "--embeddings",
            embeddings,
            *(x for t in TENANTS for x in ("--tenant", t)),
            *(("--profile", str(profile)) if profile is not None else ()),
            *(
                (
                    "--check-cache-ttl",
                    str(server_cache[0]),
                    "--request-timeout",
                    str(server_cache[1]),
                )
                if server_cache is not None
                else ()
            ),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "server.log").open("ab")
        self.process = subprocess.Popen(self.args, stdout=log, stderr=log, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"server did not start: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_gracefully(self.process)
        self.process = None

    def log_tail(self) -> str:
        path = self.data_dir / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def stop_gracefully(process: subprocess.Popen[Any], grace_s: float = 30.0) -> None:
    """SIGTERM (the server's clean shutdown), SIGKILL only if it does not exit in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the world ----------------------------------------------------------------------------------


def build_world(tenant: str, documents: int, rng: random.Random) -> TenantWorld:
    """A mid-sized tenant with every kind of grant and task (deterministic from ``rng``)."""
    users = tuple(f"u{i}" for i in range(6))
    agents = tuple(f"a{i}" for i in range(3))
    groups = ("eng", "leads")
    folders = {"f0": ("docs", None), "f1": ("docs", "f0"), "f2": ("docs", None)}
    memberships = {
        ("user:u0", "eng"),
        ("user:u1", "eng"),
        ("agent:a0", "eng"),
        ("user:u2", "leads"),
        ("group:eng#member", "leads"),
    }
    everyone = f"tenant:{tenant}#member"
    docs: dict[str, Doc] = {}
    grants: set[tuple[str, str, str]] = {
        ("group:leads#member", "viewer", "folder:f0"),
        ("agent:a1", "agent_viewer", "folder:f1"),
    }
    for i in range(documents):
        folder = rng.choice([None, None, "f0", "f1", "f2"])
        doc = Doc(f"d{i}", "docs", folder, (rng.randrange(10**6),))
        docs[doc.id] = doc
        obj = f"document:{doc.id}"
        roll = rng.random()
        viewers = (
            [everyone]
            if roll < 0.3
            else rng.sample([*(f"user:{u}" for u in users), "group:eng#member"], rng.randint(0, 2))
        )
        grants |= {(v, "viewer", obj) for v in viewers}
        pool = [everyone, "group:eng#member", *(f"agent:{a}" for a in agents)]
        grants |= {(a, "agent_viewer", obj) for a in rng.sample(pool, rng.randint(0, 2))}
        if rng.random() < 0.15:
            grants.add((f"user:{rng.choice(users)}", "owner", obj))
    tasks = []
    for user in users:
        for agent in agents:
            scope = rng.choice(
                [("source:docs",)] * 5 + [("folder:f0",), ("folder:f2", "document:d1")]
            )
            expiry = rng.choice(["none"] * 8 + ["future", "past"])
            tasks.append(Task(user, agent, scope, expiry, revoked=rng.random() < 0.1))
    members = {*(f"user:{u}" for u in users), *(f"agent:{a}" for a in agents)}
    return TenantWorld(
        tenant,
        users,
        agents,
        ("docs",),
        folders,
        docs,
        grants,
        memberships,
        groups,
        members,
        tasks,
        deprovision=("user:u5",),
    )


class Admin:
    def __init__(self, http: httpx.AsyncClient, key: Any) -> None:
        self.http = http
        self.key = key

    def token(
        self, tenant: str, user: str, agent: str | None = None, task: str | None = None
    ) -> str:
        return issue_token(
            self.key,
            issuer="scopegate",
            audience="scopegate",
            tenant=tenant,
            user=user,
            agent=agent,
            task=task,
            ttl_s=3600,
        )

    async def call(self, tenant: str, method: str, path: str, body: Any = None) -> Any:
        response = await self.http.request(
            method,
            path,
            json=body,
            headers={"authorization": f"Bearer {self.token(tenant, ADMIN)}"},
        )
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json() if response.content else None

    async def load(self, w: TenantWorld) -> None:
        await self.call(w.name, "POST", "/v1/sources", {"id": "docs", "kind": "chroma"})
        writes = [rel(m, "member", f"tenant:{w.name}") for m in sorted(w.members)]
        writes += [rel(m, "member", f"group:{g}") for m, g in sorted(w.memberships)]
        for folder, (source, parent) in w.folders.items():
            writes.append(rel(f"source:{source}", "parent", f"folder:{folder}"))
            if parent:
                writes.append(rel(f"folder:{parent}", "parent", f"folder:{folder}"))
        writes += [rel(*g) for g in sorted(w.grants) if not g[2].startswith("document:")]
        await self.call(w.name, "POST", "/v1/relationships", {"writes": writes})
        batch = []
        for d in w.docs.values():
            obj = f"document:{d.id}"
            text = "\n\n".join(w.text(d))
            assert [c[2] for c in chunk_document(d.id, text)] == w.text(d)
            acl: dict[str, Any] = {
                "viewers": sorted(s for s, r, o in w.grants if o == obj and r == "viewer"),
                "agents": sorted(s for s, r, o in w.grants if o == obj and r == "agent_viewer"),
            }
            owners = [s for s, r, o in w.grants if o == obj and r == "owner"]
            if owners:
                acl["owner"] = owners[0]
            body: dict[str, Any] = {"id": d.id, "text": text, "acl": acl}
            if d.folder:
                body["folder"] = d.folder
            batch.append(body)
        for i in range(0, len(batch), 50):
            await self.call(
                w.name, "POST", "/v1/sources/docs/documents", {"documents": batch[i : i + 50]}
            )
        now = datetime.now(UTC)
        for task in w.tasks:
            body = {
                "user": f"user:{task.user}",
                "agent": f"agent:{task.agent}",
                "scope": list(task.scope),
            }
            if task.expiry != "none":
                delta = timedelta(hours=2 if task.expiry == "future" else -1)
                body["expires_at"] = (now + delta).isoformat()
            task.id = (await self.call(w.name, "POST", "/v1/tasks", body))["task_id"]
            if task.revoked:
                await self.call(w.name, "DELETE", f"/v1/tasks/{task.id}")
        deletes = [rel(m, "member", f"tenant:{w.name}") for m in w.deprovision]
        await self.call(w.name, "POST", "/v1/relationships", {"deletes": deletes})
        w.members -= set(w.deprovision)


def rel(user: str, relation: str, obj: str) -> dict[str, str]:
    return {"user": user, "relation": relation, "object": obj}


@dataclass(frozen=True)
class Identity:
    tenant: int
    user: str
    agent: str
    task: Task
    token: str


def identities(worlds: list[TenantWorld], admin: Admin, rng: random.Random) -> list[Identity]:
    """Every task's own identity, plus a wrong user presenting some of them."""
    found = []
    for t, w in enumerate(worlds):
        for task in w.tasks:
            found.append(
                Identity(
                    t,
                    task.user,
                    task.agent,
                    task,
                    admin.token(w.name, task.user, task.agent, task.id),
                )
            )
            if rng.random() < 0.2:
                other = rng.choice([u for u in w.users if u != task.user])
                found.append(
                    Identity(
                        t, other, task.agent, task, admin.token(w.name, other, task.agent, task.id)
                    )
                )
    return found


# -- driving load -------------------------------------------------------------------------------


@dataclass
class Sample:
    who: int
    query: str
    k: int
    status: int
    latency_ms: float
    body: dict[str, Any] | None


@dataclass
class Report:
    requests: int = 0
    duration_s: float = 0.0
    concurrency: int = 0
    throughput_rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    transport_errors: int = 0
    unexpected_errors: int = 0
    shed: int = 0  # clean 503s (failed closed, audited) when a dependency was too slow
    max_shed_fraction: float = 0.0
    leaks: int = 0
    misses: int = 0
    exact_checked: int = 0
    chunks_returned: int = 0
    denied_requests: int = 0
    audit_records: int = 0
    audit_mismatches: int = 0
    chain_ok: bool = False
    #: CPU seconds the gateway process (and a managed OpenFGA) spent while the load ran,
    #: per request in ms: what a request costs, whatever else shares the machine.
    gateway_cpu_ms: float | None = None
    openfga_cpu_ms: float | None = None
    problems: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return (
            self.requests > 0
            and self.leaks == 0
            and self.misses == 0
            and self.unexpected_errors == 0
            and self.transport_errors == 0
            and self.shed <= self.max_shed_fraction * self.requests
            and self.audit_records == self.requests
            and self.audit_mismatches == 0
            and self.chain_ok
        )

    def summary(self) -> str:
        return (
            f"{self.requests} requests in {self.duration_s:.1f}s, {self.concurrency} agents: "
            f"{self.throughput_rps:.0f} req/s, p50 {self.p50_ms:.1f} ms, p95 {self.p95_ms:.1f} ms, "
            f"p99 {self.p99_ms:.1f} ms; statuses {self.statuses}; leaks {self.leaks}, "
            f"misses {self.misses}, failed closed {self.shed}, "
            f"unexpected errors {self.unexpected_errors + self.transport_errors}; "
            f"audit records {self.audit_records}/{self.requests}, chain "
            f"{'verifies' if self.chain_ok else 'BROKEN'}; CPU per request: gateway "
            f"{_ms(self.gateway_cpu_ms)}, OpenFGA {_ms(self.openfga_cpu_ms)}"
        )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), None if unreadable."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def cpu_per_request(before: float | None, after: float | None, requests: int) -> float | None:
    if before is None or after is None or not requests:
        return None
    return 1000 * (after - before) / requests


async def drive(
    url: str,
    who: list[Identity],
    duration_s: float,
    max_requests: int | None,
    concurrency: int,
    seed: int,
) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    stop_at = time.monotonic() + duration_s
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as http:

        async def agent(n: int) -> None:
            nonlocal sent
            rng = random.Random(seed * 1000 + n)
            while time.monotonic() < stop_at and (max_requests is None or sent < max_requests):
                sent += 1
                i = rng.randrange(len(who))
                query = " ".join(rng.sample(VOCAB, rng.randint(1, 4)))
                k = rng.randint(1, 8)
                started = time.perf_counter()
                try:
                    response = await http.post(
                        "/v1/retrieve",
                        json={"query": query, "k": k},
                        headers={"authorization": f"Bearer {who[i].token}"},
                    )
                except httpx.HTTPError:
                    samples.append(
                        Sample(i, query, k, 0, (time.perf_counter() - started) * 1000, None)
                    )
                    continue
                latency = (time.perf_counter() - started) * 1000
                try:
                    body = response.json()
                except ValueError:  # not the gateway's answer (a load balancer's error page)
                    body = None
                samples.append(Sample(i, query, k, response.status_code, latency, body))

        started = time.monotonic()
        await asyncio.gather(*(agent(n) for n in range(concurrency)))
        return samples, time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def check(
    samples: list[Sample],
    who: list[Identity],
    worlds: list[TenantWorld],
    exact: bool,
    audit_path: Path,
    report: Report,
) -> None:
    returned, failed = check_answers(samples, who, worlds, exact, report)
    store = SqliteAuditStore(audit_path)
    try:
        await check_audit(store, returned, failed, report)
    finally:
        await store.close()


def check_answers(
    samples: list[Sample],
    who: list[Identity],
    worlds: list[TenantWorld],
    exact: bool,
    report: Report,
) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """No leak, no miss (and with ``exact`` the oracle's ranking) in every answer; the
    chunk ids each 200 returned and the error code of each clean 503, by request id."""
    embeddings = HashEmbeddings()
    permitted: dict[int, set[str]] = {}
    returned: dict[str, tuple[str, ...]] = {}
    failed: dict[str, str] = {}
    for s in samples:
        report.statuses[str(s.status)] = report.statuses.get(str(s.status), 0) + 1
        if s.status == 0:
            report.transport_errors += 1
            continue
        code = (s.body or {}).get("error", {}).get("code") if s.status != 200 else None
        if s.status == 503 and code in SHED_CODES:
            # Failed closed (a dependency too slow under this load): no content, and the
            # failure must be on the record like any other request.
            report.shed += 1
            failed[s.body["error"]["request_id"]] = code  # type: ignore[index]
            continue
        if s.status != 200 or s.body is None:
            report.unexpected_errors += 1
            report.problems.append(f"status {s.status}: {str(s.body)[:200]}")
            continue
        identity = who[s.who]
        w = worlds[identity.tenant]
        oracle = Oracle(w, embeddings)
        if s.who not in permitted:
            permitted[s.who] = oracle.permitted(identity.user, identity.agent, identity.task)
        allowed = permitted[s.who]
        chunks = s.body["chunks"]
        returned[s.body["request_id"]] = tuple(c["chunk_id"] for c in chunks)
        report.chunks_returned += len(chunks)
        report.denied_requests += not allowed
        texts = {f"{d}#0": w.text(w.docs[d])[0] for d in allowed}
        leaked = [c["chunk_id"] for c in chunks if texts.get(c["chunk_id"]) != c["text"]]
        if leaked:
            report.leaks += len(leaked)
            report.problems.append(
                f"LEAK {leaked} to {identity.user}/{identity.agent} in {w.name} "
                f"(request {s.body['request_id']})"
            )
            continue
        if len(chunks) != min(s.k, len(allowed)):
            report.misses += 1
            report.problems.append(
                f"MISS {len(chunks)} of {min(s.k, len(allowed))} chunks for "
                f"{identity.user}/{identity.agent} task {identity.task.id} in {w.name} "
                f"(request {s.body['request_id']}, k={s.k}, query {s.query!r})"
            )
            continue
        if exact:
            problems = compare(oracle.ranking(allowed, s.query, None), chunks, s.k)
            report.exact_checked += 1
            if problems:
                report.misses += 1
                report.problems.append(f"request {s.body['request_id']}: {problems[0]}")
    return returned, failed


async def check_audit(
    store: AuditStore,
    returned: dict[str, tuple[str, ...]],
    failed: dict[str, str],
    report: Report,
    *,
    only_these: bool = False,
) -> None:
    """Each answer's record is in ``store`` and says what the answer did; the chain
    verifies. ``only_these``: the store also holds other runs' records (a shared one)."""
    records = [e.record async for e in store.iter_all(None) if e.record.kind == "retrieve"]
    if only_these:
        records = [r for r in records if r.request_id in returned or r.request_id in failed]
    report.audit_records = len(records)
    by_id = {r.request_id: r for r in records}
    for request_id, chunk_ids in returned.items():
        record = by_id.get(request_id)
        if record is None or record.returned_chunk_ids != chunk_ids:
            report.audit_mismatches += 1
    for request_id, code in failed.items():
        record = by_id.get(request_id)
        if record is None or record.outcome != "error" or record.error_code != code:
            report.audit_mismatches += 1
    report.chain_ok = (await store.verify()).ok


async def run_load(
    *,
    openfga_url: str | None = None,
    duration_s: float = 30.0,
    max_requests: int | None = None,
    concurrency: int = 32,
    documents: int = 120,
    embeddings: str = "hash",
    seed: int = 7,
    data_dir: Path | None = None,
    max_shed_fraction: float = 0.0,
    profile: Path | None = None,
    openfga_cache: bool = True,
) -> Report:
    """Start what is needed, load the world, drive the load, check it; return the report."""
    with contextlib.ExitStack() as stack:
        work = data_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="scopegate-load-"))
        )
        fga_pid: int | None = None
        server_cache: tuple[float, float] | None = None
        if openfga_url is None:
            from gateway.fga_server import CHECK_CACHE_TTL_S, ManagedOpenFGA

            # The managed OpenFGA as the gateway would run it (its check cache on), or
            # with the cache off (--no-openfga-cache) for a side-by-side comparison.
            fga = ManagedOpenFGA(
                work / "openfga", check_cache_ttl_s=CHECK_CACHE_TTL_S if openfga_cache else 0
            )
            openfga_url = fga.start()
            stack.callback(fga.stop)
            fga_pid = fga.process.pid if fga.process is not None else None
            if openfga_cache:
                server_cache = (fga.check_cache_ttl_s, fga.request_timeout_s)
        server = ServerProcess(work / "gateway", openfga_url, embeddings, profile, server_cache)
        server.start()
        stack.callback(server.stop)
        rng = random.Random(seed)
        worlds = [build_world(t, documents, rng) for t in TENANTS]
        key = load_or_create_signing_key(server.data_dir)
        async with httpx.AsyncClient(base_url=server.url, timeout=120.0) as http:
            admin = Admin(http, key)
            for w in worlds:
                await admin.load(w)
        who = identities(worlds, admin, rng)
        server_pid = server.process.pid if server.process is not None else None
        cpu_before = cpu_seconds(server_pid), cpu_seconds(fga_pid)
        samples, elapsed = await drive(server.url, who, duration_s, max_requests, concurrency, seed)
        cpu_after = cpu_seconds(server_pid), cpu_seconds(fga_pid)
        latencies = [s.latency_ms for s in samples if s.status == 200]
        report = Report(
            requests=len(samples),
            duration_s=elapsed,
            concurrency=concurrency,
            throughput_rps=len(samples) / elapsed if elapsed else 0.0,
            p50_ms=percentile(latencies, 50),
            p95_ms=percentile(latencies, 95),
            p99_ms=percentile(latencies, 99),
            max_ms=max(latencies, default=0.0),
            max_shed_fraction=max_shed_fraction,
            gateway_cpu_ms=cpu_per_request(cpu_before[0], cpu_after[0], len(samples)),
            openfga_cpu_ms=cpu_per_request(cpu_before[1], cpu_after[1], len(samples)),
        )
        await check(
            samples, who, worlds, embeddings == "hash", server.data_dir / "audit.db", report
        )
        if not report.ok():
            report.problems.append(server.log_tail())
        report.problems = report.problems[:50]
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    srv = sub.add_parser("serve", help="(internal) the gateway process")
    srv.add_argument("--data-dir", required=True)
    srv.add_argument("--openfga-url", required=True)
    srv.add_argument("--store", required=True)
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--embeddings", choices=["hash", "minilm"], default="hash")
    srv.add_argument("--tenant", action="append", default=[])
    srv.add_argument("--profile", default=None)
    srv.add_argument("--check-cache-ttl", type=float, default=None)
    srv.add_argument("--request-timeout", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    parser.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent agents (default 32)"
    )
    parser.add_argument("--documents", type=int, default=120, help="documents per tenant")
    parser.add_argument("--embeddings", choices=["hash", "minilm"], default="hash")
    parser.add_argument(
        "--openfga-url", default=None, help="use this OpenFGA instead of a managed one"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--max-shed",
        type=float,
        default=0.0,
        help="fraction of requests allowed to fail closed with a 503 (default 0)",
    )
    parser.add_argument(
        "--no-openfga-cache",
        action="store_true",
        help="run the managed OpenFGA without its check cache (docs/cache.md)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run the gateway under cProfile and write its stats here (slows it down)",
    )
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.openfga_url and not args.openfga_url.startswith(
        ("http://127.0.0.1", "http://localhost")
    ):
        parser.error("load only targets loopback")
    report = asyncio.run(
        run_load(
            openfga_url=args.openfga_url,
            duration_s=args.duration,
            max_requests=args.requests,
            concurrency=args.concurrency,
            documents=args.documents,
            embeddings=args.embeddings,
            seed=args.seed,
            max_shed_fraction=args.max_shed,
            profile=args.profile.resolve() if args.profile else None,
            openfga_cache=not args.no_openfga_cache,
        )
    )
    print(report.summary())
    for problem in report.problems[:10]:
        print("  " + problem[:500])
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.ok() else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
