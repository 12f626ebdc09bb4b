"""AuthZEN Access Evaluation API 1.0 (gateway/authzen.py) against the real OpenFGA.

The request and response shapes of the specification's own examples are sent and
compared as they are, with the ids adapted to a world of this gateway: alice reads
through the summarizer agent for a task scoped to the ``docs`` source.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api import create_app
from gateway.authzen import (
    EvaluationItem,
    EvaluationsRequest,
    Refused,
    completed,
    decisions,
)
from gateway.decision import DocumentVerdict
from gateway.errors import InvalidRequest
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from tests.conftest import make_settings
from tests.faultproxy import Fault, FaultProxy, error_one_item
from tests.world import World, bearer, doc

EVALUATION = "/access/v1/evaluation"
EVALUATIONS = "/access/v1/evaluations"
TEXTS = {
    "rev1": "Quarterly revenue forecast: revenue grows eight percent on renewals.",
    "inc1": "Incident postmortem: the primary database failed over after saturation.",
    "pay1": "Salary bands for engineers are reviewed every year.",
    "note1": "Private note from alice about the revenue forecast.",
}
# What alice may read through the summarizer for a task over the whole source.
PERMITTED = {"rev1", "inc1"}


async def _acme(gateway: Gateway, http: httpx.AsyncClient) -> World:
    w = await World(gateway, http, "acme").setup(
        members=["alice", "bob"], agents=["summarizer", "narrow"]
    )
    await w.relationships(
        writes=[
            {"user": "user:alice", "relation": "member", "object": "group:eng"},
            {"user": "group:eng#member", "relation": "viewer", "object": "folder:eng"},
        ]
    )
    await w.ingest(
        [
            doc("rev1", TEXTS["rev1"], ["user:alice", "user:bob"], ["agent:summarizer"], "fin"),
            doc("inc1", TEXTS["inc1"], agents=["agent:summarizer", "agent:narrow"], folder="eng"),
            doc("pay1", TEXTS["pay1"], viewers=["user:bob"], agents=["agent:summarizer"]),
            doc("note1", TEXTS["note1"], owner="user:alice"),
        ]
    )
    return w


class Pep:
    """An enforcement point holding alice's delegation token for one task."""

    def __init__(self, w: World, task: str, user: str = "alice", agent: str = "summarizer"):
        self.w = w
        self.headers = bearer(w.agent_token(user, agent, task))

    async def post(self, path: str, body: Any, **headers: str) -> httpx.Response:
        return await self.w.http.post(path, json=body, headers={**self.headers, **headers})

    async def decide(self, document: str, **extra: Any) -> bool:
        response = await self.post(EVALUATION, evaluation(document, **extra))
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) <= {"decision", "context"}, body
        return bool(body["decision"])


def evaluation(document: str, user: str = "alice", action: str = "read") -> dict[str, Any]:
    return {
        "subject": {"type": "user", "id": user},
        "action": {"name": action},
        "resource": {"type": "document", "id": document},
    }


async def _world(gateway: Gateway, http: httpx.AsyncClient) -> tuple[World, Pep, str]:
    w = await _acme(gateway, http)
    task = await w.task("alice", "summarizer", ["source:docs"])
    return w, Pep(w, task), task


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and body["error"]["code"] == code, body
    assert set(body["error"]) == {"code", "message", "request_id"}


async def _record(w: World, request_id: str) -> dict[str, Any]:
    response = await w.http.get(f"/v1/audit/decisions/{request_id}", headers=bearer(w.admin_token))
    assert response.status_code == 200, response.text
    return dict(response.json())


# -- the decision ----------------------------------------------------------------------------


