"""The committed compiled protos match protos/*.proto, and the console script is installed."""

from __future__ import annotations

import shutil
import subprocess

from gateway import protogen


def test_compiled_protos_are_current() -> None:
    assert protogen.stale_descriptors() == [], "run `python -m gateway.protogen` and commit gateway/_proto"


def test_console_script_is_installed() -> None:
    executable = shutil.which("canary-gateway")
    assert executable is not None
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "serve" in result.stdout and "demo" in result.stdout
