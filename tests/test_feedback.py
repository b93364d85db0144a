"""Ground truth end to end: two versions serve a known split with a biased shadow, feedback comes back for
every request (by file through the CLI and by RPC), and the gateway's quality and fairness figures are
checked against scikit-learn on the same rows. Bad feedback and undeclared attributes get precise errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gateway.protocol import Stub
from gateway.protocol import admin as apb
from gateway.protocol import inference as pb

sklearn = pytest.importorskip("sklearn")
pytest.importorskip("skl2onnx")

from conftest import GatewayProcess  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

MODEL = "breast_cancer"
CONFIG = f"""
[models.{MODEL}]
segments = ["region", "age_band"]
fairness_min_group = 20
max_equal_opportunity_gap = 0.2
[feedback]
check_interval_s = 0.5
"""


TINY_GROUP_CAP = 19  # "90+" stays below fairness_min_group for every version


def _region(x: np.ndarray, median: float) -> np.ndarray:
    return np.where(x[:, 1] > median, "north", "south")


def _build(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """The demo's v1 (logistic regression) and v2 (gradient boosting), and v3: a logistic regression
    trained on data where every positive from the north was relabelled negative, so it misses them."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from gateway.demo import build_demo_repository

    build_demo_repository(directory)
    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target
    north = _region(x, float(np.median(x[:, 1]))) == "north"
    biased = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, np.where(north, 0, y))
    onnx_model = to_onnx(biased, x[:1], options={"zipmap": False}, target_opset=17)
    (directory / MODEL / "3").mkdir()
    (directory / MODEL / "3" / "model.onnx").write_bytes(onnx_model.SerializeToString())
    return x, y


def _infer(stub: Stub, row: np.ndarray, request_id: str, segments: dict[str, str]) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name=MODEL, id=request_id)
    request.inputs.add(name="X", datatype="FP32", shape=[1, row.shape[0]])
    request.raw_input_contents.append(row.tobytes())
    for name, value in segments.items():
        request.parameters[f"segment.{name}"].string_param = value
    response: pb.ModelInferResponse = stub.ModelInfer(request, timeout=10)
    return response


def _outputs(response: pb.ModelInferResponse) -> tuple[int, np.ndarray]:
    by_name = {o.name: raw for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)}
    return int(np.frombuffer(by_name["label"], np.int64)[0]), np.frombuffer(by_name["probabilities"], np.float32)


class Served:
    def __init__(self, gateway: GatewayProcess, x: np.ndarray, y: np.ndarray) -> None:
        self.gateway = gateway
        self.x, self.y = x, y
        self.token = (gateway.state_dir / "admin.token").read_text().strip()
        self.channel = grpc.insecure_channel(gateway.address)
        self.stub = Stub(self.channel)
        self.admin = Stub(self.channel, apb.AdminService)
        self.rows: dict[str, list[tuple[int, int, np.ndarray]]] = {}  # version -> (truth, label, probabilities)
        self.since_ns = self.until_ns = 0

    def call(self, method: str, request: Any) -> Any:
        return getattr(self.admin, method)(request, metadata=[("authorization", f"Bearer {self.token}")], timeout=30)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gateway", *args, "--address", self.gateway.address, "--token", self.token]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repository = tmp_path_factory.mktemp("models")
    x, y = _build(repository)
    gateway = GatewayProcess(repository, CONFIG, tmp_path_factory.mktemp("gateway"))
    try:
        gateway.wait_ready()
        s = Served(gateway, x, y)
        shares = [apb.VersionShare(version="1", bps=5000), apb.VersionShare(version="2", bps=5000)]
        s.call("SetSplit", apb.SetSplitRequest(model=MODEL, split=shares, reason="known split"))
        shadow = [apb.VersionShare(version="3", bps=10000)]
        s.call("SetShadows", apb.SetShadowsRequest(model=MODEL, shadows=shadow, reason="judge the biased one"))
        median = float(np.median(x[:, 1]))
        regions = _region(x, median)
        s.since_ns = time.time_ns()
        tiny_served_by: dict[str, int] = {"1": 0, "2": 0}  # the split is random: tag until both have some
        for i in range(len(x)):
            tiny_group = min(tiny_served_by.values()) < 2 and sum(tiny_served_by.values()) < TINY_GROUP_CAP
            age = "90+" if tiny_group else "18-64" if i % 2 else "65-89"
            response = _infer(s.stub, x[i], f"q-{i}", {"region": str(regions[i]), "age_band": age})
            label, probabilities = _outputs(response)
            s.rows.setdefault(response.model_version, []).append((int(y[i]), label, probabilities))
            if tiny_group:
                tiny_served_by[response.model_version] += 1
        time.sleep(1.0)  # the last shadows finish
        s.until_ns = time.time_ns()
        yield s
        s.channel.close()
    finally:
        assert gateway.stop() == 0, gateway.log


