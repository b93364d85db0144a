"""`canary-gateway profile`: build a model version's OOD profile from its training data.

The profile is written beside the version's model (`<repository>/<model>/<version>/profile.npz`), where
the gateway finds it; the data's feature count is checked against the model's input first, so a profile
can never silently describe a different input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gateway.errors import ConfigError
from gateway.ood.profile import PROFILE_FILE, build_profile, load_training_data, save_profile
from gateway.repository import MODEL_FILE
from gateway.runtime import OnnxModel


def model_features(model_path: Path) -> int:
    """The feature count of a model with one 2-D input [batch, n_features]; ConfigError otherwise."""
    model = OnnxModel(model_path, intra_op_threads=1, inter_op_threads=1)
    if len(model.inputs) != 1:
        names = ", ".join(spec.name for spec in model.inputs)
        raise ConfigError(f"{model_path}: a profile needs a model with one input, this one has {names}")
    spec = model.inputs[0]
    if len(spec.shape) != 2 or spec.shape[1] < 1:
        raise ConfigError(
            f"{model_path}: input {spec.name!r} has shape {list(spec.shape)}; a profile needs [batch, n_features]"
            " with a fixed n_features"
        )
    return spec.shape[1]


def run(args: argparse.Namespace) -> int:
    version_dir = Path(args.model_repository) / args.model / args.version
    model_path = version_dir / MODEL_FILE
    if not model_path.is_file():
        raise ConfigError(f"no model at {model_path} (check --model, --version and --model-repository)")
    n_features = model_features(model_path)
    try:
        data = load_training_data(args.data)
        if data.rows.shape[1] != n_features:
            raise ValueError(
                f"{args.data} has {data.rows.shape[1]} features but {args.model}:{args.version} takes {n_features}"
            )
        profile = build_profile(data.rows, args.threshold_quantile, data.feature_names)
    except ValueError as e:
        print(f"canary-gateway profile: {e}", file=sys.stderr)
        return 1
    target = version_dir / PROFILE_FILE
    save_profile(profile, target)
    print(
        f"wrote {target}: {profile.n_rows} rows, {profile.n_features} features, "
        f"threshold {profile.threshold:.4g} (quantile {profile.threshold_quantile} of out-of-fold training scores), "
        f"covariance shrinkage {profile.shrinkage:.3g}"
    )
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("profile", help="build a model version's out-of-distribution profile")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--version", required=True, help="model version")
    parser.add_argument("--data", required=True, help="training rows: .npy, .csv (optional header) or .parquet")
    parser.add_argument("--model-repository", default="models", help="directory of <model>/<version>/model.onnx")
    parser.add_argument(
        "--threshold-quantile",
        type=float,
        default=0.995,
        help="training-score quantile above which a row is OOD (default 0.995: ~0.5%% of normal rows flagged)",
    )
    parser.set_defaults(func=run)
