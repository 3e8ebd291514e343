"""Unit tests for gateway.auth (no sockets)."""

from __future__ import annotations

import base64
import json
import logging
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from gateway.auth import (
    AuthConfig,
    Authenticator,
    AuthError,
    ConfigError,
    ConnectRequest,
    Identity,
    mint_token,
)

SECRET = "test-secret-0123456789-abcdefghijklmnop"


def req(query: str = "", headers: dict[str, str] | None = None, protocols: tuple[str, ...] = ()) -> ConnectRequest:
    return ConnectRequest(
        conn=1,
        peer="127.0.0.1:5000",
        path="/ws",
        query=query,
        headers=tuple((k.lower(), v) for k, v in (headers or {}).items()),
        protocols=protocols,
    )


def hs_auth(**kw: object) -> Authenticator:
    return Authenticator(AuthConfig(secret=SECRET, **kw))  # type: ignore[arg-type]


def reason(auth: Authenticator, r: ConnectRequest) -> tuple[int, str]:
    with pytest.raises(AuthError) as ei:
        auth.authenticate(r)
    return ei.value.status, ei.value.reason


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return key, pem


# --- ConnectRequest -----------------------------------------------------------------


def test_connect_request_header_and_query() -> None:
    r = req("a=1&token=x%2By&a=2&empty=", {"X-Foo": "bar"})
    assert r.header("x-foo") == "bar"
    assert r.header("X-FOO") == "bar"
    assert r.header("missing") is None
    qp = r.query_params()
    assert qp == {"a": "1", "token": "x+y", "empty": ""}  # first occurrence wins
    assert r.query_params() is qp  # parsed once


# --- HS256 --------------------------------------------------------------------------


def test_hs256_valid_token_builds_identity() -> None:
    auth = hs_auth()
    tok = mint_token(SECRET, "u1", name="Ann", role="vip", rooms=["live:*", "cs:7"], other=1)
    ident = auth.authenticate(req(f"token={tok}"))
    assert ident.user == "u1"
    assert ident.meta == {"name": "Ann", "role": "vip"}
    assert ident.rooms == ("live:*", "cs:7")
    assert ident.guest is False
    assert ident.expires_at is not None and ident.expires_at > time.time()


def test_integer_subject_is_stringified() -> None:
    assert hs_auth().authenticate(req(f"token={mint_token(SECRET, 42)}")).user == "42"


def test_custom_user_claim_and_single_room_string() -> None:
    auth = hs_auth(user_claim="uid")
    tok = mint_token(SECRET, "ignored", uid="u9", rooms="cs:1")
    ident = auth.authenticate(req(f"token={tok}"))
    assert ident.user == "u9" and ident.rooms == ("cs:1",)


def test_expired_token() -> None:
    tok = mint_token(SECRET, "u1", ttl=-10)
    assert reason(hs_auth(), req(f"token={tok}")) == (401, "token expired")


def test_leeway_allows_slightly_expired_and_early_tokens() -> None:
    auth = hs_auth(leeway=30)
    assert auth.authenticate(req(f"token={mint_token(SECRET, 'u1', ttl=-10)}")).user == "u1"
    tok = mint_token(SECRET, "u1", nbf=int(time.time()) + 10)
    assert auth.authenticate(req(f"token={tok}")).user == "u1"


def test_nbf_in_future() -> None:
    tok = mint_token(SECRET, "u1", nbf=int(time.time()) + 600)
    assert reason(hs_auth(), req(f"token={tok}")) == (401, "token not yet valid")


def test_bad_signature() -> None:
    tok = mint_token("another-secret-0123456789-abcdefghijkl", "u1")
    status, why = reason(hs_auth(), req(f"token={tok}"))
    assert status == 401 and why == "invalid token signature"
    assert tok not in why


def test_malformed_token() -> None:
    assert reason(hs_auth(), req("token=not.a.jwt")) == (401, "malformed token")
    assert reason(hs_auth(), req("token=garbage")) == (401, "malformed token")


def test_wrong_algorithm_rejected() -> None:
    tok = jwt.encode({"sub": "u1"}, SECRET + "x" * 30, algorithm="HS512")
    assert reason(hs_auth(), req(f"token={tok}"))[0] == 401


