"""The model repository: versions on disk (`<root>/<name>/<version>/model.onnx`), loaded into
onnxruntime sessions and warmed up before they are marked ready.

Loading runs off the event loop (the caller uses a thread) so health and readiness RPCs answer
while models warm up.
"""

from __future__ import annotations

import hashlib
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.batcher import MicroBatcher
from gateway.config import GatewayConfig, ModelServingConfig, OodConfig
from gateway.errors import ConfigError, GatewayError, NotFound, Unavailable
from gateway.ood.drift import DriftMonitor, DriftReport
from gateway.ood.profile import PROFILE_FILE, load_profile
from gateway.ood.scoring import OodScorer
from gateway.runtime import OnnxModel
from gateway.stats import VersionStats
from router.rules import version_order

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
METADATA_FILE = "model.toml"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


@dataclass
class ModelVersion:
    """One version of a model: its file, provenance, session and readiness."""

    name: str
    version: str
    path: Path
    serving: ModelServingConfig
    sha256: str = ""
    provenance: dict[str, str] = field(default_factory=dict)
    model: OnnxModel | None = None
    batcher: MicroBatcher | None = None
    stats: VersionStats = field(default_factory=VersionStats)
    state: str = "LOADING"  # LOADING -> READY | FAILED
    reason: str = ""
    warmup_us: float = 0.0
    ood: OodScorer | None = None  # None: no profile beside the model, served unscored
    ood_input: str = ""  # the input the profile describes
    drift: DriftMonitor | None = None  # recent inputs against the profile
    drift_report: DriftReport | None = None  # the latest comparison (refreshed by the server's drift task)
    in_flight: int = 0  # requests admitted to the model and not yet answered by it (serving.max_in_flight)

    def attach_profile(self, config: OodConfig) -> None:
        """Load `profile.npz` if there is one; a profile that does not fit the model is a ConfigError."""
        path = self.path / PROFILE_FILE
        if not path.exists() or self.model is None:
            return
        inputs = self.model.inputs
        spec = inputs[0]
        if len(inputs) != 1 or len(spec.shape) != 2 or spec.shape[1] < 1 or spec.dtype.numpy.kind != "f":
            signature = ", ".join(f"{s.name} {s.dtype.v2_name} {list(s.shape)}" for s in inputs)
            raise ConfigError(
                f"OOD profile {path}: model {self.name!r} version {self.version!r} has inputs {signature}; "
                "a profile needs exactly one 2-D float input [batch, features]"
            )
        profile = load_profile(path, expected_features=spec.shape[1])
        self.ood = OodScorer(profile, config.top_k)
        self.ood_input = spec.name
        self.drift = DriftMonitor(
            profile,
            window=config.drift_window_rows,
            psi_threshold=config.drift_psi_threshold,
            ks_threshold=config.drift_ks_threshold,
            min_rows=config.drift_min_rows,
        )
        log.info(
            "model %s version %s: OOD profile of %d features, threshold %.3f (training quantile %.4g)",
            self.name,
            self.version,
            spec.shape[1],
            self.ood.profile.threshold,
            self.ood.profile.threshold_quantile,
        )

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    def load(self, intra_op_threads: int, inter_op_threads: int, warmup_runs: int) -> None:
        """Load, hash and warm up; on failure the version stays unroutable with a reason."""
        try:
            self.sha256 = _sha256(self.path / MODEL_FILE)
            metadata = self.path / METADATA_FILE
            if metadata.exists():
                with open(metadata, "rb") as f:
                    self.provenance = _flatten(tomllib.load(f))
            model = OnnxModel(self.path / MODEL_FILE, intra_op_threads, inter_op_threads)
            self.warmup_us = model.warm_up(warmup_runs)
            inline = self.serving.execution == "inline" or (
                self.serving.execution == "auto" and self.warmup_us < self.serving.inline_threshold_us
            )
            self.batcher = MicroBatcher(
                model,
                self.stats,
                self.serving.max_batch_size,
                self.serving.max_batch_wait_us,
                inline,
                label=f"model {self.name!r} version {self.version!r}",
            )
            self.model = model
            self.state = "READY"
            log.info(
                "model %s version %s ready (warm-up run %.0f us, %s execution, sha256 %s)",
                self.name,
                self.version,
                self.warmup_us,
                "inline" if inline else "threaded",
                self.sha256[:12],
            )
        except (ConfigError, GatewayError, tomllib.TOMLDecodeError, OSError) as e:  # GatewayError: warm-up failed
            self.state, self.reason = "FAILED", str(e)
            log.error("model %s version %s failed to load: %s", self.name, self.version, e)


