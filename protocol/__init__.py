"""The contract between controller and agent: subjects, messages, codec, signatures, selectors.

No I/O happens in this package.
"""

from protocol.version import PROTOCOL_VERSION, SUPPORTED_VERSIONS

__all__ = ["PROTOCOL_VERSION", "SUPPORTED_VERSIONS"]
