"""Token attacks over HTTP: 401 ``invalid_token``, the error shape, no content, nothing written.

``tests/test_identity.py`` proves each rejection in the verifier; this file proves the
web layer wires it in front of every kind of endpoint: a representative hostile token
of each THREATS.md family is sent to ``/v1/retrieve`` and to the admin and reviewer
endpoints (with a body that would change something if it got through), and the
OpenFGA tuples, the catalog, the vector store and the audit log are compared before
and after.

Tokens are produced with PyJWT (a JOSE library) from the gateway's own Ed25519 key,
``kid``, issuer and audience, so each attack differs from an accepted token in one
respect only. Where PyJWT refuses to produce an attack (``alg`` spelt ``None`` or
``NONE``, no ``alg`` at all, an HMAC keyed with a PEM public key, a zero or empty
signature), the token is assembled from the same parts by hand: an attacker is not
bound by a library's refusals.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm
from jwt.warnings import InsecureKeyLengthWarning

from connectors.embeddings import HashEmbeddings
from gateway.api import create_app
from gateway.fga_server import ManagedOpenFGA
from gateway.identity import ACCESS_TOKEN_TYPE
from gateway.service import Gateway
from tests.conftest import make_settings
from tests.world import World, bearer, doc

DROP = object()
TRIED: list[str] = []  # every hostile request sent, for the summary line

# -- hand-built tokens --------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in {**base, **overrides}.items() if v is not DROP}


@dataclass
class Forge:
    """Builds tokens that differ from an accepted one in exactly one respect."""

    g: Gateway
    task: str

    @property
    def kid(self) -> str:
        return str(self.g.signing_key.kid)

    def claims(self, *, delegation: bool = True, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        base: dict[str, Any] = {
            "iss": self.g.settings.token_issuer,
            "aud": self.g.settings.token_audience,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
            "sub": "alice" if delegation else "admin",
            "tenant": "acme",
        }
        if delegation:
            base |= {"act": {"sub": "bot"}, "task": self.task}
        return merged(base, overrides)

    def header(self, **overrides: Any) -> dict[str, Any]:
        return merged({"alg": "EdDSA", "typ": ACCESS_TOKEN_TYPE, "kid": self.kid}, overrides)

    def signed(
        self,
        claims: dict[str, Any],
        header: dict[str, Any] | None = None,
        private_pem: bytes | None = None,
    ) -> str:
        """An EdDSA token signed by PyJWT (by hand only when ``alg`` is dropped)."""
        header = header or self.header()
        key = serialization.load_pem_private_key(
            private_pem or self.g.signing_key.private_pem, password=None
        )
        assert isinstance(key, Ed25519PrivateKey)
        if "alg" not in header:  # PyJWT always writes one
            signing_input = f"{segment(header)}.{segment(claims)}"
            return f"{signing_input}.{b64url(key.sign(signing_input.encode()))}"
        return jwt.encode(claims, key, algorithm=header["alg"], headers=library_header(header))

    def unsigned(self, header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
        """``header.claims.signature`` assembled by hand (PyJWT refuses these)."""
        return f"{segment(header)}.{segment(claims)}.{signature}"

    def alg_none(self, claims: dict[str, Any], spelling: str = "none") -> str:
        """PyJWT's own ``alg: none`` token; other spellings swapped into its header."""
        token = jwt.encode(claims, None, algorithm="none", headers=library_header(self.header()))
        if spelling == "none":
            return token
        _, payload, signature = token.split(".")
        return f"{segment(self.header(alg=spelling))}.{payload}.{signature}"

    def hmac(self, secret: bytes, claims: dict[str, Any], alg: str = "HS256") -> str:
        """HMAC keyed with ``secret``: PyJWT when it agrees to, by hand when the secret is
        a PEM public key (the RS/HS confusion PyJWT guards against, CVE-2016-5431)."""
        header = self.header(alg=alg)
        if b"-----BEGIN" not in secret:
            with warnings.catch_warnings():  # a short guessable secret is the point
                warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                return jwt.encode(claims, secret, algorithm=alg, headers=library_header(header))
        signing_input = f"{segment(header)}.{segment(claims)}"
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        return (
            f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), digest).digest())}"
        )


def library_header(header: dict[str, Any]) -> dict[str, Any]:
    """Extra headers for ``jwt.encode``: a ``typ`` left out stays out (PyJWT adds "JWT")."""
    return {"typ": None} | {k: v for k, v in header.items() if k != "alg"}


def attacker_ed25519() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def rs256_with_attacker_key(f: Forge, claims: dict[str, Any]) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(
        claims, key, algorithm="RS256", headers={"kid": f.kid, "typ": ACCESS_TOKEN_TYPE}
    )


