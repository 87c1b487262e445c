"""The lab's WAN router logic on datagram socket pairs standing in for TUN devices (no
root): routing by destination prefix, per-pair delay, seeded loss, drops of what is not
ours; plus the lab config's validation and addressing."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from controller.provision.lab.errors import LabConfigError, LabError
from controller.provision.lab.net import batch_input
from controller.provision.lab.router import Router, RouterConfig, RouterLink, RouterPair
from controller.provision.lab.state import (
    LabConfig,
    LabState,
    LinkConfig,
    RegionConfig,
    check_prefix,
    free_vm_ip,
    new_prefix,
    plan_regions,
)
from controller.provision.lab.topology import nat_ruleset, router_config


def _packet(src: str, dst: str, payload: bytes = b"x" * 20) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header + payload


class Wan:
    """Three links (a, b, gateway); ``outside[name]`` is the region's end of its "TUN"."""

    def __init__(self, pairs: list[RouterPair], tmp: str, seed: int = 1) -> None:
        links = [
            RouterLink(name="a", netns="-", prefixes=["198.18.1.0/24"]),
            RouterLink(name="b", netns="-", prefixes=["198.18.2.0/24"]),
            RouterLink(name="gateway", netns="-", prefixes=["198.18.248.0/29"]),
        ]
        self.outside: dict[str, socket.socket] = {}
        inside = []
        for link in links:
            left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            right.setblocking(False)
            left.setblocking(False)
            self.outside[link.name] = left
            inside.append(right)
        self._inside = inside
        cfg = RouterConfig(links=links, pairs=pairs, stats_path=f"{tmp}/stats.json", seed=seed)
        self.router = Router(cfg, [s.fileno() for s in inside])
        self.stop = asyncio.Event()

    async def __aenter__(self) -> Wan:
        self.task = asyncio.create_task(self.router.run(self.stop))
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await self.task
        for s in [*self.outside.values(), *self._inside]:
            s.close()

    async def recv(self, name: str, timeout: float = 2.0) -> bytes:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.outside[name], 65536), timeout)


async def test_routes_by_destination_with_the_pair_delay(tmp_path) -> None:
    pairs = [RouterPair(src="a", dst="b", delay_ms=40), RouterPair(src="b", dst="a", delay_ms=5)]
    async with Wan(pairs, str(tmp_path)) as wan:
        pkt = _packet("198.18.1.10", "198.18.2.10")
        t0 = time.monotonic()
        wan.outside["a"].send(pkt)
        assert await wan.recv("b") == pkt
        took = time.monotonic() - t0
        assert 0.039 <= took < 0.1
        back = _packet("198.18.2.10", "198.18.1.10")
        t0 = time.monotonic()
        wan.outside["b"].send(back)
        assert await wan.recv("a") == back
        assert 0.0045 <= time.monotonic() - t0 < 0.05
        # No delay configured (a -> gateway): forwarded at once.
        wan.outside["a"].send(_packet("198.18.1.10", "198.18.248.1"))
        assert await wan.recv("gateway")
        st = wan.router.stats.pairs
        assert st["a>b"].forwarded == 1 and st["b>a"].forwarded == 1


async def test_order_is_kept_within_a_pair(tmp_path) -> None:
    async with Wan([RouterPair(src="a", dst="b", delay_ms=10)], str(tmp_path)) as wan:
        sent = [_packet("198.18.1.10", "198.18.2.10", bytes([i]) * 20) for i in range(50)]
        for p in sent:
            wan.outside["a"].send(p)
        got = [await wan.recv("b") for _ in sent]
        assert got == sent


async def test_drops_what_is_not_routed_and_not_ipv4(tmp_path) -> None:
    async with Wan([], str(tmp_path)) as wan:
        wan.outside["a"].send(_packet("198.18.1.10", "8.8.8.8"))  # outside the lab
        wan.outside["a"].send(_packet("198.18.1.10", "198.18.104.10"))  # a private LAN
        wan.outside["a"].send(_packet("198.18.1.10", "198.18.1.11"))  # back where it came
        wan.outside["a"].send(b"\x60" + b"\0" * 39)  # IPv6
        wan.outside["a"].send(_packet("198.18.1.10", "198.18.2.10"))  # a marker that passes
        await wan.recv("b")
        assert wan.router.stats.no_route == 3 and wan.router.stats.not_ipv4 == 1
        for name in ("a", "gateway"):
            with pytest.raises(BlockingIOError):
                wan.outside[name].recv(65536)


