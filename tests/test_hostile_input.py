"""Hostile input over HTTP: clear 4xx, the error shape, nothing leaked, nothing written.

Two halves. Schemathesis fuzzes every operation of the published OpenAPI document
(``app.openapi()``), positive and negative, through its Python API and the ASGI app,
with a valid agent token and a valid admin token of a tenant of its own: no 5xx, every
response conforms to the document and every error has the contract's shape and code,
and the other tenants are untouched afterwards. Then the THREATS.md list, one by one:
huge queries (refused before anything is embedded), ``k`` out of range, oversized
bodies, deep JSON, invalid UTF-8, hostile ids, case-only differences, admin writes
aimed at another tenant.
"""

from __future__ import annotations

import json
import threading
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.embeddings import Embeddings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance, positive_data_acceptance

from gateway.api import create_app
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from tests.conftest import make_settings
from tests.world import World, bearer, doc

CODES = {
    400: {"invalid_request"},
    401: {"invalid_token"},
    403: {"forbidden"},
    404: {"not_found"},
    405: {"invalid_request"},
    409: {"conflict"},
    413: {"payload_too_large"},
    422: {"invalid_request"},
    429: {"rate_limited"},
    503: {"authorization_unavailable", "source_unavailable", "audit_unavailable"},
}
TEXTS = {
    "rev1": "Quarterly revenue forecast grows eight percent on renewals.",
    "sec1": "Secret merger plan for the acquisition of a competitor.",
    "g1": "GLOBEX revenue forecast: confidential numbers for globex only.",
}
HOSTILE_IDS = [
    "a#b",
    "a:b",
    "a@b",
    "../etc",
    "a/..",
    "..",
    "a/b",
    "a b",
    " a",
    "a\t",
    "a\n",
    "a\r\nX-Injected: 1",
    "a\x00",
    "a\x7f",
    "a\x1b[31m",
    "\u0430lice",  # Cyrillic a
    "\uff41lice",  # fullwidth a
    "alice\u200b",  # zero-width space
    "caf\u00e9",  # NFC
    "cafe\u0301",  # NFD
    "x" * 129,
    "",
    "-a",
    ".a",
    "a..b",
    "*",
    "%2e%2e",
    "a;drop",
    "a'b",
    '"a"',
    "a\\b",
    "\ud800",
]


class CountingEmbeddings(Embeddings):
    """The real embeddings, counting the texts they were asked to embed."""

    def __init__(self, inner: Embeddings) -> None:
        self.inner = inner
        self.calls = 0
        self._lock = threading.Lock()

    def _count(self, n: int) -> None:
        with self._lock:
            self.calls += n

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self._count(len(texts))
        return self.inner.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        self._count(1)
        return self.inner.embed_query(text)


@dataclass
class Env:
    g: Gateway
    http: httpx.AsyncClient
    embeddings: CountingEmbeddings
    acme: World
    globex: World
    fuzz: World
    tokens: dict[str, str] = field(default_factory=dict)
    app: Any = None
    untouched: dict[str, Any] = field(default_factory=dict)
    requests: int = 0

    async def tenant_state(self, tenant: str) -> dict[str, Any]:
        """What a write could change in ``tenant``: tuples, catalog, chunks, audit records."""
        mine = f"{tenant}/"
        tuples = sorted(
            (t.user, t.relation, t.object)
            for t in await self.g.fga.read()
            if mine in t.user or mine in t.object or f"tenant:{tenant}" in (t.user, t.object)
        )
        sources = await self.g.catalog.list_sources(tenant)
        chunks = {}
        for info in sources:
            chunks[info.id] = await self.g.stores.for_source(info).count(tenant, info.id)
        records = [e.record async for e in self.g.audit.iter_all(tenant)]
        # Failed requests leave error records (accountability); nothing else may change.
        served = [r.request_id for r in records if r.outcome != "error" or r.returned_chunk_ids]
        return {
            "tuples": tuples,
            "sources": [(s.id, s.kind) for s in sources],
            "documents": await self.g.catalog.document_count(tenant),
            "chunks": chunks,
            "records_not_errors": served,
        }

    async def state(self) -> dict[str, Any]:
        return {t: await self.tenant_state(t) for t in ("acme", "globex")}

    async def call(self, method: str, path: str, token: str, body: Any = None) -> httpx.Response:
        """``body`` as ASCII-escaped JSON, so even lone surrogates reach the server."""
        self.requests += 1
        content = None if body is None else json.dumps(body).encode()
        headers = {**bearer(token), "content-type": "application/json"}
        return await self.http.request(method, path, content=content, headers=headers)


