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

from gateway.protocol import Stub
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

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
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
        accuracy = float((estimator.predict(x_test) == y_test).mean())
        (path / "model.toml").write_text(
            "[provenance]\n"
            f'model = "{kind}"\n'
            'data = "sklearn.datasets.load_breast_cancer, 70% stratified split, random_state=0"\n'
            'training_code = "gateway/demo.py"\n'
            'owner = "demo"\n'
            f"[metrics]\ntest_accuracy = {accuracy:.4f}\n"
        )
        print(f"  built {MODEL_NAME} v{version}: {kind}, held-out accuracy {accuracy:.3f} -> {path}")
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


def _infer(stub: Stub, row: np.ndarray, version: str, request_id: str) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name=MODEL_NAME, model_version=version, id=request_id)
    request.inputs.add(name="X", datatype="FP32", shape=[1, row.shape[0]])
    request.raw_input_contents.append(row.astype(np.float32).tobytes())
    response: pb.ModelInferResponse = stub.ModelInfer(request, timeout=10)
    return response


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
            try:
                _infer(stub, x_test[0][:5], "1", "demo-bad")
            except grpc.RpcError as e:
                print(f"5. a malformed request is refused: {e.code().name}: {e.details()}")
    finally:
        print("6. stopping the gateway with SIGTERM (graceful drain)")
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    print(f"   gateway exited with code {code}")
    print(f"7. every request is in the request log: canary-gateway log --state-dir {state_dir} get demo-0")
    return code
