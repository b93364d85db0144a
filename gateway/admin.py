"""The gRPC transport for the operator API (`canary.admin.v1.AdminService`, protos/admin.proto).

Every call authenticates its bearer token and checks the caller's role before doing anything:
`viewer` reads routes, history, agreement, rollouts and the request log; `operator` changes
traffic and starts, pauses, resumes, aborts or promotes rollouts; `admin` manages tokens. Route
edits go through `router.control`, which validates, persists the change with who/why/before/after,
and swaps the live table atomically; rollouts through `router.rollout`, which edits routes the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from gateway.auth import Identity, Role, TokenStore, require
from gateway.errors import ConfigError, FailedPrecondition, GatewayError, InvalidArgument, NotFound, Unavailable
from gateway.feedback.ingester import IngestProcess
from gateway.feedback.metrics import Rate
from gateway.feedback.quality import VersionQuality, quality, task_of
from gateway.feedback.store import FeedbackStore
from gateway.lifecycle import ModelLifecycle
from gateway.ood.drift import WindowCounts, compare
from gateway.ood.profile import N_BINS
from gateway.protocol import admin as pb
from gateway.repository import ModelRepository, ModelVersion
from gateway.requestlog.reader import LogReader, Query
from gateway.requestlog.record import encode
from gateway.servicer import refusals_answered, reject
from gateway.shadows import ShadowRunner
from gateway.tls import CertificateCaller
from gateway.workerboard import GatewayTraffic
from router.analysis import GateResult, Thresholds
from router.control import RouteControl
from router.rollout import Plan, Rollout, RolloutManager
from router.rules import DEFAULT_OVERRIDE_ROLES, ROLES, Route, StickyKey, default_route
from router.store import ChangeEntry

Weights = tuple[tuple[str, int], ...]


def _weights(shares: Any) -> Weights:
    return tuple((s.version, s.bps) for s in shares)


def _shares(weights: Weights) -> list[Any]:
    return [pb.VersionShare(version=v, bps=bps) for v, bps in weights]


def _route_json(route: Route | None) -> str:
    return "" if route is None else json.dumps(route.to_dict(), sort_keys=True)


def _entry(entry: ChangeEntry) -> Any:
    return pb.ChangeEntry(
        seq=entry.seq,
        time_ns=entry.time_ns,
        who=entry.who,
        why=entry.why,
        action=entry.action,
        model=entry.model,
        before_json=_route_json(entry.before),
        after_json=_route_json(entry.after),
        details_json="" if entry.details is None else json.dumps(dict(entry.details), sort_keys=True),
    )


def version_info(version: ModelVersion, in_use: str) -> Any:
    """A model version as ListModels and the model-change RPCs show it."""
    return pb.ModelVersionInfo(
        model=version.name,
        version=version.version,
        state=version.state,
        reason=version.reason,
        sha256=version.sha256,
        provenance=version.provenance,
        in_use=in_use,
        has_profile=version.ood is not None,
    )


DEFAULT_STATUS_WINDOW_S = 60.0
NO_REQUEST_LOG = "feedback: this gateway runs without a request log, so truth has nothing to join"


def _gate(result: GateResult) -> Any:
    return pb.GateResult(gate=result.gate, verdict=result.verdict, summary=result.summary, figures=result.figures)


def _thresholds(gates: Any) -> Thresholds:
    """The request's gates; an unset field keeps its default."""
    fields = [f.name for f in dataclasses.fields(Thresholds)]
    return Thresholds(**{name: getattr(gates, name) for name in fields if gates.HasField(name)})


def _plan(r: Any) -> Plan:
    return Plan(
        model=r.model,
        candidate=r.candidate,
        steps=tuple(r.steps_bps),
        interval_s=r.interval_s,
        shadow_s=r.shadow_s,
        shadow_requests=r.shadow_requests,
        step_shadow_bps=r.step_shadow_bps if r.HasField("step_shadow_bps") else Plan.step_shadow_bps,
        max_extensions=r.max_extensions if r.HasField("max_extensions") else Plan.max_extensions,
        thresholds=_thresholds(r.gates),
    )


