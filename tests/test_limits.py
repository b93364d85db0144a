"""Deadlines and limits on a real gateway: a request whose deadline passes while it waits is not run,
per-version in-flight and queue bounds and tensor size limits refuse what is beyond them, callers are
rate limited one by one, every refusal is logged and counted, and under overload the gateway sheds
instead of letting latency grow, stays healthy and recovers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from models import heavy_graph, identity_graph, save_model
from test_admin_cli import as_json

from gateway.auth import TokenStore
from gateway.config import from_dict
from gateway.errors import ConfigError
from gateway.protocol import Stub
from gateway.protocol import inference as pb
from gateway.ratelimit import RateLimiter
from gateway.requestlog.reader import LogReader
from gateway.servicer import RETRY_PUSHBACK_KEY

DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
WIDTH = 64  # heavy_graph's input width

CONFIG = """
[auth]
rate_limit_per_s = 1.0
rate_limit_burst = 3

[models.slow]               # 64-row batches of milliseconds each, queue unbounded: requests wait
execution = "thread"
max_queue = 0

[models.in_flight]          # one row per run; at most 4 requests admitted
execution = "thread"
max_batch_size = 1
max_queue = 0
max_in_flight = 4

[models.queued]             # one row per run; at most 2 requests waiting
execution = "thread"
max_batch_size = 1
max_queue = 2

[models.sized]
max_tensor_rank = 2
max_tensor_elements = 64

[models.overloaded]         # the default bounds (max_queue: twice max_batch_size)
execution = "thread"
max_batch_size = 2
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    repo = tmp_path_factory.mktemp("limit-models")
    for name in ("slow", "in_flight", "queued", "overloaded"):
        save_model(repo, name, "1", heavy_graph())
    save_model(repo, "sized", "1", identity_graph("FP32"))
    process = GatewayProcess(repo, CONFIG, tmp_path_factory.mktemp("limit-gateway"))
    process.wait_ready()
    yield process
    assert process.stop() == 0, process.log


def _request(model: str, request_id: str, rows: int = 1, shape: list[int] | None = None) -> Any:
    shape = shape or [rows, WIDTH]
    x = np.ones(shape, dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def _statistics(gateway: GatewayProcess, model: str) -> Any:
    with grpc.insecure_channel(gateway.address) as channel:
        return Stub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model, version="1")).model_stats[0]


def _records(gateway: GatewayProcess, request_id: str, timeout: float = 10.0) -> list[Any]:
    """The log records of `request_id`, waiting for one to appear (refusals may be logged late)."""
    reader = LogReader(gateway.state_dir / "log")
    deadline = time.monotonic() + timeout
    while True:
        found = reader.get(request_id)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


async def _send_all(gateway: GatewayProcess, requests: list[Any], **call: Any) -> list[Any]:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = Stub(channel)
        return await asyncio.gather(*(stub.ModelInfer(r, **call) for r in requests), return_exceptions=True)


def _status_code(outcome: Any) -> grpc.StatusCode:
    return outcome.code() if isinstance(outcome, grpc.aio.AioRpcError) else grpc.StatusCode.OK


def _call_once_the_token_is_known(stub: Any, request: Any, metadata: list[tuple[str, str]]) -> None:
    """Send `request` until its new token is accepted: the gateway re-reads the tokens file every second."""
    deadline = time.monotonic() + 10
    while True:
        try:
            stub.ModelInfer(request, metadata=metadata)
            return
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
            time.sleep(0.2)


