"""Infra spec parsing and validation: every error names its field."""

from __future__ import annotations

import json

import pytest

from controller.provision.model import SizeQuery
from controller.provision.providers.sim import default_catalog
from controller.provision.spec import SpecError, parse_spec, resolve_size

CATALOGS = {"sim": default_catalog("sim"), "sim-b": default_catalog("sim-b")}

GOOD = """
name: shop
labels: {team: web}
groups:
  - name: fe
    provider: sim
    regions: [east-1/east-1b, west-1]
    size: {vcpus: 2, memory_gb: 4}
    count: 3
    labels: {tier: front}
  - name: db
    provider: sim-b
    regions: [eu-1]
    size: large
    count: 0
    on_partial_failure: rollback
"""


def test_good_yaml_and_json_parse_the_same() -> None:
    spec = parse_spec(GOOD, catalogs=CATALOGS, yaml_text=True)
    assert spec.name == "shop" and [g.name for g in spec.groups] == ["fe", "db"]
    assert spec.groups[0].size == SizeQuery(vcpus=2, memory_gb=4)
    assert spec.groups[1].on_partial_failure == "rollback" and spec.groups[1].count == 0
    import yaml

    as_json = json.dumps(yaml.safe_load(GOOD)).encode()
    assert parse_spec(as_json, catalogs=CATALOGS, yaml_text=False) == spec
    assert parse_spec(as_json, catalogs=CATALOGS) == spec  # sniffed


def group(**over: object) -> dict:
    return {"name": "g", "provider": "sim", "regions": ["east-1"], "size": "small", **over}


BAD = [
    ({"name": "x", "groups": [group(regions=["mars-1"])]},
     "groups[0].regions[0]: unknown region 'mars-1' for provider sim (known: ap-1, east-1, "
     "eu-1, west-1)"),
    ({"name": "x", "groups": [group(regions=["east-1/east-1z"])]},
     "groups[0].regions[0]: unknown zone 'east-1z' in region east-1 (known: east-1a, "
     "east-1b, east-1c)"),
    ({"name": "x", "groups": [group(provider="aws")]},
     "groups[0].provider: unknown provider 'aws' (known: sim, sim-b)"),
    ({"name": "x", "groups": [group(size="huge")]},
     "groups[0].size: unknown size 'huge' for provider sim"),
    ({"name": "x", "groups": [group(size="xlarge", regions=["west-1"])]},
     "groups[0].size: size 'xlarge' is not offered in region west-1"),
    ({"name": "x", "groups": [group(size={"vcpus": 64, "memory_gb": 1})]},
     "groups[0].size: no size of provider sim in region east-1 has 64 vCPUs and 1 GB"),
    ({"name": "x", "groups": [group(size={"vcpus": 2, "mem": 1})]},
     "groups[0].size.mem: unknown key"),
    ({"name": "x", "groups": [group(image="windows-95")]},
     "groups[0].image: unknown image 'windows-95' for provider sim"),
    ({"name": "x", "groups": [group(count=-1)]}, "groups[0].count: must be 0 or more, not -1"),
    ({"name": "x", "groups": [group(), group()]},
     "groups[1].name: duplicate group 'g' (also groups[0])"),
    ({"name": "x", "groups": [group(labels={"bad key": "v"})]},
     "groups[0].labels: invalid label 'bad key'"),
    ({"name": "x", "groups": [group(labels={"barista-node": "v"})]},
     "groups[0].labels.barista-node: label keys starting with 'barista-' are reserved"),
    ({"name": "x", "labels": {"k": "a b"}, "groups": [group()]}, "labels: invalid label 'k'"),
    ({"name": "x", "groups": [group(colour="red")]},
     "groups[0].colour: unknown key (known: name, provider, regions"),
    ({"name": "x", "groups": [group()], "extra": 1}, "extra: unknown key (known: name, groups"),
    ({"name": "Web_1", "groups": [group()]}, "name: 'Web_1' is not a valid name"),
    ({"name": "x", "groups": [group(name="-g")]}, "groups[0].name: '-g' is not a valid name"),
    ({"name": "x" * 31, "groups": [group()]}, "name: 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx' is not"),
    ({"name": "x", "groups": []}, "groups: an infra needs at least one group"),
    ({"name": "x", "groups": [group(regions=[])]}, "groups[0].regions: give at least one"),
    ({"name": "x", "groups": [group(count="3")]}, "groups[0].count: expected `int`, got `str`"),
    ({"name": "x", "groups": [group(on_partial_failure="retry")]},
     "groups[0].on_partial_failure: invalid enum value 'retry'"),
    ({"name": "x", "groups": [group(ssh_public_key="-----BEGIN OPENSSH PRIVATE KEY-----")]},
     "groups[0].ssh_public_key: not an OpenSSH public key"),
    ({"groups": [group()]}, "name: is required"),
    ([1, 2], "spec must be a mapping"),
]


@pytest.mark.parametrize(("doc", "expected"), BAD, ids=[e[:40] for _, e in BAD])
def test_bad_specs_name_the_field(doc: object, expected: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(json.dumps(doc), catalogs=CATALOGS)
    assert expected in info.value.message, info.value.message
    assert info.value.status == 400


def test_every_error_is_reported_at_once() -> None:
    doc = {"name": "x", "groups": [group(count=-2, regions=["mars-1"]), group(provider="no")]}
    with pytest.raises(SpecError) as info:
        parse_spec(json.dumps(doc), catalogs=CATALOGS)
    fields = [d["field"] for d in info.value.details]
    assert fields == ["groups[0].count", "groups[0].regions[0]", "groups[1].name",
                      "groups[1].provider"]


def test_bad_yaml_says_where() -> None:
    with pytest.raises(SpecError, match=r"not valid YAML at line 3, column 3"):
        parse_spec("name: x\ngroups: [\n  - a: : b", catalogs=CATALOGS, yaml_text=True)
    with pytest.raises(SpecError, match="not valid JSON"):
        parse_spec("{", catalogs=CATALOGS, yaml_text=False)


def test_size_query_resolves_to_the_cheapest_per_region() -> None:
    cat = CATALOGS["sim"]
    assert resolve_size(cat, SizeQuery(vcpus=1, memory_gb=1), "east-1").size.name == "small"
    assert resolve_size(cat, SizeQuery(vcpus=3, memory_gb=8), "east-1").size.name == "large"
    r = resolve_size(cat, SizeQuery(vcpus=8, memory_gb=8), "eu-1")
    assert r.size.name == "xlarge" and r.price_hour == pytest.approx(0.3328 * 1.12, abs=1e-4)
    with pytest.raises(LookupError, match="west-1"):
        resolve_size(cat, SizeQuery(vcpus=8, memory_gb=8), "west-1")


def test_an_ssh_public_key_is_kept() -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3k ops@laptop"
    spec = parse_spec(json.dumps({"name": "x", "groups": [group(ssh_public_key=key)]}),
                      catalogs=CATALOGS)
    assert spec.groups[0].ssh_public_key == key
