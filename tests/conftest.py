"""Shared fixtures: model repositories built with onnx.helper and real gateway processes on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import build_repository  # noqa: E402

from gateway.protocol import Stub  # noqa: E402
from gateway.protocol import inference as pb  # noqa: E402

# The supervisor's line says all serve. An IPv6 host is logged in brackets, and then dialled on ::1.
LISTENING = re.compile(r"listening on ([\d.]+|\[[\da-f:]+\]):(\d+)( \(\d+ workers\))?")


class GatewayProcess:
    """`canary-gateway serve` in a child process; its log is collected for assertions."""

    def __init__(
        self,
        repository: Path,
        config: str | None,
        tmp: Path,
        workers: int = 1,
        cli: tuple[str, ...] = ("-m", "gateway"),
    ) -> None:
        """`cli`: the Python arguments that run the command line (a script, for a test that patches it)."""
        self.state_dir = tmp / "state"
        args = [sys.executable, *cli, "serve", "--model-repository", str(repository), "--port", "0"]
        args += ["--state-dir", str(self.state_dir), "--workers", str(workers)]
        self.workers = workers
        if config is not None:
            config_path = tmp / "gateway.toml"
            config_path.write_text(config)
            args += ["--config", str(config_path)]
        self.process = subprocess.Popen(
            args, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )
        self.log_lines: list[str] = []
        self._port_found = threading.Event()
        self.port = 0
        self._ipv6 = False
        threading.Thread(target=self._read_log, daemon=True).start()
        if not self._port_found.wait(30):
            self.stop()
            raise RuntimeError("gateway did not start listening:\n" + self.log)
        self.address = f"{'[::1]' if self._ipv6 else '127.0.0.1'}:{self.port}"

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines.append(line)
            match = LISTENING.search(line)
            if match and not self.port and (self.workers == 1 or match.group(3)):
                self._ipv6 = match.group(1).startswith("[")
                self.port = int(match.group(2))
                self._port_found.set()

    @property
    def log(self) -> str:
        return "".join(self.log_lines)

    def wait_ready(self, timeout: float = 60, credentials: grpc.ChannelCredentials | None = None) -> None:
        """Wait until ServerReady; `credentials` for a gateway serving TLS."""
        channel = grpc.secure_channel(self.address, credentials) if credentials else grpc.insecure_channel(self.address)
        with channel:
            stub = Stub(channel)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready:
                    return
                time.sleep(0.05)
        raise RuntimeError("gateway not ready:\n" + self.log)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def gateway(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = (
        "[models.mlp]\nreject_non_finite = true\nmax_batch_size = 8\n"
        '[models.wide_inline]\nexecution = "inline"\n'
        '[models.wide_thread]\nexecution = "thread"\n'
    )
    process = GatewayProcess(repository, config, tmp_path_factory.mktemp("config"))
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log


@pytest.fixture
def stub(gateway: GatewayProcess) -> Iterator[Stub]:
    with grpc.insecure_channel(gateway.address) as channel:
        yield Stub(channel)
