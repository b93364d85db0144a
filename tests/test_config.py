"""Configuration: one TOML file, typed, unknown keys refused by name, flags override the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from gateway.errors import ConfigError


def test_defaults_without_a_file() -> None:
    c = config.load(None)
    assert (c.server.host, c.server.port) == ("127.0.0.1", 8001)
    assert c.serving("anything") == c.model_defaults


def test_model_sections_inherit_defaults(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[model_defaults]\nmax_batch_wait_us = 250\n[models.credit]\nexecution = "thread"\n')
    c = config.load(path)
    assert c.serving("credit").execution == "thread"
    assert c.serving("credit").max_batch_wait_us == 250
    assert c.serving("other").execution == "auto"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "unknown configuration key server.prot"),
        ("[sever]\nport = 1\n", "unknown key sever"),
        ('[server]\nport = "8001"\n', "server.port: expected int, got str '8001'"),
        ("[server]\nport = true\n", "server.port: expected int, got bool"),
        (
            '[models.credit]\nexecution = "gpu"\n',
            "models.credit.execution: 'gpu' is not one of 'auto', 'inline', 'thread'",
        ),
        ("[models.credit]\nmax_batch_sise = 3\n", "unknown configuration key models.credit.max_batch_sise"),
        ("server = 3\n", "server: expected a table, got int"),
        ('[feedback]\ningest_cpus = "any"\n', 'feedback.ingest_cpus: "spare", "gateway" or an array of CPU numbers'),
        ("[feedback]\ningest_cpus = [100000]\n", "feedback.ingest_cpus: CPU numbers 0.."),
        ("[feedback]\ningest_cpus = []\n", "feedback.ingest_cpus: CPU numbers 0.."),
        ("[server\n", "config file"),
        ("[server]\nport = 70000\n", "server.port: a port is 0..65535, got 70000"),
        ("[admin]\nport = -1\n", "admin.port: a port is 0..65535, got -1"),
        ("[telemetry]\nprometheus_port = 65536\n", "telemetry.prometheus_port: a port is 0..65535, got 65536"),
        ("[server]\ngrace_period_s = -1\n", "server.grace_period_s: must be 0 or more, got -1"),
        ("[server]\nmax_message_bytes = 0\n", "server.max_message_bytes: must be 1 or more, got 0"),
        ("[repository]\nintra_op_threads = -1\n", "repository.intra_op_threads: must be 0 or more, got -1"),
        ("[model_defaults]\nmax_batch_wait_us = -5\n", "model_defaults.max_batch_wait_us: must be 0 or more, got -5"),
        ("[models.credit]\nmax_batch_size = -1\n", "models.credit.max_batch_size: must be 0 or more, got -1"),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        config.load(path)
    assert message in str(error.value)


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[server]\nport = 9000\nhost = "0.0.0.0"\n[repository]\npath = "a"\n')
    c = config.with_overrides(config.load(path), host=None, port=7000, repository_path="b")
    assert (c.server.host, c.server.port, c.repository.path) == ("0.0.0.0", 7000, "b")


def test_an_ipv6_host_is_kept_bare_and_given_to_grpc_in_brackets() -> None:
    for host in ("::1", "[::1]"):
        c = config.with_overrides(config.load(None), host=host)
        assert c.server.host == "::1" and config.address(c.server.host, 8001) == "[::1]:8001"
    assert config.address("127.0.0.1", 8001) == "127.0.0.1:8001"
    assert config.TelemetryConfig(prometheus_host="[::1]").prometheus_host == "::1"


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("[server]\nbogus = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "unknown configuration key server.bogus" in result.stderr


@pytest.mark.parametrize(
    ("flags", "text", "message"),
    [
        (["--port", "70000", "--workers", "1"], None, "server.port: a port is 0..65535, got 70000"),
        (["--port", "70000", "--workers", "2"], None, "server.port: a port is 0..65535, got 70000"),
        (["--workers", "1"], "[server]\nport = -1\n", "server.port: a port is 0..65535, got -1"),
        (["--port", "0", "--workers", "1"], "[admin]\nport = 70000\n", "admin.port: a port is 0..65535, got 70000"),
        (["--port", "0", "--metrics-port", "70000"], None, "telemetry.prometheus_port: a port is 0..65535, got 70000"),
        (
            ["--port", "0", "--metrics-port", "65535", "--workers", "2"],
            None,
            "telemetry.prometheus_port: worker 1 would serve metrics on port 65536 (prometheus_port + 1), over 65535",
        ),
    ],
)
def test_a_port_out_of_range_stops_serve_with_exit_code_2(
    tmp_path: Path, flags: list[str], text: str | None, message: str
) -> None:
    """Not wrapped into the range (70000 listened on 4464, -1 on 65535) nor a traceback (OverflowError)."""
    (tmp_path / "models").mkdir()
    args = ["serve", "--model-repository", str(tmp_path / "models"), "--state-dir", str(tmp_path / "state"), *flags]
    if text is not None:
        (tmp_path / "g.toml").write_text(text)
        args += ["--config", str(tmp_path / "g.toml")]
    result = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"configuration error: {message}" in result.stderr


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("", None, "Is a directory"),
        (
            "latin1.toml",
            b'[server]\nhost = "caf\xe9"\n',
            "not UTF-8, as TOML must be (invalid continuation byte at byte 20)",
        ),
    ],
)
def test_a_config_path_that_is_a_directory_or_not_utf8_stops_serve_with_exit_code_2(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    """Not a traceback (IsADirectoryError, UnicodeDecodeError) with exit code 1."""
    (tmp_path / "models").mkdir()
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    args = ["serve", "--model-repository", str(tmp_path / "models"), "--config", str(path), "--workers", "1"]
    result = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"configuration error: config file {path}: {message}" in result.stderr


def test_unknown_model_section_is_refused(tmp_path: Path) -> None:
    (tmp_path / "models" / "credit" / "1").mkdir(parents=True)
    path = tmp_path / "g.toml"
    path.write_text("[models.credti]\nmax_batch_size = 4\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(path),
            "--model-repository",
            str(tmp_path / "models"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "models.credti: no such model" in result.stderr


def test_ingest_cpus_array_becomes_a_tuple(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text("[feedback]\ningest_cpus = [0]\n")
    assert config.load(path).feedback.ingest_cpus == (0,)
    assert config.GatewayConfig().feedback.ingest_cpus == "spare"
