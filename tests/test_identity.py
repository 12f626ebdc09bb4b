"""Delegation tokens under attack: every token line of THREATS.md, plus the happy paths.

Each hostile token differs from a token that verifies in exactly one respect, so a
rejection can only come from that respect. Tokens are mostly built by hand (base64url
header and payload, then a signature) so that nothing in a JWT library can quietly
"fix" them on the way in; ``test_hand_built_token_verifies`` proves the builder itself
yields accepted tokens.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import hashlib
import hmac
import io
import json
import os
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from gateway.errors import AuthorizationUnavailable, InvalidIdentifier, InvalidToken
from gateway.identity import (
    ACCESS_TOKEN_TYPE,
    DelegationContext,
    PrincipalContext,
    SigningKey,
    TokenVerifier,
    issue_token,
    load_or_create_signing_key,
    parse_ttl,
)
from gateway.service import Gateway

ISSUER = "https://scopegate.test"
AUDIENCE = "scopegate"
DROP = object()  # an override value meaning "leave this claim/header out"

# ----------------------------------------------------------------------------- helpers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: Any) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def apply(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **overrides}
    return {name: value for name, value in merged.items() if value is not DROP}


def delegation_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "jti-0001",
        "sub": "alice",
        "act": {"sub": "summarizer"},
        "tenant": "acme",
        "task": "t1",
    }
    return apply(base, overrides)


def principal_claims(**overrides: Any) -> dict[str, Any]:
    claims = delegation_claims(act=DROP, task=DROP)
    return apply(claims, overrides)


def header_for(key: SigningKey, **overrides: Any) -> dict[str, Any]:
    return apply({"alg": "EdDSA", "typ": ACCESS_TOKEN_TYPE, "kid": key.kid}, overrides)


def ed25519_sign(private_pem: bytes, signing_input: str) -> bytes:
    private = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(private, Ed25519PrivateKey)
    return private.sign(signing_input.encode())


def hand_signed(
    key: SigningKey, claims: dict[str, Any], header: dict[str, Any] | None = None
) -> str:
    """A token built by hand and signed with ``key``'s private key (EdDSA)."""
    signing_input = f"{segment(header or header_for(key))}.{segment(claims)}"
    return f"{signing_input}.{b64url(ed25519_sign(key.private_pem, signing_input))}"


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    return f"{segment(header)}.{segment(claims)}.{signature}"


def new_ed25519_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_verifier(key: SigningKey, **kwargs: Any) -> TokenVerifier:
    options: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ["EdDSA"],
    }
    options.update(kwargs)
    return TokenVerifier({key.kid: key.public_pem}, **options)


def rejected(verifier: TokenVerifier, token: Any, *, principal: bool = False) -> InvalidToken:
    verify = verifier.verify_principal if principal else verifier.verify_delegation
    with pytest.raises(InvalidToken) as caught:
        verify(token)
    return caught.value


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return load_or_create_signing_key(tmp_path)


@pytest.fixture
def verifier(key: SigningKey) -> TokenVerifier:
    return make_verifier(key)


