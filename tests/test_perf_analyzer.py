"""Triton's own load tool, unmodified, drives the gateway: it reads ServerMetadata, ModelMetadata,
ModelConfig and ModelStatistics, then sends ModelInfer, and reports server-side counts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import GatewayProcess

PERF_ANALYZER = Path(__file__).resolve().parent.parent / "loadtests" / "perf_analyzer"


@pytest.mark.parametrize("version", ["", "1"])
def test_perf_analyzer_completes_a_short_run(gateway: GatewayProcess, version: str) -> None:
    args = [str(PERF_ANALYZER), "-m", "mlp", "-i", "grpc", "-u", gateway.address, "--concurrency-range", "2"]
    args += ["--measurement-mode", "count_windows", "--measurement-request-count", "200"]
    args += ["--stability-percentage", "1000", "--max-trials", "10"]  # a noisy shared machine: measure, don't tune
    if version:
        args += ["-x", version]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", result.stdout)
    assert throughput is not None and float(throughput.group(1)) > 0
    server_count = re.search(r"Server:\s+Inference count: (\d+)", result.stdout)
    assert server_count is not None and int(server_count.group(1)) > 0, result.stdout