def _feed_everything(s: Served, tmp: Path) -> None:
    """Half the truth as a JSON Lines file through the CLI, half by RPC."""
    half = len(s.x) // 2
    path = tmp / "truth.jsonl"
    path.write_text("".join(json.dumps({"request_id": f"q-{i}", "label": int(s.y[i])}) + "\n" for i in range(half)))
    result = s.cli("feedback", str(path), "--model", MODEL, "--json", "--batch", "100")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["stored"], doc["unknown_ids"], doc["invalid"]) == (half, [], []), doc
    entries = [apb.Feedback(request_id=f"q-{i}", label=int(s.y[i])) for i in range(half, len(s.x))]
    response = s.call("SubmitFeedback", apb.SubmitFeedbackRequest(model=MODEL, entries=entries))
    assert (response.stored, response.overwritten, list(response.unknown_ids)) == (len(entries), 0, [])


def _ece(truth: np.ndarray, score: np.ndarray) -> float:
    edges = np.linspace(0, 1, 11)
    ids = np.searchsorted(edges[1:-1], score)
    return sum(
        (ids == b).sum() / len(score) * abs(truth[ids == b].mean() - score[ids == b].mean())
        for b in range(10)
        if (ids == b).any()
    )


def test_per_version_metrics_equal_sklearn_and_the_biased_shadow_raises_the_alert(
    served: Served, tmp_path: Path
) -> None:
    _feed_everything(served, tmp_path)
    request = apb.GetQualityRequest(model=MODEL, since_ns=served.since_ns, until_ns=served.until_ns)
    report = served.call("GetQuality", request)
    by_key = {(v.version, v.role): v for v in report.versions}
    assert set(by_key) == {("1", "primary"), ("2", "primary"), ("3", "shadow")}, by_key.keys()
    for version in ("1", "2"):
        rows = served.rows[version]
        truth = np.array([r[0] for r in rows])
        label = np.array([r[1] for r in rows])
        probabilities = np.stack([r[2] for r in rows])
        got = by_key[(version, "primary")]
        assert got.labelled == got.requests == len(rows)
        tn, fp, fn, tp = skm.confusion_matrix(truth, label).ravel()
        expected = {
            "accuracy": skm.accuracy_score(truth, label),
            "precision": skm.precision_score(truth, label),
            "recall": skm.recall_score(truth, label),
            "tpr": tp / (tp + fn),
            "fpr": fp / (fp + tn),
            "log_loss": skm.log_loss(truth, probabilities),
            "auroc": skm.roc_auc_score(truth, probabilities[:, 1]),
            "ece": _ece(truth, probabilities[:, 1].astype(np.float64)),
        }
        for name, value in expected.items():
            assert got.metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), (version, name)
        by_attribute = {f.attribute: f for f in got.fairness}
        assert not by_attribute["region"].alerts, (version, by_attribute["region"])
        tiny = {g.group: g for g in by_attribute["age_band"].groups}["90+"]
        assert tiny.too_small and 2 <= tiny.n < TINY_GROUP_CAP and np.isnan(tiny.tpr.value)
    shadow = by_key[("3", "shadow")]
    assert shadow.labelled == shadow.requests == len(served.x)  # judged on every request its primaries answered
    region = {f.attribute: f for f in shadow.fairness}["region"]
    assert region.equal_opportunity_difference > 0.2 and len(region.alerts) == 1
    assert "region: equal opportunity difference" in region.alerts[0]
    groups = {g.group: g for g in region.groups}
    assert groups["north"].tpr.high < groups["south"].tpr.low  # the intervals do not even overlap

    deadline = time.monotonic() + 10
    while "fairness alert" not in served.gateway.log and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"fairness alert: model {MODEL} version 3 (shadow)" in served.gateway.log

    result = served.cli("quality", MODEL, "--since", str(served.since_ns), "--plot", str(tmp_path / "q.png"))
    assert result.returncode == 0, result.stderr
    assert "ALERT region: equal opportunity difference" in result.stdout and "too small" in result.stdout
    assert (tmp_path / "q.png").stat().st_size > 10_000