def es256_zero_signature(f: Forge, claims: dict[str, Any]) -> str:
    """CVE-2022-21449 ("psychic signatures"): r = s = 0."""
    return f.unsigned(f.header(alg="ES256"), claims, b64url(bytes(64)))


def es256_signed_by_attacker(f: Forge, claims: dict[str, Any]) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(
        claims, key, algorithm="ES256", headers={"kid": f.kid, "typ": ACCESS_TOKEN_TYPE}
    )


def embedded_jwk(f: Forge, claims: dict[str, Any]) -> str:
    """Signed by the attacker's key, which the token itself carries (CVE-2018-0114 style)."""
    private = attacker_ed25519()
    key = serialization.load_pem_private_key(private, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    jwk = json.loads(OKPAlgorithm.to_jwk(key.public_key()))
    return f.signed(claims, f.header(jwk=jwk), private)


def tampered_payload(f: Forge, claims: dict[str, Any]) -> str:
    token = f.signed(claims)
    head, _, rest = token.partition(".")
    _, _, signature = rest.partition(".")
    return f"{head}.{segment({**claims, 'sub': 'admin'})}.{signature}"


def unsigned_with_alg(alg: str) -> Callable[[Forge], str]:
    return lambda f: f.alg_none(f.claims(), alg)


def none_with_real_signature(f: Forge, claims: dict[str, Any]) -> str:
    """``alg: none`` on a token that also carries a genuine signature of its payload."""
    signature = f.signed(claims).split(".")[2]
    return f.unsigned(f.header(alg="none"), claims, signature)


def psychic_swap(f: Forge, claims: dict[str, Any]) -> str:
    """A signature from another token glued onto this one."""
    other = f.signed(f.claims(sub="bob"))
    head, payload, _ = f.signed(claims).split(".")
    return f"{head}.{payload}.{other.split('.')[2]}"


# Every attack: name -> (token builder, delegation-shaped?). Built per test from a Forge.
Attack = Callable[[Forge], str]
DELEGATION_ATTACKS: dict[str, Attack] = {
    **{f"alg_{alg}": unsigned_with_alg(alg) for alg in ("none", "None", "NONE", "nOnE")},
    "alg_none_with_a_real_signature": lambda f: none_with_real_signature(f, f.claims()),
    "alg_missing": lambda f: f.signed(f.claims(), f.header(alg=DROP)),
    "hs256_with_public_key_pem": lambda f: f.hmac(f.g.signing_key.public_pem, f.claims()),
    "hs512_with_public_key_pem": lambda f: f.hmac(f.g.signing_key.public_pem, f.claims(), "HS512"),
    "hs256_with_kid_as_secret": lambda f: f.hmac(f.kid.encode(), f.claims()),
    "rs256_attacker_key_real_kid": lambda f: rs256_with_attacker_key(f, f.claims()),
    "es256_zero_signature": lambda f: es256_zero_signature(f, f.claims()),
    "es256_attacker_key": lambda f: es256_signed_by_attacker(f, f.claims()),
    "eddsa_attacker_key_real_kid": lambda f: f.signed(f.claims(), private_pem=attacker_ed25519()),
    "empty_signature": lambda f: f.unsigned(f.header(), f.claims()),
    "malformed_signature": lambda f: f.unsigned(f.header(), f.claims(), "!!not-base64!!"),
    "signature_of_another_token": lambda f: psychic_swap(f, f.claims()),
    "tampered_payload": lambda f: tampered_payload(f, f.claims()),
    "expired": lambda f: f.signed(f.claims(exp=int(time.time()) - 60)),
    "not_yet_valid": lambda f: f.signed(f.claims(nbf=int(time.time()) + 300)),
    "issued_in_the_future": lambda f: f.signed(f.claims(iat=int(time.time()) + 300)),
    "wrong_audience": lambda f: f.signed(f.claims(aud="someone-else")),
    "missing_audience": lambda f: f.signed(f.claims(aud=DROP)),
    "wrong_issuer": lambda f: f.signed(f.claims(iss="https://evil.example")),
    "missing_exp": lambda f: f.signed(f.claims(exp=DROP)),
    "missing_sub": lambda f: f.signed(f.claims(sub=DROP)),
    "missing_tenant": lambda f: f.signed(f.claims(tenant=DROP)),
    "missing_task": lambda f: f.signed(f.claims(task=DROP)),
    "missing_act": lambda f: f.signed(f.claims(act=DROP)),
    "act_without_sub": lambda f: f.signed(f.claims(act={"client_id": "bot"})),
    "act_sub_not_an_id": lambda f: f.signed(f.claims(act={"sub": "bot#member"})),
    "tenant_not_an_id": lambda f: f.signed(f.claims(tenant="acme/../globex")),
    "sub_with_separator": lambda f: f.signed(f.claims(sub="alice:admin")),
    "jku_header": lambda f: f.signed(f.claims(), f.header(jku="https://evil.example/jwks.json")),
    "x5u_header": lambda f: f.signed(f.claims(), f.header(x5u="https://evil.example/cert.pem")),
    "x5c_header": lambda f: f.signed(f.claims(), f.header(x5c=["MIIB..."])),
    "embedded_jwk": lambda f: embedded_jwk(f, f.claims()),
    "unknown_kid": lambda f: f.signed(f.claims(), f.header(kid="no-such-key")),
    "kid_traversal": lambda f: f.signed(f.claims(), f.header(kid="../../keys/ed25519.pem")),
    "kid_missing": lambda f: f.signed(f.claims(), f.header(kid=DROP)),
    "id_token_typ_jwt": lambda f: f.signed(f.claims(nonce="n-0s6"), f.header(typ="JWT")),
    "refresh_token_typ": lambda f: f.signed(f.claims(), f.header(typ="refresh+jwt")),
    "typ_missing": lambda f: f.signed(f.claims(), f.header(typ=DROP)),
    "principal_token_on_retrieve": lambda f: f.g.mint_token(tenant="acme", user="alice"),
    "garbage": lambda f: "not.a.jwt",
    "two_segments": lambda f: ".".join(f.signed(f.claims()).split(".")[:2]),
    "oversized": lambda f: f.signed(f.claims(pad="x" * 9000)),
}
PRINCIPAL_ATTACKS: dict[str, Attack] = {
    "delegation_token_on_admin_endpoint": lambda f: f.g.mint_token(
        tenant="acme", user="admin", agent="bot", task=f.task
    ),
    "alg_none_admin": lambda f: f.alg_none(f.claims(delegation=False)),
    "hs256_admin_with_public_key_pem": lambda f: f.hmac(
        f.g.signing_key.public_pem, f.claims(delegation=False)
    ),
    "expired_admin": lambda f: f.signed(f.claims(delegation=False, exp=int(time.time()) - 60)),
    "wrong_audience_admin": lambda f: f.signed(f.claims(delegation=False, aud="other")),
    "jku_admin": lambda f: f.signed(
        f.claims(delegation=False), f.header(jku="https://evil.example/jwks.json")
    ),
    "unknown_kid_admin": lambda f: f.signed(f.claims(delegation=False), f.header(kid="nope")),
    "half_delegation_admin": lambda f: f.signed(f.claims(delegation=False, task=f.task)),
}
# Admin and reviewer calls that would each change (or reveal) something if let through.
ADMIN_CALLS: dict[str, tuple[str, str, Any]] = {
    "grant": (
        "POST",
        "/v1/relationships",
        {"writes": [{"user": "user:mallory", "relation": "viewer", "object": "document:sec1"}]},
    ),
    "ingest": (
        "POST",
        "/v1/sources/docs/documents",
        {
            "documents": [
                {
                    "id": "planted",
                    "text": "planted text",
                    "acl": {"viewers": ["tenant:acme#member"]},
                }
            ]
        },
    ),
    "register_source": ("POST", "/v1/sources", {"id": "evil", "kind": "chroma"}),
    "create_task": (
        "POST",
        "/v1/tasks",
        {"user": "user:alice", "agent": "agent:bot", "scope": ["source:docs"]},
    ),
    "revoke_task": ("DELETE", "/v1/tasks/{task}", None),
    "delete_document": ("DELETE", "/v1/sources/docs/documents/rev1", None),
    "list_sources": ("GET", "/v1/sources", None),
    "audit_list": ("GET", "/v1/audit/decisions", None),
}


# -- the world and its fingerprint -------------------------------------------------------------


@dataclass
class Env:
    g: Gateway
    http: httpx.AsyncClient
    forge: Forge
    task: str

    async def state(self) -> dict[str, Any]:
        """Everything an attack could change: tuples, catalog, chunks, audit chain head."""
        tuples = sorted((t.user, t.relation, t.object) for t in await self.g.fga.read())
        sources = [s.id for s in await self.g.catalog.list_sources("acme")]
        store = self.g.stores.for_source(await self.g.catalog.get_source("acme", "docs"))  # type: ignore[arg-type]
        verified = await self.g.audit.verify()
        return {
            "tuples": tuples,
            "sources": sources,
            "documents": await self.g.catalog.document_count("acme"),
            "chunks": await store.count("acme", "docs"),
            "audit": (verified.ok, verified.checked),
        }


@pytest.fixture(scope="module")
async def env(
    openfga: ManagedOpenFGA, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Env]:
    data = Path(tmp_path_factory.mktemp("token-attacks"))
    g = await Gateway.start(make_settings(openfga, data), embeddings=HashEmbeddings())
    transport = httpx.ASGITransport(app=create_app(gateway=g))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://attacks") as http:
            w = await World(g, http, "acme").setup(members=["alice", "mallory"], agents=["bot"])
            await w.ingest(
                [
                    doc(
                        "rev1",
                        "Quarterly revenue forecast.",
                        viewers=["user:alice"],
                        agents=["agent:bot"],
                    ),
                    doc("sec1", "Secret merger plan.", viewers=["user:bob"], agents=["agent:bot"]),
                ]
            )
            task = await w.task("alice", "bot", ["source:docs"])
            e = Env(g, http, Forge(g, task), task)
            assert len((await e.state())["tuples"]) > 10  # the fingerprint sees the tuples
            # The forge's baseline token is accepted: each attack changes one thing only.
            ok = await http.post(
                "/v1/retrieve",
                json={"query": "revenue", "k": 3},
                headers=bearer(e.forge.signed(e.forge.claims())),
            )
            assert ok.status_code == 200 and ok.json()["chunks"], ok.text
            admin_ok = await http.get(
                "/v1/sources", headers=bearer(e.forge.signed(e.forge.claims(delegation=False)))
            )
            assert admin_ok.status_code == 200, admin_ok.text
            yield e
    finally:
        await g.close()


def assert_invalid_token(response: httpx.Response) -> None:
    assert response.status_code == 401, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"code", "message", "request_id"}
    assert body["error"]["code"] == "invalid_token"
    assert "chunks" not in response.text
    for secret in ("Secret merger plan", "Quarterly revenue forecast"):
        assert secret not in response.text


