"""MessagePack encoding and checked decoding of protocol messages.

Anything that is not a valid message of the expected type comes out as one
``ProtocolError`` with a reason; nothing else escapes ``decode``.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any, TypeVar, overload

import msgspec

from protocol.errors import PayloadTooLarge, ProtocolError, UnsupportedVersion
from protocol.messages import ALL_MESSAGES, RETIRED_KINDS, AnyMessage, Message
from protocol.version import SUPPORTED_VERSIONS

DEFAULT_MAX_PAYLOAD = 1024 * 1024  # NATS' default max_payload
# The largest encoded MetricBatch the METRICS stream stores (a real 64-core batch is about
# 25 kB): the agent splits a bigger one, the stream refuses it, the controller counts it.
METRIC_BATCH_MAX = 256 * 1024

M = TypeVar("M", bound=Message)
# What NATS clients hand over; decode accepts any of them without copying.
Payload = bytes | bytearray | memoryview

_KNOWN_KINDS = frozenset(
    str(cls.__struct_config__.tag) for cls in ALL_MESSAGES
)


class _Header(msgspec.Struct):
    kind: Any = None
    v: Any = None


# How msgspec spells the bound of protocol.messages.Finite in its error messages.
_FLOAT_BOUND = repr(sys.float_info.max)

_encoder = msgspec.msgpack.Encoder()
_any_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(AnyMessage)
_header_decoder = msgspec.msgpack.Decoder(_Header)


# A compressed payload is one MessagePack ext value of type ZLIB_EXT whose data is a zlib
# stream of the message's MessagePack. Only for a receiver that said it reads it
# (MeshJoin ``accepts``: ZLIB).
ZLIB_EXT = 1
ZLIB = "zlib"
# Below this a message is sent as it is: zlib's own bytes and the CPU are not worth it.
COMPRESS_MIN = 1024
# zlib level: a 1,000-peer snapshot (198 kB) takes ~2 ms of CPU to 57 kB at 3, ~3.3 ms to
# 54 kB at 6; a controller answering a mass resync makes one per member.
COMPRESS_LEVEL = 3
_EXT_HEADERS = {0xC7: 1, 0xC8: 2, 0xC9: 4}  # ext 8 / 16 / 32: bytes of the length


def encode(msg: Message, *, compress: bool = False) -> bytes:
    """MessagePack; with ``compress``, a ZLIB_EXT value when the message is at least
    COMPRESS_MIN bytes and compressing makes it smaller."""
    data = _encoder.encode(msg)
    if compress and len(data) >= COMPRESS_MIN:
        packed = _encoder.encode(msgspec.msgpack.Ext(ZLIB_EXT, zlib.compress(data, COMPRESS_LEVEL)))
        if len(packed) < len(data):
            return packed
    return data


def _compressed(data: Payload) -> memoryview | None:
    """The zlib stream of a compressed payload (a ZLIB_EXT value that fills all of it), or
    None for anything else."""
    try:
        view = memoryview(data).cast("B")
    except TypeError:  # not contiguous: no message either way, msgspec will say so
        return None
    if 0xD4 <= view[0] <= 0xD8:  # fixext 1 / 2 / 4 / 8 / 16
        width, length = 0, 1 << (view[0] - 0xD4)
    else:
        width = _EXT_HEADERS.get(view[0], -1)
        if width < 0 or len(view) < 2 + width:
            return None
        length = int.from_bytes(view[1:1 + width], "big")
    if len(view) < 2 + width:
        return None
    if view[1 + width] != ZLIB_EXT or 2 + width + length != len(view):
        return None
    return view[2 + width:]


def _inflate(stream: memoryview, max_size: int) -> bytes:
    """The MessagePack bytes of a compressed payload, never more than ``max_size`` of them
    (a small payload that would inflate past it is refused, not unpacked)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(stream, max_size + 1)
    except zlib.error as exc:
        raise ProtocolError(f"compressed payload does not inflate: {exc}",
                            size=len(stream)) from None
    if len(out) > max_size or inflater.unconsumed_tail:
        raise PayloadTooLarge(len(out), max_size)
    if not inflater.eof:
        raise ProtocolError("compressed payload is truncated", size=len(stream))
    return out


