"""Reviewer API, replay and the audit CLI, end to end on the real OpenFGA (gateway/review.py,
gateway/replay.py, gateway/audit_cli.py).

Store-level chain and tamper tests live in tests/test_audit.py; here one end-to-end
check runs against records written by real retrievals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import stat
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.audit import SqliteAuditStore, canonical_json, chain_hash
from gateway.audit_cli import audit_in_process, describe_verification, verify_audit
from gateway.identity import PrincipalContext
from gateway.ids import fga_object
from gateway.service import Gateway
from tests.world import World, bearer, doc

# Markers that occur only in document text: no reviewer response may ever contain them.
TEXTS = {
    "d1": "Revenue forecast memo LEDGER-ALPHA-7731: enterprise renewals grow eight percent.",
    "d2": "Revenue forecast memo BRAVO-SECRET-4410: churn in the mid-market segment.",
    "d3": "Revenue forecast memo CHARLIE-PRIVATE-9052: board-only pricing scenarios.",
}
MARKERS = ("LEDGER-ALPHA-7731", "BRAVO-SECRET-4410", "CHARLIE-PRIVATE-9052")
QUERY = "revenue forecast memo"
PATHS = "(directly, through a group, its folders or its source)"


@pytest.fixture(autouse=True)
def postfilter(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Record every candidate the search found, denied ones included.

    Replays re-evaluate recorded candidates; a pre-filter (which the adaptive strategy
    may pick) never turns documents outside the permitted set into candidates. Autouse,
    so the setting is in the environment before the ``gateway`` fixture reads it.
    """
    monkeypatch.setenv("SCOPEGATE_STRATEGY", "postfilter")
    if "as_of" in request.node.name:
        monkeypatch.setenv("SCOPEGATE_CHANGELOG_ARCHIVE", "true")


@dataclass
class Acme:
    """acme: alice reads d1 and d2, bob reads d3; the summarizer may read d1 and d3.

    So alice via the summarizer gets d1, and is blocked on d2 (agent) and d3 (user).
    """

    w: World
    task: str

    @property
    def reviewer(self) -> dict[str, str]:
        return bearer(self.w.g.mint_token(tenant="acme", user="rita"))

    async def retrieve(self, user: str = "alice", agent: str = "summarizer", task: str = "") -> str:
        response = await self.w.retrieve(user, agent, task or self.task, QUERY, k=10)
        assert response.status_code == 200, response.text
        return str(response.json()["request_id"])

    async def replay(self, request_id: str, body: Any = None) -> dict[str, Any]:
        response = await self.w.http.post(
            f"/v1/audit/decisions/{request_id}/replay", json=body, headers=self.reviewer
        )
        assert response.status_code == 200, response.text
        assert not any(m in response.text for m in MARKERS)
        data: dict[str, Any] = response.json()
        return data


async def _acme(gateway: Gateway, http: httpx.AsyncClient) -> Acme:
    w = await World(gateway, http, "acme").setup(
        members=["alice", "bob", "rita"], agents=["summarizer", "narrow"]
    )
    await w.relationships(
        writes=[{"user": "user:rita", "relation": "reviewer", "object": "tenant:acme"}]
    )
    await w.ingest(
        [
            doc("d1", TEXTS["d1"], viewers=["user:alice"], agents=["agent:summarizer"]),
            doc("d2", TEXTS["d2"], viewers=["user:alice"]),
            doc("d3", TEXTS["d3"], viewers=["user:bob"], agents=["agent:summarizer"]),
        ]
    )
    return Acme(w, await w.task("alice", "summarizer", ["source:docs"]))


def _by_doc(replay: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["document_id"]: d for d in replay["documents"]}


