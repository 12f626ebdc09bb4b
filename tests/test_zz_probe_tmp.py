import httpx, json
from gateway.service import Gateway
from tests.world import World, bearer, doc

async def test_probe(gateway: Gateway, http: httpx.AsyncClient) -> None:
    w = await World(gateway, http, "acme").setup(members=["alice", "bob", "rita"], agents=["summarizer"])
    await w.ingest([
        doc("d1", "Revenue forecast memo LEDGER-ALPHA.", viewers=["user:alice"], agents=["agent:summarizer"]),
        doc("d2", "Revenue forecast memo BRAVO.", viewers=["user:alice"]),
        doc("d3", "Revenue forecast memo CHARLIE.", viewers=["user:bob"], agents=["agent:summarizer"]),
    ])
    await w.relationships(writes=[{"user": "user:rita", "relation": "reviewer", "object": "tenant:acme"}])
    task = await w.task("alice", "summarizer", ["source:docs"])
    r = await w.retrieve("alice", "summarizer", task, "revenue forecast", k=10)
    rid = r.json()["request_id"]
    rita = gateway.mint_token(tenant="acme", user="rita")
    show = await http.get(f"/v1/audit/decisions/{rid}", headers=bearer(rita))
    print(json.dumps(show.json(), indent=1))
    rep = await http.post(f"/v1/audit/decisions/{rid}/replay", headers=bearer(rita))
    print(rep.status_code, json.dumps(rep.json(), indent=1))
    page = await http.get("/review")
    print(page.status_code, page.headers)
