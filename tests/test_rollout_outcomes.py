"""Outcome gates: a rollout judged on ground truth. First the statistics behind them, against scipy and
Newcombe's published intervals; then a live gateway where the truth of every answered request is sent
back while the rollout runs: a candidate that answers the wrong class is rolled back by the accuracy gate,
one that misses the positives of one region by the equal-opportunity gate, a regressor that overshoots by
the MAE gate, a candidate as good as its baseline is promoted, and one nobody sends truth for waits at its
step, saying so, until its extensions run out.

Each model has version 1 (the baseline) and a candidate 2. Classifiers see x = [a, b, r]: the truth is
1 when b > a (5% of labels flipped), the region is "north" when r > 0.5.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess
from models import classifier_graph, identity_graph, save_model, scaled_graph
from test_rollout import Admin, cli

from gateway.errors import InvalidArgument
from gateway.protocol import Stub, admin
from gateway.protocol import inference as pb
from router.analysis import Thresholds, newcombe_bounds, wilson_bounds
from router.outcomes import (
    Group,
    Labelled,
    Measured,
    accuracy_gate,
    equal_opportunity_gate,
    evaluate_outcomes,
    mae_gate,
    mean_difference_lower,
)
from router.rollout import Plan

# --- the statistics ------------------------------------------------------------------------------------


def test_newcombe_interval_reproduces_the_published_examples() -> None:
    # Newcombe (1998), Statistics in Medicine 17:873-890, table II, method 10: 95% two-sided intervals,
    # i.e. one-sided bounds at 97.5% each.
    assert newcombe_bounds(56, 70, 48, 80, 0.975) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    assert newcombe_bounds(9, 10, 3, 10, 0.975) == pytest.approx((0.1705, 0.8090), abs=5e-5)
    # It stays inside [-1, 1] where the Wald interval would not, and is antisymmetric.
    low, high = newcombe_bounds(10, 10, 0, 10, 0.975)
    assert 0 < low < 1 and high == 1.0
    assert newcombe_bounds(3, 10, 9, 10, 0.975) == pytest.approx((-0.8090, -0.1705), abs=5e-5)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (45, 50), (50, 50), (812, 1000), (1, 3)])
@pytest.mark.parametrize("confidence", [0.95, 0.975, 0.999])
def test_wilson_bounds_equal_scipys(k: int, n: int, confidence: float) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")  # installed with scikit-learn (the test extra)
    expected = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=2 * confidence - 1, method="wilson")
    assert wilson_bounds(k, n, confidence) == pytest.approx((expected.low, expected.high), abs=1e-12)


@pytest.mark.parametrize(("n", "tolerance"), [(400, 0.003), (30, 0.03)])
def test_mae_bound_is_welchs_with_a_normal_quantile(n: int, tolerance: float) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    candidate, baseline = np.abs(rng.normal(0.3, 1.0, n)), np.abs(rng.normal(0.0, 0.8, n + 7))
    args = (candidate.mean(), candidate.var(ddof=1), n, baseline.mean(), baseline.var(ddof=1), n + 7)
    lower = mean_difference_lower(*args, 0.95)
    welch = scipy_stats.ttest_ind(candidate, baseline, equal_var=False, alternative="greater")
    expected = welch.confidence_interval(confidence_level=0.95).low
    difference = candidate.mean() - baseline.mean()
    # The same standard error; only the quantile differs (normal vs t), by less than `tolerance`.
    assert (difference - lower) == pytest.approx(difference - expected, rel=tolerance)
    assert lower < difference


def _classified(n: int, correct: int, groups: tuple[Group, ...] = ()) -> Labelled:
    return Labelled(n, correct=correct, groups=groups)


def test_accuracy_gate_waits_for_labels_then_fails_only_beyond_its_margin() -> None:
    th = Thresholds(min_labelled=50, accuracy_not_worse_by=0.02)
    (waiting,) = evaluate_outcomes(Measured(_classified(49, 5), _classified(500, 450), 30), th, 0.95)
    assert waiting.verdict == "wait" and "candidate 49, baseline 500; need 50 each" in waiting.summary
    assert accuracy_gate(_classified(50, 5), _classified(50, 45), th, 0.95).verdict == "fail"
    # 3 pp lower on a small sample: not evidence of more than 2 pp.
    assert accuracy_gate(_classified(100, 87), _classified(100, 90), th, 0.95).verdict == "pass"
    # 3 pp lower on 20,000 requests a side is: the upper bound of the difference is below -2 pp.
    big = accuracy_gate(_classified(20_000, 17_400), _classified(20_000, 18_000), th, 0.95)
    assert big.verdict == "fail" and big.figures["upper_bound"] < -0.02
    # ...and within a 5 pp margin it passes.
    assert (
        accuracy_gate(
            _classified(20_000, 17_400),
            _classified(20_000, 18_000),
            Thresholds(min_labelled=50, accuracy_not_worse_by=0.05),
            0.95,
        ).verdict
        == "pass"
    )
    # A stricter (interim) confidence needs stronger evidence.
    edge = (_classified(400, 340), _classified(400, 364))
    assert accuracy_gate(*edge, th, 0.95).verdict == "fail" and accuracy_gate(*edge, th, 0.999).verdict == "pass"


def test_mae_gate_fails_a_regressor_whose_errors_grew_by_more_than_the_margin() -> None:
    th = Thresholds(min_labelled=30, mae_not_worse_by=0.1)
    worse = Labelled(200, mae=0.5, abs_error_var=0.04)
    base = Labelled(200, mae=0.2, abs_error_var=0.04)
    assert mae_gate(worse, base, th, 0.95).verdict == "fail"
    assert mae_gate(Labelled(200, mae=0.25, abs_error_var=0.04), base, th, 0.95).verdict == "pass"
    (waiting,) = evaluate_outcomes(Measured(Labelled(20, mae=9.0, abs_error_var=0.04), base, 30), th, 0.95)
    assert (waiting.gate, waiting.verdict) == ("mae", "wait")


def test_equal_opportunity_gate_compares_the_tpr_gaps_between_groups() -> None:
    th = Thresholds(min_labelled=50, max_equal_opportunity_gap_increase=0.1, fairness_attribute="region")
    fair = (Group("north", 200, 100, 95), Group("south", 200, 100, 94))
    biased = (Group("north", 200, 100, 10), Group("south", 200, 100, 95))
    slightly = (Group("north", 200, 100, 88), Group("south", 200, 100, 95))
    base = _classified(400, 380, fair)
    failed = equal_opportunity_gate(_classified(400, 300, biased), base, th, 0.95, min_group=30)
    assert failed.verdict == "fail" and failed.figures["candidate_gap"] == pytest.approx(0.85)
    assert "north 0.10" in failed.summary and failed.figures["candidate_gap_low"] > failed.figures["baseline_gap_high"]
    assert equal_opportunity_gate(_classified(400, 370, slightly), base, th, 0.95, min_group=30).verdict == "pass"
    # Groups below the model's fairness_min_group do not count: with one group left, it waits.
    small = (Group("north", 20, 10, 1), Group("south", 380, 190, 180))
    waiting = equal_opportunity_gate(_classified(400, 300, small), base, th, 0.95, min_group=30)
    assert waiting.verdict == "wait" and "candidate 1, baseline 1; need 2 each" in waiting.summary


def test_equal_opportunity_compares_only_groups_large_enough_on_both_sides() -> None:
    # A third group, low TPR under both models, counted on the (bigger) candidate side only: it must not
    # widen the candidate's gap alone.
    th = Thresholds(min_labelled=50, max_equal_opportunity_gap_increase=0.05, fairness_attribute="region")
    base = _classified(400, 380, (Group("north", 200, 100, 95), Group("south", 180, 90, 85), Group("isle", 20, 10, 5)))
    same = (Group("north", 200, 100, 95), Group("south", 180, 90, 85), Group("isle", 40, 20, 10))
    result = equal_opportunity_gate(_classified(440, 400, same), base, th, 0.95, min_group=30)
    assert result.verdict == "pass" and result.figures["candidate_gap"] == pytest.approx(0.95 - 85 / 90)


def test_mae_gate_never_passes_on_non_finite_errors_and_waits_for_two_labels() -> None:
    th = Thresholds(min_labelled=1, mae_not_worse_by=0.1)
    base = Labelled(200, mae=0.2, abs_error_var=0.04)
    assert mae_gate(Labelled(200, mae=math.nan, abs_error_var=math.nan), base, th, 0.95).verdict == "fail"
    assert mae_gate(Labelled(200, mae=math.inf, abs_error_var=math.nan), base, th, 0.95).verdict == "fail"
    assert mae_gate(Labelled(1, mae=0.2, abs_error_var=math.nan), base, th, 0.95).verdict == "wait"


def test_outcome_thresholds_are_validated_and_survive_the_plans_stored_form() -> None:
    for fields in (
        {"max_equal_opportunity_gap_increase": 0.1},  # which attribute?
        {"fairness_attribute": "region"},  # which increase?
        {"accuracy_not_worse_by": 1.5},
        {"accuracy_not_worse_by": 0.01, "mae_not_worse_by": 1.0},
        {"mae_not_worse_by": math.inf},
        {"min_labelled": 0},
    ):
        with pytest.raises(InvalidArgument):
            Thresholds(**fields)  # type: ignore[arg-type]
    th = Thresholds(accuracy_not_worse_by=0.0, max_equal_opportunity_gap_increase=0.05, fairness_attribute="r")
    assert th.outcome_gates == ("accuracy", "equal_opportunity") and Thresholds().outcome_gates == ()
    plan = Plan("m", "2", (5000, 10000), 30.0, thresholds=th)
    assert Plan.from_dict(plan.to_dict()) == plan
    measured = Measured(_classified(10, 1), _classified(10, 9), 30)
    assert [g.verdict for g in evaluate_outcomes(measured, th, 0.95)] == ["wait", "wait"]


# --- a live gateway ------------------------------------------------------------------------------------

RATE = 100.0  # requests per second
NOISE = 0.05  # share of classifier labels flipped
CONFIG = """
[shadows]
max_concurrency = 4
[models.eo]
segments = ["region"]
fairness_min_group = 20
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("outcome-models")
    candidates = {
        "wrong": classifier_graph(swap=True),
        "good": classifier_graph(),
        "unlabelled": classifier_graph(),
        "eo": classifier_graph(north_penalty=10.0),
    }
    for name, candidate in candidates.items():
        save_model(repo, name, "1", classifier_graph())
        save_model(repo, name, "2", candidate)
    save_model(repo, "overshoots", "1", identity_graph("FP32", width=1))
    save_model(repo, "overshoots", "2", scaled_graph(1.5, width=1))
    return repo