async def _all_pages(
    http: httpx.AsyncClient, headers: dict[str, str], **params: Any
) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await http.get("/v1/audit/decisions", params=query, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["decisions"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


# -- who may review ------------------------------------------------------------------------


async def test_only_reviewers_of_the_tenant_may_review(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    acme = await _acme(gateway, http)
    rid = await acme.retrieve()
    paths = [
        ("GET", "/v1/audit/decisions"),
        ("GET", f"/v1/audit/decisions/{rid}"),
        ("POST", f"/v1/audit/decisions/{rid}/replay"),
        ("GET", "/v1/audit/export"),
    ]
    bob = bearer(gateway.mint_token(tenant="acme", user="bob"))  # a member, not a reviewer
    agent = bearer(acme.w.agent_token("alice", "summarizer", acme.task))
    for method, path in paths:
        response = await http.request(method, path, headers=bob)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"]["code"] == "forbidden"
        assert rid not in response.text
        assert (await http.request(method, path, headers=agent)).status_code == 401
        assert (await http.request(method, path)).status_code == 401
    # What-if is reviewer-only too.
    what_if = {
        "what_if": {
            "writes": [{"user": "user:bob", "relation": "reviewer", "object": "tenant:acme"}]
        }
    }
    response = await http.post(f"/v1/audit/decisions/{rid}/replay", json=what_if, headers=bob)
    assert response.status_code == 403
    # Admins are reviewers (tenant#reviewer includes admin).
    admin = bearer(acme.w.admin_token)
    assert (await http.get(f"/v1/audit/decisions/{rid}", headers=admin)).status_code == 200

    # A reviewer of another tenant sees nothing of acme's, even by request id.
    globex = await World(gateway, http, "globex").setup()
    other = bearer(gateway.mint_token(tenant="globex", user=globex.admin))
    assert (await http.get(f"/v1/audit/decisions/{rid}", headers=other)).status_code == 404
    replay = await http.post(f"/v1/audit/decisions/{rid}/replay", headers=other)
    assert replay.status_code == 404
    listing = (await http.get("/v1/audit/decisions", headers=other)).json()["decisions"]
    assert listing and all(d["request_id"] != rid for d in listing)
    exported = (await http.get("/v1/audit/export", headers=other)).text
    assert rid not in exported and '"tenant":"acme"' not in exported


# -- one record per retrieval; list filters and pages ---------------------------------------


async def test_one_record_per_retrieval_under_concurrency_and_cursor_pages(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    acme = await _acme(gateway, http)
    responses = await asyncio.gather(
        *(acme.w.retrieve("alice", "summarizer", acme.task, f"{QUERY} {i}") for i in range(40))
    )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses[:3]]
    returned_ids = {r.json()["request_id"] for r in responses}
    assert len(returned_ids) == 40

    pages = await _all_pages(http, acme.reviewer, task=acme.task, limit=15)
    assert [len(p) for p in pages] == [15, 15, 10]
    listed = [d["request_id"] for page in pages for d in page]
    assert len(listed) == len(set(listed)) == 40
    assert set(listed) == returned_ids
    seqs = [d["seq"] for page in pages for d in page]
    assert seqs == sorted(seqs, reverse=True)  # newest first, no overlap between pages
    entries = [e async for e in gateway.audit.iter_all("acme") if e.record.kind == "retrieve"]
    assert len(entries) == 40
    assert (await gateway.audit.verify()).ok


async def test_list_filters(gateway: Gateway, http: httpx.AsyncClient) -> None:
    acme = await _acme(gateway, http)
    w = acme.w
    t_bob = await w.task("bob", "summarizer", ["source:docs"])
    t_narrow = await w.task("alice", "narrow", ["source:docs"])
    partial = await acme.retrieve()
    bob = await acme.retrieve("bob", "summarizer", t_bob)
    denied = await acme.retrieve("alice", "narrow", t_narrow)
    failed = await w.retrieve("alice", "summarizer", acme.task, QUERY, sources=["nope"])
    assert failed.status_code == 404
    r = acme.reviewer

    async def ids(**params: Any) -> list[str]:
        response = await http.get("/v1/audit/decisions", params=params, headers=r)
        assert response.status_code == 200, response.text
        return [d["request_id"] for d in response.json()["decisions"]]

    assert await ids(outcome="denied") == [denied]
    assert set(await ids(outcome="partial")) == {partial, bob}
    errors = await ids(outcome="error")
    assert len(errors) == 1
    error_entry = await gateway.audit.get("acme", errors[0])
    assert error_entry is not None and error_entry.record.error_code == "not_found"
    assert await ids(user="bob") == [bob]
    assert await ids(user="user:bob") == [bob]  # typed ids as the API writes them
    assert await ids(agent="narrow") == [denied]
    assert await ids(task=t_narrow) == [denied]
    assert set(await ids(user="alice", agent="summarizer", task=acme.task)) == {
        partial,
        errors[0],
    }

    listing = (await http.get("/v1/audit/decisions", params={"user": "bob"}, headers=r)).json()
    row = listing["decisions"][0]
    assert row["kind"] == "retrieve" and row["outcome"] == "partial"
    assert row["candidates"] == 3 and row["blocked"] == 2 and row["returned"] >= 1

    entry = await gateway.audit.get("acme", bob)
    assert entry is not None
    at = datetime.fromisoformat(entry.record.time)
    assert bob in await ids(since=entry.record.time)
    assert bob not in await ids(until=entry.record.time)
    assert partial in await ids(until=entry.record.time)
    assert await ids(since=(at + timedelta(days=1)).isoformat()) == []

    for bad in (
        {"outcome": "maybe"},
        {"user": "al ice"},
        {"user": "group:eng"},
        {"since": "yesterday"},
        {"cursor": "not-a-cursor"},
        {"limit": 0},
        {"limit": 501},
    ):
        response = await http.get("/v1/audit/decisions", params=bad, headers=r)
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["error"]["code"] == "invalid_request"


# -- the chain, end to end ----------------------------------------------------------------


def _copy_db(store: SqliteAuditStore, target: Path) -> Path:
    with (
        contextlib.closing(sqlite3.connect(store.path)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)
    return target


def _tamper(path: Path, *statements: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for statement in statements:
            conn.execute(statement)
        conn.commit()


async def test_chain_verification_catches_tampering_after_real_retrievals(
    gateway: Gateway, http: httpx.AsyncClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acme = await _acme(gateway, http)
    for _ in range(3):
        await acme.retrieve()
    assert isinstance(gateway.audit, SqliteAuditStore)
    assert await verify_audit(gateway.audit) == 0
    assert "audit chain intact" in capsys.readouterr().err

    retrievals = [e async for e in gateway.audit.iter_all(None) if e.record.kind == "retrieve"]
    middle = retrievals[1]  # alice's second retrieval, followed by a third
    rid = middle.record.request_id
    tamperings = {
        "edited": (
            [
                f'UPDATE audit_log SET record = replace(record, \'"user":"alice"\', '
                f'\'"user":"mallory"\') WHERE seq = {middle.seq}'
            ],
            middle.seq,
        ),
        "deleted": ([f"DELETE FROM audit_log WHERE seq = {middle.seq}"], middle.seq),
        "reordered": (
            [
                f"UPDATE audit_log SET seq = -1 WHERE seq = {middle.seq}",
                f"UPDATE audit_log SET seq = {middle.seq} WHERE seq = {middle.seq + 1}",
                f"UPDATE audit_log SET seq = {middle.seq + 1} WHERE seq = -1",
            ],
            middle.seq,
        ),
    }
    for name, (statements, broken_at) in tamperings.items():
        copy = _copy_db(gateway.audit, tmp_path / f"{name}.db")
        _tamper(copy, *statements)
        store = SqliteAuditStore(copy)
        try:
            result = await store.verify()
            assert not result.ok, name
            assert result.first_broken_seq == broken_at, (name, result)
            assert await verify_audit(store) == 1
            out = capsys.readouterr()
            assert json.loads(out.out)["first_broken_seq"] == broken_at
            assert f"BROKEN at entry {broken_at}" in out.err, out.err
            if name == "edited":
                assert rid in out.err  # names the record that was changed
            text = await describe_verification(store, result)
            assert str(broken_at) in text
        finally:
            await store.close()
    assert (await gateway.audit.verify()).ok  # the live store was never touched


# -- replay -------------------------------------------------------------------------------


async def test_replay_reports_still_blocked_now_allowed_and_now_blocked(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    acme = await _acme(gateway, http)
    rid = await acme.retrieve()
    first = _by_doc(await acme.replay(rid))
    assert {d: first[d]["change"] for d in first} == {
        "d1": "still_allowed",
        "d2": "still_blocked",
        "d3": "still_blocked",
    }

    await acme.w.relationships(
        writes=[{"user": "agent:summarizer", "relation": "agent_viewer", "object": "document:d2"}],
        deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:d1"}],
    )
    replay = await acme.replay(rid)
    docs = _by_doc(replay)
    assert replay["request_id"] == rid
    assert replay["recorded_model_id"] == replay["current_model_id"] == gateway.fga.model_id
    assert replay["summary"] == {
        "still_allowed": 0,
        "still_blocked": 1,
        "now_allowed": 1,
        "now_blocked": 1,
    }
    d1, d2, d3 = docs["d1"], docs["d2"], docs["d3"]
    assert (d2["was"], d2["now"], d2["change"], d2["changed"]) == (
        "deny",
        "allow",
        "now_allowed",
        True,
    )
    assert d2["was_failed_checks"] == ["agent_can_read"] and d2["failed_checks"] == []
    assert d2["cause"] == "relationships"
    assert (d3["was"], d3["now"], d3["change"]) == ("deny", "deny", "still_blocked")
    assert d3["failed_checks"] == ["user_can_read"]
    assert d3["explanations"] == [f"user:alice has no viewer or owner on document:d3 {PATHS}"]
    assert (d1["was"], d1["now"], d1["change"]) == ("allow", "deny", "now_blocked")
    assert d1["explanations"] == [f"user:alice has no viewer or owner on document:d1 {PATHS}"]
    for d in docs.values():
        assert d["now_at_recorded_model"] == d["now"]
        assert d["source"] == "docs"

    # Revoking the task: the replay says revoked, not merely "revoked or expired".
    await acme.w.admin_call("DELETE", f"/v1/tasks/{acme.task}")
    docs = _by_doc(await acme.replay(rid))
    assert all(d["now"] == "deny" for d in docs.values())
    assert "task_active" in docs["d2"]["failed_checks"]
    assert (
        f"task:{acme.task} has been revoked (it has no live relation)" in docs["d2"]["explanations"]
    )

    # Admin actions are recorded but cannot be replayed.
    admin_records, _ = await gateway.audit.list("acme", task=None, limit=500)
    admin_rid = next(e.record.request_id for e in admin_records if e.record.kind == "admin")
    response = await http.post(f"/v1/audit/decisions/{admin_rid}/replay", headers=acme.reviewer)
    assert response.status_code == 422
    assert (
        await http.post("/v1/audit/decisions/nope/replay", headers=acme.reviewer)
    ).status_code == 404


async def test_replay_tells_an_expired_task_from_a_revoked_one(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    acme = await _acme(gateway, http)
    expires = datetime.now(UTC) + timedelta(seconds=2)
    task = await acme.w.task("alice", "summarizer", ["source:docs"], expires.isoformat())
    rid = await acme.retrieve(task=task)
    while datetime.now(UTC) < expires + timedelta(milliseconds=300):
        await asyncio.sleep(0.2)
    d1 = _by_doc(await acme.replay(rid))["d1"]
    assert d1["now"] == "deny"
    assert {"task_active", "document_in_task_scope"} <= set(d1["failed_checks"])
    assert f"task:{task} has expired (its time limit has passed)" in d1["explanations"]
    assert f"the scope of task:{task} that covers document:d1 has expired" in d1["explanations"]


async def test_what_if_reports_changes_and_persists_nothing(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    acme = await _acme(gateway, http)
    rid = await acme.retrieve()
    grant = {"user": "agent:summarizer", "relation": "agent_viewer", "object": "document:d2"}
    replay = await acme.replay(rid, {"what_if": {"writes": [grant]}})
    docs = _by_doc(replay)
    assert replay["what_if"] == {
        "writes": [grant],
        "persisted": False,
        "changed_documents": 1,
        "would_allow": ["d2"],
        "would_block": [],
    }
    assert docs["d2"]["now"] == "deny" and docs["d2"]["change"] == "still_blocked"
    assert docs["d2"]["what_if"]["verdict"] == "allow" and docs["d2"]["what_if"]["changed"]
    assert docs["d2"]["what_if"]["change"] == "now_allowed"
    assert docs["d3"]["what_if"]["verdict"] == "deny" and not docs["d3"]["what_if"]["changed"]
    assert docs["d3"]["what_if"]["explanations"] == [
        f"user:alice has no viewer or owner on document:d3 {PATHS}"
    ]

    # Nothing was written: no tuple, the next retrieval still denies d2, replay agrees.
    d2 = fga_object("document", "acme", "d2")
    tuples = await gateway.fga.read(object=d2)
    assert not any(t.relation == "agent_viewer" for t in tuples)
    again = await acme.retrieve()
    entry = await gateway.audit.get("acme", again)
    assert entry is not None
    verdicts = {c.document_id: c.verdict for c in entry.record.candidates}
    assert verdicts["d2"] == "deny"
    assert _by_doc(await acme.replay(rid))["d2"]["change"] == "still_blocked"

    # What-if input is validated and namespaced like /v1/relationships writes.
    url = f"/v1/audit/decisions/{rid}/replay"
    bad_bodies = {
        422: [
            {"what_if": {"writes": [{**grant, "relation": "editor"}]}},
            {
                "what_if": {
                    "writes": [
                        {"user": "user:alice", "relation": "parent", "object": "document:d3"}
                    ]
                }
            },
            {"what_if": {"writes": [{**grant, "object": "document:a b"}]}},
            {"what_if": {"writes": [grant], "deletes": [grant]}},
            {"what_if": {"writes": []}},
            {"what_if": {"writes": [grant] * 101}},
            {"writes": [grant]},
        ],
        403: [{"what_if": {"writes": [{**grant, "user": "tenant:globex#member"}]}}],
    }
    for status, bodies in bad_bodies.items():
        for body in bodies:
            response = await http.post(url, json=body, headers=acme.reviewer)
            assert response.status_code == status, (body, response.text)
    response = await http.post(
        url,
        json={
            "what_if": {
                "writes": [{"user": "user:alice", "relation": "parent", "object": "document:d3"}]
            }
        },
        headers=acme.reviewer,
    )
    assert "document:d3#parent@user:alice" in response.json()["error"]["message"]
    assert "acme/" not in response.text


async def test_reviewer_responses_never_contain_document_text(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    acme = await _acme(gateway, http)
    rid = await acme.retrieve()
    await acme.retrieve("alice", "narrow", await acme.w.task("alice", "narrow", ["source:docs"]))
    r = acme.reviewer
    what_if = {
        "what_if": {
            "writes": [{"user": "user:alice", "relation": "viewer", "object": "document:d3"}]
        }
    }
    responses = [
        await http.get("/v1/audit/decisions", headers=r),
        await http.get(f"/v1/audit/decisions/{rid}", headers=r),
        await http.post(f"/v1/audit/decisions/{rid}/replay", headers=r),
        await http.post(f"/v1/audit/decisions/{rid}/replay", json=what_if, headers=r),
        await http.get("/v1/audit/export", headers=r),
    ]
    for response in responses:
        assert response.status_code == 200, response.text
        assert not any(m in response.text for m in MARKERS), response.request.url
        assert '"text"' not in response.text
    detail = responses[1].json()
    assert detail["query"] == QUERY and detail["seq"] >= 1 and len(detail["hash"]) == 64
    d2 = next(c for c in detail["candidates"] if c["document_id"] == "d2")
    assert d2["explanations"] == [f"agent:summarizer has no agent_viewer on document:d2 {PATHS}"]


# -- export and the CLI ---------------------------------------------------------------------


async def test_export_lines_verify_on_their_own(gateway: Gateway, http: httpx.AsyncClient) -> None:
    acme = await _acme(gateway, http)
    rid = await acme.retrieve()
    response = await http.get("/v1/audit/export", headers=acme.reviewer)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines and all(e["record"]["tenant"] == "acme" for e in lines)
    assert [e["seq"] for e in lines] == sorted(e["seq"] for e in lines)
    for entry in lines:
        assert entry["hash"] == chain_hash(entry["prev_hash"], canonical_json(entry["record"]))
    assert rid in {e["record"]["request_id"] for e in lines}


def _args(**values: Any) -> argparse.Namespace:
    defaults: dict[str, Any] = {"outcome": None, "limit": 20, "output": None}
    return argparse.Namespace(**{**defaults, **values})


async def test_audit_cli_in_process(
    gateway: Gateway, http: httpx.AsyncClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acme = await _acme(gateway, http)
    rid = await acme.retrieve()
    capsys.readouterr()
    rita = PrincipalContext("acme", "rita", "cli-test")

    assert await audit_in_process("audit_list", _args(outcome="partial"), gateway, rita) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["request_id"] for d in listed["decisions"]] == [rid]

    assert await audit_in_process("audit_show", _args(request_id=rid), gateway, rita) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["request_id"] == rid and len(shown["candidates"]) == 3

    assert await audit_in_process("audit_replay", _args(request_id=rid), gateway, rita) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert {d["document_id"]: d["change"] for d in replayed["documents"]}["d2"] == "still_blocked"

    target = tmp_path / "export.jsonl"
    assert await audit_in_process("audit_export", _args(output=target), gateway, rita) == 0
    assert "exported" in capsys.readouterr().err
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    exported = [json.loads(line) for line in target.read_text().splitlines()]
    assert rid in {e["record"]["request_id"] for e in exported}
    assert not (tmp_path / "export.jsonl.part").exists()

    assert await audit_in_process("audit_export", _args(), gateway, rita) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(exported)

    from gateway.errors import Forbidden

    bob = PrincipalContext("acme", "bob", "cli-test")
    with pytest.raises(Forbidden):
        await audit_in_process("audit_list", _args(), gateway, bob)
    with pytest.raises(Forbidden):
        await audit_in_process("audit_export", _args(output=tmp_path / "no.jsonl"), gateway, bob)
    assert not (tmp_path / "no.jsonl").exists()


# -- the page (the browser test is tests/test_review_browser.py) ------------------------------


async def test_review_page_and_assets_are_served_self_contained(http: httpx.AsyncClient) -> None:
    page = await http.get("/review")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, kind in (("review.js", "text/javascript"), ("review.css", "text/css")):
        asset = await http.get(f"/review/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert "http://" not in asset.text and "https://" not in asset.text
        if name == "review.js":
            assert "innerHTML" not in asset.text and "eval(" not in asset.text
    icon = await http.get("/review/static/favicon.svg")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert "http://" not in page.text and "https://" not in page.text
    for missing in (
        "/review/static/nope.js",
        "/review/static/..%2Fapi.py",
        "/review/static/review.html",
    ):
        assert (await http.get(missing)).status_code == 404


async def test_configured_retention_purges_old_records_and_keeps_the_chain(
    gateway: Gateway, http: httpx.AsyncClient, embeddings: Any
) -> None:
    acme = await _acme(gateway, http)
    kept_before = await acme.retrieve()
    before = [e async for e in gateway.audit.iter_all(None)]
    assert len(before) >= 2
    # A second gateway on the same data directory with a zero-day retention period purges
    # every record older than its start, on its own, and the chain still verifies.
    settings = gateway.settings.model_copy(
        update={"audit_retention_days": 0, "audit_retention_interval_s": 0.05}
    )
    second = await Gateway.start(settings, embeddings=embeddings)
    try:
        for _ in range(200):
            remaining = [e async for e in second.audit.iter_all(None)]
            if not remaining:
                break
            await asyncio.sleep(0.05)
        assert remaining == []
        assert await second.audit.get("acme", kept_before) is None
        assert (await second.audit.verify()).ok
    finally:
        await second.close()
    assert second.retention is not None and second.retention.done()


async def test_replay_as_of_and_history_are_reviewer_only_and_validated(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    acme = await _acme(gateway, http)
    rid = await acme.retrieve()
    url = f"/v1/audit/decisions/{rid}/replay"
    bob = bearer(gateway.mint_token(tenant="acme", user="bob"))  # a member, not a reviewer
    for body in ({"as_of": "decision"}, None):
        assert (await http.post(url, json=body, headers=bob)).status_code == 403
    history = "/v1/audit/history"
    assert (
        await http.get(history, params={"object": "document:d1"}, headers=bob)
    ).status_code == 403
    for bad in ({"as_of": "yesterday"}, {"as_of": None}, {"as_of": "decision", "extra": 1}):
        response = await http.post(url, json=bad, headers=acme.reviewer)
        assert response.status_code == 422, (bad, response.text)
    for bad_ref in ("tenant:globex", "user:alice", "document:a b", "document"):
        response = await http.get(history, params={"object": bad_ref}, headers=acme.reviewer)
        assert response.status_code in (403, 422), (bad_ref, response.text)

    # As of the decision and what-if together: then, now and the hypothetical, per document.
    grant = {"user": "agent:summarizer", "relation": "agent_viewer", "object": "document:d2"}
    replay = await acme.replay(rid, {"as_of": "decision", "what_if": {"writes": [grant]}})
    d2 = _by_doc(replay)["d2"]
    assert (d2["was"], d2["then"], d2["now"], d2["what_if"]["verdict"]) == (
        "deny",
        "deny",
        "deny",
        "allow",
    )
    assert replay["as_of"]["exact"] and replay["what_if"]["persisted"] is False
    assert not any(m in str(replay) for m in MARKERS)
    found = await http.get(history, params={"object": "document:d2"}, headers=acme.reviewer)
    assert found.status_code == 200 and not any(m in found.text for m in MARKERS)
    assert "acme/" not in found.text
    lines = {
        (c["operation"], c["user"], c["relation"], c["object"]) for c in found.json()["changes"]
    }
    assert ("write", "user:alice", "viewer", "document:d2") in lines
    assert ("write", "tenant:acme", "tenant", "document:d2") in lines  # the ingestion's stamp
