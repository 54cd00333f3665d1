"""Fixtures: the real ``tickstream serve`` binary, TLS material from openssl."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parents[3]
BINARY = Path(os.environ.get("TICKSTREAM_BIN", REPO / "target" / "debug" / "tickstream"))
USERS = "alice:secret,bob:hunter2"
#: Generous: CI shares two cores between cargo and these tests.
WAIT = 30.0

T = TypeVar("T")


def arun(coro: Awaitable[T], timeout: float = 90.0) -> T:
    """Runs one test body on a fresh event loop, failing it if it hangs."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


class Server:
    """``tickstream serve`` as a child process, killed at the end of the test."""

    def __init__(self, args: list[str], listen: str = "127.0.0.1:0", metrics: bool = False) -> None:
        assert BINARY.is_file(), f"{BINARY} is missing: build it (cargo build --bin tickstream) or set TICKSTREAM_BIN"
        self.metrics_addr = f"127.0.0.1:{free_port()}" if metrics else None
        cmd = [str(BINARY), "serve", "--listen", listen, "--metrics-listen", self.metrics_addr or "off", *args]
        env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        env["TICKSTREAM_USERS"] = USERS
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = self.log.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"server did not start: {cmd}") from None
            if '"serving"' in line:
                self.addr: str = json.loads(line)["fields"]["listen"]
                break

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.put(line)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def scrape(self) -> str:
        assert self.metrics_addr, "start the server with metrics=True"
        with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=5) as response:
            body: str = response.read().decode()
            return body

    async def wait_metric(self, series: str, at_least: float) -> None:
        """Polls /metrics until ``series`` reaches ``at_least``."""
        deadline = time.monotonic() + WAIT
        while True:
            body = await asyncio.to_thread(self.scrape)
            for line in body.splitlines():
                if line.startswith(series + " ") and float(line.split()[-1]) >= at_least:
                    return
            assert time.monotonic() < deadline, f"{series} never reached {at_least}:\n{body}"
            await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server_factory() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(*args: str, listen: str = "127.0.0.1:0", metrics: bool = False) -> Server:
        server = Server(list(args), listen, metrics)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, and a client
    certificate, all made by the openssl CLI."""
    assert shutil.which("openssl"), "openssl is required (scripts/test-deps.txt installs it)"
    d = tmp_path_factory.mktemp("certs")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ext = d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    client_ext = d / "client.ext"
    client_ext.write_text("extendedKeyUsage=clientAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=tickstream test CA")
    for name, extfile in (("server", ext), ("client", client_ext)):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", str(extfile),
        )  # fmt: skip
    run("req", "-x509", *ec, "-keyout", "other-ca.key", "-out", "other-ca.pem", "-days", "2", "-subj", "/CN=other")
    return {p.stem.replace("-", "_") + "_" + p.suffix[1:]: p for p in d.iterdir()}