@pytest.fixture(scope="module")
async def env(
    openfga: ManagedOpenFGA, embeddings: Embeddings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Env]:
    counting = CountingEmbeddings(embeddings)
    settings_ = make_settings(openfga, Path(tmp_path_factory.mktemp("hostile")))
    g = await Gateway.start(settings_, embeddings=counting)
    app = create_app(gateway=g)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://hostile"
        ) as http:
            acme = await World(g, http, "acme").setup(members=["alice", "bob"], agents=["bot"])
            await acme.ingest(
                [
                    doc("rev1", TEXTS["rev1"], viewers=["user:alice"], agents=["agent:bot"]),
                    doc("sec1", TEXTS["sec1"], viewers=["user:bob"], agents=["agent:bot"]),
                ]
            )
            globex = await World(g, http, "globex").setup(
                members=["alice"], agents=["bot"], source="gdocs"
            )
            await globex.ingest(
                [doc("g1", TEXTS["g1"], viewers=["user:alice"], agents=["agent:bot"])],
                source="gdocs",
            )
            fuzz = await World(g, http, "fuzz").setup(members=["alice"], agents=["bot"])
            await fuzz.ingest(
                [doc("f1", "fuzz tenant memo", viewers=["user:alice"], agents=["agent:bot"])]
            )
            e = Env(g, http, counting, acme, globex, fuzz)
            acme_task = await acme.task("alice", "bot", ["source:docs"])
            e.tokens = {
                "agent": acme.agent_token("alice", "bot", acme_task),
                "admin": acme.admin_token,
                "globex_task": await globex.task("alice", "bot", ["source:gdocs"]),
                "fuzz_agent": fuzz.agent_token(
                    "alice", "bot", await fuzz.task("alice", "bot", ["source:docs"])
                ),
                "fuzz_admin": fuzz.admin_token,
            }
            e.untouched = await e.state()
            e.app = app
            yield e
    finally:
        await g.close()


