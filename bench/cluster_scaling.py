"""Throughput of 1, 2 and 3 gateway replicas behind HAProxy, and where the CPU goes.

    python bench/cluster_scaling.py --duration 30                   # its own cluster
    python bench/cluster_scaling.py --state-dir .scopegate-cluster  # a running `make cluster`

Starts ``scripts/cluster`` (free ports, state in a temporary directory, stopped and
deleted afterwards) unless ``--state-dir`` names a running one, and loads the world of
``bench/load.py`` (two tenants, ``--documents`` each, every kind of grant and task)
through the load balancer. Then, for each replica count N, it takes every replica but
the first N out of HAProxy's rotation (``set server gateways/gateway-K state maint`` on
the admin socket: no traffic and no health checks), drives ``--concurrency`` agents
through HAProxy for ``--duration`` seconds after a short warm-up, and reads the CPU
time of every part (``/proc/PID/stat`` user + system time of the part's process tree,
reaped children included) and of this driver before and after.

Every answer is checked as ``bench/load.py`` checks it (no leak, no miss, every answer's
record in the shared PostgreSQL audit chain, the chain verifies); exact ranking is not
compared, since the replicas embed with the real model. The table gives req/s, p50, p95
and the CPU milliseconds each part spent per request. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.load import (  # noqa: E402
    TENANTS,
    Admin,
    Identity,
    Report,
    build_world,
    check_answers,
    check_audit,
    drive,
    identities,
    percentile,
)
from bench.load_world import TenantWorld  # noqa: E402
from gateway.audit import PostgresAuditStore  # noqa: E402
from gateway.identity import issue_token, load_or_create_signing_key  # noqa: E402

SCRIPT = ROOT / "scripts" / "cluster"
TICKS = os.sysconf("SC_CLK_TCK")
WARMUP_S = 3.0
# Parts as the table shows them: several processes of one kind are added up.
GROUPS = {"gateway": "gateway-", "openfga": "openfga-"}


# -- the cluster --------------------------------------------------------------------------------


def cluster(state_dir: Path, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [str(SCRIPT), "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"scripts/cluster {' '.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout


def haproxy(state_dir: Path, command: str) -> str:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(state_dir / "run" / "haproxy.sock"))
        sock.sendall(command.encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode()


def server_stats(state_dir: Path) -> dict[str, dict[str, str]]:
    """gateway replica -> HAProxy's counters of it (``show stat``)."""
    header, *rows = haproxy(state_dir, "show stat").splitlines()
    names = header.removeprefix("# ").split(",")
    found = {}
    for line in rows:
        row = dict(zip(names, line.split(","), strict=False))
        if row.get("pxname") == "gateways" and row.get("svname", "").startswith("gateway-"):
            found[row["svname"]] = row
    return found


def server_states(state_dir: Path) -> dict[str, str]:
    """gateway replica -> HAProxy's status of it (UP, DOWN, MAINT, ...)."""
    return {name: row["status"] for name, row in server_stats(state_dir).items()}


def failed_checks(state_dir: Path) -> int:
    """Health checks of the replicas that failed so far (``/readyz`` too slow or not 200)."""
    return sum(int(row.get("chkfail") or 0) for row in server_stats(state_dir).values())


