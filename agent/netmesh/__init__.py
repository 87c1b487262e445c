"""The node side of the overlay network: WireGuard keys, backends, apply, probes."""
