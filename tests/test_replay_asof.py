"""Replays as of the decision, end to end on the real OpenFGA (gateway/changelog.py,
the as-of half of gateway/replay.py, the archive tables of gateway/audit.py).

The archiver copies OpenFGA's change log into the audit database; each retrieval record
keeps the archive's position and the decision time; a replay as of the decision rebuilds
the tuples its checks could read, asks the same checks of a scratch store, and explains
every change since with its time and the admin request that made it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.audit import ArchivedChange, SqliteAuditStore, open_audit_store
from gateway.audit_cli import audit_in_process, verify_audit
from gateway.cli import build_parser
from gateway.errors import AuthorizationUnavailable
from gateway.fga import SCRATCH_STORE_PREFIX
from gateway.identity import PrincipalContext
from gateway.service import Gateway
from tests.world import World, bearer, doc

QUERY = "quarterly planning memo"


@pytest.fixture(autouse=True)
def postfilter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every searched document becomes a recorded candidate (see tests/test_review.py)."""
    monkeypatch.setenv("SCOPEGATE_STRATEGY", "postfilter")
    monkeypatch.setenv("SCOPEGATE_CHANGELOG_ARCHIVE", "true")


def _by_doc(replay: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["document_id"]: d for d in replay["documents"]}


async def _replay(
    http: httpx.AsyncClient, headers: dict[str, str], rid: str, body: Any = None
) -> dict[str, Any]:
    response = await http.post(f"/v1/audit/decisions/{rid}/replay", json=body, headers=headers)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def _admin_actions(gateway: Gateway, action: str) -> list[tuple[str, datetime]]:
    """(intent request id, time) of each admin mutation ``action``, oldest first."""
    found = []
    async for entry in gateway.audit.iter_all("acme"):
        extra = entry.record.extra
        intent = extra.get("phase") == "intent" and extra.get("action") == action
        if entry.record.kind == "admin" and intent:
            found.append((entry.record.request_id, datetime.fromisoformat(entry.record.time)))
    return found


async def _scratch_stores(gateway: Gateway) -> list[str]:
    """Names of the scratch stores on the server (every page)."""
    names: list[str] = []
    token = None
    while True:
        options = {"page_size": 100, **({"continuation_token": token} if token else {})}
        page = await gateway.fga.client.list_stores(options)
        names += [s.name for s in page.stores or [] if s.name.startswith(SCRATCH_STORE_PREFIX)]
        token = page.continuation_token
        if not token:
            return names