def test_bad_feedback_gets_precise_errors_and_changes_nothing_else(served: Served, tmp_path: Path) -> None:
    row = served.x[0]
    _infer(served.stub, row, "e-1", {"region": "north"})
    _infer(served.stub, row, "e-2", {})
    before = served.call("GetQuality", apb.GetQualityRequest(model=MODEL)).feedback_records
    entries = [
        apb.Feedback(request_id="e-1", label=1),
        apb.Feedback(request_id="never-logged", label=1),
        apb.Feedback(request_id="e-1", label=0),  # repeats entry 0 in the same batch
        apb.Feedback(request_id="e-2", value=0.7),  # a value for a classifier
        apb.Feedback(request_id="", label=1),
        apb.Feedback(request_id="e-2", label=1, weight=-1.0),  # e-2 again, but the first was invalid
        apb.Feedback(request_id="e-3"),  # no truth at all
    ]
    response = served.call("SubmitFeedback", apb.SubmitFeedbackRequest(model=MODEL, entries=entries))
    assert (response.stored, response.overwritten, list(response.unknown_ids)) == (1, 0, ["never-logged"])
    reasons = {i.index: (i.field, i.reason) for i in response.invalid}
    assert reasons[2] == (
        "entries[2].request_id",
        "entries[2].request_id: 'e-1' repeats entries[0] in this batch; send one truth per request",
    )
    assert reasons[3][0] == "entries[3].value" and "is a classifier" in reasons[3][1]
    assert reasons[4][0] == "entries[4].request_id"
    assert reasons[5] == ("entries[5].weight", "entries[5].weight: -1.0 is not a finite number >= 0")
    assert reasons[6] == ("entries[6]", "entries[6]: neither label nor value is set")
    after = served.call("GetQuality", apb.GetQualityRequest(model=MODEL)).feedback_records
    assert after == before + 1

    again = served.call("SubmitFeedback", apb.SubmitFeedbackRequest(model=MODEL, entries=[entries[2]]))
    assert (again.stored, again.overwritten) == (1, 1)
    assert served.call("GetQuality", apb.GetQualityRequest(model=MODEL)).feedback_records == after

    columns = apb.FeedbackColumns(request_ids=["e-1", "e-2", "e-1", "nope"], labels=[1, 0, 1, 0], weights=[1, -2, 1, 1])
    response = served.call("SubmitFeedback", apb.SubmitFeedbackRequest(model=MODEL, columns=columns))
    assert (response.stored, response.overwritten, list(response.unknown_ids)) == (1, 1, ["nope"])
    assert [(i.index, i.reason) for i in response.invalid] == [
        (1, "columns.weights[1]: -2.0 is not a finite number >= 0"),
        (2, "columns.request_ids[2]: 'e-1' repeats row 0 in this batch; send one truth per request"),
    ]
    with pytest.raises(grpc.RpcError) as refused:  # a classifier's truth as values: the whole batch is refused
        columns = apb.FeedbackColumns(request_ids=["e-1", "e-2"], values=[1.0, 0.0])
        served.call("SubmitFeedback", apb.SubmitFeedbackRequest(model=MODEL, columns=columns))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == (
        f"columns.values: model '{MODEL}' is a classifier: send the true class as integer `labels`"
    )
    with pytest.raises(grpc.RpcError) as refused:
        columns = apb.FeedbackColumns(request_ids=["e-1", "e-2"], labels=[1])
        served.call("SubmitFeedback", apb.SubmitFeedbackRequest(model=MODEL, columns=columns))
    assert "columns.labels: 1 rows for 2 request_ids" in (refused.value.details() or "")
    assert served.call("GetQuality", apb.GetQualityRequest(model=MODEL)).feedback_records == after

    path = tmp_path / "bad.jsonl"
    lines = ['{"request_id": "e-2", "label": "yes"}', "not json", '{"request_id": "e-2", "label": 1, "x": 2}']
    lines.append('{"request_id": "e-2", "label": "²"}')  # isdigit, yet int() refuses it
    path.write_text("\n".join(lines) + "\n")
    result = served.cli("feedback", str(path), "--model", MODEL, "--json")
    doc = json.loads(result.stdout)
    assert doc["sent"] == doc["stored"] == 0
    assert doc["invalid"][0] == f"{path}:1: label: 'yes' is not an integer class (a 64-bit integer)"
    assert doc["invalid"][1].startswith(f"{path}:2: not JSON")
    assert doc["invalid"][2] == f"{path}:3: unknown field 'x' (request_id, label | value, observed_ns, weight)"
    assert doc["invalid"][3] == f"{path}:4: label: '²' is not an integer class (a 64-bit integer)"

    # Found by a review: labels int() misreads or protobuf refuses had no file:line; a spreadsheet's CSV
    # (byte-order mark) was refused whole; blank lines shifted line numbers; extra cells crashed the CLI.
    path = tmp_path / "labels.jsonl"
    path.write_text(
        '{"request_id": "e-2", "label": "--1"}\n' + json.dumps({"request_id": "e-2", "label": 2**70}) + "\n"
    )
    doc = json.loads(served.cli("feedback", str(path), "--model", MODEL, "--json").stdout)
    assert doc["invalid"] == [
        f"{path}:1: label: '--1' is not an integer class (a 64-bit integer)",
        f"{path}:2: label: {2**70} is not an integer class (a 64-bit integer)",
    ]
    path = tmp_path / "sheet.csv"
    path.write_bytes("\ufeffrequest_id,label\r\n\r\ne-2,x\r\n\r\ne-2,1,extra\r\n".encode())
    doc = json.loads(served.cli("feedback", str(path), "--model", MODEL, "--json").stdout)
    assert doc["invalid"] == [
        f"{path}:3: label: 'x' is not an integer class (a 64-bit integer)",
        f"{path}:5: unknown field '<cells beyond the header>' (request_id, label | value, observed_ns, weight)",
    ]
    assert served.call("GetQuality", apb.GetQualityRequest(model=MODEL)).feedback_records == after