async def test_loss_is_seeded(tmp_path) -> None:
    counts = []
    for _ in range(2):
        async with Wan([RouterPair(src="a", dst="b", delay_ms=0, loss=0.25)], str(tmp_path),
                       seed=42) as wan:
            for i in range(400):
                wan.outside["a"].send(_packet("198.18.1.10", "198.18.2.10", bytes([i % 256])))
                if i % 50 == 49:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            st = wan.router.stats.pairs["a>b"]
            # Nobody reads b's end here: past its buffer, writes fail and count as overflow.
            counts.append((st.forwarded + st.overflow, st.lost))
    assert counts[0] == counts[1]
    passed, lost = counts[0]
    assert passed + lost == 400 and 60 < lost < 140


def test_config_errors_name_the_field() -> None:
    with pytest.raises(LabConfigError, match=r"links\[0\]\.b: unknown region 'mars'"):
        LabConfig(links=(LinkConfig(a="lab-us", b="mars", rtt_ms=10),)).validate()
    with pytest.raises(LabConfigError, match=r"links\[0\]\.loss"):
        LabConfig(links=(LinkConfig(a="lab-us", b="lab-eu", rtt_ms=10, loss=1.0),)).validate()
    with pytest.raises(LabConfigError, match="duplicate region"):
        LabConfig(regions=(RegionConfig(name="x"), RegionConfig(name="x"))).validate()
    with pytest.raises(LabConfigError, match=r"regions\[0\]\.name"):
        LabConfig(regions=(RegionConfig(name="a b"),)).validate()
    with pytest.raises(LabConfigError, match="prefix"):
        check_prefix("bl12345")
    assert check_prefix(new_prefix()).startswith("bl")


def test_addressing_and_router_config() -> None:
    cfg = LabConfig().validate()
    regions = plan_regions(cfg, netns=True, prefix="bl000001")
    assert [r.subnet for r in regions] == [f"198.18.{i}.0/24" for i in (1, 2, 3, 4)]
    onprem = regions[3]
    assert onprem.kind == "private" and onprem.lan == "198.18.104.0/24"
    state = LabState(prefix="bl000001", mode="netns", config=cfg, created_at=0, regions=regions)
    assert free_vm_ip(state, onprem) == "198.18.104.10"
    assert free_vm_ip(state, regions[0]) == "198.18.1.10"
    from controller.provision.lab.state import GatewayState

    state.gateway = GatewayState(subnet="198.18.248.0/29", host_ip="198.18.248.1",
                                 ns_ip="198.18.248.2", bridge="bl000001-gw",
                                 veth="bl000001-gwh", netns="bl000001-gw")
    rc = router_config(state, __import__("pathlib").Path("/tmp"))
    one_way = {(p.src, p.dst): p.delay_ms for p in rc.pairs}
    assert one_way[("lab-us", "lab-eu")] == one_way[("lab-eu", "lab-us")] == 40  # rtt 80
    assert one_way[("lab-ap", "gateway")] == 0
    # The private site's LAN is routed nowhere: only its link prefix is.
    (link,) = [x for x in rc.links if x.name == "lab-onprem"]
    assert link.prefixes == ["198.18.4.0/24"] and link.address == "198.18.4.1/32"
    # Every interface name fits the kernel's 15 characters.
    assert all(len(n) <= 15 for n in (state.gateway.bridge, state.gateway.veth, "v250", "br0"))


def test_nat_ruleset_and_ip_batch_words() -> None:
    rules = nat_ruleset("bl000001", uplink="wan0")
    assert 'oifname "wan0" masquerade' in rules
    assert 'iifname "wan0" ct state established,related accept' in rules
    assert rules.index("established") < rules.index('iifname "wan0" drop')
    argv, text = batch_input("ns1", [["link", "set", "lo", "up"]])
    assert argv == ["ip", "-n", "ns1", "-batch", "-"] and text == "link set lo up\n"
    with pytest.raises(LabError, match="plain word"):
        batch_input(None, [["link", "set", "lo up"]])