def _rollout(rollout: Rollout, elapsed_s: float) -> Any:
    plan = rollout.plan
    return pb.Rollout(
        id=rollout.id,
        model=plan.model,
        baseline=rollout.baseline,
        candidate=plan.candidate,
        state=rollout.state,
        steps_bps=list(plan.steps),
        interval_s=plan.interval_s,
        shadow_s=plan.shadow_s,
        shadow_requests=plan.shadow_requests,
        step_shadow_bps=plan.step_shadow_bps,
        max_extensions=plan.max_extensions,
        gates_config=pb.RolloutGates(**dataclasses.asdict(plan.thresholds)),
        step=rollout.step,
        where=rollout.where,
        step_started_ns=rollout.step_started_ns,
        step_elapsed_s=elapsed_s,
        extensions=rollout.extensions,
        gates=[_gate(g) for g in rollout.gates],
        history=[
            pb.RolloutStep(
                phase=h.phase,
                bps=h.bps,
                started_ns=h.started_ns,
                ended_ns=h.ended_ns,
                outcome=h.outcome,
                extensions=h.extensions,
                gates=[_gate(g) for g in h.gates],
            )
            for h in rollout.history
        ],
        started_by=rollout.started_by,
        reason=rollout.reason,
        created_ns=rollout.created_ns,
        updated_ns=rollout.updated_ns,
        outcome=rollout.outcome,
    )


def _version_drift(version: ModelVersion, others: tuple[list[WindowCounts], bool] = ([], False)) -> Any:
    """The version's recent inputs against its training profile, fresh (the alert as last evaluated); with
    `others` (other workers' windows and whether any has its alert on), over all of them together."""
    message = pb.VersionDrift(version=version.version, has_profile=version.drift is not None)
    monitor = version.drift
    if monitor is None:
        return message
    windows, alert_elsewhere = others
    if windows:
        counts = functools.reduce(WindowCounts.plus, windows, monitor.counts())
        merged = compare(monitor.profile, counts, monitor.psi_threshold, monitor.ks_threshold, monitor.min_rows)
        report = dataclasses.replace(merged, alert=monitor.alert or alert_elsewhere)
    else:
        report = dataclasses.replace(monitor.peek(), alert=monitor.alert or alert_elsewhere)
    profile = report.profile
    message.window_rows = report.n_rows
    message.observed_rows = monitor.observed
    message.ood_rate = report.ood_rate
    message.alert = report.alert
    message.psi_threshold = monitor.psi_threshold
    message.ks_threshold = monitor.ks_threshold
    message.min_rows = monitor.min_rows
    drifting = set(report.drifting)
    for i, name in enumerate(profile.feature_names):
        message.features.add(
            name=name,
            psi=float(report.psi[i]),
            ks=float(report.ks[i]),
            drifting=i in drifting,
            bin_edges=profile.bin_edges[i].tolist(),
            training_fractions=profile.bin_fractions[i].tolist(),
            live_fractions=report.live_fractions[i].tolist() if report.n_rows else [0.0] * N_BINS,
        )
    return message


def _interval(rate: Rate) -> Any:
    return pb.Interval(value=rate.value, low=rate.low, high=rate.high)


def _version_quality(report: VersionQuality) -> Any:
    return pb.VersionQuality(
        version=report.version,
        role=report.role,
        task=report.task,
        requests=report.requests,
        labelled=report.labelled,
        skipped=report.skipped,
        metrics=report.metrics,
        calibration=[pb.CalibrationBin(**dataclasses.asdict(b)) for b in report.calibration],
        fairness=[
            pb.AttributeFairness(
                attribute=f.attribute,
                groups=[
                    pb.GroupRates(
                        group=g.group,
                        n=g.n,
                        positives=g.positives,
                        too_small=g.too_small,
                        positive_rate=_interval(g.positive_rate),
                        tpr=_interval(g.tpr),
                        fpr=_interval(g.fpr),
                    )
                    for g in f.groups
                ],
                unlabelled_group=f.unlabelled_group,
                demographic_parity_difference=f.demographic_parity_difference,
                equal_opportunity_difference=f.equal_opportunity_difference,
                fpr_difference=f.fpr_difference,
                alerts=f.alerts,
            )
            for f in report.fairness
        ],
    )


