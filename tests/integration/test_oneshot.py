"""agent/oneshot.py against a real nats-server: one request over a connection made for it
(enrollment, renewal of an expired JWT), and every way it can go wrong ending in a clear
error, never a hang. The enrollment and TLS tests run it end to end through the agent."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.msg import Msg

from agent.enroll import enroll_oneshot_auth
from agent.oneshot import OneShotAuth, RequestRefused, request_once
from agent.trust import fetch_nats_chain, learn_pinned_ca
from controller.nats import jwt
from controller.nats.operator import Permissions
from controller.nats.permissions import node_permissions
from controller.nats.server import NatsServer
from controller.service import RunningController
from protocol.subjects import ENROLL_SEED
from tests.fixtures.controller import controller_config
from tests.fixtures.nats import confirm

NOAUTH = OneShotAuth()


@contextlib.asynccontextmanager
async def responder(url: str, subject: str, *, headers: bool = False
                    ) -> AsyncIterator[list[bytes]]:
    """A plain nats-py service answering ``subject`` with the request reversed."""
    nc = await nats.connect(url)
    seen: list[bytes] = []

    async def cb(msg: Msg) -> None:
        seen.append(msg.data)
        await nc.publish(msg.reply, msg.data[::-1], headers={"x": "1"} if headers else None)

    await nc.subscribe(subject, cb=cb)
    await confirm(nc)  # in place before the request, which comes on another connection
    try:
        yield seen
    finally:
        await nc.close()


@pytest.mark.parametrize("headers", [False, True], ids=["msg", "hmsg"])
async def test_one_request_gets_its_reply(nats_server_noauth: NatsServer, headers: bool):
    url = nats_server_noauth.url
    async with responder(url, "svc.enroll", headers=headers) as seen:
        got = await request_once([url], "svc.enroll", b"\x00hello\r\nMSG x 1 5\r\n",
                                 inbox_prefix="_INBOX_t", auth=NOAUTH, tls=None, wait=5,
                                 name="t")
    # CRLF and protocol words in the payload are data, not protocol
    assert seen == [b"\x00hello\r\nMSG x 1 5\r\n"]
    assert got == b"\x00hello\r\nMSG x 1 5\r\n"[::-1]


async def test_no_controller_listening_says_so(nats_server_noauth: NatsServer):
    with pytest.raises(RequestRefused, match="no controller is answering"):
        await request_once([nats_server_noauth.url], "svc.nobody", b"x", inbox_prefix="_I",
                           auth=NOAUTH, tls=None, wait=5, name="t")


async def test_oversized_request_is_refused_before_sending(nats_server_noauth: NatsServer):
    url = nats_server_noauth.url
    async with responder(url, "svc.big") as seen:
        with pytest.raises(RequestRefused, match="max_payload"):
            await request_once([url], "svc.big", b"x" * (2 << 20), inbox_prefix="_I",
                               auth=NOAUTH, tls=None, wait=5, name="t")
    assert seen == []


async def test_an_unreachable_server_is_skipped(nats_server_noauth: NatsServer):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"nats://127.0.0.1:{s.getsockname()[1]}"
    url = nats_server_noauth.url
    async with responder(url, "svc.x"):
        for _ in range(4):  # random order: the dead one comes first in some
            assert await request_once([dead, url], "svc.x", b"ab", inbox_prefix="_I",
                                      auth=NOAUTH, tls=None, wait=5, name="t") == b"ba"
    with pytest.raises(OSError):
        await request_once([dead], "svc.x", b"ab", inbox_prefix="_I", auth=NOAUTH, tls=None,
                           wait=5, name="t")


async def _serve_once(data: bytes, *, hold: bool = False) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(data)
            await writer.drain()
            if hold:
                await asyncio.sleep(30)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"nats://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize(("sent", "error"), [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a NATS server"),
    (b"INFO {not json\r\n", "bad INFO"),
    (b"INFO []\r\n", "bad INFO"),
    (b"INFO " + b"x" * (1 << 17) + b"\r\n", "over-long"),
    (b'INFO {"max_payload": 1024}\r\n-ERR \'Authorization Violation\'\r\n',
     "refused: Authorization Violation"),
    (b'INFO {}\r\nMSG _I.x 1 99999999\r\n', "over"),
    (b'INFO {}\r\nMSG _I.x 1 zz\r\n', "bad message line"),
    (b'INFO {}\r\nMSG _I.x 1 10\r\nabc', "mid-reply"),
    (b'INFO {}\r\nPONG\r\n', "closed the connection"),
], ids=["http", "json", "not-object", "long", "auth", "huge", "garbage", "cut", "eof"])
async def test_a_bad_server_gets_a_clear_error(sent: bytes, error: str):
    server, url = await _serve_once(sent)
    async with server:
        with pytest.raises(ConnectionError, match=error):
            await request_once([url], "svc", b"x", inbox_prefix="_I", auth=NOAUTH, tls=None,
                               wait=5, name="t")


@pytest.mark.parametrize(("sent", "error"), [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a NATS server"),
    (b"INFO {not json\r\n", "bad INFO"),
    (b"INFO []\r\n", "bad INFO"),
    (b"INFO " + b"x" * (1 << 17) + b"\r\n", "over-long"),
    (b"INFO {}", "closed the connection"),
], ids=["http", "json", "not-object", "long", "eof"])
async def test_the_ca_probe_gets_the_same_clear_errors(sent: bytes, error: str):
    """The CA pin's probe (agent/trust.py) reads the INFO line with the same parser: a bad
    server is a connection error, which learn_pinned_ca reports after trying the others."""
    server, url = await _serve_once(sent)
    async with server:
        with pytest.raises(ConnectionError, match=error):
            await asyncio.to_thread(fetch_nats_chain, url, 5)
        with pytest.raises(ConnectionError, match=error):
            await asyncio.to_thread(learn_pinned_ca, [url], "00" * 32, 5)


async def test_a_silent_server_times_out():
    server, url = await _serve_once(b'INFO {}\r\n', hold=True)
    async with server:
        with pytest.raises(TimeoutError):
            await request_once([url], "svc", b"x", inbox_prefix="_I", auth=NOAUTH, tls=None,
                               wait=0.5, name="t")


async def test_a_pinned_ca_never_talks_to_a_plain_server(nats_server_noauth: NatsServer):
    url = nats_server_noauth.url
    async with responder(url, "svc.x") as seen:
        with pytest.raises(ConnectionError, match="does not serve TLS"):
            await request_once([url], "svc.x", b"secret", inbox_prefix="_I", auth=NOAUTH,
                               tls=ssl.create_default_context(), wait=5, name="t")
    assert seen == []


async def test_operator_mode_signs_the_nonce_and_tls_checks_the_ca(tmp_path):
    """The embedded server (operator mode, TLS): the enroll identity's JWT and the signed
    nonce are accepted; a wrong signature is refused; another CA fails the handshake."""
    import nkeys

    from controller.service import Controller

    async with Controller(controller_config(tmp_path / "c", tls=True)) as c:
        rc: RunningController = c
        assert rc.tls is not None
        kp = nkeys.from_seed(bytearray(ENROLL_SEED.encode()))
        good = OneShotAuth(jwt=rc.tokens.enroll_jwt, sign=lambda n: bytes(kp.sign(n)))
        # a request the controller answers (an undecodable one gets an error reply)
        reply = await request_once([rc.agent_nats_url], rc.subjects.enroll, b"\x01",
                                   inbox_prefix=rc.subjects.enroll_inbox, auth=good,
                                   tls=rc.tls.client_context(), wait=5, name="t")
        assert reply
        # The enroll JWT is a bearer token (its seed is public: a signature proves
        # nothing), so the server checks none; a node's JWT is not: a signature by another
        # key is refused.
        other = nkeys.from_seed(bytearray(nkeys.encode_seed(b"\x07" * 32, nkeys.PREFIX_BYTE_USER)))
        claims = jwt.decode(rc.tokens.enroll_jwt, jwt.UserClaims)
        assert claims.nats.bearer_token
        unsigned = OneShotAuth(jwt=rc.tokens.enroll_jwt, sign=lambda n: b"\0" * 64)
        assert await request_once([rc.agent_nats_url], rc.subjects.enroll, b"\x01",
                                  inbox_prefix=rc.subjects.enroll_inbox, auth=unsigned,
                                  tls=rc.tls.client_context(), wait=5, name="t")
        # ... and the agent sends none: no "sig" in its CONNECT, still admitted.
        auth = enroll_oneshot_auth(rc.tokens.enroll_jwt, user="", password="")
        assert auth.jwt and auth.sign is None
        assert await request_once([rc.agent_nats_url], rc.subjects.enroll, b"\x01",
                                  inbox_prefix=rc.subjects.enroll_inbox, auth=auth,
                                  tls=rc.tls.client_context(), wait=5, name="t")
        node_kp = nkeys.from_seed(bytearray(nkeys.encode_seed(b"\x05" * 32,
                                                              nkeys.PREFIX_BYTE_USER)))
        assert rc.trust is not None
        node_jwt = rc.trust.user_jwt(node_kp.public_key.decode(), name="n",
                                     permissions=Permissions.from_config(
                                         node_permissions(rc.subjects, "n-1")))
        assert not jwt.decode(node_jwt, jwt.UserClaims).nats.bearer_token
        # A JWT that is not a bearer one (an older controller's enroll JWT) is signed for.
        assert enroll_oneshot_auth(node_jwt, user="", password="").sign is not None
        bad = OneShotAuth(jwt=node_jwt, sign=lambda n: bytes(other.sign(n)))
        with pytest.raises(RequestRefused, match=r"(?i)authorization"):
            await request_once([rc.agent_nats_url], rc.subjects.node_all("n-1")[:-2] + ".x",
                               b"\x01", inbox_prefix=rc.subjects.inbox_prefix("n-1"),
                               auth=bad, tls=rc.tls.client_context(), wait=5, name="t")
        with pytest.raises(ssl.SSLCertVerificationError):
            await request_once([rc.agent_nats_url], rc.subjects.enroll, b"\x01",
                               inbox_prefix=rc.subjects.enroll_inbox, auth=good,
                               tls=ssl.create_default_context(), wait=5, name="t")
