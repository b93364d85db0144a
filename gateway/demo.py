"""`canary-gateway demo`: two real model versions trained on data that ships with scikit-learn,
served by a real gateway process, with real traffic and a summary of what happened.

v1 is a logistic regression and v2 gradient boosting, both on the breast-cancer data set and
converted with skl2onnx. Needs the `demo` extra (scikit-learn, skl2onnx).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from gateway.protocol import Stub, admin
from gateway.protocol import inference as pb

MODEL_NAME = "breast_cancer"


def build_demo_repository(directory: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Train and write v1 and v2; return held-out (features, labels) for traffic."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from gateway.ood.profile import PROFILE_FILE, build_profile, save_profile

    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target
    feature_names = tuple(name.replace(" ", "_") for name in data.feature_names)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    candidates = {
        "1": ("logistic regression", make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))),
        "2": ("gradient boosting", GradientBoostingClassifier(random_state=0)),
    }
    for version, (kind, estimator) in candidates.items():
        estimator.fit(x_train, y_train)
        onnx_model = to_onnx(estimator, x_train[:1], options={"zipmap": False}, target_opset=17)
        path = Path(directory) / MODEL_NAME / version
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.onnx").write_bytes(onnx_model.SerializeToString())
        save_profile(build_profile(x_train, feature_names=feature_names), path / PROFILE_FILE)
        accuracy = float((estimator.predict(x_test) == y_test).mean())
        (path / "model.toml").write_text(
            "[provenance]\n"
            f'model = "{kind}"\n'
            'data = "sklearn.datasets.load_breast_cancer, 70% stratified split, random_state=0"\n'
            'training_code = "gateway/demo.py"\n'
            'owner = "demo"\n'
            f"[metrics]\ntest_accuracy = {accuracy:.4f}\n"
        )
        print(f"  built {MODEL_NAME} v{version}: {kind}, held-out accuracy {accuracy:.3f}, OOD profile -> {path}")
    return x_test, y_test


def _wait_ready(stub: Stub, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"gateway exited with code {process.returncode} before it was ready")
        try:
            if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit("gateway did not become ready within 60 s")


def _infer(
    stub: Stub, row: np.ndarray, version: str, request_id: str, user: str | None = None
) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name=MODEL_NAME, model_version=version, id=request_id)
    request.inputs.add(name="X", datatype="FP32", shape=[1, row.shape[0]])
    request.raw_input_contents.append(row.astype(np.float32).tobytes())
    metadata = [("x-user-id", user)] if user else None
    response: pb.ModelInferResponse = stub.ModelInfer(request, timeout=10, metadata=metadata)
    return response


def _canary(channel: grpc.Channel, stub: Stub, state_dir: str, x_test: np.ndarray) -> None:
    """Route 90/10 sticky by user, shadow v2 on v1's traffic, send traffic, show what happened."""
    token = (Path(state_dir) / "admin.token").read_text().strip()
    ops = Stub(channel, admin.AdminService)
    auth = [("authorization", f"Bearer {token}")]

    def shares(*pairs: tuple[str, int]) -> list[object]:
        return [admin.VersionShare(version=v, bps=bps) for v, bps in pairs]

    ops.SetSplit(
        admin.SetSplitRequest(model=MODEL_NAME, split=shares(("1", 9000), ("2", 1000)), reason="demo: v2 canary"),
        metadata=auth,
    )
    ops.SetSticky(admin.SetStickyRequest(model=MODEL_NAME, sticky_key="x-user-id", reason="demo"), metadata=auth)
    ops.SetShadows(
        admin.SetShadowsRequest(model=MODEL_NAME, shadows=shares(("2", 10000)), reason="demo: compare v2"),
        metadata=auth,
    )
    print("5. operator: split 1=90% 2=10% sticky by x-user-id, shadow v2 on all traffic (admin API, admin token)")
    answered: collections.Counter[str] = collections.Counter()
    users: dict[str, set[str]] = collections.defaultdict(set)
    for i in range(300):
        user = f"user-{i % 60}"
        version = _infer(stub, x_test[i % len(x_test)], "", f"canary-{i}", user).model_version
        answered[version] += 1
        users[user].add(version)
    sticky = all(len(v) == 1 for v in users.values())
    print(f"   300 requests from 60 users: {dict(sorted(answered.items()))}; each user always on one version: {sticky}")
    time.sleep(0.5)  # let the last shadows finish
    for stat in ops.Agreement(admin.AgreementRequest(model=MODEL_NAME), metadata=auth).stats:
        print(
            f"   shadow v{stat.shadow_version} vs primary v{stat.primary_version}: {stat.agreed}/{stat.compared} "
            f"labels agree ({stat.rate:.1%}), {stat.shed} shed, {stat.failed} failed"
        )
    ops.Rollback(admin.RollbackRequest(model=MODEL_NAME, reason="demo: stop shadowing"), metadata=auth)
    history = ops.History(admin.HistoryRequest(model=MODEL_NAME, limit=4), metadata=auth).entries
    print(
        "   change log (canary-gateway routes history): " + "; ".join(f"{e.who} {e.action}: {e.why}" for e in history)
    )