@pytest.fixture
def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def p256_public_pem(private: ec.EllipticCurvePrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def p256_private_pem(private: ec.EllipticCurvePrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# ------------------------------------------------------------------------- happy paths


def test_issued_delegation_token_verifies_to_exact_context(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    now = int(time.time())
    token = issue_token(
        key,
        issuer=ISSUER,
        audience=AUDIENCE,
        tenant="acme",
        user="alice",
        agent="summarizer",
        task="t-42",
        ttl_s=900,
        now=now,
    )
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert jwt.get_unverified_header(token) == {
        "alg": "EdDSA",
        "typ": ACCESS_TOKEN_TYPE,
        "kid": key.kid,
    }
    assert verifier.verify_delegation(token) == DelegationContext(
        tenant="acme",
        user="alice",
        agent="summarizer",
        task="t-42",
        token_id=jti,
        expires_at=now + 900,
    )


def test_issued_token_carries_the_contract_claims(key: SigningKey) -> None:
    now = int(time.time())
    token = issue_token(
        key,
        issuer=ISSUER,
        audience=AUDIENCE,
        tenant="acme",
        user="alice",
        agent="summarizer",
        task="t1",
        ttl_s=60,
        now=now,
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == ISSUER
    assert claims["aud"] == AUDIENCE
    assert claims["iat"] == now
    assert claims["exp"] == now + 60
    assert claims["sub"] == "alice"
    assert claims["act"] == {"sub": "summarizer"}
    assert claims["tenant"] == "acme"
    assert claims["task"] == "t1"
    assert len(claims["jti"]) >= 16


def test_every_issued_token_has_a_fresh_jti(key: SigningKey, verifier: TokenVerifier) -> None:
    common: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "tenant": "acme",
        "user": "alice",
    }
    ids = {verifier.verify_principal(issue_token(key, **common)).token_id for _ in range(5)}
    assert len(ids) == 5


def test_issued_principal_token_verifies(key: SigningKey, verifier: TokenVerifier) -> None:
    token = issue_token(key, issuer=ISSUER, audience=AUDIENCE, tenant="acme", user="root")
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    assert verifier.verify_principal(token) == PrincipalContext(
        tenant="acme", user="root", token_id=jti
    )


def test_hand_built_token_verifies(key: SigningKey, verifier: TokenVerifier) -> None:
    context = verifier.verify_delegation(hand_signed(key, delegation_claims()))
    assert (context.tenant, context.user, context.agent, context.task) == (
        "acme",
        "alice",
        "summarizer",
        "t1",
    )
    assert context.token_id == "jti-0001"
    principal = verifier.verify_principal(hand_signed(key, principal_claims()))
    assert principal == PrincipalContext(tenant="acme", user="alice", token_id="jti-0001")


def test_issue_token_needs_both_agent_and_task(key: SigningKey) -> None:
    common: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "tenant": "acme",
        "user": "alice",
    }
    with pytest.raises(ValueError):
        issue_token(key, agent="summarizer", **common)
    with pytest.raises(ValueError):
        issue_token(key, task="t1", **common)


@pytest.mark.parametrize(
    ("field", "value"),
    [("user", "alice#member"), ("tenant", "acme/.."), ("agent", "bot:1"), ("task", "t 1")],
)
def test_issue_token_refuses_invalid_ids(key: SigningKey, field: str, value: str) -> None:
    args: dict[str, Any] = {"tenant": "acme", "user": "alice", "agent": "summarizer", "task": "t1"}
    args[field] = value
    with pytest.raises(InvalidIdentifier):
        issue_token(key, issuer=ISSUER, audience=AUDIENCE, **args)


# ------------------------------------------------------------------------------ parse_ttl


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("1s", 1), ("15m", 900), ("2h", 7200), ("45", 45), (" 15m ", 900)],
)
def test_parse_ttl_units(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize(
    "text", ["", " ", "0", "0m", "-5m", "15d", "m", "1.5h", "15M", "15 m", "abc", "1e3", "+5m"]
)
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ttl(text)


# ------------------------------------------------------------------------------ key file


def test_key_file_created_0600_and_reused(tmp_path: Path) -> None:
    first = load_or_create_signing_key(tmp_path)
    path = tmp_path / "keys" / "ed25519.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes() == first.private_pem
    assert not path.with_suffix(".tmp").exists()

    second = load_or_create_signing_key(tmp_path)
    assert second == first
    # A token minted with the first load verifies with the second load's key.
    token = issue_token(first, issuer=ISSUER, audience=AUDIENCE, tenant="acme", user="alice")
    assert make_verifier(second).verify_principal(token).user == "alice"


def test_key_file_never_readable_by_others_even_for_a_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a permissive umask and a pre-existing world-readable keys directory,
    every file holding the private key is 0600 at every step we can observe."""
    (tmp_path / "keys").mkdir(mode=0o755)
    (tmp_path / "keys").chmod(0o755)
    (tmp_path / "keys" / "ed25519.tmp").write_bytes(b"stale")
    (tmp_path / "keys" / "ed25519.tmp").chmod(0o644)
    modes: list[int] = []
    real_chmod, real_replace = Path.chmod, Path.replace

    def spy_chmod(self: Path, mode: int, **kwargs: Any) -> None:
        modes.append(stat.S_IMODE(self.stat().st_mode))
        real_chmod(self, mode, **kwargs)

    def spy_replace(self: Path, target: Any) -> Any:
        modes.append(stat.S_IMODE(self.stat().st_mode))
        return real_replace(self, target)

    monkeypatch.setattr(Path, "chmod", spy_chmod)
    monkeypatch.setattr(Path, "replace", spy_replace)
    old_umask = os.umask(0)
    try:
        load_or_create_signing_key(tmp_path)
    finally:
        os.umask(old_umask)
    assert modes, "the key is expected to be written through a temporary file"
    assert all(mode == 0o600 for mode in modes), [oct(m) for m in modes]
    assert stat.S_IMODE((tmp_path / "keys" / "ed25519.pem").stat().st_mode) == 0o600


def test_each_data_dir_has_its_own_key(tmp_path: Path) -> None:
    one = load_or_create_signing_key(tmp_path / "one")
    two = load_or_create_signing_key(tmp_path / "two")
    assert one.private_pem != two.private_pem
    assert one.kid != two.kid
    token = issue_token(one, issuer=ISSUER, audience=AUDIENCE, tenant="acme", user="alice")
    rejected(make_verifier(two), token, principal=True)


# ------------------------------------------------------------------- verifier settings


@pytest.mark.parametrize(
    "algorithms",
    [
        [],
        ["none"],
        ["None"],
        ["NONE"],
        ["HS256"],
        ["HS384"],
        ["HS512"],
        ["EdDSA", "HS256"],
        ["EdDSA", "none"],
    ],
)
def test_verifier_refuses_none_and_hmac_algorithms(key: SigningKey, algorithms: list[str]) -> None:
    with pytest.raises(ValueError):
        make_verifier(key, algorithms=algorithms)


@pytest.mark.parametrize("leeway", [6, 30, 300])
def test_verifier_refuses_leeway_above_five_seconds(key: SigningKey, leeway: int) -> None:
    with pytest.raises(ValueError):
        make_verifier(key, leeway_s=leeway)


@pytest.mark.parametrize("leeway", [0, 5])
def test_verifier_accepts_leeway_up_to_five_seconds(key: SigningKey, leeway: int) -> None:
    verifier = make_verifier(key, leeway_s=leeway)
    assert verifier.verify_delegation(hand_signed(key, delegation_claims())).user == "alice"


# ------------------------------------------------------------------------------ alg none


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("principal", [False, True])
def test_alg_none_rejected(
    key: SigningKey, verifier: TokenVerifier, alg: str, principal: bool
) -> None:
    claims = principal_claims() if principal else delegation_claims()
    header = header_for(key, alg=alg)
    rejected(verifier, unsigned(header, claims), principal=principal)
    # Without a kid, and with the trailing dot missing, too.
    rejected(verifier, unsigned(header_for(key, alg=alg, kid=DROP), claims), principal=principal)
    rejected(verifier, f"{segment(header)}.{segment(claims)}", principal=principal)


@pytest.mark.parametrize("alg", ["none", "NONE"])
def test_alg_none_with_a_real_signature_rejected(
    key: SigningKey, verifier: TokenVerifier, alg: str
) -> None:
    """A valid EdDSA signature attached under ``alg: none`` changes nothing."""
    header = header_for(key, alg=alg)
    signing_input = f"{segment(header)}.{segment(delegation_claims())}"
    signature = b64url(ed25519_sign(key.private_pem, signing_input))
    rejected(verifier, f"{signing_input}.{signature}")


@pytest.mark.parametrize("alg", [None, "", ["EdDSA"], {"alg": "EdDSA"}, "eddsa", "EDDSA", "ES256"])
def test_alg_other_than_configured_rejected(
    key: SigningKey, verifier: TokenVerifier, alg: Any
) -> None:
    """Correctly signed with the real key; only the declared alg differs."""
    token = hand_signed(key, delegation_claims(), header_for(key, alg=alg))
    rejected(verifier, token)


def test_alg_header_missing_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(), header_for(key, alg=DROP)))


# ------------------------------------------------------------------------ HS/RS confusion


def _hmac_token(key: SigningKey, secret: bytes, alg: str = "HS256") -> str:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{segment(header_for(key, alg=alg))}.{segment(delegation_claims())}"
    signature = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_signed_with_public_key_pem_rejected(
    key: SigningKey, verifier: TokenVerifier, alg: str
) -> None:
    """CVE-2015-9235 / CVE-2016-5431: the verifier's own public key used as HMAC secret."""
    rejected(verifier, _hmac_token(key, key.public_pem, alg))
    rejected(verifier, _hmac_token(key, key.public_pem.strip(), alg))


def test_hmac_signed_with_raw_public_key_or_kid_rejected(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    public = serialization.load_pem_public_key(key.public_pem)
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    rejected(verifier, _hmac_token(key, raw))
    rejected(verifier, _hmac_token(key, key.kid.encode()))


@pytest.mark.parametrize(
    "secret", [b"secret", b"", bytes.fromhex("9f" * 32)], ids=["word", "empty", "random32"]
)
def test_hmac_signed_with_arbitrary_secret_rejected(
    key: SigningKey, verifier: TokenVerifier, secret: bytes
) -> None:
    rejected(verifier, _hmac_token(key, secret))


def test_hmac_rejected_when_principal_expected(key: SigningKey, verifier: TokenVerifier) -> None:
    signing_input = f"{segment(header_for(key, alg='HS256'))}.{segment(principal_claims())}"
    signature = hmac.new(key.public_pem, signing_input.encode(), hashlib.sha256).digest()
    rejected(verifier, f"{signing_input}.{b64url(signature)}", principal=True)


def test_algorithm_is_bound_to_the_key_type(
    key: SigningKey, p256: ec.EllipticCurvePrivateKey
) -> None:
    """With EdDSA and ES256 both configured, an ES256 token naming the Ed25519 kid
    (signed with an attacker's P-256 key) does not verify."""
    verifier = make_verifier(key, algorithms=["EdDSA", "ES256"])
    token = jwt.encode(
        delegation_claims(),
        p256_private_pem(p256),
        algorithm="ES256",
        headers={"kid": key.kid, "typ": ACCESS_TOKEN_TYPE},
    )
    rejected(verifier, token)
    assert verifier.verify_delegation(hand_signed(key, delegation_claims())).agent == "summarizer"


# ------------------------------------------------------------------------------ signatures


def test_empty_signature_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    rejected(verifier, unsigned(header_for(key), delegation_claims()))
    rejected(verifier, unsigned(header_for(key), principal_claims()), principal=True)


def _malformed_signatures(key: SigningKey) -> Iterator[str]:
    signing_input = f"{segment(header_for(key))}.{segment(delegation_claims())}"
    real = ed25519_sign(key.private_pem, signing_input)
    flipped = bytes([real[0] ^ 0x01]) + real[1:]
    yield b64url(flipped)
    yield b64url(real[:-1])  # truncated
    yield b64url(real + b"\x00")  # extended
    yield b64url(real[:32])  # half
    yield b64url(bytes(64))  # all zero
    yield b64url(secrets.token_bytes(64))  # random
    yield b64url(ed25519_sign(new_ed25519_pem(), signing_input))  # another key
    yield "!!!!"
    yield "%%%%"
    yield b64url(real)[:-1]  # one character short: invalid base64url length
    yield b64url(real) + "A"
    yield "A"
    yield " " + b64url(real)


def test_malformed_signatures_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    signing_input = f"{segment(header_for(key))}.{segment(delegation_claims())}"
    cases = list(_malformed_signatures(key))
    assert len(cases) == 13
    for signature in cases:
        rejected(verifier, f"{signing_input}.{signature}")


def test_tampered_payload_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    token = hand_signed(key, delegation_claims())
    header, _, signature = token.split(".")
    for change in ({"sub": "mallory"}, {"tenant": "globex"}, {"task": "t2"}, {"act": {"sub": "x"}}):
        forged = f"{header}.{segment(delegation_claims(**change))}.{signature}"
        rejected(verifier, forged)


def test_tampered_header_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    """Swapping the header (here: adding an innocuous member) breaks the signature."""
    token = hand_signed(key, delegation_claims())
    _, payload, signature = token.split(".")
    forged = f"{segment(header_for(key, cty='JWT'))}.{payload}.{signature}"
    rejected(verifier, forged)


def test_es256_zero_signature_rejected(p256: ec.EllipticCurvePrivateKey) -> None:
    """CVE-2022-21449 ("psychic signatures"): r = s = 0 must never verify."""
    verifier = TokenVerifier(
        {"p256": p256_public_pem(p256)},
        issuer=ISSUER,
        audience=AUDIENCE,
        algorithms=["ES256"],
    )
    header = {"alg": "ES256", "typ": ACCESS_TOKEN_TYPE, "kid": "p256"}
    claims = delegation_claims()
    # Control: a real ES256 token from this key is accepted.
    real = jwt.encode(claims, p256_private_pem(p256), algorithm="ES256", headers=header)
    assert verifier.verify_delegation(real).user == "alice"

    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    n = order.to_bytes(32, "big")
    zero_der = bytes.fromhex("3006020100020100")  # SEQUENCE { INTEGER 0, INTEGER 0 }
    for signature in (bytes(64), n + n, bytes(32) + n, n + bytes(32), zero_der, b""):
        rejected(verifier, unsigned(header, claims, b64url(signature)))


# ------------------------------------------------------------------------ garbage tokens


@pytest.mark.parametrize(
    "token",
    [
        "",
        " ",
        "abc",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "a.b.c.d.e",
        "....",
        "..",
        "eyJ.eyJ.",
        "eyJhbGciOiJFZERTQSJ9..",
        "\x00.\x00.\x00",
        "ünïcödé.ünïcödé.ünïcödé",
        "null",
        "{}",
        '{"alg":"none"}.{}.',
    ],
)
def test_garbage_tokens_rejected(verifier: TokenVerifier, token: str) -> None:
    rejected(verifier, token)
    rejected(verifier, token, principal=True)


@pytest.mark.parametrize("token", [None, b"a.b.c", 42, ["a", "b", "c"], {"token": "x"}])
def test_non_string_tokens_rejected(verifier: TokenVerifier, token: Any) -> None:
    rejected(verifier, token)
    rejected(verifier, token, principal=True)


def test_bearer_prefix_or_whitespace_around_token_rejected(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    token = hand_signed(key, delegation_claims())
    for wrapped in (f"Bearer {token}", f" {token}", f"{token} ", f"{token}\n", f'"{token}"'):
        rejected(verifier, wrapped)


@pytest.mark.parametrize(
    "raw_header",
    [
        b"not json",
        b"[]",
        b'"EdDSA"',
        b"null",
        b"42",
        b"{",
        b"[" * 5000,
        b'{"alg": "EdDSA", "kid": 1}',
        b"\xff\xfe\xfd",
    ],
)
def test_undecodable_headers_rejected(
    key: SigningKey, verifier: TokenVerifier, raw_header: bytes
) -> None:
    token = f"{b64url(raw_header)}.{segment(delegation_claims())}.{b64url(bytes(64))}"
    rejected(verifier, token)


@pytest.mark.parametrize("raw_payload", [b"not json", b"[]", b"null", b'"x"', b"[" * 3000])
def test_correctly_signed_undecodable_payload_rejected(
    key: SigningKey, verifier: TokenVerifier, raw_payload: bytes
) -> None:
    signing_input = f"{segment(header_for(key))}.{b64url(raw_payload)}"
    token = f"{signing_input}.{b64url(ed25519_sign(key.private_pem, signing_input))}"
    rejected(verifier, token)


# ----------------------------------------------------------------------------- audience


@pytest.mark.parametrize(
    "aud", ["other-service", "", "scopegate-other", "SCOPEGATE", ["other"], [], None, 42]
)
def test_wrong_audience_rejected(key: SigningKey, verifier: TokenVerifier, aud: Any) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(aud=aud)))


def test_missing_audience_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(aud=DROP)))
    rejected(verifier, hand_signed(key, principal_claims(aud=DROP)), principal=True)