def test_a_request_whose_deadline_passes_in_the_queue_is_not_run_and_is_logged(gateway: GatewayProcess) -> None:
    before = _statistics(gateway, "slow")

    async def scenario() -> list[Any]:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = Stub(channel)
            # Full 64-row batches, run one after another on the model's thread: ~200 ms of queue. The late
            # request has 80 ms: time to reach the gateway even on a loaded machine (a request that never
            # reaches it cannot be logged), not enough to get through the queue.
            blockers = [asyncio.ensure_future(stub.ModelInfer(_request("slow", f"block-{i}", 64))) for i in range(16)]
            await asyncio.sleep(0.02)
            late = stub.ModelInfer(_request("slow", "late-1"), timeout=0.08)
            return await asyncio.gather(late, *blockers, return_exceptions=True)

    late, *blockers = asyncio.run(scenario())
    assert _status_code(late) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(_status_code(b) == grpc.StatusCode.OK for b in blockers), blockers
    (record,) = _records(gateway, "late-1")
    assert record.status == DEADLINE_EXCEEDED and "deadline" in record.message, record.message
    after = _statistics(gateway, "slow")
    # Only the blockers went through the model: the late request was dropped from the queue.
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == len(blockers)
    assert after.inference_count - before.inference_count == 64 * len(blockers)


def test_a_streams_deadline_applies_to_each_of_its_requests(gateway: GatewayProcess) -> None:
    before = _statistics(gateway, "slow")

    async def scenario() -> tuple[grpc.StatusCode, list[Any]]:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = Stub(channel)
            # ~24 runs of milliseconds each queued ahead: far more than the stream's 50 ms, on any host
            blockers = [asyncio.ensure_future(stub.ModelInfer(_request("slow", f"sblock-{i}", 64))) for i in range(24)]
            await asyncio.sleep(0.02)
            stream = stub.ModelStreamInfer(iter([_request("slow", f"stream-late-{i}") for i in range(3)]), timeout=0.05)
            code = grpc.StatusCode.OK
            try:
                async for reply in stream:
                    assert reply.error_message.startswith("DEADLINE_EXCEEDED"), reply.error_message
            except grpc.aio.AioRpcError as e:
                code = e.code()
            return code, await asyncio.gather(*blockers, return_exceptions=True)

    code, blockers = asyncio.run(scenario())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(_status_code(b) == grpc.StatusCode.OK for b in blockers), blockers
    # A request the gateway had not read off the stream by the deadline never reached it: no record.
    records = [r for i in range(3) for r in _records(gateway, f"stream-late-{i}", timeout=2.0 if i else 10.0)]
    assert records and all(r.status == DEADLINE_EXCEEDED and "not run" in r.message for r in records), records
    after = _statistics(gateway, "slow")
    assert after.inference_stats.queue.count - before.inference_stats.queue.count == len(blockers)


@pytest.mark.parametrize(
    ("model", "limit", "at_least_admitted"), [("in_flight", "max_in_flight", 4), ("queued", "max_queue", 3)]
)
def test_requests_beyond_a_versions_bound_are_refused_and_the_rest_answered(
    gateway: GatewayProcess, model: str, limit: str, at_least_admitted: int
) -> None:
    ids = [f"{limit}-{i}" for i in range(24)]
    outcomes = asyncio.run(_send_all(gateway, [_request(model, i) for i in ids]))
    codes = [_status_code(o) for o in outcomes]
    refused = [o for o in outcomes if _status_code(o) == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert codes.count(grpc.StatusCode.OK) >= at_least_admitted
    assert refused and codes.count(grpc.StatusCode.OK) + len(refused) == len(ids), codes
    assert f"model '{model}' version '1': {limit} reached" in refused[0].details()
    for refusal in refused:  # a client with a gRPC retry policy waits about one run before retrying
        pushback = dict(refusal.trailing_metadata())[RETRY_PUSHBACK_KEY]
        assert pushback.isdigit() and 1 <= int(pushback) < 1000, pushback
    for request_id, code in zip(ids, codes, strict=True):
        (record,) = _records(gateway, request_id)
        assert record.status == code.value[0]
    (status,) = as_json(gateway, "status", model)["models"]
    assert status["refused"][limit] >= len(refused)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([1, 1, 4], "inputs[x].shape: rank 3 exceeds max_tensor_rank 2 of model 'sized'"),
        ([32, 4], "inputs[x].shape: [32, 4] has 128 elements, more than max_tensor_elements 64 of model 'sized'"),
    ],
)
def test_tensor_rank_and_element_limits(gateway: GatewayProcess, shape: list[int], message: str) -> None:
    request_id = f"sized-{len(shape)}-{shape[0]}"
    with grpc.insecure_channel(gateway.address) as channel:
        stub = Stub(channel)
        assert stub.ModelInfer(_request("sized", "sized-ok", shape=[16, 4])).model_name == "sized"
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(_request("sized", request_id, shape=shape))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == message
    (record,) = _records(gateway, request_id)
    assert record.status == INVALID_ARGUMENT and record.message == message


