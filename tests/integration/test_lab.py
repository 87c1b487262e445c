"""The local lab cloud on real namespaces (root): WAN delays and loss through the userspace
router, the private site behind NAT, VMs booting rendered user-data with their own
hostname and private /etc/barista, and teardown (also after a crash) leaving nothing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from controller.provision.bootstrap import BOOT_CONFIG_PATH, BootConfig, render_user_data
from controller.provision.lab import Lab, LabConfig, LinkConfig, RegionConfig
from controller.provision.lab import net as labnet
from controller.provision.lab.vm import read_status
from tests.fixtures.lab import MakeLab, needs_lab, ping, vm_run, wait_booted
from tests.fixtures.wait import wait_for

pytestmark = needs_lab

UD_EMPTY = "#cloud-config\nruncmd: []\n"
REPO = str(Path(__file__).resolve().parents[2])
ENV = {**os.environ, "PYTHONPATH": REPO}


def _exists(path: str) -> bool:
    return os.path.exists(path)


async def _out(argv: list[str]) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, env=ENV)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return subprocess.CompletedProcess(argv, proc.returncode or 0, out.decode(), err.decode())


async def _vm(lab: Lab, name: str, region: str, user_data: str = UD_EMPTY) -> str:
    vm = await lab.create_vm(name=name, region=region, size="lab.small", image="ubuntu-24.04",
                             user_data=user_data, tags={"test": "lab"})
    await wait_booted(lab, vm.id)
    return vm.id


def _ip(lab: Lab, vm_id: str) -> str:
    vm = lab.vm(vm_id)
    assert vm is not None
    return vm.private_ip


async def test_ping_between_regions_has_the_configured_rtt(make_lab: MakeLab) -> None:
    config = LabConfig(
        regions=(RegionConfig(name="r-a"), RegionConfig(name="r-b"), RegionConfig(name="r-c")),
        links=(LinkConfig(a="r-a", b="r-b", rtt_ms=60), LinkConfig(a="r-a", b="r-c", rtt_ms=20),
               LinkConfig(a="r-b", b="r-c", rtt_ms=110)),
    )
    lab = await make_lab(config)
    a, b, c = [await _vm(lab, n, r) for n, r in (("a", "r-a"), ("b", "r-b"), ("c", "r-c"))]
    same = await _vm(lab, "a2", "r-a")
    for src, dst, rtt in ((a, b, 60), (a, c, 20), (b, c, 110)):
        sent, received, low, avg = await ping(lab, src, _ip(lab, dst))
        assert received == sent, (src, dst)
        assert low is not None and avg is not None
        # Never faster than configured; the best round trip a few ms over, the average
        # more on a busy shared 2-core machine (the router is a Python process).
        assert rtt - 0.5 <= low < rtt + 6, (src, dst, rtt, low, avg)
        assert avg < rtt + 15, (src, dst, rtt, low, avg)
    # In one region the bridge carries the packets: no WAN delay.
    _, received, _, avg = await ping(lab, a, _ip(lab, same))
    assert received and avg is not None and avg < 5
    st = lab.status()
    pair = next(link for link in st.links if {link.a, link.b} == {"r-a", "r-b"})
    assert pair.rtt_ms == 60 and pair.packets >= 10


async def test_loss_drops_the_configured_share(make_lab: MakeLab) -> None:
    config = LabConfig(
        regions=(RegionConfig(name="r-a"), RegionConfig(name="r-b")),
        links=(LinkConfig(a="r-a", b="r-b", rtt_ms=10, loss=0.3),), seed=7,
    )
    lab = await make_lab(config)
    a, b = await _vm(lab, "a", "r-a"), await _vm(lab, "b", "r-b")
    sent, received, _, _ = await ping(lab, a, _ip(lab, b), count=200, interval=0.005, wait=0.5)
    # 30% each way: a round trip survives with 0.7 * 0.7 = 49%.
    assert sent == 200
    assert 0.35 < received / sent < 0.63, received
    lost = sum(link.lost for link in lab.status().links)
    assert 0.3 * 200 < lost < 0.75 * 200


async def test_private_site_is_behind_nat(lab: Lab) -> None:
    pub = await _vm(lab, "pub", "lab-ap")
    priv_vm = await lab.create_vm(name="priv", region="lab-onprem", size="lab.small",
                                  image="ubuntu-24.04", user_data=UD_EMPTY, tags={})
    priv = priv_vm.id
    await wait_booted(lab, priv)
    assert priv_vm.public_ip == ""
    assert priv_vm.private_ip.startswith("198.18.10")  # the LAN, not the site's link
    addrs = (await vm_run(lab, priv, ["ip", "-4", "-o", "addr", "show"], check=True)).stdout
    assert priv_vm.private_ip in addrs and "198.18.4." not in addrs
    # Out: the private VM reaches a public VM (12 ms RTT onprem<->ap) and the gateway.
    _, received, low, _ = await ping(lab, priv, _ip(lab, pub), count=3)
    assert received == 3 and low is not None and low >= 11.5
    _, received, _, _ = await ping(lab, priv, lab.gateway_ip, count=3)
    assert received == 3
    # A TCP server on the gateway (where the controller listens) sees the lab's NAT.
    server = socket.create_server((lab.gateway_ip, 0))
    port = server.getsockname()[1]
    server.setblocking(False)
    loop = asyncio.get_running_loop()
    accepted = loop.create_task(loop.sock_accept(server))
    res = await vm_run(lab, priv, [sys.executable, "-c", (
        "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), 5);"
        "s.sendall(b'hi'); s.close()"), lab.gateway_ip, str(port)])
    assert res.returncode == 0, res.stderr
    conn, peer = await asyncio.wait_for(accepted, 5)
    conn.close()
    server.close()
    state = lab.read()
    assert state is not None and state.gateway is not None
    assert peer[0] == state.gateway.ns_ip
    # In: nothing reaches the private VM, neither at its LAN address nor at the site's.
    listener = await asyncio.create_subprocess_exec(
        *lab.exec_argv(priv), sys.executable, "-c",
        "import socket,time; s=socket.create_server(('0.0.0.0', 7000)); print('up', flush=True);"
        "time.sleep(30)",
        stdout=subprocess.PIPE,
    )
    try:
        assert listener.stdout is not None
        assert (await asyncio.wait_for(listener.stdout.readline(), 10)).strip() == b"up"
        _, received, _, _ = await ping(lab, pub, priv_vm.private_ip, count=2, wait=0.5)
        assert received == 0
        region = state.region("lab-onprem")
        assert region is not None
        for target in (priv_vm.private_ip, region.gateway_ip):
            res = await vm_run(lab, pub, [sys.executable, "-c", (
                "import socket,sys\n"
                "try:\n socket.create_connection((sys.argv[1], 7000), 1.5); print('open')\n"
                "except OSError as e: print('closed', e)"), target])
            assert res.stdout.startswith("closed"), (target, res.stdout)
    finally:
        listener.kill()
        await listener.wait()


INSTALLER = """\
#!/bin/sh
# The test's stand-in for barista-bootstrap: records what the VM's first boot sees and
# enables a unit, as the real installer does (the lab's init starts it).
set -e
cfg="$2"
{
  echo "hostname=$(hostname)"
  echo "mode=$(stat -c %a "$cfg")"
  echo "vm=$BARISTA_LAB_VM"
} > /etc/barista/boot-result
mkdir -p /var/lib/barista /opt/barista-agent /etc/systemd/system/multi-user.target.wants
echo run >> /var/lib/barista/runs
cat > /etc/systemd/system/barista-test.service <<'UNIT'
[Unit]
Description=test unit
[Service]
ExecStart=/bin/sh -c 'echo started >> /var/lib/barista/starts; exec sleep 300'
Restart=on-failure
UNIT
ln -sf /etc/systemd/system/barista-test.service \
  /etc/systemd/system/multi-user.target.wants/barista-test.service
