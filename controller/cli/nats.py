"""`barista nats init`: barista's operator mode for an existing NATS deployment, so that
nodes are isolated there (each its own JWT) as on the embedded server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from agent.files import write_private
from controller.cli.common import emit_json


@click.group("nats")
def nats_group() -> None:
    """An external NATS deployment (nats-server >= 2.10) in barista's operator mode."""


@nats_group.command("init")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="directory for the trust, the controller's creds and the server include")
@click.option("--operator-name", default="barista", show_default=True,
              help="the NATS operator's (and fleet account's) name")
@click.option("--resolver-dir", default="",
              help="each server's directory for account JWTs, put into the include file "
              "(default: each server's own config names its own)")
@click.option("--subject-prefix", default="barista", show_default=True,
              help="the controller's subject prefix (the controller's users' permissions)")
@click.option("--route-host", "route_hosts", multiple=True,
              help="a host name or IP the servers' route URLs use (repeatable): a name of the "
              "route certificate, besides loopback and this machine's names")
@click.option("--ca-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="the CA that signs the route certificate: a controller's DATA_DIR/tls "
              "(ca.pem, ca-key.pem); default OUT/tls, made when missing")
@click.option("--route-files-dir", default="",
              help="where the route certificate files are on each server, as cluster-tls.conf "
              "names them (default: OUT/routes)")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def init(out: Path, operator_name: str, resolver_dir: str, subject_prefix: str,
         route_hosts: tuple[str, ...], ca_dir: Path | None, route_files_dir: str,
         output: str) -> None:
    """Write the operator and account JWTs, the resolver config, the server include file,
    the controller's credentials and TLS for the cluster's routes into OUT. Idempotent: a
    re-run keeps every key (a route certificate is made again only for new names)."""
    from controller.nats.deployment import (
        CLUSTER_TLS_NAME,
        INCLUDE_NAME,
        MIN_NATS_SERVER,
        cluster_tls_text,
        init_deployment,
        resolver_snippet,
    )
    from controller.nats.operator import TrustError
    from controller.tls import route_tls
    from protocol.subjects import Subjects

    try:
        dep = init_deployment(out, operator_name=operator_name,
                              subjects=Subjects(subject_prefix), resolver_dir=resolver_dir)
        routes = route_tls(dep.out / "routes", ca_dir=(ca_dir or dep.out / "tls").resolve(),
                           names=route_hosts)
        files = Path(route_files_dir) if route_files_dir else routes.dir
        cluster_include = routes.dir / CLUSTER_TLS_NAME
        write_private(cluster_include, cluster_tls_text(
            cert_file=str(files / routes.cert_file.name),
            key_file=str(files / routes.key_file.name),
            ca_file=str(files / routes.ca_file.name)).encode())
        cluster_include.chmod(0o644)
    except (TrustError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    resolver = resolver_snippet(resolver_dir or "/var/lib/nats/jwt")
    if output == "json":
        data: dict[str, Any] = {
            "out": str(dep.out),
            "trust_dir": str(dep.trust_dir),
            "include_file": str(dep.include_file),
            "creds": {role: str(dep.identities.creds_path(role))
                      for role in ("state", "peers", "sys")},
            "operator": dep.trust.operator_key,
            "system_account": dep.trust.system_account,
            "fleet_account": dep.trust.fleet_account,
            "resolver_in_include": bool(resolver_dir),
            "routes": {"dir": str(routes.dir), "include_file": str(cluster_include),
                       "names": list(routes.names)},
        }
        emit_json(data)
        return
    click.echo(f"""NATS operator mode for barista written to {dep.out}
  operator        {dep.trust.operator_key}
  system account  {dep.trust.system_account}
  fleet account   {dep.trust.fleet_account}
  {dep.trust_dir}/   keys and JWTs: keep private, only the controller needs it
  {dep.identities.creds_dir}/   the controller's users (state, peers, sys .creds, 0600)
  {dep.include_file}   for every nats-server (no secret in it)

1. On each nats-server (>= {MIN_NATS_SERVER}) of the deployment: copy {INCLUDE_NAME} next to its
   config file (nats-server resolves include paths relative to the including file) and add
     include {INCLUDE_NAME}""")
    if not resolver_dir:
        click.echo(f"""     {resolver}
   with that server's own directory for account JWTs.""")
    click.echo("""   Keep JetStream on (jetstream { store_dir: ... }); remove any authorization,
   accounts and no_auth_user blocks (operator mode refuses config users). Restart it.""")
    ca_shown = (ca_dir or dep.out / "tls").resolve()
    click.echo(f"""   A cluster: copy {routes.dir}/
   (route.pem, ca.pem, and route-key.pem: a secret) to each server, at
     {files}/
   where {CLUSTER_TLS_NAME} names them, and {CLUSTER_TLS_NAME} next to its config;
   inside its cluster block add
     include {CLUSTER_TLS_NAME}
   Routes are then TLS both ways: a server joins only with a certificate of the CA in
   {ca_shown}; route URLs must use one of
     {", ".join(routes.names)}
   (more with --route-host).""")
    click.echo(f"""2. Start the controller against it (state R3 on a 3+ server cluster: optional):
     barista server --nats-url nats://HOST:4222 --nats-trust {dep.out} [--stream-replicas 3]
   It signs each node's JWT and pushes revocations through the system account.
3. Separate ingest processes: barista ingest --nats-url ... --nats-creds \
{dep.identities.creds_path("state")}""")