def test_rate_limits_are_per_caller(gateway: GatewayProcess) -> None:
    tokens = TokenStore(gateway.state_dir / "tokens.json")
    alice, bob = tokens.create("viewer", "alice"), tokens.create("viewer", "bob")
    with grpc.insecure_channel(gateway.address) as channel:
        stub = Stub(channel)
        _call_once_the_token_is_known(
            stub, _request("sized", "bob-0", shape=[1, 4]), [("authorization", f"Bearer {bob}")]
        )
        outcomes: list[grpc.StatusCode] = []
        refusal, pushback = "", ""
        for i in range(8):  # burst 3 at 1 request/s: most of these are refused
            try:
                stub.ModelInfer(
                    _request("sized", f"alice-{i}", shape=[1, 4]), metadata=[("authorization", f"Bearer {alice}")]
                )
                outcomes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                outcomes.append(e.code())
                refusal = e.details()
                pushback = dict(e.trailing_metadata())[RETRY_PUSHBACK_KEY]
        bob_more = stub.ModelInfer(
            _request("sized", "bob-1", shape=[1, 4]), metadata=[("authorization", f"Bearer {bob}")]
        )
        anonymous = [stub.ModelInfer(_request("sized", f"anon-{i}", shape=[1, 4])) for i in range(8)]
    assert outcomes[:3] == [grpc.StatusCode.OK] * 3
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 4, outcomes
    assert refusal == "caller 'alice' is over its rate limit of 1 requests/s (burst 3); try again later"
    assert pushback.isdigit() and 1 <= int(pushback) <= 1000, pushback  # the next token, at 1 request/s
    assert bob_more.model_name == "sized" and len(anonymous) == 8  # others are not limited by alice's rate
    (record,) = _records(gateway, "alice-7")
    assert record.caller == "alice" and record.status in (0, RESOURCE_EXHAUSTED)
    (status,) = as_json(gateway, "status", "sized")["models"]
    assert status["refused"]["rate_limit"] >= 4


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _drive(address: str, prefix: str, callers: int, seconds: float) -> tuple[list[float], list[str], int]:
    """Closed-loop callers for `seconds`; a refused caller backs off 5 ms, as a polite client does.
    Returns admitted latencies, every request id sent and the number refused."""
    latencies: list[float] = []
    sent: list[str] = []
    refused = 0

    async def caller(stub: Stub, n: int) -> None:
        nonlocal refused
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            request_id = f"{prefix}-{n}-{i}"
            i += 1
            sent.append(request_id)
            start = time.perf_counter()
            try:
                await stub.ModelInfer(_request("overloaded", request_id), timeout=30)
                latencies.append(time.perf_counter() - start)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                refused += 1
                await asyncio.sleep(0.005)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = Stub(channel)
        await asyncio.gather(*(caller(stub, n) for n in range(callers)))
    return latencies, sent, refused


