"""SCIM 2.0 provisioning per tenant, over HTTP against the real OpenFGA.

Okta's and Entra ID's documented request sequences (tests/fixtures/scim, each naming
its source) are replayed as they are written, with OpenFGA checked after the steps
that change it; deactivation deprovisions exactly as ``DELETE /v1/principals`` does;
re-sent events are idempotent; every mutation is audited; the SCIM secret is per
tenant, hashed and rotatable; a stale directory fails its tenant closed and recovers
when the directory speaks again. The catalog part runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import scim
from gateway.catalog import ScimUserRecord, SourceCatalog, open_catalog
from gateway.cli import main
from gateway.errors import Conflict, InvalidIdentifier
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from tests.conftest import pg_schema_dsn
from tests.world import World, bearer, doc

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "scim"
BASE = "/scim/v2"
QUERY = "quarterly roadmap for the platform"


async def _tenant(gateway: Gateway, http: httpx.AsyncClient, tenant: str = "acme") -> str:
    """A tenant with a SCIM secret; returns the secret."""
    await World(gateway, http, tenant).setup(agents=["helper"])
    issued = await gateway.issue_scim_secret(tenant)
    return str(issued["token"])


def _fill(value: Any, saved: dict[str, str]) -> Any:
    text = json.dumps(value)
    for name, resource_id in saved.items():
        text = text.replace("{" + name + "}", resource_id)
    return json.loads(text)


async def _holds(gateway: Gateway, tenant: str, ref: list[str]) -> bool:
    user, relation, obj = ref
    kind, _, name = obj.partition(":")
    target = f"tenant:{tenant}" if kind == "tenant" else f"{kind}:{tenant}/{name}"
    who_kind, _, who = user.partition(":")
    tuples = await gateway.fga.read(user=f"{who_kind}:{tenant}/{who}", object=target)
    return any(t.relation == relation for t in tuples)


async def _relations(gateway: Gateway, who: str, tenant: str = "acme") -> list[Any]:
    """Every tuple of ``who`` (``user:alice``) in the tenant."""
    kind, _, name = who.partition(":")
    return await gateway._tuples_of_subject(tenant, f"{kind}:{tenant}/{name}")


async def _replay(gateway: Gateway, http: httpx.AsyncClient, fixture: str) -> dict[str, str]:
    recorded = json.loads((FIXTURES / fixture).read_text())
    assert recorded["source"], "a recorded sequence names its source"
    secret = await _tenant(gateway, http)
    saved: dict[str, str] = {}
    for step in recorded["steps"]:
        path = _fill(step["path"], saved)
        kwargs: dict[str, Any] = {"headers": {**bearer(secret), "accept": scim.MEDIA_TYPE}}
        if "body" in step:
            kwargs["content"] = json.dumps(_fill(step["body"], saved))
            kwargs["headers"]["content-type"] = scim.MEDIA_TYPE
        response = await http.request(step["method"], BASE + path, **kwargs)
        where = f"{fixture}: {step['name']}"
        assert response.status_code == step["status"], (where, response.text)
        body = response.json() if response.content else {}
        if response.content:
            assert response.headers["content-type"].startswith(scim.MEDIA_TYPE), where
        if "save" in step:
            saved[step["save"]] = body["id"]
        expect = _fill(step.get("expect", {}), saved)
        if "totalResults" in expect:
            assert body["totalResults"] == expect["totalResults"], where
            assert len(body["Resources"]) == expect["totalResults"], where
        for key, value in expect.get("fields", {}).items():
            assert body[key] == value, (where, key, body.get(key))
        if expect.get("no_members"):
            assert "members" not in body, where
        for ref in expect.get("present", []):
            assert await _holds(gateway, "acme", ref), (where, ref)
        for ref in expect.get("absent", []):
            assert not await _holds(gateway, "acme", ref), (where, ref)
        assert "password" not in json.dumps(body), "a password is never stored or returned"
    return saved


async def test_okta_provisioning_and_deprovisioning_sequence(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    saved = await _replay(gateway, http, "okta.json")
    # The deactivated user keeps nothing; the other one is still a tenant member.
    assert await _relations(gateway, "user:test.user_at_okta.local") == []
    second = ["user:second.user_at_okta.local", "member", "tenant:acme"]
    assert await _holds(gateway, "acme", second)
    stored = await gateway.catalog.scim_user("acme", id=saved["user"])
    assert stored is not None and "password" not in json.dumps(stored.attributes)


async def test_entra_provisioning_and_deprovisioning_sequence(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    await _replay(gateway, http, "entra.json")
    for user in ("Test_User_00aa00aa-bb11-cc22-dd33-44ee44ee44ee",
                 "5b50642d-79fc-4410-9e90-4c077cdd1a59_at_testuser.com"):  # fmt: skip
        assert await _relations(gateway, f"user:{user}") == []
    users, total = await gateway.catalog.scim_users("acme", {})
    assert (users, total) == ([], 0)


async def _provision(
    http: httpx.AsyncClient, secret: str, user_name: str, external_id: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"schemas": [scim.USER_SCHEMA], "userName": user_name, "active": True}
    if external_id is not None:
        body["externalId"] = external_id
    response = await http.post(f"{BASE}/Users", json=body, headers=bearer(secret))
    assert response.status_code == 201, response.text
    return dict(response.json())


async def _group(
    http: httpx.AsyncClient, secret: str, name: str, members: list[str]
) -> dict[str, Any]:
    body = {
        "schemas": [scim.GROUP_SCHEMA],
        "displayName": name,
        "members": [{"value": m} for m in members],
    }
    response = await http.post(f"{BASE}/Groups", json=body, headers=bearer(secret))
    assert response.status_code == 201, response.text
    return dict(response.json())


async def _patch(
    http: httpx.AsyncClient, secret: str, path: str, *operations: dict[str, Any]
) -> httpx.Response:
    body = {"schemas": [scim.PATCH_SCHEMA], "Operations": list(operations)}
    return await http.patch(f"{BASE}/{path}", json=body, headers=bearer(secret))


async def test_deactivation_deprovisions_exactly_as_delete_principals(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    secret = await _tenant(gateway, http)
    w = World(gateway, http, "acme")
    alice = await _provision(http, secret, "alice", "okta-alice")
    await _group(http, secret, "eng", [alice["id"]])
    await w.relationships(
        writes=[
            {"user": "user:alice", "relation": "admin", "object": "tenant:acme"},
            {"user": "user:alice", "relation": "reviewer", "object": "tenant:acme"},
        ]
    )
    await w.ingest(
        [
            doc("d-eng", "Quarterly roadmap: the platform ships.", ["group:eng#member"],
                ["agent:helper"]),
            doc("d-alice", "Quarterly roadmap notes for the platform.", ["user:alice"],
                ["agent:helper"]),
        ]
    )  # fmt: skip
    task = await w.task("alice", "helper", ["source:docs"])
    assert set(await w.retrieved_docs("alice", "helper", task, QUERY)) == {"d-eng", "d-alice"}
    # Okta's deactivation: a path-less replace.
    response = await _patch(
        http, secret, f"Users/{alice['id']}", {"op": "replace", "value": {"active": False}}
    )
    assert response.status_code == 200 and response.json()["active"] is False
    assert response.json()["groups"] == []
    # Exactly what DELETE /v1/principals leaves: nothing, and the task revoked.
    assert await _relations(gateway, "user:alice") == []
    assert await gateway.fga.read(relation="live", object=f"task:acme/{task}") == []
    entries, _ = await gateway.audit.list("acme", limit=200)
    applied = [
        e.record.extra
        for e in entries
        if e.record.kind == "admin" and e.record.extra.get("action") == "principal.deprovision"
        and e.record.extra.get("phase") == "applied"
    ]  # fmt: skip
    # member, group eng, admin, reviewer, viewer d-alice, delegator of the task
    assert applied[0]["relations_removed"] == 6 and applied[0]["tasks_revoked"] == 1
    assert await w.retrieved_docs("alice", "helper", task, QUERY) == []
    alice_admin = bearer(gateway.mint_token(tenant="acme", user="alice"))
    assert (await http.get("/v1/sources", headers=alice_admin)).status_code == 403
    # Reactivated: a tenant member again, nothing else comes back until the directory
    # sends it again (here: the group membership).
    response = await _patch(
        http, secret, f"Users/{alice['id']}", {"op": "Replace", "path": "active", "value": "True"}
    )
    assert response.status_code == 200 and response.json()["active"] is True
    assert await w.retrieved_docs("alice", "helper", task, QUERY) == []
    fresh = await w.task("alice", "helper", ["source:docs"])
    assert await w.retrieved_docs("alice", "helper", fresh, QUERY) == []
    group = (await http.get(f"{BASE}/Groups", params={"filter": 'displayName eq "eng"'},
                            headers=bearer(secret))).json()["Resources"][0]  # fmt: skip
    assert group["members"] == []
    added = await _patch(
        http, secret, f"Groups/{group['id']}",
        {"op": "add", "path": "members", "value": [{"value": alice["id"]}]},
    )  # fmt: skip
    assert added.status_code == 204
    assert await w.retrieved_docs("alice", "helper", fresh, QUERY) == ["d-eng"]
    # DELETE deprovisions too, and the User is gone.
    gone = await http.delete(f"{BASE}/Users/{alice['id']}", headers=bearer(secret))
    assert gone.status_code == 204
    assert await _relations(gateway, "user:alice") == []
    assert await w.retrieved_docs("alice", "helper", fresh, QUERY) == []
    missing = await http.get(f"{BASE}/Users/{alice['id']}", headers=bearer(secret))
    assert missing.status_code == 404 and missing.json()["status"] == "404"


async def test_resent_events_are_idempotent_and_names_unique(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    secret = await _tenant(gateway, http)
    first = await _provision(http, secret, "bob@example.com", "00u1")
    again = await _provision(http, secret, "bob@example.com", "00u1")
    assert again["id"] == first["id"]
    # Without its externalId (Okta's PUT leaves it out), still the same user.
    assert (await _provision(http, secret, "BOB@example.com"))["id"] == first["id"]
    users, total = await gateway.catalog.scim_users("acme", {})
    assert total == 1 and users[0].external_id == "00u1"
    clash = await http.post(
        f"{BASE}/Users",
        json={"schemas": [scim.USER_SCHEMA], "userName": "bob@example.com", "externalId": "00u2"},
        headers=bearer(secret),
    )
    assert clash.status_code == 409 and clash.json()["scimType"] == "uniqueness"
    # Another name that maps to the same user id is refused, never merged.
    merged = await http.post(
        f"{BASE}/Users",
        json={"schemas": [scim.USER_SCHEMA], "userName": "bob_at_example.com"},
        headers=bearer(secret),
    )
    assert merged.status_code == 409
    # The directory owns the group's users; an agent an admin put in it stays.
    await World(gateway, http, "acme").relationships(
        writes=[
            {"user": "user:zed", "relation": "member", "object": "group:Finance_Team"},
            {"user": "agent:helper", "relation": "member", "object": "group:Finance_Team"},
        ]
    )
    group = await _group(http, secret, "Finance Team", [first["id"]])
    assert not await _holds(gateway, "acme", ["user:zed", "member", "group:Finance_Team"])
    helper = ["agent:helper", "member", "group:Finance_Team"]
    assert await _holds(gateway, "acme", helper)
    again_group = await _group(http, secret, "Finance Team", [first["id"]])
    assert again_group["id"] == group["id"]
    for _ in range(2):
        added = await _patch(
            http, secret, f"Groups/{group['id']}",
            {"op": "add", "path": "members", "value": [{"value": first["id"]}]},
        )  # fmt: skip
        assert added.status_code == 204
    assert await gateway.catalog.scim_members("acme", group["id"]) == [first["id"]]
    member = ["user:bob_at_example.com", "member", "group:Finance_Team"]
    assert await _holds(gateway, "acme", member)
    found = await http.get(
        f"{BASE}/Groups",
        params={"filter": f'id eq "{group["id"]}" and members eq "{first["id"]}"'},
        headers=bearer(secret),
    )
    assert found.json()["totalResults"] == 1
    by_external = await http.get(
        f"{BASE}/Users", params={"filter": "externalId eq 00u1"}, headers=bearer(secret)
    )
    assert [u["id"] for u in by_external.json()["Resources"]] == [first["id"]]
    unknown = await _patch(
        http, secret, f"Groups/{group['id']}",
        {"op": "add", "path": "members", "value": [{"value": "no-such-user"}]},
    )  # fmt: skip
    assert unknown.status_code == 400 and unknown.json()["scimType"] == "invalidValue"
    bad_filter = await http.get(
        f"{BASE}/Users", params={"filter": 'userName co "bob"'}, headers=bearer(secret)
    )
    assert bad_filter.status_code == 400 and bad_filter.json()["scimType"] == "invalidFilter"
    for _ in range(2):
        await http.delete(f"{BASE}/Groups/{group['id']}", headers=bearer(secret))
    assert not await _holds(gateway, "acme", member)
    assert await _holds(gateway, "acme", helper)
    second = await http.delete(f"{BASE}/Groups/{group['id']}", headers=bearer(secret))
    assert second.status_code == 404


async def test_every_scim_mutation_is_an_admin_audit_record(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    secret = await _tenant(gateway, http)
    carol = await _provision(http, secret, "carol", "00uc")
    await _patch(http, secret, f"Users/{carol['id']}", {"op": "replace", "path": "active",
                                                        "value": False})  # fmt: skip
    entries, _ = await gateway.audit.list("acme", limit=200)
    records = [e.record for e in entries if e.record.kind == "admin"]
    scim_records = [r for r in records if str(r.extra["action"]).startswith("scim.user")]
    intents = {r.extra["action"] for r in scim_records if r.extra["phase"] == "intent"}
    assert intents == {"scim.user.create", "scim.user.patch"}
    assert all(r.user == Gateway.SCIM_CALLER for r in scim_records)
    assert all(r.token_id.startswith("scim-secret:") for r in scim_records)
    create = next(
        r for r in scim_records
        if r.extra["action"] == "scim.user.create" and r.extra["phase"] == "intent"
    )  # fmt: skip
    assert ["user:acme/carol", "member", "tenant:acme"] in create.extra["writes"]
    assert {r.extra["phase"] for r in scim_records} == {"intent", "applied"}
    deprovision = [
        r for r in records
        if r.extra["action"] == "principal.deprovision" and r.extra["phase"] == "intent"
    ]  # fmt: skip
    assert (
        deprovision
        and ["user:acme/carol", "member", "tenant:acme"] in (deprovision[0].extra["deletes"])
    )
    issued = [r for r in records if r.extra["action"] == "scim.secret.issue"]
    assert issued and secret not in json.dumps([r.to_dict() for r in records])


async def test_the_scim_secret_is_per_tenant_hashed_and_rotatable(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    acme = await _tenant(gateway, http, "acme")
    globex = await _tenant(gateway, http, "globex")
    await _provision(http, acme, "dana")
    for headers in ({}, bearer("sgscim_0123456789abcdef_" + "x" * 43), bearer(acme + "x")):
        refused = await http.get(f"{BASE}/Users", headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["schemas"] == [scim.ERROR_SCHEMA]
        assert refused.headers["www-authenticate"].startswith("Bearer")
    # The secret names the tenant: globex's directory sees none of acme's users.
    listed = await http.get(f"{BASE}/Users", headers=bearer(globex))
    assert listed.json()["totalResults"] == 0
    # Stored as a digest only.
    secret_id = scim.secret_id(acme)
    assert secret_id is not None
    stored = await gateway.catalog.scim_secret(secret_id)
    assert stored == ("acme", scim.secret_digest(acme)) and acme not in stored
    # Rotation: the new secret works, the old one stops (unless kept for a while).
    kept = await gateway.issue_scim_secret("acme", keep_previous=True)
    assert (await http.get(f"{BASE}/Users", headers=bearer(acme))).status_code == 200
    assert (await http.get(f"{BASE}/Users", headers=bearer(kept["token"]))).status_code == 200
    rotated = await gateway.issue_scim_secret("acme")
    assert rotated["revoked"] == 2
    assert (await http.get(f"{BASE}/Users", headers=bearer(acme))).status_code == 401
    assert (await http.get(f"{BASE}/Users", headers=bearer(kept["token"]))).status_code == 401
    assert (await http.get(f"{BASE}/Users", headers=bearer(rotated["token"]))).status_code == 200
    # Over HTTP: operators and the tenant's admins only.
    admin = bearer(gateway.mint_token(tenant="acme", user="admin"))
    issued = await http.post("/v1/tenants/acme/scim-token", json={}, headers=admin)
    assert issued.status_code == 201 and issued.headers["cache-control"] == "no-store"
    assert (await http.get(f"{BASE}/Users", headers=bearer(issued.json()["token"]))).is_success
    other = await http.post("/v1/tenants/globex/scim-token", json={}, headers=admin)
    assert other.status_code == 403
    stranger = bearer(gateway.mint_token(tenant="acme", user="dana"))
    assert (await http.post("/v1/tenants/acme/scim-token", headers=stranger)).status_code == 403


async def test_discovery_endpoints(gateway: Gateway, http: httpx.AsyncClient) -> None:
    secret = await _tenant(gateway, http)
    config = (await http.get(f"{BASE}/ServiceProviderConfig", headers=bearer(secret))).json()
    assert config["patch"]["supported"] is True and config["bulk"]["supported"] is False
    assert config["authenticationSchemes"][0]["type"] == "oauthbearertoken"
    types = (await http.get(f"{BASE}/ResourceTypes", headers=bearer(secret))).json()
    assert {t["id"] for t in types["Resources"]} == {"User", "Group"}
    user_type = await http.get(f"{BASE}/ResourceTypes/User", headers=bearer(secret))
    assert user_type.json()["schema"] == scim.USER_SCHEMA
    schemas = (await http.get(f"{BASE}/Schemas", headers=bearer(secret))).json()
    ids = {s["id"] for s in schemas["Resources"]}
    assert ids == {scim.USER_SCHEMA, scim.GROUP_SCHEMA, scim.ENTERPRISE_SCHEMA}
    user_schema = await http.get(f"{BASE}/Schemas/{scim.USER_SCHEMA}", headers=bearer(secret))
    names = {a["name"] for a in user_schema.json()["attributes"]}
    assert {"userName", "active", "externalId", "emails"} <= names
    assert (await http.get(f"{BASE}/Schemas", headers={})).status_code == 401


async def test_stale_directory_fails_its_tenant_closed_and_recovers(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    secret = await _tenant(gateway, http)
    other = World(gateway, http, "globex")
    await other.setup(members=["erin"], agents=["helper"])
    w = World(gateway, http, "acme")
    alice = await _provision(http, secret, "alice")
    await w.ingest([doc("d1", "Quarterly roadmap for the platform.", ["user:alice"],
                        ["agent:helper"])])  # fmt: skip
    await other.ingest([doc("g1", "Quarterly roadmap for the platform.", ["user:erin"],
                            ["agent:helper"])])  # fmt: skip
    task = await w.task("alice", "helper", ["source:docs"])
    globex_task = await other.task("erin", "helper", ["source:docs"])
    # Off by default: a silent directory changes nothing until the tenant declares it.
    await gateway.catalog.directory_heard("acme", time.time() - 10 * 86400)
    assert await w.retrieved_docs("alice", "helper", task, QUERY) == ["d1"]
    admin = bearer(w.admin_token)
    declared = await http.put(
        "/v1/tenants/acme/directory", json={"directory": "scim", "max_silence_s": 3600},
        headers=admin,
    )  # fmt: skip
    assert declared.status_code == 200, declared.text
    # Silent for ten days already: declaring does not make it fresh, only speaking does.
    assert declared.json()["directory"] == "scim" and declared.json()["stale"] is True
    assert (await w.retrieve("alice", "helper", task, QUERY)).status_code == 503
    assert (await http.get(f"{BASE}/ServiceProviderConfig", headers=bearer(secret))).is_success
    assert await w.retrieved_docs("alice", "helper", task, QUERY) == ["d1"]
    # Silent past the bound: every retrieval of the tenant fails closed, audited.
    await gateway.catalog.directory_heard("acme", time.time() - 7200)
    status = await http.get("/v1/tenants/acme/directory", headers=admin)
    assert status.json()["stale"] is True
    stale = await w.retrieve("alice", "helper", task, QUERY)
    assert stale.status_code == 503
    error = stale.json()["error"]
    assert error["code"] == "identity_stale"
    entry = await gateway.audit.get("acme", error["request_id"])
    assert entry is not None and entry.record.error_code == "identity_stale"
    assert entry.record.outcome == "error" and entry.record.returned_chunk_ids == ()
    # The same delegated question asked through AuthZEN fails closed too.
    asked = await http.post(
        "/access/v1/evaluation",
        json={
            "subject": {"type": "user", "id": "alice"},
            "action": {"name": "read"},
            "resource": {"type": "document", "id": "d1"},
        },
        headers=bearer(w.agent_token("alice", "helper", task)),
    )
    assert asked.status_code == 503 and asked.json()["error"]["code"] == "identity_stale"
    # Other tenants are not affected.
    assert await other.retrieved_docs("erin", "helper", globex_task, QUERY) == ["g1"]
    # The directory speaks (any authenticated SCIM request): the tenant recovers.
    spoke = await http.get(f"{BASE}/Users/{alice['id']}", headers=bearer(secret))
    assert spoke.status_code == 200
    assert await w.retrieved_docs("alice", "helper", task, QUERY) == ["d1"]
    # Withdrawn: the bound no longer applies.
    await gateway.catalog.directory_heard("acme", time.time() - 7200)
    withdrawn = await http.put(
        "/v1/tenants/acme/directory", json={"directory": "none"}, headers=admin
    )
    assert withdrawn.json()["stale"] is False
    assert await w.retrieved_docs("alice", "helper", task, QUERY) == ["d1"]
    refused = await http.put(
        "/v1/tenants/acme/directory", json={"directory": "scim"}, headers=admin
    )
    assert refused.status_code == 422


def test_scim_token_and_directory_commands_on_the_data_directory(
    openfga: ManagedOpenFGA,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In-process (no running serve): each command opens the data directory's gateway,
    # against the session's OpenFGA.
    monkeypatch.setenv("SCOPEGATE_OPENFGA_URL", openfga.url)
    monkeypatch.setenv("SCOPEGATE_OPENFGA_STORE_NAME", f"scim-cli-{uuid.uuid4().hex[:12]}")
    data = tmp_path / "data"

    def cli(*args: str, ok: bool = True) -> tuple[str, str]:
        def run() -> int:
            try:
                return main([*args, "--data-dir", str(data)])
            except SystemExit as exc:
                return int(exc.code or 0)

        with ThreadPoolExecutor(1) as pool:
            code = pool.submit(run).result(timeout=180)
        out, err = capsys.readouterr()
        assert (code == 0) == ok, err
        return out, err

    cli("tenant", "create", "acme", "--admin", "carol")
    first, note = cli("tenant", "scim-token", "acme")
    assert "shown once" in note and "0 previous" in note
    second, note = cli("tenant", "scim-token", "acme", "--keep-previous")
    assert "0 previous" in note
    third, note = cli("tenant", "scim-token", "acme")
    assert "2 previous" in note
    _, err = cli("tenant", "scim-token", "globex", ok=False)
    assert "not_found" in err
    declared = json.loads(cli("tenant", "directory", "acme", "--set", "scim",
                              "--max-silence", "2h")[0])  # fmt: skip
    assert declared["directory"] == "scim" and declared["max_silence_s"] == 7200
    shown = json.loads(cli("tenant", "directory", "acme")[0])
    assert shown["directory"] == "scim" and shown["heard_at"] is None

    async def stored() -> list[tuple[str, str] | None]:
        catalog = open_catalog(None, data)
        try:
            return [await catalog.scim_secret(str(scim.secret_id(t.strip()))) for t in
                    (first, second, third)]  # fmt: skip
        finally:
            await catalog.close()

    found = asyncio.run(stored())
    assert found == [None, None, ("acme", scim.secret_digest(third.strip()))]


# -- the pure mapping ------------------------------------------------------------------


def test_directory_names_map_to_ids() -> None:
    assert scim.directory_id("alice") == "alice"
    assert scim.directory_id("test.user@okta.local") == "test.user_at_okta.local"
    assert scim.directory_id("Test SCIMv2") == "Test_SCIMv2"
    assert scim.directory_id("R&D") == "R_x26_D"
    assert scim.directory_id("José") == "Jos_xc3__xa9_"
    for bad in ("", "@admin", "a..b", "x" * 129, " lead"):
        with pytest.raises(InvalidIdentifier):
            scim.directory_id(bad)


def test_filters_as_providers_send_them() -> None:
    assert scim.parse_filter('userName eq "a@b.c"') == [scim.Clause("username", "a@b.c")]
    assert scim.parse_filter("externalId eq jyoung") == [scim.Clause("externalid", "jyoung")]
    assert scim.parse_filter('id eq "g1" and members[value eq "u1"]') == [
        scim.Clause("id", "g1"),
        scim.Clause("members", "u1"),
    ]
    assert scim.parse_filter(
        'urn:ietf:params:scim:schemas:core:2.0:User:userName EQ "x \\"y\\""'
    ) == [scim.Clause("username", 'x "y"')]
    for bad in ('userName sw "a"', 'a eq "b" or c eq "d"', "userName eq", '(a eq "b")'):
        with pytest.raises(scim.ScimError):
            scim.parse_filter(bad)


def test_patch_operations_with_provider_quirks() -> None:
    user = scim.UserState("u1", None, True, {"emails": [], "name": {"givenName": "A"}})
    doc1 = scim.apply_patch(
        user.document(),
        {
            "Operations": [
                {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "w@x.y"},
                {"op": "add", "value": {"Name.FamilyName": "B", "nickName": "Babs"}},
                {"op": "replace", "path": "active", "value": "False"},
                {"op": "replace", "path": "urn:ietf:params:scim:schemas:extension:enterprise:"
                 "2.0:User:department", "value": "R&D"},
            ]
        },
    )  # fmt: skip
    patched = scim.parse_user(doc1)
    assert patched.active is False
    assert patched.attributes["emails"] == [{"type": "work", "value": "w@x.y"}]
    assert patched.attributes["name"] == {"givenName": "A", "familyName": "B"}
    assert patched.attributes[scim.ENTERPRISE_SCHEMA] == {"department": "R&D"}
    group = scim.GroupState("g", None, ("u1", "u2", "u3"))
    doc2 = scim.apply_patch(
        group.document(),
        {
            "Operations": [
                {"op": "remove", "path": 'members[value eq "u1"]'},
                {"op": "Remove", "path": "members", "value": [{"value": "u2"}]},
                {"op": "add", "path": "members", "value": [{"value": "u4"}, {"value": "u3"}]},
            ]
        },
    )
    assert scim.parse_group(doc2).members == ("u3", "u4")
    for bad in (
        {"Operations": [{"op": "remove"}]},
        {"Operations": [{"op": "move", "path": "active"}]},
        {"Operations": []},
        {"Operations": [{"op": "replace", "path": "active", "value": "maybe"}]},
    ):
        with pytest.raises(scim.ScimError):
            scim.parse_user(scim.apply_patch(user.document(), bad))


# -- the catalog, on both backends -----------------------------------------------------

Opener = Callable[[], SourceCatalog]


@pytest.fixture(params=["sqlite", "postgres"])
async def open_replica(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    dsn = None
    if request.param == "postgres":
        dsn = pg_schema_dsn(request.getfixturevalue("pg_dsn"), "scim")
    opened: list[SourceCatalog] = []

    def opener() -> SourceCatalog:
        catalog = open_catalog(dsn, tmp_path)
        opened.append(catalog)
        return catalog

    yield opener
    for catalog in opened:
        await catalog.close()


def _user(resource_id: str, name: str, external: str | None = None) -> ScimUserRecord:
    now = time.time()
    return ScimUserRecord(
        "acme", resource_id, scim.directory_id(name), name, external, True, {"x": [1]}, now, now
    )


async def test_catalog_keeps_the_directory(open_replica: Opener) -> None:
    catalog, replica = open_replica(), open_replica()
    await catalog.add_tenant("acme")
    assert await replica.tenant_exists("acme") and not await replica.tenant_exists("globex")
    alice = _user("u1", "Alice@Example.com", "ext-1")
    await catalog.save_scim_user(alice, scim.name_key(alice.user_name))
    found = await replica.scim_user("acme", user_name_key="alice@example.com")
    assert found == alice
    assert await replica.scim_user("acme", external_id="ext-1") == alice
    assert await replica.scim_user("globex", id="u1") is None
    with pytest.raises(Conflict):  # same name, another resource
        clash = _user("u2", "alice@example.com")
        await replica.save_scim_user(clash, scim.name_key(clash.user_name))
    updated = _user("u1", "alice@example.com", "ext-1")
    await replica.save_scim_user(updated, scim.name_key(updated.user_name))
    users, total = await catalog.scim_users("acme", {}, 1, 10)
    assert total == 1 and users[0].user_name == "alice@example.com"
    bob = _user("u3", "bob")
    await catalog.save_scim_user(bob, "bob")
    page, total = await catalog.scim_users("acme", {}, 2, 1)
    assert total == 2 and [u.id for u in page] == ["u3"]
    # Groups and members.
    from gateway.catalog import ScimGroupRecord

    group = ScimGroupRecord("acme", "g1", "eng", "Eng", None, {}, time.time(), time.time())
    await catalog.save_scim_group(group, "eng", ["u1", "u3", "u1"])
    assert await replica.scim_members("acme", "g1") == ["u1", "u3"]
    assert [g.id for g in await replica.scim_memberships("acme", "u3")] == ["g1"]
    found_groups, _ = await replica.scim_groups("acme", {"display_key": "eng"}, member="u1")
    assert [g.id for g in found_groups] == ["g1"]
    await replica.forget_scim_memberships("acme", "u1")
    assert await catalog.scim_members("acme", "g1") == ["u3"]
    await catalog.forget_scim_user("acme", "u3")
    assert await catalog.scim_members("acme", "g1") == []
    await catalog.forget_scim_group("acme", "g1")
    assert await replica.scim_group("acme", id="g1") is None
    # Secrets: digests, rotation.
    assert await catalog.add_scim_secret("acme", "s1", "d1") == 0
    assert await replica.add_scim_secret("acme", "s2", "d2", keep_previous=True) == 0
    assert await replica.scim_secret("s1") == ("acme", "d1")
    assert await catalog.add_scim_secret("acme", "s3", "d3") == 2
    assert await replica.scim_secret("s1") is None and await replica.scim_secret("s2") is None
    # Freshness, shared by replicas.
    assert await catalog.directory("acme") is None
    await catalog.directory_heard("acme", 1000.0)
    state = await replica.directory("acme")
    assert state is not None and state.source == "none" and not state.stale(10**10)
    declared = await replica.declare_directory("acme", "scim", 60.0)
    assert declared.heard_at == 1000.0 and declared.max_silence_s == 60.0
    assert declared.stale(time.time())
    await catalog.directory_heard("acme")
    heard = await replica.directory("acme")
    assert heard is not None and not heard.stale(time.time()) and heard.stale(time.time() + 61)
    never = await catalog.declare_directory("globex", "scim", 60.0)
    assert never.heard_at is None and not never.stale(time.time())
    assert never.stale(time.time() + 61)
