"""Kernel delay and loss for the lab's WAN where the kernel has ``netem``: a ``tc`` tree on
each region's ``wan0`` (egress, towards the router) with one HTB class per destination
prefix, classified by ``u32`` on the destination address, and a ``netem`` leaf with that
pair's one-way delay and loss. The userspace router then only forwards (no delay of its
own). Chosen by a probe (``tc qdisc add ... netem`` on a veth in a scratch
namespace): this machine's kernel answers "Specified qdisc kind is unknown", so here the
router's timer heap does the delaying instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import msgspec

from controller.provision.lab import net
from controller.provision.lab.errors import CommandFailed
from controller.provision.lab.router import TUN_NAME, RouterConfig

HTB_RATE = "10gbit"  # the classes only sort packets; they do not limit


def probe_netem(prefix: str) -> bool:
    """Whether ``netem`` works here, tried on a veth in ``<prefix>-probe``."""
    ns = f"{prefix}-probe"
    try:
        net.run(["ip", "netns", "add", ns])
    except CommandFailed:
        return False
    try:
        # A veth: this kernel has no dummy devices either.
        net.run(["ip", "-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        try:
            net.run(["tc", "-n", ns, "qdisc", "add", "dev", "d0", "root", "netem", "delay",
                     "1ms"])
        except CommandFailed:
            return False
        return True
    except CommandFailed:
        return False
    finally:
        net.run(["ip", "netns", "delete", ns], check=False)


def tree(link: str, config: RouterConfig, *, leaf: Sequence[str] | None = None
         ) -> list[list[str]]:
    """The tc commands (for ``tc -batch``) shaping ``link``'s wan0: destination ``j``'s
    prefixes go to class 1:(j+1) with a netem leaf (or ``leaf``, e.g. ``["pfifo"]``, which
    lets the tree be checked on a kernel without netem)."""
    pairs = {(p.src, p.dst): p for p in config.pairs}
    cmds = [["qdisc", "replace", "dev", TUN_NAME, "root", "handle", "1:", "htb",
             "default", "ffff"],
            ["class", "replace", "dev", TUN_NAME, "parent", "1:", "classid", "1:ffff", "htb",
             "rate", HTB_RATE, "quantum", "60000"]]
    for j, dst in enumerate(config.links):
        if dst.name == link:
            continue
        pair = pairs.get((link, dst.name))
        classid = f"1:{j + 1:x}"
        cmds.append(["class", "replace", "dev", TUN_NAME, "parent", "1:", "classid", classid,
                     "htb", "rate", HTB_RATE, "quantum", "60000"])
        if leaf is not None:
            body = list(leaf)
        else:
            delay = pair.delay_ms if pair else 0.0
            body = ["netem", "delay", f"{delay:g}ms"]
            if pair and pair.loss:
                body += ["loss", f"{pair.loss * 100:g}%"]
            body += ["limit", "100000"]
        cmds.append(["qdisc", "replace", "dev", TUN_NAME, "parent", classid, "handle",
                     f"{j + 10:x}:", *body])
        for prefix in dst.prefixes:
            nw = ipaddress.IPv4Network(prefix)
            cmds.append(["filter", "add", "dev", TUN_NAME, "parent", "1:", "protocol", "ip",
                         "prio", "1", "u32", "match", "ip", "dst", str(nw), "flowid",
                         classid])
    return cmds


async def apply(config: RouterConfig, *, leaf: Sequence[str] | None = None) -> None:
    """Shape every link's wan0 (after the router made them)."""
    for link in config.links:
        text = "\n".join(" ".join(c) for c in tree(link.name, config, leaf=leaf)) + "\n"
        await net.arun(["tc", "-n", link.netns, "-batch", "-"], input=text)


def without_delays(config: RouterConfig) -> RouterConfig:
    """The router's own config when netem delays: forward only."""
    return msgspec.structs.replace(config, pairs=[
        msgspec.structs.replace(p, delay_ms=0.0, loss=0.0) for p in config.pairs
    ])
