"""The Python client against a real gateway served by uvicorn (no mock transport).

Every error below is produced by the real gateway and the real OpenFGA: a bad
token (401), a non-admin (403), an out-of-bounds body (422), an unknown source
(404), a duplicate (409) and a dead authorization store (503).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from scopegate_client.client import (
    AsyncScopegateClient,
    RetryPolicy,
    ScopegateClient,
    Source,
    _Request,
    _segment,
    error_from_response,
)

from gateway import errors
from gateway.background import BackgroundGateway
from gateway.identity import issue_token
from gateway.settings import load_settings
from tests.served import (
    ALICE_DOCS,
    BOB_DOCS,
    DENIED_TEXT,
    TENANT,
    Served,
    acme_fixture,
)
from tests.world import doc

# Post-filter: every top candidate is checked and recorded, so the audit assertions
# below do not depend on which ListObjects answer of a pre-filter probe came first.
acme = acme_fixture("client-gw", strategy="postfilter")


class CountingTokens:
    """A token callable that records how often it was asked."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return self.tokens[min(self.calls, len(self.tokens)) - 1]


def _expired_token(served: Served, user: str) -> str:
    g = served.bg.gateway
    return issue_token(
        g.signing_key,
        issuer=g.settings.token_issuer,
        audience=g.settings.token_audience,
        tenant=TENANT,
        user=user,
        agent="summarizer",
        task=served.tasks[user],
        ttl_s=60,
        now=int(time.time()) - 3600,
    )


# -- the typed API, sync and async ------------------------------------------------------


def test_retrieve_returns_only_permitted_chunks(acme: Served) -> None:
    with ScopegateClient(acme.url, acme.agent_token("alice")) as alice:
        found = alice.retrieve("revenue forecast and salary bands", k=10)
        assert found.request_id
        assert {c.document_id for c in found.chunks} == ALICE_DOCS
        assert all(DENIED_TEXT not in c.text for c in found.chunks)
        assert alice.retrievable_sources() == ["docs"]
    with ScopegateClient(acme.url, acme.agent_token("bob")) as bob:
        assert {c.document_id for c in bob.retrieve("salary bands", k=10).chunks} == BOB_DOCS


def test_admin_methods(acme: Served) -> None:
    progress: list[int] = []
    with acme.admin() as admin:
        sources = admin.list_sources()
        assert [s.id for s in sources] == ["docs"]
        admin.register_source("wiki", "chroma")
        summary = admin.ingest(
            "wiki",
            [
                doc(f"w{i}", f"Wiki page {i} about onboarding.", viewers=["user:alice"])
                for i in range(5)
            ],
            batch_size=2,
            progress=progress.append,
        )
        assert (summary.documents, progress) == (5, [2, 2, 1])
        assert admin.get_source("wiki").documents == 5
        admin.delete_document("wiki", "w4")
        assert admin.get_source("wiki").documents == 4
        task = admin.create_task("user:alice", "agent:summarizer", ["document:rev1"])
        with ScopegateClient(
            acme.url, acme.bg.mint_token(tenant=TENANT, user="alice", agent="summarizer", task=task)
        ) as narrow:
            assert {c.document_id for c in narrow.retrieve("revenue", k=10).chunks} == {"rev1"}
            admin.revoke_task(task)
            assert narrow.retrieve("revenue", k=10).chunks == []
        assert admin.write_relationships(
            deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:w0"}]
        ) == {"written": 0, "deleted": 1}


