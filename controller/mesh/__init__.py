"""The overlay network's control side: networks, IPAM, peer distribution, the matrix."""
