"""The demo's ping fleet command (controller/cli/demo_net.py), run here by sh as a node
runs it: its own addresses are skipped, every other one is counted."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from controller.cli.demo_net import parse_pings, ping_script


@pytest.mark.skipif(shutil.which("ping") is None or shutil.which("ip") is None,
                    reason="needs ping and ip")
def test_the_ping_script_counts_each_other_address_and_skips_its_own() -> None:
    # 127.0.0.1 is an address of this machine; 127.0.0.2 answers (lo holds 127/8) but is
    # no interface address: a peer.
    out = subprocess.run(["sh", "-c", ping_script(["127.0.0.1", "127.0.0.2"], count=2)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert parse_pings(out.stdout) == {"127.0.0.2": (2, 2)}, out.stdout


def test_unparsable_lines_are_left_out() -> None:
    assert parse_pings("198.19.77.2 3 3\nping: garbage\n198.19.77.3 3 1 x\n") == {
        "198.19.77.2": (3, 3)}