def test_undeclared_segment_attribute_is_refused_and_named(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _infer(served.stub, served.x[0], "u-1", {"region": "north", "income": "high"})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters[segment.income]: segment attribute 'income' is not declared" in (refused.value.details() or "")
    records = served.call("GetLogRecords", apb.GetLogRecordsRequest(request_ids=["u-1"])).records
    assert len(records) == 1  # logged as refused, without the undeclared attribute
    import msgpack

    logged = msgpack.unpackb(records[0].msgpack)
    assert logged["status"] == 3 and logged["segments"] is None


def test_quality_plot_marks_a_group_without_true_positives_instead_of_crashing(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from google.protobuf.json_format import MessageToDict

    from gateway.feedback_cli import _quality_text, plot_quality

    response = apb.GetQualityResponse(model=MODEL)
    version = response.versions.add(version="1", role="primary", requests=60, labelled=60)
    region = version.fairness.add(attribute="region")
    for name, positives, tpr in (("north", 10, (0.5, 0.3, 0.7)), ("south", 0, (float("nan"),) * 3)):
        group = region.groups.add(group=name, n=30, positives=positives)
        group.tpr.value, group.tpr.low, group.tpr.high = tpr
        group.positive_rate.value = group.fpr.value = 0.2
    # As `quality` converts the answer: the south group's NaN TPR becomes the string "NaN".
    doc = MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    assert "south  30  0" in _quality_text(doc)
    assert plot_quality(doc, str(tmp_path / "q.png")).stat().st_size > 10_000
