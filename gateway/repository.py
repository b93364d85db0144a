"""The model repository: versions on disk (`<root>/<name>/<version>/model.onnx`), loaded into
onnxruntime sessions and warmed up before they are marked ready.

Loading runs off the event loop (the caller uses a thread) so health and readiness RPCs answer
while models warm up.
"""

from __future__ import annotations

import hashlib
import logging
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.batcher import MicroBatcher
from gateway.config import GatewayConfig, ModelServingConfig, OodConfig
from gateway.errors import ConfigError, FailedPrecondition, GatewayError, NotFound, Unavailable
from gateway.ood.drift import DriftMonitor, DriftReport
from gateway.ood.profile import PROFILE_FILE, load_profile
from gateway.ood.scoring import OodScorer
from gateway.runtime import OnnxModel, TensorSpec
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


def _read_metadata(path: Path) -> dict[str, Any]:
    """`model.toml`; ConfigError naming it when it is not TOML or not UTF-8 (tomllib raises
    UnicodeDecodeError for the latter, which escaped every handler and killed the repository watcher)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None


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
    state: str = "LOADING"  # LOADING -> READY | FAILED; READY -> UNLOADING (then gone)
    reason: str = ""
    warmup_us: float = 0.0
    ood: OodScorer | None = None  # None: no profile beside the model, served unscored
    ood_input: str = ""  # the input the profile describes
    drift: DriftMonitor | None = None  # recent inputs against the profile
    drift_report: DriftReport | None = None  # the latest comparison (refreshed by the server's drift task)
    in_flight: int = 0  # requests admitted to the model and not yet answered (max_in_flight; unload waits)

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

    def close(self) -> None:
        """Free the session and the batcher's thread; the version can no longer serve."""
        if self.batcher is not None:
            self.batcher.close()
        self.batcher = None
        self.model = None

    def load(self, intra_op_threads: int, inter_op_threads: int, warmup_runs: int) -> None:
        """Load, hash and warm up; on failure the version stays unroutable with a reason."""
        try:
            self.sha256 = _sha256(self.path / MODEL_FILE)
            metadata = self.path / METADATA_FILE
            if metadata.exists():
                self.provenance = _flatten(_read_metadata(metadata))
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
        except (ConfigError, GatewayError, OSError) as e:  # GatewayError: warm-up failed
            self.state, self.reason = "FAILED", str(e)
            log.error("model %s version %s failed to load: %s", self.name, self.version, e)


def _signature_difference(old: OnnxModel, new: OnnxModel) -> str:
    """'' when the two take and give the same tensors; else what differs, for the refusal message."""

    def describe(specs: Sequence[TensorSpec]) -> str:
        return ", ".join(f"{s.name} {s.dtype.v2_name} {list(s.shape)}" for s in specs)

    for kind, a, b in (("inputs", old.inputs, new.inputs), ("outputs", old.outputs, new.outputs)):
        if a != b:
            return f"{kind} were {describe(a)}, now {describe(b)}"
    return ""


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
            self._refresh_ready(version.name)

    def serving(self, name: str) -> ModelServingConfig:
        return self._config.serving(name)

    @property
    def root(self) -> Path:
        return Path(self._config.repository.path)

    def on_disk(self) -> dict[str, list[str]]:
        """Every `<model>/<version>/model.onnx` under the root now, versions in order."""
        found: dict[str, list[str]] = {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            versions = [v.name for v in model_dir.iterdir() if (v / MODEL_FILE).is_file()]
            if versions:
                found[model_dir.name] = sorted(versions, key=version_order)
        return found

    def prepare(self, name: str, version: str, force_signature: bool = False) -> ModelVersion:
        """Load and warm up `<root>/<name>/<version>` without publishing it (call off the event loop).

        Refused (FailedPrecondition, with the reason) when the file is missing or does not load, warm-up
        fails, the OOD profile does not fit, or its signature differs from the model's other ready
        versions (unless `force_signature`): routing never sees a version that failed any of these.
        """
        path = self.root / name / version
        if not (path / MODEL_FILE).is_file():
            raise NotFound(f"model {name!r} version {version!r}: no {path / MODEL_FILE}")
        repo = self._config.repository
        candidate = ModelVersion(name, version, path, self._config.serving(name))
        candidate.load(repo.intra_op_threads, repo.inter_op_threads, repo.warmup_runs)
        if not candidate.ready:
            raise FailedPrecondition(f"model {name!r} version {version!r} did not load: {candidate.reason}")
        try:
            if not force_signature:
                self._check_signature(candidate)
            candidate.attach_profile(self._config.ood)
        except (ConfigError, FailedPrecondition) as e:
            candidate.close()
            raise FailedPrecondition(str(e)) from None
        return candidate

    def _check_signature(self, candidate: ModelVersion) -> None:
        assert candidate.model is not None
        for other in self.models.get(candidate.name, {}).values():
            if other.model is None or other.version == candidate.version:
                continue
            difference = _signature_difference(other.model, candidate.model)
            if difference:
                raise FailedPrecondition(
                    f"model {candidate.name!r} version {candidate.version!r} changes the signature of version "
                    f"{other.version!r}: {difference} (load with force to accept it)"
                )
            return

    def publish(self, version: ModelVersion) -> ModelVersion | None:
        """Make a prepared version routable (on the event loop); return the version it replaced, if any."""
        versions = self.models.setdefault(version.name, {})
        replaced = versions.get(version.version)
        versions[version.version] = version
        self.models[version.name] = dict(sorted(versions.items(), key=lambda item: version_order(item[0])))
        self._refresh_ready(version.name)
        return replaced

    def withdraw(self, version: ModelVersion) -> None:
        """Stop routing to `version` (on the event loop); requests holding it finish (see `in_flight`)."""
        version.state = "UNLOADING"
        self._refresh_ready(version.name)

    def remove(self, version: ModelVersion) -> None:
        """Forget a withdrawn version and free its session."""
        versions = self.models.get(version.name, {})
        if versions.get(version.version) is version:
            del versions[version.version]
        if versions:
            self._refresh_ready(version.name)
        else:  # its last version: the model is gone (NOT_FOUND), not "loading"
            self.models.pop(version.name, None)
            self._ready_versions.pop(version.name, None)
        version.close()

    def _refresh_ready(self, name: str) -> None:
        self._ready_versions[name] = tuple(v for v, mv in self.models.get(name, {}).items() if mv.ready)

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
        """The named version; when `version` is empty the highest ready one (the highest of all when none
        is ready, so an error can say its state): a failed newer directory must not hide the versions
        that serve, from ModelMetadata and ModelReady as from routing."""
        versions = self.versions_of(name)
        if not version:
            ready = [v for v in versions.values() if v.ready]
            return (ready or list(versions.values()))[-1]
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
            version.close()