# ------------------------------------------------------------------------------- issuer


@pytest.mark.parametrize(
    "iss",
    [
        "https://evil.test",
        "",
        "https://scopegate",  # a prefix of the configured issuer
        "scopegate.test",  # a substring of it (the PyJWT 2.10.0 bug, CVE-2024-53861)
        ISSUER + "/",
        ISSUER + ".evil.test",
        ISSUER.upper(),
        [ISSUER],
        None,
    ],
)
def test_wrong_issuer_rejected(key: SigningKey, verifier: TokenVerifier, iss: Any) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(iss=iss)))


def test_missing_issuer_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(iss=DROP)))
    rejected(verifier, hand_signed(key, principal_claims(iss=DROP)), principal=True)


# ----------------------------------------------------------------------- time validity


@pytest.mark.parametrize("seconds_ago", [6, 60, 86_400])
def test_expired_beyond_leeway_rejected(
    key: SigningKey, verifier: TokenVerifier, seconds_ago: int
) -> None:
    now = int(time.time())
    claims = delegation_claims(iat=now - 3600, nbf=now - 3600, exp=now - seconds_ago)
    rejected(verifier, hand_signed(key, claims))


def test_expired_within_leeway_accepted(key: SigningKey, verifier: TokenVerifier) -> None:
    now = int(time.time())
    claims = delegation_claims(iat=now - 600, nbf=now - 600, exp=now - 1)
    token = hand_signed(key, claims)
    assert verifier.verify_delegation(token).expires_at == now - 1
    # The same token is refused once the leeway is configured away.
    rejected(make_verifier(key, leeway_s=0), token)


