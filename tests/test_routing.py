"""Routing on a live gateway, changed through the admin API: weighted and sticky splits, shadows
that never hurt the primary, atomic changes under load, roles, and persistence across restarts."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess
from models import identity_graph, save_model
from onnx import TensorProto, helper

from gateway.protocol import Stub, admin
from gateway.protocol import inference as pb
from gateway.requestlog.reader import LogReader
from gateway.requestlog.record import decode

CONFIG = '[shadows]\nmax_concurrency = 2\n[models.shadowed]\nexecution = "thread"\n'


@pytest.fixture(scope="module")
def live(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(repository, CONFIG, tmp_path_factory.mktemp("routing"))
    gateway.wait_ready()
    yield gateway
    assert gateway.stop() == 0, gateway.log


def _admin_token(gateway: GatewayProcess) -> str:
    return (gateway.state_dir / "admin.token").read_text().strip()


class Admin:
    def __init__(self, gateway: GatewayProcess, token: str | None = None) -> None:
        self._channel = grpc.insecure_channel(gateway.address)
        self._stub = Stub(self._channel, admin.AdminService)
        self._metadata = [("authorization", f"Bearer {token or _admin_token(gateway)}")]

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return lambda request: method(request, metadata=self._metadata, timeout=10)


def _shares(text: str) -> list[Any]:
    return [admin.VersionShare(version=v, bps=int(b)) for v, b in (p.split("=") for p in text.split())]


def _split(ops: Admin, model: str, text: str, reason: str = "test") -> Any:
    return ops.SetSplit(admin.SetSplitRequest(model=model, split=_shares(text), reason=reason))


def _mlp(request_id: str = "", version: str = "") -> Any:
    request = pb.ModelInferRequest(model_name="mlp", model_version=version, id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 32])
    request.raw_input_contents.append(np.ones((1, 32), dtype=np.float32).tobytes())
    return request


async def _versions(address: str, count: int, metadata: list[tuple[str, str]] | None = None) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = Stub(channel)
        semaphore = asyncio.Semaphore(32)

        async def one() -> str:
            async with semaphore:
                return str((await stub.ModelInfer(_mlp(), metadata=metadata)).model_version)

        return list(await asyncio.gather(*(one() for _ in range(count))))


def test_weighted_split_lands_near_its_weights(live: GatewayProcess) -> None:
    ops = Admin(live)
    _split(ops, "mlp", "1=9000 2=1000")
    n = 6000
    counts = Counter(asyncio.run(_versions(live.address, n)))
    sigma = math.sqrt(n * 0.1 * 0.9)
    # 4 sigma: the server's draws are not seeded, and a 0.3% false alarm per CI run is too many.
    # (tests/test_router_bucketing.py checks the 3-sigma bound on 20,000 seeded draws.)
    assert abs(counts["2"] - n * 0.1) < 4 * sigma, counts
    assert counts["1"] + counts["2"] == n


def test_sticky_keys_stay_on_their_version(live: GatewayProcess) -> None:
    ops = Admin(live)
    _split(ops, "mlp", "1=5000 2=5000")
    ops.SetSticky(admin.SetStickyRequest(model="mlp", sticky_key="x-user-id", reason="sticky test"))
    seen: dict[str, set[str]] = {}
    for user in range(40):
        versions = asyncio.run(_versions(live.address, 5, [("x-user-id", f"user-{user}")]))
        seen[f"user-{user}"] = set(versions)
    assert all(len(v) == 1 for v in seen.values()), seen
    assert {v for vs in seen.values() for v in vs} == {"1", "2"}  # 40 keys at 50/50 use both
    ops.SetSticky(admin.SetStickyRequest(model="mlp", sticky_key="", reason="end of sticky test"))


def test_slow_or_failing_shadows_never_touch_the_primary(live: GatewayProcess) -> None:
    ops = Admin(live)
    _split(ops, "shadowed", "1=10000")
    ops.SetShadows(admin.SetShadowsRequest(model="shadowed", shadows=_shares("2=10000 3=10000"), reason="shadow test"))

    async def burst() -> list[Any]:
        async with grpc.aio.insecure_channel(live.address) as channel:
            stub = Stub(channel)
            calls = []
            for i in range(60):
                request = pb.ModelInferRequest(model_name="shadowed", id=f"shadow-{i}")
                request.inputs.add(name="x", datatype="FP32", shape=[1, 64])
                # Values of 5 and more make version 3 fail (see models.failing_graph).
                request.raw_input_contents.append(np.full((1, 64), 5 + i, dtype=np.float32).tobytes())
                calls.append(stub.ModelInfer(request, timeout=30))
            return await asyncio.gather(*calls, return_exceptions=True)

    responses = asyncio.run(burst())
    for i, response in enumerate(responses):
        assert not isinstance(response, BaseException), response
        assert response.model_version == "1"
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], dtype=np.float32), 5 + i)
    deadline = time.monotonic() + 30  # let the admitted shadows finish
    while True:
        stats = {s.shadow_version: s for s in ops.Agreement(admin.AgreementRequest(model="shadowed")).stats}
        settled = all(s.compared + s.failed + s.shed == 60 for s in stats.values())
        if (settled and len(stats) == 2) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert stats["2"].shed + stats["3"].shed > 0  # concurrency 2 cannot take 120 shadow calls at once
    assert stats["3"].failed > 0 and stats["3"].agreed == 0
    assert stats["2"].compared + stats["2"].shed == 60
    reader = LogReader(live.state_dir / "log")
    linked = [r for r in reader.get("shadow-0") if r.role == "shadow"] + [
        r for i in range(60) for r in reader.get(f"shadow-{i}") if r.role == "shadow"
    ]
    assert linked and all(r.primary_id and r.primary_id.startswith("shadow-") for r in linked)
    ops.SetShadows(admin.SetShadowsRequest(model="shadowed", shadows=[], reason="end of shadow test"))


@contextmanager
def _shadowed_by_2_and_3(tmp_path: Path, v2: Any, config: str) -> Iterator[tuple[GatewayProcess, Admin]]:
    """Model m: v1 (FP32 identity) takes all traffic, v2 (`v2`) and v3 (FP64 identity) shadow all of it."""
    repo = tmp_path / "models"
    save_model(repo, "m", "1", identity_graph("FP32"))
    save_model(repo, "m", "2", v2)
    save_model(repo, "m", "3", identity_graph("FP64"))
    gateway = GatewayProcess(repo, config, tmp_path)
    try:
        gateway.wait_ready()
        ops = Admin(gateway)
        _split(ops, "m", "1=10000")
        ops.SetShadows(admin.SetShadowsRequest(model="m", shadows=_shares("2=10000 3=10000"), reason="test"))
        yield gateway, ops
    finally:
        assert gateway.stop() == 0, gateway.log


def _settled_shadows(ops: Admin, settled: Callable[[Any], bool]) -> dict[str, Any]:
    """Agreement stats by shadow version once both shadows' calls all settled (they run after the answers)."""
    deadline = time.monotonic() + 20
    while True:
        stats = {s.shadow_version: s for s in ops.Agreement(admin.AgreementRequest(model="m")).stats}
        if len(stats) == 2 and all(settled(s) for s in stats.values()):
            return stats
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)


