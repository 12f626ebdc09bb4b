"""Crash safety: ``scopegate serve`` SIGKILLed under load, restarted on the same data dir.

Every request that got a 200 before the kill has its audit record (listing exactly the
chunks that were returned), the hash chain verifies, the managed OpenFGA child died
with its parent (PR_SET_PDEATHSIG: no orphan left), and the restarted gateway serves
the same answers and keeps appending to the same chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.load import stop_gracefully
from gateway.audit import SqliteAuditStore
from gateway.identity import issue_token, load_or_create_signing_key

REPO = Path(__file__).resolve().parent.parent
SCOPEGATE = [str(Path(sys.executable).parent / "scopegate")]  # the installed console script
ANSWERED_BEFORE_KILL = 120  # then SIGKILL, with a request in flight on every worker
DOCS = {
    "rev1": ("Quarterly revenue forecast grows on enterprise renewals.", True),
    "inc1": ("Incident postmortem: the database failed over after disk saturation.", True),
    "pay1": ("Salary bands and revenue bonus for the database team.", False),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """The test's environment without any SCOPEGATE_* setting: the embedded default."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SCOPEGATE_")}


class Serve:
    """``scopegate serve`` as a real child process on a data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        log = (self.data_dir.parent / "serve.log").open("ab")
        self.process = subprocess.Popen(
            [
                *SCOPEGATE,
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                "--metrics-port",
                "0",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=child_env(),
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"serve did not become ready:\n{self.log()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop_gracefully(self.process)

    def log(self) -> str:
        path = self.data_dir.parent / "serve.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def openfga_pid(data_dir: Path) -> int:
    return int((data_dir / "openfga" / "openfga.pid").read_text())


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped has exited: not alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"
    yield path
    # Whatever happened, leave no OpenFGA of this data dir behind.
    with contextlib.suppress(Exception):
        pid = openfga_pid(path)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


class Client:
    def __init__(self, serve: Serve, key: Any) -> None:
        self.serve = serve
        self.key = key

    def token(self, user: str, agent: str | None = None, task: str | None = None) -> str:
        return issue_token(
            self.key,
            issuer="scopegate",
            audience="scopegate",
            tenant="acme",
            user=user,
            agent=agent,
            task=task,
        )

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(
            method,
            f"{self.serve.url}{path}",
            json=body,
            headers={"authorization": f"Bearer {self.token('admin')}"},
            timeout=60,
        )
        assert response.status_code < 300, response.text
        return response.json() if response.content else None


async def hammer(url: str, token: str, ok: dict[str, list[str]], stop: asyncio.Event) -> int:
    """Retrieve until the server dies; remember each 200's request id and chunk ids."""
    sent = 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        while not stop.is_set():
            sent += 1  # counted before it is sent: it may be recorded and never answered
            try:
                response = await http.post(
                    "/v1/retrieve",
                    json={"query": "revenue forecast database", "k": 5},
                    headers={"authorization": f"Bearer {token}"},
                )
            except httpx.HTTPError:
                return sent  # the server is gone
            if response.status_code == 200:
                body = response.json()
                ok[body["request_id"]] = [c["chunk_id"] for c in body["chunks"]]
    return sent


async def test_sigkill_under_load_loses_no_audit_record_and_leaves_no_orphan(
    data_dir: Path, request: pytest.FixtureRequest
) -> None:
    created = subprocess.run(
        [*SCOPEGATE, "tenant", "create", "acme", "--admin", "admin", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        env=child_env(),
    )
    assert created.returncode == 0, created.stderr
    serve = Serve(data_dir)
    serve.start()
    try:
        client = Client(serve, load_or_create_signing_key(data_dir))
        members = [
            {"user": f"{kind}:{name}", "relation": "member", "object": "tenant:acme"}
            for kind, name in (("user", "alice"), ("agent", "bot"))
        ]
        client.admin("POST", "/v1/relationships", {"writes": members})
        client.admin("POST", "/v1/sources", {"id": "docs", "kind": "chroma"})
        documents = [
            {
                "id": doc_id,
                "text": text,
                "acl": {"viewers": ["user:alice" if ok else "user:bob"], "agents": ["agent:bot"]},
            }
            for doc_id, (text, ok) in DOCS.items()
        ]
        client.admin("POST", "/v1/sources/docs/documents", {"documents": documents})
        task = client.admin(
            "POST",
            "/v1/tasks",
            {"user": "user:alice", "agent": "agent:bot", "scope": ["source:docs"]},
        )["task_id"]
        token = client.token("alice", "bot", task)
        fga_pid = openfga_pid(data_dir)
        assert alive(fga_pid)

        ok: dict[str, list[str]] = {}
        stop = asyncio.Event()
        workers = [asyncio.create_task(hammer(serve.url, token, ok, stop)) for _ in range(6)]
        deadline = time.monotonic() + 60
        while len(ok) < ANSWERED_BEFORE_KILL and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(ok) >= ANSWERED_BEFORE_KILL // 4, serve.log()
        serve.kill()  # mid-load: requests are in flight on every worker
        sent = sum(await asyncio.gather(*workers))
        stop.set()
        answers = {tuple(chunks) for chunks in ok.values()}
        assert len(answers) == 1  # the same, correct answer every time
        assert {c.split("#")[0] for c in next(iter(answers))} == {"rev1", "inc1"}

        assert wait_gone(fga_pid), f"openfga {fga_pid} outlived its SIGKILLed parent"

        store = SqliteAuditStore(data_dir / "audit.db")
        try:
            verified = await store.verify()
            assert verified.ok, verified
            for request_id, chunk_ids in ok.items():
                entry = await store.get("acme", request_id)
                assert entry is not None, f"200 response {request_id} has no audit record"
                assert list(entry.record.returned_chunk_ids) == chunk_ids
            retrievals = [e async for e in store.iter_all("acme") if e.record.kind == "retrieve"]
            # At most the requests in flight at the kill were recorded without a response.
            assert len(ok) <= len(retrievals) <= sent
        finally:
            await store.close()

        serve.start()  # the same data directory: OpenFGA store, Chroma, key, audit chain
        response = httpx.post(
            f"{serve.url}/v1/retrieve",
            json={"query": "revenue forecast database", "k": 5},
            headers={"authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert tuple(c["chunk_id"] for c in response.json()["chunks"]) in answers
        new_fga = openfga_pid(data_dir)
        store = SqliteAuditStore(data_dir / "audit.db")
        try:
            after = await store.verify()
            assert after.ok and after.checked > verified.checked
            assert await store.get("acme", response.json()["request_id"]) is not None
        finally:
            await store.close()
    finally:
        serve.stop()
    assert wait_gone(new_fga), "openfga outlived a clean shutdown"
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(
                f"\ncrash: {len(ok)} answered before SIGKILL, {sent} sent, "
                f"{len(retrievals)} recorded, all answered ones audited; chain verifies"
            )