class AdminServicer:
    """Implements every RPC of `canary.admin.v1.AdminService` (registered by `protocol.add_service`)."""

    def __init__(
        self,
        repository: ModelRepository,
        routes: RouteControl,
        tokens: TokenStore,
        shadows: ShadowRunner,
        log_reader: LogReader,
        traffic: GatewayTraffic,
        lifecycle: ModelLifecycle,
        rollouts: RolloutManager,
        certificate_caller: CertificateCaller | None = None,
        refusals: dict[tuple[str, str], int] | None = None,
        feedback: FeedbackStore | None = None,
        quality_window_s: float = 3600.0,
        feedback_ingest: IngestProcess | None = None,
    ) -> None:
        self._feedback = feedback
        self._feedback_ingest = feedback_ingest
        self._quality_window_s = quality_window_s
        self._repository = repository
        self._lifecycle = lifecycle
        self._refusals = refusals if refusals is not None else {}  # (model, limit) -> refused requests
        self._rollouts = rollouts
        self._traffic = traffic
        self._routes = routes
        self._tokens = tokens
        self._shadows = shadows
        self._log = log_reader
        self._certificate_caller = certificate_caller

    def _caller(self, context: grpc.aio.ServicerContext, role: Role, action: str) -> Identity:
        try:
            self._tokens.refresh()  # tokens created or revoked by another process
        except ConfigError as e:
            raise Unavailable(f"the tokens file cannot be read: {e}") from e
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        identity = None
        if authorization is None and self._certificate_caller is not None:  # mTLS: the certificate names the caller
            identity = self._certificate_caller.identify(context)
        if identity is None:
            identity = self._tokens.authenticate(authorization)
        require(identity, role, action)
        return identity

    def _route_message(self, model: str) -> Any:
        ready = self._repository.ready_versions(model)
        route = self._routes.route(model)
        shown = route if route is not None else (default_route(ready[-1]) if ready else None)
        message = pb.Route(model=model, explicit=route is not None, ready_versions=list(ready))
        if shown is not None:
            message.split.extend(_shares(shown.split))
            message.shadows.extend(_shares(shown.shadows))
            message.sticky_key = "" if shown.sticky_key is None else str(shown.sticky_key)
            message.allow_pinning = shown.allow_pinning
            message.override_roles.extend(r for r in ROLES if r in shown.override_roles)
        else:
            message.allow_pinning = True
            message.override_roles.extend(r for r in ROLES if r in DEFAULT_OVERRIDE_ROLES)
        return message

    async def _change(
        self,
        context: grpc.aio.ServicerContext,
        model: str,
        reason: str,
        action: str,
        edit: Callable[[Identity], ChangeEntry],
    ) -> Any:
        identity = self._caller(context, "operator", f"{action} on {model!r}")
        self._known(model, required=True)
        if not reason.strip():
            raise InvalidArgument("reason: required; say why you change the route")
        entry = edit(identity)
        return pb.ChangeResponse(
            entry=_entry(entry), route=self._route_message(model), table_version=self._routes.table.version
        )

    def _replace(self, model: str, identity: Identity, reason: str, action: str, **fields: object) -> ChangeEntry:
        return self._routes.change(
            model,
            lambda route: dataclasses.replace(route, **fields),  # type: ignore[arg-type]
            who=identity.name,
            why=reason,
            action=action,  # type: ignore[arg-type]
        )

    # --- viewer ---------------------------------------------------------------------------------

    @refusals_answered
    async def GetRoutes(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "viewer", "GetRoutes")
        models = [request.model] if request.model else sorted(self._repository.models)
        routes = [self._route_message(m) for m in models]
        return pb.GetRoutesResponse(routes=routes, table_version=self._routes.current().version)

    def _known(self, model: str, required: bool = False) -> None:
        """NOT_FOUND for a model the repository does not have; an empty name means all, where allowed."""
        if not model and required:
            raise InvalidArgument("model: required")
        if model and model not in self._repository.models:
            raise NotFound(f"model: unknown model {model!r}")

    @refusals_answered
    async def History(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "viewer", "History")
        self._known(request.model)
        r = request
        entries = self._routes.history(r.model or None, r.since_ns or None, r.until_ns or None)
        limit = request.limit or len(entries)
        return pb.HistoryResponse(entries=[_entry(e) for e in entries[-limit:]])

    @refusals_answered
    async def Agreement(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "viewer", "Agreement")
        self._known(request.model)
        stats = [
            pb.AgreementStat(
                model=model,
                primary_version=primary,
                shadow_version=shadow,
                compared=a.compared,
                agreed=a.agreed,
                rate=a.rate,
                shed=a.shed,
                failed=a.failed,
            )
            for (model, primary, shadow), a in sorted(self._shadows.agreement.items())
            if not request.model or model == request.model
        ]
        return pb.AgreementResponse(stats=stats)

    @refusals_answered
    async def GetStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "viewer", "GetStatus")
        self._known(request.model)
        if request.window_s < 0:
            raise InvalidArgument(f"window_s: {request.window_s} is negative")
        window_s = request.window_s or DEFAULT_STATUS_WINDOW_S
        now = time.time_ns()
        response = pb.GetStatusResponse(window_s=window_s)
        workers = self._traffic.workers()
        summaries = self._traffic.summaries(now, window_s)
        alerts = self._traffic.drift_alerts()
        for model in [request.model] if request.model else sorted(self._repository.models):
            status = response.models.add(
                model=model,
                route=self._route_message(model),
                ood_policy=self._repository.get(model, "").serving.ood_policy,
            )
            for (name, limit), count in list(self._refusals.items()):
                if name == model:
                    status.refused[limit] = count
            for version in self._repository.versions_of(model).values():
                drifting = alerts.get((model, version.version))
                status.versions.add(
                    version=version.version,
                    state=version.state,
                    reason=version.reason,
                    has_profile=version.ood is not None,
                    drift_alert=drifting is not None,
                    drifting_features=drifting or [],
                )
            for (name, version_name, role), summary in summaries.items():
                if name == model:
                    status.traffic.add(version=version_name, role=role, **summary._asdict())
        for worker in workers:
            status_of = response.workers.add(
                slot=worker.slot,
                pid=worker.pid,
                started_ns=worker.started_ns,
                updated_ns=worker.updated_ns,
                restarts=worker.restarts,
            )
            status_of.requests = sum(c.requests for (_, _, role), c in worker.counts.items() if role == "primary")
        return response

    @refusals_answered
    async def GetDrift(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "viewer", "GetDrift")
        self._known(request.model, required=True)
        response = pb.GetDriftResponse(model=request.model)
        for version in self._repository.versions_of(request.model).values():
            others = self._traffic.others_drift(request.model, version.version)
            response.versions.append(_version_drift(version, others))
        return response

    @refusals_answered
    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "viewer", "ListModels")
        self._known(request.model)
        chosen = [request.model] if request.model else sorted(self._repository.models)
        return pb.ListModelsResponse(
            versions=[
                version_info(v, self._lifecycle.in_use(v))
                for name in chosen
                for v in self._repository.models.get(name, {}).values()
            ]
        )

    def _model_change(self, request: Any, context: grpc.aio.ServicerContext, action: str) -> Identity:
        identity = self._caller(context, "admin", f"{action} on {request.model!r}")
        if not request.model or not request.version:
            raise InvalidArgument("model and version: both required")
        if not request.reason.strip():
            raise InvalidArgument(f"reason: required; say why you {action.lower()}")
        return identity

    @refusals_answered
    async def LoadModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        identity = self._model_change(request, context, "LoadModel")
        version, entry = await self._lifecycle.load(
            request.model,
            request.version,
            who=identity.name,
            why=request.reason.strip(),
            replace=request.replace,
            force_signature=request.force_signature,
        )
        return pb.ModelChangeResponse(
            entry=_entry(entry), version=version_info(version, self._lifecycle.in_use(version))
        )

    @refusals_answered
    async def UnloadModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        identity = self._model_change(request, context, "UnloadModel")
        version, entry = await self._lifecycle.unload(
            request.model, request.version, who=identity.name, why=request.reason.strip()
        )
        return pb.ModelChangeResponse(entry=_entry(entry), version=version_info(version, ""))

    @refusals_answered
    async def GetLogRecords(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "viewer", "GetLogRecords")
        response = pb.GetLogRecordsResponse()
        for request_id in request.request_ids:
            found = self._log.get(request_id)
            if not found:
                response.unknown_ids.append(request_id)
            response.records.extend(pb.LogRecord(msgpack=encode(r)) for r in found)
        return response

    async def QueryLog(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            self._caller(context, "viewer", "QueryLog")
        except GatewayError as e:
            await reject(context, "Admin.QueryLog", e)
        r = request
        query = Query(
            r.model or None,
            r.version or None,
            r.role or None,
            r.status if r.HasField("status") else None,
            None,
            r.since_ns or None,
            r.until_ns or None,
        )
        limit = r.limit or 1000
        for sent, record in enumerate(self._log.query(query)):
            if sent >= limit:
                break
            yield pb.LogRecord(msgpack=encode(record))

    @refusals_answered
    async def WhoAmI(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        identity = self._caller(context, "viewer", "WhoAmI")
        return pb.WhoAmIResponse(name=identity.name, role=identity.role)

    # --- operator -------------------------------------------------------------------------------

    async def _set(
        self, context: grpc.aio.ServicerContext, request: Any, action: str, fields: Callable[[], dict[str, Any]]
    ) -> Any:
        """Replace some fields of the model's route (`fields` runs inside the error handling)."""
        return await self._change(
            context,
            request.model,
            request.reason,
            action,
            lambda who: self._replace(request.model, who, request.reason, action, **fields()),
        )

    @refusals_answered
    async def SetSplit(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._set(context, request, "split", lambda: {"split": _weights(request.split)})

    @refusals_answered
    async def SetSticky(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        key = request.sticky_key
        return await self._set(
            context, request, "sticky", lambda: {"sticky_key": StickyKey.parse(key) if key else None}
        )

    @refusals_answered
    async def SetShadows(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._set(context, request, "shadow", lambda: {"shadows": _weights(request.shadows)})

    @refusals_answered
    async def SetPinPolicy(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._set(context, request, "pin", lambda: {"allow_pinning": request.allow_pinning})

    @refusals_answered
    async def SetOverrideRoles(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._set(context, request, "override", lambda: {"override_roles": frozenset(request.roles)})

    @refusals_answered
    async def Promote(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        r = request
        return await self._change(
            context,
            r.model,
            r.reason,
            "promote",
            lambda who: self._routes.promote(r.model, r.version, who=who.name, why=r.reason),
        )

    @refusals_answered
    async def Rollback(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        r = request
        return await self._change(
            context,
            r.model,
            r.reason,
            "rollback",
            lambda who: self._routes.rollback(r.model, who=who.name, why=r.reason),
        )

    # --- rollouts: viewer reads, operator acts ---------------------------------------------------------

    @refusals_answered
    async def GetRollout(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "viewer", "GetRollout")
        self._known(request.model, required=True)
        return self._rollout_response(self._rollouts.get(request.model))

    @refusals_answered
    async def ListRollouts(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "viewer", "ListRollouts")
        self._known(request.model)
        rollouts = self._rollouts.rollouts(request.model or None)
        chosen = rollouts[: request.limit] if request.limit else rollouts
        return pb.ListRolloutsResponse(rollouts=[_rollout(r, self._rollouts.elapsed_s(r)) for r in chosen])

    def _rollout_response(self, rollout: Rollout) -> Any:
        return pb.RolloutResponse(rollout=_rollout(rollout, self._rollouts.elapsed_s(rollout)))

    def _rollout_action(self, context: grpc.aio.ServicerContext, request: Any, action: str) -> Identity:
        identity = self._caller(context, "operator", f"{action} the rollout of {request.model!r}")
        self._known(request.model, required=True)
        if not request.reason.strip():
            raise InvalidArgument(f"reason: required; say why you {action} the rollout")
        return identity

    @refusals_answered
    async def StartRollout(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        identity = self._rollout_action(context, request, "start")
        rollout = self._rollouts.start(_plan(request), who=identity.name, why=request.reason)
        return self._rollout_response(rollout)

    def _operate(self, context: grpc.aio.ServicerContext, request: Any, action: str) -> Any:
        """An operator's pause, resume, abort or promote: the RolloutManager method of that name."""
        identity = self._rollout_action(context, request, action)
        operate = getattr(self._rollouts, action)
        return self._rollout_response(operate(request.model, who=identity.name, why=request.reason))

    @refusals_answered
    async def PauseRollout(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self._operate(context, request, "pause")

    @refusals_answered
    async def ResumeRollout(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self._operate(context, request, "resume")

    @refusals_answered
    async def AbortRollout(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self._operate(context, request, "abort")

    @refusals_answered
    async def PromoteRollout(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self._operate(context, request, "promote")

    # --- ground truth: operators submit, viewers read the quality it shows ---------------------------

    def _task(self, model: str) -> str:
        versions = [v for v in self._repository.versions_of(model).values() if v.model is not None]
        if not versions:
            raise FailedPrecondition(f"model: {model!r} has no loaded version to tell classifier from regressor")
        return task_of(versions[-1].model.outputs, self._repository.serving(model))  # type: ignore[union-attr]

    def _store(self) -> FeedbackStore:
        if self._feedback is None:
            raise FailedPrecondition(NO_REQUEST_LOG)
        return self._feedback

    @refusals_answered
    async def SubmitFeedback(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "operator", f"SubmitFeedback for {request.model!r}")
        self._known(request.model, required=True)
        if self._feedback_ingest is None:  # there is one exactly when there is a request log
            raise FailedPrecondition(NO_REQUEST_LOG)
        task = self._task(request.model)
        # Checked and written by the ingest process, on CPU inference leaves idle; a thread of its own
        # waits for the answer, so a batch of thousands never holds up the event loop.
        outcome = await self._feedback_ingest.submit_async(request.model, task, request)
        return pb.SubmitFeedbackResponse(
            stored=outcome.stored,
            overwritten=outcome.overwritten,
            unknown_ids=outcome.unknown_ids,
            invalid=[
                pb.InvalidFeedback(index=i.index, request_id=i.request_id, field=i.field, reason=i.reason)
                for i in outcome.invalid
            ],
        )

    @refusals_answered
    async def GetQuality(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "viewer", "GetQuality")
        self._known(request.model, required=True)
        store, task = self._store(), self._task(request.model)
        until = request.until_ns or time.time_ns()
        since = request.since_ns or until - int(self._quality_window_s * 1e9)
        if since > until:
            raise InvalidArgument(f"since_ns: {since} is after until_ns {until}")
        serving = self._repository.serving(request.model)
        reports = await asyncio.to_thread(quality, self._log, store, request.model, task, serving, since, until)
        return pb.GetQualityResponse(
            model=request.model,
            since_ns=since,
            until_ns=until,
            positive_label=serving.positive_label,
            min_group=serving.fairness_min_group,
            versions=[_version_quality(r) for r in reports],
            feedback_records=store.count(),
        )

    # --- admin ------------------------------------------------------------------------------------

    @refusals_answered
    async def CreateToken(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "admin", "CreateToken")
        token = self._tokens.create(request.role, request.name)
        return pb.CreateTokenResponse(token=token)

    @refusals_answered
    async def RevokeToken(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "admin", "RevokeToken")
        self._tokens.revoke(request.name)
        return pb.RevokeTokenResponse()

    @refusals_answered
    async def ListTokens(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._caller(context, "admin", "ListTokens")
        return pb.ListTokensResponse(
            tokens=[pb.TokenInfo(name=t.name, role=t.role, created_ns=t.created_ns) for t in self._tokens.records]
        )