"""


async def test_vm_boots_rendered_user_data_privately(make_lab: MakeLab, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "barista-bootstrap").write_text(INSTALLER)
    (bindir / "barista-bootstrap").chmod(0o755)
    lab = await make_lab(LabConfig(extra_path=(str(bindir),)))
    host_had_etc_barista = _exists("/etc/barista")
    boots = {}
    for name, region in (("infra-g-0", "lab-us"), ("infra-g-1", "lab-onprem")):
        cfg = BootConfig(join_token=f"bt1.{name}.secret", node_name=name,
                         nats_urls=["tls://198.18.248.1:4222"], controller_keys=["k"],
                         installer_url="https://198.18.248.1:8640/install.sh")
        # The rendered user-data (its write_files: join.json 0600), with its runcmd (the
        # real join, tested in test_infra_lab.py) swapped for the stand-in installer.
        rendered = render_user_data(cfg)
        user_data = (rendered[:rendered.index("runcmd:")]
                     + f"runcmd:\n  - [barista-bootstrap, --config, {BOOT_CONFIG_PATH}]\n")
        vm = await lab.create_vm(name=name, region=region, size="lab.small",
                                 image="ubuntu-24.04", user_data=user_data, tags={})
        boots[vm.id] = (name, cfg, await wait_booted(lab, vm.id))
    for vm_id, (name, cfg, boot_s) in boots.items():
        assert boot_s < 10
        out = (await vm_run(lab, vm_id, ["cat", "/etc/barista/boot-result"], check=True)).stdout
        assert f"hostname={name}" in out and "mode=600" in out and f"vm={vm_id}" in out
        join = (await vm_run(lab, vm_id, ["cat", "/etc/barista/join.json"], check=True)).stdout
        assert json.loads(join)["join_token"] == cfg.join_token
        assert (await vm_run(lab, vm_id, ["hostname"])).stdout.strip() == name
        await wait_for(lambda vm_id=vm_id: len(labnet.netns_pids(vm_id)) >= 2, 10,
                       "the enabled unit to run")
        # Only what this VM enabled starts: never the host's own enabled services.
        assert read_status(lab.data_dir, vm_id)["units"] == ["barista-test.service"]
    if not host_had_etc_barista:
        assert not _exists("/etc/barista")
    assert not _exists("/etc/systemd/system/barista-test.service")
    # Stop keeps the machine and its disk but no process; start runs the units, not the
    # user-data again.
    vm_id = next(iter(boots))
    await lab.stop_vm(vm_id)
    assert labnet.netns_pids(vm_id) == [] and vm_id in labnet.netns_list()
    await lab.start_vm(vm_id)
    await wait_for(lambda: lab.phase(vm_id) == "running", 10, "the VM to boot again")

    async def starts_are(n: int) -> bool:
        res = await vm_run(lab, vm_id, ["cat", "/var/lib/barista/starts"])
        return res.stdout.count("started") == n

    await wait_for(lambda: starts_are(2), 10, "the unit's second start")
    runs = await vm_run(lab, vm_id, ["cat", "/var/lib/barista/runs"], check=True)
    assert runs.stdout.count("run") == 1
    await lab.reboot_vm(vm_id)
    await wait_for(lambda: starts_are(3), 10, "the unit's start after a reboot")


async def test_terminate_and_down_leave_nothing(make_lab: MakeLab) -> None:
    lab = await make_lab()
    prefix = lab.prefix
    a = await _vm(lab, "a", "lab-us")
    b = await _vm(lab, "b", "lab-onprem")
    state = lab.read()
    assert state is not None
    vm_a = state.vms[a]
    region = state.region("lab-us")
    assert region is not None
    pids = labnet.netns_pids(a)
    assert pids
    await lab.terminate_vm(a)
    assert a not in labnet.netns_list()
    assert not (lab.data_dir / "vms" / a).exists()
    assert all(labnet.pid_start(p) == 0 for p in pids)
    links = (await _out(["ip", "-n", region.netns, "-br", "link"])).stdout
    assert f"v{vm_a.seq}@" not in links
    assert b in labnet.netns_list()
    removed = await lab.down()
    assert b in removed["netns"] and f"{prefix}-wan" in removed["netns"]
    assert f"{prefix}-gw" in removed["links"]
    _assert_gone(prefix, lab.data_dir)


def _assert_gone(prefix: str, data_dir: Path) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in netns
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert prefix not in links
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert prefix not in tables
    assert labnet.marked_pids(prefix) == []
    assert not data_dir.exists()


CRASHER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from controller.provision.lab import Lab

    async def main():
        lab = Lab(data_dir=Path(sys.argv[1]))
        await lab.up()
        for name, region in (("a", "lab-us"), ("b", "lab-onprem")):
            await lab.create_vm(name=name, region=region, size="lab.small", image="x",
                                user_data="#cloud-config\\nruncmd:\\n  - [sleep, '300']\\n",
                                tags={})
        print(lab.prefix, flush=True)
        await asyncio.sleep(300)

    asyncio.run(main())
""")