@pytest.fixture(scope="module")
def gw(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(models, CONFIG, tmp_path_factory.mktemp("outcomes"))
    gateway.wait_ready()
    yield gateway
    assert gateway.stop() == 0, gateway.log


class LabelledLoad:
    """Requests to one model at a fixed rate from a background thread, each with its own id; the truth of
    the answered ones goes back through SubmitFeedback (as columns, every 20 answers), at most `max_labels`."""

    def __init__(self, gateway: GatewayProcess, model: str, max_labels: int | None = None) -> None:
        self.gateway, self.model, self.max_labels = gateway, model, max_labels
        self.regressor = model == "overshoots"
        self.answered = 0
        self.labels_sent = 0
        self.unknown: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LabelledLoad:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _request(self, rng: np.random.Generator, i: int) -> tuple[pb.ModelInferRequest, float]:
        request = pb.ModelInferRequest(model_name=self.model, id=f"{self.model}-{i}")
        if self.regressor:
            x = rng.uniform(1, 3, (1, 1)).astype(np.float32)
            truth = float(x[0, 0]) + float(rng.normal(0, 0.1))
        else:
            x = rng.uniform(0, 1, (1, 3)).astype(np.float32)
            truth = float((x[0, 1] > x[0, 0]) != (rng.random() < NOISE))
            region = "north" if x[0, 2] > 0.5 else "south"
            if self.model == "eo":
                request.parameters["segment.region"].string_param = region
        request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(x.tobytes())
        return request, truth

    def _feed(self, ops: Admin, pending: list[tuple[str, float]]) -> None:
        if self.max_labels is not None:
            pending = pending[: max(0, self.max_labels - self.labels_sent)]
        if not pending:
            return
        ids = [i for i, _ in pending]
        columns = (
            admin.FeedbackColumns(request_ids=ids, values=[t for _, t in pending])
            if self.regressor
            else admin.FeedbackColumns(request_ids=ids, labels=[int(t) for _, t in pending])
        )
        response = ops.SubmitFeedback(admin.SubmitFeedbackRequest(model=self.model, columns=columns))
        assert not response.invalid, response.invalid
        self.unknown += response.unknown_ids
        self.labels_sent += response.stored

    def _run(self) -> None:
        rng = np.random.default_rng(11)
        ops = Admin(self.gateway)
        pending: list[tuple[str, float]] = []
        with grpc.insecure_channel(self.gateway.address) as channel:
            stub = Stub(channel)
            next_at = time.monotonic()
            i = 0
            while not self._stop.is_set():
                request, truth = self._request(rng, i)
                i += 1
                try:
                    stub.ModelInfer(request, timeout=10)
                    self.answered += 1
                    pending.append((request.id, truth))
                except grpc.RpcError:
                    pass
                if len(pending) >= 20:
                    time.sleep(0.05)  # the answers' log records commit in the background
                    self._feed(ops, pending)
                    pending = []
                next_at += 1 / RATE
                time.sleep(max(0.0, next_at - time.monotonic()))


def _start(ops: Admin, model: str, interval_s: float = 3.0, max_extensions: int = 2, **gates: Any) -> Any:
    ops.Promote(admin.PromoteRequest(model=model, version="1", reason="baseline before the rollout"))
    request = admin.StartRolloutRequest(
        model=model,
        candidate="2",
        steps_bps=[5000, 10000],
        interval_s=interval_s,
        max_extensions=max_extensions,
        gates=admin.RolloutGates(min_requests=30, **gates),
        reason=f"roll out {model} v2",
    )
    return ops.StartRollout(request).rollout


def _failed_on(ops: Admin, model: str, rollout: Any, gate: str) -> None:
    """The rollout failed on `gate` alone, the route is back on v1, and the change log says why."""
    assert rollout.state == "failed", rollout.outcome
    (step,) = rollout.history
    assert step.outcome == "failed" and {g.gate for g in step.gates if g.verdict == "fail"} == {gate}
    assert f": {gate}:" in rollout.outcome
    assert ops.split(model) == {"1": 10000} and ops.shadows(model) == {}
    last = ops.history(model)[-1]
    assert (last.who, last.action) == ("rollout", "rollback") and f"{gate} FAIL" in last.why, last.why


def test_a_candidate_answering_the_wrong_class_is_rolled_back_by_the_accuracy_gate(gw: GatewayProcess) -> None:
    ops = Admin(gw)
    # It disagrees with v1 on every request, so the agreement gate is switched off (min 0) to let
    # the accuracy gate speak; the candidate shadows v1's half and is judged on those answers too.
    with LabelledLoad(gw, "wrong") as load:
        _start(ops, "wrong", interval_s=30.0, min_labelled=40, accuracy_not_worse_by=0.05, min_agreement=0.0)
        rollout = ops.wait("wrong", lambda r: r.state != "running")
    _failed_on(ops, "wrong", rollout, "accuracy")
    (accuracy,) = [g for g in rollout.history[0].gates if g.gate == "accuracy"]
    assert accuracy.figures["candidate_accuracy"] < 0.2 < 0.8 < accuracy.figures["baseline_accuracy"]
    assert accuracy.figures["upper_bound"] < -0.05 and accuracy.figures["candidate_n"] >= 40
    assert "accuracy" in ops.history("wrong")[-1].why and "pp" in ops.history("wrong")[-1].why
    assert load.labels_sent and not load.unknown


def test_a_candidate_as_good_as_its_baseline_passes_the_accuracy_gate(gw: GatewayProcess) -> None:
    ops = Admin(gw)
    ops.Promote(admin.PromoteRequest(model="good", version="1", reason="baseline before the rollout"))
    with LabelledLoad(gw, "good"):
        started = cli(
            gw,
            "start",
            "good",
            "--candidate",
            "2",
            "--steps",
            "50,100",
            "--interval",
            "3s",
            "--min-requests",
            "30",
            "--min-labelled",
            "40",
            "--accuracy-not-worse-by",
            "0.05",
            "--reason",
            "v2 is a rebuild of v1",
        )
        assert started.returncode == 0, started.stderr
        assert "outcome gates: >= 40 labelled requests per side; accuracy -5 pp" in started.stdout, started.stdout
        rollout = ops.wait("good", lambda r: r.state != "running")
    assert rollout.state == "completed", rollout.outcome
    (step,) = rollout.history
    assert step.outcome == "passed" and all(g.verdict == "pass" for g in step.gates), step.gates
    (accuracy,) = [g for g in step.gates if g.gate == "accuracy"]
    assert accuracy.figures["candidate_n"] >= 40 and accuracy.figures["baseline_n"] >= 40
    assert abs(accuracy.figures["difference"]) < 0.15
    assert ops.split("good") == {"2": 10000}
    assert "accuracy PASS" in ops.history("good")[-1].why


def test_without_enough_labels_the_rollout_waits_at_its_step_saying_so_then_fails(gw: GatewayProcess) -> None:
    ops = Admin(gw)
    with LabelledLoad(gw, "unlabelled", max_labels=10):
        _start(ops, "unlabelled", interval_s=2.0, min_labelled=40, accuracy_not_worse_by=0.05, max_extensions=2)
        held = ops.wait("unlabelled", lambda r: r.extensions >= 1 or r.state != "running")
        assert (held.state, held.step) == ("running", 0), held.outcome
        assert ops.split("unlabelled") == {"1": 5000, "2": 5000}
        verdicts = {g.gate: g for g in held.gates}
        assert verdicts["accuracy"].verdict == "wait" and "need 40 each" in verdicts["accuracy"].summary
        assert all(g.verdict == "pass" for name, g in verdicts.items() if name != "accuracy"), held.gates
        status = cli(gw, "status", "unlabelled")
        assert status.returncode == 0 and "extended" in status.stdout, status.stdout
        assert "accuracy" in status.stdout and "WAIT" in status.stdout and "labelled requests" in status.stdout
        rollout = ops.wait("unlabelled", lambda r: r.state != "running")
    assert rollout.state == "failed" and "too little data after 2 extensions" in rollout.outcome, rollout.outcome
    assert "accuracy" in rollout.outcome and ops.split("unlabelled") == {"1": 10000}
    last = ops.history("unlabelled")[-1]
    assert (last.who, last.action) == ("rollout", "rollback") and "accuracy WAIT: labelled requests" in last.why


def test_a_candidate_missing_one_regions_positives_is_rolled_back_by_the_equal_opportunity_gate(
    gw: GatewayProcess,
) -> None:
    ops = Admin(gw)
    gates = {"min_labelled": 100, "max_equal_opportunity_gap_increase": 0.1, "fairness_attribute": "region"}
    with LabelledLoad(gw, "eo"):
        _start(ops, "eo", interval_s=30.0, min_agreement=0.0, **gates)
        rollout = ops.wait("eo", lambda r: r.state != "running")
    _failed_on(ops, "eo", rollout, "equal_opportunity")
    (gap,) = [g for g in rollout.history[0].gates if g.gate == "equal_opportunity"]
    assert gap.figures["candidate_gap"] > 0.5 > 0.2 > gap.figures["baseline_gap"]
    assert "region: TPR gap" in gap.summary and "north" in gap.summary


def test_a_regressor_that_overshoots_is_rolled_back_by_the_mae_gate(gw: GatewayProcess) -> None:
    ops = Admin(gw)
    with LabelledLoad(gw, "overshoots"):
        _start(ops, "overshoots", interval_s=30.0, min_labelled=40, mae_not_worse_by=0.1, min_agreement=0.0)
        rollout = ops.wait("overshoots", lambda r: r.state != "running")
    _failed_on(ops, "overshoots", rollout, "mae")
    (mae,) = [g for g in rollout.history[0].gates if g.gate == "mae"]
    assert mae.figures["baseline_mae"] < 0.2 < 0.5 < mae.figures["candidate_mae"]


@pytest.mark.parametrize(
    ("model", "gates", "field"),
    [
        ("overshoots", {"accuracy_not_worse_by": 0.01}, "accuracy_not_worse_by: model"),
        ("good", {"mae_not_worse_by": 0.5}, "mae_not_worse_by: model"),
        ("eo", {"max_equal_opportunity_gap_increase": 0.1, "fairness_attribute": "income"}, "fairness_attribute"),
        ("eo", {"max_equal_opportunity_gap_increase": 0.1}, "fairness_attribute"),
    ],
)
def test_outcome_gates_the_model_cannot_be_judged_by_are_refused_at_start(
    gw: GatewayProcess, model: str, gates: dict[str, Any], field: str
) -> None:
    ops = Admin(gw)
    before = ops.history(model)
    with pytest.raises(grpc.RpcError) as refused:
        request = admin.StartRolloutRequest(
            model=model,
            candidate="2",
            steps_bps=[10000],
            interval_s=1.0,
            gates=admin.RolloutGates(**gates),
            reason="should not start",
        )
        ops.StartRollout(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (refused.value.details() or "")
    assert ops.history(model) == before  # nothing changed