async def test_async_client_and_reviewer_flow(acme: Served) -> None:
    async with AsyncScopegateClient(acme.url, acme.agent_token("alice")) as alice:
        found = await alice.retrieve("salary bands and the revenue bonus", 10, ["docs"])
    assert "pay1" not in {c.document_id for c in found.chunks}

    async with AsyncScopegateClient(acme.url, acme.admin_token) as reviewer:
        decision = await reviewer.get_decision(found.request_id)
        blocked = {c.document_id: c.failed_checks for c in decision.blocked}
        assert blocked == {"pay1": ["user_can_read"]}
        assert decision.user == "alice" and decision.outcome == "partial"

        page = await reviewer.list_decisions(outcome="partial", user="alice", limit=1)
        assert len(page.decisions) == 1 and page.decisions[0].blocked >= 1
        every = [d async for d in reviewer.iter_decisions(outcome="partial", limit=1)]
        assert found.request_id in {d.request_id for d in every}

        replay = await reviewer.replay(found.request_id)
        verdicts = {d.document_id: (d.was, d.now) for d in replay.documents}
        assert verdicts["pay1"] == ("deny", "deny")
        assert verdicts["rev1"] == ("allow", "allow")
        assert replay.raw["what_if"] is None

        # What-if: the grant is evaluated, never written.
        grant = {"user": "user:alice", "relation": "viewer", "object": "document:pay1"}
        what_if = await reviewer.replay(found.request_id, what_if=[grant])
        assert what_if.raw["what_if"]["would_allow"] == ["pay1"]
        assert grant not in await reviewer.list_relationships(object="document:pay1")
        assert (await reviewer.ready())["ready"] is True


def test_relationships_removal_and_deprovisioning(acme: Served) -> None:
    # A tenant of its own: deprovisioning and removal here leave acme's fixture alone.
    tenant = "initech"
    acme.run(acme.bg.gateway.create_tenant(tenant, "root"))
    admin = ScopegateClient(acme.url, lambda: acme.bg.mint_token(tenant=tenant, user="root"))
    with admin:
        members = [
            {"user": "user:dana", "relation": "member", "object": f"tenant:{tenant}"},
            {"user": "agent:summarizer", "relation": "member", "object": f"tenant:{tenant}"},
        ]
        assert admin.write_relationships(writes=members) == {"written": 2, "deleted": 0}
        admin.register_source("notes")
        notes = [
            doc(
                f"n{i}",
                f"Meeting notes {i} on revenue.",
                viewers=["user:dana"],
                agents=["agent:summarizer"],
            )
            for i in (1, 2)
        ]
        first = admin.ingest("notes", notes, batch_size=1)
        assert (first.documents, first.skipped) == (2, 0)
        assert admin.ingest("notes", notes, batch_size=1).skipped == 2  # summed over batches
        assert admin.get_source("notes") == Source("notes", "chroma", {}, 2)

        on_n1 = admin.list_relationships(object="document:n1")
        assert {"user": "user:dana", "relation": "viewer", "object": "document:n1"} in on_n1
        assert all(r["object"] == "document:n1" for r in on_n1)
        assert members[0] in admin.list_relationships(user="user:dana")

        task = admin.create_task("user:dana", "agent:summarizer", ["source:notes"])
        token = acme.bg.mint_token(tenant=tenant, user="dana", agent="summarizer", task=task)
        with ScopegateClient(acme.url, token) as agent:
            assert {c.document_id for c in agent.retrieve("revenue", k=10).chunks} == {"n1", "n2"}
            counts = admin.deprovision("user:dana")
            # tenant membership, viewer of n1 and n2, delegator of the task
            assert counts["relations_removed"] >= 3 and counts["tasks_revoked"] == 1
            assert admin.list_relationships(user="user:dana") == []
            assert agent.retrieve("revenue", k=10).chunks == []

        admin.delete_document("notes", "n2")
        assert admin.get_source("notes").documents == 1
        with pytest.raises(errors.NotFound, match="document n2 not found"):
            admin.delete_document("notes", "n2")
        admin.remove_source("notes")
        with pytest.raises(errors.NotFound, match="source notes not found"):
            admin.get_source("notes")
        with pytest.raises(errors.NotFound):
            admin.remove_source("notes")
        assert admin.list_relationships(object="document:n1") == []
        with pytest.raises(errors.InvalidRequest):
            admin.deprovision("group:eng")
    # Dot segments stay path segments: "docs/documents/.." is not the source "docs".
    with acme.admin() as acme_admin, pytest.raises(errors.InvalidRequest, match="document id"):
        acme_admin.delete_document("docs", "..")


