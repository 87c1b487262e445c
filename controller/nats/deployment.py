"""An external NATS deployment in barista's operator mode (``barista nats init``): the trust
(the same trust dir format as the embedded server's), the controller's .creds, and the
include file every nats-server (>= 2.10) of the deployment adds to its config.

The directory it writes (``out``):

- ``trust/`` -- operator, system and fleet account keys (seeds 0600, dir 0700) and JWTs;
  only the controller needs it (it signs node JWTs and revocations with it);
- ``creds/`` -- the controller's state, peer-facing and system users (.creds, 0600);
- ``server/barista.conf`` -- for each nats-server: ``operator``, ``system_account``,
  ``resolver_preload`` (and ``resolver`` when a resolver dir is given); no secret in it;
- ``routes/`` (0700) -- TLS for the cluster's routes: ``route.pem`` and ``route-key.pem``
  (0600, a secret: only the servers get it), signed by the CA (``tls/`` here, or a
  controller's with ``--ca-dir``), ``ca.pem``, and ``cluster-tls.conf``, the block each
  server includes inside its ``cluster { }``. nats-server makes route TLS mutual: a server
  joins the cluster only with a certificate of that CA (and plain routes are refused).

Re-running it keeps every key (a seed is never replaced) and writes the include file
again from the current JWTs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from agent.files import write_private
from controller.nats.identities import ControllerIdentities
from controller.nats.operator import OperatorTrust, resolver_block
from protocol.subjects import Subjects

INCLUDE_NAME = "barista.conf"
# Included inside each server's cluster block (route TLS, mutual).
CLUSTER_TLS_NAME = "cluster-tls.conf"
ROUTE_TLS_TIMEOUT = 2.0
# NATS operator mode arrived in 2.2; barista relies on 2.10's full resolver behaviour.
MIN_NATS_SERVER = "2.10"


@dataclass(frozen=True)
class Deployment:
    """What ``init_deployment`` wrote."""

    out: Path
    trust: OperatorTrust
    identities: ControllerIdentities
    include_file: Path
    resolver_dir: str

    @property
    def trust_dir(self) -> Path:
        return OperatorTrust.trust_dir(self.out)


def init_deployment(
    out: Path,
    *,
    operator_name: str = "barista",
    subjects: Subjects | None = None,
    resolver_dir: str = "",
) -> Deployment:
    """Make (or load) the trust in ``out``, the controller's users and the servers'
    include file. ``resolver_dir``: the directory each server keeps account JWTs in, put
    into the include file when given (all servers then use the same path)."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    trust = OperatorTrust.load_or_create(out, name=operator_name)
    identities = ControllerIdentities.make(
        trust, subjects or Subjects(), out / "creds", reuse=True)
    server_dir = out / "server"
    server_dir.mkdir(exist_ok=True)
    os.chmod(server_dir, 0o755)  # copied to the servers; nothing secret in it
    include = server_dir / INCLUDE_NAME
    text = include_text(trust, resolver_dir=resolver_dir)
    write_private(include, text.encode())
    os.chmod(include, 0o644)
    return Deployment(out=out, trust=trust, identities=identities, include_file=include,
                      resolver_dir=resolver_dir)


def include_text(trust: OperatorTrust, *, resolver_dir: str = "") -> str:
    """The include file of every server: nats-server's config syntax, values JSON-quoted
    (which it reads). Without ``resolver_dir`` the server's own config holds the resolver
    block (``resolver_snippet``), one directory per server."""
    conf = trust.server_config(resolver_dir=resolver_dir or "unused")
    lines = [
        "# barista: NATS operator mode, written by `barista nats init`. The same on every",
        f"# server of the deployment (nats-server >= {MIN_NATS_SERVER}); no secret in it.",
        "# Operator mode refuses config users: no authorization, accounts or no_auth_user",
        "# blocks may stand next to it.",
        f"operator: {json.dumps(conf['operator'])}",
        f"system_account: {json.dumps(conf['system_account'])}",
    ]
    if resolver_dir:
        lines.append(f"resolver: {json.dumps(conf['resolver'])}")
    lines.append("resolver_preload: {")
    preload = conf["resolver_preload"]
    assert isinstance(preload, dict)
    for account, account_jwt in preload.items():
        lines.append(f"  {json.dumps(account)}: {json.dumps(account_jwt)}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def resolver_snippet(directory: str) -> str:
    """The resolver block a server's own config adds (its own directory for account JWTs:
    the full resolver keeps them, revocations too, and syncs them across the cluster)."""
    return f"resolver: {json.dumps(resolver_block(directory))}"


def cluster_tls_text(*, cert_file: str, key_file: str, ca_file: str) -> str:
    """The route TLS block every server includes inside its ``cluster { }`` block (paths as
    they are on the servers). With TLS on routes nats-server checks certificates in both
    directions (the accepting server verifies the connecting one's against ``ca_file``
    too: NATS's docs, "TLS Authentication" for clusters); ``verify: true`` says so here as
    well. The host in each route URL must be one of the certificate's names."""
    lines = [
        "# barista: TLS for cluster routes, written by `barista nats init`. Include it inside",
        "# the cluster block of every server (cluster { ...  include cluster-tls.conf }):",
        "# only servers with a certificate of this CA can join the cluster. No secret in this",
        "# file; the key it names is one (0600, on the servers only).",
        "tls {",
        f"  cert_file: {json.dumps(cert_file)}",
        f"  key_file: {json.dumps(key_file)}",
        f"  ca_file: {json.dumps(ca_file)}",
        "  verify: true",
        f"  timeout: {ROUTE_TLS_TIMEOUT}",
        "}",
    ]
    return "\n".join(lines) + "\n"
