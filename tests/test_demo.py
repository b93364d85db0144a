"""The README's "run it" command: builds two real versions, serves them, sends traffic, exits 0."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_serves_two_versions_and_refuses_bad_input(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "gateway", "demo", "--directory", str(tmp_path / "models")]
    args += ["--port", str(_free_port()), "--requests", "30", "--state-dir", str(tmp_path / "state")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version 1: 10 answers" in result.stdout
    assert "version 2: 20 answers" in result.stdout
    assert "INVALID_ARGUMENT: inputs[X].shape: dimension 1 is 5, the model expects 30" in result.stdout
    assert "each user always on one version: True" in result.stdout
    assert "labels agree" in result.stdout
    ood = re.search(r"(\d+)/20 held-out rows flagged, (\d+)/20 rows in the wrong units \(x 3\) flagged", result.stdout)
    assert ood is not None, result.stdout
    assert int(ood.group(1)) <= 3 and int(ood.group(2)) >= 18
    assert "gateway exited with code 0" in result.stdout
    assert (tmp_path / "models/breast_cancer/2/model.toml").read_text().startswith("[provenance]")
    logged = subprocess.run(
        [sys.executable, "-m", "gateway", "log", "--state-dir", str(tmp_path / "state"), "get", "canary-7"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert logged.returncode == 0, logged.stderr
    assert "canary-7" in logged.stdout and "breast_cancer:" in logged.stdout
    assert "canary-7/shadow/2" in logged.stdout or "breast_cancer:2" in logged.stdout  # its shadow, or v2 itself
