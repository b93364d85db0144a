"""Progressive delivery: a rollout walks a candidate version through traffic steps, judged at each step
against the baseline (router.analysis), and promotes it or rolls it back by itself.

A plan: optionally a shadow phase first (the candidate mirrors all of the model's traffic, no user sees
its answers) for a time or a number of requests, then steps (e.g. 1, 5, 25, 50, 100 %): each sets the
split baseline 100-p / candidate p, keeping the model's sticky key and other rules. During steps the
candidate keeps shadowing the baseline's share (`step_shadow_bps`), so the agreement gate is judged at
every step on the same inputs, not only in the shadow phase. A step ends after its interval: all gates
pass → next step, and reaching 100% promotes the candidate; a gate fails → the baseline route is restored
(split 100% baseline, the candidate's shadow removed) and the rollout is failed with the figures; too
little data → the step is extended, at most `max_extensions` times, then the rollout fails (a candidate
nobody could judge does not keep its traffic). Between ends, interim looks roll back early on a failure
(see router.analysis for the stricter confidence they use).

A plan may add outcome gates (router.outcomes: accuracy, MAE, equal-opportunity gap), judged on the
ground truth sent for the window's requests. Reading it means reading the request log and the feedback
store (LMDB), so it never happens in `tick`: the manager reads it in its own worker thread, at most every
`outcome_look_s` (and never more than a fifth of the time, however long a read takes), and the gates use
the latest figures of the current window. A step's final look waits for figures read after the step's
end, so a decision always covers the whole step. Until both sides have `min_labelled` labelled requests
the gates wait, and the step is extended like any other waiting gate.

Every automatic route change goes through RouteControl with identity `rollout` and a reason carrying
the figures and gates, so the change log audits it like a human edit; operator actions (start, pause,
resume, abort, force-promote) are logged under the operator's identity. A rollout that changes nothing
(pause, resume without a route change) is logged as a note (action `rollout`).

State is persisted in its own LMDB environment (`<state_dir>/rollouts/`) at every transition. Workers
share it: every change (a tick, an operator's action, a start) is made under the store's lock on the
state as stored when the lock was taken, so no process saves over another's change. The
counters a window is measured with live in the process, so after a restart a running rollout resumes
at its step with a fresh window (the step's interval starts again). If someone else edits the model's
route during a rollout, the rollout pauses itself rather than fight the edit.

The clock is injected (`now`, seconds) and `tick()` is called periodically by the server; nothing here
sleeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lmdb
import msgpack

from gateway.errors import FailedPrecondition, GatewayError, InvalidArgument, NotFound
from gateway.stats import Counts
from router.analysis import (
    Agreement,
    GateName,
    GateResult,
    Thresholds,
    Verdict,
    evaluate,
    explain,
    overall,
)
from router.bucketing import BUCKETS
from router.control import RouteControl
from router.outcomes import Measured, OutcomeQuery, OutcomeSource, evaluate_outcomes, not_measured
from router.rules import Route, format_percent
from router.store import Action

log = logging.getLogger(__name__)

State = Literal["running", "paused", "completed", "failed", "aborted"]
ACTIVE: tuple[State, ...] = ("running", "paused")
AUTOMATIC = "rollout"
"""The identity automatic decisions are logged under."""

Measure = Callable[[str, str, str], Counts]
"""(model, version, role) → that version's cumulative counters (gateway.stats.Traffic.counts)."""
Compare = Callable[[str, str, str], tuple[int, int, int]]
"""(model, primary version, shadow version) → cumulative shadow (compared, agreed, failed)."""

_STEP_GATES: tuple[GateName, ...] = ("errors", "p99_latency", "ood", "agreement")
_SHADOW_GATES: tuple[GateName, ...] = ("errors", "p99_latency", "agreement")  # shadow calls are not OOD-scored
OUTCOME_LOOK_S = 2.0
"""Ground truth is read at most this often per rollout."""