async def test_async_admin_methods(acme: Served) -> None:
    async with AsyncScopegateClient(acme.url, acme.admin_token) as admin:
        await admin.register_source("scratch")
        summary = await admin.ingest("scratch", [doc("s1", "Scratch pad.", viewers=["user:bob"])])
        assert (summary.documents, summary.skipped) == (1, 0)
        assert (await admin.get_source("scratch")).documents == 1
        grant = {"user": "user:alice", "relation": "viewer", "object": "document:s1"}
        await admin.write_relationships(writes=[grant])
        assert grant in await admin.list_relationships(user="user:alice")
        await admin.delete_document("scratch", "s1")
        assert await admin.list_relationships(object="document:s1") == []
        await admin.remove_source("scratch")
        with pytest.raises(errors.NotFound):
            await admin.get_source("scratch")
        # A principal with no relations: nothing to remove, nothing to revoke.
        assert await admin.deprovision("agent:ghost") == {
            "relations_removed": 0,
            "tasks_revoked": 0,
        }


# -- errors from the real gateway -----------------------------------------------------------


def test_error_bodies_map_to_gateway_errors(acme: Served) -> None:
    anonymous = ScopegateClient(acme.url, "not-a-jwt")
    with anonymous, pytest.raises(errors.InvalidToken) as bad_token:
        anonymous.retrieve("revenue")
    assert bad_token.value.status == 401 and bad_token.value.request_id

    alice_principal = acme.bg.mint_token(tenant=TENANT, user="alice")
    alice = ScopegateClient(acme.url, alice_principal)
    with alice, pytest.raises(errors.Forbidden, match="not an admin"):
        alice.register_source("mine")

    with ScopegateClient(acme.url, acme.agent_token("alice")) as agent:
        with pytest.raises(errors.InvalidRequest, match="k") as too_many:
            agent.retrieve("revenue", k=1000)
        assert too_many.value.status == 422
        with pytest.raises(errors.NotFound, match="nope"):
            agent.retrieve("revenue", sources=["nope"])
        with pytest.raises(errors.InvalidToken, match="delegation token cannot"):
            agent.list_sources()

    with acme.admin() as admin, pytest.raises(errors.Conflict):
        admin.register_source("docs")


def test_authorization_outage_is_a_503_after_safe_retries(embeddings: Any, tmp_path: Path) -> None:
    # The embedded default with its own managed OpenFGA, which then goes down.
    settings = load_settings(data_dir=tmp_path / "gw", openfga_url=None)
    bg = BackgroundGateway.start(settings, embeddings=embeddings)
    try:
        bg.serve_http()
        served = build_acme_small(bg)
        assert bg.gateway.managed is not None
        bg.gateway.managed.stop()

        tokens = CountingTokens(served.agent_token("alice"))
        alice = ScopegateClient(served.url, tokens, retries=2)
        with alice, pytest.raises(errors.AuthorizationUnavailable) as outage:
            alice.retrieve("revenue")
        assert outage.value.status == 503 and outage.value.request_id
        # Retrieval is safe to repeat: three attempts, three audited failures, no content.
        assert tokens.calls == 3
        page = served.run(bg.gateway.audit.list(TENANT, outcome="error"))
        records = [e.record for e in page[0]]
        assert len(records) == 3
        assert all(r.returned_chunk_ids == () for r in records)
        assert outage.value.request_id in {r.request_id for r in records}

        admin_tokens = CountingTokens(served.admin_token())
        admin = ScopegateClient(served.url, admin_tokens, retries=2)
        with admin, pytest.raises(errors.AuthorizationUnavailable):
            admin.create_task("user:alice", "agent:summarizer", ["source:docs"])
        assert admin_tokens.calls == 1  # a write is never repeated after it was sent
    finally:
        bg.close()


def build_acme_small(bg: Any) -> Served:
    served = Served(bg, bg.url)
    served.run(bg.gateway.create_tenant(TENANT, "admin"))
    with served.admin() as admin:
        admin.write_relationships(
            writes=[
                {"user": "user:alice", "relation": "member", "object": f"tenant:{TENANT}"},
                {"user": "agent:summarizer", "relation": "member", "object": f"tenant:{TENANT}"},
            ]
        )
        admin.register_source("docs")
        admin.ingest("docs", [doc("rev1", "Revenue grows.", viewers=["user:alice"])])
        served.tasks["alice"] = admin.create_task("user:alice", "agent:summarizer", ["source:docs"])
    return served