def test_issued_token_expires(key: SigningKey, verifier: TokenVerifier) -> None:
    past = int(time.time()) - 3600
    token = issue_token(
        key, issuer=ISSUER, audience=AUDIENCE, tenant="acme", user="alice", ttl_s=60, now=past
    )
    rejected(verifier, token, principal=True)


@pytest.mark.parametrize("exp", ["tomorrow", None, [1], {"t": 1}, "Infinity"])
def test_malformed_exp_rejected(key: SigningKey, verifier: TokenVerifier, exp: Any) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(exp=exp)))


@pytest.mark.parametrize("seconds_ahead", [60, 3600])
def test_nbf_in_the_future_rejected(
    key: SigningKey, verifier: TokenVerifier, seconds_ahead: int
) -> None:
    now = int(time.time())
    rejected(verifier, hand_signed(key, delegation_claims(nbf=now + seconds_ahead)))


def test_nbf_within_leeway_accepted(key: SigningKey, verifier: TokenVerifier) -> None:
    # 2 s ahead, 5 s leeway: accepted; with no leeway the same token is refused.
    token = hand_signed(key, delegation_claims(nbf=int(time.time()) + 2))
    assert verifier.verify_delegation(token).user == "alice"
    rejected(make_verifier(key, leeway_s=0), token)