@dataclass(frozen=True)
class Plan:
    """What an operator asks for; validated when built (InvalidArgument names the field)."""

    model: str
    candidate: str
    steps: tuple[int, ...]  # bps of traffic to the candidate, increasing, ending at 10000 (promotion)
    interval_s: float
    shadow_s: float = 0.0  # a shadow phase of this long first (0: none, unless shadow_requests)
    shadow_requests: int = 0  # ...or until the candidate has shadowed this many requests
    step_shadow_bps: int = BUCKETS  # share of traffic the candidate shadows during steps (agreement gate)
    max_extensions: int = 2
    thresholds: Thresholds = Thresholds()

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidArgument("model: required")
        if not self.candidate:
            raise InvalidArgument("candidate: required; the version to roll out")
        steps = tuple(self.steps)
        if not steps:
            raise InvalidArgument("steps: empty; give percentages such as 1,5,25,50,100")
        if any(not 0 < s <= BUCKETS for s in steps) or list(steps) != sorted(set(steps)):
            shown = ",".join(format_percent(s) for s in steps)
            raise InvalidArgument(f"steps: {shown} must be increasing percentages in (0, 100]")
        if steps[-1] != BUCKETS:
            raise InvalidArgument(f"steps: the last step is {format_percent(steps[-1])}%; it must be 100 (promotion)")
        # A NaN or infinite duration is never reached: the rollout would stay in that phase for good.
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise InvalidArgument(f"interval_s: {self.interval_s!r}; a step must last a finite time above 0 s")
        if not math.isfinite(self.shadow_s):
            raise InvalidArgument(f"shadow_s: {self.shadow_s!r}; the shadow phase must last a finite time")
        if self.shadow_s < 0 or self.shadow_requests < 0:
            raise InvalidArgument("shadow: the shadow phase's duration and request count cannot be negative")
        if self.shadow_s and self.shadow_requests:
            raise InvalidArgument("shadow: give a shadow phase's duration or its request count, not both")
        if not 0 <= self.step_shadow_bps <= BUCKETS:
            raise InvalidArgument(f"step_shadow_bps: {self.step_shadow_bps!r} must be in [0, {BUCKETS}]")
        if self.max_extensions < 0:
            raise InvalidArgument(f"max_extensions: {self.max_extensions!r} is negative")
        object.__setattr__(self, "steps", steps)

    @property
    def has_shadow_phase(self) -> bool:
        return bool(self.shadow_s or self.shadow_requests)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["steps"] = list(self.steps)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(**{**data, "steps": tuple(data["steps"]), "thresholds": Thresholds(**data["thresholds"])})


def _gate_dict(result: GateResult) -> dict[str, Any]:
    return dataclasses.asdict(result)


def _gate_of(data: Mapping[str, Any]) -> GateResult:
    return GateResult(data["gate"], data["verdict"], data["summary"], dict(data["figures"]))


@dataclass
class StepRecord:
    """How one phase of a rollout ended, with the gates as last evaluated."""

    phase: Literal["shadow", "step"]
    bps: int
    started_ns: int
    ended_ns: int
    outcome: str  # passed | failed | paused | aborted | promoted
    extensions: int
    gates: list[GateResult]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "gates": [_gate_dict(g) for g in self.gates]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepRecord:
        return cls(**{**data, "gates": [_gate_of(g) for g in data["gates"]]})


@dataclass
class Rollout:
    """One rollout's persisted state. `step` -1 is the shadow phase; otherwise an index into plan.steps."""

    id: int
    plan: Plan
    baseline: str
    started_by: str
    reason: str
    created_ns: int
    restore: dict[str, Any]  # the baseline route (Route.to_dict) a rollback restores
    state: State = "running"
    step: int = 0
    step_started_ns: int = 0
    extensions: int = 0
    gates: list[GateResult] = field(default_factory=list)  # the current window's latest look
    history: list[StepRecord] = field(default_factory=list)
    outcome: str = ""
    updated_ns: int = 0
    expected: dict[str, Any] | None = None  # the route this rollout last set

    @property
    def phase(self) -> Literal["shadow", "step"]:
        return "shadow" if self.step < 0 else "step"

    @property
    def bps(self) -> int:
        """The candidate's share of user traffic now (0 in the shadow phase)."""
        return 0 if self.step < 0 else self.plan.steps[self.step]

    @property
    def where(self) -> str:
        """The current phase in words: "shadow phase" or "step 2/4 (5%)"."""
        if self.step < 0:
            return "shadow phase"
        return f"step {self.step + 1}/{len(self.plan.steps)} ({format_percent(self.bps)}%)"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["plan"] = self.plan.to_dict()
        data["gates"] = [_gate_dict(g) for g in self.gates]
        data["history"] = [h.to_dict() for h in self.history]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rollout:
        return cls(
            **{
                **data,
                "plan": Plan.from_dict(data["plan"]),
                "gates": [_gate_of(g) for g in data["gates"]],
                "history": [StepRecord.from_dict(h) for h in data["history"]],
            }
        )


