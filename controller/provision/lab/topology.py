"""Building and removing the lab's network: region namespaces with their bridges, the
private sites' NAT, the gateway link to the host, and the WAN router process.

Namespaces (``P`` = the lab prefix):

- ``P-r<k>``: region ``k``'s router: bridge ``br0`` (public: 198.18.k.1/24, the VMs'
  gateway; private: the LAN 198.18.(100+k).1/24 behind an nftables masquerade to ``wan0``,
  which carries the site's one public address 198.18.k.1/32, and a forward filter that
  lets nothing in that was not asked for from inside);
- ``P-gw``: the gateway: veth ``gw0`` to the host bridge ``P-gw``; the VMs' traffic to the
  controller is masqueraded to ``gw0``'s address, so the host needs no route back (its
  routing table keeps only the bridge's own connected /29), and nothing from the host
  enters the lab unasked;
- ``P-wan``: home of the router process, which owns ``wan0`` (a TUN) in every namespace
  above and routes the 198.18.0.0/16 prefixes between them with the per-pair delays.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time
from pathlib import Path

import msgspec

from controller.provision.lab import net, shaping
from controller.provision.lab.errors import LabError
from controller.provision.lab.router import (
    TUN_NAME,
    RouterConfig,
    RouterLink,
    RouterPair,
    read_stats,
)
from controller.provision.lab.state import (
    GATEWAY,
    GatewayState,
    LabState,
    RegionState,
)

ROUTER_READY_TIMEOUT = 15.0


def repo_root() -> str:
    import controller

    return str(Path(controller.__file__).resolve().parent.parent)


def child_env(prefix: str, **extra: str) -> dict[str, str]:
    """A clean environment for the lab's daemons: our marker, and our code on the path."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": repo_root(),
        "LANG": "C.UTF-8",
        net.ENV_PREFIX: prefix,
    }
    env.update(extra)
    return env


def nat_ruleset(table: str, *, uplink: str) -> str:
    """Masquerade to ``uplink``, and let only replies in from it (a site's NAT router).
    Replaces the table whole, so that applying it again (``Lab.up`` after a crash) does not
    add the rules twice."""
    return (
        f"add table ip {table}\n"
        f"delete table ip {table}\n"
        f"table ip {table} {{\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "{uplink}" masquerade\n'
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f'    iifname "{uplink}" ct state established,related accept\n'
        f'    iifname "{uplink}" drop\n'
        "  }\n"
        "}\n"
    )


def router_config(state: LabState, data_dir: Path) -> RouterConfig:
    assert state.gateway is not None
    links = [
        RouterLink(
            name=r.name,
            netns=r.netns,
            prefixes=[r.subnet],
            address=f"{r.gateway_ip}/32" if r.kind == "private" else "",
        )
        for r in state.regions
    ]
    links.append(RouterLink(name=GATEWAY, netns=state.gateway.netns,
                            prefixes=[state.gateway.subnet]))
    names = [link.name for link in links]
    pairs = []
    for a in names:
        for b in names:
            if a != b:
                link = state.config.link(a, b)
                pairs.append(RouterPair(src=a, dst=b, delay_ms=link.rtt_ms / 2, loss=link.loss))
    return RouterConfig(links=links, pairs=pairs, stats_path=str(data_dir / "router-stats.json"),
                        seed=state.config.seed)