async def test_evaluation_is_the_retrieval_decision(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w, pep, task = await _world(gateway, http)
    retrieved = set(await w.retrieved_docs("alice", "summarizer", task, "revenue", k=20))
    assert retrieved == PERMITTED
    for document in [*TEXTS, "never-ingested"]:
        assert await pep.decide(document) is (document in PERMITTED), document
    # Each conjunct on its own denies: pay1 fails user_can_read, note1 agent_can_read,
    # a narrower task (folder:eng) document_in_task_scope, another agent task_executor.
    narrow = await w.task("alice", "summarizer", ["folder:eng"])
    assert await Pep(w, narrow).decide("inc1") is True
    assert await Pep(w, narrow).decide("rev1") is False
    assert await Pep(w, task, agent="narrow").decide("inc1") is False


async def test_a_denial_says_nothing_about_why(gateway: Gateway, http: httpx.AsyncClient) -> None:
    """Denied-but-existing and never-ingested answer the same bytes: no existence oracle."""
    _, pep, _ = await _world(gateway, http)
    answers = [(await pep.post(EVALUATION, evaluation(d))).content for d in ("pay1", "nothing")]
    assert answers == [b'{"decision":false}', b'{"decision":false}']


async def test_revoking_the_task_denies_the_next_evaluation(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w, pep, task = await _world(gateway, http)
    assert await pep.decide("rev1") is True
    await w.admin_call("DELETE", f"/v1/tasks/{task}")
    assert await pep.decide("rev1") is False


async def test_agent_and_task_come_only_from_the_token(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w, _, wide = await _world(gateway, http)
    narrow = await w.task("alice", "narrow", ["folder:eng"])
    pep = Pep(w, narrow, agent="narrow")
    body = evaluation("rev1")
    body["subject"]["properties"] = {"agent": "summarizer", "task": wide, "tenant": "other"}
    body["resource"]["properties"] = {"task": wide}
    body["action"]["properties"] = {"agent": "summarizer"}
    body["context"] = {"agent": "summarizer", "task": wide, "current_time": "1970-01-01T00:00:00Z"}
    response = await pep.post(EVALUATION, body)
    assert response.json() == {"decision": False}
    batch = {"subject": body["subject"], "context": body["context"], "evaluations": [body]}
    assert (await pep.post(EVALUATIONS, batch)).json() == {"evaluations": [{"decision": False}]}


# -- the specification's examples, adapted ------------------------------------------------------


async def test_spec_https_access_evaluation_example(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    """Transport, Examples: the Access Evaluation request and response, X-Request-ID echoed."""
    _, pep, _ = await _world(gateway, http)
    response = await pep.post(
        EVALUATION, SPEC_REQUEST, **{"x-request-id": "bfe9eb29-ab87-4ca3-be83-a1d5d8305716"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "bfe9eb29-ab87-4ca3-be83-a1d5d8305716"
    assert response.json() == {"decision": True}


SPEC_REQUEST: dict[str, Any] = {
    "subject": {"type": "user", "id": "alice"},
    "resource": {"type": "document", "id": "rev1"},
    "action": {"name": "read", "properties": {"method": "GET"}},
    "context": {"time": "1985-10-26T01:22-07:00"},
}
SEMANTIC_REQUEST: dict[str, Any] = {
    "subject": {"type": "user", "id": "alice"},
    "action": {"name": "read"},
    "evaluations": [
        {"resource": {"type": "document", "id": "rev1"}},
        {"resource": {"type": "document", "id": "pay1"}},
        {"resource": {"type": "document", "id": "inc1"}},
    ],
}


@pytest.mark.parametrize(
    ("semantic", "expected"),
    [
        (None, [{"decision": True}, {"decision": False}, {"decision": True}]),
        ("execute_all", [{"decision": True}, {"decision": False}, {"decision": True}]),
        (
            "deny_on_first_deny",
            [
                {"decision": True},
                {"decision": False, "context": {"code": "200", "reason": "deny_on_first_deny"}},
            ],
        ),
        ("permit_on_first_permit", [{"decision": True}]),
    ],
)
async def test_spec_evaluations_semantics_examples(
    gateway: Gateway, http: httpx.AsyncClient, semantic: str | None, expected: list[Any]
) -> None:
    """Evaluations semantics: the three examples, answered exactly as the specification's."""
    _, pep, _ = await _world(gateway, http)
    body = dict(SEMANTIC_REQUEST)
    if semantic is not None:
        body["options"] = {"evaluations_semantic": semantic}
    response = await pep.post(EVALUATIONS, body)
    assert response.status_code == 200, response.text
    assert response.json() == {"evaluations": expected}


async def test_spec_default_values_examples(gateway: Gateway, http: httpx.AsyncClient) -> None:
    """Default values: no defaults; subject and context defaults; an overridden action."""
    _, pep, _ = await _world(gateway, http)
    context = {"time": "2024-05-31T15:22-07:00"}
    subject = {"type": "user", "id": "alice"}
    full = {
        "evaluations": [
            {**evaluation(d, action="read"), "context": context} for d in ("rev1", "pay1", "inc1")
        ]
    }
    shared = {
        "subject": subject,
        "context": context,
        "evaluations": [
            {"action": {"name": "read"}, "resource": {"type": "document", "id": d}}
            for d in ("rev1", "pay1", "inc1")
        ],
    }
    overridden = {
        "subject": subject,
        "context": context,
        "action": {"name": "read"},
        "evaluations": [
            {"resource": {"type": "document", "id": "rev1"}},
            {"resource": {"type": "document", "id": "inc1"}},
            {"action": {"name": "can_edit"}, "resource": {"type": "document", "id": "inc1"}},
        ],
    }
    for body, expected in [
        (full, [True, False, True]),
        (shared, [True, False, True]),
        (overridden, [True, True, False]),
    ]:
        response = await pep.post(EVALUATIONS, body)
        assert response.status_code == 200, response.text
        assert response.json() == {"evaluations": [{"decision": d} for d in expected]}


def test_the_documented_requests_are_the_tested_ones() -> None:
    """docs/integrations.md shows requests that the tests above send, as they are."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "integrations.md").read_text()
    section = text.split("## AuthZEN", 1)[1].split("\n## ", 1)[0]
    bodies = [json.loads(b) for b in re.findall(r"-d '(.*?)'", section, re.S)]
    deny_first = {**SEMANTIC_REQUEST, "options": {"evaluations_semantic": "deny_on_first_deny"}}
    assert bodies == [SPEC_REQUEST, deny_first]


async def test_evaluations_without_an_array_is_one_evaluation(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    _, pep, _ = await _world(gateway, http)
    for body in (evaluation("rev1"), {**evaluation("rev1"), "evaluations": []}):
        response = await pep.post(EVALUATIONS, body)
        assert response.json() == {"decision": True}, response.text
    assert (await pep.post(EVALUATIONS, evaluation("pay1"))).json() == {"decision": False}


async def test_metadata_document(gateway: Gateway, http: httpx.AsyncClient) -> None:
    """Policy Decision Point Metadata: GET without credentials; the endpoints it names work."""
    _, pep, _ = await _world(gateway, http)
    response = await http.get("/.well-known/authzen-configuration")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "policy_decision_point": "http://scopegate",
        "access_evaluation_endpoint": "http://scopegate/access/v1/evaluation",
        "access_evaluations_endpoint": "http://scopegate/access/v1/evaluations",
    }
    named = response.json()["access_evaluation_endpoint"]
    assert (await pep.post(named, evaluation("inc1"))).json() == {"decision": True}


# -- who may ask what ---------------------------------------------------------------------------


async def test_only_the_tokens_user_may_be_the_subject(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    _, pep, _ = await _world(gateway, http)
    for subject in (
        {"type": "user", "id": "bob"},
        {"type": "agent", "id": "summarizer"},
        {"type": "User", "id": "alice"},
    ):
        body = {**evaluation("rev1"), "subject": subject}
        assert_error(await pep.post(EVALUATION, body), 403, "forbidden")
        # A top-level subject is the whole payload's: 403.
        batch = {"subject": subject, "evaluations": [{"action": {"name": "read"}}]}
        assert_error(await pep.post(EVALUATIONS, batch), 403, "forbidden")
    # One evaluation's own subject is that evaluation's error (Errors).
    batch = {
        "subject": {"type": "user", "id": "alice"},
        "action": {"name": "read"},
        "evaluations": [
            {"resource": {"type": "document", "id": "rev1"}},
            {
                "subject": {"type": "user", "id": "bob"},
                "resource": {"type": "document", "id": "pay1"},
            },
        ],
    }
    answers = (await pep.post(EVALUATIONS, batch)).json()["evaluations"]
    assert answers[0] == {"decision": True}
    assert answers[1]["decision"] is False
    assert answers[1]["context"]["error"]["status"] == 403


async def test_other_actions_and_resource_types_are_denied(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    _, pep, _ = await _world(gateway, http)
    for name in ("can_read", "write", "READ", "delete"):
        assert await pep.decide("rev1", action=name) is False
    for kind in ("account", "folder", "source", "Document"):
        body = {**evaluation("rev1"), "resource": {"type": kind, "id": "rev1"}}
        assert (await pep.post(EVALUATION, body)).json() == {"decision": False}


async def test_unauthenticated_is_401_with_a_challenge(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w, _, _ = await _world(gateway, http)
    response = await http.post(EVALUATION, json=evaluation("rev1"))
    assert_error(response, 401, "invalid_token")
    assert response.headers["www-authenticate"] == "Bearer"
    # An admin's token carries no delegation: it cannot ask for an agent.
    for path in (EVALUATION, EVALUATIONS):
        response = await http.post(path, json=evaluation("rev1"), headers=bearer(w.admin_token))
        assert_error(response, 401, "invalid_token")
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'


@pytest.mark.parametrize(
    "body",
    [
        {"action": {"name": "read"}, "resource": {"type": "document", "id": "rev1"}},
        {"subject": {"type": "user", "id": "alice"}, "resource": {"type": "document", "id": "x"}},
        {"subject": {"type": "user"}, "action": {"name": "read"}, "resource": {"id": "rev1"}},
        {**evaluation("rev1"), "action": {"name": 7}},
        {**evaluation("rev1"), "resource": {"type": "document", "id": "a#b"}},
        {**evaluation("rev1"), "resource": {"type": "document", "id": "../rev1"}},
        {**evaluation("rev1"), "resource": {"type": "document", "id": "x" * 200}},
        [evaluation("rev1")],
        "not an object",
    ],
)
async def test_malformed_evaluations_are_bad_requests(
    gateway: Gateway, http: httpx.AsyncClient, body: Any
) -> None:
    """A required member missing is a Bad Request (JSON Serialization): 400, our error shape."""
    _, pep, _ = await _world(gateway, http)
    assert_error(await pep.post(EVALUATION, body), 400, "invalid_request")


async def test_malformed_evaluations_requests(gateway: Gateway, http: httpx.AsyncClient) -> None:
    _, pep, _ = await _world(gateway, http)
    alice = {"type": "user", "id": "alice"}
    for body in (
        {"subject": alice, "evaluations": [{"resource": {"type": "document", "id": "rev1"}}]},
        {**SEMANTIC_REQUEST, "options": {"evaluations_semantic": "first_wins"}},
        {"subject": alice, "action": {"name": "read"}, "evaluations": [evaluation("rev1")] * 101},
    ):
        assert_error(await pep.post(EVALUATIONS, body), 400, "invalid_request")
    # An invalid id inside the array is that evaluation's error; the others are answered.
    body = {
        "subject": alice,
        "action": {"name": "read"},
        "evaluations": [
            {"resource": {"type": "document", "id": "a b"}},
            {"resource": {"type": "document", "id": "rev1"}},
        ],
    }
    answers = (await pep.post(EVALUATIONS, body)).json()["evaluations"]
    assert answers[0]["decision"] is False and answers[0]["context"]["error"]["status"] == 400
    assert answers[1] == {"decision": True}


async def test_unknown_members_are_ignored(gateway: Gateway, http: httpx.AsyncClient) -> None:
    _, pep, _ = await _world(gateway, http)
    body = {**evaluation("rev1"), "obligations": ["log"], "decision": False}
    body["resource"]["version"] = 3
    assert (await pep.post(EVALUATION, body)).json() == {"decision": True}
    batch = {**SEMANTIC_REQUEST, "options": {"another_option": "value"}}
    answers = (await pep.post(EVALUATIONS, batch)).json()["evaluations"]
    assert [a["decision"] for a in answers] == [True, False, True]


async def test_evaluations_share_the_agents_rate_limit(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any
) -> None:
    settings = make_settings(
        openfga, tmp_path / "data", rate_limit_agent_per_s=0.001, rate_limit_agent_burst=2
    )
    g = await Gateway.start(settings, embeddings=embeddings)
    try:
        transport = httpx.ASGITransport(app=create_app(gateway=g))
        async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as http:
            _, pep, _ = await _world(g, http)
            assert await pep.decide("rev1") is True
            assert (await pep.post(EVALUATIONS, SEMANTIC_REQUEST)).status_code == 200
            for path, body in [(EVALUATION, evaluation("rev1")), (EVALUATIONS, SEMANTIC_REQUEST)]:
                response = await pep.post(path, body)
                assert_error(response, 429, "rate_limited")
                assert "retry-after" in response.headers
    finally:
        await g.close()


# -- audit and replay ----------------------------------------------------------------------------


async def test_evaluations_are_audited_and_replayable(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w, pep, task = await _world(gateway, http)
    body = {**SEMANTIC_REQUEST, "options": {"evaluations_semantic": "permit_on_first_permit"}}
    response = await pep.post(EVALUATIONS, body)
    assert response.json() == {"evaluations": [{"decision": True}]}
    record = await _record(w, response.headers["x-request-id"])
    assert (record["kind"], record["strategy"], record["outcome"]) == (
        "retrieve",
        "authzen",
        "allowed",
    )
    assert (record["user"], record["agent"], record["task"]) == ("alice", "summarizer", task)
    verdicts = {c["document_id"]: c for c in record["candidates"]}
    assert set(verdicts) == {"rev1", "pay1", "inc1"}
    assert verdicts["pay1"]["verdict"] == "deny"
    assert verdicts["pay1"]["failed_checks"] == ["user_can_read"]
    # Only the permit that was answered counts as released.
    assert [d for d, c in verdicts.items() if c["returned"]] == ["rev1"]
    assert record["extra"]["semantic"] == "permit_on_first_permit"
    assert record["extra"]["answered"] == 1
    assert [e["resource"] for e in record["extra"]["evaluations"]] == [
        "document:rev1",
        "document:pay1",
        "document:inc1",
    ]
    # The world changes; the replay of the evaluation says so.
    await w.relationships(
        deletes=[{"user": "user:alice", "relation": "viewer", "object": "document:rev1"}]
    )
    replay = await http.post(
        f"/v1/audit/decisions/{record['request_id']}/replay", headers=bearer(w.admin_token)
    )
    assert replay.status_code == 200, replay.text
    changes = {d["document_id"]: (d["was"], d["now"]) for d in replay.json()["documents"]}
    assert changes == {
        "rev1": ("allow", "deny"),
        "pay1": ("deny", "deny"),
        "inc1": ("allow", "allow"),
    }


async def test_the_peps_request_id_is_echoed_and_recorded(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w, pep, _ = await _world(gateway, http)
    response = await pep.post(EVALUATION, evaluation("pay1"), **{"x-request-id": "pep-42"})
    assert response.headers["x-request-id"] == "pep-42"
    listed = await http.get(
        "/v1/audit/decisions", params={"user": "alice", "limit": 1}, headers=bearer(w.admin_token)
    )
    latest = listed.json()["decisions"][0]
    record = await _record(w, latest["request_id"])
    assert record["extra"]["pep_request_id"] == "pep-42"
    assert record["outcome"] == "denied"
    assert record["candidates"][0]["failed_checks"] == ["user_can_read"]


# -- failing closed ---------------------------------------------------------------------------


@pytest.fixture
async def proxied(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient, FaultProxy]]:
    with FaultProxy(openfga.http_port) as proxy:
        settings = make_settings(openfga, tmp_path / "data", openfga_url=proxy.url)
        g = await Gateway.start(settings, embeddings=embeddings)
        try:
            transport = httpx.ASGITransport(app=create_app(gateway=g))
            async with httpx.AsyncClient(transport=transport, base_url="http://scopegate") as c:
                yield g, c, proxy
        finally:
            await g.close()


@pytest.mark.parametrize(
    "fault",
    [
        Fault.respond(500, {"code": "internal_error"}, path="/batch-check"),
        Fault.rewrite(error_one_item, path="/batch-check"),
        Fault.drop(path="/batch-check"),
    ],
    ids=["http-500", "one-item-unanswered", "dropped"],
)
async def test_openfga_failure_is_a_503_never_a_decision(
    proxied: tuple[Gateway, httpx.AsyncClient, FaultProxy], fault: Fault
) -> None:
    g, http, proxy = proxied
    w, pep, _ = await _world(g, http)
    proxy.set(fault)
    for path, body in [(EVALUATION, evaluation("rev1")), (EVALUATIONS, SEMANTIC_REQUEST)]:
        response = await pep.post(path, body)
        assert_error(response, 503, "authorization_unavailable")
        assert "decision" not in response.text
        proxy.clear()
        record = await _record(w, response.json()["error"]["request_id"])
        proxy.set(fault)
        assert record["outcome"] == "error"
        assert record["error_code"] == "authorization_unavailable"
        assert not any(c["returned"] for c in record["candidates"])
    proxy.clear()
    assert await pep.decide("rev1") is True


# -- the pure mapping ---------------------------------------------------------------------------


def test_default_values_are_overridden_whole() -> None:
    request = EvaluationsRequest.model_validate(
        {
            "subject": {"type": "user", "id": "alice", "properties": {"a": 1}},
            "context": {"time": "t"},
            "evaluations": [
                {"action": {"name": "read"}, "resource": {"type": "document", "id": "d1"}},
                {
                    "subject": {"type": "user", "id": "bob"},
                    "action": {"name": "read"},
                    "resource": {"type": "document", "id": "d2"},
                    "context": {"other": True},
                },
            ],
        }
    )
    first, second = completed(request)
    assert first.subject.properties == {"a": 1} and first.context == {"time": "t"}
    assert second.subject.id == "bob" and second.subject.properties is None
    assert second.context == {"other": True}
    with pytest.raises(InvalidRequest) as raised:
        completed(EvaluationsRequest(evaluations=[EvaluationItem()]))
    assert raised.value.status == 400
    assert "evaluations[0]: subject, action, resource" in raised.value.message


def test_short_circuits_and_errors_in_answers() -> None:
    allow = DocumentVerdict("d1", "allow")
    deny = DocumentVerdict("d2", "deny", ("user_can_read",))
    refused = Refused(403, "not the subject")
    answers = decisions(["d1", refused], [allow, None], "deny_on_first_deny")
    # An evaluation's error keeps its own context; it is never turned into a reason.
    assert answers[1].context == {"error": {"status": 403, "message": "not the subject"}}
    answers = decisions(["d1", "d2"], [allow, deny], "execute_all")
    assert [a.model_dump(exclude_none=True) for a in answers] == [
        {"decision": True},
        {"decision": False},
    ]