def test_alg_none_rejected() -> None:
    def b64(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    tok = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'admin'})}."
    assert reason(hs_auth(), req(f"token={tok}")) == (401, "token algorithm not allowed")
    # also with asymmetric/mixed configs
    assert reason(Authenticator(AuthConfig(secret=SECRET * 2, algorithms=["HS256", "HS512"])), req(f"token={tok}"))[0] == 401


def test_missing_or_bad_subject() -> None:
    auth = hs_auth()
    tok = jwt.encode({"name": "x", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert reason(auth, req(f"token={tok}")) == (401, "token misses the 'sub' claim")
    assert reason(auth, req(f"token={mint_token(SECRET, '')}")) == (401, "token claim 'sub' is empty")
    assert reason(auth, req(f"token={mint_token(SECRET, ['a'])}"))[0] == 401  # type: ignore[arg-type]
    assert reason(auth, req(f"token={mint_token(SECRET, True)}"))[0] == 401  # type: ignore[arg-type]


def test_malformed_rooms_claim_is_refused() -> None:
    tok = mint_token(SECRET, "u1", rooms=[1, 2])
    assert reason(hs_auth(), req(f"token={tok}"))[0] == 401


def test_audience_and_issuer() -> None:
    auth = hs_auth(audience="chat", issuer="https://id.example")
    good = mint_token(SECRET, "u1", aud="chat", iss="https://id.example")
    assert auth.authenticate(req(f"token={good}")).user == "u1"
    assert reason(auth, req(f"token={mint_token(SECRET, 'u1', aud='other', iss='https://id.example')}")) == (
        401,
        "invalid token audience",
    )
    assert reason(auth, req(f"token={mint_token(SECRET, 'u1', aud='chat', iss='evil')}")) == (
        401,
        "invalid token issuer",
    )
    assert reason(auth, req(f"token={mint_token(SECRET, 'u1', aud='chat')}"))[0] == 401  # iss missing


# --- RS256 / ES256 ------------------------------------------------------------------


def test_rs256_valid_and_invalid(rsa_keys: tuple[rsa.RSAPrivateKey, str]) -> None:
    key, pem = rsa_keys
    auth = Authenticator(AuthConfig(algorithms=["RS256"], public_key=pem))
    now = int(time.time())
    good = jwt.encode({"sub": "u1", "exp": now + 60}, key, algorithm="RS256")
    assert auth.authenticate(req(headers={"Authorization": f"Bearer {good}"})).user == "u1"
    expired = jwt.encode({"sub": "u1", "exp": now - 60}, key, algorithm="RS256")
    assert reason(auth, req(f"token={expired}")) == (401, "token expired")
    future = jwt.encode({"sub": "u1", "nbf": now + 600}, key, algorithm="RS256")
    assert reason(auth, req(f"token={future}")) == (401, "token not yet valid")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"sub": "u1"}, other, algorithm="RS256")
    assert reason(auth, req(f"token={forged}")) == (401, "invalid token signature")
    no_sub = jwt.encode({"exp": now + 60}, key, algorithm="RS256")
    assert reason(auth, req(f"token={no_sub}"))[0] == 401
    hs = jwt.encode({"sub": "u1"}, SECRET, algorithm="HS256")
    assert reason(auth, req(f"token={hs}")) == (401, "token algorithm not allowed")