@pytest.mark.parametrize("name", sorted(DELEGATION_ATTACKS))
async def test_hostile_agent_token_on_retrieve(env: Env, name: str) -> None:
    before = await env.state()
    token = DELEGATION_ATTACKS[name](env.forge)
    response = await env.http.post(
        "/v1/retrieve", json={"query": "secret merger revenue", "k": 10}, headers=bearer(token)
    )
    assert_invalid_token(response)
    assert await env.state() == before  # not even an audit record for an unverifiable caller
    TRIED.append(name)


@pytest.mark.parametrize("call", sorted(ADMIN_CALLS))
@pytest.mark.parametrize("name", sorted(PRINCIPAL_ATTACKS))
async def test_hostile_principal_token_on_admin_and_review_endpoints(
    env: Env, name: str, call: str
) -> None:
    before = await env.state()
    method, path, body = ADMIN_CALLS[call]
    token = PRINCIPAL_ATTACKS[name](env.forge)
    response = await env.http.request(
        method, path.format(task=env.task), json=body, headers=bearer(token)
    )
    assert_invalid_token(response)
    assert await env.state() == before
    TRIED.append(name)


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic YWRtaW46YWRtaW4=", "Token abc", "Bearer a b c"],
)
async def test_missing_or_malformed_authorization_header(env: Env, header: str | None) -> None:
    before = await env.state()
    headers = {} if header is None else {"authorization": header}
    for method, path, body in [
        ("POST", "/v1/retrieve", {"query": "revenue"}),
        *ADMIN_CALLS.values(),
    ]:
        response = await env.http.request(
            method, path.format(task=env.task), json=body, headers=headers
        )
        assert_invalid_token(response)
        TRIED.append(f"{header!r} {method} {path}")
    assert await env.state() == before