class ModelRepository:
    """All model versions found under the repository root, by name and version."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        root = Path(config.repository.path)
        if not root.is_dir():
            raise ConfigError(f"model repository {root} is not a directory")
        self.models: dict[str, dict[str, ModelVersion]] = {}
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            versions = sorted((v.name for v in model_dir.iterdir() if (v / MODEL_FILE).is_file()), key=version_order)
            if versions:
                serving = config.serving(model_dir.name)
                self.models[model_dir.name] = {
                    v: ModelVersion(model_dir.name, v, model_dir / v, serving) for v in versions
                }
        self._ready_versions: dict[str, tuple[str, ...]] = {name: () for name in self.models}
        unknown = sorted(set(config.models) - set(self.models))
        if unknown:
            raise ConfigError(f"models.{unknown[0]}: no such model in repository {root}")
        for name, by_version in self.models.items():
            serving = config.serving(name)
            if serving.ood_policy == "fallback" and serving.ood_fallback_version not in by_version:
                raise ConfigError(
                    f"models.{name}.ood_fallback_version: {serving.ood_fallback_version!r} is not a version of "
                    f'{name!r} ({", ".join(by_version)}); ood_policy = "fallback" needs one'
                )

    def all_versions(self) -> list[ModelVersion]:
        return [v for versions in self.models.values() for v in versions.values()]

    def load_all(self) -> None:
        repo = self._config.repository
        for version in self.all_versions():
            version.load(repo.intra_op_threads, repo.inter_op_threads, repo.warmup_runs)
            version.attach_profile(self._config.ood)
            self._ready_versions[version.name] = tuple(v for v, mv in self.models[version.name].items() if mv.ready)

    def ready_versions(self, name: str) -> tuple[str, ...]:
        """The model's ready versions, lowest first (NOT_FOUND for an unknown model)."""
        found = self._ready_versions.get(name)
        if found is None:
            raise NotFound(f"model_name: unknown model {name!r}")
        return found

    def ready_map(self) -> dict[str, frozenset[str]]:
        """Every model's ready versions: what route edits are validated against."""
        return {name: frozenset(versions) for name, versions in self._ready_versions.items()}

    @property
    def ready(self) -> bool:
        """Every version finished loading and at least one is ready (failed ones stay unroutable)."""
        versions = self.all_versions()
        return all(v.state != "LOADING" for v in versions) and any(v.ready for v in versions)

    def versions_of(self, name: str) -> dict[str, ModelVersion]:
        versions = self.models.get(name)
        if versions is None:
            raise NotFound(f"model_name: unknown model {name!r}")
        return versions

    def get(self, name: str, version: str) -> ModelVersion:
        """The named version, or the highest version when `version` is empty."""
        versions = self.versions_of(name)
        if not version:
            return list(versions.values())[-1]
        found = versions.get(version)
        if found is None:
            raise NotFound(f"model_version: model {name!r} has no version {version!r}")
        return found

    def get_ready(self, name: str, version: str) -> ModelVersion:
        found = self.get(name, version)
        if not found.ready:
            detail = f": {found.reason}" if found.reason else ""
            raise Unavailable(f"model {name!r} version {found.version!r} is {found.state}{detail}")
        return found

    def close(self) -> None:
        for version in self.all_versions():
            if version.batcher is not None:
                version.batcher.close()
