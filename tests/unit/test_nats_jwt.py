"""NATS JWTs (controller.nats.jwt): round trips, signatures, expiry, the v2 wire format."""

from __future__ import annotations

import base64
import json

import pytest

from controller.nats import jwt


def _part(token: str, i: int) -> dict[str, object]:
    raw = token.split(".")[i]
    return json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))


def test_keys_have_nats_prefixes() -> None:
    for kind, prefix in (("operator", "O"), ("account", "A"), ("user", "U")):
        seed = jwt.new_seed(kind)  # type: ignore[arg-type]
        assert seed.startswith(b"S" + prefix.encode())
        pub = jwt.public_key(seed)
        assert pub.startswith(prefix) and len(pub) == 56
        assert jwt.is_public_key(pub, kind)  # type: ignore[arg-type]
    assert not jwt.is_public_key(jwt.public_key(jwt.new_seed("user")), "account")
    assert not jwt.is_public_key("UNOTAKEY", "user")


def test_user_round_trip_and_wire_format() -> None:
    acct, signing, user = jwt.new_seed("account"), jwt.new_seed("account"), jwt.new_seed("user")
    claims = jwt.user_claims(
        jwt.public_key(user),
        name="node-1",
        pub_allow=["barista.node.n1.>"],
        sub_allow=["barista.cmd.all", "_INBOX_n1.>"],
        pub_deny=["$SYS.>"],
        expires=2_000_000_000,
        issuer_account=jwt.public_key(acct),
    )
    token = jwt.encode(claims, signing, issued_at=1_700_000_000)
    assert _part(token, 0) == {"typ": "JWT", "alg": "ed25519-nkey"}
    payload = _part(token, 1)
    assert payload["iss"] == jwt.public_key(signing)
    assert payload["sub"] == jwt.public_key(user)
    assert payload["iat"] == 1_700_000_000 and payload["exp"] == 2_000_000_000
    assert payload["nats"] == {
        "pub": {"allow": ["barista.node.n1.>"], "deny": ["$SYS.>"]},
        "sub": {"allow": ["barista.cmd.all", "_INBOX_n1.>"]},
        "subs": -1,
        "data": -1,
        "payload": -1,
        "issuer_account": jwt.public_key(acct),
        "type": "user",
        "version": 2,
    }
    # No bearer token, no response permission: absent, as Go's omitempty leaves them.
    assert "bearer_token" not in payload["nats"] and "resp" not in payload["nats"]
    back = jwt.decode(token, jwt.UserClaims, clock=lambda: 1_800_000_000)
    assert back.sub == claims.sub and back.nats.pub == claims.nats.pub
    assert back.jti == jwt.claims_hash(back)
    account = jwt.account_claims(jwt.public_key(acct), signing_keys=[jwt.public_key(signing)])
    jwt.check_user_issuer(back, account)
    with pytest.raises(jwt.JwtError):
        jwt.check_user_issuer(back, jwt.account_claims(jwt.public_key(jwt.new_seed("account"))))


def test_account_and_operator_round_trip() -> None:
    op, sys_acct, fleet = jwt.new_seed("operator"), jwt.new_seed("account"), jwt.new_seed("account")
    operator = jwt.operator_claims(
        jwt.public_key(op), name="barista", system_account=jwt.public_key(sys_acct)
    )
    token = jwt.encode(operator, op)
    back = jwt.decode(token, jwt.OperatorClaims)
    assert back.iss == back.sub == jwt.public_key(op)
    assert back.nats.system_account == jwt.public_key(sys_acct)
    assert back.nats.type == "operator" and back.nats.version == 2

    user = jwt.public_key(jwt.new_seed("user"))
    account = jwt.account_claims(
        jwt.public_key(fleet),
        limits=jwt.account_limits(jetstream=True),
        revocations={user: 1_700_000_000},
    )
    atoken = jwt.encode(account, op)
    aback = jwt.decode(atoken, jwt.AccountClaims)
    assert aback.nats.revocations == {user: 1_700_000_000}
    assert aback.nats.limits.disk_storage == jwt.NO_LIMIT
    assert aback.nats.limits.conn == jwt.NO_LIMIT
    # A JetStream-less account has zero storage, which is how nats-server sees "off".
    plain = jwt.decode(
        jwt.encode(jwt.account_claims(jwt.public_key(sys_acct)), op), jwt.AccountClaims
    )
    assert plain.nats.limits.disk_storage == 0 and plain.nats.limits.mem_storage == 0


