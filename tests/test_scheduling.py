"""gRPC's transport threads run under SCHED_BATCH in a real gateway (so they do not preempt the event
loop on every completion), the event loop's own thread does not, and the config key turns it off."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess

from gateway.protocol import Stub
from gateway.protocol import inference as pb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (comm, scheduling policy) for every thread of the process."""
    threads = {}
    for entry in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{entry}/stat").read_text()
            comm = Path(f"/proc/{pid}/task/{entry}/comm").read_text().strip()
        except OSError:
            continue
        fields_after_comm = stat.rpartition(")")[2].split()
        threads[int(entry)] = (comm, int(fields_after_comm[38]))  # field 41 of stat: policy
    return threads


def _some_traffic(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = Stub(channel)
        for _ in range(20):
            request = pb.ModelInferRequest(model_name="mlp")
            request.inputs.add(name="input", datatype="FP32", shape=[1, 32])
            request.raw_input_contents.append(np.ones((1, 32), np.float32).tobytes())
            stub.ModelInfer(request, timeout=10)


def test_transport_threads_are_batch_scheduled_and_the_event_loop_is_not(gateway: GatewayProcess) -> None:
    _some_traffic(gateway.address)
    threads = _threads(gateway.process.pid)
    engine = {tid: policy for tid, (comm, policy) in threads.items() if comm == "event_engine"}
    assert engine, threads
    assert set(engine.values()) == {os.SCHED_BATCH}, threads  # threads started since inherited it
    assert threads[gateway.process.pid][1] == os.SCHED_OTHER  # the event loop's thread
    batch = [tid for tid, (_, policy) in threads.items() if policy == os.SCHED_BATCH]
    assert len(batch) == len(engine) + 1, threads  # and grpc.aio's poller thread


def test_the_config_key_leaves_every_thread_alone(repository: Path, tmp_path: Path) -> None:
    process = GatewayProcess(repository, "[server]\ndefer_transport_threads = false\n", tmp_path)
    try:
        process.wait_ready()
        _some_traffic(process.address)
        threads = _threads(process.process.pid)
        assert os.SCHED_BATCH not in {policy for _, policy in threads.values()}, threads
    finally:
        assert process.stop() == 0, process.log
