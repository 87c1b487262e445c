"""`barista nats init`: barista's operator mode for an existing NATS deployment, so that
nodes are isolated there (each its own JWT) as on the embedded server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

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
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
def init(out: Path, operator_name: str, resolver_dir: str, subject_prefix: str,
         output: str) -> None:
    """Write the operator and account JWTs, the resolver config, the server include file and
    the controller's credentials into OUT. Idempotent: a re-run keeps every key."""
    from controller.nats.deployment import (
        INCLUDE_NAME,
        MIN_NATS_SERVER,
        init_deployment,
        resolver_snippet,
    )
    from controller.nats.operator import TrustError
    from protocol.subjects import Subjects

    try:
        dep = init_deployment(out, operator_name=operator_name,
                              subjects=Subjects(subject_prefix), resolver_dir=resolver_dir)
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
   accounts and no_auth_user blocks (operator mode refuses config users). Restart it.
2. Start the controller against it (with state R3 on a 3+ server cluster, optional):
     barista server --nats-url nats://HOST:4222 --nats-trust """ + str(dep.out)
               + """ [--stream-replicas 3]
   It signs each node's JWT and pushes revocations through the system account.
3. Separate ingest processes: barista ingest --nats-url ... --nats-creds """
               + str(dep.identities.creds_path("state")))
