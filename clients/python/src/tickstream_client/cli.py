"""``python -m tickstream_client sub``: the flags, output and exit codes of
``tickstream sub`` (src/bin/tickstream/sub.rs)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from .client import Backoff, Client, TlsOptions
from .errors import (
    AuthError,
    ConnectError,
    ConnectionClosed,
    ErrorCode,
    ProtocolError,
    ServerError,
    TickstreamError,
    TlsError,
)
from .stream import Batch, Event, Gap, Mode, Reconnected, Reset

EXIT_LOST = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_AUTH = 4
EXIT_PROTOCOL = 5
EXIT_TLS = 6

EXIT_HELP = """\
exit status:
  0  --count ticks printed (or the stream ended cleanly)
  1  connection lost and reconnecting failed
  2  bad usage, or no password (set TICKSTREAM_PASSWORD)
  3  cannot connect: refused, unreachable or timed out
  4  authentication refused (AUTH_FAILED or RATE_LIMITED)
  5  protocol error (bad frame, unexpected frame or server ERROR)
  6  TLS error"""

PROG = "tickstream_client sub"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tickstream_client")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser(
        "sub",
        help="subscribe and print ticks",
        description="Subscribe to a tickstream server and print ticks.",
        epilog=EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    env = os.environ.get
    sub.add_argument(
        "--addr",
        default=env("TICKSTREAM_ADDR", "127.0.0.1:7000"),
        help="server address host:port, or a comma-separated list to fail over between",
    )
    sub.add_argument(
        "--user",
        default=env("TICKSTREAM_USER"),
        help="user name for AUTH; the password comes from TICKSTREAM_PASSWORD or a prompt",
    )
    sub.add_argument(
        "--mode", action="append", choices=["second", "minute"], help="stream to subscribe to; repeat for both"
    )
    sub.add_argument("--format", choices=["text", "json"], default="text")
    sub.add_argument("--count", type=_count, default=0, help="exit 0 after this many ticks (0 = until interrupted)")
    sub.add_argument("--no-reconnect", action="store_true", help="exit instead of reconnecting")
    sub.add_argument("--tls-ca", default=env("TICKSTREAM_TLS_CA"), help="use TLS 1.3, trusting this CA (PEM)")
    sub.add_argument("--tls-cert", help="client certificate (PEM) for mTLS; needs --tls-key and --tls-ca")
    sub.add_argument("--tls-key", help="client private key (PEM) for mTLS; needs --tls-cert")
    sub.add_argument("--tls-server-name", help="name to check the server certificate against")
    args = parser.parse_args(argv)

    if not args.user:
        sub.error("the following arguments are required: --user (or TICKSTREAM_USER)")
    if args.tls_cert and not (args.tls_key and args.tls_ca):
        sub.error("--tls-cert needs --tls-key and --tls-ca")
    if args.tls_key and not args.tls_cert:
        sub.error("--tls-key needs --tls-cert")
    if args.tls_server_name and not args.tls_ca:
        sub.error("--tls-server-name needs --tls-ca")
    addresses = [a.strip() for a in args.addr.split(",") if a.strip()]
    password = env("TICKSTREAM_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            return _fail(EXIT_USAGE, "no password: set TICKSTREAM_PASSWORD (stdin is not a terminal to prompt on)")
        password = getpass.getpass("Password: ")
    tls = (
        TlsOptions(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name)
        if args.tls_ca
        else None
    )
    try:
        client = Client(
            addresses, args.user, password, tls=tls, reconnect=None if args.no_reconnect else Backoff()
        )
    except ValueError as e:
        sub.error(f"--addr: {e}")
    modes = sorted({Mode[m.upper()] for m in (args.mode or ["second"])})
    try:
        asyncio.run(_run(client, modes, args.format, args.count, args.no_reconnect))
    except KeyboardInterrupt:
        return 130
    except TickstreamError as e:
        return _fail(exit_code(e), _describe(args.addr, e))
    return 0


def exit_code(e: TickstreamError) -> int:
    """The exit status for ``e`` (see ``--help``)."""
    if isinstance(e, ConnectError):
        return EXIT_CONNECT
    if isinstance(e, TlsError):
        return EXIT_TLS
    if isinstance(e, AuthError):
        return EXIT_AUTH
    if isinstance(e, ServerError):
        lost = (ErrorCode.SERVER_SHUTDOWN, ErrorCode.TOO_MANY_CONNECTIONS, ErrorCode.HEARTBEAT_TIMEOUT)
        return EXIT_LOST if e.code in lost else EXIT_PROTOCOL
    if isinstance(e, ProtocolError):
        return EXIT_PROTOCOL
    return EXIT_LOST


async def _run(client: Client, modes: list[Mode], fmt: str, count: int, no_reconnect: bool) -> None:
    out = sys.stdout
    printed = 0
    try:
        await client.connect()
        await client.subscribe(*modes)
        while True:
            try:
                event = await client.next_event()
            except ConnectionClosed:
                if no_reconnect:
                    return
                raise
            printed += _print_event(out, fmt, event, count - printed if count else 0)
            if count and printed >= count:
                out.flush()
                return
    finally:
        await client.close()


def _print_event(out: TextIO, fmt: str, event: Event, limit: int) -> int:
    """Writes ``event``; returns how many ticks it printed (at most ``limit``, 0 = no limit)."""
    if isinstance(event, Batch):
        n = 0
        for tick in event.ticks():
            if limit and n >= limit:
                break
            if fmt == "text":
                out.write(f"{tick.mode.name} seq={tick.seq} epoch_ms={tick.epoch_ms}\n")
            else:
                record = {
                    "mode": tick.mode.name,
                    "seq": tick.seq,
                    "epoch_ms": tick.epoch_ms,
                    "publish_time_us": event.publish_time_us,
                }
                out.write(json.dumps(record) + "\n")
            n += 1
        return n
    if isinstance(event, Gap):
        if fmt == "text":
            out.write(f"GAP {event.mode.name} {event.expected}..{event.got}\n")
        else:
            out.write(
                json.dumps({"event": "gap", "mode": event.mode.name, "from": event.expected, "to": event.got}) + "\n"
            )
    elif isinstance(event, Reset):
        if fmt == "text":
            out.write(f"RESET {event.mode.name} expected {event.expected} now {event.got}\n")
        else:
            record = {"event": "reset", "mode": event.mode.name, "expected": event.expected, "got": event.got}
            out.write(json.dumps(record) + "\n")
    elif isinstance(event, Reconnected):
        print(f"{PROG}: reconnected to {event.address} after {event.attempts} attempt(s)", file=sys.stderr)
    return 0


def _describe(addr: str, e: TickstreamError) -> str:
    if isinstance(e, AuthError):
        return f"authentication refused by {addr}: {e}"
    return f"{addr}: {e}"


def _fail(code: int, message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("--count must be 0 or more")
    return value
