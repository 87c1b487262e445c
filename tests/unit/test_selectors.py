"""Label selectors: parsing, matching, printing back, error positions, and ``--label`` parsing."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.errors import SelectorError
from protocol.selectors import MAX_SELECTOR_LEN, Requirement, Selector, parse_labels

AWS_EAST = {"provider": "aws", "region": "us-east-1", "tier": "web"}
AWS_EU_SPOT = {"provider": "aws", "region": "eu-west-1", "spot": "true"}
GCP = {"provider": "gcp", "region": "europe-west4", "tier": "db"}
BARE: dict[str, str] = {}
EMPTY_TIER = {"provider": "onprem", "tier": ""}

# selector, label sets it matches, label sets it does not match
MATCH_TABLE: list[tuple[str, list[dict[str, str]], list[dict[str, str]]]] = [
    ("", [AWS_EAST, GCP, BARE], []),
    ("   ", [AWS_EAST, BARE], []),
    ("provider=aws", [AWS_EAST, AWS_EU_SPOT], [GCP, BARE, EMPTY_TIER]),
    ("provider==aws", [AWS_EAST, AWS_EU_SPOT], [GCP, BARE]),
    ("provider!=aws", [GCP, BARE, EMPTY_TIER], [AWS_EAST, AWS_EU_SPOT]),
    ("tier=", [EMPTY_TIER], [AWS_EAST, BARE]),
    ("tier!=", [AWS_EAST, GCP, BARE], [EMPTY_TIER]),
    ("region in (us-east-1,eu-west-1)", [AWS_EAST, AWS_EU_SPOT], [GCP, BARE]),
    ("region in (europe-west4)", [GCP], [AWS_EAST, BARE]),
    ("region notin (us-east-1,eu-west-1)", [GCP, BARE, EMPTY_TIER], [AWS_EAST, AWS_EU_SPOT]),
    ("spot", [AWS_EU_SPOT], [AWS_EAST, GCP, BARE]),
    ("tier", [AWS_EAST, GCP, EMPTY_TIER], [AWS_EU_SPOT, BARE]),
    ("!spot", [AWS_EAST, GCP, BARE], [AWS_EU_SPOT]),
    ("provider=aws,!spot", [AWS_EAST], [AWS_EU_SPOT, GCP, BARE]),
    (
        "provider=aws,region in (us-east-1,eu-west-1),!spot",
        [AWS_EAST],
        [AWS_EU_SPOT, GCP, BARE],
    ),
    (
        "  provider = aws ,  region  in  ( us-east-1 , eu-west-1 ) , ! spot  ",
        [AWS_EAST],
        [AWS_EU_SPOT, GCP],
    ),
    ("\tprovider!=gcp,\ntier", [AWS_EAST, EMPTY_TIER], [GCP, AWS_EU_SPOT, BARE]),
    ("provider in(aws,gcp),tier notin(db)", [AWS_EAST, AWS_EU_SPOT], [GCP, EMPTY_TIER]),
    ("provider=aws,provider=gcp", [], [AWS_EAST, GCP, BARE]),  # AND of contradictions
    ("tier,!tier", [], [AWS_EAST, BARE]),
    (
        "cloud.example.com/zone=a:b/c,k8s_x-y.z=v.1",
        [{"cloud.example.com/zone": "a:b/c", "k8s_x-y.z": "v.1"}],
        [{"cloud.example.com/zone": "a:b/c"}],
    ),
    ("in=notin", [{"in": "notin"}], [{"notin": "in"}]),  # operator words as key and value
    ("in in (in),notin notin (notin)", [{"in": "in"}, {"in": "in", "notin": "x"}], [BARE]),
    ("region in (us-east-1, us-east-1)", [AWS_EAST], [GCP]),  # duplicate values collapse
]


@pytest.mark.parametrize(("text", "yes", "no"), MATCH_TABLE, ids=[repr(r[0]) for r in MATCH_TABLE])
def test_matches(text: str, yes: list[dict[str, str]], no: list[dict[str, str]]) -> None:
    sel = Selector.parse(text)
    for labels in yes:
        assert sel.matches(labels), f"{text!r} should match {labels}"
    for labels in no:
        assert not sel.matches(labels), f"{text!r} should not match {labels}"


@pytest.mark.parametrize("text", [r[0] for r in MATCH_TABLE], ids=[repr(r[0]) for r in MATCH_TABLE])
def test_str_round_trips(text: str) -> None:
    sel = Selector.parse(text)
    assert Selector.parse(str(sel)) == sel
    assert str(Selector.parse(str(sel))) == str(sel)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("", ""),
        ("provider==aws", "provider=aws"),
        (" a = b ", "a=b"),
        ("region in (b, a, b)", "region in (a,b)"),
        ("x notin(z,y)", "x notin (y,z)"),
        ("! spot", "!spot"),
        ("spot , tier", "spot,tier"),
    ],
)
def test_canonical_form(text: str, canonical: str) -> None:
    assert str(Selector.parse(text)) == canonical


def test_parsed_structure() -> None:
    sel = Selector.parse("provider=aws,region in (a,b),tier notin (x),!spot,gpu,k!=v")
    assert sel.requirements == (
        Requirement("provider", "=", frozenset({"aws"})),
        Requirement("region", "in", frozenset({"a", "b"})),
        Requirement("tier", "notin", frozenset({"x"})),
        Requirement("spot", "!exists"),
        Requirement("gpu", "exists"),
        Requirement("k", "!=", frozenset({"v"})),
    )
    assert not sel.is_empty


def test_empty_and_none() -> None:
    assert Selector.parse(None) == Selector() == Selector.parse("") == Selector.parse(" \t\n")
    assert Selector().is_empty
    assert str(Selector()) == ""
    assert Selector().matches({}) and Selector().matches(AWS_EAST)


# selector, expected error position, words the reason must contain
INVALID: list[tuple[str, int, str]] = [
    (",", 0, "expected a label key"),
    ("provider=aws,", 13, "expected a requirement after ','"),
    ("provider=aws,,tier", 13, "expected a label key"),
    ("=aws", 0, "expected a label key, found '='"),
    ("!=aws", 0, "expected a label key, found '!'"),
    ("provider=aws tier", 13, "invalid character 't' in value"),
    ("provider=a b", 11, "invalid character 'b' in value"),
    ("provider=aws)", 12, "invalid character ')' in value"),
    ("provider=a=b", 10, "invalid character '='"),
    ("provider=ä", 9, "invalid character 'ä'"),
    ("provider aws", 9, "expected '=', '!=', 'in', 'notin'"),
    ("provider ~ aws", 9, "expected '='"),
    ("region in us-east-1", 10, "expected '(' to open the value set"),
    ("region in", 9, "expected '(' to open the value set"),
    ("region in ()", 11, "expected a value in the set"),
    ("region in (a,)", 13, "expected a value in the set"),
    ("region in (a", 12, "expected ',' or ')' in the value set, found 'end of selector'"),
    ("region in (a b)", 13, "expected ',' or ')' in the value set, found 'b'"),
    ("region notin (a))", 16, "expected ',' or end of selector, found ')'"),
    ("region in (a),", 14, "expected a requirement after ','"),
    ("!", 1, "expected a label key, found 'end of selector'"),
    ("!!spot", 1, "expected a label key, found '!'"),
    ("!spot=true", 5, "expected ',' or end of selector, found '='"),
    ("-lead", 0, "expected a label key, found '-'"),
    ("trail-=x", 5, "expected '='"),
    ("ключ=v", 0, "expected a label key"),
    ("a" * 255 + "=v", 254, "expected '='"),  # keys are at most 254 characters
    ("k=" + "v" * 254, 255, "invalid character 'v'"),  # values at most 253
    ("k=v," * (MAX_SELECTOR_LEN // 4) + "x", 0, "longer than 4096 characters"),
]


@pytest.mark.parametrize(
    ("text", "position", "reason"), INVALID, ids=[repr(r[0][:30]) for r in INVALID]
)
def test_invalid_selectors(text: str, position: int, reason: str) -> None:
    with pytest.raises(SelectorError) as info:
        Selector.parse(text)
    err = info.value
    assert reason in err.reason
    assert err.position == position, f"{err.reason} at {err.position}"
    assert err.selector == text
    # the message shows the selector and a caret under the offending character
    assert str(err).startswith(f"invalid selector at position {position}: ")
    assert str(err).endswith(f"{text}\n{' ' * position}^")
    assert err.code == "bad_selector"
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("value", [42, b"provider=aws", ["provider=aws"]])
def test_non_string_selector(value: Any) -> None:
    with pytest.raises(SelectorError, match="selector must be a string"):
        Selector.parse(value)


def test_longest_allowed_selector_parses() -> None:
    text = ",".join(f"k{i}=v" for i in range(1000))[:MAX_SELECTOR_LEN].rstrip(",")
    text = text[: text.rfind(",")]
    assert len(text) <= MAX_SELECTOR_LEN
    assert len(Selector.parse(text).requirements) == text.count(",") + 1


# --- parse_labels -------------------------------------------------------------------------


def test_parse_labels() -> None:
    assert parse_labels(["provider=aws", " region = us-east-1 ", "empty=", "a.b/c=x:y"]) == {
        "provider": "aws",
        "region": "us-east-1",
        "empty": "",
        "a.b/c": "x:y",
    }
    assert parse_labels(()) == {}
    assert parse_labels(("k=1", "k=2")) == {"k": "2"}  # the last one wins, as on a CLI


def test_parsed_labels_match_their_own_selector() -> None:
    labels = parse_labels(["provider=aws", "tier=web"])
    assert Selector.parse("provider=aws,tier in (web,api),!spot").matches(labels)


@pytest.mark.parametrize(
    "item", ["provider", "=aws", "provider=a b", "pro vider=aws", "k=v=w", "-k=v", "k=é", ""]
)
def test_parse_labels_refuses_bad_items(item: str) -> None:
    with pytest.raises(SelectorError, match="key=value") as info:
        parse_labels(["ok=1", item])
    assert info.value.selector == item