def test_rs256_key_confusion_in_mixed_config(rsa_keys: tuple[rsa.RSAPrivateKey, str]) -> None:
    key, pem = rsa_keys
    auth = Authenticator(AuthConfig(algorithms=["HS256", "RS256"], secret=SECRET, public_key=pem))
    assert auth.authenticate(req(f"token={jwt.encode({'sub': 'a'}, key, algorithm='RS256')}")).user == "a"
    assert auth.authenticate(req(f"token={mint_token(SECRET, 'b')}")).user == "b"
    # HS256 signed with the public key PEM as the HMAC secret must not verify
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": "evil"}).encode())
    signing_input = f"{header}.{payload}"
    sig = hmac.new(pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    assert reason(auth, req(f"token={signing_input}.{b64(sig)}")) == (401, "invalid token signature")


def test_rs256_public_key_file(tmp_path, rsa_keys: tuple[rsa.RSAPrivateKey, str]) -> None:  # type: ignore[no-untyped-def]
    key, pem = rsa_keys
    path = tmp_path / "pub.pem"
    path.write_text(pem)
    auth = Authenticator(AuthConfig(algorithms=["RS256", "RS512"], public_key_file=str(path)))
    assert auth.authenticate(req(f"token={jwt.encode({'sub': 'u1'}, key, algorithm='RS512')}")).user == "u1"


def test_es256() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    auth = Authenticator(AuthConfig(algorithms=["ES256"], public_key=pem))
    assert auth.authenticate(req(f"token={jwt.encode({'sub': 'e'}, key, algorithm='ES256')}")).user == "e"


# --- token sources ------------------------------------------------------------------


def test_token_sources_and_order() -> None:
    auth = hs_auth()
    t1, t2, t3 = mint_token(SECRET, "q"), mint_token(SECRET, "h"), mint_token(SECRET, "p")
    assert auth.extract_token(req(f"token={t1}")) == t1
    assert auth.extract_token(req(headers={"authorization": f"Bearer {t2}"})) == t2
    assert auth.extract_token(req(headers={"authorization": f"bearer  {t2}"})) == t2
    assert auth.extract_token(req(headers={"authorization": t2})) == t2  # raw token
    assert auth.extract_token(req(protocols=("gateway.v1", f"token.{t3}"))) == t3
    both = req(f"token={t1}", {"authorization": f"Bearer {t2}"}, (f"token.{t3}",))
    assert auth.authenticate(both).user == "q"
    assert auth.authenticate(req("token=", {"authorization": f"Bearer {t2}"}, (f"token.{t3}",))).user == "h"
    assert auth.authenticate(req(protocols=("gateway.v1", f"token.{t3}"))).user == "p"
    assert auth.extract_token(req(protocols=("token.",))) is None
    assert auth.extract_token(req()) is None


def test_custom_token_locations() -> None:
    auth = hs_auth(query_param="jwt", header="X-Token", protocol_prefix="bearer-")
    tok = mint_token(SECRET, "u1")
    assert auth.extract_token(req(f"jwt={tok}")) == tok
    assert auth.extract_token(req(headers={"x-token": tok})) == tok
    assert auth.extract_token(req(protocols=(f"bearer-{tok}",))) == tok
    assert auth.extract_token(req(f"token={tok}")) is None


# --- guests and dev mode ------------------------------------------------------------


def test_guests_off_requires_token() -> None:
    assert reason(hs_auth(), req()) == (401, "missing token")


def test_guests_on() -> None:
    auth = hs_auth(allow_guests=True)
    g1, g2 = auth.authenticate(req()), auth.authenticate(req())
    assert g1.guest and g2.guest
    assert g1.user.startswith("guest:") and g1.user != g2.user
    assert int(g2.user.split(":")[1]) > int(g1.user.split(":")[1])
    # a present but bad token is refused, not downgraded to a guest
    assert reason(auth, req(f"token={mint_token(SECRET, 'u1', ttl=-10)}"))[0] == 401
    assert auth.authenticate(req(f"token={mint_token(SECRET, 'u1')}")).guest is False


def test_dev_mode(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        auth = Authenticator(AuthConfig(mode="dev"))
    assert any("dev" in r.getMessage() for r in caplog.records)
    ident = auth.authenticate(req("user=alice&role=admin&token=ignored"))
    assert ident == Identity("alice", {"role": "admin"}, None, False, None)
    assert reason(auth, req())[0] == 401
    assert reason(auth, req("user=" + "x" * 200))[0] == 401
    assert Authenticator(AuthConfig(mode="dev", allow_guests=True)).authenticate(req()).guest


# --- subprotocol --------------------------------------------------------------------


def test_choose_subprotocol() -> None:
    auth = hs_auth()
    sup = ["gateway.v1", "gateway.v2"]
    assert auth.choose_subprotocol(req(), sup) is None
    assert auth.choose_subprotocol(req(protocols=("x", "gateway.v2", "gateway.v1")), sup) == "gateway.v2"
    assert auth.choose_subprotocol(req(protocols=("token.abc", "gateway.v1")), sup) == "gateway.v1"
    # nothing supported: still echo an offered entry, preferring a non-token one
    assert auth.choose_subprotocol(req(protocols=("token.abc", "foo", "bar")), sup) == "foo"
    assert auth.choose_subprotocol(req(protocols=("token.abc",)), sup) == "token.abc"
    # a supported name that is a token entry is never picked as "supported"
    assert auth.choose_subprotocol(req(protocols=("token.x", "y")), ["token.x"]) == "y"


# --- Identity -----------------------------------------------------------------------


def test_identity_may_join() -> None:
    assert Identity("u").may_join("anything:1")
    ident = Identity("u", {}, ("live:*", "cs:7", "vip:?", "x:*:y"))
    assert ident.may_join("live:42") and ident.may_join("cs:7") and ident.may_join("vip:1")
    assert ident.may_join("x:a:y")
    assert not ident.may_join("cs:70") and not ident.may_join("vip:12") and not ident.may_join("live")
    assert not Identity("u", {}, ()).may_join("live:1")


# --- config -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({}, "auth.secret"),
        ({"mode": "magic", "secret": SECRET}, "auth.mode"),
        ({"algorithms": ["none"], "secret": SECRET}, "auth.algorithms"),
        ({"algorithms": [], "secret": SECRET}, "auth.algorithms"),
        ({"algorithms": ["RS256"]}, "auth.public_key"),
        ({"algorithms": ["RS256"], "public_key": "not a pem"}, "auth.public_key"),
        ({"algorithms": ["RS256"], "public_key_file": "/nonexistent/key.pem"}, "auth.public_key_file"),
        ({"secret": SECRET, "deadline": 0}, "auth.deadline"),
        ({"secret": SECRET, "leeway": -1}, "auth.leeway"),
        ({"secret": SECRET, "user_claim": ""}, "auth.user_claim"),
        ({"secret": SECRET, "meta_claims": [""]}, "auth.meta_claims"),
    ],
)
def test_config_errors_name_the_key(kw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        AuthConfig(**kw).check()  # type: ignore[arg-type]
    assert ei.value.key == key
    assert str(ei.value).startswith(f"{key}: ")
    assert isinstance(ei.value, ValueError)


def test_config_key_type_mismatch(rsa_keys: tuple[rsa.RSAPrivateKey, str]) -> None:
    _, pem = rsa_keys
    with pytest.raises(ConfigError) as ei:
        AuthConfig(algorithms=["ES256"], public_key=pem).check("gw.auth")
    assert ei.value.key == "gw.auth.public_key"
    with pytest.raises(ConfigError):
        Authenticator(AuthConfig(algorithms=["HS256"]))


def test_dev_mode_needs_no_secret() -> None:
    AuthConfig(mode="dev").check()


def test_mint_token_claims() -> None:
    claims = jwt.decode(mint_token(SECRET, "u1", ttl=None, role="x"), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "u1" and claims["role"] == "x" and "exp" not in claims


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ("change-me-to-32-random-bytes-or-more", "placeholder"),
        ("CHANGE-ME", "shorter than 32 bytes"),
        ("your-secret-here-your-secret-here-123", "placeholder"),
        ("a" * 64, "too few distinct characters"),
        ("abababababababababababababababab12", "too few distinct characters"),
        ("short-but-random-Zq8#", "shorter than 32 bytes"),
    ],
)
def test_placeholder_and_weak_secrets_refuse_to_start(secret: str, why: str) -> None:
    with pytest.raises(ConfigError, match=f"auth.secret: .*{why}"):
        AuthConfig(secret=secret).check()


def test_the_example_config_carries_no_working_secret() -> None:
    from pathlib import Path

    from gateway.config import load_config

    example = Path(__file__).resolve().parents[2] / "gateway.example.toml"
    with pytest.raises(ConfigError, match="auth.secret"):
        load_config(str(example), environ={})
    cfg = load_config(str(example), environ={"GATEWAY_AUTH__SECRET": "q3V9x-Lr0aT7mZ2pK8sW4yB6nD1fH5jG0cE"})
    assert cfg.auth.secret.startswith("q3V9x")