@overload
def decode(data: Payload, expect: type[M], *, max_size: int = ...) -> M: ...
@overload
def decode(data: Payload, expect: None = None, *, max_size: int = ...) -> AnyMessage: ...


def decode(
    data: Payload, expect: type[M] | None = None, *, max_size: int = DEFAULT_MAX_PAYLOAD
) -> M | AnyMessage:
    """Decode ``data`` into a message (of type ``expect`` when given).

    The size is checked before any parsing. Raises ``ProtocolError`` (or a subclass) only.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"payload must be bytes, not {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_size:
        raise PayloadTooLarge(size, max_size)
    if size == 0:
        raise ProtocolError("empty payload", size=0)
    stream = _compressed(data)
    if stream is not None:
        data = _inflate(stream, max_size)
        size = len(data)
        if size == 0:
            raise ProtocolError("empty payload", size=0)
    # Tuple membership compares by identity/equality, so an unhashable ``expect`` is
    # refused here instead of raising TypeError.
    if expect is not None and expect not in ALL_MESSAGES:
        raise ProtocolError(f"{expect!r} is not a protocol message type")
    try:
        # Always through the tagged union: a typed msgspec decoder would accept a map
        # that lacks ``kind`` altogether, and the union's tag dispatch costs next to nothing.
        msg = _any_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _explain(data, expect, exc) from None
    except Exception as exc:  # msgspec can raise others on pathological input
        raise ProtocolError(f"undecodable payload: {exc}", size=size) from None
    if msg.v not in SUPPORTED_VERSIONS:
        raise UnsupportedVersion(msg.v, SUPPORTED_VERSIONS, kind=_kind_of(msg))
    if expect is not None and type(msg) is not expect:
        want, got = str(expect.__struct_config__.tag), _kind_of(msg)
        raise ProtocolError(f"expected a {want!r} message, got {got!r}", kind=got, size=size)
    return msg  # type: ignore[no-any-return]


def _kind_of(msg: Message) -> str:
    return str(type(msg).__struct_config__.tag)


def _explain(data: Payload, expect: type[Message] | None, exc: Exception) -> ProtocolError:
    """Turn a decode failure into the most useful reason we can give."""
    size = len(data)
    try:
        header = _header_decoder.decode(data)
    except Exception:
        return ProtocolError(f"not a msgpack map: {exc}", size=size)
    kind, version = header.kind, header.v
    if isinstance(version, int) and not isinstance(version, bool):
        if version not in SUPPORTED_VERSIONS:
            return UnsupportedVersion(
                version, SUPPORTED_VERSIONS, kind=kind if isinstance(kind, str) else None
            )
    if kind is None:
        return ProtocolError("message has no 'kind' field", size=size)
    if not isinstance(kind, str):
        return ProtocolError("message 'kind' must be a string", size=size)
    if kind in RETIRED_KINDS:
        return ProtocolError(
            f"{kind!r} is the old shape of {RETIRED_KINDS[kind]!r}, which this build speaks "
            "(from an older peer? upgrade it)", kind=kind, size=size
        )
    if kind not in _KNOWN_KINDS:
        return ProtocolError(
            f"unknown message kind {kind!r} (from a newer peer?)", kind=kind, size=size
        )
    if expect is not None:
        want = str(expect.__struct_config__.tag)
        if kind != want:
            return ProtocolError(f"expected a {want!r} message, got {kind!r}", kind=kind, size=size)
    reason = str(exc)
    if reason.startswith("Invalid value") and reason.endswith((".payload.type`", ".data.type`")):
        # A payload type this build does not know: say so, as for an unknown kind.
        where = reason.rpartition(" - at ")[2]
        return ProtocolError(f"unknown {where.strip('`$.')} in {kind!r} message: "
                             f"{reason.partition(' - at ')[0]} (from a newer peer?)",
                             kind=kind, size=size)
    if _FLOAT_BOUND in reason:  # the Finite/Duration bounds: say what they mean
        where = reason.rpartition(" - at ")[2] or "a field"
        reason = f"{where} must be a finite number (not NaN or infinity)"
    return ProtocolError(f"invalid {kind!r} message: {reason}", kind=kind, size=size)
