"""Join tokens that pin the CA, and the pin check (protocol/trust.py), plus the controller's
CA and server certificate (controller/tls.py)."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from controller.tls import ControllerTLS
from protocol.trust import (
    JoinToken,
    TrustError,
    ca_fingerprint,
    normalize_pin,
    parse_join_token,
    pinned_ca,
)

PIN = "0f" * 32
SECRET = "A" * 43


def test_token_forms_round_trip():
    pinned = JoinToken(token_id="0123456789abcdef", secret=SECRET, ca_sha256=PIN)
    assert str(pinned) == f"bt2.{PIN}.0123456789abcdef.{SECRET}"
    assert parse_join_token(str(pinned)) == pinned
    plain = JoinToken(token_id="0123456789abcdef", secret=SECRET)
    assert str(plain) == f"bt1.0123456789abcdef.{SECRET}"
    assert parse_join_token(str(plain)) == plain


@pytest.mark.parametrize("bad", [
    "", "garbage", "bt1.zz.short", f"bt2.{PIN[:-1]}.0123456789abcdef.{SECRET}",
    f"bt2.{PIN.upper()}.0123456789abcdef.{SECRET}", f"bt2.0123456789abcdef.{SECRET}",
    f" bt1.0123456789abcdef.{SECRET}",
])
def test_malformed_tokens(bad: str):
    assert parse_join_token(bad) is None


def test_normalize_pin():
    assert normalize_pin("sha256:" + ":".join(["AB"] * 32)) == "ab" * 32
    with pytest.raises(ValueError):
        normalize_pin("abc")


def test_pinned_ca_picks_the_pinned_certificate_or_names_both_hashes():
    leaf, ca = b"leaf-der", b"ca-der"
    assert pinned_ca([leaf, ca], ca_fingerprint(ca), where="x") == ca
    with pytest.raises(TrustError) as err:
        pinned_ca([leaf, ca], PIN, where="the server")
    assert PIN in str(err.value) and ca_fingerprint(ca) in str(err.value)
    assert err.value.found == (ca_fingerprint(leaf), ca_fingerprint(ca))
    with pytest.raises(TrustError, match="no certificate at all"):
        pinned_ca([], PIN, where="the server")


def test_controller_ca_is_made_once_and_the_server_cert_follows_the_names(tmp_path: Path):
    first = ControllerTLS.load_or_create(tmp_path, names=["ctl.example.com", "10.1.2.3"])
    assert {"127.0.0.1", "::1", "localhost", "ctl.example.com", "10.1.2.3"} <= set(first.names)
    for name in ("ca-key.pem", "server-key.pem"):
        assert stat.S_IMODE((first.dir / name).stat().st_mode) == 0o600
    ca_der = ssl.PEM_cert_to_DER_cert(first.ca_file.read_text())
    assert first.ca_sha256 == ca_fingerprint(ca_der)
    chain = x509.load_pem_x509_certificates(first.cert_file.read_bytes())
    assert len(chain) == 2 and chain[1] == x509.load_der_x509_certificate(ca_der)
    cert_before = first.cert_file.read_bytes()
    same = ControllerTLS.load_or_create(tmp_path, names=["ctl.example.com", "10.1.2.3"])
    assert same.ca_sha256 == first.ca_sha256 and first.cert_file.read_bytes() == cert_before
    # New names: a new server certificate from the same CA (pins stay valid).
    renamed = ControllerTLS.load_or_create(tmp_path, names=["other.example.com"])
    assert renamed.ca_sha256 == first.ca_sha256
    assert renamed.cert_file.read_bytes() != cert_before
    # Both contexts load, and the client one verifies the server certificate.
    renamed.server_context()
    ctx = renamed.client_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