async def test_delegation_token_with_a_real_signature_cannot_administer(env: Env) -> None:
    """An agent's genuine token names a user who is an admin: still no admin call."""
    token = env.g.mint_token(tenant="acme", user="admin", agent="bot", task=env.task)
    before = await env.state()
    for method, path, body in ADMIN_CALLS.values():
        response = await env.http.request(
            method, path.format(task=env.task), json=body, headers=bearer(token)
        )
        assert_invalid_token(response)
    assert await env.state() == before


async def test_act_naming_no_agent_is_verified_but_gets_nothing(env: Env) -> None:
    """A well-signed token whose act names no agent of the tenant passes verification
    (the verifier cannot know every agent) and is denied by the decision, on the record."""
    token = env.forge.signed(env.forge.claims(act={"sub": "ghost"}))
    response = await env.http.post(
        "/v1/retrieve", json={"query": "revenue", "k": 5}, headers=bearer(token)
    )
    assert response.status_code == 200 and response.json()["chunks"] == []
    entry = await env.g.audit.get("acme", response.json()["request_id"])
    assert entry is not None and entry.record.outcome in {"denied", "empty"}
    assert all("agent_active" in c.failed_checks for c in entry.record.candidates)


@pytest.fixture(scope="module", autouse=True)
def report(request: pytest.FixtureRequest) -> Any:
    yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            kinds = len(DELEGATION_ATTACKS) + len(PRINCIPAL_ATTACKS)
            print(f"\ntoken attacks: {kinds} hostile token kinds, {len(TRIED)} requests, all 401")