async def test_replay_as_of_the_decision_names_the_changes_since(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await World(gateway, http, "acme").setup(members=["alice", "rita"], agents=["summarizer"])
    await w.relationships(
        writes=[
            {"user": "user:rita", "relation": "reviewer", "object": "tenant:acme"},
            {"user": "user:alice", "relation": "member", "object": "group:eng"},
        ]
    )
    await w.ingest(
        [
            doc("d1", "Quarterly planning memo: hiring.", ["user:alice"], ["agent:summarizer"]),
            doc(
                "d2", "Quarterly planning memo: budget.", ["group:eng#member"], ["agent:summarizer"]
            ),
        ]
    )
    task = await w.task("alice", "summarizer", ["source:docs"])
    reviewer = bearer(gateway.mint_token(tenant="acme", user="rita"))
    # The archive has read the log up to here (in the background it lags by a poll).
    assert gateway.changelog is not None
    await gateway.changelog.poll_once()

    first = await w.retrieve("alice", "summarizer", task, QUERY, k=10)
    assert first.status_code == 200, first.text
    assert {c["document_id"] for c in first.json()["chunks"]} == {"d1", "d2"}
    first_id = first.json()["request_id"]

    # Two admin requests: one revokes alice's grant on d1, one drops her from eng.
    await w.relationships(
        deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:d1"}]
    )
    await w.relationships(
        deletes=[{"user": "user:alice", "relation": "member", "object": "group:eng"}]
    )
    second = await w.retrieve("alice", "summarizer", task, QUERY, k=10)
    assert second.status_code == 200 and second.json()["chunks"] == []
    second_id = second.json()["request_id"]

    record = await gateway.audit.get("acme", first_id)
    assert record is not None and record.record.outcome == "allowed"
    kept = record.record.extra["changelog"]
    assert kept["store_id"] == gateway.fga.store_id
    assert kept["archive_seq"] is not None and kept["archive_seq"] >= 1
    assert kept["started_at"] <= kept["decided_at"]

    replay = await _replay(http, reviewer, first_id, {"as_of": "decision"})
    docs = _by_doc(replay)
    assert replay["as_of"]["exact"] is True and replay["as_of"]["mismatches"] == []
    assert replay["as_of"]["scratch_store"] == "removed"
    assert replay["as_of"]["archive_anchor"] == "ok"
    assert replay["as_of"]["archive_seq"] == kept["archive_seq"]
    for name in ("d1", "d2"):
        d = docs[name]
        assert (d["was"], d["then"], d["now"]) == ("allow", "allow", "deny"), d
        assert d["then_matches_was"] and d["then_failed_checks"] == []
        assert d["failed_checks"] == ["user_can_read"]
        assert d["flipped_checks"] == ["user_can_read"]
        user_can_read = next(c for c in d["conjuncts"] if c["check"] == "user_can_read")
        assert user_can_read == {
            "check": "user_can_read",
            "was": "pass",
            "then": "pass",
            "now": "fail",
        }

    (revoke_id, revoked_at), (leave_id, left_at) = (
        await _admin_actions(gateway, "relationships.write")
    )[-2:]
    d1_changes = [c for c in docs["d1"]["changes"] if c["flips"]]
    d2_changes = [c for c in docs["d2"]["changes"] if c["flips"]]
    assert [(c["operation"], c["user"], c["relation"], c["object"]) for c in d1_changes] == [
        ("delete", "user:alice", "viewer", "document:d1")
    ]
    assert [(c["operation"], c["user"], c["relation"], c["object"]) for c in d2_changes] == [
        ("delete", "user:alice", "member", "group:eng")
    ]
    assert d1_changes[0]["admin_request_id"] == revoke_id
    assert d2_changes[0]["admin_request_id"] == leave_id
    decided = datetime.fromisoformat(kept["decided_at"])
    for change, admin_time in ((d1_changes[0], revoked_at), (d2_changes[0], left_at)):
        assert change["admin_action"] == "relationships.write" and change["admin_user"] == "admin"
        assert change["checks"] == ["user_can_read"] and change["made_by_gateway"]
        changed_at = datetime.fromisoformat(change["time"])
        assert decided < changed_at and admin_time <= changed_at
    assert {c["admin_request_id"] for c in replay["changes"]} >= {revoke_id, leave_id}
    # The admin record each change links to is a record a reviewer can open.
    linked = await http.get(f"/v1/audit/decisions/{revoke_id}", headers=reviewer)
    assert linked.status_code == 200 and linked.json()["extra"]["action"] == "relationships.write"

    # Now (no as_of): both denied; the same record replayed as of the second decision
    # rebuilds its denials too.
    plain = _by_doc(await _replay(http, reviewer, first_id))
    assert {d: plain[d]["now"] for d in plain} == {"d1": "deny", "d2": "deny"}
    assert "then" not in plain["d1"]
    later = _by_doc(await _replay(http, reviewer, second_id, {"as_of": "decision"}))
    for d in later.values():
        assert (d["was"], d["then"], d["now"]) == ("deny", "deny", "deny")
        assert d["then_matches_was"] and d["changes"] == [] and d["flipped_checks"] == []
    assert await _scratch_stores(gateway) == []


async def test_a_change_that_lands_between_the_position_and_the_checks_counts(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    """The archive's position is read when the request starts; a grant written after
    that but before the checks is still part of the state as of the decision, because
    the recorded decision time bounds it."""
    w = await World(gateway, http, "acme").setup(members=["alice", "rita"], agents=["bot"])
    await w.relationships(
        writes=[{"user": "user:rita", "relation": "reviewer", "object": "tenant:acme"}]
    )
    await w.ingest([doc("d1", "Quarterly planning memo.", [], ["agent:bot"])])
    task = await w.task("alice", "bot", ["source:docs"])
    assert gateway.changelog is not None
    await gateway.changelog.stop()  # the position stays where it is
    await gateway.changelog.sync()
    position = gateway.changelog.position_at(time.monotonic())
    assert position is not None
    await w.relationships(
        writes=[{"user": "user:alice", "relation": "viewer", "object": "document:d1"}]
    )
    response = await w.retrieve("alice", "bot", task, QUERY, k=5)
    assert [c["document_id"] for c in response.json()["chunks"]] == ["d1"]
    rid = response.json()["request_id"]
    entry = await gateway.audit.get("acme", rid)
    assert entry is not None
    assert entry.record.extra["changelog"]["archive_seq"] == position.seq  # the grant is later

    reviewer = bearer(gateway.mint_token(tenant="acme", user="rita"))
    d1 = _by_doc(await _replay(http, reviewer, rid, {"as_of": "decision"}))["d1"]
    assert (d1["was"], d1["then"]) == ("allow", "allow") and d1["then_matches_was"]


async def test_an_authzen_evaluation_keeps_its_position_and_replays_as_of_its_decision(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    """An AuthZEN evaluation's record is a decision like a retrieval's: it keeps the
    archive's position, and a replay as of it rebuilds its verdicts and names the
    change since."""
    w = await World(gateway, http, "acme").setup(members=["alice", "rita"], agents=["bot"])
    await w.relationships(
        writes=[{"user": "user:rita", "relation": "reviewer", "object": "tenant:acme"}]
    )
    await w.ingest(
        [
            doc("d1", "Quarterly planning memo.", ["user:alice"], ["agent:bot"]),
            doc("d2", "Salary bands.", [], ["agent:bot"]),
        ]
    )
    task = await w.task("alice", "bot", ["source:docs"])
    assert gateway.changelog is not None
    await gateway.changelog.poll_once()
    body = {
        "subject": {"type": "user", "id": "alice"},
        "action": {"name": "read"},
        "evaluations": [
            {"resource": {"type": "document", "id": "d1"}},
            {"resource": {"type": "document", "id": "d2"}},
        ],
    }
    headers = bearer(w.agent_token("alice", "bot", task))
    response = await http.post("/access/v1/evaluations", json=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json() == {"evaluations": [{"decision": True}, {"decision": False}]}
    rid = response.headers["x-request-id"]
    entry = await gateway.audit.get("acme", rid)
    assert entry is not None and entry.record.strategy == "authzen"
    kept = entry.record.extra["changelog"]
    assert kept["store_id"] == gateway.fga.store_id
    assert kept["archive_seq"] is not None and kept["archive_seq"] >= 1
    assert kept["started_at"] <= kept["decided_at"]

    await w.relationships(
        deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:d1"}]
    )
    reviewer = bearer(gateway.mint_token(tenant="acme", user="rita"))
    replay = await _replay(http, reviewer, rid, {"as_of": "decision"})
    assert replay["as_of"]["archive_seq"] == kept["archive_seq"]
    assert replay["as_of"]["exact"] and replay["as_of"]["archive_anchor"] == "ok"
    assert not any("keeps no change-log position" in note for note in replay["notes"])
    docs = _by_doc(replay)
    assert (docs["d1"]["was"], docs["d1"]["then"], docs["d1"]["now"]) == ("allow", "allow", "deny")
    assert (docs["d2"]["was"], docs["d2"]["then"], docs["d2"]["now"]) == ("deny", "deny", "deny")
    assert docs["d2"]["then_failed_checks"] == ["user_can_read"]
    flipped = [c for c in docs["d1"]["changes"] if c["flips"]]
    assert [(c["operation"], c["user"], c["object"]) for c in flipped] == [
        ("delete", "user:alice", "document:d1")
    ]


async def test_an_expiry_since_the_decision_is_no_change_of_tuples(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await World(gateway, http, "acme").setup(members=["alice", "rita"], agents=["bot"])
    await w.relationships(
        writes=[{"user": "user:rita", "relation": "reviewer", "object": "tenant:acme"}]
    )
    await w.ingest([doc("d1", "Quarterly planning memo.", ["user:alice"], ["agent:bot"])])
    expires = datetime.now(UTC) + timedelta(seconds=2)
    task = await w.task("alice", "bot", ["source:docs"], expires.isoformat())
    response = await w.retrieve("alice", "bot", task, QUERY, k=5)
    assert [c["document_id"] for c in response.json()["chunks"]] == ["d1"]
    while datetime.now(UTC) < expires + timedelta(milliseconds=300):
        await asyncio.sleep(0.2)
    reviewer = bearer(gateway.mint_token(tenant="acme", user="rita"))
    replay = await _replay(http, reviewer, response.json()["request_id"], {"as_of": "decision"})
    d1 = _by_doc(replay)["d1"]
    assert (d1["was"], d1["then"], d1["now"]) == ("allow", "allow", "deny")
    assert set(d1["flipped_checks"]) == {"task_active", "document_in_task_scope"}
    assert d1["changes"] == []  # the world changed by time alone
    assert f"task:{task} has expired (its time limit has passed)" in d1["explanations"]


async def test_without_the_background_archive_a_replay_reads_the_log_itself(
    openfga: Any, embeddings: Any, tmp_path: Any
) -> None:
    """Archiving off (``SCOPEGATE_CHANGELOG_ARCHIVE=false``): records carry no
    position, and an as-of replay brings the archive up to date from OpenFGA's log
    before placing the record by its decision time."""
    from gateway.api import create_app
    from tests.conftest import make_settings

    settings = make_settings(openfga, tmp_path / "data", changelog_archive=False)
    g = await Gateway.start(settings, embeddings=embeddings)
    try:
        assert g.changelog is None
        transport = httpx.ASGITransport(app=create_app(gateway=g))
        async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as http:
            w = await World(g, http, "acme").setup(members=["alice", "rita"], agents=["bot"])
            await w.relationships(
                writes=[{"user": "user:rita", "relation": "reviewer", "object": "tenant:acme"}]
            )
            await w.ingest([doc("d1", "Quarterly planning memo.", ["user:alice"], ["agent:bot"])])
            task = await w.task("alice", "bot", ["source:docs"])
            rid = (await w.retrieve("alice", "bot", task, QUERY, k=5)).json()["request_id"]
            entry = await g.audit.get("acme", rid)
            assert entry is not None and entry.record.extra["changelog"]["archive_seq"] is None
            await w.relationships(
                deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:d1"}]
            )
            reviewer = bearer(g.mint_token(tenant="acme", user="rita"))
            replay = await _replay(http, reviewer, rid, {"as_of": "decision"})
        d1 = _by_doc(replay)["d1"]
        assert (d1["was"], d1["then"], d1["now"]) == ("allow", "allow", "deny")
        assert [c["operation"] for c in d1["changes"] if c["flips"]] == ["delete"]
        assert any("decision time alone" in note for note in replay["notes"])
        assert replay["as_of"]["archive_head_seq"] >= 1
    finally:
        await g.close()


def _cli_args(**values: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"outcome": None, "limit": 20, "output": None, **values})


async def test_cli_replays_as_of_the_decision_and_tells_a_documents_history(
    gateway: Gateway, http: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
) -> None:
    w = await World(gateway, http, "acme").setup(members=["alice", "rita"], agents=["bot"])
    await w.relationships(
        writes=[{"user": "user:rita", "relation": "reviewer", "object": "tenant:acme"}]
    )
    await w.ingest(
        [doc("d1", "Quarterly planning memo.", ["user:alice"], ["agent:bot"], folder="plans")]
    )
    task = await w.task("alice", "bot", ["source:docs"])
    rid = (await w.retrieve("alice", "bot", task, QUERY, k=5)).json()["request_id"]
    await w.relationships(
        deletes=[{"user": "agent:bot", "relation": "agent_viewer", "object": "document:d1"}],
        writes=[{"user": "agent:bot", "relation": "agent_viewer", "object": "folder:plans"}],
    )
    await w.relationships(
        deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:d1"}]
    )
    ((revoke_id, _),) = (await _admin_actions(gateway, "relationships.write"))[-1:]
    rita = PrincipalContext("acme", "rita", "cli-test")
    capsys.readouterr()

    parse = build_parser().parse_args
    args = parse(
        ["audit", "replay", rid, "--as-of", "decision", "--tenant", "acme", "--as", "rita"]
    )
    assert await audit_in_process("audit_replay", args, gateway, rita) == 0
    out = capsys.readouterr().out
    replayed = json.loads(out)
    d1 = _by_doc(replayed)["d1"]
    assert (d1["was"], d1["then"], d1["now"]) == ("allow", "allow", "deny")
    assert replayed["as_of"]["exact"]

    args = parse(["audit", "history", "document:d1", "--tenant", "acme", "--as", "rita"])
    assert await audit_in_process("audit_history", args, gateway, rita) == 0
    captured = capsys.readouterr()
    history = json.loads(captured.out)
    assert "deleted user:alice viewer document:d1" in captured.err
    assert history["object"] == "document:d1"
    assert {"document:d1", "folder:plans", "source:docs"} <= set(history["objects"])
    lines = [(c["operation"], c["user"], c["relation"], c["object"]) for c in history["changes"]]
    assert ("write", "user:alice", "viewer", "document:d1") in lines
    assert ("write", "agent:bot", "agent_viewer", "folder:plans") in lines
    assert lines[-1] == ("delete", "user:alice", "viewer", "document:d1")
    assert history["changes"][-1]["admin_request_id"] == revoke_id
    times = [c["time"] for c in history["changes"]]
    assert times == sorted(times)

    # The same commands with --url go through the client and print the same answers.
    from gateway.audit_cli import replay_or_history_over_http
    from gateway.client import AsyncScopegateClient

    token = gateway.mint_token(tenant="acme", user="rita")
    async with AsyncScopegateClient("http://scopegate", token, http=http) as client:
        args = _cli_args(request_id=rid, what_if=[], as_of="decision")
        await replay_or_history_over_http("audit_replay", args, client)
        out = capsys.readouterr()
        assert _by_doc(json.loads(out.out))["d1"]["then"] == "allow"
        assert f"{rid} as of its decision" in out.err and "matches the record" in out.err
        assert f"admin request {revoke_id}" in out.err
        await replay_or_history_over_http("audit_history", _cli_args(ref="document:d1"), client)
        out = capsys.readouterr()
        assert json.loads(out.out)["changes"] == history["changes"]
        assert "deleted user:alice viewer document:d1" in out.err


async def test_archive_status_in_readyz_and_metrics(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    from gateway.api import create_app
    from gateway.metrics import Metrics

    await World(gateway, http, "acme").setup(members=["alice"])
    assert gateway.changelog is not None
    await gateway.changelog.sync()
    ready = (await http.get("/readyz")).json()
    assert ready["ready"] is True
    status = ready["changelog"]
    assert status["running"] and status["within_bound"] and status["archived_seq"] >= 3
    assert 0 <= status["lag_s"] <= status["lag_bound_s"]

    metrics = Metrics()
    create_app(gateway=gateway, metrics=metrics)
    text = metrics.render()[0].decode()
    assert "scopegate_changelog_lag_seconds" in text
    archived = next(
        line
        for line in text.splitlines()
        if line.startswith("scopegate_changelog_archived_changes ")
    )
    assert float(archived.split()[1]) >= 3


async def _until(condition: Any, what: str) -> None:
    """Wait for a background task to get somewhere (a bound turns a hang into a failure)."""
    for _ in range(600):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


async def test_the_archive_never_fails_readiness_or_retrievals_and_stops_while_openfga_hangs(
    openfga: Any, embeddings: Any, tmp_path: Any
) -> None:
    """On by default: with OpenFGA's change log failing, then not answering at all, the
    gateway stays ready, retrievals are answered and recorded, and shutdown does not
    wait for the log."""
    from gateway.api import create_app
    from tests.conftest import make_settings
    from tests.faultproxy import Fault, FaultProxy

    with FaultProxy(openfga.http_port) as proxy:
        # Without the exact cache's probe, the archiver is the only reader of the log.
        settings = make_settings(
            openfga, tmp_path / "data", openfga_url=proxy.url, decision_cache_exact=False
        )
        g = await Gateway.start(settings, embeddings=embeddings)
        archiver = g.changelog
        try:
            assert archiver is not None
            transport = httpx.ASGITransport(app=create_app(gateway=g))
            async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as http:
                w = await World(g, http, "acme").setup(members=["alice"], agents=["bot"])
                await w.ingest(
                    [doc("d1", "Quarterly planning memo.", ["user:alice"], ["agent:bot"])]
                )
                task = await w.task("alice", "bot", ["source:docs"])
                await archiver.sync()
                failed = archiver.stats.failures
                proxy.set(Fault.respond(500, {"code": "internal_error"}, path="/changes"))
                await _until(lambda: archiver.stats.failures > failed, "a failed poll")

                response = await w.retrieve("alice", "bot", task, QUERY, k=5)
                assert response.status_code == 200, response.text
                assert [c["document_id"] for c in response.json()["chunks"]] == ["d1"]
                entry = await g.audit.get("acme", response.json()["request_id"])
                assert entry is not None
                assert entry.record.extra["changelog"]["archive_seq"] is not None
                ready = await http.get("/readyz")
                assert ready.status_code == 200 and ready.json()["ready"] is True
                status = ready.json()["changelog"]
                assert status["running"] and status["failures"] > failed
                assert status["last_error"]

                # The log stops answering at all: a poll hangs in it.
                proxy.set(Fault.blackhole(path="/changes"))
                asked = len(proxy.requests("/changes"))
                await _until(lambda: len(proxy.requests("/changes")) > asked, "a hanging poll")
                assert (await w.retrieve("alice", "bot", task, QUERY, k=5)).status_code == 200
                assert (await http.get("/readyz")).json()["ready"] is True
        finally:
            await asyncio.wait_for(g.close(), timeout=30)
        assert archiver is not None and not archiver.status()["running"]


async def test_the_change_log_reads_from_a_start_time_or_a_token(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    """What the archiver relies on in OpenFGA's ReadChanges (all types, no filter)."""
    await World(gateway, http, "acme").setup(members=["alice"], agents=["bot"])
    fga = gateway.fga
    whole, token = await fga.read_change_log(None, None, 100)
    objects = {c.tuple.object.partition(":")[0] for c in whole}
    assert {"tenant", "source"} <= objects  # every object type in one stream
    assert all(c.operation == "write" for c in whole) and token
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert (await fga.read_change_log(epoch, None, 100))[0] == whole
    await asyncio.sleep(0.05)
    recent = datetime.now(UTC) - timedelta(milliseconds=10)
    assert (await fga.read_change_log(recent, None, 100))[0] == []
    # OpenFGA refuses a start time that is not in the past (its own clock): the
    # archiver never sweeps from later than its overlap before now.
    with pytest.raises(AuthorizationUnavailable):
        await fga.read_change_log(datetime.now(UTC) + timedelta(hours=1), None, 100)
    # Nothing newer: the same token comes back, and a page size is honoured.
    assert await fga.read_change_log(None, token, 100) == ([], token)
    first, next_token = await fga.read_change_log(None, None, 2)
    assert first == whole[:2] and next_token and next_token != token
    assert (await fga.read_change_log(None, next_token, 100))[0] == whole[2:]


async def test_scratch_stores_left_behind_are_removed(gateway: Gateway) -> None:
    from openfga_sdk.models.create_store_request import CreateStoreRequest

    name = f"{SCRATCH_STORE_PREFIX}interrupted"
    await gateway.fga.client.create_store(CreateStoreRequest(name=name))
    assert name in await _scratch_stores(gateway)
    assert await gateway.fga.remove_stale_scratch_stores(older_than_s=3600) == 0  # too recent
    assert await gateway.fga.remove_stale_scratch_stores(older_than_s=0) >= 1
    assert await _scratch_stores(gateway) == []
    assert (await gateway.fga.client.get_store()).id == gateway.fga.store_id  # its own stays


async def test_audit_verify_checks_the_archive_chain_and_names_a_tampered_change(
    gateway: Gateway, http: httpx.AsyncClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["bot"])
    await w.relationships(
        writes=[{"user": "user:alice", "relation": "member", "object": "group:eng"}]
    )
    assert gateway.changelog is not None and isinstance(gateway.audit, SqliteAuditStore)
    await gateway.changelog.sync()
    store_id = gateway.fga.store_id
    head = await gateway.audit.archive_head(store_id)
    assert head is not None and head.seq >= 3
    assert await verify_audit(gateway.audit) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["ok"] and report["archive"]["ok"]
    assert report["archive"]["stores"][store_id]["checked"] >= head.seq
    assert "audit chain intact" in out.err
    assert re.search(r"archive chain verified: True \((\d+) changes, 1 store\)", out.err)

    tamperings = {
        "edited": ("UPDATE changelog_archive SET user_ref = 'user:acme/mallory'", "hash does not"),
        "hidden": ("UPDATE changelog_archive SET user_set = 1 - user_set", "user_set does not"),
        "deleted": ("DELETE FROM changelog_archive", "change 2 is missing"),
    }
    for name, (statement, reason) in tamperings.items():
        copy = tmp_path / f"{name}.db"
        with (
            contextlib.closing(sqlite3.connect(gateway.audit.path)) as src,
            contextlib.closing(sqlite3.connect(copy)) as dst,
        ):
            src.backup(dst)
        with contextlib.closing(sqlite3.connect(copy)) as conn:
            conn.execute(f"{statement} WHERE store_id = ? AND seq = 2", (store_id,))
            conn.commit()
        store = SqliteAuditStore(copy)
        try:
            assert await verify_audit(store) == 1, name
            out = capsys.readouterr()
            report = json.loads(out.out)
            assert report["ok"] is True  # the log itself is intact
            broken = report["archive"]["stores"][store_id]
            assert not report["archive"]["ok"] and broken["first_broken_seq"] == 2, name
            assert broken["checked"] == 1 and reason in broken["reason"], name
            assert "archive chain verified: False" in out.err
            assert f"store {store_id}: BROKEN at change 2: {broken['reason']}" in out.err
            if name == "edited":
                assert "change 2 now holds: write user:acme/mallory " in out.err
            if name == "deleted":
                assert "change 2: no such change" in out.err
        finally:
            await store.close()
    assert (await gateway.audit.verify_archive(store_id)).ok  # the live store was untouched


def _rewrite_archive(path: Path, store_id: str, at: int, *, truncate: bool) -> None:
    """Rewrite the archive as someone with write access to the database would, keeping
    its chain consistent: change ``at`` names another user (every hash from there on
    recomputed), or the archive ends before ``at``."""
    from dataclasses import replace

    from gateway.audit import GENESIS_HASH, archive_hash

    with contextlib.closing(sqlite3.connect(path)) as conn:
        columns = "seq, time_us, operation, user_ref, relation, object, condition"
        rows = conn.execute(
            f"SELECT {columns} FROM changelog_archive WHERE store_id = ? ORDER BY seq",
            (store_id,),
        ).fetchall()
        hash_, seq = GENESIS_HASH, 0
        for row in rows:
            change = ArchivedChange(*row)
            if truncate and change.seq >= at:
                break
            if change.seq == at:
                change = replace(change, user="user:acme/mallory")
            hash_, seq = archive_hash(hash_, store_id, change), change.seq
            user_set = int("#" in change.user or change.user.endswith(":*"))
            conn.execute(
                "UPDATE changelog_archive SET user_ref = ?, user_set = ?, hash = ?"
                " WHERE store_id = ? AND seq = ?",
                (change.user, user_set, hash_, store_id, change.seq),
            )
        conn.execute(
            "DELETE FROM changelog_archive WHERE store_id = ? AND seq > ?", (store_id, seq)
        )
        conn.execute(
            "UPDATE changelog_cursor SET head_seq = ?, head_hash = ? WHERE store_id = ?",
            (seq, hash_, store_id),
        )
        conn.commit()


async def test_audit_verify_finds_an_archive_rewritten_with_its_hashes_recomputed(
    gateway: Gateway, http: httpx.AsyncClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A history rewritten from some change on, every hash recomputed, is a consistent
    chain; the hash a (hash-chained) audit record kept at its position gives it away,
    and so does an archive cut short before a recorded position."""
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["bot"])
    await w.ingest([doc("d1", "Quarterly planning memo.", ["user:alice"], ["agent:bot"])])
    task = await w.task("alice", "bot", ["source:docs"])
    assert gateway.changelog is not None and isinstance(gateway.audit, SqliteAuditStore)
    await gateway.changelog.sync()
    rid = (await w.retrieve("alice", "bot", task, QUERY, k=5)).json()["request_id"]
    entry = await gateway.audit.get("acme", rid)
    assert entry is not None
    position = entry.record.extra["changelog"]["archive_seq"]
    assert position is not None and position >= 3
    store_id = gateway.fga.store_id
    for name, truncate in (("rewritten", False), ("truncated", True)):
        copy = tmp_path / f"{name}.db"
        with (
            contextlib.closing(sqlite3.connect(gateway.audit.path)) as src,
            contextlib.closing(sqlite3.connect(copy)) as dst,
        ):
            src.backup(dst)
        _rewrite_archive(copy, store_id, 2, truncate=truncate)
        store = SqliteAuditStore(copy)
        try:
            assert (await store.verify_archive(store_id)).ok, name  # the chain links up
            assert await verify_audit(store) == 1, name
            out = capsys.readouterr()
            broken = json.loads(out.out)["archive"]["stores"][store_id]
            assert not broken["ok"], name
            if truncate:
                assert broken["first_broken_seq"] >= 2
                assert "is not in the archive" in broken["reason"]
            else:
                assert broken["first_broken_seq"] == position
                assert "recorded another chain hash" in broken["reason"]
            assert "archive chain verified: False" in out.err
        finally:
            await store.close()


# -- the archive itself, on both databases ------------------------------------------------


def _change(time_us: int, op: str, user: str, obj: str = "document:acme/d1") -> ArchivedChange:
    return ArchivedChange(0, time_us, op, user, "viewer", obj)


@pytest.fixture(params=["sqlite", "postgres"])
def archive_dsn(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    from tests.conftest import pg_schema_dsn

    return pg_schema_dsn(request.getfixturevalue("pg_dsn"), "archive")


async def test_archive_skips_what_it_holds_and_chains_every_change(
    archive_dsn: str, tmp_path: Any
) -> None:
    store = open_audit_store(archive_dsn, tmp_path)
    other = open_audit_store(archive_dsn, tmp_path)  # a second replica's archiver
    try:
        assert await store.archive_head("s1") is None
        first = [_change(1_000, "write", "user:acme/a"), _change(2_000, "write", "user:acme/b")]
        head = await store.archive_changes("s1", first, overlap_us=500)
        assert (head.seq, head.newest_us, head.resume_from_us) == (2, 2_000, 1_500)
        # A sweep reads an overlapping window again, with a straggler committed late
        # (stamped before the newest change): only the straggler is new.
        straggler = _change(1_800, "delete", "user:acme/a")
        again = [first[1], straggler, _change(3_000, "write", "user:acme/c")]
        head = await other.archive_changes("s1", again, overlap_us=500)
        assert head.seq == 4
        head = await store.archive_changes("s1", again, overlap_us=500)
        assert head.seq == 4  # nothing twice, whoever archives
        assert (await store.archive_changes("s2", [], overlap_us=500)).seq == 0

        changes = await store.archived_changes("s1", ["document:acme/d1"])
        assert [(c.seq, c.time_us) for c in changes] == [
            (1, 1_000),
            (3, 1_800),
            (2, 2_000),
            (4, 3_000),
        ]
        only_b = await store.archived_changes("s1", ["document:acme/d1"], subjects=["user:acme/b"])
        assert [c.user for c in only_b] == ["user:acme/b"]
        assert (await store.verify_archive("s1")).ok
        assert (await store.verify_archive("s2")).ok
        every = await store.verify_archives()
        assert set(every) == {"s1", "s2"} and every["s1"].checked == 4 and every["s1"].ok
        # Checked against positions records keep: the hash there, and a store that has
        # no archive at all.
        kept = await store.archive_hash_at("s1", 3)
        assert kept is not None
        assert (await store.verify_archives({"s1": {3: {kept: 7}}}))["s1"].ok
        rewritten = (await store.verify_archives({"s1": {3: {"0" * 64: 7}}}))["s1"]
        assert not rewritten.ok and rewritten.first_broken_seq == 3
        assert "audit entry 7" in str(rewritten.reason)
        lost = (await store.verify_archives({"s3": {1: {kept: 9}}}))["s3"]
        assert not lost.ok and "is not in the archive" in str(lost.reason)
    finally:
        await store.close()
        await other.close()
    if archive_dsn.startswith("sqlite"):
        # Editing an archived change breaks the chain at that change.
        import sqlite3

        path = archive_dsn.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE changelog_archive SET operation = 'write' WHERE seq = 3")
        reopened = SqliteAuditStore(path)
        try:
            broken = await reopened.verify_archive("s1")
            assert not broken.ok and broken.first_broken_seq == 3
        finally:
            await reopened.close()


# -- the property: every as-of replay equals the recorded verdicts --------------------------

USERS = ("u0", "u1")
AGENTS = ("a0", "a1")
# Subjects as API callers write them; "tenant#member" becomes the example's tenant.
USER_SIDE = ("user:u0", "user:u1", "group:g0#member", "group:g1#member", "tenant#member")
AGENT_SIDE = ("agent:a0", "agent:a1", "group:g0#member", "group:g1#member", "tenant#member")
OBJECTS = (
    "document:d0",
    "document:d1",
    "document:d2",
    "document:d3",
    "folder:f0",
    "folder:f1",
    "source:docs",
)
MEMBERS = ("user:u0", "user:u1", "agent:a0", "agent:a1")
SCOPES = ("source:docs", "folder:f0", "folder:f1", "document:d0", "document:d3")
TIMES = (None, None, 0.6)  # some tasks expire while the history runs


def _grant() -> Any:
    from hypothesis import strategies as st

    user_grant = st.tuples(
        st.sampled_from(["write", "delete"]),
        st.sampled_from(USER_SIDE),
        st.just("viewer"),
        st.sampled_from(OBJECTS),
    )
    agent_grant = st.tuples(
        st.sampled_from(["write", "delete"]),
        st.sampled_from(AGENT_SIDE),
        st.just("agent_viewer"),
        st.sampled_from(OBJECTS),
    )
    membership = st.tuples(
        st.sampled_from(["write", "delete"]),
        st.sampled_from(MEMBERS),
        st.just("member"),
        st.sampled_from(["group:g0", "group:g1", "tenant"]),
    )
    nesting = st.tuples(
        st.sampled_from(["write", "delete"]),
        st.just("group:g1#member"),
        st.just("member"),
        st.just("group:g0"),
    )
    return st.one_of(user_grant, agent_grant, membership, nesting).map(lambda g: ("grant", g))


def _steps() -> Any:
    from hypothesis import strategies as st

    new_task = st.tuples(
        st.sampled_from(USERS),
        st.sampled_from(AGENTS),
        st.lists(st.sampled_from(SCOPES), min_size=1, max_size=2, unique=True),
        st.sampled_from(TIMES),
    ).map(lambda t: ("task", t))
    retrieve = st.tuples(
        st.integers(0, 5), st.sampled_from((None, *USERS)), st.sampled_from((None, *AGENTS))
    ).map(lambda r: ("retrieve", r))
    revoke = st.integers(0, 5).map(lambda i: ("revoke", i))
    step = st.one_of(_grant(), _grant(), _grant(), new_task, revoke, retrieve, retrieve, retrieve)
    first = ("retrieve", (0, None, None))
    return st.lists(step, min_size=4, max_size=10).map(lambda s: [first, *s, first])


async def _run_history(
    gateway: Gateway, tenant: str, steps: list[tuple[str, Any]], tally: dict[str, int]
) -> None:
    """Build the tenant, play ``steps`` (recording each retrieval), then replay every
    record as of its decision, counting into ``tally``."""
    from gateway.api import create_app

    transport = httpx.ASGITransport(app=create_app(gateway=gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as http:
        w = await World(gateway, http, tenant).setup(members=[*USERS, "rita"], agents=list(AGENTS))
        await w.relationships(
            writes=[
                {"user": "user:rita", "relation": "reviewer", "object": f"tenant:{tenant}"},
                {"user": "user:u0", "relation": "member", "object": "group:g0"},
                {"user": "group:g1#member", "relation": "member", "object": "group:g0"},
            ]
        )
        texts = {d: f"Quarterly planning memo {d}." for d in ("d0", "d1", "d2", "d3")}
        await w.ingest(
            [
                doc("d0", texts["d0"], ["user:u0"], ["agent:a0"], folder="f0"),
                doc("d1", texts["d1"], ["group:g0#member"], ["agent:a1"], folder="f0"),
                doc("d2", texts["d2"], [f"tenant:{tenant}#member"], [], folder="f1"),
                doc("d3", texts["d3"], ["user:u1"], ["group:g1#member"]),
            ]
        )
        tasks = [await w.task("u0", "a0", ["source:docs"])]
        recorded: list[str] = []
        for kind, args in steps:
            if kind == "grant":
                op, user, relation, obj = args
                user = user.replace("tenant#member", f"tenant:{tenant}#member")
                obj = f"tenant:{tenant}" if obj == "tenant" else obj
                change = {"user": user, "relation": relation, "object": obj}
                await w.relationships(**{"writes" if op == "write" else "deletes": [change]})
            elif kind == "task":
                user, agent, scope, expires_in = args
                at = datetime.now(UTC) + timedelta(seconds=expires_in) if expires_in else None
                tasks.append(await w.task(user, agent, scope, at.isoformat() if at else None))
            elif kind == "revoke":
                task = tasks[args % len(tasks)]
                response = await w.http.delete(f"/v1/tasks/{task}", headers=bearer(w.admin_token))
                assert response.status_code in (200, 204), response.text
            else:
                index, user, agent = args
                task = tasks[index % len(tasks)]
                owner = await gateway.fga.read(object=f"task:{tenant}/{task}")
                bound = {t.relation: t.user.rpartition("/")[2] for t in owner}
                response = await w.retrieve(
                    user or bound.get("delegator", "u0"),
                    agent or bound.get("executor", "a0"),
                    task,
                    "quarterly planning memo",
                    k=10,
                )
                assert response.status_code == 200, response.text
                recorded.append(response.json()["request_id"])
        reviewer = bearer(gateway.mint_token(tenant=tenant, user="rita"))
        for rid in recorded:
            replay = await _replay(http, reviewer, rid, {"as_of": "decision"})
            tally["decisions"] += 1
            for d in replay["documents"]:
                tally["documents"] += 1
                tally[f"was_{d['was']}"] += 1
                tally["flipped_since"] += bool(d["flipped_checks"])
                tally["changes_named"] += len(d["changes"])
                if d["then_matches_was"] is not True or d["then"] != d["was"]:
                    tally["mismatches"] += 1
                    print("mismatch", tenant, rid, json.dumps(d, indent=1))


def test_every_as_of_replay_equals_the_recorded_verdicts(
    openfga: Any, embeddings: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Random decisions over random change histories (grants and revocations on
    documents, folders and the source, group and tenant memberships, nested groups,
    tasks created, expiring and revoked; retrievals by bound and unbound principals):
    replayed as of their decision, every document's verdict and failed checks equal the
    record's. Bounded for CI (``SCOPEGATE_ASOF_EXAMPLES``, default 10)."""
    import os

    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from gateway.background import BackgroundGateway
    from tests.conftest import make_settings

    examples = int(os.environ.get("SCOPEGATE_ASOF_EXAMPLES", "10"))
    settings_ = make_settings(openfga, tmp_path / "data", strategy="postfilter")
    bg = BackgroundGateway.start(settings_, embeddings=embeddings)
    from collections import Counter

    totals: Counter[str] = Counter()
    try:

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],  # a failure prints its history unshrunk
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(steps=_steps(), n=st.integers(0, 10**9))
        def one_history(steps: list[tuple[str, Any]], n: int) -> None:
            tenant = f"p{totals['histories']}x{n % 1000}"
            before = totals["mismatches"]
            bg.call(_run_history(bg.gateway, tenant, steps, totals), timeout_s=120)
            totals["histories"] += 1
            assert totals["mismatches"] == before

        one_history()
    finally:
        bg.close()
    with capsys.disabled():
        print(f"\nas-of property: {dict(totals)}")
    assert totals["histories"] == examples and totals["mismatches"] == 0
    # The histories exercised what the property is about: both verdicts, and verdicts
    # that changed since their decision for reasons the replay named.
    assert totals["was_allow"] and totals["was_deny"] and totals["flipped_since"]
    assert totals["changes_named"]


class _Recorded:
    """The gateway's own OpenFGA client, with the reads the archiver makes written down."""

    def __init__(self, fga: Any) -> None:
        self.fga = fga
        self.reads: list[tuple[datetime | None, int]] = []

    async def read_change_log(
        self, start_time: datetime | None, token: str | None, page_size: int
    ) -> Any:
        page, next_token = await self.fga.read_change_log(start_time, token, page_size)
        self.reads.append((start_time, len(page)))
        return page, next_token

    async def remove_stale_scratch_stores(self) -> int:
        return 0


async def test_a_sweep_of_a_quiet_store_starts_after_what_the_last_sweep_read(
    gateway: Gateway, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A sweep re-reads the overlap before the last complete sweep began, not the overlap
    before the newest change: a store that stays quiet is not read again and again."""
    from gateway.changelog import ChangeArchiver

    await World(gateway, http, "acme").setup(members=["alice"], agents=["bot"])
    overlap = 0.5
    await asyncio.sleep(4 * overlap)  # the setup's changes are well before the sweeps
    feed = _Recorded(gateway.fga)
    archive = SqliteAuditStore(tmp_path / "archive.db")
    archiver = ChangeArchiver(feed, archive, gateway.fga.store_id, overlap_s=overlap)
    try:
        first_began = datetime.now(UTC)
        await archiver.poll_once(sweep=True)
        assert feed.reads[0][0] is None  # never archived: the whole log
        archived = (await archive.archive_head(gateway.fga.store_id)).seq
        assert archived > 0

        feed.reads.clear()
        await archiver.poll_once(sweep=True)
        start, read = feed.reads[0]
        assert start is not None
        assert first_began - timedelta(seconds=2 * overlap + 0.1) <= start
        assert start <= datetime.now(UTC) - timedelta(seconds=overlap)
        assert read == 0  # nothing of the setup again

        # A change made now is read by the next sweep, which starts before it.
        await World(gateway, http, "acme").relationships(
            writes=[{"user": "user:alice", "relation": "member", "object": "group:eng"}]
        )
        await asyncio.sleep(2 * overlap)
        await archiver.poll_once(sweep=True)
        assert (await archive.archive_head(gateway.fga.store_id)).seq == archived + 1
    finally:
        await archive.close()