def test_issued_in_the_future_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    now = int(time.time())
    rejected(verifier, hand_signed(key, delegation_claims(iat=now + 3600, nbf=DROP)))


# ------------------------------------------------------------------------ missing claims


@pytest.mark.parametrize("claim", ["exp", "sub", "act", "tenant", "task", "jti", "iat", "iss"])
def test_delegation_token_missing_claim_rejected(
    key: SigningKey, verifier: TokenVerifier, claim: str
) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(**{claim: DROP})))


@pytest.mark.parametrize("claim", ["exp", "sub", "tenant", "jti", "iat"])
def test_principal_token_missing_claim_rejected(
    key: SigningKey, verifier: TokenVerifier, claim: str
) -> None:
    rejected(verifier, hand_signed(key, principal_claims(**{claim: DROP})), principal=True)


@pytest.mark.parametrize("claim", ["exp", "sub", "tenant", "task", "jti"])
def test_null_claim_rejected(key: SigningKey, verifier: TokenVerifier, claim: str) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(**{claim: None})))


@pytest.mark.parametrize("jti", [42, ["a"], {"id": "a"}])
def test_non_string_jti_rejected(key: SigningKey, verifier: TokenVerifier, jti: Any) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(jti=jti)))


# --------------------------------------------------------------------------- act claim


@pytest.mark.parametrize(
    "act",
    [
        {},
        {"client_id": "summarizer"},
        {"sub": None},
        {"sub": ""},
        {"sub": 42},
        {"sub": ["summarizer"]},
        {"sub": {"id": "summarizer"}},
        "summarizer",
        ["summarizer"],
        None,
        True,
    ],
)
def test_act_without_a_valid_agent_rejected(
    key: SigningKey, verifier: TokenVerifier, act: Any
) -> None:
    """THREATS: an ``act`` mapped to no agent."""
    rejected(verifier, hand_signed(key, delegation_claims(act=act)))


# ---------------------------------------------------------------------- identifier shape

BAD_IDS = [
    "alice#member",
    "user:alice",
    "alice@acme",
    "alice/..",
    "../alice",
    "acme/alice",
    "..",
    "a..b",
    "al ice",
    " alice",
    "alice ",
    "alice\n",
    "alice\t",
    "alice\r",
    "alice\x00",
    "alice\x1b",
    "alice\x7f",
    "alice\u200b",
    "alice\u00a0",
    "\uff41lice",  # fullwidth a
    "alicé",
    "-alice",
    ".alice",
    "",
    "a" * 129,
    42,
    ["alice"],
    {"id": "alice"},
    True,
]


def _with_id(field: str, value: Any, *, principal: bool = False) -> dict[str, Any]:
    claims = principal_claims() if principal else delegation_claims()
    if field == "act.sub":
        claims["act"] = {"sub": value}
    else:
        claims[field] = value
    return claims


@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
@pytest.mark.parametrize("field", ["sub", "tenant", "task", "act.sub"])
def test_invalid_ids_in_delegation_token_rejected(
    key: SigningKey, verifier: TokenVerifier, field: str, value: Any
) -> None:
    rejected(verifier, hand_signed(key, _with_id(field, value)))


@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
@pytest.mark.parametrize("field", ["sub", "tenant"])
def test_invalid_ids_in_principal_token_rejected(
    key: SigningKey, verifier: TokenVerifier, field: str, value: Any
) -> None:
    rejected(verifier, hand_signed(key, _with_id(field, value, principal=True)), principal=True)


def test_longest_valid_id_accepted(key: SigningKey, verifier: TokenVerifier) -> None:
    longest = "a" * 128
    context = verifier.verify_delegation(hand_signed(key, _with_id("task", longest)))
    assert context.task == longest