def test_revocation_covers_jwts_issued_until_then() -> None:
    acct = jwt.new_seed("account")
    user = jwt.public_key(jwt.new_seed("user"))
    account = jwt.account_claims(jwt.public_key(acct), revocations={user: 1000})
    for iat, revoked in ((999, True), (1000, True), (1001, False)):
        token = jwt.encode(jwt.user_claims(user), acct, issued_at=iat)
        assert jwt.is_revoked(jwt.decode(token, jwt.UserClaims), account) is revoked


def test_bad_signature_refused() -> None:
    acct, user = jwt.new_seed("account"), jwt.new_seed("user")
    token = jwt.encode(jwt.user_claims(jwt.public_key(user), name="a"), acct)
    head, payload, sig = token.split(".")
    # Someone widens the permissions without the key.
    body = _part(token, 1)
    body["nats"]["pub"] = {"allow": [">"]}  # type: ignore[index]
    forged = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    with pytest.raises(jwt.JwtBadSignature):
        jwt.decode(f"{head}.{forged}.{sig}", jwt.UserClaims)
    # Re-signed by another account key, but claiming the first as issuer.
    other = jwt.encode(jwt.user_claims(jwt.public_key(user), name="a"), jwt.new_seed("account"))
    with pytest.raises(jwt.JwtBadSignature):
        jwt.decode(f"{head}.{payload}.{other.split('.')[2]}", jwt.UserClaims)
    with pytest.raises(jwt.JwtError):
        jwt.decode(f"{head}.{payload}", jwt.UserClaims)
    with pytest.raises(jwt.JwtError):
        jwt.decode("x.y.z", jwt.UserClaims)


def test_wrong_kind_refused() -> None:
    op, acct, user = jwt.new_seed("operator"), jwt.new_seed("account"), jwt.new_seed("user")
    account_token = jwt.encode(jwt.account_claims(jwt.public_key(acct)), op)
    with pytest.raises(jwt.JwtError, match="account"):
        jwt.decode(account_token, jwt.UserClaims)
    # A user JWT must be signed by an account key, an account JWT by an operator key.
    with pytest.raises(jwt.JwtError):
        jwt.encode(jwt.user_claims(jwt.public_key(user)), op)
    with pytest.raises(jwt.JwtError):
        jwt.encode(jwt.account_claims(jwt.public_key(acct)), acct)
    with pytest.raises(jwt.JwtError):
        jwt.user_claims(jwt.public_key(acct))


def test_expired_and_not_yet_valid_detected() -> None:
    acct, user = jwt.new_seed("account"), jwt.new_seed("user")
    claims = jwt.user_claims(jwt.public_key(user), expires=1_000)
    token = jwt.encode(claims, acct, issued_at=900)
    assert jwt.decode(token, jwt.UserClaims, clock=lambda: 999).exp == 1_000
    with pytest.raises(jwt.JwtExpired):
        jwt.decode(token, jwt.UserClaims, clock=lambda: 1_001)
    assert jwt.decode(token, jwt.UserClaims, check_time=False).exp == 1_000
    later = jwt.encode(
        jwt.UserClaims(sub=claims.sub, nbf=5_000, nats=claims.nats), acct, issued_at=900
    )
    with pytest.raises(jwt.JwtNotYetValid):
        jwt.decode(later, jwt.UserClaims, clock=lambda: 4_000)


def test_jti_is_sha512_256_of_the_standard_claims() -> None:
    acct, user = jwt.new_seed("account"), jwt.new_seed("user")
    a = jwt.encode(jwt.user_claims(jwt.public_key(user), pub_allow=["a"]), acct, issued_at=5)
    b = jwt.encode(jwt.user_claims(jwt.public_key(user), pub_allow=["b"]), acct, issued_at=5)
    # As in jwt v2: the nats part is not hashed, so only iat tells these two apart (which
    # is why account updates need a growing iat, see operator.py).
    assert _part(a, 1)["jti"] == _part(b, 1)["jti"]
    assert len(str(_part(a, 1)["jti"])) == 52


def test_creds_round_trip() -> None:
    acct, user = jwt.new_seed("account"), jwt.new_seed("user")
    token = jwt.encode(jwt.user_claims(jwt.public_key(user)), acct)
    text = jwt.format_creds(token, user)
    assert text.startswith("-----BEGIN NATS USER JWT-----\n")
    assert "-----BEGIN USER NKEY SEED-----" in text
    assert jwt.parse_creds(text) == (token, user.decode())
