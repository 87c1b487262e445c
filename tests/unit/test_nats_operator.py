"""The operator-mode trust dir (controller.nats.operator), without a server."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from controller.nats import jwt
from controller.nats.operator import OperatorTrust, Permissions, RevokedUser, TrustError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_made_at_first_start_private_and_reloaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    trust = OperatorTrust.load_or_create(tmp_path / "nats")
    tdir = OperatorTrust.trust_dir(tmp_path / "nats")
    assert _mode(tdir) == 0o700
    seeds = sorted(p.name for p in tdir.glob("*.seed"))
    assert seeds == ["fleet-signing.seed", "fleet.seed", "operator.seed", "system.seed"]
    for p in tdir.iterdir():
        assert _mode(p) == 0o600, p
        if p.suffix == ".seed":
            assert p.read_text().strip() not in caplog.text
            assert p.read_text().strip() not in repr(trust)

    again = OperatorTrust.load_or_create(tmp_path / "nats")
    assert (again.operator_key, again.system_account, again.fleet_account) == (
        trust.operator_key,
        trust.system_account,
        trust.fleet_account,
    )
    assert again.fleet_jwt == trust.fleet_jwt and again.operator_jwt == trust.operator_jwt

    op = jwt.decode(trust.operator_jwt, jwt.OperatorClaims)
    assert op.nats.system_account == trust.system_account
    fleet = jwt.decode(trust.fleet_jwt, jwt.AccountClaims)
    assert fleet.iss == trust.operator_key
    assert fleet.nats.signing_keys == [trust.fleet_signing_key]
    assert fleet.nats.limits.disk_storage != 0  # JetStream on for the fleet
    system = jwt.decode(trust.system_jwt, jwt.AccountClaims)
    assert system.nats.limits.disk_storage == 0


def test_server_config_fragment(tmp_path: Path) -> None:
    trust = OperatorTrust.load_or_create(tmp_path / "nats")
    conf = trust.server_config()
    assert conf["operator"] == trust.operator_jwt
    assert conf["system_account"] == trust.system_account
    assert conf["resolver"] == {
        "type": "full",
        "dir": str((tmp_path / "nats" / "jwt").resolve()),
        "allow_delete": False,
        "interval": "2m",
    }
    assert conf["resolver_preload"] == {
        trust.system_account: trust.system_jwt,
        trust.fleet_account: trust.fleet_jwt,
    }
    assert "authorization" not in conf and "accounts" not in conf


def test_user_jwts_and_creds(tmp_path: Path) -> None:
    trust = OperatorTrust.load_or_create(tmp_path / "nats", clock=lambda: 1_000_000.0)
    node = jwt.public_key(jwt.new_seed("user"))
    token = trust.user_jwt(
        node, name="n1", permissions=Permissions(pub_allow=("a.>",), sub_allow=("b",)), ttl=60
    )
    claims = jwt.decode(token, jwt.UserClaims, clock=lambda: 1_000_030.0)
    assert claims.exp == 1_000_060 and claims.iat == 1_000_000
    assert claims.iss == trust.fleet_signing_key
    assert claims.nats.issuer_account == trust.fleet_account
    assert claims.nats.pub.allow == ["a.>"] and claims.nats.sub.allow == ["b"]
    assert claims.nats.resp is None and not claims.nats.bearer_token
    jwt.check_user_issuer(claims, jwt.decode(trust.fleet_jwt, jwt.AccountClaims))

    own = trust.new_user(name="controller", permissions=Permissions())
    got_jwt, got_seed = jwt.parse_creds(own.creds)
    assert got_jwt == own.jwt and jwt.public_key(got_seed) == own.public_key
    assert got_seed not in repr(own)
    assert jwt.decode(own.jwt, jwt.UserClaims).exp == 0

    sys_user = trust.system_user()
    sys_claims = jwt.decode(sys_user.jwt, jwt.UserClaims)
    assert sys_claims.iss == trust.system_account and sys_claims.nats.issuer_account == ""

    perms = Permissions.from_config(
        {"publish": {"allow": ["x.>"], "deny": ["y"]}, "subscribe": {"allow": ["z"]}}
    )
    assert perms == Permissions(pub_allow=("x.>",), pub_deny=("y",), sub_allow=("z",))


def test_revocation_persists_and_blocks_renewal(tmp_path: Path) -> None:
    now = [2_000_000.0]
    trust = OperatorTrust.load_or_create(tmp_path / "nats", clock=lambda: now[0])
    a, b = (jwt.public_key(jwt.new_seed("user")) for _ in range(2))
    before = jwt.decode(trust.fleet_jwt, jwt.AccountClaims)
    first = trust.revoke(a)
    second = trust.revoke(b)  # same second: the iat still grows
    c1, c2 = (jwt.decode(t, jwt.AccountClaims) for t in (first, second))
    assert before.iat < c1.iat < c2.iat and c1.jti != c2.jti
    assert c2.nats.revocations == {a: 2_000_000, b: 2_000_000}
    with pytest.raises(RevokedUser):
        trust.user_jwt(a, name="a", permissions=Permissions())
    with pytest.raises(TrustError):
        trust.revoke("not-a-key")

    again = OperatorTrust.load_or_create(tmp_path / "nats")
    assert again.fleet_jwt == second and again.is_revoked(a) and again.is_revoked(b)
    assert trust.server_config()["resolver_preload"] == {
        trust.system_account: trust.system_jwt,
        trust.fleet_account: second,
    }


def test_a_readable_seed_or_a_foreign_jwt_is_refused(tmp_path: Path) -> None:
    OperatorTrust.load_or_create(tmp_path / "nats")
    tdir = OperatorTrust.trust_dir(tmp_path / "nats")
    os.chmod(tdir / "fleet.seed", 0o644)
    with pytest.raises(TrustError, match="readable by others"):
        OperatorTrust.load_or_create(tmp_path / "nats")
    os.chmod(tdir / "fleet.seed", 0o600)
    other = OperatorTrust.load_or_create(tmp_path / "other")
    (tdir / "fleet.jwt").write_text(other.fleet_jwt)
    with pytest.raises(TrustError, match="does not belong"):
        OperatorTrust.load_or_create(tmp_path / "nats")


def test_merge_takes_the_union_of_shared_revocations(tmp_path: Path) -> None:
    """controller.nats.account's shared state merged into a trust: revocations only grow
    (the later time wins), bad keys are skipped, and the JWT is re-signed only on a change."""
    from controller.nats.account import FleetAccount, merged

    trust = OperatorTrust.load_or_create(tmp_path / "nats")
    mine, theirs, bad = (jwt.public_key(jwt.new_seed("user")) for _ in range(3))
    trust.revoke(mine)
    at = trust.revocations[mine]
    before = trust.fleet_jwt
    assert trust.merge({theirs: 100, mine: at - 50, bad[:-1] + "?": 5}) is True
    assert trust.revocations == {mine: at, theirs: 100}
    assert trust.is_revoked(theirs) and trust.fleet_jwt != before
    claims = jwt.decode(trust.fleet_jwt, jwt.AccountClaims)
    assert claims.nats.revocations == {mine: at, theirs: 100}
    assert claims.nats.signing_keys == [trust.fleet_signing_key]
    # the file is the new JWT too (the embedded server's preload), still 0600
    fleet_file = OperatorTrust.trust_dir(tmp_path / "nats") / "fleet.jwt"
    assert fleet_file.read_text().strip() == trust.fleet_jwt and _mode(fleet_file) == 0o600
    # nothing new: no re-signing
    same = trust.fleet_jwt
    assert trust.merge({theirs: 99}, [trust.fleet_signing_key]) is False
    assert trust.fleet_jwt == same
    # a signing key another controller shares joins the account's
    other_key = jwt.public_key(jwt.new_seed("account"))
    assert trust.merge({}, [other_key]) is True
    assert sorted(trust.signing_keys) == sorted([trust.fleet_signing_key, other_key])

    record = merged(FleetAccount(revocations={theirs: 200}), {theirs: 150, mine: 1}, [other_key])
    assert record == FleetAccount(revocations={theirs: 200, mine: 1}, signing_keys=[other_key])
    assert merged(None, {}, []) == FleetAccount()


def test_lacks_tells_a_pushed_jwt_that_drops_a_revocation(tmp_path: Path) -> None:
    trust = OperatorTrust.load_or_create(tmp_path / "nats")
    stale = trust.fleet_jwt
    x, y = (jwt.public_key(jwt.new_seed("user")) for _ in range(2))
    trust.revoke(x)
    assert trust.lacks(stale) is True
    assert trust.lacks(trust.fleet_jwt) is False
    # another's JWT with more revocations: taken in, and it drops nothing of ours
    other = OperatorTrust.load_or_create(tmp_path / "nats")
    other.revoke(y)
    assert trust.lacks(other.fleet_jwt) is False and trust.is_revoked(y)
    # not this operator's account, or not a JWT at all: ignored
    foreign = jwt.encode(jwt.account_claims(trust.fleet_account), jwt.new_seed("operator"))
    assert trust.lacks(foreign) is None and trust.lacks("garbage") is None
    assert trust.lacks(trust.system_jwt) is None