def test_a_shadow_of_another_signature_fails_in_its_record_and_nothing_hangs(tmp_path: Path) -> None:
    """Versions loaded at startup are not signature-checked: v2 names its input `input`, v3 takes FP64. Their
    shadows fail (FAILED_PRECONDITION naming the input) while v2's own pinned traffic, batched on the same
    thread, is answered; every shadow settles and the gateway stops on SIGTERM."""
    renamed = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["y"])],
        "renamed",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    config = '[shadows]\nmax_concurrency = 64\n[models.m]\nexecution = "thread"\n'
    with _shadowed_by_2_and_3(tmp_path, renamed, config) as (gateway, ops):
        x = np.ones((1, 4), dtype=np.float32).tobytes()

        def request(i: int, pinned: bool) -> Any:
            r = pb.ModelInferRequest(model_name="m", model_version="2" if pinned else "", id=f"sig-{i}-{pinned}")
            r.inputs.add(name="input" if pinned else "x", datatype="FP32", shape=[1, 4])
            r.raw_input_contents.append(x)
            return r

        async def burst() -> list[Any]:
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                stub = Stub(channel)
                calls = [stub.ModelInfer(request(i, pinned), timeout=10) for i in range(40) for pinned in (0, 1)]
                return await asyncio.gather(*calls, return_exceptions=True)

        responses = asyncio.run(burst())
        assert all(not isinstance(r, BaseException) for r in responses), responses
        stats = _settled_shadows(ops, lambda s: s.failed + s.shed == 40)
        assert stats["2"].failed > 0 and stats["3"].failed > 0 and stats["2"].compared == stats["3"].compared == 0
        reader = LogReader(gateway.state_dir / "log")
        shadows = [r for i in range(40) for r in reader.get(f"sig-{i}-0") if r.role == "shadow"]
        reader.close()
        expected = {"2": "missing input 'input'", "3": "inputs[x].datatype: FP32 does not match the model's FP64"}
        assert shadows
        for record in shadows:
            assert record.status == grpc.StatusCode.FAILED_PRECONDITION.value[0], record
            assert expected[record.version] in record.message and "does not take the primary's" in record.message