# -- tokens from a callable -----------------------------------------------------------------


def test_token_callable_is_asked_for_every_request(acme: Served) -> None:
    tokens = CountingTokens(acme.agent_token("alice"), acme.agent_token("bob"))
    with ScopegateClient(acme.url, tokens) as client:
        first = {c.document_id for c in client.retrieve("salary bands", k=10).chunks}
        second = {c.document_id for c in client.retrieve("salary bands", k=10).chunks}
    assert (first, second, tokens.calls) == (ALICE_DOCS, BOB_DOCS, 2)


async def test_expired_token_is_refreshed_once_after_a_401(acme: Served) -> None:
    tokens = CountingTokens(_expired_token(acme, "alice"), acme.agent_token("alice"))
    async with AsyncScopegateClient(acme.url, tokens) as client:
        found = await client.retrieve("revenue", k=10)
    assert {c.document_id for c in found.chunks} == ALICE_DOCS
    assert tokens.calls == 2

    stale = CountingTokens(_expired_token(acme, "alice"))
    async with AsyncScopegateClient(acme.url, stale) as client:
        with pytest.raises(errors.InvalidToken, match="ExpiredSignature"):
            await client.retrieve("revenue")
    assert stale.calls == 2  # asked once more, got the same token, gave up

    async with AsyncScopegateClient(acme.url, _expired_token(acme, "alice")) as client:
        with pytest.raises(errors.InvalidToken):
            await client.retrieve("revenue")


def test_unreachable_gateway_is_retried_for_any_method() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port: connection refused, the request never left.
    tokens = CountingTokens("t")
    client = ScopegateClient(f"http://127.0.0.1:{port}", tokens, retries=2)
    with client, pytest.raises(errors.Unavailable, match="unreachable"):
        client.create_task("user:alice", "agent:summarizer", ["source:docs"])
    assert tokens.calls == 3


# -- the pure parts -------------------------------------------------------------------------


def test_proxy_answers_map_by_status() -> None:
    html = httpx.Response(502, text="<html>Bad gateway</html>")
    assert type(error_from_response(html)) is errors.Unavailable
    teapot = error_from_response(httpx.Response(418, text="teapot"))
    assert type(teapot) is errors.ScopegateError and teapot.status == 418
    body = {"error": {"code": "audit_unavailable", "message": "down", "request_id": "r1"}}
    audit = error_from_response(httpx.Response(503, json=body))
    assert type(audit) is errors.AuditUnavailable and audit.request_id == "r1"


def test_path_segments_cannot_leave_their_route() -> None:
    assert _segment("user:bob") == "user:bob"
    assert _segment("a/b?c") == "a%2Fb%3Fc"
    assert _segment("..") == "%2E%2E"
    assert _segment("v1.2") == "v1.2"
    with pytest.raises(errors.InvalidRequest):
        _segment("")


def test_retry_policy() -> None:
    policy = RetryPolicy(attempts=3, backoff_s=0.1, max_backoff_s=1.0)
    read = _Request("POST", "/v1/retrieve", repeatable=True)
    write = _Request("POST", "/v1/tasks")
    busy = httpx.Response(503, headers={"retry-after": "30"})
    assert policy.delay(read, 0, response=busy) == 1.0  # Retry-After, capped
    assert policy.delay(write, 0, response=busy) is None
    assert policy.delay(read, 2, response=busy) is None  # attempts used up
    assert policy.delay(read, 0, response=httpx.Response(500)) is None
    refused = httpx.ConnectError("refused")
    assert policy.delay(write, 0, error=refused) is not None
    assert policy.delay(write, 0, error=httpx.ReadTimeout("slow")) is None
    assert policy.delay(read, 0, error=httpx.ReadTimeout("slow")) is not None
