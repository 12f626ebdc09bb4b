"""The scaled-out cluster of ``scripts/cluster``, brought up for tests.

:func:`running_cluster` starts the whole cluster (PostgreSQL, two OpenFGA processes,
Chroma, HAProxy, three gateway replicas) on free loopback ports in a state directory
of its own, yields a :class:`RunningCluster`, and always stops it and deletes its state.
The ``cluster`` fixture does that once per test module. Anything that keeps the cluster
from starting (a missing Debian package, OpenFGA binary, port) fails the tests that use
it, with the script's output; nothing skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from gateway.audit import AuditRecord
from gateway.identity import issue_token, load_or_create_signing_key

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "cluster"
UP_TIMEOUT_S = 240
DOWN_TIMEOUT_S = 120


def run_script(*args: str, timeout: float = UP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``scripts/cluster ARGS``; raises with its output when it fails."""
    done = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"scripts/cluster {' '.join(args)} exited {done.returncode}:\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
    return done


def plan_of(state_dir: Path) -> dict[str, Any]:
    """The layout ``scripts/cluster plan`` prints (the defaults when nothing runs there)."""
    plan: dict[str, Any] = json.loads(run_script("--state-dir", str(state_dir), "plan").stdout)
    return plan


@dataclass
class RunningCluster:
    state_dir: Path
    plan: dict[str, Any]
    up_seconds: float

    @property
    def lb_url(self) -> str:
        """HAProxy's gateway frontend."""
        url: str = self.plan["haproxy"]["url"]
        return url

    @property
    def replica_urls(self) -> list[str]:
        return [p["url"] for p in self.plan["gateway"]["processes"]]

    def token(
        self,
        *,
        tenant: str,
        user: str,
        agent: str | None = None,
        task: str | None = None,
        operator: bool = False,
        ttl_s: int = 900,
    ) -> str:
        """A token of the cluster's one trusted issuer (accepted by every replica)."""
        key = load_or_create_signing_key(self.state_dir / "issuer")
        return issue_token(
            key,
            issuer=self.plan["issuer"]["issuer"],
            audience=self.plan["issuer"]["audience"],
            tenant=tenant,
            user=user,
            agent=agent,
            task=task,
            ttl_s=ttl_s,
            operator=operator,
        )

    def client(self, url: str, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=url,
            headers={"authorization": f"Bearer {token}"},
            timeout=30.0,
            trust_env=False,
        )

    def pid(self, part: str) -> int:
        record = json.loads((self.state_dir / "run" / f"{part}.pid").read_text())
        pid: int = record["pid"]
        return pid

    def kill(self, part: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Signal one part of the cluster (fault injection); its pid."""
        pid = self.pid(part)
        os.kill(pid, sig)
        return pid

    def haproxy_stats(self, backend: str) -> dict[str, dict[str, str]]:
        """HAProxy's counters of ``backend`` by server (``show stat`` on its socket)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.state_dir / "run" / "haproxy.sock"))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        header, *rows = data.decode().splitlines()
        names = header.removeprefix("# ").split(",")
        stats = [dict(zip(names, row.split(","), strict=False)) for row in rows if row]
        return {row["svname"]: row for row in stats if row["pxname"] == backend}

    @property
    def audit_dsn(self) -> str:
        """The PostgreSQL database every replica appends its audit records to."""
        dsn: str = self.plan["gateway"]["env"]["SCOPEGATE_AUDIT_DSN"]
        return dsn

    def audit_records(self, tenant: str, request_ids: list[str]) -> dict[str, AuditRecord]:
        """The records of ``request_ids`` in the shared audit store, read from PostgreSQL."""
        with psycopg.connect(self.audit_dsn) as conn:
            rows = conn.execute(
                "SELECT request_id, record FROM audit_log"
                " WHERE tenant = %s AND request_id = ANY(%s)",
                (tenant, request_ids),
            ).fetchall()
        return {rid: AuditRecord.from_dict(json.loads(text)) for rid, text in rows}

    def verify_audit(self) -> subprocess.CompletedProcess[str]:
        """``scopegate audit verify`` over the shared audit store (as an operator runs it)."""
        scopegate = Path(sys.executable).with_name("scopegate")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEGATE_")}
        env["SCOPEGATE_AUDIT_DSN"] = self.audit_dsn
        with tempfile.TemporaryDirectory(prefix="audit-verify-") as data_dir:
            return subprocess.run(
                [str(scopegate), "audit", "verify", "--data-dir", data_dir],
                capture_output=True,
                text=True,
                env=env,
                timeout=120,
                check=False,
            )

    def up(self) -> None:
        """Start again whatever is not running (a killed part comes back)."""
        run_script("--state-dir", str(self.state_dir), "up")

    def status(self) -> dict[str, dict[str, Any]]:
        done = subprocess.run(
            [str(SCRIPT), "--state-dir", str(self.state_dir), "status", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return {row["part"]: row for row in json.loads(done.stdout)}

    def wait_status(self, part: str, fragment: str, timeout_s: float = 15.0) -> dict[str, Any]:
        """Wait until ``part``'s health column contains ``fragment``."""
        deadline = time.monotonic() + timeout_s
        while True:
            row = self.status()[part]
            if fragment in row["health"] or time.monotonic() > deadline:
                return row
            time.sleep(0.3)


@contextlib.contextmanager
def running_cluster(state_dir: Path) -> Iterator[RunningCluster]:
    """Bring the cluster up on free ports in ``state_dir``; down and purged afterwards."""
    started = time.monotonic()
    clean = False
    try:
        run_script("--state-dir", str(state_dir), "up", "--free-ports")
        up_seconds = time.monotonic() - started
        yield RunningCluster(state_dir, plan_of(state_dir), up_seconds)
        clean = True
    finally:
        # Always stopped; a failing `down` is reported unless an error is already on its way.
        down = subprocess.run(
            [str(SCRIPT), "--state-dir", str(state_dir), "down", "--purge"],
            capture_output=True,
            text=True,
            timeout=DOWN_TIMEOUT_S,
            check=False,
        )
        if clean and down.returncode != 0:
            raise RuntimeError(f"scripts/cluster down failed:\n{down.stderr[-4000:]}")


@pytest.fixture(scope="module", name="cluster")
def cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    """``cluster``: one running cluster per test module (import this into the module)."""
    with running_cluster(tmp_path_factory.mktemp("cluster") / "state") as running:
        yield running