# ---------------------------------------------------------- headers that point at keys


@pytest.fixture
def attacker_jwk() -> dict[str, Any]:
    attacker = Ed25519PrivateKey.generate()
    jwk = OKPAlgorithm.to_jwk(attacker.public_key(), as_dict=True)
    return dict(jwk)


@pytest.mark.parametrize("name", ["jku", "x5u", "jwk", "x5c"])
def test_key_reference_headers_rejected_even_with_a_valid_signature(
    key: SigningKey, verifier: TokenVerifier, attacker_jwk: dict[str, Any], name: str
) -> None:
    values: dict[str, Any] = {
        "jku": "https://attacker.test/.well-known/jwks.json",
        "x5u": "https://attacker.test/cert.pem",
        "jwk": attacker_jwk,
        "x5c": [b64url(b"not really a certificate")],
    }
    token = hand_signed(key, delegation_claims(), header_for(key, **{name: values[name]}))
    rejected(verifier, token)
    principal_token = hand_signed(key, principal_claims(), header_for(key, **{name: values[name]}))
    rejected(verifier, principal_token, principal=True)


def test_embedded_jwk_signed_by_its_own_key_rejected(verifier: TokenVerifier) -> None:
    """CVE-2018-0114 style: the token carries the key that signed it."""
    attacker_pem = new_ed25519_pem()
    attacker = serialization.load_pem_private_key(attacker_pem, password=None)
    assert isinstance(attacker, Ed25519PrivateKey)
    jwk = OKPAlgorithm.to_jwk(attacker.public_key(), as_dict=True)
    header = {"alg": "EdDSA", "typ": ACCESS_TOKEN_TYPE, "jwk": jwk}
    signing_input = f"{segment(header)}.{segment(delegation_claims())}"
    signature = b64url(ed25519_sign(attacker_pem, signing_input))
    rejected(verifier, f"{signing_input}.{signature}")
    # Naming the attacker key's thumbprint as kid does not help either.
    header["kid"] = jwk.get("kid", "attacker")
    signing_input = f"{segment(header)}.{segment(delegation_claims())}"
    rejected(verifier, f"{signing_input}.{b64url(ed25519_sign(attacker_pem, signing_input))}")


def test_unsupported_critical_header_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    header = header_for(key, crit=["exp-policy"], **{"exp-policy": "lenient"})
    rejected(verifier, hand_signed(key, delegation_claims(), header))


# -------------------------------------------------------------------------------- kid


@pytest.mark.parametrize(
    "kid",
    [
        "unknown",
        "",
        "../../etc/passwd",
        "../../../../../../dev/null",
        "/etc/passwd",
        "..\\..\\windows\\win.ini",
        "keys/ed25519.pem",
        "ed25519",
        "file:///etc/passwd",
        "' OR '1'='1",
    ],
)
def test_unknown_kid_rejected(key: SigningKey, verifier: TokenVerifier, kid: str) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(), header_for(key, kid=kid)))


def test_kid_variants_of_the_real_kid_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    for kid in (
        f"../{key.kid}",
        f"{key.kid}/../{key.kid}",
        f"./{key.kid}",
        f"{key.kid}\x00",
        f" {key.kid}",
        f"{key.kid} ",
        key.kid.swapcase(),
        key.kid[:-1],
    ):
        assert kid != key.kid
        rejected(verifier, hand_signed(key, delegation_claims(), header_for(key, kid=kid)))


@pytest.mark.parametrize("kid", [DROP, None, 1, ["kid"], {"kid": "x"}])
def test_missing_or_non_string_kid_rejected(
    key: SigningKey, verifier: TokenVerifier, kid: Any
) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(), header_for(key, kid=kid)))


