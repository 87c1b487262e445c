"""Property tests: decode and Selector.parse never fail with anything but their own errors."""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import decode, encode
from protocol.errors import ProtocolError, SelectorError
from protocol.messages import ALL_MESSAGES, Message
from protocol.selectors import Selector
from tests.unit.test_protocol_codec import SAMPLES

# No example database: runs stay independent of each other and write no examples to disk.
FAST = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

KINDS = [str(cls.__struct_config__.tag) for cls in ALL_MESSAGES]
FIELD_NAMES = sorted(
    {f.name for cls in ALL_MESSAGES for f in msgspec.structs.fields(cls)} | {"kind", "v", "zz"}
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(KINDS)
)
structures = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELD_NAMES), children, max_size=5)
    ),
    max_leaves=20,
)
small_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=4,
)


def _typed(t: mi.Type) -> st.SearchStrategy[Any]:
    """Values of the wire type ``t`` (so that some generated maps are valid messages)."""
    if isinstance(t, mi.StrType):
        return st.text(max_size=8)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.IntType):
        return st.integers(-(2**63), 2**63 - 1)
    if isinstance(t, mi.FloatType):
        return st.floats()
    if isinstance(t, mi.BytesType):
        return st.binary(max_size=16)
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.UnionType):
        return st.one_of([_typed(x) for x in t.types])
    if isinstance(t, mi.ListType):
        return st.lists(_typed(t.item_type), max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(_typed(t.key_type), _typed(t.value_type), max_size=3)
    if isinstance(t, mi.StructType) and t.array_like:
        return st.tuples(*(_typed(f.type) for f in t.fields if f.required)).map(list)
    return small_values


FIELD_TYPES = {
    info.cls: {f.name: _typed(f.type) for f in info.fields}
    for info in mi.multi_type_info(ALL_MESSAGES)
    if isinstance(info, mi.StructType)
}


@st.composite
def message_like(draw: st.DrawFn) -> dict[str, Any]:
    """A map that looks like a message: a kind, maybe a version, fields mostly of the right type."""
    cls = draw(st.sampled_from(ALL_MESSAGES))
    obj: dict[str, Any] = {}
    for name, typed in FIELD_TYPES[cls].items():
        if name == "v" or draw(st.integers(0, 9)) == 0:
            continue  # sometimes a field is missing
        obj[name] = draw(typed if draw(st.integers(0, 9)) else small_values)
    if draw(st.booleans()):
        obj["zz_unknown"] = draw(small_values)
    obj["kind"] = (
        draw(st.sampled_from(KINDS)) if draw(st.integers(0, 9)) == 0 else cls.__struct_config__.tag
    )
    if draw(st.booleans()):
        obj["v"] = draw(st.sampled_from([1, 1, 1, 0, 2, -1, True, "1", None]))
    return obj


def _check_decode(data: Any) -> None:
    for expect in (None, *ALL_MESSAGES):
        try:
            msg = decode(data, expect)
        except ProtocolError as exc:
            assert exc.reason
            continue
        # whatever decodes is a valid message that encodes and decodes to itself
        assert isinstance(msg, Message)
        assert expect is None or type(msg) is expect
        _assert_round_trips(msg)


def _assert_round_trips(msg: Message) -> None:
    # compared as bytes: a NaN inside would make the messages themselves unequal
    assert encode(decode(encode(msg), type(msg))) == encode(msg)


@FAST
@given(st.binary(max_size=256))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    _check_decode(data)


@FAST
@given(structures)
def test_decode_arbitrary_msgpack(obj: Any) -> None:
    _check_decode(msgspec.msgpack.encode(obj))


@FAST
@given(message_like())
def test_decode_message_like_maps(obj: dict[str, Any]) -> None:
    _check_decode(msgspec.msgpack.encode(obj))


@FAST
@given(st.sampled_from(ALL_MESSAGES), st.data())
def test_decode_mutated_valid_messages(cls: type[Message], data: st.DataObject) -> None:
    # start from a realistic valid message, then overwrite, cut or extend some of its bytes
    encoded = bytearray(encode(SAMPLES[cls]))
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        i = data.draw(st.integers(0, len(encoded) - 1), label="index")
        how = data.draw(st.sampled_from(["set", "cut", "insert"]), label="how")
        if how == "set":
            encoded[i] = data.draw(st.integers(0, 255), label="byte")
        elif how == "cut" and len(encoded) > 1:
            del encoded[i]
        else:
            encoded.insert(i, data.draw(st.integers(0, 255), label="byte"))
    _check_decode(bytes(encoded))


def _check_selector(text: str) -> None:
    try:
        sel = Selector.parse(text)
    except SelectorError as exc:
        assert 0 <= exc.position <= len(text)
        return
    again = Selector.parse(str(sel))
    assert again == sel
    assert str(again) == str(sel)
    # matching never raises, whatever the labels
    sel.matches({})
    sel.matches({r.key: "x" for r in sel.requirements})


@FAST
@given(st.text(max_size=60))
def test_selector_parse_arbitrary_text(text: str) -> None:
    _check_selector(text)


SELECTOR_PIECES = st.sampled_from(
    [*"abcxyz0129=!,() ._-/:", "in", "notin", " in ", " notin ", "==", "!=", "\t"]
)


@settings(FAST, max_examples=1000)
@given(st.lists(SELECTOR_PIECES, max_size=25).map("".join))
def test_selector_parse_selector_alphabet(text: str) -> None:
    _check_selector(text)


# built from alphabets rather than st.from_regex, which is several times slower
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789"
_alnum = st.sampled_from(_ALNUM)
label_key = _alnum | st.tuples(_alnum, st.text(_ALNUM + "._/-", max_size=8), _alnum).map("".join)
label_value = st.text(_ALNUM + "._:/-", max_size=10)
requirement_text = (
    st.tuples(label_key, st.sampled_from(["=", "==", "!="]), label_value).map("".join)
    | st.tuples(
        label_key,
        st.sampled_from([" in ", " notin ", " in", "  notin  "]),
        st.lists(label_value.filter(bool), min_size=1, max_size=4).map(",".join),
    ).map(lambda t: f"{t[0]}{t[1]}({t[2]})")
    | label_key
    | label_key.map(lambda k: f"!{k}")
)


@FAST
@given(st.lists(requirement_text, max_size=6).map(" , ".join))
def test_generated_valid_selectors_parse_and_round_trip(text: str) -> None:
    sel = Selector.parse(text)
    assert len(sel.requirements) == (text.count(" , ") + 1 if text else 0)
    assert Selector.parse(str(sel)) == sel
