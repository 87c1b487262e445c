"""Issue 8 regression tests (helper "reply"): reply subjects a peer names, least privilege
of the controller's own connections, proof of possession at enrollment, sealed enrollment
replies and token labels stored as validated.

The attacks use raw nats-py clients with exactly the credentials an outsider has (the
public enroll user) or a real node has (its nkey seed), against a real controller with an
embedded nats-server. Imports of APIs added by the fixes stay inside the tests that need
them, so that the attacks themselves also run against the code before the fixes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import nacl.signing
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS

from agent.identity import Identity
from agent.runtime import Agent
from controller.apps.deployer import parse_spec
from controller.jobs.engine import JobSpec
from controller.service import RunningController
from protocol import codec
from protocol.messages import AppSyncRequest, EnrollReply, EnrollRequest, SealedReply
from tests.fixtures.controller import AgentFactory
from tests.fixtures.enroll import enroll_opts, node_opts
from tests.fixtures.nats import confirm
from tests.fixtures.wait import wait_for

ENROLL = {"user": "enroll", "password": "enroll", "inbox_prefix": b"_INBOX_enroll"}
STREAMS = ("KV_nodes", "KV_tokens", "KV_jobs", "KV_apps", "METRICS", "EVENTS", "JOBS")


async def _connect(url: str, **opts: Any) -> NATS:
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, **opts)
    nc.errors = errors  # type: ignore[attr-defined]
    return nc


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Awaitable[NATS]]]:
    """Raw nats-py clients, each closed at the end of the test."""
    clients: list[NATS] = []

    async def make(url: str, **opts: Any) -> NATS:
        nc = await _connect(url, **opts)
        clients.append(nc)
        return nc

    try:
        yield make
    finally:
        for nc in clients:
            if not nc.is_closed:
                await nc.close()


async def _stream_counts(controller: RunningController) -> dict[str, int]:
    assert controller.js is not None
    out = {}
    for name in STREAMS:
        info = await controller.js.stream_info(name)
        out[name] = info.state.messages
    return out


async def _populated(controller: RunningController, agents: AgentFactory) -> Agent:
    """A controller whose every stream and bucket holds something worth erasing."""
    agent = await agents.start(labels={"role": "web"})
    await controller.tokens.create(labels={"spare": "yes"})
    job = await controller.jobs.run(JobSpec(action="ping", selector="role=web", timeout=10))
    assert job.counts == {"ok": 1}
    d = controller.deployer
    assert d is not None
    await d.deploy(parse_spec({"name": "idle", "version": "1", "selector": "role=nobody"}))
    await asyncio.wait_for(d.wait("idle"), 20)
    await wait_for(lambda: controller.hub.latest(agent.node_id) is not None, 10, "a batch")
    counts = await _stream_counts(controller)
    assert all(counts.values()), counts
    return agent


def _assert_intact(before: dict[str, int], after: dict[str, int]) -> None:
    """No stream lost messages (metrics and events keep arriving: counts may only grow)."""
    lost = {k: (before[k], after[k]) for k in before if after[k] < before[k]}
    assert not lost, f"streams or buckets lost messages (before, after): {lost}"


async def _settle(controller: RunningController, before: dict[str, int], refused: int) -> None:
    """Wait until the controller counted ``refused`` refused reply subjects, or any stream
    lost messages (the attack worked), whichever comes first."""

    async def settled() -> bool:
        now = await _stream_counts(controller)
        lost = any(now[k] < before[k] for k in before)
        return lost or controller.stats.rejected["reply_subject"] >= refused

    # Not reaching either within 5 s is left to the caller's assertions to report.
    with contextlib.suppress(AssertionError):
        await wait_for(settled, 5, "refusals counted or messages lost", interval=0.1)


# --- finding 1: reply subjects and least privilege ------------------------------------


async def test_f01_purge_as_enroll_reply_erases_nothing(
    controller: RunningController, agents: AgentFactory, raw: Any
) -> None:
    """The purge trick with only the public enroll credentials: garbage (an error reply),
    an unsigned request (a refusal) and a request with a valid token (a success), each
    naming a JetStream purge subject as its reply."""
    await _populated(controller, agents)
    spare = await controller.tokens.create()
    before = await _stream_counts(controller)
    attacker = await raw(controller.nats_url, **enroll_opts(controller))
    s = controller.subjects
    sent = 0
    for stream in STREAMS:
        purge = f"$JS.API.STREAM.PURGE.{stream}"
        await attacker.publish(s.enroll, b"\x00junk", reply=purge)
        req = EnrollRequest(token=spare.token, identity="U" + "A" * 55, hostname="x",
                            agent_version="t")
        await attacker.publish(s.enroll, codec.encode(req), reply=purge)
        sent += 2
    await attacker.flush()
    await _settle(controller, before, sent)
    _assert_intact(before, await _stream_counts(controller))
    assert controller.stats.rejected["reply_subject"] >= sent
    rejected = controller.status()["rejected"]
    assert isinstance(rejected, dict) and rejected["reply_subject"] >= sent
    assert attacker.errors == []  # the enroll user may publish there; the controller refused


async def test_f01_kv_key_as_reply_overwrites_no_record(
    controller: RunningController, agents: AgentFactory, raw: Any
) -> None:
    """``$KV.nodes.<id>`` as the reply of an enrollment (enroll credentials) and
    ``$KV.jobs.<id>`` as the reply of an app sync (a real node's nkey) change nothing."""
    victim = await _populated(controller, agents)
    assert victim.identity is not None
    assert controller.js is not None
    nodes_kv = await controller.js.key_value("nodes")
    jobs_kv = await controller.js.key_value("jobs")
    (job,) = controller.jobs.recent()
    node_rev = (await nodes_kv.get(victim.node_id)).revision
    job_rev = (await jobs_kv.get(job.id)).revision
    before = await _stream_counts(controller)
    s = controller.subjects

    outsider = await raw(controller.nats_url, **enroll_opts(controller))
    await outsider.publish(s.enroll, b"\x00junk", reply=f"$KV.nodes.{victim.node_id}")
    # A real node, with its own nkey, on the app-sync subjects of before and after the fix.
    node = await raw(controller.nats_url, **node_opts(victim),
                     inbox_prefix=f"_INBOX_{victim.node_id}".encode())
    sync = codec.encode(AppSyncRequest(node_id=victim.node_id))
    for subject in (f"{s.prefix}.apps.sync", f"{s.prefix}.node.{victim.node_id}.apps.sync"):
        await node.publish(subject, sync, reply=f"$KV.jobs.{job.id}")
        # the node's own inbox prefix, but a KV key after it is still not its inbox
        await node.publish(subject, sync, reply=f"$KV.nodes.{victim.node_id}")
    await outsider.flush()
    await node.flush()
    await _settle(controller, before, 3)
    # A grace period for a negative, kept on purpose: a write through a forged reply subject
    # would land in JetStream asynchronously, and nothing signals that none was made.
    await asyncio.sleep(0.3)

    entry = await nodes_kv.get(victim.node_id)
    assert entry.revision == node_rev, "the node record was overwritten"
    assert controller.fleet.get(victim.node_id).identity == victim.identity.public_key
    jentry = await jobs_kv.get(job.id)
    assert jentry.revision == job_rev, "the job record was overwritten"
    assert controller.jobs.get(job.id).counts == {"ok": 1}
    assert controller.stats.rejected["reply_subject"] >= 3
    # the node still gets its own answers, in its own inbox
    reply = await node.request(f"{s.prefix}.node.{victim.node_id}.apps.sync", sync, timeout=5)
    assert type(codec.decode(reply.data)).__name__ == "AppSyncReply"


async def test_f01_peer_facing_controller_user_cannot_reach_jetstream(
    controller: RunningController, agents: AgentFactory, raw: Any
) -> None:
    """The connection that answers peers is refused by nats-server on the JetStream, KV,
    object store and system APIs, so no reply bug can ever touch state with it."""
    await _populated(controller, agents)
    before = await _stream_counts(controller)
    assert controller.nc is not None
    # The controller's own peer-facing connection: a purge through it goes nowhere.
    with pytest.raises(nats.errors.TimeoutError):
        await controller.nc.request("$JS.API.STREAM.PURGE.KV_nodes", b"{}", timeout=1)
    _assert_intact(before, await _stream_counts(controller))

    from controller.nats.permissions import PEERS_USER

    assert controller.natsd is not None
    creds = controller.natsd.peer_credentials()
    assert creds["user"] == PEERS_USER
    peer = await raw(controller.nats_url, **creds)
    with pytest.raises(nats.errors.TimeoutError):
        await peer.request("$JS.API.INFO", b"", timeout=1)
    # nor publish into the state connection's inbox (a forged JetStream answer)
    await peer.publish("_INBOX_controller.x.1", b"{}")
    for subject in ("$KV.nodes.>", "$JS.API.>", "$O.x.>", "$SYS.>", "_INBOX_controller.>"):
        await peer.subscribe(subject)
    await peer.flush()
    errors: list[Exception] = peer.errors
    await wait_for(lambda: len(errors) >= 7, 5, "permission errors")
    text = " ".join(str(e) for e in errors).lower()  # nats-py lowercases the server's -ERR
    assert text.count("permissions violation") >= 7, text
    for what in ('publish to "$js.api.info"', 'publish to "_inbox_controller.x.1"',
                 'subscription to "$kv.nodes.>"', 'subscription to "$sys.>"'):
        assert what in text, text
    # while the state connection still works
    assert (await controller.js.account_info()).streams >= 3


# --- finding 4: proof of possession -------------------------------------------------


async def _enroll_plain(controller: RunningController, req: EnrollRequest) -> Any:
    nc = await _connect(controller.nats_url, **enroll_opts(controller))
    try:
        msg = await nc.request(controller.subjects.enroll, codec.encode(req), timeout=5)
    finally:
        await nc.close()
    return codec.decode(msg.data)


async def test_f04_token_holder_cannot_take_over_another_nodes_identity(
    controller: RunningController, agents: AgentFactory, tmp_path: Any
) -> None:
    victim = await agents.start(labels={"role": "db"})
    assert victim.identity is not None
    nkey = victim.identity.public_key
    fresh = await controller.tokens.create(labels={"role": "evil"})

    # 1. A valid token and the victim's public nkey, unsigned (what anyone can send).
    reply = await _enroll_plain(controller, EnrollRequest(
        token=fresh.token, identity=nkey, hostname="evil", agent_version="t"))
    assert isinstance(reply, EnrollReply) and not reply.ok, "takeover accepted"
    assert reply.error_code == "bad_signature"

    from tests.fixtures.enroll import enroll_raw, signed_request

    # 2. Signed, but with the attacker's own key.
    mine = Identity(tmp_path / "attacker.nk")
    req, key = signed_request(fresh.token, mine, hostname="evil")
    forged = msgspec.structs.replace(req, identity=nkey)
    seed = nacl.signing.SigningKey.generate()
    forged = msgspec.structs.replace(forged, signature=seed.sign(
        forged.signing_payload()).signature)
    reply = await enroll_raw(controller, forged, key)
    assert isinstance(reply, EnrollReply) and not reply.ok
    assert reply.error_code == "bad_signature"

    # 3. Signed with the victim's real key but another token: still that node's identity.
    req, key = signed_request(fresh.token, victim.identity, hostname="again")
    reply = await enroll_raw(controller, req, key)
    assert isinstance(reply, EnrollReply) and not reply.ok
    assert reply.error_code == "identity_collision"

    # Nothing changed: one node, the nkey still bound to it, the token not burnt.
    assert [n.id for n in controller.fleet.select()] == [victim.node_id]
    record = controller.nodes.get(victim.node_id)
    assert record is not None and record.identity == nkey
    token_rec = controller.tokens_table.get(fresh.record.id)
    assert token_rec is not None and not token_rec.used_by
    beats = controller.stats.heartbeats
    await wait_for(lambda: controller.stats.heartbeats > beats + 2, 10, "victim heartbeats")
    status = controller.status()["rejected"]
    assert isinstance(status, dict)
    assert status["bad_signature"] >= 2 and status["identity_collision"] >= 1

    # The same machine's retry of its own enrollment still works (idempotent).
    req, key = signed_request(victim.config.token, victim.identity, hostname="retry")
    reply = await enroll_raw(controller, req, key)
    assert isinstance(reply, EnrollReply) and reply.ok and reply.node_id == victim.node_id
    # and the fresh token still enrolls a real new machine
    other = await agents.start(token=fresh.token)
    assert controller.fleet.get(other.node_id).labels == {"role": "evil"}


async def test_f04_stale_or_tampered_requests_are_refused(
    controller: RunningController, tmp_path: Any
) -> None:
    from tests.fixtures.enroll import enroll_raw, signed_request

    ident = Identity(tmp_path / "m.nk")
    tok = await controller.tokens.create(labels={"role": "web"})
    # a signed request whose labels were changed afterwards
    req, key = signed_request(tok.token, ident)
    req = msgspec.structs.replace(req, labels={"role": "admin"})
    reply = await enroll_raw(controller, req, key)
    assert isinstance(reply, EnrollReply) and reply.error_code == "bad_signature"
    # a correctly signed request made an hour ago
    req, key = signed_request(tok.token, ident)
    req = ident.sign_enroll(msgspec.structs.replace(req, ts=time.time() - 3600))
    reply = await enroll_raw(controller, req, key)
    assert isinstance(reply, EnrollReply) and reply.error_code == "clock_skew"
    assert not controller.fleet.select()
    # the token is still good for the genuine request
    req, key = signed_request(tok.token, ident)
    reply = await enroll_raw(controller, req, key)
    assert isinstance(reply, EnrollReply) and reply.ok


# --- finding 10: enrollment replies readable only by their requester ----------------


async def test_f10_other_enrolling_machines_cannot_read_the_reply(
    controller: RunningController, agents: AgentFactory, raw: Any
) -> None:
    spy = await raw(controller.nats_url, **enroll_opts(controller))
    seen: list[bytes] = []

    async def collect(msg: Any) -> None:
        seen.append(msg.data)

    sub = await spy.subscribe("_INBOX_enroll.>", cb=collect)
    await confirm(spy)  # in place before the agent's enrollment is answered
    agent = await agents.start(labels={"region": "secret-region"})
    await wait_for(lambda: seen, 5, "the enrollment reply passing by")
    # Every reply the agent read was routed to the spy at the same time; the PONG follows
    # them, and an empty pending queue means each one has reached ``collect``.
    await spy.flush()
    await wait_for(lambda: sub.pending_msgs == 0, 5, "the spy's queue to drain")
    for data in seen:
        assert agent.node_id.encode() not in data
        assert b"secret-region" not in data and b"_INBOX_" not in data
        msg = codec.decode(data)
        assert not isinstance(msg, EnrollReply), "the spy read the enrollment reply"
        assert type(msg).__name__ == "SealedReply"
    # sealed to the agent's ephemeral key: a key the spy makes up opens nothing
    import nacl.public

    from protocol.errors import ProtocolError
    from protocol.signing import open_reply

    sealed = codec.decode(seen[0])
    assert isinstance(sealed, SealedReply)
    with pytest.raises(ProtocolError):
        open_reply(nacl.public.PrivateKey.generate(), sealed)
    assert controller.fleet.get(agent.node_id).labels == {"region": "secret-region"}


# --- finding 14: token labels stored as validated -----------------------------------


async def test_f14_token_labels_are_stored_trimmed_and_select(
    controller: RunningController, agents: AgentFactory, api: Any, http: Any
) -> None:
    url, api_token = api
    h = {"Authorization": f"Bearer {api_token}"}
    async with http.post(f"{url}/v1/tokens", headers=h, json={
            "labels": {" region ": " us-east-1 ", "tier": "gold "}}) as r:
        assert r.status in (200, 201), await r.text()
        body = await r.json()
    assert body["labels"] == {"region": "us-east-1", "tier": "gold"}
    agent = await agents.start(token=body["token"])
    assert [n.id for n in controller.fleet.select("region=us-east-1,tier=gold")] == [
        agent.node_id
    ]
    # and through the token service directly
    issued = await controller.tokens.create(labels={"  zone": "a  "})
    assert issued.record.labels == {"zone": "a"}
    other = await agents.start(token=issued.token)
    assert [n.id for n in controller.fleet.select("zone=a")] == [other.node_id]
    # what cannot be validated is refused, not stored half-cleaned
    async with http.post(f"{url}/v1/tokens", headers=h, json={
            "labels": {"a=b": "c"}}) as r:
        assert r.status == 400
    async with http.post(f"{url}/v1/tokens", headers=h, json={
            "labels": {"k": "v", " k": "w"}}) as r:
        assert r.status == 400