def test_kid_traversal_never_touches_the_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a kid naming the real key file on disk is just an unknown label."""
    key = load_or_create_signing_key(tmp_path)
    verifier = make_verifier(key)
    key_path = str(tmp_path / "keys" / "ed25519.pem")
    tokens = [
        hand_signed(key, delegation_claims(), header_for(key, kid=kid))
        for kid in (key_path, "../../etc/passwd", "../keys/ed25519.pem")
    ]
    opened: list[str] = []

    def spy(real: Any) -> Any:
        def wrapper(file: Any, *args: Any, **kwargs: Any) -> Any:
            opened.append(str(file))
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(io, "open", spy(io.open))
    monkeypatch.setattr(os, "open", spy(os.open))
    for token in tokens:
        rejected(verifier, token)
    monkeypatch.undo()
    assert opened == []


# --------------------------------------------------------------------- token type (typ)


@pytest.mark.parametrize("typ", [DROP, None, "", "JWT", "jwt", "JWS", "id_token", "rt+jwt"])
def test_token_that_is_not_an_access_token_rejected(
    key: SigningKey, verifier: TokenVerifier, typ: Any
) -> None:
    rejected(verifier, hand_signed(key, delegation_claims(), header_for(key, typ=typ)))
    rejected(
        verifier, hand_signed(key, principal_claims(), header_for(key, typ=typ)), principal=True
    )


def test_id_token_presented_as_access_token_rejected(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    """An OpenID Connect ID token from the same issuer and key, even with our audience."""
    claims = delegation_claims(nonce="n-0S6_WzA2Mj", auth_time=int(time.time()), azp="cli")
    rejected(verifier, hand_signed(key, claims, header_for(key, typ="JWT")))
    rejected(verifier, hand_signed(key, principal_claims(nonce="n"), header_for(key, typ="JWT")))


def test_refresh_token_presented_as_access_token_rejected(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    now = int(time.time())
    refresh_claims = delegation_claims(
        exp=now + 30 * 86_400, token_use="refresh", scope="offline_access"
    )
    for typ in ("JWT", "refresh+jwt", DROP):
        token = hand_signed(key, refresh_claims, header_for(key, typ=typ))
        rejected(verifier, token)
        rejected(verifier, token, principal=True)
    # An opaque refresh token, as most servers issue them.
    rejected(verifier, secrets.token_urlsafe(43))
    rejected(verifier, secrets.token_urlsafe(43), principal=True)


# ------------------------------------------------------------------ delegation vs principal


def test_delegation_token_cannot_make_a_principal_call(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    token = issue_token(
        key,
        issuer=ISSUER,
        audience=AUDIENCE,
        tenant="acme",
        user="alice",
        agent="summarizer",
        task="t1",
    )
    assert verifier.verify_delegation(token).agent == "summarizer"
    rejected(verifier, token, principal=True)


def test_principal_token_cannot_make_a_delegation_call(
    key: SigningKey, verifier: TokenVerifier
) -> None:
    token = issue_token(key, issuer=ISSUER, audience=AUDIENCE, tenant="acme", user="alice")
    assert verifier.verify_principal(token).user == "alice"
    rejected(verifier, token)


@pytest.mark.parametrize(
    "overrides",
    [
        {"act": DROP},  # a task but no agent
        {"task": DROP},  # an agent but no task
        {"act": None},
        {"task": None},
    ],
)
def test_half_delegation_tokens_fit_neither_call(
    key: SigningKey, verifier: TokenVerifier, overrides: dict[str, Any]
) -> None:
    token = hand_signed(key, delegation_claims(**overrides))
    rejected(verifier, token)
    rejected(verifier, token, principal=True)


# ---------------------------------------------------------------------------- size limit


def _padded_token(key: SigningKey, target_length: int) -> str:
    """A correctly signed delegation token of about ``target_length`` characters."""
    base = len(hand_signed(key, delegation_claims(pad="")))
    padding = max(0, (target_length - base) * 3 // 4)
    return hand_signed(key, delegation_claims(pad="x" * padding))


def test_token_too_large_rejected(key: SigningKey, verifier: TokenVerifier) -> None:
    near = _padded_token(key, 8150)
    assert 8000 < len(near) <= 8192
    assert verifier.verify_delegation(near).user == "alice"

    over = _padded_token(key, 8250)
    assert len(over) > 8192
    rejected(verifier, over)
    rejected(verifier, over, principal=True)
    huge = _padded_token(key, 1_000_000)
    rejected(verifier, huge)


# ----------------------------------------------------------------- errors carry no detail


def test_rejection_is_an_invalid_token_401(key: SigningKey, verifier: TokenVerifier) -> None:
    error = rejected(verifier, unsigned(header_for(key, alg="none"), delegation_claims()))
    assert error.status == 401
    assert error.code == "invalid_token"
    # The message names no secret material.
    assert key.public_pem.decode() not in error.message
    assert key.kid not in error.message


# ------------------------------------------------------------------- keys from a JWKS URL


class JwksServer:
    """A real local HTTP server publishing a JWKS document (or something broken).

    ``hold``: when set to an Event, each request waits for it (at most ``HOLD_S``) before
    answering, and ``released`` records whether it came in time, which proves the caller
    kept running while its fetch was in flight.
    """

    HOLD_S = 3.0

    def __init__(self) -> None:
        self.status = 200
        self.body = b""
        self.requests = 0
        self.hold: threading.Event | None = None
        self.requested = threading.Event()
        self.released: bool | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                outer.requested.set()
                if outer.hold is not None:
                    outer.released = outer.hold.wait(outer.HOLD_S)
                self.send_response(outer.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, document: Any, status: int = 200) -> None:
        self.status = status
        self.body = document if isinstance(document, bytes) else json.dumps(document).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


ISSUER_KID = "issuer-key-1"


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def issuer_key() -> tuple[SigningKey, dict[str, Any]]:
    """A production issuer's key pair: the signing half, and its public JWK."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    jwk = dict(OKPAlgorithm.to_jwk(private.public_key(), as_dict=True))
    jwk.update(kid=ISSUER_KID, use="sig", alg="EdDSA")
    return SigningKey(ISSUER_KID, pem, b""), jwk


def jwks_verifier(url: str, issuer: str = ISSUER, audience: str = AUDIENCE) -> TokenVerifier:
    return TokenVerifier({}, issuer=issuer, audience=audience, algorithms=["EdDSA"], jwks_url=url)


def broken_jwks(jwk: dict[str, Any]) -> dict[str, tuple[int, Any]]:
    """JWKS answers the gateway cannot use, each paired with its HTTP status."""
    return {
        "not_json": (200, b"<html>sign-in page</html>"),
        "empty_body": (200, b""),
        "invalid_utf8": (200, b"\xff\xfe{"),
        "json_array": (200, [jwk]),
        "no_keys": (200, {"issuer": ISSUER}),
        "keys_not_a_list": (200, {"keys": jwk}),
        "keys_empty": (200, {"keys": []}),
        "key_does_not_parse": (200, {"keys": [{**jwk, "x": "!!not base64!!"}]}),
        "unknown_key_type": (200, {"keys": [{**jwk, "kty": "XYZ"}]}),
        "only_a_symmetric_key": (200, {"keys": [{"kty": "oct", "k": "c2Vj", "kid": ISSUER_KID}]}),
        "http_500": (500, {"keys": [jwk]}),
        "http_404": (404, b"not found"),
    }


