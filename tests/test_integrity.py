"""Two sources in one tenant never leak into each other (DESIGN §4, THREATS "Two sources").

Everything here goes through the HTTP API against the real OpenFGA and Chroma.
"""

from __future__ import annotations

import asyncio

import httpx

from gateway.service import Gateway
from tests.world import World, bearer, doc

PAY_TEXT = "Salary table: staff engineers earn 212k, principal engineers 260k, bonus 9%."
WIKI_TEXT = "Payroll calendar: salaries are paid on the last working day of each month."


async def _two_sources(gateway: Gateway, http: httpx.AsyncClient) -> World:
    w = await World(gateway, http, "acme").setup(
        members=["alice", "bob"], agents=["helper"], source="hr"
    )
    await w.admin_call("POST", "/v1/sources", {"id": "wiki", "kind": "chroma"})
    await w.ingest(
        [doc("hr-pay", PAY_TEXT, viewers=["user:bob"], agents=["agent:helper"], folder="payroll")],
        source="hr",
    )
    return w


async def test_a_folder_name_reused_in_a_second_source_is_refused(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _two_sources(gateway, http)
    response = await http.post(
        "/v1/sources/wiki/documents",
        json={
            "documents": [
                doc(
                    "wiki-pay",
                    WIKI_TEXT,
                    viewers=["tenant:acme#member"],
                    agents=["tenant:acme#member"],
                    folder="payroll",
                )
            ]
        },
        headers=bearer(w.admin_token),
    )
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "conflict"
    task = await w.task("alice", "helper", ["source:wiki"])
    answer = await w.retrieve("alice", "helper", task, "salary table for engineers", k=10)
    assert answer.status_code == 200
    assert "hr-pay" not in {c["document_id"] for c in answer.json()["chunks"]}
    # Nothing of the refused batch was written: no chunk, no tuple, no catalog entry.
    wiki = (await http.get("/v1/sources/wiki", headers=bearer(w.admin_token))).json()
    assert wiki["documents"] == 0
    assert (
        await gateway.stores.for_source(await gateway.catalog.get_source("acme", "wiki")).count(
            "acme", "wiki"
        )
        == 0
    )  # type: ignore[arg-type]
    assert await gateway.fga.read(object="document:acme/wiki-pay") == []
    parents = await gateway.fga.read(object="folder:acme/payroll")
    assert {t.user for t in parents if t.relation == "parent"} == {"source:acme/hr"}


async def test_a_document_id_of_another_source_is_refused(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _two_sources(gateway, http)
    response = await http.post(
        "/v1/sources/wiki/documents",
        json={
            "documents": [doc("ok", WIKI_TEXT), doc("hr-pay", WIKI_TEXT, viewers=["user:alice"])]
        },
        headers=bearer(w.admin_token),
    )
    assert response.status_code == 409
    assert await gateway.fga.read(object="document:acme/ok") == []
    viewers = await gateway.fga.read(object="document:acme/hr-pay")
    assert {t.user for t in viewers if t.relation == "viewer"} == {"user:acme/bob"}


async def test_concurrent_ingests_of_one_id_into_two_sources_cannot_both_pass(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["helper"], source="a")
    await w.admin_call("POST", "/v1/sources", {"id": "b", "kind": "chroma"})
    for round_ in range(3):
        doc_id, folder = f"d{round_}", f"f{round_}"
        statuses = await asyncio.gather(
            *(
                http.post(
                    f"/v1/sources/{source}/documents",
                    json={"documents": [doc(doc_id, f"text in {source}", folder=folder)]},
                    headers=bearer(w.admin_token),
                )
                for source in ("a", "b")
            )
        )
        codes = sorted(r.status_code for r in statuses)
        assert codes == [200, 409], [r.text for r in statuses]
        parents = {t.user for t in await gateway.fga.read(object=f"folder:acme/{folder}")}
        assert len(parents - {"tenant:acme"}) == 1


async def test_relationship_writes_cannot_reparent_another_sources_folder(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await _two_sources(gateway, http)
    response = await http.post(
        "/v1/relationships",
        json={
            "writes": [{"user": "source:wiki", "relation": "parent", "object": "folder:payroll"}]
        },
        headers=bearer(w.admin_token),
    )
    assert response.status_code == 409
    response = await http.post(
        "/v1/relationships",
        json={
            "writes": [{"user": "source:wiki", "relation": "parent", "object": "document:hr-pay"}]
        },
        headers=bearer(w.admin_token),
    )
    assert response.status_code == 409
    parents = await gateway.fga.read(object="folder:acme/payroll")
    assert {t.user for t in parents if t.relation == "parent"} == {"source:acme/hr"}


async def test_folders_linked_before_ingestion_are_claimed_as_one_tree(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    w = await World(gateway, http, "acme").setup(members=["alice"], agents=["helper"])
    await w.admin_call("POST", "/v1/sources", {"id": "wiki", "kind": "chroma"})
    link = {"user": "folder:eng", "relation": "parent", "object": "folder:eng-incidents"}
    await w.relationships(writes=[link])  # no source owns either yet: allowed
    await w.ingest([doc("inc1", "Incident postmortem", folder="eng-incidents")])
    # eng is now part of the docs tree: the wiki may not name it, nor hang it elsewhere.
    refused = await http.post(
        "/v1/sources/wiki/documents",
        json={"documents": [doc("w1", WIKI_TEXT, viewers=["tenant:acme#member"], folder="eng")]},
        headers=bearer(w.admin_token),
    )
    assert refused.status_code == 409
    moved = await http.post(
        "/v1/relationships",
        json={"writes": [{"user": "source:wiki", "relation": "parent", "object": "folder:eng"}]},
        headers=bearer(w.admin_token),
    )
    assert moved.status_code == 409
    assert await gateway.fga.read(object="folder:acme/eng") == [] or all(
        t.user != "source:acme/wiki" for t in await gateway.fga.read(object="folder:acme/eng")
    )