async def test_lab_down_sweeps_after_the_owner_crashed(tmp_path: Path) -> None:
    data_dir = tmp_path / "crashed-lab"
    env = ENV
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHER, str(data_dir), stdout=subprocess.PIPE, env=env,
    )
    prefix = ""
    try:
        assert owner.stdout is not None
        prefix = (await asyncio.wait_for(owner.stdout.readline(), 30)).decode().strip()
        assert prefix.startswith("bl")
        await wait_for(lambda: len(labnet.marked_pids(prefix)) >= 5, 15,
                       "router, two inits and their runcmd sleeps")
        owner.send_signal(signal.SIGKILL)
        await owner.wait()
        assert labnet.marked_pids(prefix)  # the lab outlives its owner, like a cloud
        res = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller.cli.main", "lab", "down", "--dir", str(data_dir),
            "-o", "json", stdout=subprocess.PIPE, env=env,
        )
        out, _ = await asyncio.wait_for(res.communicate(), 60)
        assert res.returncode == 0, out
        report = json.loads(out)
        assert not any(report["left"].values())
        assert len(report["removed"]["processes"]) >= 5
        _assert_gone(prefix, data_dir)
    finally:
        if owner.returncode is None:
            owner.kill()
            await owner.wait()
        if prefix:
            labnet.sweep(prefix, data_dir=data_dir)