def test_shadow_calls_count_in_the_shadow_versions_triton_statistics(tmp_path: Path) -> None:
    """Every shadow call of v2 is a success in its ModelStatistics (success.count == queue.count, as
    perf_analyzer requires); v3 cannot take the primary's FP32 input, so each of its calls is a failure."""
    with _shadowed_by_2_and_3(tmp_path, identity_graph("FP32"), "[shadows]\nmax_concurrency = 64\n") as (gateway, ops):
        with grpc.insecure_channel(gateway.address) as channel:
            stub = Stub(channel)
            for i in range(10):
                request = pb.ModelInferRequest(model_name="m", id=f"stats-{i}")
                request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
                request.raw_input_contents.append(np.ones((2, 4), dtype=np.float32).tobytes())
                stub.ModelInfer(request, timeout=10)
            stats = _settled_shadows(ops, lambda s: s.compared + s.failed + s.shed == 10)
            assert stats["2"].compared == 10 and stats["3"].failed == 10
            by_version = {m.version: m for m in stub.ModelStatistics(pb.ModelStatisticsRequest(name="m")).model_stats}
        v2, v3 = by_version["2"], by_version["3"]
        assert v2.inference_stats.success.count == v2.inference_stats.queue.count == 10
        assert v2.inference_count == 20 and v2.inference_stats.fail.count == 0  # 2 rows a call
        assert v3.inference_stats.fail.count == 10 and v3.inference_stats.success.count == v3.inference_count == 0