class RolloutStore:
    """Rollouts by id in the LMDB environment at `path` (8-byte big-endian id → msgpack)."""

    def __init__(self, path: str | Path, map_size: int = 1 << 28) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self._lock_path = Path(path) / "rollouts.lock"
        self._path = path
        self._env = lmdb.open(str(path), map_size=map_size, max_dbs=2)
        self._db = self._env.open_db(b"rollouts")
        self._meta = self._env.open_db(b"meta")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held by a process (worker) while it reads, decides on and saves rollouts, so that no process saves
        over a change another one made after its read. Not reentrant."""
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def save(self, rollout: Rollout) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(rollout.id.to_bytes(8, "big"), msgpack.packb(rollout.to_dict()), db=self._db)
            txn.put(b"version", (self._version(txn) + 1).to_bytes(8, "big"), db=self._meta)

    def version(self) -> int:
        """Bumped by every save, by any process: a reader reloads only when it moved."""
        with self._env.begin() as txn:
            return self._version(txn)

    def _version(self, txn: lmdb.Transaction) -> int:
        value = txn.get(b"version", db=self._meta)
        return 0 if value is None else int.from_bytes(value, "big")

    def load(self) -> list[Rollout]:
        """Every stored rollout this version can read. One it cannot (saved by an older version that
        accepted values now refused, a NaN duration or an infinite threshold, say) is logged and left
        out: it must not stop the others, nor the gateway, from loading."""
        loaded = []
        with self._env.begin() as txn:
            for key, value in txn.cursor(db=self._db):
                try:
                    loaded.append(Rollout.from_dict(msgpack.unpackb(value)))
                except (GatewayError, KeyError, TypeError, ValueError) as e:
                    log.error(
                        "rollout #%d in %s cannot be read, left out: %s", int.from_bytes(key, "big"), self._path, e
                    )
        return loaded

    def last_id(self) -> int:
        """The highest id stored, readable or not (0: none), so that a new rollout never takes an old one's."""
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._db)
            return int.from_bytes(cursor.key(), "big") if cursor.last() else 0

    def close(self) -> None:
        self._env.close()


@dataclass(frozen=True)
class _Window:
    """Counters at the start of the current step; the window is now minus these."""

    baseline: Counts
    candidate: Counts
    agreement: tuple[int, int, int]
    started_s: float
    step_started_ns: int  # the rollout's, when this window opened: another value means another window


@dataclass(frozen=True)
class _Look:
    """Outcome figures of one window, as read in the worker thread up to `until_s`."""

    window: _Window
    until_s: float
    took_s: float
    measured: Measured | None  # None: the read failed (logged)


@dataclass(frozen=True)
class _Reading:
    window: _Window
    until_s: float
    future: Future[tuple[Measured, float]]


def _timed_measure(source: OutcomeSource, query: OutcomeQuery) -> tuple[Measured, float]:
    started = time.perf_counter()
    measured = source.measure(query)
    return measured, time.perf_counter() - started