async def test_status_cli(lab: Lab) -> None:
    vm = await _vm(lab, "a", "lab-eu")
    res = await _out([sys.executable, "-m", "controller.cli.main", "lab", "status", "--dir",
                      str(lab.data_dir), "-o", "json"])
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["prefix"] == lab.prefix and st["mode"] == "netns" and st["up"]
    assert [r["name"] for r in st["regions"]] == ["lab-us", "lab-eu", "lab-ap", "lab-onprem"]
    assert st["vms"][0]["id"] == vm and st["vms"][0]["running"]
    assert "running" in st["router"]
    table = await _out([sys.executable, "-m", "controller.cli.main", "lab", "status",
                        "--dir", str(lab.data_dir)])
    assert table.returncode == 0 and "lab-onprem" in table.stdout and "140" in table.stdout


async def test_gateway_forwarder_reaches_a_loopback_controller(lab: Lab) -> None:
    """A controller on 127.0.0.1 only, reached by a VM (behind NAT, too) at the gateway."""
    from controller.provision.lab.gateway import GatewayForwarder

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"echo:" + await r.read(100))
        await w.drain()
        w.close()

    backend = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = backend.sockets[0].getsockname()[1]
    vm = await _vm(lab, "priv", "lab-onprem")
    try:
        async with GatewayForwarder(host=lab.gateway_ip, routes={0: ("127.0.0.1", port)}) as fw:
            res = await vm_run(lab, vm, [sys.executable, "-c", (
                "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])),"
                " 5); s.sendall(b'hello'); s.shutdown(socket.SHUT_WR);"
                "print(s.recv(100).decode())"), lab.gateway_ip, str(fw.ports[0])])
            assert res.stdout.strip() == "echo:hello", res.stderr
            assert fw.connections == 1
    finally:
        backend.close()
        await backend.wait_closed()


