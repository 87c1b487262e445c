"""``barista-agent``: run the agent until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config import AgentConfig
# agent.config (and with it msgspec) is imported in main(), after _skip_typing_extensions.

# agent.runtime (and with it nats) is imported only once the config is known: see
# _skip_unused_transports.


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        from agent.runtime import AGENT_VERSION

        print(f"barista-agent {AGENT_VERSION}")
        parser.exit()


def _skip_typing_extensions() -> None:
    """msgspec reads type hints through typing_extensions when it is installed (for
    backports the agent's protocol does not use; Python >= 3.11 has what it needs), which
    costs ~0.2 MB of RSS. Only when nothing has loaded msgspec yet: in a test process,
    or under another program that imports the agent, this changes nothing."""
    if sys.version_info >= (3, 11) and not {"msgspec", "typing_extensions"} & set(sys.modules):
        sys.modules["typing_extensions"] = None  # type: ignore[assignment]  # -> ImportError


def _skip_unused_transports(config: AgentConfig) -> None:
    """nats-py imports aiohttp, when installed, only for ws:// URLs; it costs ~10 MB RSS
    (a third of the agent), so keep it out unless a websocket URL is configured."""
    if "aiohttp" in sys.modules:
        return
    if not any(url.startswith(("ws://", "wss://")) for url in config.nats_urls):
        sys.modules["aiohttp"] = None  # type: ignore[assignment]  # import -> ImportError


class _LazyBytesParser:
    """Stands in for email.parser.BytesParser inside nats-py's JetStream clients, which
    make one at start but parse headers only in direct message gets (which the agent does
    not use): the real parser, and the email package, are loaded on first use."""

    def parsebytes(self, text: bytes, headersonly: bool = False) -> Any:
        from email.parser import BytesParser

        return BytesParser().parsebytes(text, headersonly)


def _import_nats_lightly() -> None:
    """Import nats-py without importlib.metadata (and the email and zipfile packages it
    pulls in, ~1.2 MB of RSS, 4 % of the agent), which nats-py loads only to report its
    own version, and without email.parser (~0.6 MB), which its JetStream clients load for
    a parser they rarely use. The version is read from its dist-info directory name
    instead; the real modules stay importable for anything that needs them later."""
    if "nats.aio.client" in sys.modules or "importlib.metadata" in sys.modules:
        return
    import importlib.util
    import types

    def version(dist: str) -> str:
        spec = importlib.util.find_spec("nats")
        if spec is None or spec.origin is None:
            raise LookupError(dist)
        site = Path(spec.origin).parent.parent
        for info in site.glob(dist.replace("-", "_") + "-*.dist-info"):
            return info.name[len(dist) + 1 : -len(".dist-info")]
        raise LookupError(dist)

    stub = types.ModuleType("importlib.metadata")
    stub.version = version  # type: ignore[attr-defined]
    sys.modules["importlib.metadata"] = stub
    parser_stub = None
    if "email.parser" not in sys.modules:
        parser_stub = types.ModuleType("email.parser")
        parser_stub.BytesParser = _LazyBytesParser  # type: ignore[attr-defined]
        sys.modules["email.parser"] = parser_stub
    try:
        import nats.aio.client
        import nats.js  # noqa: F401  # the part that takes the parser, while it is stubbed
    finally:
        if sys.modules.get("importlib.metadata") is stub:
            del sys.modules["importlib.metadata"]
        if parser_stub is not None and sys.modules.get("email.parser") is parser_stub:
            del sys.modules["email.parser"]


_M_ARENA_MAX = -8  # mallopt(3)
# Seconds between malloc_trim calls: a call costs microseconds, and the first ones come
# soon after start, when enrollment and the TLS handshake have just freed their memory.
_TRIM_EVERY = 5.0


def _tune_malloc() -> Callable[[], object] | None:
    """glibc only: one malloc arena for every thread, and a function that hands the free
    pages of the heap back to the kernel (malloc_trim). The collectors read /proc in a
    worker thread, which would otherwise get an arena of its own that is never trimmed;
    startup (imports, enrollment, the TLS handshake) leaves free pages in the middle of
    the heap. Together ~0.6 MB of RSS, 2 % of the agent. Elsewhere (musl, macOS): None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes  # the timex collector loads it anyway

        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallopt(_M_ARENA_MAX, 1)  # before any thread exists: asyncio.run starts them
    return lambda: trim(0)


def _small_tls_buffers() -> None:
    """asyncio gives every TLS connection a 256 KiB read buffer (bytearray, zero-filled,
    so all of it resident) sized for bulk transfers; the agent's one NATS connection
    carries messages of a few kB, and reads loop until the TLS record is drained, so
    16 KiB (one TLS record) loses nothing. ~0.24 MB of RSS. Process-wide, so here only."""
    import asyncio.sslproto

    asyncio.sslproto.SSLProtocol.max_size = 16 * 1024


async def _trim_forever(trim: Callable[[], object]) -> None:
    import gc

    await asyncio.sleep(_TRIM_EVERY)
    gc.collect()  # once: the cycles start-up left (exceptions, enrollment) before a trim
    while True:
        trim()
        await asyncio.sleep(_TRIM_EVERY)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="barista-agent", description="barista node agent")
    p.add_argument("--config", type=Path, help="TOML config file (default /etc/barista/agent.toml)")
    p.add_argument("--nats-url", action="append", dest="nats_urls", help="NATS server URL (repeat)")
    p.add_argument(
        "--token-file",
        help="file (mode 0600) holding the one-time join token; only needed to enroll "
        "(or set BARISTA_AGENT_TOKEN)",
    )
    # Refused with an explanation: a command line is readable by every local user.
    p.add_argument("--token", help=argparse.SUPPRESS)
    p.add_argument("--state-dir", type=Path, help="where the identity key and state live")
    p.add_argument("--label", action="append", default=[], help="k=v label (repeat)")
    p.add_argument(
        "--controller-key",
        action="append",
        dest="controller_keys",
        help="base64 Ed25519 key that signs commands (repeat)",
    )
    p.add_argument("--hostname")
    p.add_argument("--metrics-interval", type=float)
    p.add_argument("--heartbeat-interval", type=float)
    p.add_argument("--log-level")
    p.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    _skip_typing_extensions()
    from agent.config import AgentConfig, ConfigError

    args = parse_args(argv)
    if args.token is not None:
        print(
            "barista-agent: --token is refused: a command line is readable by every local "
            "user for the agent's whole life. Write the token to a file only you can read "
            "(umask 077; printf %s TOKEN > FILE) and pass --token-file FILE, or set "
            "BARISTA_AGENT_TOKEN.",
            file=sys.stderr,
        )
        return 2
    overrides: dict[str, Any] = {
        "nats_urls": args.nats_urls,
        "token_file": args.token_file,
        "state_dir": args.state_dir,
        "controller_keys": args.controller_keys,
        "hostname": args.hostname,
        "metrics_interval": args.metrics_interval,
        "heartbeat_interval": args.heartbeat_interval,
        "log_level": args.log_level,
    }
    labels: dict[str, str] = {}
    for item in args.label:
        k, sep, v = item.partition("=")
        if not sep or not k:
            print(f"barista-agent: --label {item!r} must be key=value", file=sys.stderr)
            return 2
        labels[k] = v
    overrides["labels"] = labels
    try:
        config = AgentConfig.load(args.config, overrides)
    except ConfigError as exc:
        print(f"barista-agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _skip_unused_transports(config)
    _import_nats_lightly()
    from agent.runtime import EnrollmentError

    trim = _tune_malloc()
    _small_tls_buffers()
    try:
        asyncio.run(_run(config, trim))
    except EnrollmentError as exc:
        print(f"barista-agent: enrollment refused: {exc.message}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        pass
    return 0


async def _run(config: AgentConfig, trim: Callable[[], object] | None = None) -> None:
    from agent.runtime import run_agent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    trimmer = asyncio.create_task(_trim_forever(trim)) if trim is not None else None
    try:
        await run_agent(config, stop)
    finally:
        if trimmer is not None:
            trimmer.cancel()


if __name__ == "__main__":
    sys.exit(main())