def serve_with(state_dir: Path, replicas: list[str], count: int) -> None:
    """Only the first ``count`` replicas in HAProxy's rotation; wait until it says so."""
    for i, name in enumerate(replicas):
        state = "ready" if i < count else "maint"
        haproxy(state_dir, f"set server gateways/{name} state {state}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = server_states(state_dir)
        if all(
            states.get(n, "").startswith("UP" if i < count else "MAINT")
            for i, n in enumerate(replicas)
        ):
            return
        time.sleep(0.2)
    raise RuntimeError(f"HAProxy did not take {count} replicas: {server_states(state_dir)}")


# -- CPU time -----------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, user + system seconds of the process and its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15).
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return int(fields[1]), ticks / TICKS


def process_table() -> dict[int, tuple[int, float]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                table[int(entry.name)] = _stat(int(entry.name))
    return table


def tree_cpu(pid: int, table: dict[int, tuple[int, float]]) -> float:
    """CPU seconds of ``pid`` and every live descendant (each counts its reaped ones)."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        if current in table:
            total += table[current][1]
        todo += children.get(current, [])
    return total


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, all CPU seconds) since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / TICKS, sum(values[:8]) / TICKS


def part_pids(state_dir: Path) -> dict[str, int]:
    rows = json.loads(cluster(state_dir, "status", "--json"))
    return {row["part"]: row["pid"] for row in rows if row["pid"]}


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    table = process_table()
    snapshot = {part: tree_cpu(pid, table) for part, pid in pids.items()}
    times = os.times()
    snapshot["driver"] = times.user + times.system
    snapshot["machine"], snapshot["machine_total"] = machine_busy()
    return snapshot


# -- one run ------------------------------------------------------------------------------------


@dataclass
class Run:
    replicas: int
    report: Report
    cpu_s: dict[str, float] = field(default_factory=dict)  # part -> CPU seconds in the run
    failed_checks: int = 0  # HAProxy health checks of the replicas that failed in the run

    def cpu_ms_per_request(self) -> dict[str, float]:
        n = max(1, self.report.requests)
        return {part: 1000 * seconds / n for part, seconds in self.cpu_s.items()}


async def one_run(
    state_dir: Path,
    lb_url: str,
    who: list[Identity],
    worlds: list[TenantWorld],
    store: PostgresAuditStore,
    pids: dict[str, int],
    replicas: int,
    args: argparse.Namespace,
) -> Run:
    await drive(lb_url, who, WARMUP_S, None, args.concurrency, args.seed + replicas)
    before, checks_before = cpu_snapshot(pids), failed_checks(state_dir)
    samples, elapsed = await drive(
        lb_url, who, args.duration, None, args.concurrency, args.seed + 100 + replicas
    )
    after, checks_after = cpu_snapshot(pids), failed_checks(state_dir)
    latencies = [s.latency_ms for s in samples if s.status == 200]
    report = Report(
        requests=len(samples),
        duration_s=elapsed,
        concurrency=args.concurrency,
        throughput_rps=len(samples) / elapsed if elapsed else 0.0,
        p50_ms=percentile(latencies, 50),
        p95_ms=percentile(latencies, 95),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies, default=0.0),
        max_shed_fraction=args.max_shed,
    )
    returned, failed = check_answers(samples, who, worlds, False, report)
    await check_audit(store, returned, failed, report, only_these=True)
    spent = {part: after[part] - before[part] for part in before}
    grouped: dict[str, float] = {}
    for part, seconds in spent.items():
        name = next((g for g, prefix in GROUPS.items() if part.startswith(prefix)), part)
        grouped[name] = grouped.get(name, 0.0) + seconds
    return Run(replicas, report, grouped, checks_after - checks_before)


# -- the whole measurement ----------------------------------------------------------------------


@contextlib.contextmanager
def a_cluster(state_dir: Path | None) -> Iterator[Path]:
    """The cluster in ``state_dir`` (running), or a fresh one stopped and deleted after."""
    if state_dir is not None:
        yield state_dir
        return
    with tempfile.TemporaryDirectory(prefix="scopegate-scaling-") as tmp:
        own = Path(tmp) / "state"
        try:
            cluster(own, "up", "--free-ports")
            yield own
        finally:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                cluster(own, "down", "--purge", timeout=120)


async def measure(state_dir: Path, args: argparse.Namespace) -> list[Run]:
    plan = json.loads((state_dir / "plan.json").read_text())
    lb_url = plan["haproxy"]["url"]
    replicas = [p["name"] for p in plan["gateway"]["processes"]]
    dsn = plan["gateway"]["env"]["SCOPEGATE_AUDIT_DSN"]
    key = load_or_create_signing_key(state_dir / "issuer")
    rng = random.Random(args.seed)
    suffix = f"{time.time_ns() % 10**6}"  # fresh tenants in a cluster that may hold some
    worlds = [build_world(f"{t}{suffix}", args.documents, rng) for t in TENANTS]
    operator = issue_token(key, issuer="scopegate", audience="scopegate",
                           tenant="platform", user="ops", ttl_s=3600, operator=True)  # fmt: skip
    async with httpx.AsyncClient(base_url=lb_url, timeout=120.0, trust_env=False) as http:
        for w in worlds:
            created = await http.post(
                "/v1/tenants",
                json={"id": w.name, "admin": "admin"},
                headers={"authorization": f"Bearer {operator}"},
            )
            created.raise_for_status()
        admin = Admin(http, key)
        for w in worlds:
            await admin.load(w)
    who = identities(worlds, admin, rng)
    pids = part_pids(state_dir)
    store = PostgresAuditStore(dsn)
    runs = []
    try:
        for count in args.replicas:
            serve_with(state_dir, replicas, count)
            run = await one_run(state_dir, lb_url, who, worlds, store, pids, count, args)
            print(f"{count} replica(s): {run.report.summary()}", file=sys.stderr, flush=True)
            runs.append(run)
    finally:
        serve_with(state_dir, replicas, len(replicas))
        await store.close()
    return runs


PARTS = ("gateway", "openfga", "postgres", "chroma", "haproxy", "driver")


def table(runs: list[Run]) -> str:
    head = (
        "| replicas | req/s | p50 ms | p95 ms | "
        + " | ".join(PARTS)
        + " | all parts | machine busy | failed checks |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for run in runs:
        per = run.cpu_ms_per_request()
        parts = sum(per.get(p, 0.0) for p in PARTS)
        busy = run.cpu_s["machine"] / run.report.duration_s
        cores = run.cpu_s["machine_total"] / run.report.duration_s
        r = run.report
        cells = [f"{r.throughput_rps:.1f}", f"{r.p50_ms:.0f}", f"{r.p95_ms:.0f}"]
        cells += [f"{per.get(p, 0.0):.1f}" for p in PARTS]
        cells += [f"{parts:.1f}", f"{busy:.2f} of {cores:.0f} cores", str(run.failed_checks)]
        lines.append(f"| {run.replicas} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, help="a running scripts/cluster (else its own)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per replica count")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent agents")
    parser.add_argument("--documents", type=int, default=120, help="documents per tenant")
    parser.add_argument(
        "--replicas", type=int, nargs="+", default=[1, 2, 3], help="replica counts, in order"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-shed", type=float, default=0.0)
    parser.add_argument("--json", type=Path, help="also write the runs here")
    args = parser.parse_args(argv)
    with a_cluster(args.state_dir) as state_dir:
        runs = asyncio.run(measure(state_dir, args))
    print(table(runs))
    for run in runs:
        for problem in run.report.problems[:5]:
            print(f"  {run.replicas} replica(s): {problem[:300]}")
    if args.json:
        data = [
            {**asdict(r.report), "replicas": r.replicas, "cpu_s": r.cpu_s}
            | {"failed_checks": r.failed_checks}
            for r in runs
        ]
        args.json.write_text(json.dumps(data, indent=2))
    return 0 if all(r.report.ok() for r in runs) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
