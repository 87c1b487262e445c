"""The controller's own CA and server certificate, made at first start in the data dir.

``<data_dir>/tls/``: ``ca.pem`` (public), ``ca-key.pem`` and ``server-key.pem`` (0600),
``server.pem`` (the server certificate followed by the CA, so that a TLS handshake hands
the CA to a client that pins it). The CA lives ten years; the server certificate one year
and is made again when it nears expiry or when its names change (``tls_names``), signed by
the same CA, so pins in join tokens stay valid.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.files import write_private
from protocol.trust import ca_fingerprint

log = logging.getLogger("barista.controller.tls")

CA_DAYS = 3650
SERVER_DAYS = 365
# Renew the server certificate when less than this is left of it.
RENEW_BEFORE = datetime.timedelta(days=30)

def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def default_names(extra: Iterable[str] = ()) -> list[str]:
    """The server certificate's names: loopback, the hostname, and ``extra`` (names or IPs)."""
    names = ["127.0.0.1", "::1", "localhost"]
    for name in (socket.gethostname(), socket.getfqdn(), *extra):
        name = name.strip()
        if name and name not in names:
            names.append(name)
    return names


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _san_strings(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    dns: list[str] = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    return set(dns) | {str(ip) for ip in ips}


@dataclass(frozen=True)
class ControllerTLS:
    """Paths of the CA and server certificate, and the CA's pin."""

    dir: Path
    ca_sha256: str
    names: tuple[str, ...]

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.dir / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.dir / "server-key.pem"

    @classmethod
    def load_or_create(cls, data_dir: Path, *, names: Iterable[str] = ()) -> ControllerTLS:
        """The CA (made once, then kept) and a server certificate for ``default_names``."""
        tls_dir = data_dir / "tls"
        tls_dir.mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key = _load_or_make_ca(tls_dir)
        wanted = default_names(names)
        _ensure_server_cert(tls_dir, ca_cert, ca_key, wanted)
        return cls(
            dir=tls_dir,
            ca_sha256=ca_fingerprint(ca_cert.public_bytes(serialization.Encoding.DER)),
            names=tuple(wanted),
        )

    def server_context(self) -> ssl.SSLContext:
        """For the API: serve the server certificate (and the CA after it)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """For the controller's own connections: trust this CA only."""
        return trust_only(self.ca_file.read_bytes())


def trust_only(ca_pem_or_der: bytes) -> ssl.SSLContext:
    """A client context that trusts exactly one CA (PEM or DER) and checks host names."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_pem_or_der.lstrip().startswith(b"-----"):
        ctx.load_verify_locations(cadata=ca_pem_or_der.decode())
    else:
        ctx.load_verify_locations(cadata=ca_pem_or_der)
    return ctx


def fetch_chain(host: str, port: int, timeout: float = 10.0) -> list[bytes]:
    """The certificates (DER) a TLS server presents, verified or not, for a client that
    pins a CA by its hash: only the handshake goes over this connection (blocking)."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=timeout) as sock, \
            probe.wrap_socket(sock, server_hostname=host) as tls_sock:
        public = getattr(tls_sock, "get_unverified_chain", None)
        if public is not None:  # Python 3.13
            return list(public() or [])
        raw = tls_sock._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in raw or []]  # type: ignore[attr-defined]


def _load_or_make_ca(tls_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = tls_dir / "ca.pem", tls_dir / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC private key")
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "barista controller CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    # The key first: a CA certificate without its key would be made again, differently.
    write_private(key_path, _key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    cert_path.chmod(0o644)
    log.info("made the controller CA (%s)", cert_path)
    return cert, key


@dataclass(frozen=True)
class RouteTLS:
    """A NATS cluster's route certificate (``barista nats init``) and the CA it chains to."""

    dir: Path
    names: tuple[str, ...]

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.dir / "route.pem"

    @property
    def key_file(self) -> Path:
        return self.dir / "route-key.pem"


def route_tls(out_dir: Path, *, ca_dir: Path, names: Iterable[str] = ()) -> RouteTLS:
    """The certificate every server of a NATS cluster presents on its routes, signed by the
    CA in ``ca_dir`` (a controller's ``<data_dir>/tls``, or one made there when missing).
    nats-server makes route TLS mutual (each side verifies the other's certificate against
    ``ca_file``), so holding a certificate of this CA is what lets a server join the
    cluster. Usable as server and as client; for ``default_names(names)`` (the hosts in the
    servers' route URLs, and those it had: names are only added). Kept while it fits, made
    again otherwise (same CA)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir.chmod(0o700)
    if not ca_dir.exists():  # a controller's tls dir keeps the modes it has
        ca_dir.mkdir(parents=True, mode=0o700)
    ca_cert, ca_key = _load_or_make_ca(ca_dir)
    wanted = default_names(names)
    try:  # names are only ever added: a re-run without them keeps the servers' names
        current = x509.load_pem_x509_certificate((out_dir / "route.pem").read_bytes())
        if current.issuer == ca_cert.subject:
            wanted += sorted(_san_strings(current) - set(wanted))
    except (OSError, ValueError):
        pass
    _ensure_server_cert(out_dir, ca_cert, ca_key, wanted, stem="route",
                        common_name="barista NATS route", client_auth=True)
    ca_copy = out_dir / "ca.pem"
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    if not ca_copy.exists() or ca_copy.read_bytes() != ca_pem:
        write_private(ca_copy, ca_pem)
        ca_copy.chmod(0o644)
    return RouteTLS(dir=out_dir, names=tuple(wanted))


def _ensure_server_cert(
    tls_dir: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
    names: list[str], *, stem: str = "server", common_name: str = "barista controller",
    client_auth: bool = False,
) -> None:
    cert_path, key_path = tls_dir / f"{stem}.pem", tls_dir / f"{stem}-key.pem"
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if client_auth:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    if cert_path.exists() and key_path.exists():
        try:
            current = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            current = None
        if (
            current is not None
            and current.issuer == ca_cert.subject
            and current.not_valid_after_utc - RENEW_BEFORE > _now()
            and _san_strings(current) == set(names)
            and _usages(current) == set(usages)
            and cert_path.read_bytes().endswith(ca_pem)
        ):
            return
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    # The chain: a client pinning the CA finds it in the handshake.
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    cert_path.chmod(0o644)
    log.info("made the %s certificate for %s", stem, ", ".join(names))


def _usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()
