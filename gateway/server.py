"""Server lifecycle, top to bottom: build, start, load and warm up models, serve, drain on signal.

Readiness (the gRPC health service, ServerReady, ModelReady) stays false until every model
version has finished loading and warming up; liveness is true as soon as the port is open.
SIGTERM or SIGINT stops accepting new calls, lets in-flight calls finish within the grace
period, and exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from gateway import protocol, telemetry
from gateway.admin import AdminServicer
from gateway.auth import TokenStore
from gateway.config import GatewayConfig, address
from gateway.errors import ConfigError
from gateway.feedback.ingester import IngestProcess
from gateway.feedback.outcomes import FeedbackOutcomes
from gateway.feedback.quality import VersionQuality, quality, task_of
from gateway.feedback.store import FeedbackStore
from gateway.inference import InferenceService
from gateway.lifecycle import ModelLifecycle
from gateway.ratelimit import RateLimiter
from gateway.repository import ModelRepository
from gateway.requestlog.reader import LogReader
from gateway.requestlog.writer import LogWriter
from gateway.scheduling import defer_transport_threads
from gateway.servicer import InferenceServicer
from gateway.shadows import ShadowRunner
from gateway.stats import Traffic
from gateway.telemetry import Observe, RequestMetrics
from gateway.tls import CertificateCaller, CertificateFiles, is_loopback
from gateway.workerboard import PUBLISH_INTERVAL_S, Agreement, AgreementKey, GatewayTraffic, WorkerBoard, WorkerIdentity
from router.control import RouteControl
from router.rollout import ACTIVE, RolloutManager, RolloutStore
from router.seed import apply_routes_file
from router.store import RouteStore

log = logging.getLogger(__name__)

INFERENCE_SERVICE = protocol.inference.GRPCInferenceService.full_name
ADMIN_SERVICE = protocol.admin.AdminService.full_name
WATCH_INTERVAL_S = 1.0
ROLLOUT_TICK_S = 0.2  # how often rollouts are judged: a bad candidate is rolled back within this of the evidence


def _add_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """grpcio-reflection's servicer for `service_names`, resolved in our private descriptor pool."""
    servicer = reflection.aio.ReflectionServicer(service_names, pool=protocol.POOL)
    protocol.add_service(server, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"], servicer)


def _worker_config(config: GatewayConfig, worker: WorkerIdentity | None) -> GatewayConfig:
    """A worker's own view: its Prometheus endpoint on the configured port plus its slot."""
    telemetry_config = config.telemetry
    if worker is None or telemetry_config.metrics != "prometheus" or not telemetry_config.prometheus_port:
        return config  # (an unused port stays as it is: shifted, it could leave the port range)
    port = telemetry_config.prometheus_port + worker.slot
    return dataclasses.replace(config, telemetry=dataclasses.replace(telemetry_config, prometheus_port=port))


class Gateway:
    """The one application object: the repository, the core service and the gRPC server.

    `worker` says which of `serve --workers N`'s processes this is (None: the only one). A worker
    shares its port with the others, stamps its slot on its log records, publishes its traffic on the
    worker board so that any worker reports for the whole gateway, and only slot 0 drives rollouts.
    """

    def __init__(self, config: GatewayConfig, worker: WorkerIdentity | None = None) -> None:
        config = _worker_config(config, worker)
        self.config = config
        self.worker = worker
        slot = None if worker is None else worker.slot
        self.repository = ModelRepository(config)
        self.request_log = LogWriter(config.log_dir, config.log, slot) if config.log.enabled else None
        started_ns = worker.gateway_started_ns if worker is not None and worker.gateway_started_ns else time.time_ns()
        store = RouteStore(config.routes_dir, serving_since_ns=started_ns)
        self.routes = RouteControl(store, self._routable, config.server.route_poll_ms / 1000)
        self.lifecycle = ModelLifecycle(self.repository, self.routes, "" if worker is None else str(worker.slot))
        self._followed_seq = self.routes.table.version  # model changes up to here are in the repository
        self._followed_ns = 0  # ...and made at or after this time (a bound for reading the change log)
        self.tokens = TokenStore(config.tokens_file)
        self.telemetry = telemetry.build(config.telemetry, instance="" if worker is None else f"worker-{slot}")
        self.traffic = Traffic()
        self.shadows = ShadowRunner(
            self.repository, self.request_log, config.shadows.max_concurrency, self.traffic, self.telemetry
        )
        board = None if worker is None else WorkerBoard(config.workers_dir, worker.slot, worker.restarts, worker.count)
        self.gateway_traffic = GatewayTraffic(
            self.traffic,
            self._own_agreement,
            self._own_drift_alerts,
            board,
            self.repository.ready_map,
            self._own_drift_counts,
        )
        auth = config.auth
        self.service = InferenceService(
            self.repository,
            self.request_log,
            self.routes,
            self.shadows,
            self.traffic,
            self.telemetry,
            RateLimiter(auth.rate_limit_per_s, auth.rate_limit_burst) if auth.rate_limit_per_s > 0 else None,
        )
        if self.telemetry is not None and self.telemetry.metrics is not None:
            self._observe(self.telemetry.metrics)
        live = self.request_log.live_segment if self.request_log is not None else None
        self.log_reader = LogReader(config.log_dir, live=live)
        self.feedback = FeedbackStore(config.feedback_dir) if config.log.enabled else None
        self.feedback_ingest = (
            IngestProcess(
                config.log_dir,
                config.feedback_dir,
                config.feedback.ingest_priority,
                config.feedback.ingest_cpus,
                config.server.log_level,
                slot,
            )
            if config.log.enabled
            else None
        )
        self.rollouts = RolloutManager(
            RolloutStore(config.rollouts_dir),
            self.routes,
            self.gateway_traffic.counts,
            self.gateway_traffic.agreement,
            outcomes=FeedbackOutcomes(self.log_reader, self.feedback, self.repository),
        )
        self.quality_reports: dict[str, list[VersionQuality]] = {}  # the last periodic check, for metrics
        self.fairness_alerts: set[tuple[str, str, str, str]] = set()  # (model, version, role, alert text)
        self.tls = CertificateFiles(config.tls) if config.tls.enabled else None
        # With mTLS every caller has a verified certificate, which names callers that send no token.
        certificate_caller = (
            CertificateCaller(config.tls.client_cert_role) if self.tls is not None and self.tls.mutual else None
        )
        self.server, self.port = self._listen(config.server.port)
        self.inference = InferenceServicer(
            self.repository,
            self.service,
            self.tokens,
            require_token=config.auth.inference == "token",
            stream_max_in_flight=config.server.stream_max_in_flight,
            lifecycle=self.lifecycle,
            certificate_caller=certificate_caller,
        )
        protocol.add_service(
            self.server,
            protocol.inference.GRPCInferenceService,
            self.inference,
            hot=("ModelInfer",),
            raw=("ModelInfer", "ModelStreamInfer"),  # any bytes reach the handler: refused precisely, and logged
        )
        admin = AdminServicer(
            self.repository,
            self.routes,
            self.tokens,
            self.shadows,
            self.log_reader,
            self.gateway_traffic,
            self.lifecycle,
            self.rollouts,
            certificate_caller,
            self.service.refusals,
            self.feedback,
            config.feedback.window_s,
            self.feedback_ingest,
        )
        # The operator API shares the inference port unless admin.port names its own (e.g. a port
        # that only the operators' network reaches).
        self.admin_server, self.admin_port = (
            self._listen(config.admin.port) if config.admin.port else (self.server, self.port)
        )
        protocol.add_service(self.admin_server, protocol.admin.AdminService, admin)
        self.health = health.aio.HealthServicer()
        # The libraries' own add_*_to_server functions register every RPC with the core: see add_service.
        protocol.add_service(self.server, health_pb2.DESCRIPTOR.services_by_name["Health"], self.health)
        services = [INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
        _add_reflection(self.server, services + ([ADMIN_SERVICE] if self.admin_server is self.server else []))
        if self.admin_server is not self.server:
            _add_reflection(self.admin_server, [ADMIN_SERVICE, reflection.SERVICE_NAME])

    def _routable(self) -> Mapping[str, AbstractSet[str]]:
        """The versions a route may send traffic to: ready here, and with several workers in every one."""
        if self.worker is None:
            return self.repository.ready_map()
        return self.gateway_traffic.ready_everywhere()

    def _own_drift_counts(self) -> dict[tuple[str, str], list[object]]:
        """Each profiled version's drift window as of the last drift check, for the other workers."""
        return {
            (v.name, v.version): v.drift_report.counts.to_lists()
            for v in self.repository.all_versions()
            if v.drift_report is not None and v.drift_report.counts is not None
        }

    def _own_agreement(self) -> dict[AgreementKey, Agreement]:
        return {key: (s.compared, s.agreed, s.failed, s.shed) for key, s in list(self.shadows.agreement.items())}

    def _own_drift_alerts(self) -> dict[tuple[str, str], list[str]]:
        return {
            (v.name, v.version): list(v.drift_report.drifting_features)
            for v in self.repository.all_versions()
            if v.drift_report is not None and v.drift_report.alert
        }

    def _observe(self, metrics: RequestMetrics) -> None:
        """Metrics read at export time from figures the gateway keeps anyway."""

        def shadow_calls() -> Iterable[tuple[float, dict[str, str]]]:
            for (model, primary, shadow), stat in self.shadows.agreement.items():
                labels = {"model": model, "primary_version": primary, "version": shadow}
                yield stat.compared, {**labels, "outcome": "compared"}
                yield stat.failed, {**labels, "outcome": "failed"}
                yield stat.shed, {**labels, "outcome": "shed"}

        def shadow_agreement() -> Iterable[tuple[float, dict[str, str]]]:
            for (model, primary, shadow), stat in self.shadows.agreement.items():
                if stat.compared:
                    yield stat.rate, {"model": model, "primary_version": primary, "version": shadow}

        def log_queue() -> Iterable[tuple[float, dict[str, str]]]:
            if self.request_log is not None:
                yield self.request_log.queue_depth, {}

        def warm_up() -> Iterable[tuple[float, dict[str, str]]]:
            for version in self.repository.all_versions():
                if version.ready:
                    yield version.warmup_us / 1e6, {"model": version.name, "version": version.version}

        def drift(field: str) -> Observe:
            def read() -> Iterable[tuple[float, dict[str, str]]]:
                for version in self.repository.all_versions():
                    report = version.drift_report
                    if report is None:
                        continue
                    labels = {"model": version.name, "version": version.version}
                    if field == "alert":
                        yield float(report.alert), labels
                    elif field == "ood_rate":
                        yield report.ood_rate, labels
                    else:
                        values = report.psi if field == "psi" else report.ks
                        for name, value in zip(report.profile.feature_names, values, strict=True):
                            yield float(value), {**labels, "feature": name}

            return read

        def refusals() -> Iterable[tuple[float, dict[str, str]]]:
            for (model, limit), count in list(self.service.refusals.items()):
                yield count, {"model": model, "limit": limit}

        def quality_metric() -> Iterable[tuple[float, dict[str, str]]]:
            for model, versions in list(self.quality_reports.items()):
                for r in versions:
                    for name, value in r.metrics.items():
                        yield value, {"model": model, "version": r.version, "role": r.role, "metric": name}

        def fairness(field: str) -> Observe:
            def read() -> Iterable[tuple[float, dict[str, str]]]:
                for model, versions in list(self.quality_reports.items()):
                    for r in versions:
                        for f in r.fairness:
                            labels = {"model": model, "version": r.version, "role": r.role, "attribute": f.attribute}
                            if field == "alert":
                                yield float(bool(f.alerts)), labels
                                continue
                            for gap in ("demographic_parity", "equal_opportunity", "fpr"):
                                value = getattr(f, f"{gap}_difference")
                                if value == value:  # NaN: fewer than two groups large enough
                                    yield value, {**labels, "gap": gap}

            return read

        metrics.observe(
            "gateway.quality.metric",
            "gauge",
            "quality on ground truth, by version, role and metric",
            "1",
            quality_metric,
        )
        metrics.observe("gateway.fairness.gap", "gauge", "largest gap in a rate between groups", "1", fairness("gap"))
        metrics.observe(
            "gateway.fairness.alert", "gauge", "1 while a fairness gap is past its threshold", "1", fairness("alert")
        )
        metrics.observe(
            "gateway.limit.refused", "counter", "requests refused by a limit, by model and limit", "{request}", refusals
        )
        metrics.observe("gateway.drift.alert", "gauge", "1 while a version's drift alert is on", "1", drift("alert"))
        metrics.observe(
            "gateway.drift.psi", "gauge", "PSI of recent inputs vs training, per feature", "1", drift("psi")
        )
        metrics.observe("gateway.drift.ks", "gauge", "KS statistic of recent inputs vs training", "1", drift("ks"))
        metrics.observe("gateway.ood.window_rate", "gauge", "OOD share of the drift window", "1", drift("ood_rate"))
        metrics.observe("gateway.shadow.calls", "counter", "shadow calls by outcome", "{call}", shadow_calls)
        metrics.observe("gateway.shadow.agreement", "gauge", "shadow/primary output agreement", "1", shadow_agreement)
        metrics.observe(
            "gateway.log.queue_depth", "gauge", "answers waiting for their log commit", "{record}", log_queue
        )
        metrics.observe("gateway.model.warmup.duration", "gauge", "one warm-up run of a version", "s", warm_up)
        if self.worker is not None:
            restarts = [(float(self.worker.restarts), {"worker": str(self.worker.slot)})]
            metrics.observe(
                "gateway.worker.restarts", "counter", "restarts of this worker's slot", "{restart}", lambda: restarts
            )

    def _listen(self, port: int) -> tuple[grpc.aio.Server, int]:
        limit = self.config.server.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Workers share their port; otherwise a second gateway on the same port is a mistake.
                ("grpc.so_reuseport", int(self.worker is not None)),
            ]
        )
        requested = address(self.config.server.host, port)
        try:
            if self.tls is not None:
                bound = server.add_secure_port(requested, self.tls.credentials())
            else:
                bound = server.add_insecure_port(requested)
        except RuntimeError:  # grpc's "Failed to bind": the port is taken (or the address is not ours)
            bound = 0
        if bound == 0:
            raise ConfigError(f"server.port: cannot listen on {requested}: in use, or not an address of this host")
        if self.tls is None and not is_loopback(self.config.server.host):
            log.warning("plaintext on %s, which is not a loopback address: set [tls] to encrypt", requested)
        return server, bound

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, status)

    async def _watch_changes(self) -> None:
        """Pick up route edits, token changes and (with several workers) model loads and unloads made by
        other processes: the CLI on the state dir, the other workers."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                if self.routes.refresh():
                    log.info("route table changed on disk: now version %d", self.routes.table.version)
                self.tokens.refresh()
                if self.worker is not None and self.routes.table.version != self._followed_seq:
                    await self._follow_model_changes()
            except Exception:
                log.exception("cannot refresh routes, tokens or models; keeping the current ones")

    async def _follow_model_changes(self) -> None:
        """Do the model loads and unloads other workers made since the last look, one entry at a time."""
        for entry in self.routes.history(None, self._followed_ns, None):
            if entry.seq <= self._followed_seq:
                continue
            try:
                await self.lifecycle.follow([entry])
            except Exception:  # one entry that cannot be followed must not block the ones after it
                log.exception("cannot follow change %d (%s of %s); skipping it", entry.seq, entry.action, entry.model)
            self._followed_seq, self._followed_ns = entry.seq, entry.time_ns

    async def _watch_repository(self) -> None:
        """Load version directories that appear in the model repository while the gateway runs (with
        several workers, slot 0 loads them and the others follow its change-log entries)."""
        interval = self.config.repository.watch_interval_s
        if interval <= 0 or (self.worker is not None and self.worker.slot != 0):
            return
        while True:
            await asyncio.sleep(interval)
            try:
                loaded = await self.lifecycle.load_new()
            except OSError as e:
                log.error("cannot scan the model repository %s: %s", self.repository.root, e)
                continue
            except Exception:  # a bug in one scan must not end the watching for the gateway's lifetime
                log.exception("model repository scan failed; trying again in %.1f s", interval)
                continue
            if loaded:
                await self._set_serving(self.repository.ready)

    async def _watch_drift(self) -> None:
        """Compare each profiled version's recent inputs with its training profile; log alert changes."""
        while True:
            await asyncio.sleep(self.config.ood.drift_check_interval_s)
            for version in self.repository.all_versions():
                if version.drift is None:
                    continue
                report = version.drift.report()
                version.drift_report = report
                if not report.changed:
                    continue
                if report.alert:
                    worst = ", ".join(
                        f"{report.profile.feature_names[i]} (PSI {report.psi[i]:.2f}, KS {report.ks[i]:.2f})"
                        for i in report.drifting[:5]
                    )
                    log.warning(
                        "drift alert: model %s version %s: %d features drifted over the last %d rows: %s",
                        version.name,
                        version.version,
                        len(report.drifting),
                        report.n_rows,
                        worst,
                    )
                else:
                    log.info("drift alert cleared: model %s version %s", version.name, version.version)

    def _quality_checks(self) -> dict[str, list[VersionQuality]]:
        """Quality of every model with a fairness threshold, over the last feedback.window_s (a worker thread)."""
        assert self.feedback is not None
        until = time.time_ns()
        since = until - int(self.config.feedback.window_s * 1e9)
        reports = {}
        for model in sorted(self.repository.models):
            serving = self.repository.serving(model)
            thresholds = (serving.max_demographic_parity_gap, serving.max_equal_opportunity_gap, serving.max_fpr_gap)
            loaded = [v.model for v in self.repository.versions_of(model).values() if v.model is not None]
            if not serving.segments or not any(thresholds) or not loaded:
                continue
            task = task_of(loaded[-1].outputs, serving)
            reports[model] = quality(self.log_reader, self.feedback, model, task, serving, since, until)
        return reports

    async def _watch_quality(self) -> None:
        """Recompute fairness gaps on the ground truth so far; log alerts as they start and clear."""
        interval = self.config.feedback.check_interval_s
        if interval <= 0 or self.feedback is None:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                reports = await asyncio.to_thread(self._quality_checks)
            except Exception:
                log.exception("quality check failed; trying again at the next check")
                continue
            alerts = {
                (model, r.version, r.role, alert)
                for model, versions in reports.items()
                for r in versions
                for f in r.fairness
                for alert in f.alerts
            }
            for model, version, role, alert in sorted(alerts - self.fairness_alerts):
                log.warning("fairness alert: model %s version %s (%s): %s", model, version, role, alert)
            for model, version, role, alert in sorted(self.fairness_alerts - alerts):
                log.info("fairness alert cleared: model %s version %s (%s): %s", model, version, role, alert)
            self.fairness_alerts, self.quality_reports = alerts, reports

    async def _drive_rollouts(self) -> None:
        """Judge running rollouts: step, promote or roll back (router.rollout decides, this only ticks).

        With several workers only slot 0 drives, on every worker's figures; the others pick up its
        decisions from the stores."""
        if self.worker is not None and self.worker.slot != 0:
            return
        while True:
            await asyncio.sleep(ROLLOUT_TICK_S)
            try:
                self.rollouts.tick()
            except Exception:
                log.exception("rollout tick failed; trying again at the next tick")

    async def _publish_worker_state(self) -> None:
        """Put this worker's figures on the worker board for the others, and move to a log segment another
        worker started even when idle (with several workers)."""
        if self.gateway_traffic.board is None:
            return
        while True:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            try:
                self.gateway_traffic.publish()
                if self.request_log is not None:
                    self.request_log.follow_rotation()
            except Exception:
                log.exception("cannot publish to the worker board; trying again in %.0f s", PUBLISH_INTERVAL_S)

    async def _start_listening(self) -> None:
        await self.server.start()
        if self.config.server.defer_transport_threads:
            log.debug("gRPC transport threads under SCHED_BATCH: %d", defer_transport_threads())
        security = "plaintext" if self.tls is None else "mTLS" if self.tls.mutual else "TLS"
        log.info("listening on %s (%s)", address(self.config.server.host, self.port), security)
        if self.admin_server is not self.server:
            await self.admin_server.start()
            log.info("admin API listening on %s (%s)", address(self.config.server.host, self.admin_port), security)

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] | None = None) -> None:
        await self._set_serving(False)
        # A lone gateway listens at once (liveness while it loads); a worker joins its peers' port only
        # when its models are warm, else the kernel would hand it connections it can only refuse.
        listening = self.worker is None
        if listening:
            await self._start_listening()
        if self.request_log is not None:
            log.info("request log in %s (sync=%s)", self.config.log_dir, self.config.log.sync)
        token_path = self.tokens.bootstrap(self.config.server.state_dir)
        if token_path is not None:
            log.info("no tokens yet: created an admin token in %s (readable only by this user)", token_path)
        loading = asyncio.create_task(asyncio.to_thread(self.repository.load_all))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()
            # The deployment's route table, once the versions are warm; with workers, slot 0 applies it.
            # Not again when the supervisor restarts worker 0: that would undo every edit since the start.
            first_start = self.worker is None or (self.worker.slot == 0 and not self.worker.restarts)
            if self.config.server.routes_file and first_start:
                rolling = {r.plan.model for r in self.rollouts.rollouts() if r.state in ACTIVE}
                apply_routes_file(self.routes, self.config.server.routes_file, self._routable(), rolling)
            await self._set_serving(self.repository.ready)
            log.info("ready: %d model versions loaded", sum(v.ready for v in self.repository.all_versions()))
            if self.worker is not None and self.worker.restarts:
                # A restarted worker loaded what is on disk: redo the loads and unloads made through its
                # peers (or its former self) since the gateway started, so it serves what they serve.
                since = self.worker.gateway_started_ns
                await self.lifecycle.follow(self.routes.history(None, since, None), own_too=True)
            if not listening:
                await self._start_listening()
                listening = True
            if self.gateway_traffic.board is not None:
                self.gateway_traffic.serving = True
                self.gateway_traffic.publish()  # the others count this worker's versions from now on
            if on_ready is not None:
                on_ready()
        watching = [
            asyncio.create_task(self._publish_worker_state()),
            asyncio.create_task(self._watch_changes()),
            asyncio.create_task(self._watch_drift()),
            asyncio.create_task(self._watch_repository()),
            asyncio.create_task(self._drive_rollouts()),
            asyncio.create_task(self._watch_quality()),
        ]
        await stopping
        for task in watching:
            task.cancel()
        log.info("draining: stop accepting, finishing in-flight calls (grace %.1fs)", self.config.server.grace_period_s)
        await self._set_serving(False)
        if listening:
            await self.server.stop(self.config.server.grace_period_s)
            if self.admin_server is not self.server:
                await self.admin_server.stop(self.config.server.grace_period_s)
        if not loading.done():
            await loading  # let warm-up finish so its thread does not outlive the sessions
        await self.inference.drain_streams()  # requests of streams that ended early; they may mirror shadows
        await self.shadows.drain()
        if self.gateway_traffic.board is not None:
            self.gateway_traffic.publish()  # a restarted worker carries on from these totals
            self.gateway_traffic.board.close()
        self.rollouts.close()  # its worker thread reads the log and the feedback store
        if self.request_log is not None:
            await self.request_log.close()
        if self.feedback_ingest is not None:
            await asyncio.to_thread(self.feedback_ingest.close)
        if self.feedback is not None:
            self.feedback.close()
        self.routes.close()
        self.repository.close()
        if self.telemetry is not None:
            self.telemetry.shutdown()
        log.info("stopped")


async def serve(
    config: GatewayConfig, worker: WorkerIdentity | None = None, on_ready: Callable[[], None] | None = None
) -> None:
    gateway = Gateway(config, worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.run(stop, on_ready)