def assert_error(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["error"], body
    assert set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["code"] in CODES[response.status_code], body
    for text in TEXTS.values():
        assert text not in response.text
    return dict(body["error"])


# -- the published schema, fuzzed ----------------------------------------------------------------


@pytest.fixture(scope="module")
def schema(env: Env) -> Any:
    return schemathesis.openapi.from_dict(env.app.openapi())


FUZZED: dict[int, int] = {}  # status -> count, for the summary line
FUZZ_SETTINGS = settings(
    max_examples=120,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


async def fuzz_one(env: Env, schema: Any, mode: GenerationMode, data: st.DataObject) -> None:
    case = data.draw(schema.as_strategy(mode), label="case")
    kwargs = case.as_transport_kwargs(base_url="http://hostile")
    headers = {
        k: v for k, v in (kwargs.get("headers") or {}).items() if k.lower() != "authorization"
    }
    agent_call = case.path.startswith("/v1/retrieve")
    headers["authorization"] = "Bearer " + env.tokens["fuzz_agent" if agent_call else "fuzz_admin"]
    content = json.dumps(kwargs["json"]).encode() if "json" in kwargs else kwargs.get("data")
    response = await env.http.request(
        kwargs["method"],
        kwargs["url"],
        headers=headers,
        params=kwargs.get("params"),
        content=content,
    )
    env.requests += 1
    FUZZED[response.status_code] = FUZZED.get(response.status_code, 0) + 1
    assert response.status_code < 500, (case.method, case.path, content, response.text)
    excluded = [positive_data_acceptance]  # the schema does not carry the id charset rules
    if case.path == "/v1/audit/export":
        # Streams JSON Lines but is published as application/json (gateway/review.py).
        excluded.append(content_type_conformance)
    case.validate_response(response, excluded_checks=excluded, headers=headers)
    if response.status_code >= 400 and case.path != "/readyz":
        assert_error(response, response.status_code)


MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


@pytest.mark.parametrize("mode", MODES)
@FUZZ_SETTINGS
@given(data=st.data())
async def test_schemathesis_fuzz_of_the_published_schema(
    env: Env, schema: Any, mode: GenerationMode, data: st.DataObject
) -> None:
    await fuzz_one(env, schema, mode, data)


@pytest.mark.soak
@pytest.mark.parametrize("mode", MODES)
@settings(FUZZ_SETTINGS, max_examples=2000, derandomize=False)
@given(data=st.data())
async def test_schemathesis_fuzz_soak(
    env: Env, schema: Any, mode: GenerationMode, data: st.DataObject
) -> None:
    await fuzz_one(env, schema, mode, data)


async def test_fuzzing_left_the_other_tenants_untouched(env: Env) -> None:
    """Whatever the fuzzer's valid admin and agent did, it did in its own tenant only."""
    assert await env.state() == env.untouched


# -- queries, k, bodies ----------------------------------------------------------------------


async def test_query_length_is_bounded_before_anything_is_embedded(env: Env) -> None:
    for length in (8001, 20_000, 900_000):
        before = env.embeddings.calls
        response = await env.call(
            "POST", "/v1/retrieve", env.tokens["agent"], {"query": "q" * length}
        )
        assert_error(response, 422)
        assert env.embeddings.calls == before, "an over-long query reached the embeddings"
    before = env.embeddings.calls
    response = await env.call("POST", "/v1/retrieve", env.tokens["agent"], {"query": "r" * 8000})
    assert response.status_code == 200
    assert env.embeddings.calls == before + 1


@pytest.mark.parametrize("k", [0, -1, 101, 10**12, -(10**12), 5.5, "five", None, [], {}, "1e3"])
async def test_k_out_of_range(env: Env, k: Any) -> None:
    before = env.embeddings.calls
    body = {"query": "revenue", "k": k}
    assert_error(await env.call("POST", "/v1/retrieve", env.tokens["agent"], body), 422)
    assert env.embeddings.calls == before


@pytest.mark.parametrize("k", [1, 100])
async def test_k_at_the_bounds(env: Env, k: int) -> None:
    response = await env.call(
        "POST", "/v1/retrieve", env.tokens["agent"], {"query": "revenue", "k": k}
    )
    assert response.status_code == 200
    assert len(response.json()["chunks"]) <= k


async def test_oversized_bodies_are_413_and_write_nothing(env: Env) -> None:
    before = await env.state()
    big = {"documents": [{"id": "huge", "text": "x" * 1_200_000}]}
    response = await env.call("POST", "/v1/sources/docs/documents", env.tokens["admin"], big)
    assert_error(response, 413)

    async def stream() -> AsyncIterator[bytes]:  # no Content-Length: counted as it is read
        yield b'{"query": "'
        for _ in range(300):
            yield b"y" * 4096
        yield b'"}'

    response = await env.http.post(
        "/v1/retrieve",
        content=stream(),
        headers={**bearer(env.tokens["agent"]), "content-type": "application/json"},
    )
    assert_error(response, 413)
    assert await env.state() == before


@pytest.mark.parametrize("depth", [33, 1000, 200_000])
async def test_deeply_nested_json(env: Env, depth: int) -> None:
    before = env.embeddings.calls
    body = '{"query": "revenue", "sources": ' + "[" * depth + "]" * depth + "}"
    response = await env.http.post(
        "/v1/retrieve",
        content=body.encode(),
        headers={**bearer(env.tokens["agent"]), "content-type": "application/json"},
    )
    assert_error(response, 400, 413, 422)
    assert env.embeddings.calls == before


async def test_brackets_inside_strings_are_not_nesting(env: Env) -> None:
    response = await env.call(
        "POST", "/v1/retrieve", env.tokens["agent"], {"query": "[" * 100 + "revenue" + "}" * 100}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        b'{"query": "\xff\xfe revenue", "k": 5}',
        b'{"query": "\xc3\x28"}',
        b'{"query": "\xed\xa0\x80"}',  # an encoded surrogate: not UTF-8
        b'{"query": "revenue", "k": 5',
        b"",
        b"null",
        b"[]",
        b'"revenue"',
        b'{"query": NaN}',
        b'{"query": "revenue", "k": Infinity}',
    ],
)
async def test_malformed_and_invalid_utf8_bodies(env: Env, raw: bytes) -> None:
    before = env.embeddings.calls
    response = await env.http.post(
        "/v1/retrieve",
        content=raw,
        headers={**bearer(env.tokens["agent"]), "content-type": "application/json"},
    )
    assert_error(response, 400, 422)
    assert env.embeddings.calls == before


async def test_lone_surrogate_in_query_never_500(env: Env) -> None:
    """Valid JSON (an escaped lone surrogate) that is not valid Unicode text."""
    raw = b'{"query": "revenue \\ud800 forecast", "k": 3}'
    response = await env.http.post(
        "/v1/retrieve",
        content=raw,
        headers={**bearer(env.tokens["agent"]), "content-type": "application/json"},
    )
    assert response.status_code in {200, 422}, response.text
    if response.status_code == 422:
        assert_error(response, 422)
    else:
        assert {c["document_id"] for c in response.json()["chunks"]} <= {"rev1"}


async def test_unknown_routes_and_methods_use_the_error_shape(env: Env) -> None:
    assert_error(await env.call("GET", "/v1/nope", env.tokens["admin"]), 404)
    assert_error(await env.call("PUT", "/v1/retrieve", env.tokens["agent"]), 405)
    assert_error(
        await env.call("GET", "/v1/sources/docs/../../etc/passwd", env.tokens["admin"]), 404, 422
    )


# -- identifiers -------------------------------------------------------------------------------


def hostile_calls(bad: str) -> list[tuple[str, str, str, Any]]:
    """(token, method, path, body) each carrying ``bad`` where an id goes."""
    return [
        ("admin", "POST", "/v1/sources", {"id": bad, "kind": "chroma"}),
        ("admin", "POST", "/v1/sources/docs/documents", {"documents": [{"id": bad, "text": "t"}]}),
        (
            "admin",
            "POST",
            "/v1/sources/docs/documents",
            {"documents": [{"id": "ok1", "text": "t", "folder": bad}]},
        ),
        (
            "admin",
            "POST",
            "/v1/sources/docs/documents",
            {"documents": [{"id": "ok2", "text": "t", "acl": {"viewers": [f"user:{bad}"]}}]},
        ),
        (
            "admin",
            "POST",
            "/v1/relationships",
            {"writes": [{"user": f"user:{bad}", "relation": "viewer", "object": "document:rev1"}]},
        ),
        (
            "admin",
            "POST",
            "/v1/relationships",
            {"writes": [{"user": "user:alice", "relation": "viewer", "object": f"document:{bad}"}]},
        ),
        (
            "admin",
            "POST",
            "/v1/relationships",
            {
                "writes": [
                    {"user": f"group:{bad}#member", "relation": "viewer", "object": "document:rev1"}
                ]
            },
        ),
        (
            "admin",
            "POST",
            "/v1/tasks",
            {"user": f"user:{bad}", "agent": "agent:bot", "scope": ["source:docs"]},
        ),
        (
            "admin",
            "POST",
            "/v1/tasks",
            {"user": "user:alice", "agent": f"agent:{bad}", "scope": ["source:docs"]},
        ),
        (
            "admin",
            "POST",
            "/v1/tasks",
            {"user": "user:alice", "agent": "agent:bot", "scope": [f"folder:{bad}"]},
        ),
        ("agent", "POST", "/v1/retrieve", {"query": "revenue", "sources": [bad]}),
    ]


@pytest.mark.parametrize("bad", HOSTILE_IDS, ids=lambda s: repr(s)[:40])
async def test_hostile_ids_are_rejected_and_write_nothing(env: Env, bad: str) -> None:
    before = await env.state()
    before_calls = env.embeddings.calls
    for token, method, path, body in hostile_calls(bad):
        response = await env.call(method, path, env.tokens[token], body)
        error = assert_error(response, 403, 404, 422)
        assert "chunks" not in response.text, (path, body, error)
    for path in (f"/v1/sources/{bad}", f"/v1/tasks/{bad}", f"/v1/sources/docs/documents/{bad}"):
        for method in ("GET", "DELETE"):
            if method == "GET" and "tasks" in path:
                continue
            raw = urllib.parse.quote(path.encode("utf-8", "surrogatepass"), safe="/")
            request = env.http.build_request(method, raw, headers=bearer(env.tokens["admin"]))
            if request.url.raw_path.decode() != raw:
                # The client removes dot segments: "/v1/sources/docs/documents/.." would be
                # a real DELETE of the source, not a hostile id.
                continue
            response = await env.http.send(request)
            env.requests += 1
            if response.status_code not in {307, 308}:  # "/v1/sources/" and friends redirect
                assert_error(response, 400, 404, 405, 422)
    assert await env.state() == before
    assert env.embeddings.calls == before_calls  # nothing was chunked, embedded or stored


async def test_ids_differing_only_in_case_or_normalisation_never_alias(env: Env) -> None:
    acme = env.acme
    await acme.relationships(
        writes=[{"user": "user:Alice", "relation": "member", "object": "tenant:acme"}]
    )
    await acme.ingest(
        [
            doc(
                "Rev1",
                "Upper-case REV1 plan: hostile takeover notes.",
                viewers=["user:Alice"],
                agents=["agent:bot"],
            ),
            doc(
                "rev1-lower",
                "Lower-case plan for alice.",
                viewers=["user:alice"],
                agents=["agent:bot"],
            ),
        ]
    )
    for variant in ("REV1", "rEv1"):
        assert (
            await env.call("DELETE", f"/v1/sources/docs/documents/{variant}", env.tokens["admin"])
        ).status_code == 404
    lower = await acme.task("alice", "bot", ["source:docs"])
    upper = await acme.task("Alice", "bot", ["source:docs"])
    as_alice = await acme.retrieved_docs("alice", "bot", lower, "plan notes revenue", k=10)
    as_upper = await acme.retrieved_docs("Alice", "bot", upper, "plan notes revenue", k=10)
    assert "Rev1" not in as_alice and "rev1" in as_alice
    assert "Rev1" in as_upper and "rev1" not in as_upper and "rev1-lower" not in as_upper
    # A task of "alice" presented with "ALICE" or the other case's name: nothing.
    assert await acme.retrieved_docs("ALICE", "bot", lower, "plan", k=10) == []
    assert await acme.retrieved_docs("Alice", "bot", lower, "plan", k=10) == []
    # Unicode look-alikes and other normal forms never reach an id at all.
    for name in ("\u0430lice", unicodedata.normalize("NFD", "alic\u00e9"), "alice\u200b"):
        token_response = await env.call(
            "POST",
            "/v1/relationships",
            env.tokens["admin"],
            {"writes": [{"user": f"user:{name}", "relation": "viewer", "object": "document:rev1"}]},
        )
        assert_error(token_response, 422)
    await acme.relationships(
        deletes=[{"user": "user:Alice", "relation": "member", "object": "tenant:acme"}]
    )
    for doc_id in ("Rev1", "rev1-lower"):
        await acme.admin_call("DELETE", f"/v1/sources/docs/documents/{doc_id}")
    env.untouched["acme"] = await env.tenant_state("acme")


async def test_ids_too_long_once_namespaced_are_422_before_anything_is_stored(env: Env) -> None:
    """In a 127-character tenant every id below is valid on its own (at most 128
    characters), but its namespaced form (``document:<tenant>/<id>``) would not fit
    OpenFGA's 256 characters: each call is refused with 422 before anything is chunked,
    embedded, stored or written, whichever document of the request is the long one. An
    id that leaves room works end to end in the same tenant."""
    tenant = "l" * 127
    w = await World(env.g, env.http, tenant).setup(members=["alice"], agents=["bot"])
    room = 256 - len("document:") - len(tenant) - 1
    long_id, fitting_id = "d" * (room + 1), "d" * room
    widest = "x" * 128  # too long here for every object type (folder, group, source)

    def sample(doc_id: str, **extra: Any) -> dict[str, Any]:
        return {**doc(doc_id, TEXTS["rev1"], ["user:alice"], ["agent:bot"]), **extra}

    def grant(user: str, obj: str) -> dict[str, Any]:
        return {"writes": [{"user": user, "relation": "viewer", "object": obj}]}

    refused: list[tuple[str, str, Any]] = [
        ("POST", "/v1/sources/docs/documents", {"documents": [sample(long_id)]}),
        ("POST", "/v1/sources/docs/documents", {"documents": [sample("d" * 128)]}),
        ("POST", "/v1/sources/docs/documents", {"documents": [sample("ok1"), sample(long_id)]}),
        ("POST", "/v1/sources/docs/documents", {"documents": [sample("ok2", folder=widest)]}),
        (
            "POST",
            "/v1/sources/docs/documents",
            {"documents": [sample("ok3", acl={"viewers": [f"group:{widest}#member"]})]},
        ),
        ("POST", "/v1/sources", {"id": widest, "kind": "chroma"}),
        ("POST", "/v1/relationships", grant("user:alice", f"folder:{widest}")),
        ("POST", "/v1/relationships", grant(f"group:{widest}#member", "source:docs")),
        (
            "POST",
            "/v1/tasks",
            {"user": "user:alice", "agent": "agent:bot", "scope": [f"document:{long_id}"]},
        ),
    ]
    before = await env.tenant_state(tenant)
    before_calls = env.embeddings.calls
    for method, path, body in refused:
        error = assert_error(await env.call(method, path, w.admin_token, body), 422)
        assert error["code"] == "invalid_request" and "too long" in error["message"], (path, body)
    assert await env.tenant_state(tenant) == before
    assert env.embeddings.calls == before_calls

    await w.ingest([sample(fitting_id)])
    task = await w.task("alice", "bot", [f"document:{fitting_id}"])
    assert await w.retrieved_docs("alice", "bot", task, "quarterly revenue") == [fitting_id]


# -- other tenants ---------------------------------------------------------------------------


async def test_admin_writes_aimed_at_another_tenant_are_403_and_write_nothing(env: Env) -> None:
    before = await env.state()
    admin = env.tokens["admin"]
    forbidden = [
        (
            "POST",
            "/v1/relationships",
            {"writes": [{"user": "user:mallory", "relation": "member", "object": "tenant:globex"}]},
        ),
        (
            "POST",
            "/v1/relationships",
            {
                "writes": [
                    {
                        "user": "tenant:globex#member",
                        "relation": "viewer",
                        "object": "document:rev1",
                    }
                ]
            },
        ),
        (
            "POST",
            "/v1/relationships",
            {"writes": [{"user": "user:mallory", "relation": "admin", "object": "tenant:globex"}]},
        ),
        (
            "POST",
            "/v1/relationships",
            {"deletes": [{"user": "user:alice", "relation": "member", "object": "tenant:globex"}]},
        ),
        (
            "POST",
            "/v1/sources/docs/documents",
            {
                "documents": [
                    {"id": "x1", "text": "t", "acl": {"viewers": ["tenant:globex#member"]}}
                ]
            },
        ),
        ("POST", "/v1/tenants", {"id": "globex", "admin": "mallory"}),
    ]
    for method, path, body in forbidden:
        assert_error(await env.call(method, path, admin, body), 403)
    unreachable = [  # globex's objects do not exist in acme's namespace
        ("POST", "/v1/sources/gdocs/documents", {"documents": [{"id": "g1", "text": "overwrite"}]}),
        ("DELETE", "/v1/sources/gdocs/documents/g1", None),
        ("GET", "/v1/sources/gdocs", None),
        ("DELETE", f"/v1/tasks/{env.tokens['globex_task']}", None),
    ]
    for method, path, body in unreachable:
        assert_error(await env.call(method, path, admin, body), 404)
    ids_with_tenant_prefix = [  # a namespaced id can never be smuggled in
        (
            "POST",
            "/v1/relationships",
            {
                "writes": [
                    {"user": "user:globex/alice", "relation": "viewer", "object": "document:rev1"}
                ]
            },
        ),
        (
            "POST",
            "/v1/relationships",
            {
                "writes": [
                    {"user": "user:alice", "relation": "viewer", "object": "document:globex/g1"}
                ]
            },
        ),
        (
            "POST",
            "/v1/tasks",
            {"user": "user:alice", "agent": "agent:bot", "scope": ["source:globex/gdocs"]},
        ),
    ]
    for method, path, body in ids_with_tenant_prefix:
        assert_error(await env.call(method, path, admin, body), 403, 422)
    # The acme agent asking for globex's source by name gets no globex content.
    response = await env.call(
        "POST",
        "/v1/retrieve",
        env.tokens["agent"],
        {"query": "globex revenue", "sources": ["gdocs"]},
    )
    assert_error(response, 403, 404)
    after = await env.state()
    assert after["globex"] == before["globex"]
    assert after["acme"]["tuples"] == before["acme"]["tuples"]


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None and FUZZED:
        with capture.global_and_fixture_disabled():
            total = sum(FUZZED.values())
            print(f"\nschemathesis: {total} requests, statuses {sorted(FUZZED.items())}")
