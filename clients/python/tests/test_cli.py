"""``python -m tickstream_client sub``: the output and exit codes of
``tickstream sub`` against the real server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import BINARY, Server, free_port

Start = Callable[..., Server]


def sub(*args: str, password: str | None = "secret", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKSTREAM_")}
    if password is not None:
        env["TICKSTREAM_PASSWORD"] = password
    return subprocess.run(
        [sys.executable, "-m", "tickstream_client", "sub", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_prints_count_ticks_of_both_modes_and_exits_0(server_factory: Start) -> None:
    server = server_factory("--synthetic-rate", "200")
    out = sub("--addr", server.addr, "--user", "alice", "--mode", "second", "--mode", "minute", "--count", "40")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 40
    modes = {line.split()[0] for line in lines}
    assert modes <= {"SECOND", "MINUTE"}
    for line in lines:
        mode, seq, epoch = line.split()
        assert seq.startswith("seq=") and epoch.startswith("epoch_ms=")


def test_json_lines_carry_the_same_fields_as_tickstream_sub(server_factory: Start) -> None:
    server = server_factory("--synthetic-rate", "100")
    out = sub("--addr", server.addr, "--user", "alice", "--format", "json", "--count", "5")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [set(r) for r in records] == [{"mode", "seq", "epoch_ms", "publish_time_us"}] * 5
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(seqs[0], seqs[0] + 5))


def test_output_matches_the_rust_cli_line_for_line(server_factory: Start) -> None:
    """Same server, same stream: the two CLIs print the same tick lines."""
    server = server_factory("--synthetic-rate", "50")
    python = sub("--addr", server.addr, "--user", "alice", "--count", "3")
    env = dict(os.environ, TICKSTREAM_PASSWORD="secret")
    rust = subprocess.run(
        [str(BINARY), "sub", "--addr", server.addr, "--user", "alice", "--count", "3"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert python.returncode == rust.returncode == 0
    shape = [line.split("=")[0] + "=" for line in rust.stdout.splitlines()]
    assert [line.split("=")[0] + "=" for line in python.stdout.splitlines()] == shape


def test_exit_codes(server_factory: Start, certs: dict[str, Path]) -> None:
    server = server_factory("--auth-failures-per-minute", "0")
    # 4: authentication refused.
    out = sub("--addr", server.addr, "--user", "alice", password="wrong")
    assert out.returncode == 4, out.stderr
    assert "AUTH_FAILED" in out.stderr
    # 3: nothing listens.
    out = sub("--addr", f"127.0.0.1:{free_port()}", "--user", "alice", "--no-reconnect")
    assert out.returncode == 3, out.stderr
    # 2: usage, and a missing password.
    assert sub("--addr", server.addr).returncode == 2
    assert sub("--addr", server.addr, "--user", "alice", "--mode", "hour").returncode == 2
    assert sub("--addr", server.addr, "--user", "alice", "--count", "-1").returncode == 2
    assert sub("--addr", "nonsense", "--user", "alice").returncode == 2
    assert sub("--addr", server.addr, "--user", "alice", "--tls-cert", "c.pem").returncode == 2
    out = sub("--addr", server.addr, "--user", "alice", password=None)
    assert out.returncode == 2 and "TICKSTREAM_PASSWORD" in out.stderr
    # 6: TLS expected by the client, a certificate it cannot verify.
    tls = server_factory("--tls-cert", str(certs["server_pem"]), "--tls-key", str(certs["server_key"]))
    out = sub("--addr", tls.addr, "--user", "alice", "--tls-ca", str(certs["other_ca_pem"]), "--no-reconnect")
    assert out.returncode == 6, out.stderr
    out = sub("--addr", tls.addr, "--user", "alice", "--tls-ca", str(certs["ca_pem"]), "--count", "1")
    assert out.returncode == 0, out.stderr


def test_server_shutdown_without_reconnect_exits_1(server_factory: Start) -> None:
    server = server_factory("--synthetic-rate", "20")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKSTREAM_")}
    env["TICKSTREAM_PASSWORD"] = "secret"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tickstream_client", "sub", "--addr", server.addr, "--user", "alice", "--no-reconnect"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("SECOND seq=")
    server.signal(signal.SIGTERM)
    assert proc.wait(60) == 1
    assert proc.stderr is not None and "SERVER_SHUTDOWN" in proc.stderr.read()
