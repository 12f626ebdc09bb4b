"""Fault injection with real processes: every fault fails closed, and the gateway recovers.

The gateway talks to its own managed OpenFGA through :class:`tests.faultproxy.FaultProxy`
(so a restarted server on a new port, latency, resets, truncation, broken status lines
and doctored BatchCheck answers can all be injected), and to a real ``chroma run``
server through a second proxy. Every case checks the THREATS.md contract: a 503 with
the right code, zero chunks and nothing of the corpus in the body, an ``error`` audit
record for exactly that request id (where the audit store works, and none where it
does not), and a correct answer again once the fault clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.embeddings import HashEmbeddings
from gateway.api import create_app
from gateway.audit import AuditRecord, AuditStore, PostgresAuditStore, SqliteAuditStore
from gateway.errors import AuditUnavailable, AuthorizationUnavailable
from gateway.fga import load_model
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from gateway.settings import load_settings
from tests.faultproxy import (
    Fault,
    FaultProxy,
    Seen,
    bad_status_line,
    drop_half_of_results,
    error_one_item,
    garble_json,
    rename_correlation_ids,
    truncate_json,
)
from tests.world import World, bearer, doc

REPO = Path(__file__).resolve().parent.parent
CHROMA = REPO / ".venv" / "bin" / "chroma"
OPENFGA_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 3.0
QUERY = "revenue forecast incident database"
CORPUS = {
    "rev1": ("Quarterly revenue forecast grows on enterprise renewals.", True),
    "inc1": ("Incident postmortem: the database failed over after disk saturation.", True),
    "pay1": ("Salary bands for engineers with revenue bonus and database stipend.", False),
    "sec1": ("Secret acquisition plan: revenue forecast for the target company.", False),
}
BATCH_CHECK = "/batch-check"


@dataclass
class Tally:
    faults: dict[str, int] = field(default_factory=dict)
    faulty_responses: int = 0  # requests the proxies answered with a fault

    def add(self, name: str) -> None:
        self.faults[name] = self.faults.get(name, 0) + 1


TALLY = Tally()


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChromaServer:
    """``chroma run`` as a child process on a fixed port and data path (restartable)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        if not CHROMA.exists():
            raise AssertionError(f"{CHROMA} is missing: install the project (make setup)")
        log = (self.path.parent / "chroma.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(CHROMA),
                "run",
                "--path",
                str(self.path),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (
                f"chroma exited: see {self.path.parent / 'chroma.log'}"
            )
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.get(
                        f"http://127.0.0.1:{self.port}/api/v2/heartbeat", timeout=1
                    ).status_code
                    == 200
                ):
                    return
            time.sleep(0.2)
        raise AssertionError("chroma server did not become ready")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None


# -- the environment --------------------------------------------------------------------------


@dataclass
class Env:
    g: Gateway
    http: httpx.AsyncClient
    world: World
    openfga: ManagedOpenFGA
    fga_proxy: FaultProxy
    chroma: ChromaServer
    chroma_proxy: FaultProxy
    token: str
    baseline: dict[str, list[str]]

    async def retrieve(self, source: str = "docs") -> httpx.Response:
        return await self.http.post(
            "/v1/retrieve",
            json={"query": QUERY, "k": 5, "sources": [source]},
            headers=bearer(self.token),
        )

    async def record_count(self) -> int:
        return (await self.g.audit.verify()).checked

    async def fails_closed(self, response: httpx.Response, code: str, audited: bool = True) -> None:
        assert response.status_code == 503, response.text
        body = response.json()
        assert list(body) == ["error"], body
        assert set(body["error"]) == {"code", "message", "request_id"}
        assert body["error"]["code"] == code, body
        for text, _ in CORPUS.values():
            assert text not in response.text
        if not audited:
            return
        entries, _ = await self.g.audit.list(self.world.tenant, limit=1)
        record = entries[0].record
        assert record.kind == "retrieve"
        assert record.outcome == "error" and record.error_code == code, record
        assert record.returned_chunk_ids == ()
        assert record.request_id == body["error"]["request_id"] == response.headers["x-request-id"]
        assert (await self.g.audit.verify()).ok

    async def recovers(self, source: str = "docs", within_s: float = 20.0) -> None:
        """Once the fault is gone, the next answers are right again (bounded wait)."""
        deadline = time.monotonic() + within_s
        while True:
            response = await self.retrieve(source)
            if response.status_code == 200:
                break
            assert time.monotonic() < deadline, f"no recovery: {response.text}"
            await asyncio.sleep(0.2)
        for _ in range(3):  # and stays right
            response = await self.retrieve(source)
            assert response.status_code == 200, response.text
            assert [c["chunk_id"] for c in response.json()["chunks"]] == self.baseline[source]