def test_fifty_changes_under_load_fail_nothing_and_never_mix(live: GatewayProcess) -> None:
    ops = Admin(live)
    _split(ops, "mlp", "1=10000")
    changes: list[tuple[float, float, str]] = []  # (started, finished, version taking all traffic)
    answers: list[tuple[float, float, str]] = []  # (sent, received, version that answered)
    errors: list[BaseException] = []

    async def load(stop: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(live.address) as channel:
            stub = Stub(channel)

            async def worker() -> None:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        response = await stub.ModelInfer(_mlp(), timeout=10)
                    except grpc.aio.AioRpcError as e:
                        errors.append(e)
                        continue
                    answers.append((sent, time.monotonic(), response.model_version))

            await asyncio.gather(*(worker() for _ in range(8)))

    async def run() -> None:
        stop = asyncio.Event()
        traffic = asyncio.ensure_future(load(stop))
        for i in range(50):
            version = "2" if i % 2 == 0 else "1"
            started = time.monotonic()
            await asyncio.to_thread(_split, ops, "mlp", f"{version}=10000", f"flip {i}")
            changes.append((started, time.monotonic(), version))
            await asyncio.sleep(0.02)
        stop.set()
        await traffic

    asyncio.run(run())
    assert errors == []
    assert len(answers) > 100
    checked = 0
    for sent, received, version in answers:
        # A request sent after change k finished and answered before change k+1 started saw table k.
        for k, (_, finished, expected) in enumerate(changes):
            next_start = changes[k + 1][0] if k + 1 < len(changes) else math.inf
            if finished < sent and received < next_start:
                assert version == expected
                checked += 1
    assert checked > 0


def test_roles_and_refused_changes_leave_everything_unchanged(live: GatewayProcess) -> None:
    ops = Admin(live)
    _split(ops, "mlp", "1=8000 2=2000", reason="baseline")
    viewer_token = ops.CreateToken(admin.CreateTokenRequest(role="viewer", name="test-viewer")).token
    viewer = Admin(live, viewer_token)
    assert viewer.WhoAmI(admin.WhoAmIRequest()).role == "viewer"
    assert len(viewer.GetRoutes(admin.GetRoutesRequest(model="mlp")).routes) == 1
    before = ops.GetRoutes(admin.GetRoutesRequest(model="mlp"))
    history = ops.History(admin.HistoryRequest(model="mlp")).entries
    for caller, request, code in [
        (viewer, "1=5000 2=5000", grpc.StatusCode.PERMISSION_DENIED),
        (Admin(live, "cgw_not-a-token"), "1=5000 2=5000", grpc.StatusCode.UNAUTHENTICATED),
        (ops, "1=5000 2=4000", grpc.StatusCode.INVALID_ARGUMENT),
        (ops, "1=5000 7=5000", grpc.StatusCode.FAILED_PRECONDITION),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            _split(caller, "mlp", request)
        assert error.value.code() == code, error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        _split(ops, "mlp", "1=5000 2=5000", reason=" ")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        viewer.CreateToken(admin.CreateTokenRequest(role="admin", name="escalate"))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert ops.GetRoutes(admin.GetRoutesRequest(model="mlp")) == before
    assert ops.History(admin.HistoryRequest(model="mlp")).entries == history
    assert history[-1].who == "bootstrap-admin" and history[-1].why == "baseline"
    with pytest.raises(grpc.RpcError) as error:  # no lock-out: the last admin token stays
        ops.RevokeToken(admin.RevokeTokenRequest(name="bootstrap-admin"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as error:
        ops.History(admin.HistoryRequest(model="nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "model: unknown model 'nope'" in error.value.details()


def test_pinning_policy_and_override_header(live: GatewayProcess) -> None:
    ops = Admin(live)
    _split(ops, "mlp", "1=10000")
    ops.SetPinPolicy(admin.SetPinPolicyRequest(model="mlp", allow_pinning=False, reason="no pinning"))
    with grpc.insecure_channel(live.address) as channel:
        stub = Stub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(_mlp(version="2"))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        operator = [("authorization", f"Bearer {_admin_token(live)}"), ("x-route-version", "2")]
        assert stub.ModelInfer(_mlp(), metadata=operator).model_version == "2"
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(_mlp(), metadata=[("x-route-version", "2")])
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ops.SetPinPolicy(admin.SetPinPolicyRequest(model="mlp", allow_pinning=True, reason="pinning back"))


def test_routes_and_history_survive_a_restart(repository: Path, tmp_path: Path) -> None:
    gateway = GatewayProcess(repository, None, tmp_path)
    gateway.wait_ready()
    ops = Admin(gateway)
    _split(ops, "mlp", "1=7500 2=2500", reason="before restart")
    ops.Promote(admin.PromoteRequest(model="mlp", version="2", reason="promote"))
    ops.Rollback(admin.RollbackRequest(model="mlp", reason="roll back"))
    assert gateway.stop() == 0
    restarted = GatewayProcess(repository, None, tmp_path)
    try:
        restarted.wait_ready()
        ops = Admin(restarted)
        [route] = ops.GetRoutes(admin.GetRoutesRequest(model="mlp")).routes
        assert [(s.version, s.bps) for s in route.split] == [("1", 7500), ("2", 2500)]
        actions = [e.action for e in ops.History(admin.HistoryRequest(model="mlp")).entries]
        assert actions == ["split", "promote", "rollback"]
    finally:
        assert restarted.stop() == 0


def test_admin_api_reads_the_request_log(live: GatewayProcess) -> None:
    ops = Admin(live)
    with grpc.insecure_channel(live.address) as channel:
        Stub(channel).ModelInfer(_mlp("admin-log-1"))
    response = ops.GetLogRecords(admin.GetLogRecordsRequest(request_ids=["admin-log-1", "never-sent"]))
    [record] = [decode(r.msgpack) for r in response.records]
    assert (record.id, record.model, record.status) == ("admin-log-1", "mlp", 0)
    assert list(response.unknown_ids) == ["never-sent"]
    stream = Stub(ops._channel, admin.AdminService).QueryLog(
        admin.QueryLogRequest(model="mlp", status=0, limit=5), metadata=ops._metadata
    )
    records = [decode(r.msgpack) for r in stream]
    assert 0 < len(records) <= 5 and all(r.model == "mlp" and r.status == 0 for r in records)
    viewer_denied = Stub(grpc.insecure_channel(live.address), admin.AdminService)
    with pytest.raises(grpc.RpcError) as error:
        viewer_denied.GetLogRecords(admin.GetLogRecordsRequest(request_ids=["admin-log-1"]))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_admin_api_on_its_own_port(repository: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        admin_port = s.getsockname()[1]
    gateway = GatewayProcess(repository, f"[admin]\nport = {admin_port}\n", tmp_path)
    try:
        gateway.wait_ready()
        token = [("authorization", f"Bearer {_admin_token(gateway)}")]
        with grpc.insecure_channel(f"127.0.0.1:{admin_port}") as channel:
            assert Stub(channel, admin.AdminService).WhoAmI(admin.WhoAmIRequest(), metadata=token).role == "admin"
        with grpc.insecure_channel(gateway.address) as channel:
            with pytest.raises(grpc.RpcError) as error:
                Stub(channel, admin.AdminService).WhoAmI(admin.WhoAmIRequest(), metadata=token)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert Stub(channel).ModelInfer(_mlp()).model_version == "2"
    finally:
        assert gateway.stop() == 0
