"""One typed configuration object, loaded from one TOML file and overridden by command-line flags.

Every key is documented in the README. Unknown keys and wrong types are errors that name the key,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.auth import Role
from gateway.errors import ConfigError

Execution = Literal["auto", "inline", "thread"]
OodPolicy = Literal["flag", "reject", "fallback"]
_SEGMENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_PORT = 65535


def address(host: str, port: int) -> str:
    """HOST:PORT as gRPC parses it (and as logs show it): an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bare_host(host: str) -> str:
    """An IPv6 address without the brackets of "[::1]": sockets take it so, `address` adds them for gRPC."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _check_at_least(section: str, minimum: float, *keys_and_values: tuple[str, float]) -> None:
    """Refuse a count or duration below `minimum`: such values were accepted and misbehaved later (a
    negative grace, onnxruntime refusing -1 threads at the first load, a negative wait)."""
    for key, value in keys_and_values:
        if value < minimum:
            raise ConfigError(f"{section}.{key}: must be {minimum:g} or more, got {value}")


def _check_port(key: str, port: int) -> None:
    """Refuse a port TCP cannot have: gRPC would wrap 70000 to 4464 and -1 to 65535 without a word."""
    if not 0 <= port <= MAX_PORT:
        raise ConfigError(f"{key}: a port is 0..{MAX_PORT}, got {port}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8001
    max_message_bytes: int = 64 * 1024 * 1024
    grace_period_s: float = 10.0
    stream_max_in_flight: int = 64  # ModelStreamInfer: requests read but not yet answered, per stream
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    state_dir: str = "gateway-state"
    workers: int = 0  # serving processes sharing the port; 0: one per core this process may use
    route_poll_ms: float = 5.0  # a route change made by another process is obeyed within this
    routes_file: str = ""  # TOML route table applied at startup (router.seed); "": routes only from the admin API
    defer_transport_threads: bool = True  # gRPC's threads under SCHED_BATCH: no preempting the event loop

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", bare_host(self.host))
        _check_port("server.port", self.port)
        if self.workers < 0:
            raise ConfigError(f"server.workers: must be 0 (one per core) or more, got {self.workers}")
        if self.route_poll_ms <= 0:
            raise ConfigError(f"server.route_poll_ms: must be positive, got {self.route_poll_ms}")
        if self.stream_max_in_flight < 1:
            raise ConfigError(f"server.stream_max_in_flight: must be at least 1, got {self.stream_max_in_flight}")
        _check_at_least("server", 1, ("max_message_bytes", self.max_message_bytes))
        _check_at_least("server", 0, ("grace_period_s", self.grace_period_s))


@dataclass(frozen=True)
class RepositoryConfig:
    path: str = "models"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    warmup_runs: int = 3
    watch_interval_s: float = 2.0  # load new version directories this often (0: no watching)

    def __post_init__(self) -> None:
        # 0 threads: onnxruntime's own choice
        _check_at_least(
            "repository",
            0,
            ("intra_op_threads", self.intra_op_threads),
            ("inter_op_threads", self.inter_op_threads),
            ("warmup_runs", self.warmup_runs),
            ("watch_interval_s", self.watch_interval_s),
        )


@dataclass(frozen=True)
class ModelServingConfig:
    """Per-model serving policy; `[model_defaults]` applies to all, `[models.NAME]` overrides."""

    max_batch_size: int = 64
    max_batch_wait_us: int = 2000
    execution: Execution = "auto"
    inline_threshold_us: int = 1000
    reject_non_finite: bool = False
    ood_policy: OodPolicy = "flag"  # what an out-of-distribution request gets (versions with a profile)
    ood_fallback_version: str = ""  # ood_policy = "fallback": the version that answers such requests
    agreement_rtol: float = 1e-3  # a shadow's float outputs agree with the primary's within this relative difference
    # Limits, per version of the model (each version has its own session and queue); 0 = unlimited.
    max_in_flight: int = 0  # requests admitted and not yet answered by the model
    max_queue: int = -1  # requests waiting in the micro-batcher; -1: twice max_batch_size
    max_tensor_rank: int = 0  # dimensions of any input
    max_tensor_elements: int = 0  # elements of any input
    # Ground truth and quality (README, "Ground truth, quality and fairness").
    segments: tuple[str, ...] = ()  # request parameters `segment.NAME` this model accepts, logs and slices by
    label_output: str = "label"  # the output holding the predicted class (or value, for a regressor)
    score_output: str = "probabilities"  # [N, classes] class probabilities ("" or absent: no score metrics)
    positive_label: int = 1  # the class that precision, recall, TPR, FPR, AUROC and calibration are about
    fairness_min_group: int = 30  # labelled requests a group needs before its rates are reported
    max_demographic_parity_gap: float = 0.0  # alert past this gap in positive rate between groups (0: off)
    max_equal_opportunity_gap: float = 0.0  # ... in true-positive rate (0: off)
    max_fpr_gap: float = 0.0  # ... in false-positive rate (0: off)

    def check(self, path: str) -> None:
        """ConfigError naming `path.key` for a limit out of range (`path`: the section being read)."""
        for name in self.segments:
            if not _SEGMENT_NAME.fullmatch(name):
                raise ConfigError(f"{path}.segments: {name!r} is not a name (letters, digits, _ and -)")
        if len(set(self.segments)) != len(self.segments):
            raise ConfigError(f"{path}.segments: {list(self.segments)} names an attribute twice")
        if self.fairness_min_group < 1:
            raise ConfigError(f"{path}.fairness_min_group: must be at least 1, got {self.fairness_min_group}")
        for key in ("max_demographic_parity_gap", "max_equal_opportunity_gap", "max_fpr_gap"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{path}.{key}: must be in [0, 1] (0: off), got {getattr(self, key)}")
        for key in ("max_in_flight", "max_tensor_rank", "max_tensor_elements"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{path}.{key}: must be 0 (unlimited) or more, got {getattr(self, key)}")
        if self.max_queue < -1:
            raise ConfigError(f"{path}.max_queue: must be -1 (twice max_batch_size), 0 (unlimited) or more")
        _check_at_least(
            path,
            0,
            ("max_batch_size", self.max_batch_size),
            ("max_batch_wait_us", self.max_batch_wait_us),
            ("inline_threshold_us", self.inline_threshold_us),
            ("agreement_rtol", self.agreement_rtol),
        )

    @functools.cached_property
    def queue_limit(self) -> int:
        """Requests that may wait in the batcher (0: unlimited). By default two full batches: once a full
        batch waits while one runs the model runs at its peak rate, so a longer queue adds only latency."""
        return 2 * max(1, self.max_batch_size) if self.max_queue < 0 else self.max_queue


@dataclass(frozen=True)
class LogConfig:
    """The request log (see README, "Request log")."""

    enabled: bool = True  # false only when CANARY_GATEWAY_BENCHMARK=1: a gateway never answers unlogged
    dir: str = ""  # default: <server.state_dir>/log
    sync: Literal["process", "fsync"] = "process"
    max_pending: int = 10_000
    fsync_gather_us: int = 1000  # fsync mode: how long a fsync waits for more answers to cover
    segment_max_bytes: int = 256 * 1024 * 1024
    segment_max_age_s: float = 3600.0
    retention_max_bytes: int = 0  # 0: keep everything
    retention_max_age_s: float = 0.0
    fault_fsync_delay_ms: float = 0.0  # fault injection for tests: slow every fsync down


@dataclass(frozen=True)
class AuthConfig:
    inference: Literal["open", "token"] = "open"  # token: ModelInfer needs a token of any role
    tokens_file: str = ""  # default: <server.state_dir>/tokens.json
    rate_limit_per_s: float = 0.0  # inference requests per second per authenticated caller (0: off)
    rate_limit_burst: int = 0  # requests a caller may send at once; 0: one second's worth

    def __post_init__(self) -> None:
        for key in ("rate_limit_per_s", "rate_limit_burst"):
            if getattr(self, key) < 0:
                raise ConfigError(f"auth.{key}: must be 0 (off) or more, got {getattr(self, key)}")


@dataclass(frozen=True)
class AdminConfig:
    port: int = 0  # 0: the admin API shares the inference port

    def __post_init__(self) -> None:
        _check_port("admin.port", self.port)


@dataclass(frozen=True)
class TlsConfig:
    """TLS on every port the gateway listens on (see README, "TLS and mTLS"); plaintext when unset."""

    cert_file: str = ""  # PEM certificate chain the gateway presents; with key_file, turns TLS on
    key_file: str = ""  # PEM private key of that certificate
    client_ca_file: str = ""  # PEM CA bundle: when set, clients must present a certificate it signed (mTLS)
    client_cert_role: Role = "viewer"  # the role of a caller named by its client certificate, not a token
    reload_interval_s: float = 5.0  # how often a new connection may re-check the files for changes

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("tls: cert_file and key_file go together; set both or neither")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("tls.client_ca_file: needs tls.cert_file and tls.key_file (mTLS is TLS first)")
        if self.reload_interval_s < 0:
            raise ConfigError(f"tls.reload_interval_s: must not be negative, got {self.reload_interval_s}")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class ShadowConfig:
    max_concurrency: int = 4  # shadow calls running at once; more are shed and counted


@dataclass(frozen=True)
class OodConfig:
    """Out-of-distribution scoring and drift (see README, "Out-of-distribution inputs")."""

    top_k: int = 3  # features named in ood_features and reject messages
    drift_window_rows: int = 2000  # recent rows per version compared with the training profile
    drift_min_rows: int = 500  # no drift verdict on fewer rows (PSI over 30 features is noisy on a few hundred)
    drift_psi_threshold: float = 0.2  # a feature drifts when its PSI reaches this...
    drift_ks_threshold: float = 0.2  # ...or its KS statistic reaches this (about the same shift as PSI 0.2)
    drift_check_interval_s: float = 1.0  # how often drift is recomputed and alerts logged


@dataclass(frozen=True)
class FeedbackConfig:
    """Ground truth and the quality checks run on it (README, "Ground truth, quality and fairness")."""

    check_interval_s: float = 30.0  # how often quality and fairness gaps are recomputed, alerts logged (0: never)
    window_s: float = 3600.0  # ...over the requests of this last window
    # The ingest process's CPU priority: "idle" (SCHED_IDLE: only CPU nothing else wants) or a nice value 0..19
    ingest_priority: str | int = "idle"
    # ...and the CPUs it may run on: "spare" (those the machine allows outside a pinned gateway's own; all
    # when it is not pinned), "gateway" (the gateway's own affinity) or CPU numbers
    ingest_cpus: str | tuple[int, ...] = "spare"

    def __post_init__(self) -> None:
        if self.check_interval_s < 0 or self.window_s <= 0:
            raise ConfigError("feedback: check_interval_s must be >= 0 and window_s > 0")
        priority = self.ingest_priority
        if priority != "idle" and not (type(priority) is int and 0 <= priority <= 19):
            raise ConfigError(f'feedback.ingest_priority: "idle" or a nice value 0..19, got {priority!r}')
        cpus = self.ingest_cpus
        if isinstance(cpus, list | tuple):
            count = os.sysconf("SC_NPROCESSORS_CONF")  # the machine's CPUs, offline ones included
            if not cpus or not all(type(cpu) is int and 0 <= cpu < count for cpu in cpus):
                raise ConfigError(f"feedback.ingest_cpus: CPU numbers 0..{count - 1} on this machine, got {cpus!r}")
            object.__setattr__(self, "ingest_cpus", tuple(cpus))  # a TOML array arrives as a list
        elif cpus not in ("spare", "gateway"):
            raise ConfigError(f'feedback.ingest_cpus: "spare", "gateway" or an array of CPU numbers, got {cpus!r}')


@dataclass(frozen=True)
class TelemetryConfig:
    """OpenTelemetry exporters (see README, "Observability"); everything off by default."""

    traces: Literal["none", "otlp", "console"] = "none"
    metrics: Literal["none", "otlp", "prometheus", "console"] = "none"
    trace_sample_ratio: float = 1.0  # share of traces kept (a caller's sampled traceparent is followed)
    otlp_endpoint: str = "http://127.0.0.1:4317"  # OTLP/gRPC collector, for traces and metrics = "otlp"
    otlp_insecure: bool = True  # plaintext to the collector
    prometheus_host: str = "127.0.0.1"  # metrics = "prometheus": the scrape endpoint's address...
    prometheus_port: int = 9464  # ...and port: http://HOST:PORT/metrics
    export_interval_s: float = 10.0  # metrics pushed (otlp, console) this often
    service_name: str = "canary-gateway"

    def __post_init__(self) -> None:
        object.__setattr__(self, "prometheus_host", bare_host(self.prometheus_host))
        _check_port("telemetry.prometheus_port", self.prometheus_port)
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ConfigError(f"telemetry.trace_sample_ratio: {self.trace_sample_ratio} is not in [0, 1]")


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    model_defaults: ModelServingConfig = field(default_factory=ModelServingConfig)
    models: dict[str, ModelServingConfig] = field(default_factory=dict)
    log: LogConfig = field(default_factory=LogConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    shadows: ShadowConfig = field(default_factory=ShadowConfig)
    ood: OodConfig = field(default_factory=OodConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)

    def serving(self, model: str) -> ModelServingConfig:
        return self.models.get(model, self.model_defaults)

    @property
    def worker_count(self) -> int:
        return self.server.workers or usable_cores()

    @property
    def workers_dir(self) -> Path:
        return Path(self.server.state_dir) / "workers"

    @property
    def log_dir(self) -> Path:
        return Path(self.log.dir) if self.log.dir else Path(self.server.state_dir) / "log"

    @property
    def tokens_file(self) -> Path:
        return Path(self.auth.tokens_file) if self.auth.tokens_file else Path(self.server.state_dir) / "tokens.json"

    @property
    def routes_dir(self) -> Path:
        return Path(self.server.state_dir) / "routes"

    @property
    def rollouts_dir(self) -> Path:
        return Path(self.server.state_dir) / "rollouts"

    @property
    def feedback_dir(self) -> Path:
        return Path(self.server.state_dir) / "feedback"


def _check_value(path: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple:  # tuple[str, ...]: a TOML array of strings
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{path}: expected an array of strings, got {value!r}")
        return tuple(value)
    if isinstance(annotation, type) and (
        not isinstance(value, annotation) or (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{path}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: Any, path: str, base: Any = None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown configuration key {path}.{unknown[0]}" if path else f"unknown key {unknown[0]}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            values[name] = _build(annotation, value, key)  # type: ignore[arg-type]
        elif typing.get_origin(annotation) is dict:
            values[name] = {}  # filled by the caller, which knows what each entry inherits
        else:
            values[name] = _check_value(key, value, annotation)
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    CPU limit, which the affinity does not show)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, -(-int(quota) // int(period))))


BENCHMARK_ENV = "CANARY_GATEWAY_BENCHMARK"


def from_dict(data: dict[str, Any]) -> GatewayConfig:
    config: GatewayConfig = _build(GatewayConfig, data, "")
    if not config.log.enabled and os.environ.get(BENCHMARK_ENV) != "1":
        raise ConfigError(f"log.enabled = false is for benchmarks only (set {BENCHMARK_ENV}=1)")
    models_table = data.get("models", {})
    if not isinstance(models_table, dict):
        raise ConfigError("models: expected a table of [models.NAME] sections")
    models = {
        name: _build(ModelServingConfig, section, f"models.{name}", base=config.model_defaults)
        for name, section in models_table.items()
    }
    config.model_defaults.check("model_defaults")
    for name, serving in models.items():
        serving.check(f"models.{name}")
    return dataclasses.replace(config, models=models)


def load(path: str | Path | None) -> GatewayConfig:
    if path is None:
        return GatewayConfig()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:  # a directory, no permission...
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:  # tomllib decodes the bytes before it parses them
        raise ConfigError(f"config file {path}: not UTF-8, as TOML must be ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return from_dict(data)


def with_overrides(config: GatewayConfig, **flags: Any) -> GatewayConfig:
    """Apply command-line flags on top of the file: `port=1` sets server.port, `repository_path=x`
    sets repository.path, `log_dir=x` sets log.dir, `metrics_port=N` turns on a Prometheus endpoint
    on port N; None means the flag was not given."""
    sections: dict[str, dict[str, Any]] = {"server": {}, "repository": {}, "log": {}, "telemetry": {}}
    for name, value in flags.items():
        if value is None:
            continue
        if name == "metrics_port":  # --metrics-port N: a Prometheus endpoint on port N
            sections["telemetry"].update(metrics="prometheus", prometheus_port=value)
            continue
        section, _, key = name.partition("_") if name.startswith(("repository_", "log_")) else ("server", "", name)
        sections[section][key] = value
    return dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, **sections["server"]),
        repository=dataclasses.replace(config.repository, **sections["repository"]),
        log=dataclasses.replace(config.log, **sections["log"]),
        telemetry=dataclasses.replace(config.telemetry, **sections["telemetry"]),
    )