BROKEN_JWKS = sorted(broken_jwks({}))


def test_jwks_keys_verify_tokens_and_made_up_kids_do_not_refetch(
    jwks: JwksServer, issuer_key: tuple[SigningKey, dict[str, Any]]
) -> None:
    key, jwk = issuer_key
    jwks.publish({"keys": [jwk]})
    verifier = jwks_verifier(jwks.url)
    context = verifier.verify_delegation(hand_signed(key, delegation_claims()))
    assert (context.user, context.agent, context.tenant) == ("alice", "summarizer", "acme")
    assert verifier.verify_principal(hand_signed(key, principal_claims())).user == "alice"
    for kid in ("made-up-1", "made-up-2", "../../etc/passwd"):
        rejected(verifier, hand_signed(key, delegation_claims(), header_for(key, kid=kid)))
    assert jwks.requests == 1  # fetched once; unknown kids inside the refetch interval never ask


@pytest.mark.parametrize("case", BROKEN_JWKS)
def test_a_jwks_that_cannot_be_used_is_unavailable_not_a_token_error(
    jwks: JwksServer, issuer_key: tuple[SigningKey, dict[str, Any]], case: str
) -> None:
    key, jwk = issuer_key
    status, document = broken_jwks(jwk)[case]
    jwks.publish(document, status)
    with pytest.raises(AuthorizationUnavailable) as caught:
        jwks_verifier(jwks.url).verify_delegation(hand_signed(key, delegation_claims()))
    assert caught.value.status == 503 and caught.value.code == "authorization_unavailable"
    assert jwks.url not in caught.value.message


async def test_one_broken_entry_makes_only_its_kid_unavailable(
    jwks: JwksServer, issuer_key: tuple[SigningKey, dict[str, Any]]
) -> None:
    key, jwk = issuer_key
    jwks.publish({"keys": [jwk, {**jwk, "kid": "rotated", "x": "!!"}]})
    verifier = jwks_verifier(jwks.url)
    context = await verifier.averify_delegation(hand_signed(key, delegation_claims()))
    assert context.user == "alice"
    rotated = hand_signed(key, delegation_claims(), header_for(key, kid="rotated"))
    with pytest.raises(AuthorizationUnavailable):
        await verifier.averify_delegation(rotated)
    with pytest.raises(InvalidToken):
        await verifier.averify_delegation(
            hand_signed(key, delegation_claims(), header_for(key, kid="never-published"))
        )


async def test_an_unreachable_jwks_is_unavailable() -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    verifier = jwks_verifier(f"http://127.0.0.1:{port}/jwks.json")
    key = SigningKey(ISSUER_KID, new_ed25519_pem(), b"")
    token = hand_signed(key, principal_claims(), header_for(key))
    with pytest.raises(AuthorizationUnavailable):
        await verifier.averify_principal(token)
    with pytest.raises(AuthorizationUnavailable):
        await asyncio.to_thread(verifier.verify_principal, token)


def _principal_token(key: SigningKey, gateway: Gateway) -> str:
    return issue_token(
        key,
        issuer=gateway.settings.token_issuer,
        audience=gateway.settings.token_audience,
        tenant="acme",
        user="admin",
    )


async def test_jwks_fetch_over_http_never_blocks_the_event_loop(
    gateway: Gateway,
    http: httpx.AsyncClient,
    jwks: JwksServer,
    issuer_key: tuple[SigningKey, dict[str, Any]],
) -> None:
    """The JWKS server answers only once a coroutine of the gateway's own event loop
    releases it: a fetch that blocked the loop would keep that coroutine from running
    (the server then gives up waiting, and ``released`` is False)."""
    key, jwk = issuer_key
    jwks.publish({"keys": [jwk]})
    jwks.hold = threading.Event()
    settings = gateway.settings
    gateway.verifier = jwks_verifier(jwks.url, settings.token_issuer, settings.token_audience)
    await gateway.create_tenant("acme", "admin")

    async def release_once_asked() -> None:
        while not jwks.requested.is_set():
            await asyncio.sleep(0.01)
        assert jwks.hold is not None
        jwks.hold.set()

    headers = {"authorization": f"Bearer {_principal_token(key, gateway)}"}
    response, _ = await asyncio.gather(
        http.get("/v1/sources", headers=headers), release_once_asked()
    )
    assert response.status_code == 200, response.text
    assert jwks.released is True


@pytest.mark.parametrize("case", BROKEN_JWKS)
async def test_a_broken_jwks_is_a_503_over_http(
    gateway: Gateway,
    http: httpx.AsyncClient,
    jwks: JwksServer,
    issuer_key: tuple[SigningKey, dict[str, Any]],
    case: str,
) -> None:
    key, jwk = issuer_key
    status, document = broken_jwks(jwk)[case]
    jwks.publish(document, status)
    settings = gateway.settings
    gateway.verifier = jwks_verifier(jwks.url, settings.token_issuer, settings.token_audience)
    response = await http.get(
        "/v1/sources", headers={"authorization": f"Bearer {_principal_token(key, gateway)}"}
    )
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["code"] == "authorization_unavailable"
    assert jwks.url not in response.text and "sign-in" not in response.text
