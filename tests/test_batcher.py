"""The micro-batcher's policy, in process, on a real onnxruntime session: no added wait for a
lone caller; batches once concurrent callers show up; each caller gets exactly its rows."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import onnx
import pytest
from models import OPSET, mlp_graph, slow_identity_graph
from onnx import helper

from gateway.batcher import PROBE_INTERVAL_S, MicroBatcher
from gateway.errors import ModelExecutionError, Unavailable
from gateway.runtime import OnnxModel
from gateway.stats import VersionStats


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    path = tmp_path_factory.mktemp("batcher") / "mlp.onnx"
    onnx.save(helper.make_model(mlp_graph(), opset_imports=OPSET, ir_version=8), str(path))
    return OnnxModel(path, 1, 1)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    """An FP32 identity of width 64 that takes tens of milliseconds a run."""
    path = tmp_path_factory.mktemp("batcher") / "slow.onnx"
    onnx.save(helper.make_model(slow_identity_graph(), opset_imports=OPSET, ir_version=8), str(path))
    return OnnxModel(path, 1, 1)


def _reference(model: OnnxModel, x: np.ndarray) -> np.ndarray:
    return model.run({"input": x})[0]


def test_a_lone_caller_never_waits_after_the_probe(model: OnnxModel) -> None:
    stats = VersionStats()
    batcher = MicroBatcher(model, stats, max_batch_size=64, max_batch_wait_us=50_000, inline=True)

    async def sequential() -> None:
        for i in range(200):
            x = np.full((1, 32), i, dtype=np.float32)
            np.testing.assert_array_equal((await batcher.run({"input": x}, 1))[0], _reference(model, x))

    start = time.monotonic()
    asyncio.run(sequential())
    probes_allowed = 1 + int((time.monotonic() - start) / PROBE_INTERVAL_S)
    assert stats.execution_count == 200
    assert set(stats.batch_sizes) == {1}
    assert stats.batch_wait_timeouts <= probes_allowed  # only probes waited; every other request ran at once


def _counts(stats: VersionStats) -> dict[str, object]:
    durations = ("ok_runs", "success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    counts: dict[str, object] = {name: (getattr(stats, name).count, getattr(stats, name).ns) for name in durations}
    counts["batch_sizes"] = {rows: (d.count, d.ns) for rows, d in stats.batch_sizes.items()}
    counts["execution_count"] = stats.execution_count
    return counts


def test_a_request_run_alone_is_counted_as_a_run_and_its_compute_time() -> None:
    """The request path's one stats call matches the two the batch path makes (Triton's equal counts)."""
    alone, reference = VersionStats(), VersionStats()
    for rows, ns in ((1, 700), (3, 2_000), (1, 900)):
        alone.record_run_alone(rows, ns)
        reference.record_execution(rows, ns, ok=True)
        reference.record_compute(0, 0, ns, 0)
    assert _counts(alone) == _counts(reference)
    assert alone.batch_sizes[1].count == 2 and alone.compute_infer.ns == 3_600


def test_concurrent_callers_are_batched_and_get_their_own_rows(model: OnnxModel) -> None:
    stats = VersionStats()
    batcher = MicroBatcher(model, stats, max_batch_size=64, max_batch_wait_us=2000, inline=True)
    rng = np.random.default_rng(3)

    async def caller(index: int) -> None:
        for _ in range(50):
            rows = int(rng.integers(1, 4))
            x = rng.standard_normal((rows, 32)).astype(np.float32) + index
            out = (await batcher.run({"input": x}, rows))[0]
            assert out.shape == (rows, 16)
            np.testing.assert_allclose(out, _reference(model, x), rtol=1e-5, atol=1e-5)
            await asyncio.sleep(0)  # the next request arrives on a later loop turn, as gRPC delivers them

    async def main() -> None:
        await asyncio.gather(*(caller(i) for i in range(16)))

    asyncio.run(main())
    requests = 16 * 50
    assert stats.execution_count < requests / 4, stats.batch_sizes
    assert max(stats.batch_sizes) > 8


def _burst(model: OnnxModel, batcher: MicroBatcher, count: int) -> None:
    """`count` one-row requests submitted at once; each must get its own row back."""

    async def main() -> None:
        xs = [np.full((1, 32), i, dtype=np.float32) for i in range(count)]
        outs = await asyncio.gather(*(batcher.run({"input": x}, 1) for x in xs))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_allclose(out[0], _reference(model, x), rtol=1e-5, atol=1e-5)

    try:
        asyncio.run(main())
    finally:
        batcher.close()


def test_the_row_limit_splits_batches(model: OnnxModel) -> None:
    stats = VersionStats()
    _burst(model, MicroBatcher(model, stats, max_batch_size=4, max_batch_wait_us=2000, inline=True), 40)
    assert max(stats.batch_sizes) <= 4


def test_threaded_batcher_batches_while_busy(model: OnnxModel) -> None:
    stats = VersionStats()
    _burst(model, MicroBatcher(model, stats, max_batch_size=64, max_batch_wait_us=0, inline=False), 64)
    assert stats.execution_count < 64


@pytest.mark.parametrize("inline", [True, False])
def test_requests_that_cannot_be_merged_fail_alone_and_none_is_left_waiting(model: OnnxModel, inline: bool) -> None:
    """A request whose input is named otherwise (a shadow of another signature) shares a batch with good ones:
    merging fails, each request reruns alone, and only the misnamed ones fail."""
    stats = VersionStats()
    batcher = MicroBatcher(model, stats, max_batch_size=64, max_batch_wait_us=50_000, inline=inline)
    xs = [np.full((1, 32), i, dtype=np.float32) for i in range(8)]

    async def main() -> list[object]:
        calls = (batcher.run({"input" if i % 2 else "x": x}, 1) for i, x in enumerate(xs))
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    for i, (x, result) in enumerate(zip(xs, results, strict=True)):
        if i % 2:
            assert isinstance(result, list), result
            np.testing.assert_allclose(result[0], _reference(model, x), rtol=1e-5, atol=1e-5)
        else:
            assert isinstance(result, ModelExecutionError) and "input" in result.message, result
    assert max(stats.batch_sizes) == 1  # every request ran alone after its batch failed to merge


def test_requests_queued_when_the_batcher_closes_are_refused(slow_model: OnnxModel) -> None:
    """Closing (an unload that gave up waiting, a gateway stopping) while a run is busy and others queue:
    the queued ones get UNAVAILABLE, not a wait for ever."""
    batcher = MicroBatcher(slow_model, VersionStats(), 64, 0, inline=False, label="model 's' version '1'")
    x = np.ones((1, 64), dtype=np.float32)

    async def main() -> list[object]:
        running = asyncio.ensure_future(batcher.run({"x": x}, 1))
        await asyncio.sleep(0)  # let it start on the batcher's thread
        queued = asyncio.ensure_future(batcher.run({"x": x}, 1))
        await asyncio.sleep(0)
        await asyncio.to_thread(batcher.close)
        return await asyncio.wait_for(asyncio.gather(running, queued, return_exceptions=True), 10)

    running, queued = asyncio.run(main())
    assert isinstance(running, list), running
    assert isinstance(queued, Unavailable), queued
    assert "model 's' version '1' is shut down; not run" in queued.message


def test_model_thread_runs_queued_batches_while_the_event_loop_is_busy(slow_model: OnnxModel) -> None:
    """Under overload the loop is busy refusing calls: the model thread must not wait for it to start the
    next queued batch. Here the loop is blocked outright, and all three queued runs still happen."""
    stats = VersionStats()
    batcher = MicroBatcher(slow_model, stats, max_batch_size=1, max_batch_wait_us=0, inline=False)
    x = np.ones((1, 64), dtype=np.float32)

    async def main() -> tuple[int, list[object]]:
        calls = [asyncio.ensure_future(batcher.run({"x": x}, 1)) for _ in range(3)]
        await asyncio.sleep(0)  # all three submitted: one running, two queued
        give_up = time.monotonic() + 30
        while stats.execution_count < 3 and time.monotonic() < give_up:
            time.sleep(0.01)  # blocks the event loop: nothing it would schedule can run
        runs_while_blocked = stats.execution_count
        return runs_while_blocked, await asyncio.gather(*calls, return_exceptions=True)

    try:
        runs_while_blocked, results = asyncio.run(main())
    finally:
        batcher.close()
    assert runs_while_blocked == 3
    for result in results:
        assert isinstance(result, list), result
        np.testing.assert_array_equal(result[0], x)
    assert stats.batch_sizes.keys() == {1}


def test_a_batcher_outliving_its_event_loop_serves_the_next_one(slow_model: OnnxModel) -> None:
    """The loop closes while the model thread runs one batch and another waits (two widths never share a
    batch): the thread cannot answer either, and must not stay busy, or a later loop's requests would wait
    for ever."""
    stats = VersionStats()
    batcher = MicroBatcher(slow_model, stats, max_batch_size=1, max_batch_wait_us=0, inline=False)
    x = np.ones((1, 64), dtype=np.float32)

    async def abandon() -> None:
        batcher.submit({"x": x}, 1)  # runs on the model thread
        batcher.submit({"x": x}, 1)  # queued behind it; the loop closes before either is answered

    async def later() -> list[np.ndarray]:
        return await asyncio.wait_for(batcher.run({"x": x}, 1), 30)

    try:
        asyncio.run(abandon())
        give_up = time.monotonic() + 30
        while stats.execution_count < 1 and time.monotonic() < give_up:
            time.sleep(0.01)  # the abandoned run ends on the model thread
        result = asyncio.run(later())
    finally:
        batcher.close()
    np.testing.assert_array_equal(result[0], x)