class RolloutManager:
    """Runs every rollout of the gateway; called on the event loop only (admin RPCs and `tick`). Ground truth
    for outcome gates is read by `outcomes` in the manager's one worker thread, started on first use."""

    def __init__(
        self,
        store: RolloutStore,
        routes: RouteControl,
        measure: Measure,
        compare: Compare,
        now: Callable[[], float] = time.time,
        outcomes: OutcomeSource | None = None,
        outcome_look_s: float = OUTCOME_LOOK_S,
    ) -> None:
        self._store = store
        self._routes = routes
        self._measure = measure
        self._compare = compare
        self._now = now
        self._loaded_version = store.version()
        self._rollouts = {r.id: r for r in store.load()}
        self._windows: dict[int, _Window] = {}
        self._outcomes = outcomes
        self._look_s = outcome_look_s
        self._looks: dict[int, _Look] = {}  # by rollout id: the current window's latest outcome figures
        self._reading: dict[int, _Reading] = {}  # by rollout id: the read in the worker, at most one each
        self._final_at: dict[int, float] = {}  # by rollout id: when the window became due (its final look)
        self._worker: ThreadPoolExecutor | None = None

    def _sync(self) -> None:
        """Reload the rollouts when another process (another worker) saved one since we looked."""
        version = self._store.version()
        if version != self._loaded_version:
            self._loaded_version = version
            self._rollouts = {r.id: r for r in self._store.load()}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """For a change to the rollouts: under the store's lock, from the state as stored when it was taken, so
        a decision never saves over an action another worker committed meanwhile (an abort, a pause)."""
        with self._store.locked():
            self._sync()
            yield

    # --- reading ---------------------------------------------------------------------------------

    def rollouts(self, model: str | None = None) -> list[Rollout]:
        """Rollouts, newest first, optionally of one model."""
        self._sync()
        chosen = [r for r in self._rollouts.values() if model is None or r.plan.model == model]
        return sorted(chosen, key=lambda r: -r.id)

    def get(self, model: str) -> Rollout:
        """The model's active rollout, else its latest; NotFound when it never had one."""
        rollouts = self.rollouts(model)
        active = [r for r in rollouts if r.state in ACTIVE]
        if active:
            return active[0]
        if rollouts:
            return rollouts[0]
        raise NotFound(f"model: {model!r} has no rollout")

    def elapsed_s(self, rollout: Rollout) -> float:
        """How long the current window has run (0 when none is open)."""
        window = self._windows.get(rollout.id)
        return 0.0 if window is None else self._now() - window.started_s

    def _active(self, model: str) -> Rollout:
        rollout = self.get(model)
        if rollout.state not in ACTIVE:
            raise FailedPrecondition(f"model: {model!r} has no active rollout (rollout #{rollout.id} {rollout.state})")
        return rollout

    # --- operator actions ------------------------------------------------------------------------

    def start(self, plan: Plan, *, who: str, why: str) -> Rollout:
        """Begin a rollout from the model's current route, which must send all traffic to one version."""
        if not why.strip():
            raise InvalidArgument("reason: required; say why you roll this version out")
        if plan.thresholds.outcome_gates:
            if self._outcomes is None:
                raise FailedPrecondition("gates: outcome gates judge ground truth, which this gateway does not keep")
            self._outcomes.check(plan.model, plan.thresholds)
        with self._locked():  # so two workers never start two rollouts of a model, nor two with one id
            for other in self.rollouts(plan.model):
                if other.state in ACTIVE:
                    raise FailedPrecondition(
                        f"model: {plan.model!r} already has rollout #{other.id} ({other.state}); abort it first"
                    )
            route = self._routes.effective_route(plan.model)
            if len(route.split) != 1:
                shares = " ".join(f"{v}={format_percent(b)}%" for v, b in route.split)
                raise FailedPrecondition(
                    f"model: {plan.model!r} splits its traffic ({shares}); a rollout starts from one version taking all"
                )
            baseline = route.split[0][0]
            if plan.candidate == baseline:
                raise InvalidArgument(f"candidate: version {baseline!r} already takes all of {plan.model!r}'s traffic")
            restore = dataclasses.replace(route, shadows=tuple(s for s in route.shadows if s[0] != plan.candidate))
            now_ns = self._now_ns()
            rollout = Rollout(
                id=self._store.last_id() + 1,  # every rollout is stored at its start, readable or not
                plan=plan,
                baseline=baseline,
                started_by=who,
                reason=why.strip(),
                created_ns=now_ns,
                restore=restore.to_dict(),
                step=-1 if plan.has_shadow_phase else 0,
                updated_ns=now_ns,
            )
            first = f"{rollout.where} with v{plan.candidate}" if plan.has_shadow_phase else self._step_words(rollout)
            self._set_route(rollout, who, f"rollout #{rollout.id} of v{plan.candidate} started: {why.strip()}; {first}")
            self._rollouts[rollout.id] = rollout
            self._open_window(rollout)
            log.info("rollout #%d: %s v%s → v%s started by %s", rollout.id, plan.model, baseline, plan.candidate, who)
            return rollout

    def pause(self, model: str, *, who: str, why: str) -> Rollout:
        """Stop judging and stepping; traffic stays as it is."""
        with self._locked():
            rollout = self._active(model)
            if rollout.state == "paused":
                raise FailedPrecondition(f"model: rollout #{rollout.id} of {model!r} is already paused")
            self._pause(rollout, who, why)
            return rollout

    def resume(self, model: str, *, who: str, why: str) -> Rollout:
        """Continue a paused rollout at its step, with a fresh window (and the step's route restored)."""
        with self._locked():
            rollout = self._active(model)
            if rollout.state != "paused":
                raise FailedPrecondition(f"model: rollout #{rollout.id} of {model!r} is {rollout.state}, not paused")
            rollout.state, rollout.outcome = "running", ""
            self._set_route(rollout, who, f"rollout #{rollout.id} resumed at {rollout.where}: {why}")
            self._open_window(rollout)
            return rollout

    def abort(self, model: str, *, who: str, why: str) -> Rollout:
        """Restore the baseline route and end the rollout."""
        with self._locked():
            rollout = self._active(model)
            self._end_step(rollout, "aborted")
            self._routes.change(
                model,
                Route.from_dict(rollout.restore),
                who=who,
                why=f"rollout #{rollout.id} aborted at {rollout.where}: {why}; traffic back to v{rollout.baseline}",
                action="rollback",
            )
            self._finish(rollout, "aborted", f"aborted by {who} at {rollout.where}: {why}")
            return rollout

    def promote(self, model: str, *, who: str, why: str) -> Rollout:
        """Give the candidate all traffic now, whatever the gates say."""
        with self._locked():
            rollout = self._active(model)
            self._end_step(rollout, "promoted")
            candidate = rollout.plan.candidate
            self._routes.promote(
                model, candidate, who=who, why=f"rollout #{rollout.id} force-promoted at {rollout.where}: {why}"
            )
            self._finish(rollout, "completed", f"force-promoted by {who} at {rollout.where}: {why}")
            return rollout

    # --- the loop --------------------------------------------------------------------------------

    def tick(self) -> None:
        """Judge every running rollout's window; step, promote or roll back where it is time."""
        with self._locked():
            for rollout in list(self._rollouts.values()):
                if rollout.state != "running":
                    continue
                try:
                    self._drive(rollout)
                except GatewayError as error:  # e.g. a version became unavailable: stop, let a human look
                    log.warning("rollout #%d: %s; pausing it", rollout.id, error.message)
                    self._pause(rollout, AUTOMATIC, f"cannot continue: {error.message}")

    def _drive(self, rollout: Rollout) -> None:
        window = self._windows.get(rollout.id)
        # None: the gateway restarted. Another start time: another worker paused and resumed it, or
        # otherwise opened a new window, which this one (the driver) must judge from its own start.
        if window is None or window.step_started_ns != rollout.step_started_ns:
            log.info("rollout #%d: resuming %s with a new window", rollout.id, rollout.where)
            self._open_window(rollout)
            return
        current = self._routes.route(rollout.plan.model)
        if current is None or current.to_dict() != rollout.expected:
            last = self._routes.history(rollout.plan.model, None, None)[-1]
            self._pause(
                rollout,
                AUTOMATIC,
                f"the route was changed outside the rollout (change {last.seq} by {last.who}: {last.why})",
            )
            return
        look = self._look(rollout, window)
        rollout.gates = self._evaluate(rollout, window, look, final=False)
        if overall(rollout.gates) == "fail":
            self._fail(rollout, "fail", "")
            return
        if not self._due(rollout, window):
            return
        if rollout.plan.thresholds.outcome_gates:
            final_at = self._final_at.setdefault(rollout.id, self._now())
            # The final look judges the truth of the whole step, from a read that worked.
            if look is None or look.measured is None or look.until_s < final_at:
                self._read(rollout, window)
                return
        rollout.gates = self._evaluate(rollout, window, look, final=True)
        verdict = overall(rollout.gates)
        if verdict == "fail":
            self._fail(rollout, "fail", "")
        elif verdict == "wait" and rollout.extensions < rollout.plan.max_extensions:
            rollout.extensions += 1
            self._final_at.pop(rollout.id, None)
            log.info("rollout #%d: %s extended: %s", rollout.id, rollout.where, explain(rollout.gates))
            self._save(rollout)
        elif verdict == "wait":
            self._fail(rollout, "wait", f"too little data after {rollout.extensions} extensions: ")
        else:
            self._advance(rollout)

    def _due(self, rollout: Rollout, window: _Window) -> bool:
        periods = 1 + rollout.extensions
        plan = rollout.plan
        if rollout.step < 0 and plan.shadow_requests:
            compared, _, failed = self._compare(plan.model, rollout.baseline, plan.candidate)
            done = compared + failed - window.agreement[0] - window.agreement[2]
            return done >= plan.shadow_requests * periods
        length = plan.shadow_s if rollout.step < 0 else plan.interval_s
        return self._now() - window.started_s >= length * periods

    def _evaluate(self, rollout: Rollout, window: _Window, look: _Look | None, *, final: bool) -> list[GateResult]:
        plan = rollout.plan
        role = "shadow" if rollout.step < 0 else "primary"
        candidate = self._measure(plan.model, plan.candidate, role).since(window.candidate)
        baseline = self._measure(plan.model, rollout.baseline, "primary").since(window.baseline)
        compared, agreed, _ = self._compare(plan.model, rollout.baseline, plan.candidate)
        agreement = None
        if rollout.step < 0 or plan.step_shadow_bps:
            agreement = Agreement(compared - window.agreement[0], agreed - window.agreement[1])
        gates = _SHADOW_GATES if rollout.step < 0 else _STEP_GATES
        results = evaluate(candidate, baseline, agreement, plan.thresholds, final=final, gates=gates)
        th = plan.thresholds
        if not th.outcome_gates:
            return results
        if look is None:
            return results + not_measured(th, f"ground truth not read yet for this window (every {self._look_s:g} s)")
        if look.measured is None:
            return results + not_measured(th, "reading ground truth failed (see the gateway's log); trying again")
        return results + evaluate_outcomes(look.measured, th, th.confidence if final else th.interim_confidence)

    # --- outcome gates: ground truth read in the worker thread ---------------------------------------

    def _look(self, rollout: Rollout, window: _Window) -> _Look | None:
        """The window's latest outcome figures (None before the first read ends); starts a read when due."""
        if not rollout.plan.thresholds.outcome_gates:
            return None
        self._collect(rollout.id)
        look = self._looks.get(rollout.id)
        if look is not None and look.window is not window:
            look = None
        # Reads hold the GIL for much of their time: from start to start, at least five times a read's length,
        # so they take at most a fifth of it.
        if look is None or self._now() - look.until_s >= max(self._look_s, 5 * look.took_s):
            self._read(rollout, window)
        return look

    def _read(self, rollout: Rollout, window: _Window) -> None:
        """Start reading the window's ground truth up to now, unless a read is already under way."""
        if rollout.id in self._reading or self._outcomes is None:
            return
        plan = rollout.plan
        now = self._now()
        query = OutcomeQuery(
            model=plan.model,
            candidate=plan.candidate,
            baseline=rollout.baseline,
            candidate_roles=("shadow",) if rollout.step < 0 else ("primary", "shadow"),
            attribute=plan.thresholds.fairness_attribute or "",
            since_ns=int(window.started_s * 1e9),
            until_ns=int(now * 1e9),
        )
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="rollout-outcomes")
        self._reading[rollout.id] = _Reading(window, now, self._worker.submit(_timed_measure, self._outcomes, query))

    def _collect(self, rollout_id: int) -> None:
        """Keep a finished read's figures if they are still about the current window."""
        reading = self._reading.get(rollout_id)
        if reading is None or not reading.future.done():
            return
        del self._reading[rollout_id]
        if reading.window is not self._windows.get(rollout_id):
            return
        try:
            measured, took_s = reading.future.result()
        except Exception:
            log.exception("rollout #%d: reading ground truth failed; trying again", rollout_id)
            self._looks[rollout_id] = _Look(reading.window, reading.until_s, self._look_s, None)
            return
        self._looks[rollout_id] = _Look(reading.window, reading.until_s, took_s, measured)

    def _advance(self, rollout: Rollout) -> None:
        passed = explain(rollout.gates)
        done = rollout.where
        self._end_step(rollout, "passed")
        rollout.step += 1
        plan = rollout.plan
        if plan.steps[rollout.step] == BUCKETS:
            self._routes.promote(
                plan.model,
                plan.candidate,
                who=AUTOMATIC,
                why=f"rollout #{rollout.id} completed: v{plan.candidate} takes 100%; {done} passed: {passed}",
            )
            self._finish(rollout, "completed", f"promoted after {done} passed")
            return
        why = f"rollout #{rollout.id}: {self._step_words(rollout)}; {done} passed: {passed}"
        self._set_route(rollout, AUTOMATIC, why)
        self._open_window(rollout)

    def _fail(self, rollout: Rollout, verdict: Verdict, prefix: str) -> None:
        """Restore the baseline route; the gates with `verdict` (fail, or wait for want of data) are why."""
        failing = [g for g in rollout.gates if g.verdict == verdict]
        figures = explain(failing)
        where = rollout.where
        self._end_step(rollout, "failed")
        self._routes.change(
            rollout.plan.model,
            Route.from_dict(rollout.restore),
            who=AUTOMATIC,
            why=f"rollout #{rollout.id} failed at {where}: {prefix}{figures}; traffic back to v{rollout.baseline}",
            action="rollback",
        )
        names = ",".join(g.gate for g in failing)
        self._finish(rollout, "failed", f"failed at {where}: {names}: {prefix}{figures}")

    def _pause(self, rollout: Rollout, who: str, why: str) -> None:
        self._end_step(rollout, "paused")
        rollout.state, rollout.outcome = "paused", f"paused by {who} at {rollout.where}: {why}"
        self._routes.note(rollout.plan.model, who=who, why=f"rollout #{rollout.id} paused at {rollout.where}: {why}")
        self._save(rollout)
        log.info("rollout #%d: %s", rollout.id, rollout.outcome)

    # --- helpers ---------------------------------------------------------------------------------

    def _step_words(self, rollout: Rollout) -> str:
        return f"{rollout.where}: v{rollout.plan.candidate} takes {format_percent(rollout.bps)}% of traffic"

    def _target(self, rollout: Rollout) -> Route:
        """The route of the rollout's current phase, built on the baseline route."""
        base = Route.from_dict(rollout.restore)
        plan = rollout.plan
        if rollout.step < 0:
            return dataclasses.replace(base, shadows=(*base.shadows, (plan.candidate, BUCKETS)))
        bps = plan.steps[rollout.step]
        shadow = ((plan.candidate, plan.step_shadow_bps),) if plan.step_shadow_bps else ()
        return dataclasses.replace(
            base, split=((rollout.baseline, BUCKETS - bps), (plan.candidate, bps)), shadows=(*base.shadows, *shadow)
        )

    def _set_route(self, rollout: Rollout, who: str, why: str) -> None:
        """Apply the current phase's route (a note if it is already in place) and remember it."""
        route = self._target(rollout)
        action: Action = "shadow" if rollout.step < 0 else "split"
        if self._routes.route(rollout.plan.model) == route:
            self._routes.note(rollout.plan.model, who=who, why=why)
        else:
            self._routes.change(rollout.plan.model, route, who=who, why=why, action=action)
        rollout.expected = route.to_dict()

    def _open_window(self, rollout: Rollout) -> None:
        plan = rollout.plan
        role = "shadow" if rollout.step < 0 else "primary"
        now = self._now()
        self._windows[rollout.id] = _Window(
            baseline=self._measure(plan.model, rollout.baseline, "primary"),
            candidate=self._measure(plan.model, plan.candidate, role),
            agreement=self._compare(plan.model, rollout.baseline, plan.candidate),
            started_s=now,
            step_started_ns=int(now * 1e9),
        )
        rollout.step_started_ns, rollout.extensions, rollout.gates = int(now * 1e9), 0, []
        self._forget_outcomes(rollout.id)
        self._save(rollout)

    def _forget_outcomes(self, rollout_id: int) -> None:
        """Drop a window's outcome figures (a read under way finishes unseen)."""
        self._looks.pop(rollout_id, None)
        self._reading.pop(rollout_id, None)
        self._final_at.pop(rollout_id, None)

    def _end_step(self, rollout: Rollout, outcome: str) -> None:
        self._windows.pop(rollout.id, None)
        self._forget_outcomes(rollout.id)
        rollout.history.append(
            StepRecord(
                rollout.phase,
                rollout.bps,
                rollout.step_started_ns,
                self._now_ns(),
                outcome,
                rollout.extensions,
                list(rollout.gates),
            )
        )

    def _finish(self, rollout: Rollout, state: State, outcome: str) -> None:
        rollout.state, rollout.outcome = state, outcome
        rollout.expected = None
        self._save(rollout)
        log.info("rollout #%d: %s", rollout.id, outcome)

    def _save(self, rollout: Rollout) -> None:
        rollout.updated_ns = self._now_ns()
        self._store.save(rollout)

    def _now_ns(self) -> int:
        return int(self._now() * 1e9)

    def close(self) -> None:
        if self._worker is not None:  # before the log and the feedback store it reads are closed
            self._worker.shutdown(wait=True, cancel_futures=True)
        self._store.close()
