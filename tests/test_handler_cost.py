"""`loadtests/handler_cost.py` keeps working as the request path changes: it reaches into the gateway
(the log writer, the route table, the codec), so a rename there must not leave it broken."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "loadtests" / "handler_cost.py"


def test_handler_cost_measures_both_handlers_and_the_gateways_parts() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--calls", "200", "--rounds", "1", "--cpu", "-1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    medians = dict(re.findall(r"^\s+(gateway|minimal V2)\s+median\s+([\d.]+)", result.stdout, re.MULTILINE))
    assert set(medians) == {"gateway", "minimal V2"} and all(float(us) > 0 for us in medians.values())
    expected = ["decode", "route", "model run (onnxruntime)", "log commit", "encode"]
    parts = re.findall(r"^\s+(.+?)\s+([\d.]+)$", result.stdout.split("gateway's parts")[-1], re.MULTILINE)
    assert [name for name, _ in parts] == expected and all(float(us) > 0 for _, us in parts)
