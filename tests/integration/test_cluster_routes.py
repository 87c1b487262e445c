"""The cluster's routes (issue 10): `barista nats init` writes a route certificate signed by
the deployment's CA and the TLS block each server includes inside its cluster block; the
3-server fixture cluster runs with it. A 4th nats-server with plain routes, or with a route
certificate of another CA, stays out of the cluster; one with the deployment's certificate
joins (the control that shows the 4th server's config would work otherwise).

Routes are read over the system account on the servers' loopback client ports (ROUTEZ):
no monitoring port is opened.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest

from controller.nats.deployment import CLUSTER_TLS_NAME, cluster_tls_text
from controller.nats.server import free_port
from controller.tls import route_tls
from tests.fixtures.nats_cluster import ClusterServer, NatsCluster
from tests.fixtures.wait import wait_for_blocking

# How long a server that must stay out is watched after it first tried to join.
WATCH_OUT = 3.0


def _route_peers(cluster: NatsCluster, server: ClusterServer) -> set[str]:
    return {str(r.get("remote_name", "")) for r in cluster.routes(server)}


def _handshake(port: int, ca_file: Path, client: tuple[Path, Path] | None) -> str:
    """A TLS handshake with a route port (as a connecting route would), "ok" or the error."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca_file))
    if client is not None:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock, \
                ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls_sock:
            # TLS 1.3: a refused client certificate shows at the first read.
            tls_sock.settimeout(1.0)
            try:
                tls_sock.recv(1)
            except TimeoutError:
                pass
        return "ok"
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"


def test_the_clusters_routes_are_tls_both_ways(nats_cluster: NatsCluster) -> None:
    """Each member already routes to the other two; a route port accepts a handshake only
    from a client holding a certificate of the deployment's CA."""
    routes = nats_cluster.deployment / "routes"
    names = {s.name for s in nats_cluster.servers}
    for server in nats_cluster.servers:
        assert _route_peers(nats_cluster, server) == names - {server.name}
    port = nats_cluster.servers[0].route_port
    ca = routes / "ca.pem"
    assert _handshake(port, ca, (routes / "route.pem", routes / "route-key.pem")) == "ok"
    refused = _handshake(port, ca, None)
    assert refused != "ok" and "certificate" in refused.lower(), refused


@pytest.mark.parametrize("kind", ["plain", "other-ca", "deployment"])
def test_a_server_without_the_route_certificate_stays_out(
    nats_cluster: NatsCluster, tmp_path: Path, kind: str
) -> None:
    cluster = nats_cluster
    members = {s.name for s in cluster.servers}
    newcomer = ClusterServer(name=f"{cluster.prefix}-{kind}", port=free_port(),
                             route_port=free_port(), dir=tmp_path / "newcomer")
    routes_dir: Path | None = None
    if kind == "other-ca":
        # A route certificate as good as the deployment's, but of another CA.
        other = route_tls(tmp_path / "other" / "routes", ca_dir=tmp_path / "other" / "tls")
        (other.dir / CLUSTER_TLS_NAME).write_text(cluster_tls_text(
            cert_file=str(other.cert_file), key_file=str(other.key_file),
            ca_file=str(other.ca_file)))
        routes_dir = other.dir
    logs = {s.name: s.log_path.stat().st_size for s in cluster.servers}

    def tried() -> bool:
        """A member logged a route handshake it refused since the newcomer started."""
        for s in cluster.servers:
            with open(s.log_path, "rb") as f:
                f.seek(logs[s.name])
                text = f.read().decode(errors="replace")
            if "TLS route handshake error" in text or "TLS Handshake Failure" in text:
                return True
        return False

    try:
        cluster.start(newcomer, route_tls=kind != "plain", routes_dir=routes_dir)
        if kind == "deployment":
            wait_for_blocking(
                lambda: all(newcomer.name in _route_peers(cluster, s) for s in cluster.servers),
                15, "the server with the deployment's route certificate to join")
            assert _route_peers(cluster, newcomer) == members
            return
        # (or to get in: then the checks below say so)
        wait_for_blocking(
            lambda: tried() or any(newcomer.name in _route_peers(cluster, s)
                                   for s in cluster.servers),
            15, "the newcomer to try to route to the cluster")
        deadline = time.monotonic() + WATCH_OUT
        while time.monotonic() < deadline:
            for s in cluster.servers:
                # still the full mesh of the three, and nothing more
                assert _route_peers(cluster, s) == members - {s.name}, s.name
            assert cluster.routes(newcomer) == []
            assert newcomer.proc is not None and newcomer.proc.poll() is None
            time.sleep(0.25)
        log = newcomer.log_path.read_text(errors="replace")
        print(f"{kind}: kept out; newcomer's log says: "
              f"{[ln for ln in log.splitlines() if 'route' in ln.lower()][-2:]}")
    finally:
        cluster.stop(newcomer)