def test_overload_sheds_keeps_admitted_latency_bounded_stays_healthy_and_recovers(gateway: GatewayProcess) -> None:
    unloaded, _, unloaded_refused = asyncio.run(_drive(gateway.address, "calm", callers=1, seconds=1.0))
    assert unloaded_refused == 0
    health_answers: list[int] = []

    async def overload() -> tuple[list[float], list[str], int]:
        async def watch_health() -> None:
            async with grpc.aio.insecure_channel(gateway.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                while True:
                    answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    health_answers.append(answer.status)
                    await asyncio.sleep(0.1)

        watcher = asyncio.ensure_future(watch_health())
        try:
            return await _drive(gateway.address, "storm", callers=48, seconds=3.0)
        finally:
            watcher.cancel()

    admitted, sent, shed = asyncio.run(overload())
    assert shed > 0 and admitted
    # Without shedding, 48 callers on a model that runs 2 rows at a time would wait ~24 runs each.
    unloaded_p99, admitted_p99 = _percentile(unloaded, 0.99), _percentile(admitted, 0.99)
    assert admitted_p99 < max(20 * unloaded_p99, 0.25), (admitted_p99, unloaded_p99)
    assert len(health_answers) >= 10 and set(health_answers) == {health_pb2.HealthCheckResponse.SERVING}
    recovered, _, refused_after = asyncio.run(_drive(gateway.address, "after", callers=1, seconds=0.5))
    assert refused_after == 0 and recovered
    reader = LogReader(gateway.state_dir / "log")
    missing = [i for i in sent if len(reader.get(i)) != 1]
    assert missing == []


def test_limit_keys_out_of_range_are_configuration_errors_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"models\.m\.max_queue: must be -1"):
        from_dict({"models": {"m": {"max_queue": -2}}})
    with pytest.raises(ConfigError, match=r"model_defaults\.max_in_flight: must be 0 \(unlimited\) or more, got -1"):
        from_dict({"model_defaults": {"max_in_flight": -1}})
    with pytest.raises(ConfigError, match=r"auth\.rate_limit_per_s: must be 0 \(off\) or more"):
        from_dict({"auth": {"rate_limit_per_s": -1.0}})
    config = from_dict({"model_defaults": {"max_batch_size": 8}, "models": {"m": {"max_queue": 5}}})
    assert config.model_defaults.queue_limit == 16 and config.serving("m").queue_limit == 5


def test_a_token_bucket_refills_at_its_rate_and_says_when_the_next_token_comes() -> None:
    limiter = RateLimiter(rate_per_s=50.0, burst=2)
    first, second, refused = (limiter.take("a") for _ in range(3))
    assert first == second == 0.0
    assert 0.0 < refused <= 0.02  # one token every 20 ms
    assert limiter.take("b") == 0.0  # buckets are per caller
    time.sleep(0.05)  # 2.5 tokens' worth, capped at the burst of 2
    assert [limiter.take("a") > 0 for _ in range(3)] == [False, False, True]


def test_a_grpc_retry_policy_waits_out_the_pushback_and_is_served(gateway: GatewayProcess) -> None:
    """A client whose retry policy retries RESOURCE_EXHAUSTED after 10 ms at most would be refused again
    at 1 request/s; obeying `grpc-retry-pushback-ms` it waits for the next token and is served."""
    carol = TokenStore(gateway.state_dir / "tokens.json").create("viewer", "carol")
    policy = {
        "methodConfig": [
            {
                "name": [{"service": "inference.GRPCInferenceService"}],
                "retryPolicy": {
                    "maxAttempts": 2,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.01s",
                    "backoffMultiplier": 1,
                    "retryableStatusCodes": ["RESOURCE_EXHAUSTED"],
                },
            }
        ]
    }
    options = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(policy))]
    metadata = [("authorization", f"Bearer {carol}")]
    with grpc.insecure_channel(gateway.address, options=options) as channel:
        stub = Stub(channel)
        _call_once_the_token_is_known(stub, _request("sized", "carol-0", shape=[1, 4]), metadata)
        for i in (1, 2):  # the rest of the burst of 3
            stub.ModelInfer(_request("sized", f"carol-{i}", shape=[1, 4]), metadata=metadata)
        start = time.monotonic()
        answer = stub.ModelInfer(_request("sized", "carol-3", shape=[1, 4]), metadata=metadata)
        waited = time.monotonic() - start
    assert answer.id == "carol-3"
    assert waited >= 0.2, waited  # the bucket was empty: the retry waited for a token, not 10 ms
    statuses = sorted(r.status for r in _records(gateway, "carol-3", timeout=2))
    assert statuses == [0, RESOURCE_EXHAUSTED]  # both attempts are in the log: the refusal and the answer
