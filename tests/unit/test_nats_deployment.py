"""`barista nats init`'s pieces without a server: the controller's NATS users in a creds dir
(kept while they fit, made again when not), the include file, and the config checks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from controller.config import ControllerConfig
from controller.errors import ConfigError
from controller.nats import jwt
from controller.nats.deployment import include_text, init_deployment
from controller.nats.identities import ROLES, ControllerIdentities
from controller.nats.operator import OperatorTrust, Permissions, TrustError
from controller.nats.permissions import peers_permissions
from protocol.subjects import Subjects


def _creds(dir: Path) -> dict[str, str]:
    return {role: (dir / f"{role}.creds").read_text() for role in ROLES}


def test_identities_are_kept_while_they_fit(tmp_path: Path) -> None:
    trust = OperatorTrust.load_or_create(tmp_path / "dep")
    made = ControllerIdentities.make(trust, Subjects(), tmp_path / "creds", reuse=True)
    before = _creds(tmp_path / "creds")
    again = ControllerIdentities.make(trust, Subjects(), tmp_path / "creds", reuse=True)
    assert _creds(tmp_path / "creds") == before
    assert again.enroll_jwt and made.enroll_jwt
    token, seed = again.credentials("peers")
    claims = jwt.decode(token, jwt.UserClaims)
    assert claims.iss == trust.fleet_signing_key and jwt.public_key(seed) == claims.sub
    assert claims.nats.pub.deny == peers_permissions(Subjects())["publish"]["deny"]
    sys_claims = jwt.decode(again.credentials("sys")[0], jwt.UserClaims)
    assert sys_claims.iss == trust.system_account and claims.exp == 0
    # embedded servers make new ones at every start
    ControllerIdentities.make(trust, Subjects(), tmp_path / "creds", reuse=False)
    assert all(_creds(tmp_path / "creds")[r] != before[r] for r in ROLES)


def test_identities_that_do_not_fit_are_made_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    trust = OperatorTrust.load_or_create(tmp_path / "dep")
    other = OperatorTrust.load_or_create(tmp_path / "other")
    cdir = tmp_path / "creds"
    ControllerIdentities.make(other, Subjects(), cdir, reuse=False)
    foreign = _creds(cdir)
    ControllerIdentities.make(trust, Subjects(), cdir, reuse=True)
    assert all(_creds(cdir)[r] != foreign[r] for r in ROLES)
    assert "is not signed by this trust's fleet account" in caplog.text
    assert "is not signed by this trust's system account" in caplog.text
    # a peer user with other permissions (all of the account) is not kept
    kept = _creds(cdir)
    broad = trust.new_user(name="controller-peers", permissions=Permissions())
    (cdir / "peers.creds").write_text(broad.creds)
    ControllerIdentities.make(trust, Subjects(), cdir, reuse=True)
    now = _creds(cdir)
    assert now["peers"] not in (kept["peers"], broad.creds) and now["state"] == kept["state"]
    assert "other permissions than this subject prefix needs" in caplog.text
    # a file readable by others, and a revoked user
    os.chmod(cdir / "state.creds", 0o644)
    trust.revoke(jwt.decode(jwt.parse_creds(now["peers"])[0], jwt.UserClaims).sub)
    ControllerIdentities.make(trust, Subjects(), cdir, reuse=True)
    after = _creds(cdir)
    assert after["state"] != now["state"] and after["peers"] != now["peers"]
    assert (cdir / "state.creds").stat().st_mode & 0o077 == 0
    for record in caplog.records:  # no seed in any log line
        for text in after.values():
            assert jwt.parse_creds(text)[1] not in record.getMessage()


def test_load_refuses_a_dir_without_trust(tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="barista nats init --out"):
        OperatorTrust.load(tmp_path / "empty")
    OperatorTrust.load_or_create(tmp_path / "dep")
    (tmp_path / "dep" / "trust" / "fleet.jwt").unlink()
    with pytest.raises(TrustError, match=r"missing fleet\.jwt"):
        OperatorTrust.load(tmp_path / "dep")


def test_include_file_preloads_the_current_fleet_jwt(tmp_path: Path) -> None:
    dep = init_deployment(tmp_path / "dep")
    first = dep.include_file.read_text()
    assert dep.trust.fleet_jwt in first
    user = jwt.public_key(jwt.new_seed("user"))
    revoked = dep.trust.revoke(user)
    again = init_deployment(tmp_path / "dep")
    assert revoked in again.include_file.read_text() and again.trust.is_revoked(user)
    assert include_text(again.trust) == again.include_file.read_text()
    assert (dep.include_file.stat().st_mode & 0o777) == 0o644  # copied to servers


def test_config_checks_trust_and_replicas() -> None:
    with pytest.raises(ConfigError, match="nats_trust is for an external NATS"):
        ControllerConfig.load(None, {"nats_trust": "/x"})
    with pytest.raises(ConfigError, match="stream_replicas"):
        ControllerConfig.load(None, {"stream_replicas": 7})
    cfg = ControllerConfig.load(None, {"nats_url": "nats://h:4222", "nats_trust": "/x",
                                       "stream_replicas": 3})
    assert cfg.nats_trust == "/x" and cfg.stream_replicas == 3