@pytest.fixture(scope="module")
def openfga_child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedOpenFGA]:
    """An OpenFGA of this module's own: the faults stop, pause and restart it."""
    server = ManagedOpenFGA(tmp_path_factory.mktemp("faults-openfga"))
    server.start()
    try:
        yield server
    finally:
        server.resume()
        server.stop()


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    server = ChromaServer(tmp_path_factory.mktemp("faults-chroma") / "data")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
async def env(
    openfga_child: ManagedOpenFGA,
    chroma_server: ChromaServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Env]:
    with (
        FaultProxy(openfga_child.http_port) as fga_proxy,
        FaultProxy(chroma_server.port) as chroma_proxy,
    ):
        settings = load_settings(
            data_dir=tmp_path_factory.mktemp("faults-data"),
            openfga_url=fga_proxy.url,
            openfga_store_name=f"faults-{uuid.uuid4().hex[:12]}",
            openfga_timeout_s=OPENFGA_TIMEOUT_S,
            request_timeout_s=REQUEST_TIMEOUT_S,
        )
        g = await Gateway.start(settings, embeddings=HashEmbeddings())
        transport = httpx.ASGITransport(app=create_app(gateway=g))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://faults") as http:
                w = await World(g, http, "acme").setup(members=["alice", "bob"], agents=["bot"])
                await w.admin_call(
                    "POST",
                    "/v1/sources",
                    {"id": "remote", "kind": "chroma", "config": {"url": chroma_proxy.url}},
                )
                for source, prefix in (("docs", ""), ("remote", "r-")):
                    docs = [
                        doc(
                            prefix + i,
                            text,
                            viewers=["user:alice"] if ok else ["user:bob"],
                            agents=["agent:bot"],
                        )
                        for i, (text, ok) in CORPUS.items()
                    ]
                    await w.ingest(docs, source=source)
                task = await w.task("alice", "bot", ["source:docs", "source:remote"])
                e = Env(
                    g,
                    http,
                    w,
                    openfga_child,
                    fga_proxy,
                    chroma_server,
                    chroma_proxy,
                    w.agent_token("alice", "bot", task),
                    {},
                )
                for source in ("docs", "remote"):
                    response = await e.retrieve(source)
                    assert response.status_code == 200, response.text
                    e.baseline[source] = [c["chunk_id"] for c in response.json()["chunks"]]
                    allowed = {c.split("#")[0].removeprefix("r-") for c in e.baseline[source]}
                    assert allowed == {"rev1", "inc1"}
                yield e
        finally:
            TALLY.faulty_responses += fga_proxy.faults_injected + chroma_proxy.faults_injected
            await g.close()


# -- OpenFGA: doctored answers and broken connections ----------------------------------------