async def test_netem_detection_and_the_tc_tree(make_lab: MakeLab) -> None:
    """The kernel here has no netem: the probe says so and the router delays. The tc tree
    netem would use is checked with a pfifo leaf instead: packets land in the class of
    their destination region."""
    from controller.provision.lab import shaping
    from controller.provision.lab.topology import router_config

    config = LabConfig(
        regions=(RegionConfig(name="r-a"), RegionConfig(name="r-b"), RegionConfig(name="r-c")),
        links=(LinkConfig(a="r-a", b="r-b", rtt_ms=20), LinkConfig(a="r-a", b="r-c", rtt_ms=10)),
    )
    lab = await make_lab(config)
    state = lab.read()
    assert state is not None
    has_netem = "CONFIG_NET_SCH_NETEM=" in _kernel_config()
    assert state.router.backend == ("netem" if has_netem else "tun")
    assert shaping.probe_netem(state.prefix) == has_netem
    rc = router_config(state, lab.data_dir)
    await shaping.apply(rc, leaf=["pfifo"])
    a, b, c = [await _vm(lab, n, r) for n, r in (("a", "r-a"), ("b", "r-b"), ("c", "r-c"))]
    await ping(lab, a, _ip(lab, b), count=5, interval=0.01)
    await ping(lab, a, _ip(lab, c), count=3, interval=0.01)
    ra = state.region("r-a")
    assert ra is not None
    text = (await _out(["tc", "-n", ra.netns, "-s", "class", "show", "dev", "wan0"])).stdout
    # tc 6.1 has no JSON for htb classes: "class htb 1:2 ... \n Sent 840 bytes 10 pkt ..."
    packets = {m.group(1): int(m.group(2)) for m in re.finditer(
        r"class htb (\S+) .*\n\s*Sent \d+ bytes (\d+) pkt", text)}
    names = [link.name for link in rc.links]
    assert packets[f"1:{names.index('r-b') + 1:x}"] >= 5
    assert packets[f"1:{names.index('r-c') + 1:x}"] >= 3
    assert packets[f"1:{names.index('gateway') + 1:x}"] == 0


def _kernel_config() -> str:
    import gzip

    try:
        return gzip.open("/proc/config.gz", "rt").read()
    except OSError:
        return ""


async def test_up_again_restarts_a_dead_router_and_keeps_one_ruleset(make_lab: MakeLab) -> None:
    config = LabConfig(regions=(RegionConfig(name="r-a"), RegionConfig(name="r-p", kind="private")),
                       links=(LinkConfig(a="r-a", b="r-p", rtt_ms=10),))
    lab = await make_lab(config)
    a, p = await _vm(lab, "a", "r-a"), await _vm(lab, "p", "r-p")
    state = lab.read()
    assert state is not None
    labnet.kill_pids([state.router.pid])
    _, received, _, _ = await ping(lab, p, _ip(lab, a), count=2, wait=0.5)
    assert received == 0  # no WAN without its router
    await lab.up()
    again = lab.read()
    assert again is not None and again.router.pid != state.router.pid
    _, received, low, _ = await ping(lab, p, _ip(lab, a), count=3)
    assert received == 3 and low is not None and low >= 9.5
    site = again.region("r-p")
    assert site is not None
    rules = (await _out(["ip", "netns", "exec", site.netns, "nft", "list", "ruleset"])).stdout
    assert rules.count("masquerade") == 1


async def test_up_after_a_crash_during_planning(tmp_path: Path) -> None:
    """A crash between the first journal entry and the plan (say in the netem probe) leaves
    a state file without regions and a probe namespace: up() sweeps them and plans again."""
    from controller.provision.lab.state import LabState, StateFile, new_prefix

    data_dir = tmp_path / "lab"
    prefix = new_prefix()
    StateFile(data_dir).write(LabState(prefix=prefix, mode="netns", config=LabConfig(),
                                       created_at=0))
    await _out(["ip", "netns", "add", f"{prefix}-probe"])
    lab = Lab(data_dir=data_dir)
    try:
        state = await lab.up()
        assert state.prefix == prefix and state.regions and state.up
        assert f"{prefix}-probe" not in labnet.netns_list()
        vm = await _vm(lab, "a", "lab-us")
        assert lab.vm(vm) is not None
    finally:
        await lab.down()
    _assert_gone(prefix, data_dir)
