"""Protocol version numbers."""

PROTOCOL_VERSION = 1
# Versions this build can decode. A peer speaking a version outside this set is refused
# with a clear ProtocolError instead of being half-understood.
SUPPORTED_VERSIONS = frozenset({1})
