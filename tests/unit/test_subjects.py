"""Subject builders: the names of DESIGN.md section 3, token checks, prefixes, parsing back."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.errors import InvalidName
from protocol.subjects import DEFAULT_PREFIX, Subjects, check_token

S = Subjects()


def test_documented_subjects() -> None:
    # the table of DESIGN.md section 3
    assert DEFAULT_PREFIX == "barista"
    assert S.enroll == "barista.enroll"
    assert S.heartbeat("n-1") == "barista.node.n-1.hb"
    assert S.metrics("n-1") == "barista.node.n-1.metrics"
    assert S.events("n-1") == "barista.node.n-1.events"
    assert S.cmd_all == "barista.cmd.all"
    assert S.cmd_node("n-1") == "barista.node.n-1.cmd"
    assert S.mesh_delta("overlay_1") == "barista.mesh.overlay_1.delta"


def test_wildcards_and_other_subjects() -> None:
    assert S.heartbeat_any == "barista.node.*.hb"
    assert S.metrics_any == "barista.node.*.metrics"
    assert S.events_any == "barista.node.*.events"
    assert S.node_all("n-1") == "barista.node.n-1.>"
    assert S.mesh_all == "barista.mesh.>"
    assert S.app_sync("n-1") == "barista.node.n-1.apps.sync"
    assert S.app_sync_any == "barista.node.*.apps.sync"
    assert S.controller_events == "barista.fleet.events"
    assert S.inbox_prefix("n-1") == "_INBOX_n-1"
    assert S.stream_subjects_metrics == ["barista.node.*.metrics"]
    assert S.stream_subjects_events == ["barista.node.*.events", "barista.fleet.events"]


def test_wildcards_cover_the_concrete_subjects() -> None:
    def covers(pattern: str, subject: str) -> bool:
        p, s = pattern.split("."), subject.split(".")
        if p[-1] == ">":
            return len(s) >= len(p) and all(a in ("*", b) for a, b in zip(p[:-1], s, strict=False))
        return len(p) == len(s) and all(a in ("*", b) for a, b in zip(p, s, strict=True))

    node = "node-7"
    assert covers(S.heartbeat_any, S.heartbeat(node))
    assert covers(S.metrics_any, S.metrics(node))
    assert covers(S.events_any, S.events(node))
    assert covers(S.app_sync_any, S.app_sync(node))
    for subject in (S.heartbeat(node), S.metrics(node), S.events(node), S.cmd_node(node),
                    S.app_sync(node)):
        assert covers(S.node_all(node), subject)
        assert not covers(S.node_all("other"), subject)
    assert covers(S.mesh_all, S.mesh_delta("net1"))
    assert covers(S.mesh_delta_any, S.mesh_delta("net1"))
    for own, any_ in ((S.mesh_join, S.mesh_join_any), (S.mesh_resync, S.mesh_resync_any),
                      (S.mesh_key, S.mesh_key_any), (S.mesh_health, S.mesh_health_any)):
        assert covers(any_, own(node))
        assert covers(S.node_all(node), own(node))  # the node may publish them
    for inbound in (S.mesh_snapshot(node), S.mesh_rotate(node)):
        assert not covers(S.mesh_all, inbound)


def test_mesh_subjects() -> None:
    assert S.mesh_snapshot("n-1") == "barista.node.n-1.mesh.snapshot"
    assert S.mesh_rotate("n-1") == "barista.node.n-1.mesh.rotate"
    assert S.mesh_join("n-1") == "barista.node.n-1.mesh.join"
    assert S.mesh_resync("n-1") == "barista.node.n-1.mesh.resync"
    assert S.mesh_key("n-1") == "barista.node.n-1.mesh.key"
    assert S.mesh_health("n-1") == "barista.node.n-1.mesh.health"
    assert S.stream_subjects_mesh == ["barista.mesh.*.delta"]


BAD_TOKENS = ["a.b", "*", ">", "", "a b", "x" * 65, "a\n", "\na", "a\tb", "é", "a*", "a>", "a/b"]
BUILDERS = ["heartbeat", "metrics", "events", "node_all", "cmd_node", "inbox_prefix",
            "app_sync", "mesh_snapshot", "mesh_rotate", "mesh_join", "mesh_resync",
            "mesh_key", "mesh_health"]


@pytest.mark.parametrize("bad", BAD_TOKENS, ids=repr)
@pytest.mark.parametrize("builder", BUILDERS)
def test_invalid_node_ids_are_refused(builder: str, bad: str) -> None:
    with pytest.raises(InvalidName, match="node id") as info:
        getattr(S, builder)(bad)
    assert info.value.code == "invalid_name"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", BAD_TOKENS, ids=repr)
def test_invalid_network_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidName, match="network name"):
        S.mesh_delta(bad)


@pytest.mark.parametrize("bad", [None, 7, b"node"])
def test_non_string_tokens_are_refused(bad: Any) -> None:
    with pytest.raises(InvalidName):
        S.heartbeat(bad)


@pytest.mark.parametrize("good", ["a", "x" * 64, "Node_01-b", "0", "-", "_"])
def test_valid_tokens(good: str) -> None:
    assert check_token(good) == good
    assert S.heartbeat(good) == f"barista.node.{good}.hb"


def test_check_token_names_what_was_wrong() -> None:
    with pytest.raises(InvalidName, match=r"widget 'a\.b' must be 1-64 characters"):
        check_token("a.b", "widget")


@pytest.mark.parametrize("builder", ["heartbeat", "metrics", "events", "cmd_node", "app_sync"])
@pytest.mark.parametrize("prefix", ["barista", "acme", "acme.prod", "a.b.c.d"])
def test_node_id_of_parses_back(builder: str, prefix: str) -> None:
    subjects = Subjects(prefix)
    assert subjects.node_id_of(getattr(subjects, builder)("node-42")) == "node-42"


@pytest.mark.parametrize(
    "subject",
    [
        "barista.node.n-1",  # no leaf
        "barista.node.",
        "barista.node..hb",
        "barista.node.*.hb",
        "barista.enroll",
        "barista.cmd.all",
        "other.node.n-1.hb",
        "baristax.node.n-1.hb",
        "barista.node.n-1\n.hb",
        "",
    ],
)
def test_node_id_of_refuses_other_subjects(subject: str) -> None:
    assert S.node_id_of(subject) is None


def test_node_id_of_with_a_different_prefix() -> None:
    assert Subjects("acme").node_id_of("barista.node.n-1.hb") is None
    assert S.node_id_of("acme.node.n-1.hb") is None


def test_custom_prefix() -> None:
    s = Subjects("acme.prod")
    assert s.enroll == "acme.prod.enroll"
    assert s.heartbeat("n-1") == "acme.prod.node.n-1.hb"
    assert s.cmd_all == "acme.prod.cmd.all"
    assert s.mesh_delta("net") == "acme.prod.mesh.net.delta"
    assert s.heartbeat_any == "acme.prod.node.*.hb"
    assert s.stream_subjects_events == ["acme.prod.node.*.events", "acme.prod.fleet.events"]
    assert Subjects(prefix="t_1-x").cmd_all == "t_1-x.cmd.all"


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        ".",
        "a.",
        ".a",
        "a..b",
        "a.*",
        "a.>",
        "*",
        ">",
        "a b",
        "a\n",
        "a.b.c.d.e",  # at most four tokens
        "x" * 33,
        None,
        7,
    ],
    ids=repr,
)
def test_bad_prefix_is_refused(prefix: Any) -> None:
    with pytest.raises(InvalidName, match="prefix"):
        Subjects(prefix)


def test_subjects_is_immutable_and_comparable() -> None:
    assert Subjects() == Subjects("barista")
    with pytest.raises(AttributeError):
        S.prefix = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "reply",
    ["_INBOX_enroll.abc", "_INBOX_enroll.Z3n8QvH1x2.17", "_INBOX_enroll.a_b-c.d.e"],
)
def test_enroll_replies_inside_the_enroll_inbox_are_accepted(reply: str) -> None:
    assert S.is_enroll_reply(reply)


@pytest.mark.parametrize(
    "reply",
    [
        "", "_INBOX_enroll", "_INBOX_enroll.", "_INBOX_enroll.*", "_INBOX_enroll.>",
        "_INBOX_enroll.a.b.c.d", "_INBOX_enrollx.a", "_INBOX.abc.1", "_INBOX_n-1.abc",
        "$JS.API.STREAM.PURGE.KV_nodes", "$KV.nodes.n-1", "barista.node.n-1.cmd",
        "_INBOX_enroll.a\n", "_INBOX_enroll.a b", "_INBOX_enroll.a.$JS",
    ],
    ids=repr,
)
def test_other_reply_subjects_are_not_enroll_replies(reply: str) -> None:
    assert not S.is_enroll_reply(reply)


def test_node_replies_only_inside_that_nodes_inbox() -> None:
    assert S.is_node_reply("n-1", "_INBOX_n-1.Z3n8QvH1x2.17")
    for reply in ("_INBOX_n-2.x.1", "_INBOX_n-1", "_INBOX_n-10.x", "$KV.jobs.j1",
                  "_INBOX_enroll.x.1", "_INBOX_n-1.*", ""):
        assert not S.is_node_reply("n-1", reply), reply