FGA_FAULTS: dict[str, Callable[[], Fault]] = {
    "slow_past_deadline": lambda: Fault.latency(OPENFGA_TIMEOUT_S + 1.5, BATCH_CHECK),
    "blackhole": lambda: Fault.blackhole(BATCH_CHECK),
    "http_500": lambda: Fault.respond(
        500, {"code": "internal_error", "message": "injected"}, BATCH_CHECK
    ),
    "http_503": lambda: Fault.respond(
        503, {"code": "unavailable", "message": "injected"}, BATCH_CHECK
    ),
    "http_429": lambda: Fault.respond(
        429, {"code": "rate_limited", "message": "injected"}, BATCH_CHECK
    ),
    "broken_status_line": lambda: Fault.corrupt(bad_status_line, BATCH_CHECK),
    "garbled_json": lambda: Fault.corrupt(garble_json, BATCH_CHECK),
    "json_cut_in_half": lambda: Fault.rewrite(truncate_json, BATCH_CHECK),
    "not_json": lambda: Fault.respond(200, b"<html>proxy error</html>", BATCH_CHECK),
    "empty_result": lambda: Fault.respond(200, {"result": {}}, BATCH_CHECK),
    "result_not_an_object": lambda: Fault.respond(200, {"result": ["allowed"]}, BATCH_CHECK),
    "half_the_items_missing": lambda: Fault.rewrite(drop_half_of_results, BATCH_CHECK),
    "per_item_error": lambda: Fault.rewrite(error_one_item, BATCH_CHECK),
    "unknown_correlation_ids_all_allowed": lambda: Fault.rewrite(
        rename_correlation_ids, BATCH_CHECK
    ),
    "connection_reset": lambda: Fault.reset(BATCH_CHECK),
    "connection_dropped": lambda: Fault.drop(BATCH_CHECK),
    "response_truncated": lambda: Fault.truncate(40, BATCH_CHECK),
    "headers_only": lambda: Fault.corrupt(
        lambda raw: raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n", BATCH_CHECK
    ),
}


@pytest.mark.parametrize("name", sorted(FGA_FAULTS))
async def test_openfga_fault_fails_closed_then_recovers(env: Env, name: str) -> None:
    env.fga_proxy.set(FGA_FAULTS[name]())
    try:
        response = await env.retrieve()
        await env.fails_closed(response, "authorization_unavailable")
        assert env.fga_proxy.requests(BATCH_CHECK)[-1].fault != "none"
    finally:
        env.fga_proxy.clear()
    TALLY.add(f"openfga:{name}")
    await env.recovers()