def _out_of_distribution(stub: Stub, x_test: np.ndarray) -> None:
    """Held-out rows pass; the same rows in the wrong units (x 3) are flagged, with the features why."""
    rows = x_test[:20]
    flags = {"held-out": 0, "scaled x3": 0}
    example = ""
    for kind, batch in (("held-out", rows), ("scaled x3", rows * 3)):
        for i, row in enumerate(batch):
            response = _infer(stub, row, "1", f"ood-{kind.replace(' ', '')}-{i}")
            flagged = response.parameters["ood"].bool_param
            flags[kind] += flagged
            if flagged and not example:
                score = response.parameters["ood_score"].double_param
                example = f"ood_score {score:.1f}, ood_features {response.parameters['ood_features'].string_param}"
    print(
        f"6. out-of-distribution scoring: {flags['held-out']}/20 held-out rows flagged, "
        f"{flags['scaled x3']}/20 rows in the wrong units (x 3) flagged; e.g. {example}"
    )


def run_demo(directory: str, port: int, requests: int, state_dir: str) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # interleave with the server log
    print(f"1. building the demo model repository in {directory}/")
    x_test, y_test = build_demo_repository(directory)
    serve = ["serve", "--model-repository", directory, "--port", str(port), "--state-dir", state_dir]
    print(f"2. starting the gateway: canary-gateway {' '.join(serve)}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "gateway", *serve], env=env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = Stub(channel)
            _wait_ready(stub, process)
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME))
            print(
                f"3. ready; {MODEL_NAME} versions {list(metadata.versions)}, input {metadata.inputs[0].name} "
                f"{metadata.inputs[0].datatype} {list(metadata.inputs[0].shape)}"
            )
            print(f"4. sending {requests} requests, alternating explicit versions 1 and 2 and the default")
            answered: collections.Counter[str] = collections.Counter()
            correct: collections.Counter[str] = collections.Counter()
            start = time.perf_counter()
            for i in range(requests):
                row = x_test[i % len(x_test)]
                response = _infer(stub, row, ("1", "2", "")[i % 3], f"demo-{i}")
                label = int(np.frombuffer(response.raw_output_contents[0], dtype=np.int64)[0])
                answered[response.model_version] += 1
                correct[response.model_version] += int(label == y_test[i % len(y_test)])
            elapsed = time.perf_counter() - start
            for version in sorted(answered):
                print(
                    f"   version {version}: {answered[version]} answers, "
                    f"{correct[version] / answered[version]:.1%} correct"
                )
            print(f"   {requests} sequential requests in {elapsed:.2f}s ({requests / elapsed:.0f}/s)")
            _canary(channel, stub, state_dir, x_test)
            _out_of_distribution(stub, x_test)
            try:
                _infer(stub, x_test[0][:5], "1", "demo-bad")
            except grpc.RpcError as e:
                print(f"7. a malformed request is refused (and logged): {e.code().name}: {e.details()}")
    finally:
        print("8. stopping the gateway with SIGTERM (graceful drain)")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    print(f"   gateway exited with code {code}")
    print(f"9. every request is in the request log: canary-gateway log --state-dir {state_dir} get canary-0")
    return code
