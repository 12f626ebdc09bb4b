"""Delegation tokens by OAuth 2.0 Token Exchange (RFC 8693), with a real OIDC issuer.

The issuer (tests/idp.py) runs on loopback with its own JWKS; keys are rotated and
revoked while the gateway runs. Verified tokens still get nothing unless the task is
bound to that user and agent and both are active members: lifecycle wins over a valid
signature. The last test is the whole story over HTTP, with the commands and the code
of docs/identity.md: a directory provisions a user into groups, her agent retrieves
with a token it got by exchange, the directory deactivates her and the next retrieval
and exchange are refused; a stale directory fails its tenant closed and recovers.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scopegate_client import Forbidden, IdentityStale, ScopegateClient, TokenExchange

from gateway.cli import main
from gateway.errors import ConfigurationError
from gateway.fga_server import ManagedOpenFGA
from gateway.service import Gateway
from gateway.settings import Settings, production_problems
from gateway.token_exchange import GRANT_TYPE, ID_TOKEN, JWT, exchange_signing_key
from tests.conftest import make_settings
from tests.idp import Issuer
from tests.served import serve_gateway
from tests.world import World, bearer, doc

QUERY = "quarterly revenue forecast"
DOC = Path(__file__).resolve().parent.parent / "docs" / "identity.md"


@pytest.fixture
def idp() -> Iterator[Issuer]:
    issuer = Issuer()
    try:
        yield issuer
    finally:
        issuer.close()


@pytest.fixture
async def gateway(
    openfga: ManagedOpenFGA, tmp_path: Path, embeddings: Any, idp: Issuer
) -> AsyncIterator[Gateway]:
    settings = make_settings(openfga, tmp_path / "data", oidc_issuers=[idp.config()])
    g = await Gateway.start(settings, embeddings=embeddings)
    try:
        yield g
    finally:
        await g.close()


async def _world(gateway: Gateway, http: httpx.AsyncClient) -> tuple[World, dict[str, str]]:
    """acme: alice and bob provisioned by the directory, the agents helper and other."""
    w = await World(gateway, http, "acme").setup(agents=["helper", "other"])
    secret = (await gateway.issue_scim_secret("acme"))["token"]
    ids = {}
    for name in ("alice@example.com", "bob@example.com"):
        response = await http.post(
            "/scim/v2/Users", json={"userName": name, "active": True}, headers=bearer(secret)
        )
        assert response.status_code == 201, response.text
        ids[name] = response.json()["id"]
    await w.ingest(
        [
            doc("rev", "Quarterly revenue forecast: revenue grows eight percent.",
                ["user:alice_at_example.com", "user:bob_at_example.com"], ["agent:helper"]),
        ]
    )  # fmt: skip
    return w, {"secret": secret, **ids}


async def _exchange(
    http: httpx.AsyncClient, subject: str, actor: str, **extra: str
) -> httpx.Response:
    form = {
        "grant_type": GRANT_TYPE,
        "subject_token": subject,
        "subject_token_type": ID_TOKEN,
        "actor_token": actor,
        "actor_token_type": JWT,
        **extra,
    }
    return await http.post("/v1/token", data=form)


async def _retrieve(http: httpx.AsyncClient, token: str) -> list[str]:
    response = await http.post("/v1/retrieve", json={"query": QUERY}, headers=bearer(token))
    assert response.status_code == 200, response.text
    return [c["document_id"] for c in response.json()["chunks"]]


async def test_an_exchanged_token_delegates_the_task(
    gateway: Gateway, http: httpx.AsyncClient, idp: Issuer
) -> None:
    w, _ = await _world(gateway, http)
    task = await w.task("alice_at_example.com", "helper", ["source:docs"])
    subject = idp.user_token("alice@example.com", ttl_s=600)
    response = await _exchange(http, subject, idp.agent_token("helper"), task=task)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    answer = response.json()
    assert answer["token_type"] == "Bearer" and answer["task"] == task
    assert answer["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert 0 < answer["expires_in"] <= gateway.settings.exchange_token_ttl_s
    claims = jwt.decode(answer["access_token"], options={"verify_signature": False})
    assert (claims["sub"], claims["act"], claims["tenant"], claims["task"]) == (
        "alice_at_example.com", {"sub": "helper"}, "acme", task,
    )  # fmt: skip
    assert await _retrieve(http, answer["access_token"]) == ["rev"]
    record = await gateway.audit.get("acme", response.headers["x-request-id"])
    assert record is not None and record.record.kind == "token_exchange"
    assert record.record.outcome == "allowed" and record.record.token_id == claims["jti"]
    # Never longer than the user's own token.
    short = await _exchange(
        http, idp.user_token("alice@example.com", ttl_s=40), idp.agent_token("helper"), task=task
    )
    assert 0 < short.json()["expires_in"] <= 40
    # A new task for a scope, bound to that user and agent; later exchanges name it.
    scoped = await _exchange(http, subject, idp.agent_token("helper"), scope="source:docs")
    assert scoped.status_code == 200, scoped.text
    new_task = scoped.json()["task"]
    assert new_task != task
    assert await _retrieve(http, scoped.json()["access_token"]) == ["rev"]
    delegator = await gateway.fga.read(relation="delegator", object=f"task:acme/{new_task}")
    assert [t.user for t in delegator] == ["user:acme/alice_at_example.com"]


async def test_key_rotation_and_a_revoked_key(
    gateway: Gateway, http: httpx.AsyncClient, idp: Issuer
) -> None:
    w, _ = await _world(gateway, http)
    task = await w.task("alice_at_example.com", "helper", ["source:docs"])
    first = idp.current
    old_subject = idp.user_token("alice@example.com")
    assert (await _exchange(http, old_subject, idp.agent_token("helper"), task=task)).is_success
    second = idp.rotate()
    # The new key signs; the set is fetched again for its unknown kid.
    new_subject = idp.user_token("alice@example.com")
    assert jwt.get_unverified_header(new_subject)["kid"] == second
    assert (await _exchange(http, new_subject, idp.agent_token("helper"), task=task)).is_success
    # Until revoked, tokens signed with the old key still verify.
    assert (await _exchange(http, old_subject, idp.agent_token("helper"), task=task)).is_success
    idp.revoke(first)
    refused = await _exchange(http, old_subject, idp.agent_token("helper"), task=task)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_token"
    old_agent = idp.agent_token("helper", kid=second)
    assert (await _exchange(http, new_subject, old_agent, task=task)).is_success


async def test_tokens_that_do_not_verify_are_refused(
    gateway: Gateway, http: httpx.AsyncClient, idp: Issuer
) -> None:
    w, _ = await _world(gateway, http)
    task = await w.task("alice_at_example.com", "helper", ["source:docs"])
    agent = idp.agent_token("helper")
    stranger = Issuer()  # a real issuer, but not one the gateway trusts
    try:
        untrusted = stranger.user_token("alice@example.com")
    finally:
        stranger.close()
    unsigned = jwt.encode(
        jwt.decode(idp.user_token("alice@example.com"), options={"verify_signature": False}),
        None,
        algorithm="none",
    )
    hmac = jwt.encode(
        jwt.decode(idp.user_token("alice@example.com"), options={"verify_signature": False}),
        "a shared secret of thirty-two bytes or more",
        algorithm="HS256",
        headers={"kid": idp.current},
    )
    unknown_kid = jwt.encode(
        jwt.decode(idp.user_token("alice@example.com"), options={"verify_signature": False}),
        idp._keys[idp.current],
        algorithm="RS256",
        headers={"kid": "k-unknown"},
    )
    for subject in (
        idp.user_token("alice@example.com", audience="another-service"),
        idp.user_token("alice@example.com", ttl_s=-120),  # expired two minutes ago
        untrusted,
        unsigned,
        hmac,
        unknown_kid,
        idp.sign({"iss": idp.url, "sub": "x", "aud": "scopegate"}),  # no exp, no iat
        idp.agent_token("helper"),  # an agent's own token is not a user's
        "not-a-jwt",
    ):
        response = await _exchange(http, subject, agent, task=task)
        assert response.status_code == 401, (subject[:40], response.text)
        assert response.json()["error"]["code"] == "invalid_token"
    subject = idp.user_token("alice@example.com")
    for actor in (
        idp.user_token("bob@example.com", client_id="helper"),  # a user's token as the agent's
        idp.agent_token("helper", ttl_s=-120),
        idp.agent_token("helper", tenant="globex"),  # another tenant than the user's
    ):
        response = await _exchange(http, subject, actor, task=task)
        assert response.status_code == 401, response.text
    malformed = [
        {"grant_type": "client_credentials"},
        {"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"},
        {"audience": "another-service"},
        {"scope": "source:docs"},  # and task: one or the other
    ]
    for extra in malformed:
        form = {
            "grant_type": GRANT_TYPE,
            "subject_token": subject,
            "subject_token_type": ID_TOKEN,
            "actor_token": agent,
            "actor_token_type": JWT,
            "task": task,
            **extra,
        }
        response = await http.post("/v1/token", data=form)
        assert response.status_code == 422, (extra, response.text)
    same = await _exchange(http, subject, subject, task=task)
    assert same.status_code == 422
    as_json = await http.post("/v1/token", json={"grant_type": GRANT_TYPE})
    assert as_json.status_code == 422


async def test_lifecycle_wins_over_a_valid_signature(
    gateway: Gateway, http: httpx.AsyncClient, idp: Issuer
) -> None:
    w, ids = await _world(gateway, http)
    alice_task = await w.task("alice_at_example.com", "helper", ["source:docs"])
    bob_task = await w.task("bob_at_example.com", "helper", ["source:docs"])
    alice = idp.user_token("alice@example.com")
    helper = idp.agent_token("helper")
    # Not bound: bob's task, another agent, a revoked task, an unknown user.
    for subject, actor, task in (
        (alice, helper, bob_task),
        (alice, idp.agent_token("other"), alice_task),
    ):
        response = await _exchange(http, subject, actor, task=task)
        assert response.status_code == 403, response.text
    stranger = await _exchange(http, idp.user_token("mallory@example.com"), helper,
                               task=alice_task)  # fmt: skip
    assert stranger.status_code == 403
    revoked = await w.task("alice_at_example.com", "helper", ["source:docs"])
    await w.admin_call("DELETE", f"/v1/tasks/{revoked}")
    assert (await _exchange(http, alice, helper, task=revoked)).status_code == 403
    # The directory deactivates alice: her OIDC token is still valid, the exchange refuses.
    assert (await _exchange(http, alice, helper, task=alice_task)).status_code == 200
    deactivated = await http.patch(
        f"/scim/v2/Users/{ids['alice@example.com']}",
        json={"Operations": [{"op": "Replace", "path": "active", "value": "False"}]},
        headers=bearer(ids["secret"]),
    )
    assert deactivated.status_code == 200
    refused = await _exchange(http, alice, helper, task=alice_task)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    entry = await gateway.audit.get("acme", refused.headers["x-request-id"])
    assert entry is not None and entry.record.outcome == "denied"
    assert {"user_active", "task_active"} <= set(entry.record.extra["failed_checks"])
    assert (await _exchange(http, alice, helper, scope="source:docs")).status_code == 403
    # A deprovisioned agent is refused the same way.
    await w.admin_call("DELETE", "/v1/principals/agent:helper")
    bob = idp.user_token("bob@example.com")
    assert (await _exchange(http, bob, helper, task=bob_task)).status_code == 403


def test_the_production_signing_key_must_be_trusted(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    path = tmp_path / "exchange.pem"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    other = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    trusted = Settings(
        exchange_signing_key_file=path,
        trusted_issuers_pem={"old": other.decode(), "exchange-2025": public.decode()},
    )
    key = exchange_signing_key(trusted, None)
    assert key.kid == "exchange-2025" and key.public_pem == public
    with pytest.raises(ConfigurationError, match="TRUSTED_ISSUERS_PEM"):
        exchange_signing_key(Settings(exchange_signing_key_file=path), None)
    with pytest.raises(ConfigurationError):
        exchange_signing_key(Settings(), None)
    issuer = {"issuer": "https://idp", "jwks_url": "https://idp/keys", "audience": "sg"}
    problems = production_problems(Settings(oidc_issuers=[issuer]))
    assert any("SCOPEGATE_EXCHANGE_SIGNING_KEY_FILE" in p for p in problems)
    with pytest.raises(ValueError):
        Settings(oidc_issuers=[{**issuer, "algorithms": ["HS256"]}])
    with pytest.raises(ValueError):
        Settings(oidc_issuers=[{**issuer, "tenant": "acme"}])  # and tenant_claim


# -- the whole story over HTTP, as docs/identity.md tells it ----------------------------


def _blocks() -> dict[str, str]:
    marked = re.compile(r"<!-- run: (?P<name>[\w-]+) -->\n```\w+\n(?P<code>.*?)\n```", re.S)
    return {m["name"]: m["code"] for m in marked.finditer(DOC.read_text())}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    def run() -> int:
        try:
            return main(argv)
        except SystemExit as exc:
            return int(exc.code or 0)

    # main() runs its own event loop: keep it off the test runner's thread.
    with ThreadPoolExecutor(1) as pool:
        code = pool.submit(run).result(timeout=120)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_directory_lifecycle_and_token_exchange_end_to_end(
    openfga: ManagedOpenFGA,
    embeddings: Any,
    tmp_path: Path,
    idp: Issuer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "served"
    bg = serve_gateway(openfga, data, embeddings, oidc_issuers=[idp.config()])
    try:
        assert bg.url is not None
        url = bg.url
        # The operator's commands, as the doc shows them.
        secret = ""
        for line in _blocks()["setup"].splitlines():
            argv = line.removeprefix("$ scopegate ").split()
            out = _cli([*argv, "--url", url, "--data-dir", str(data)], capsys)
            if argv[:2] == ["tenant", "scim-token"]:
                secret = out.strip()
        assert secret.startswith("sgscim_")
        scim = httpx.Client(base_url=f"{url}/scim/v2", headers=bearer(secret))
        admin = ScopegateClient(url, bg.mint_token(tenant="acme", user="carol"))
        # The directory provisions alice and bob into groups (Okta's requests).
        users = {}
        for name, external in (("alice@example.com", "00ua"), ("bob@example.com", "00ub")):
            found = scim.get("/Users", params={"filter": f'userName eq "{name}"'}).json()
            assert found["totalResults"] == 0
            created = scim.post("/Users", json={"userName": name, "externalId": external,
                                                "password": "x", "active": True})  # fmt: skip
            assert created.status_code == 201, created.text
            users[name] = created.json()["id"]
        for group in ("Finance Team", "Everyone"):
            pushed = scim.post("/Groups", json={"displayName": group, "members": []})
            added = scim.patch(
                f"/Groups/{pushed.json()['id']}",
                json={"Operations": [{"op": "add", "path": "members",
                                      "value": [{"value": v} for v in users.values()]}]},
            )  # fmt: skip
            assert added.status_code == 204, added.text
        admin.ingest(
            "docs",
            [
                doc("forecast", "Quarterly revenue forecast: revenue grows eight percent.",
                    ["group:Finance_Team#member"], ["agent:summarizer"]),
                doc("payroll", "Quarterly salary bands, revenue unrelated.",
                    ["user:bob_at_example.com"], ["agent:summarizer"]),
            ],
        )  # fmt: skip
        task = admin.create_task("user:alice_at_example.com", "agent:summarizer",
                                 ["source:docs"])  # fmt: skip
        # alice's agent retrieves with a token it got by exchange (the doc's code).
        namespace: dict[str, Any] = {
            "url": url,
            "id_token": idp.user_token("alice@example.com"),
            "agent_token": idp.agent_token("summarizer"),
            "task": task,
        }
        exec(compile(_blocks()["exchange"], f"{DOC}#exchange", "exec"), namespace)
        assert [c.document_id for c in namespace["found"].chunks] == ["forecast"]
        assert [d.metadata["document_id"] for d in namespace["documents"]] == ["forecast"]
        exchange: TokenExchange = namespace["exchange"]
        handed_out = exchange()
        # The IdP deactivates alice (Okta's deactivation request).
        off = scim.patch(f"/Users/{users['alice@example.com']}", json={
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
            "Operations": [{"op": "replace", "value": {"active": False}}]})  # fmt: skip
        assert off.status_code == 200 and off.json()["active"] is False
        # The very next retrieval, with the token already handed out, gets nothing...
        with ScopegateClient(url, exchange, retries=0) as client:
            assert exchange() == handed_out
            assert client.retrieve(QUERY).chunks == []
        # ...and the next exchange is refused.
        with pytest.raises(Forbidden):
            exchange.refresh()
        # bob, still active, goes on, with a task of his own made by the exchange (one
        # task, kept by later exchanges) ...
        clock = [time.time()]
        bob = TokenExchange(url, subject_token=idp.user_token("bob@example.com"),
                            actor_token=idp.agent_token("summarizer"), scope=["source:docs"],
                            clock=lambda: clock[0])  # fmt: skip
        first = bob()
        bob_task = bob.task
        assert bob_task is not None and bob() == first
        clock[0] += 3600  # past the token's refresh point: the next call exchanges again
        assert bob() != first and bob.task == bob_task
        # ... then the directory falls silent past its bound.
        with ScopegateClient(url, bob, retries=0) as client:
            assert {c.document_id for c in client.retrieve(QUERY).chunks} == {
                "forecast", "payroll",
            }  # fmt: skip
            bg.call(bg.gateway.catalog.directory_heard("acme", time.time() - 25 * 3600))
            with pytest.raises(IdentityStale):
                client.retrieve(QUERY)
            with pytest.raises(IdentityStale):
                bob.refresh()
            # The directory speaks again (its next query): the tenant recovers.
            assert scim.get("/Users", params={"filter": 'userName eq "bob@example.com"'}).is_success
            assert {c.document_id for c in client.retrieve(QUERY).chunks} == {
                "forecast", "payroll",
            }  # fmt: skip
            bob.refresh()
        shown = json.loads(_cli(["tenant", "directory", "acme", "--url", url, "--data-dir",
                                 str(data)], capsys))  # fmt: skip
        assert shown["directory"] == "scim" and shown["stale"] is False
        assert shown["max_silence_s"] == 24 * 3600
        scim.close()
        admin.close()
        exchange.close()
        bob.close()
    finally:
        bg.close()