async def test_a_request_that_fails_closed_tells_the_operator_why(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    # The agent gets a code and a short message; the operator log gets the route, the
    # request id the agent saw and the cause, so the two can be matched.
    env.fga_proxy.set(FGA_FAULTS["http_500"]())
    try:
        with caplog.at_level(logging.WARNING, logger="scopegate.api"):
            response = await env.retrieve()
    finally:
        env.fga_proxy.clear()
    await env.fails_closed(response, "authorization_unavailable")
    lines = [r.getMessage() for r in caplog.records if r.name == "scopegate.api"]
    rid = response.headers["x-request-id"]
    assert any(
        "POST /v1/retrieve failed closed (authorization_unavailable" in line and rid in line
        for line in lines
    ), lines
    await env.recovers()


async def test_openfga_stopped_then_restarted_on_a_new_port(env: Env) -> None:
    await asyncio.to_thread(env.openfga.stop)
    try:
        await env.fails_closed(await env.retrieve(), "authorization_unavailable")
        ready = (await env.http.get("/readyz")).json()
        assert ready["ready"] is False and ready["openfga"] is False
    finally:
        await asyncio.to_thread(env.openfga.start)
        env.fga_proxy.retarget(env.openfga.http_port)
    TALLY.add("openfga:stopped")
    await env.recovers()


async def test_openfga_paused_hits_the_deadline(env: Env) -> None:
    env.openfga.pause()  # SIGSTOP: connections are accepted by the kernel, never answered
    try:
        started = time.monotonic()
        response = await env.retrieve()
        elapsed = time.monotonic() - started
        await env.fails_closed(response, "authorization_unavailable")
        assert elapsed < REQUEST_TIMEOUT_S + 1.0, f"a hung OpenFGA held the request {elapsed:.1f}s"
    finally:
        env.openfga.resume()
    TALLY.add("openfga:paused")
    await env.recovers()


async def test_latency_inside_the_deadline_is_not_a_fault(env: Env) -> None:
    env.fga_proxy.set(Fault.latency(OPENFGA_TIMEOUT_S / 4, BATCH_CHECK))
    try:
        response = await env.retrieve()
    finally:
        env.fga_proxy.clear()
    assert response.status_code == 200
    assert [c["chunk_id"] for c in response.json()["chunks"]] == env.baseline["docs"]


def item_errors_naming_objects(status: int, body: bytes) -> tuple[int, bytes]:
    """A BatchCheck answer whose first two items carry errors that name objects."""
    data = json.loads(body)
    result = data.get("result", {})
    for cid in list(result)[:2]:
        message = "tuple document:acme/sec1#viewer@user:acme/bob: UPSTREAM-DETAIL"
        result[cid] = {"error": {"input_error": "validation_error", "message": message}}
    return status, json.dumps(data).encode()


async def test_per_item_error_texts_reach_the_audit_record_never_the_body(env: Env) -> None:
    env.fga_proxy.set(Fault.rewrite(item_errors_naming_objects, BATCH_CHECK))
    try:
        response = await env.retrieve()
        await env.fails_closed(response, "authorization_unavailable")
    finally:
        env.fga_proxy.clear()
    message = response.json()["error"]["message"]
    assert re.fullmatch(r"OpenFGA could not answer \d+ check\(s\)", message), message
    for text in ("UPSTREAM-DETAIL", "acme/", "sec1", "viewer", "document:"):
        assert text not in response.text, text
    entry = await env.g.audit.get("acme", response.json()["error"]["request_id"])
    assert entry is not None
    record = entry.record
    assert record.extra["error"] == message
    assert "UPSTREAM-DETAIL" in record.extra["error_detail"]
    assert "document:acme/sec1" in record.extra["error_detail"]
    errored = [c for c in record.candidates if c.verdict == "error"]
    assert errored and all(c.errored_checks and not c.returned for c in errored)
    TALLY.add("openfga:per_item_error_text")
    await env.recovers()


def fail_after(answered: int) -> Callable[[int, bytes], tuple[int, bytes]]:
    """Pass the first ``answered`` BatchCheck answers through, then answer 500."""
    calls = itertools.count(1)

    def rewrite(status: int, body: bytes) -> tuple[int, bytes]:
        if next(calls) <= answered:
            return status, body
        return 500, b'{"code": "internal_error", "message": "injected after the first round"}'

    return rewrite


WORDS = [f"word{chr(ord('a') + i)}" for i in range(20)]


def checked_documents(seen: Seen) -> set[str]:
    """The bare ids of the documents one BatchCheck request asked about."""
    prefix = "document:acme/"
    return {
        check["tuple_key"]["object"].removeprefix(prefix)
        for check in seen.json()["checks"]
        if check["tuple_key"]["object"].startswith(prefix)
    }


async def test_a_fault_after_the_first_round_keeps_its_verdicts_on_the_record(env: Env) -> None:
    """OpenFGA fails during the post-filter's refill: no chunk is returned, and the
    error record still holds every candidate of the first round with its verdict (and
    the refill's documents as ``error``, with the upstream text in ``error_detail``)."""
    w = env.world
    await w.admin_call("POST", "/v1/sources", {"id": "wide", "kind": "memory"})
    # One readable document among twenty: the first window (k=2) cannot fill, so a
    # refill, and a second BatchCheck round, must follow.
    await w.ingest(
        [
            doc(
                f"w{i}",
                f"{QUERY} {' '.join(WORDS[: i + 1])}",  # distinct distances, w0 nearest
                viewers=["user:alice"] if i == 0 else ["user:bob"],
                agents=["agent:bot"],
            )
            for i in range(20)
        ],
        source="wide",
    )
    task = await w.task("alice", "bot", ["source:wide"])
    ctx = await env.g.verifier.averify_delegation(w.agent_token("alice", "bot", task))
    before = len(env.fga_proxy.requests(BATCH_CHECK))
    env.fga_proxy.set(Fault.rewrite(fail_after(1), BATCH_CHECK))
    request_id = uuid.uuid4().hex
    try:
        with pytest.raises(AuthorizationUnavailable):
            await env.g.retrieve(
                ctx, QUERY, 2, ["wide"], strategy="postfilter", request_id=request_id
            )
    finally:
        env.fga_proxy.clear()
    first, second = env.fga_proxy.requests(BATCH_CHECK)[before:]
    entry = await env.g.audit.get("acme", request_id)
    assert entry is not None
    record = entry.record
    assert record.outcome == "error" and record.error_code == "authorization_unavailable"
    assert record.returned_chunk_ids == ()
    assert record.extra["batch_rounds"] == 1
    assert "injected after the first round" in record.extra["error_detail"]
    decided = {c.document_id: c for c in record.candidates if c.verdict in ("allow", "deny")}
    assert set(decided) == checked_documents(first) and decided
    for candidate in decided.values():
        assert candidate.source == "wide" and candidate.chunk_ids and not candidate.returned
        assert candidate.verdict == ("allow" if candidate.document_id == "w0" else "deny")
    unanswered = {c.document_id for c in record.candidates if c.verdict == "error"}
    assert unanswered == checked_documents(second) and not unanswered & set(decided)
    TALLY.add("openfga:fails_after_first_round")


# -- OpenFGA: ListObjects (pre-filter) never trusted when it may be incomplete -------------------

LIST_FAULTS: dict[str, Callable[[], Fault]] = {
    "slow": lambda: Fault.latency(OPENFGA_TIMEOUT_S + 1.0, "list-objects"),
    "http_500": lambda: Fault.respond(
        500, {"code": "internal_error", "message": "injected"}, "list-objects"
    ),
    "stream_cut": lambda: Fault.truncate(200, "list-objects"),
    "reset": lambda: Fault.reset("list-objects"),
}


@pytest.mark.parametrize("name", sorted(LIST_FAULTS))
async def test_listobjects_fault_never_narrows_the_answer(env: Env, name: str) -> None:
    """A pre-filter whose ListObjects breaks either falls back (same exact answer) or fails
    closed; it never returns fewer or other chunks than the truth."""
    ctx = env.g.verifier.verify_delegation(env.token)
    env.fga_proxy.set(LIST_FAULTS[name]())
    try:
        try:
            result = await env.g.retrieve(ctx, QUERY, 5, ["docs"], strategy="prefilter")
        except Exception as exc:  # failing closed is acceptable too
            assert getattr(exc, "code", None) == "authorization_unavailable", exc
        else:
            assert [c.chunk_id for c in result.chunks] == env.baseline["docs"]
            assert result.outcome is not None and "postfilter" in result.outcome.strategy
        assert env.fga_proxy.requests("list-objects"), "the pre-filter did not ask ListObjects"
    finally:
        env.fga_proxy.clear()
    TALLY.add(f"listobjects:{name}")
    await env.recovers()


# -- the vector store ---------------------------------------------------------------------------

# The store's data calls: search (post-filter) and get by ids (pre-filter exact ranking);
# whichever the adaptive strategy picks, the fault is on its path.
CHROMA_DATA = ("/query", "/get")
CHROMA_FAULTS: dict[str, Callable[[], Fault]] = {
    "http_500": lambda: Fault.respond(
        500, {"error": "InternalError", "message": "injected"}, CHROMA_DATA
    ),
    "connection_reset": lambda: Fault.reset(CHROMA_DATA),
    "response_truncated": lambda: Fault.truncate(30, CHROMA_DATA),
    "garbled_json": lambda: Fault.corrupt(garble_json, CHROMA_DATA),
    "not_json": lambda: Fault.respond(200, b"<html>oops</html>", CHROMA_DATA),
    "wrong_shape": lambda: Fault.respond(
        200, {"ids": [["rev1#0"]], "documents": None}, CHROMA_DATA
    ),
}


@pytest.mark.parametrize("name", sorted(CHROMA_FAULTS))
async def test_chroma_fault_fails_closed_then_recovers(env: Env, name: str) -> None:
    env.chroma_proxy.set(CHROMA_FAULTS[name]())
    try:
        await env.fails_closed(await env.retrieve("remote"), "source_unavailable")
    finally:
        env.chroma_proxy.clear()
    TALLY.add(f"chroma:{name}")
    await env.recovers("remote")


async def test_chroma_server_killed_then_restarted(env: Env) -> None:
    await asyncio.to_thread(env.chroma.kill)
    try:
        await env.fails_closed(await env.retrieve("remote"), "source_unavailable")
        assert (await env.retrieve("docs")).status_code == 200  # other sources unaffected
    finally:
        await asyncio.to_thread(env.chroma.start)
    TALLY.add("chroma:killed")
    await env.recovers("remote")


async def test_chroma_slow_past_the_request_deadline(env: Env) -> None:
    env.chroma_proxy.set(Fault.latency(REQUEST_TIMEOUT_S + 1.0, CHROMA_DATA))
    try:
        started = time.monotonic()
        response = await env.retrieve("remote")
        assert time.monotonic() - started < REQUEST_TIMEOUT_S + 1.0
        await env.fails_closed(response, "source_unavailable")
    finally:
        env.chroma_proxy.clear()
    TALLY.add("chroma:slow")
    await env.recovers("remote")


# -- the audit store ----------------------------------------------------------------------------


class ReadOnlySqliteAuditStore(SqliteAuditStore):
    """The same audit file, opened by a connection SQLite refuses to write with
    (``PRAGMA query_only``): what a read-only file or mount looks like to the store,
    and it works for root, which ignores file modes."""

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()
        conn.execute("PRAGMA query_only = ON")
        return conn


def filler(i: int, size: int) -> AuditRecord:
    return AuditRecord(
        request_id=f"filler-{i}",
        time=datetime.now(UTC).isoformat(),
        tenant="filler",
        user="filler",
        agent=None,
        task=None,
        token_id="filler",
        kind="admin",
        query="x" * size,
        query_hash=None,
        sources=(),
        strategy="",
        store_id="",
        model_id="",
        consistency="",
        k=0,
        candidates=(),
        returned_chunk_ids=(),
        outcome="allowed",
        error_code=None,
        latency_ms=0.0,
    )


async def full_store(path: Path) -> SqliteAuditStore:
    """A SQLite audit store that has filled every page it may use (as on a full disk)."""
    probe = SqliteAuditStore(path)
    await probe.healthy()
    await probe.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    store = SqliteAuditStore(path, max_pages=pages + 2)
    i = 0
    for size in (3000, 1000, 300, 100, 30, 0):
        while True:
            try:
                await store.append(filler(i, size))
            except AuditUnavailable:
                break
            i += 1
    return store


@contextlib.asynccontextmanager
async def audit_replaced(env: Env, store: AuditStore) -> AsyncIterator[None]:
    original = env.g.audit
    env.g.audit = store
    try:
        yield
    finally:
        env.g.audit = original
        with contextlib.suppress(Exception):
            await store.close()


async def audit_unavailable_case(env: Env, store: AuditStore, name: str) -> None:
    before = await env.record_count()
    async with audit_replaced(env, store):
        await env.fails_closed(await env.retrieve(), "audit_unavailable", audited=False)
        # Faults elsewhere too: the record of the failure cannot be written either.
        env.fga_proxy.set(Fault.respond(500, {"code": "internal_error"}, BATCH_CHECK))
        try:
            await env.fails_closed(await env.retrieve(), "audit_unavailable", audited=False)
        finally:
            env.fga_proxy.clear()
    assert await env.record_count() == before, "a record was written through the fault"
    TALLY.add(f"audit:{name}")
    await env.recovers()
    assert await env.record_count() > before


async def test_audit_store_read_only(env: Env) -> None:
    store = ReadOnlySqliteAuditStore(env.g.settings.data_dir / "audit.db")
    assert not await store.healthy()
    await audit_unavailable_case(env, store, "read_only")


async def test_audit_store_full(env: Env, tmp_path: Path) -> None:
    store = await full_store(tmp_path / "full-audit.db")
    filled = (await store.verify()).checked
    await audit_unavailable_case(env, store, "full")
    reopened = SqliteAuditStore(tmp_path / "full-audit.db")
    try:
        verified = await reopened.verify()
        assert verified.ok and verified.checked == filled  # nothing slipped into the full one
    finally:
        await reopened.close()


async def test_audit_store_unreachable(env: Env) -> None:
    port = free_port()  # nothing listens there: connections are refused
    store = PostgresAuditStore(
        f"postgresql://scopegate@127.0.0.1:{port}/audit", connect_timeout_s=2
    )
    await audit_unavailable_case(env, store, "unreachable_postgres")


async def test_readiness_reports_the_audit_store(env: Env) -> None:
    store = ReadOnlySqliteAuditStore(env.g.settings.data_dir / "audit.db")
    async with audit_replaced(env, store):
        response = await env.http.get("/readyz")
        assert response.status_code == 503 and response.json()["audit"] is False
    assert (await env.http.get("/readyz")).status_code == 200


# -- the authorization model changes mid-request -------------------------------------------------


def deny_all_agents_model() -> dict[str, Any]:
    """The shipped model, except that no agent can read any document any more."""
    model = load_model()
    for type_def in model["type_definitions"]:
        if type_def["type"] == "document":
            type_def["relations"]["agent_can_read"] = {"computedUserset": {"relation": "owner"}}
    return model


async def write_model(env: Env, model: dict[str, Any]) -> str:
    body = {k: model[k] for k in ("schema_version", "type_definitions", "conditions") if k in model}
    async with httpx.AsyncClient(base_url=env.openfga.url) as fga:
        response = await fga.post(f"/stores/{env.g.fga.store_id}/authorization-models", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["authorization_model_id"])


async def test_model_changed_mid_request_uses_the_model_it_started_with(env: Env) -> None:
    pinned = env.g.fga.model_id
    seen_before = len(env.fga_proxy.requests(BATCH_CHECK))
    env.fga_proxy.set(Fault.latency(0.5, BATCH_CHECK))
    try:
        in_flight = asyncio.create_task(env.retrieve())
        await asyncio.sleep(0.15)
        newer = await write_model(env, deny_all_agents_model())
        response = await in_flight
        after = await env.retrieve()  # and the next request too: the model is pinned
    finally:
        env.fga_proxy.clear()
        await write_model(env, load_model())
    assert newer != pinned
    for r in (response, after):
        assert r.status_code == 200, r.text
        assert [c["chunk_id"] for c in r.json()["chunks"]] == env.baseline["docs"]
    for seen in env.fga_proxy.requests(BATCH_CHECK)[seen_before:]:
        assert seen.json()["authorization_model_id"] == pinned
    record = await env.g.audit.get("acme", response.json()["request_id"])
    assert record is not None and record.record.model_id == pinned
    TALLY.add("openfga:model_changed")


@pytest.fixture(scope="module", autouse=True)
def report_tally(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if TALLY.faults and capture is not None:
        with capture.global_and_fixture_disabled():
            print(
                f"\nfaults injected: {len(TALLY.faults)} cases, {sum(TALLY.faults.values())} "
                f"runs, {TALLY.faulty_responses} faulty responses from the proxies"
            )
