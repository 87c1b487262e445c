"""Command signatures: verification, expiry, replay cache, key rotation and PEM round trips."""

from __future__ import annotations

import base64
from collections.abc import Callable

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from protocol.codec import decode, encode
from protocol.errors import (
    BadSignature,
    CommandExpired,
    CommandRejected,
    CommandReplayed,
)
from protocol.messages import Command, Heartbeat, SignedCommand
from protocol.signing import (
    DEFAULT_CLOCK_SKEW,
    MAX_TTL,
    CommandSigner,
    CommandVerifier,
    key_id,
    load_public_key,
)

T0 = 1_700_000_000.0


class Clock:
    """A settable clock injected into the verifier."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_cmd(n: int = 1, *, issued_at: float = T0, ttl: float = 60.0) -> Command:
    return Command(
        id=f"cmd-{n}",
        job_id="job-1",
        issued_at=issued_at,
        ttl=ttl,
        action="exec",
        argv=["uptime"],
        env={"LC_ALL": "C"},
    )


@pytest.fixture
def signer() -> CommandSigner:
    return CommandSigner.generate()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(signer: CommandSigner, clock: Clock) -> CommandVerifier:
    return CommandVerifier([signer.public_key_b64], clock=clock)


def test_signed_command_verifies_and_returns_the_command(
    signer: CommandSigner, verifier: CommandVerifier
) -> None:
    cmd = make_cmd()
    signed = signer.sign(cmd)
    assert signed.key_id == signer.key_id == key_id(signer.public_key_b64)
    assert len(signed.signature) == 64
    assert verifier.verify(signed) == cmd
    assert verifier.cached_ids == 1


def test_signed_command_survives_the_wire(signer: CommandSigner, verifier: CommandVerifier) -> None:
    cmd = make_cmd()
    received = decode(encode(signer.sign(cmd)), SignedCommand)
    assert verifier.verify(received) == cmd


def _flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(
            lambda s: msgspec.structs.replace(s, payload=_flip(s.payload, -1)), id="payload"
        ),
        pytest.param(
            lambda s: msgspec.structs.replace(s, payload=encode(make_cmd(ttl=3600.0))),
            id="payload-swapped",
        ),
        pytest.param(
            lambda s: msgspec.structs.replace(s, signature=_flip(s.signature, 0)), id="sig"
        ),
        pytest.param(lambda s: msgspec.structs.replace(s, signature=b""), id="sig-empty"),
        pytest.param(
            lambda s: msgspec.structs.replace(s, signature=s.signature[:32]), id="sig-short"
        ),
        pytest.param(
            lambda s: msgspec.structs.replace(s, signature=s.signature + b"\x00"), id="sig-long"
        ),
    ],
)
def test_tampering_is_a_bad_signature(
    signer: CommandSigner,
    verifier: CommandVerifier,
    tamper: Callable[[SignedCommand], SignedCommand],
) -> None:
    with pytest.raises(BadSignature, match="does not match any trusted controller key") as info:
        verifier.verify(tamper(signer.sign(make_cmd())))
    assert info.value.code == "bad_signature"
    assert verifier.cached_ids == 0


def test_signature_by_another_key_is_refused(verifier: CommandVerifier) -> None:
    intruder = CommandSigner.generate()
    signed = intruder.sign(make_cmd())
    with pytest.raises(BadSignature):
        verifier.verify(signed)
    # claiming the trusted key's id does not help
    with pytest.raises(BadSignature):
        verifier.verify(msgspec.structs.replace(signed, key_id="0" * 16))


def test_key_id_is_not_part_of_trust(signer: CommandSigner, verifier: CommandVerifier) -> None:
    # key_id is only a hint: a wrong or empty one falls back to trying every trusted key
    signed = msgspec.structs.replace(signer.sign(make_cmd()), key_id="")
    assert verifier.verify(signed).id == "cmd-1"


def test_expired_command(signer: CommandSigner, verifier: CommandVerifier, clock: Clock) -> None:
    signed = signer.sign(make_cmd(ttl=60.0))
    clock.now = T0 + 60.0 + DEFAULT_CLOCK_SKEW + 0.5
    with pytest.raises(CommandExpired, match="expired") as info:
        verifier.verify(signed)
    assert info.value.command_id == "cmd-1"
    assert info.value.code == "expired"


def test_command_within_ttl_plus_skew_is_accepted(
    signer: CommandSigner, verifier: CommandVerifier, clock: Clock
) -> None:
    clock.now = T0 + 60.0 + DEFAULT_CLOCK_SKEW  # the very last accepted instant
    assert verifier.verify(signer.sign(make_cmd(ttl=60.0))).id == "cmd-1"


def test_issued_in_the_future_beyond_skew(
    signer: CommandSigner, verifier: CommandVerifier, clock: Clock
) -> None:
    ahead = make_cmd(issued_at=T0 + DEFAULT_CLOCK_SKEW + 5.0)
    with pytest.raises(CommandExpired, match="in the future"):
        verifier.verify(signer.sign(ahead))
    # a little ahead (within the skew) is fine: controller and agent clocks differ
    assert verifier.verify(signer.sign(make_cmd(2, issued_at=T0 + 10.0))).id == "cmd-2"


@pytest.mark.parametrize("ttl", [0.0, -1.0, MAX_TTL + 1.0, float("inf"), float("nan")])
def test_bad_ttl_is_rejected(signer: CommandSigner, verifier: CommandVerifier, ttl: float) -> None:
    with pytest.raises(CommandRejected, match="ttl") as info:
        verifier.verify(signer.sign(make_cmd(ttl=ttl)))
    assert type(info.value) is CommandRejected
    assert info.value.command_id == "cmd-1"


def test_max_ttl_is_accepted_and_configurable(signer: CommandSigner, clock: Clock) -> None:
    assert CommandVerifier([signer.public_key_b64], clock=clock).verify(
        signer.sign(make_cmd(ttl=MAX_TTL))
    )
    strict = CommandVerifier([signer.public_key_b64], clock=clock, max_ttl=30.0)
    with pytest.raises(CommandRejected, match=r"outside \(0, 30.0\]"):
        strict.verify(signer.sign(make_cmd(ttl=31.0)))


@pytest.mark.parametrize("issued_at", [float("nan"), float("-inf"), float("inf")])
def test_non_finite_issued_at_is_refused(
    signer: CommandSigner, verifier: CommandVerifier, issued_at: float
) -> None:
    with pytest.raises(CommandRejected):
        verifier.verify(signer.sign(make_cmd(issued_at=issued_at)))
    assert verifier.cached_ids == 0


def test_replay_is_refused(signer: CommandSigner, verifier: CommandVerifier) -> None:
    signed = signer.sign(make_cmd())
    verifier.verify(signed)
    with pytest.raises(CommandReplayed, match="cmd-1 was already accepted") as info:
        verifier.verify(signed)
    assert info.value.command_id == "cmd-1"
    # a re-signed command with the same id is a replay too (the id is what counts)
    with pytest.raises(CommandReplayed):
        verifier.verify(signer.sign(make_cmd(1, ttl=120.0)))
    assert verifier.verify(signer.sign(make_cmd(2))).id == "cmd-2"


def test_replay_cache_forgets_ids_after_their_ttl(
    signer: CommandSigner, verifier: CommandVerifier, clock: Clock
) -> None:
    verifier.verify(signer.sign(make_cmd(1, ttl=10.0)))
    verifier.verify(signer.sign(make_cmd(2, ttl=1000.0)))
    assert verifier.cached_ids == 2
    clock.now = T0 + 10.0 + DEFAULT_CLOCK_SKEW + 5.0
    verifier.verify(signer.sign(make_cmd(3, issued_at=clock.now)))
    assert verifier.cached_ids == 2  # cmd-1 forgotten, cmd-2 and cmd-3 live
    # the forgotten id cannot be replayed anyway: its command has expired
    with pytest.raises(CommandExpired):
        verifier.verify(signer.sign(make_cmd(1, ttl=10.0)))
    with pytest.raises(CommandReplayed):
        verifier.verify(signer.sign(make_cmd(2, ttl=1000.0)))


def test_replay_cache_is_bounded_and_fails_closed(signer: CommandSigner, clock: Clock) -> None:
    verifier = CommandVerifier([signer.public_key_b64], clock=clock, cache_size=3)
    for n in range(3):
        verifier.verify(signer.sign(make_cmd(n, ttl=20.0)))
    assert verifier.cached_ids == 3
    with pytest.raises(CommandRejected, match="replay cache is full") as info:
        verifier.verify(signer.sign(make_cmd(99, ttl=20.0)))
    assert type(info.value) is CommandRejected
    assert verifier.cached_ids == 3
    # once the cached ids have expired the verifier accepts commands again
    clock.now = T0 + 20.0 + DEFAULT_CLOCK_SKEW + 0.1
    assert verifier.verify(signer.sign(make_cmd(99, issued_at=clock.now))).id == "cmd-99"
    assert verifier.cached_ids == 1
    # and the ones it refused earlier were not remembered: no false "replayed"
    assert verifier.verify(signer.sign(make_cmd(100, issued_at=clock.now))).id == "cmd-100"


def test_key_rotation_verifier_trusts_both_keys(clock: Clock) -> None:
    old, new = CommandSigner.generate(), CommandSigner.generate()
    verifier = CommandVerifier([old.public_key_b64, new.public_key_b64], clock=clock)
    assert verifier.verify(old.sign(make_cmd(1))).id == "cmd-1"
    assert verifier.verify(new.sign(make_cmd(2))).id == "cmd-2"
    with pytest.raises(BadSignature):
        verifier.verify(CommandSigner.generate().sign(make_cmd(3)))
    # a key_id naming a trusted key means only that key is tried
    crossed = msgspec.structs.replace(new.sign(make_cmd(4)), key_id=old.key_id)
    with pytest.raises(BadSignature):
        verifier.verify(crossed)


def test_pem_round_trip(signer: CommandSigner, clock: Clock) -> None:
    pem = signer.to_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    again = CommandSigner.from_pem(pem)
    assert again.public_key_b64 == signer.public_key_b64
    assert again.key_id == signer.key_id
    verifier = CommandVerifier([signer.public_key_b64], clock=clock)
    assert verifier.verify(again.sign(make_cmd())).id == "cmd-1"


def test_from_pem_refuses_other_key_types_and_garbage() -> None:
    ec_pem = generate_private_key(SECP256R1()).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        CommandSigner.from_pem(ec_pem)
    with pytest.raises(ValueError):
        CommandSigner.from_pem(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


def test_signed_non_command_is_rejected_not_a_crash(clock: Clock) -> None:
    # sign arbitrary bytes with the trusted key, as a buggy controller might
    key = Ed25519PrivateKey.generate()
    verifier = CommandVerifier([CommandSigner(key.private_bytes_raw()).public_key_b64], clock=clock)
    payload = encode(Heartbeat(node_id="n-1", seq=1, ts=T0))
    signed = SignedCommand(payload=payload, signature=key.sign(payload))
    with pytest.raises(CommandRejected, match="not a command") as info:
        verifier.verify(signed)
    assert type(info.value) is CommandRejected
    assert "expected a 'cmd' message, got 'hb'" in info.value.reason
    garbage = b"\x93\x01\x02\x03"
    with pytest.raises(CommandRejected, match="not a command"):
        verifier.verify(SignedCommand(payload=garbage, signature=key.sign(garbage)))


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param([], id="none"),
        pytest.param(["not base64!"], id="not-base64"),
        pytest.param([base64.b64encode(b"short").decode()], id="wrong-length"),
    ],
)
def test_verifier_needs_valid_keys(keys: list[str]) -> None:
    with pytest.raises(ValueError):
        CommandVerifier(keys)


def test_load_public_key_error_is_clear() -> None:
    with pytest.raises(ValueError, match="not a base64 Ed25519 public key"):
        load_public_key("@@@")
