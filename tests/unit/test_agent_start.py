"""What the agent's start relies on without importing it (agent/netmesh is imported only
once the node is in a network)."""

from __future__ import annotations

from pathlib import Path

from agent.netmesh.keys import KEY_FILE, KeyStore
from agent.runtime import MESH_KEY_PATH


def test_mesh_key_path_is_where_netmesh_keeps_the_key(tmp_path: Path) -> None:
    assert MESH_KEY_PATH == ("wireguard", KEY_FILE)
    # NetMesh keeps its KeyStore in state_dir/wireguard (agent/netmesh/mesh.py).
    store = KeyStore(tmp_path / "wireguard")
    assert tmp_path.joinpath(*MESH_KEY_PATH).read_text().strip() == \
        store.current.to_base64()
