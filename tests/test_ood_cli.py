"""`canary-gateway profile` as an operator runs it (a subprocess): the profile lands beside the model and
loads; data that does not fit the model is refused with a message that says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from models import identity_graph, mlp_graph, save_model

from gateway.ood.profile import PROFILE_FILE, load_profile

FEATURES = 8


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("profile-models")
    save_model(root, "mlp", "1", mlp_graph(features=FEATURES))
    save_model(root, "sequence", "1", identity_graph("FP32", width="S"))
    return root


def profile_cli(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway", "profile", "--model-repository", str(repo), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_profile_is_written_beside_the_model_and_loads(repo: Path, tmp_path: Path) -> None:
    rows = np.random.default_rng(0).standard_normal((500, FEATURES))
    header = ",".join(f"f{i}" for i in range(FEATURES))
    np.savetxt(tmp_path / "train.csv", rows, delimiter=",", header=header, comments="")
    result = profile_cli(repo, "--model", "mlp", "--version", "1", "--data", str(tmp_path / "train.csv"))
    assert result.returncode == 0, result.stderr
    target = repo / "mlp" / "1" / PROFILE_FILE
    assert f"wrote {target}: 500 rows, 8 features, threshold" in result.stdout
    profile = load_profile(target, expected_features=FEATURES)
    assert profile.n_rows == 500 and profile.threshold_quantile == 0.995
    assert profile.feature_names == tuple(f"f{i}" for i in range(FEATURES))


def test_threshold_quantile_is_passed_through(repo: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "train.npy", np.random.default_rng(1).standard_normal((300, FEATURES)))
    args = ["--model", "mlp", "--version", "1", "--data", str(tmp_path / "train.npy"), "--threshold-quantile", "0.9"]
    assert profile_cli(repo, *args).returncode == 0
    assert load_profile(repo / "mlp" / "1" / PROFILE_FILE).threshold_quantile == 0.9


def test_wrong_feature_count_is_refused(repo: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "wide.npy", np.zeros((100, FEATURES + 2)))
    version_dir = repo / "mlp" / "1"
    before = {path.name: path.read_bytes() for path in version_dir.iterdir()}
    result = profile_cli(repo, "--model", "mlp", "--version", "1", "--data", str(tmp_path / "wide.npy"))
    assert result.returncode == 1
    assert f"{tmp_path / 'wide.npy'} has 10 features but mlp:1 takes 8" in result.stderr
    assert {path.name: path.read_bytes() for path in version_dir.iterdir()} == before  # nothing written


def test_unknown_model_and_unprofilable_input_are_configuration_errors(repo: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "train.npy", np.zeros((100, FEATURES)))
    missing = profile_cli(repo, "--model", "mlp", "--version", "7", "--data", str(tmp_path / "train.npy"))
    assert missing.returncode == 2
    assert f"no model at {repo / 'mlp' / '7' / 'model.onnx'}" in missing.stderr
    sequence = profile_cli(repo, "--model", "sequence", "--version", "1", "--data", str(tmp_path / "train.npy"))
    assert sequence.returncode == 2
    assert "a profile needs [batch, n_features] with a fixed n_features" in sequence.stderr


def test_bad_training_rows_are_refused(repo: Path, tmp_path: Path) -> None:
    rows = np.random.default_rng(2).standard_normal((100, FEATURES))
    rows[42, 0] = np.nan
    np.save(tmp_path / "nan.npy", rows)
    result = profile_cli(repo, "--model", "mlp", "--version", "1", "--data", str(tmp_path / "nan.npy"))
    assert result.returncode == 1
    assert "1 training rows contain NaN or infinity (first: row 42)" in result.stderr