class Topology:
    """Creates the namespaces, links and router of one lab (root, ``netns`` mode)."""

    def __init__(self, *, data_dir: Path, python: str = sys.executable) -> None:
        self.data_dir = data_dir
        self.python = python
        self._children: list[int] = []  # daemons we started, to reap

    def plan_gateway(self, prefix: str) -> GatewayState:
        subnet = net.free_gateway_subnet()
        hosts = list(subnet.hosts())
        return GatewayState(
            subnet=str(subnet),
            host_ip=str(hosts[0]),
            ns_ip=str(hosts[1]),
            bridge=f"{prefix}-gw",
            veth=f"{prefix}-gwh",
            netns=f"{prefix}-gw",
        )

    async def build(self, state: LabState) -> None:
        """Everything but the router: namespaces, bridges, NAT, the gateway link."""
        p = state.prefix
        gw = state.gateway
        assert gw is not None
        names = [f"{p}-wan", gw.netns, *(r.netns for r in state.regions)]
        existing = set(net.netns_list())
        for ns in names:
            if ns not in existing:
                await net.arun(["ip", "netns", "add", ns])
            await net.ip_many(ns, [["link", "set", "lo", "up"]])
            settings = {"net.ipv6.conf.all.disable_ipv6": "1",
                        "net.ipv6.conf.default.disable_ipv6": "1"}
            if ns != f"{p}-wan":
                settings["net.ipv4.ip_forward"] = "1"
            await net.arun(net.sysctl_argv(ns, settings))
        for r in state.regions:
            await self._region(p, r)
        await self._gateway(p, gw)

    async def _region(self, prefix: str, r: RegionState) -> None:
        if r.kind == "public":
            address = f"{r.gateway_ip}/24"
        else:
            lan = ipaddress.IPv4Network(r.lan)
            address = f"{lan.network_address + 1}/{lan.prefixlen}"
        await net.arun(["ip", "-n", r.netns, "link", "add", "br0", "type", "bridge"], check=False)
        await net.ip_many(r.netns, [
            ["addr", "replace", address, "dev", "br0"],
            ["link", "set", "br0", "up"],
        ])
        if r.kind == "private":
            await net.arun(net.nft_argv(r.netns),
                           input=nat_ruleset(prefix, uplink=TUN_NAME))

    async def _gateway(self, prefix: str, gw: GatewayState) -> None:
        subnet = ipaddress.IPv4Network(gw.subnet)
        links = net.host_links()
        if gw.bridge not in links:
            await net.arun(["ip", "link", "add", gw.bridge, "type", "bridge"])
        await net.arun(["sysctl", "-q", "-w", f"net.ipv6.conf.{gw.bridge}.disable_ipv6=1"])
        await net.ip_many(None, [
            ["addr", "replace", f"{gw.host_ip}/{subnet.prefixlen}", "dev", gw.bridge],
            ["link", "set", gw.bridge, "up"],
        ])
        if gw.veth not in links:
            await net.arun(["ip", "link", "add", gw.veth, "type", "veth",
                            "peer", "name", "gw0", "netns", gw.netns])
        await net.arun(["sysctl", "-q", "-w", f"net.ipv6.conf.{gw.veth}.disable_ipv6=1"])
        await net.ip_many(None, [["link", "set", gw.veth, "master", gw.bridge, "up"]])
        await net.ip_many(gw.netns, [
            ["addr", "replace", f"{gw.ns_ip}/{subnet.prefixlen}", "dev", "gw0"],
            ["link", "set", "gw0", "up"],
        ])
        await net.arun(net.nft_argv(gw.netns),
                       input=nat_ruleset(prefix, uplink="gw0"))

    # -- the router ---------------------------------------------------------------------

    def start_router(self, state: LabState) -> tuple[int, int]:
        """Start the router process in ``P-wan`` and wait for it to report ready."""
        config = router_config(state, self.data_dir)
        if state.router.backend == "netem":
            config = shaping.without_delays(config)  # the kernel delays; the router forwards
        cfg_path = self.data_dir / "router-config.json"
        cfg_path.write_bytes(msgspec.json.encode(config))
        stats = Path(config.stats_path)
        stats.unlink(missing_ok=True)
        pid = net.spawn(
            ["ip", "netns", "exec", f"{state.prefix}-wan", self.python, "-m",
             "controller.provision.lab.router", str(cfg_path)],
            env=child_env(state.prefix), log=self.data_dir / "router.log",
        )
        self._children.append(pid)
        deadline = time.monotonic() + ROUTER_READY_TIMEOUT
        while time.monotonic() < deadline:
            st = read_stats(stats)
            if st is not None and st.ready:
                return st.pid, net.pid_start(st.pid)
            if not net.reap([pid]):
                break
            time.sleep(0.02)
        tail = (self.data_dir / "router.log").read_text(errors="replace")[-2000:]
        raise LabError(f"the WAN router did not start: {tail.strip() or 'no output'}")

    def reap(self) -> None:
        self._children = net.reap(self._children)

    def stop_router(self, pid: int, start: int) -> None:
        if net.alive(pid, start):
            net.kill_pids([pid])
        self.reap()
