"""The request log: one record per request, committed before the answer, surviving kill -9,
rotating and expiring whole segments, pushing back when it cannot keep up, exportable."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess

from gateway.config import LogConfig
from gateway.errors import ResourceExhausted
from gateway.protocol import Stub
from gateway.protocol import inference as pb
from gateway.requestlog.reader import LogReader, Query
from gateway.requestlog.record import Record, Tensor, decode, encode, id_key
from gateway.requestlog.segments import Segment, list_segments, segment_name
from gateway.requestlog.writer import LogWriter

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


def _mlp_request(request_id: str, x: np.ndarray, version: str = "1") -> object:
    request = pb.ModelInferRequest(model_name="mlp", model_version=version, id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def test_every_request_of_a_mixed_run_has_exactly_one_record(gateway: GatewayProcess, stub: Stub) -> None:
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    ok = stub.ModelInfer(_mlp_request("mixed-ok", x))
    assert ok.parameters["request_id"].string_param == "mixed-ok"
    undecodable = _mlp_request("mixed-bytes", x)
    undecodable.raw_input_contents[0] = b"\0" * 5  # type: ignore[attr-defined]
    invalid = _mlp_request("mixed-shape", np.zeros((1, 31), dtype=np.float32))
    missing = pb.ModelInferRequest(model_name="nope", id="mixed-model")
    missing.inputs.add(name="input", datatype="FP32", shape=[1, 1])
    missing.raw_input_contents.append(b"\0" * 4)
    for request in (undecodable, invalid, missing):
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(request)
    anonymous = stub.ModelInfer(_mlp_request("", x))
    generated_id = anonymous.parameters["request_id"].string_param
    assert generated_id

    reader = LogReader(gateway.state_dir / "log")
    [record] = reader.get("mixed-ok")
    assert (record.model, record.version, record.role, record.status) == ("mlp", "1", "primary", 0)
    assert record.inputs[0].name == "input" and record.inputs[0].shape == [2, 32]
    np.testing.assert_array_equal(record.inputs[0].to_numpy(np.dtype(np.float32)), x)
    out = np.frombuffer(ok.raw_output_contents[0], dtype=np.float32).reshape(2, 16)
    np.testing.assert_array_equal(record.outputs[0].to_numpy(np.dtype(np.float32)), out)
    assert len(record.sha256) == 64 and record.latency_ns > 0

    [record] = reader.get("mixed-bytes")
    assert record.status == INVALID_ARGUMENT and "raw_input_contents has 5 bytes" in record.message
    assert record.raw_request is not None  # what could not be decoded is kept, not lost
    assert pb.ModelInferRequest.FromString(record.raw_request).id == "mixed-bytes"
    [record] = reader.get("mixed-shape")
    assert record.status == INVALID_ARGUMENT and record.inputs[0].shape == [1, 31]
    [record] = reader.get("mixed-model")
    assert record.status == NOT_FOUND and record.model == "nope"
    assert len(reader.get(generated_id)) == 1
    assert reader.problems == []


def test_a_message_protobuf_cannot_parse_is_refused_precisely_and_logged(gateway: GatewayProcess) -> None:
    """Bytes that are no ModelInferRequest (bad wire format, invalid UTF-8 in a string field) used to fail
    inside gRPC's deserializer: UNKNOWN, no record, and on a stream the end of the whole stream."""
    garbage = b"\xff\xff\xff\xff"
    bad_utf8 = b"\x0a\x03\xff\xfe\xfd" + _mlp_request("bad-utf8", np.zeros((1, 32), np.float32)).SerializeToString()
    with grpc.insecure_channel(gateway.address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for payload in (garbage, bad_utf8):
            with pytest.raises(grpc.RpcError) as refused:
                infer(payload, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "request: not a valid ModelInferRequest message" in str(refused.value.details())
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        messages = [_mlp_request(f"stream-{n}", np.zeros((1, 32), np.float32)).SerializeToString() for n in (1, 3)]
        replies = list(stream(iter([messages[0], garbage, messages[1]]), timeout=10))
    assert sorted(r.infer_response.id for r in replies if not r.error_message) == ["stream-1", "stream-3"]
    [error] = [r.error_message for r in replies if r.error_message]
    assert error.startswith("INVALID_ARGUMENT: request: not a valid ModelInferRequest message")
    logged = [r for r in LogReader(gateway.state_dir / "log").query() if r.raw_request in (garbage, bad_utf8)]
    assert sorted(r.raw_request for r in logged) == sorted([garbage, garbage, bad_utf8])  # bytes kept, not lost
    assert all(r.status == INVALID_ARGUMENT and "not a valid ModelInferRequest" in r.message for r in logged)


def test_the_callers_w3c_trace_id_is_logged(gateway: GatewayProcess, stub: Stub) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    x = np.ones((1, 32), dtype=np.float32)
    stub.ModelInfer(_mlp_request("traced", x), metadata=[("traceparent", f"00-{trace}-00f067aa0ba902b7-01")])
    stub.ModelInfer(_mlp_request("badly-traced", x), metadata=[("traceparent", "not a traceparent")])
    reader = LogReader(gateway.state_dir / "log")
    assert reader.get("traced")[0].trace_id == trace
    assert reader.get("badly-traced")[0].trace_id is None


def test_log_cli_reads_the_running_gateways_log(gateway: GatewayProcess, stub: Stub) -> None:
    since = str(time.time_ns())
    stub.ModelInfer(_mlp_request("cli-1", np.ones((1, 32), dtype=np.float32)))
    base = [sys.executable, "-m", "gateway", "log", "--state-dir", str(gateway.state_dir)]
    got = subprocess.run([*base, "get", "cli-1", "--json"], capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["id"] == "cli-1"
    queried = subprocess.run(
        [*base, "query", "--model", "mlp", "--status", "OK", "--since", since, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ids = [json.loads(line)["id"] for line in queried.stdout.splitlines()]
    assert "cli-1" in ids
    missing = subprocess.run([*base, "get", "no-such-id"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no record for request id 'no-such-id'" in missing.stderr


async def _hammer(address: str, prefix: str, seconds: float, received: list[str]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = Stub(channel)

        async def worker(w: int) -> None:
            i = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                request_id = f"{prefix}-{w}-{i}"
                i += 1
                try:
                    await stub.ModelInfer(_mlp_request(request_id, np.full((1, 32), i, dtype=np.float32)))
                except grpc.aio.AioRpcError:
                    return  # the server died under us
                received.append(request_id)

        await asyncio.gather(*(worker(w) for w in range(8)))


def test_kill_9_loses_no_answered_request(repository: Path, tmp_path: Path) -> None:
    gateway = GatewayProcess(repository, None, tmp_path)
    gateway.wait_ready()
    received: list[str] = []

    async def run() -> None:
        load = asyncio.ensure_future(_hammer(gateway.address, "crash", 10.0, received))
        await asyncio.sleep(1.5)
        os.kill(gateway.process.pid, signal.SIGKILL)
        await load

    asyncio.run(run())
    gateway.process.wait(10)
    assert len(received) > 50
    reader = LogReader(gateway.state_dir / "log")
    logged = {r.id for r in reader.query(Query(model="mlp"))}
    missing = [r for r in received if r not in logged]
    assert missing == [], f"{len(missing)} answered requests have no record, e.g. {missing[:3]}"


def test_backpressure_refuses_rather_than_answering_unlogged(repository: Path, tmp_path: Path) -> None:
    config = '[log]\nsync = "fsync"\nmax_pending = 2\nfault_fsync_delay_ms = 50\n'
    gateway = GatewayProcess(repository, config, tmp_path)
    gateway.wait_ready()

    async def burst() -> list[object]:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = Stub(channel)
            x = np.ones((1, 32), dtype=np.float32)
            calls = [stub.ModelInfer(_mlp_request(f"bp-{i}", x)) for i in range(40)]
            return await asyncio.gather(*calls, return_exceptions=True)

    try:
        results = asyncio.run(burst())
    finally:
        assert gateway.stop() == 0
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert "log.max_pending" in refused[0].details()
    assert answered
    reader = LogReader(gateway.state_dir / "log")
    for response in answered:
        assert len(reader.get(response.id)) == 1  # type: ignore[attr-defined]


def _records(count: int, start: int = 0, payload: int = 256) -> list[Record]:
    return [
        Record(f"r{i}", time.time_ns(), "m", "1", inputs=[Tensor("x", "UINT8", [payload], bytes([i % 256]) * payload)])
        for i in range(start, start + count)
    ]


async def _write(writer: LogWriter, records: list[Record], chunk: int = 50) -> None:
    for i in range(0, len(records), chunk):
        await asyncio.gather(*(writer.commit(r) for r in records[i : i + chunk]))


def test_rotation_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    config = LogConfig(segment_max_bytes=256 * 1024)
    records = _records(3000, payload=512)

    async def run() -> None:
        writer = LogWriter(tmp_path, config)
        await _write(writer, records)
        await writer.close()

    asyncio.run(run())
    assert len(list_segments(tmp_path)) >= 3
    ids = [r.id for r in LogReader(tmp_path).query()]
    assert sorted(ids) == sorted(r.id for r in records)
    assert LogReader(tmp_path).get("r2999")[0].inputs[0].data == bytes([2999 % 256]) * 512


def test_a_full_map_rotates_instead_of_failing(tmp_path: Path) -> None:
    # Records far larger than the segment limit: the map fills mid-transaction and must rotate.
    config = LogConfig(segment_max_bytes=512 * 1024)
    records = _records(40, payload=200 * 1024)

    async def run() -> None:
        writer = LogWriter(tmp_path, config)
        await _write(writer, records, chunk=10)
        await writer.close()

    asyncio.run(run())
    assert sorted(r.id for r in LogReader(tmp_path).query()) == sorted(r.id for r in records)


def test_a_query_paused_while_the_writer_rotates_reads_every_record_once(tmp_path: Path) -> None:
    """An export reads the live segment in chunks of transactions; between two, the in-process writer
    rotates and closes that segment. The scan carries on in it, read-only, losing and repeating nothing."""
    first = _records(2600)  # more than two read chunks, in one segment

    async def run() -> list[str]:
        writer = LogWriter(tmp_path, LogConfig(segment_max_bytes=4 << 20))
        await _write(writer, first)
        reader = LogReader(tmp_path, live=writer.live_segment)
        scan = reader.query()
        ids = [next(scan).id for _ in range(1500)]
        await _write(writer, _records(80, start=5000, payload=64 << 10))  # 5 MB: past the limit, rotates
        assert len(list_segments(tmp_path)) >= 2 and writer.live_segment().path != list_segments(tmp_path)[0]
        ids += [r.id for r in scan]
        await writer.close()
        return ids

    ids = asyncio.run(run())
    assert ids[: len(first)] == [r.id for r in first]
    assert len(ids) == len(set(ids))


def test_a_scan_that_waits_for_a_rotation_reads_on_in_the_finished_segment(tmp_path: Path) -> None:
    """The writer's rotation closes the live segment only once no thread is in a transaction on it; a
    scan that asked for its next chunk meanwhile waits, then reads on in the segment reopened read-only."""
    writer = LogWriter(tmp_path, LogConfig(segment_max_bytes=4 << 20))
    first = _records(3000)
    for record in first:
        writer.write_now(record)
    live = writer.live_segment()
    scan = LogReader(tmp_path, live=writer.live_segment).query()
    ids = [next(scan).id for _ in range(1024)]
    release = threading.Event()

    def quality_report() -> None:  # another reader, in a transaction on the live segment
        with live.read(live.records):
            release.wait(10)

    def rotate() -> None:  # 5 MB more: past the limit, so the writer rotates, closing `live`
        for record in _records(80, start=5000, payload=64 << 10):
            writer.write_now(record)

    def read_on() -> None:
        ids.extend(r.id for r in scan)

    threads = [threading.Thread(target=f) for f in (quality_report, rotate, read_on)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    assert threads[1].is_alive() and threads[2].is_alive(), "the rotation and the scan wait for the report"
    release.set()
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads) and live.guard.closed
    assert ids[: len(first)] == [r.id for r in first] and len(ids) == len(set(ids))
    asyncio.run(writer.close())


def test_retention_deletes_only_whole_old_segments(tmp_path: Path) -> None:
    config = LogConfig(segment_max_bytes=128 * 1024, retention_max_bytes=600 * 1024)

    async def run() -> None:
        writer = LogWriter(tmp_path, config)
        await _write(writer, _records(4000, payload=512))
        await writer.close()

    asyncio.run(run())
    remaining = [r.id for r in LogReader(tmp_path).query()]
    numbers = sorted(int(i[1:]) for i in remaining)
    assert numbers and numbers[0] > 0, "retention should have deleted the oldest segments"
    assert numbers == list(range(numbers[0], 4000)), "a partial segment was deleted"


def test_a_damaged_segment_is_reported_and_skipped(tmp_path: Path) -> None:
    config = LogConfig(segment_max_bytes=64 * 1024)

    async def run() -> None:
        writer = LogWriter(tmp_path, config)
        await _write(writer, _records(1000, payload=256))
        await writer.close()

    asyncio.run(run())
    first = list_segments(tmp_path)[0]
    (first / "data.mdb").write_bytes(b"garbage" * 10)
    reader = LogReader(tmp_path)
    ids = [r.id for r in reader.query()]
    assert ids and "r999" in ids
    assert len(reader.problems) == 1 and str(first) in str(reader.problems[0])

    async def reopen() -> None:  # the writer too starts fine beside a damaged segment
        writer = LogWriter(tmp_path, config)
        await _write(writer, _records(5, start=5000))
        await writer.close()

    asyncio.run(reopen())
    assert LogReader(tmp_path).get("r5004")


GROW_THE_MAP = """
import asyncio, sys, time
from pathlib import Path
from gateway.config import LogConfig
from gateway.errors import ResourceExhausted
from gateway.requestlog.record import Record, Tensor
from gateway.requestlog.writer import LogWriter

async def main() -> None:
    # 16 MB of records in the same live segment (its limit is 64 MB): past the size the reader mapped.
    writer = LogWriter(Path(sys.argv[1]), LogConfig(segment_max_bytes=64 << 20))
    for n in range(16):
        record = Record(f"after-{n}", time.time_ns(), "m", "1")
        record.inputs = [Tensor("x", "UINT8", [1 << 20], bytes(1 << 20))]
        await writer.commit(record)
    await writer.close()

asyncio.run(main())
"""


def test_a_reader_adopts_a_map_another_process_grew(tmp_path: Path) -> None:
    """Another process (the gateway, while `canary-gateway log get` runs) grows the live segment's map:
    a reader that opened the segment before must adopt the new size, not fail with MDB_MAP_RESIZED."""

    async def first() -> None:
        writer = LogWriter(tmp_path, LogConfig(segment_max_bytes=64 << 20))
        await writer.commit(Record("before", time.time_ns(), "m", "1"))
        await writer.close()

    asyncio.run(first())
    reader = LogReader(tmp_path)
    assert len(reader.get("before")) == 1  # the segment is open now, at its first size
    subprocess.run([sys.executable, "-c", GROW_THE_MAP, str(tmp_path)], check=True, timeout=60)
    assert len(list_segments(tmp_path)) == 1
    assert [r.id for r in reader.get("after-15")] == ["after-15"]
    assert reader.count() == 17


KEEP_WRITING = """
import asyncio, sys, time
from pathlib import Path
from gateway.config import LogConfig
from gateway.errors import ResourceExhausted
from gateway.requestlog.record import Record, Tensor
from gateway.requestlog.writer import LogWriter

async def main() -> None:
    writer = LogWriter(Path(sys.argv[1]), LogConfig(segment_max_bytes=256 << 20))
    print("writing", flush=True)
    n, stop = 0, time.monotonic() + float(sys.argv[2])
    while time.monotonic() < stop:  # a live segment that keeps adding pages, as a gateway under load does
        record = Record(f"w-{n}", time.time_ns(), "m", "1")
        record.inputs = [Tensor("x", "UINT8", [4096], bytes(4096))]
        await writer.commit(record)
        n += 1
    await writer.close()

asyncio.run(main())
"""


def test_a_reader_opening_the_live_segment_while_it_grows_is_not_turned_away(tmp_path: Path) -> None:
    """A reader in another process (the feedback ingest process, `canary-gateway log get`) opens the live
    segment while the gateway adds pages to it. It used to map only the pages in use at that instant, so
    the next page written made its own open fail (MDB_MAP_RESIZED) about once in 80 opens, and the segment
    was skipped as damaged for the reader's lifetime: every id in it became unknown."""

    async def first() -> None:
        writer = LogWriter(tmp_path, LogConfig(segment_max_bytes=256 << 20))
        await _write(writer, _records(3000, payload=4096))  # past the 10 MiB an unsized map starts at
        await writer.close()

    asyncio.run(first())
    writing = subprocess.Popen(
        [sys.executable, "-c", KEEP_WRITING, str(tmp_path), "3"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writing.stdout is not None and writing.stdout.readline() == "writing\n"
        opens, deadline = 0, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            reader = LogReader(tmp_path)
            assert reader.known_keys([b"r7", b"nobody"]) == {b"r7"}, reader.problems
            reader.close()
            opens += 1
    finally:
        assert writing.wait(timeout=30) == 0
    assert opens > 200  # enough opens that the old ~1.2% failure rate could not pass unseen


def test_a_segment_still_being_created_is_read_once_it_exists(tmp_path: Path) -> None:
    """A reader that lists the log while the writer creates a segment (its directory made, its file or
    databases not yet) skips it this time and reads it later; it used to write it off as damaged for good."""

    async def first() -> None:
        writer = LogWriter(tmp_path, LogConfig())
        await writer.commit(Record("old", time.time_ns(), "m", "1"))
        await writer.close()

    asyncio.run(first())
    creating = tmp_path / segment_name(time.time_ns())
    creating.mkdir()  # the writer's first step: no data.mdb yet
    reader = LogReader(tmp_path)
    assert [r.id for r in reader.get("old")] == ["old"] and not reader.problems
    Segment.open(creating, 1 << 20).close()  # an environment, and its databases (created empty)
    assert reader.known_keys([b"old", b"new"]) == {b"old"} and not reader.problems
    put = "import sys, pathlib; from gateway.requestlog.segments import Segment\n"
    put += "s = Segment.open(pathlib.Path(sys.argv[1]), 1 << 20)\n"
    put += "with s.guard.transaction(write=True) as t: t.put(b'new', b'key', db=s.ids)"
    subprocess.run([sys.executable, "-c", put, str(creating)], check=True, timeout=60)  # the reader holds it open
    assert reader.known_keys([b"old", b"new"]) == {b"old", b"new"} and not reader.problems


OUT_OF_FILE_DESCRIPTORS = """
import resource, sys
from pathlib import Path
from gateway.requestlog.reader import LogReader
from gateway.requestlog.record import id_key

reader = LogReader(Path(sys.argv[1]))
ids = [id_key(f"s-{n}") for n in range(int(sys.argv[2]))]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))  # room for a few segments only (2 descriptors each)
print(len(reader.known_keys(ids)))
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(len(reader.known_keys(ids)), len(reader.problems))
"""


def test_segments_a_reader_had_no_file_descriptors_for_are_read_later(tmp_path: Path) -> None:
    for n in range(40):
        segment = Segment.open(tmp_path / segment_name(n + 1), 1 << 20)
        with segment.guard.transaction(write=True) as txn:
            txn.put(id_key(f"s-{n}"), b"key", db=segment.ids)
        segment.close()
    run = subprocess.run(
        [sys.executable, "-c", OUT_OF_FILE_DESCRIPTORS, str(tmp_path), "40"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    short, later = run.stdout.splitlines()
    assert int(short) < 40  # the limit did bite: some segments could not be opened
    assert later == "40 0", run.stderr  # ...and none was written off as damaged
    assert "Too many open files" in run.stderr


GROW_AND_KEEP_WRITING = """
import sys
from pathlib import Path
from gateway.requestlog.segments import Segment

segment = Segment.open(Path(sys.argv[1]), 1 << 20)  # a worker live on the segment, at the configured map
segment.guard.grow(16 << 20)  # ...grows it for a record larger than an empty segment
with segment.guard.transaction(write=True) as txn:
    txn.put(b"big", bytes(3 << 20), db=segment.records)
print("grown", flush=True)
sys.stdin.readline()  # meanwhile another worker opens the segment
for n in range(8):  # new pages, beyond those in use when the other worker opened it
    with segment.guard.transaction(write=True) as txn:
        txn.put(b"more-%d" % n, bytes(1 << 20), db=segment.records)
print("wrote on", flush=True)
segment.close()
"""


def test_a_worker_opening_a_segment_another_grew_leaves_its_file_whole(tmp_path: Path) -> None:
    """With writemap LMDB truncates the file to the map it is opened with: a restarted or adopting worker
    opening the live segment at the configured size cut the file under the worker that had grown it, whose
    next new page then lay past the end of the file, and that worker died of SIGBUS."""
    path = tmp_path / segment_name(time.time_ns())
    grower = subprocess.Popen(
        [sys.executable, "-c", GROW_AND_KEEP_WRITING, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert grower.stdin is not None and grower.stdout is not None
    try:
        assert grower.stdout.readline() == "grown\n"
        other = Segment.open(path, 1 << 20)  # what LogWriter does with the newest segment at start or rotation
        assert (path / "data.mdb").stat().st_size >= 16 << 20
        assert other.env.info()["map_size"] >= 16 << 20
        other.close()
        grower.stdin.write("\n")
        grower.stdin.flush()
        assert grower.stdout.readline() == "wrote on\n"
    finally:
        grower.stdin.close()
        assert grower.wait(timeout=30) == 0


def test_an_undecodable_record_is_reported_not_dropped(tmp_path: Path) -> None:
    async def run() -> None:
        writer = LogWriter(tmp_path, LogConfig())
        await _write(writer, _records(3))
        await writer.close()

    asyncio.run(run())
    import lmdb

    segment = list_segments(tmp_path)[0]
    env = lmdb.open(str(segment), max_dbs=2)
    records_db = env.open_db(b"records")
    with env.begin(write=True, db=records_db) as txn:
        key = next(iter(txn.cursor().iternext(values=False)))
        txn.put(key, b"\xc1not msgpack")
    env.close()
    reader = LogReader(tmp_path)
    assert len(list(reader.query())) == 2
    assert len(reader.problems) == 1 and key.hex() in str(reader.problems[0])


def test_record_round_trips() -> None:
    record = _records(1)[0]
    record.ood, record.ood_score, record.trace_id = True, 4.5, "abc"
    assert decode(encode(record)) == record


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_round_trips_inputs(gateway: GatewayProcess, stub: Stub, tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(11)
    sent = {f"export-{fmt}-{i}": rng.standard_normal((1 + i % 2, 32)).astype(np.float32) for i in range(10)}
    for request_id, x in sent.items():
        stub.ModelInfer(_mlp_request(request_id, x, version="2"))
    output = tmp_path / f"out.{fmt}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "log",
            "--state-dir",
            str(gateway.state_dir),
            "export",
            "--format",
            fmt,
            "--model",
            "mlp",
            "--version",
            "2",
            "--status",
            "OK",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    if fmt == "jsonl":
        rows = [json.loads(line) for line in output.read_text().splitlines()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(output).to_pylist()
    by_request: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        by_request.setdefault(str(row["request_id"]), []).append(row)
    for request_id, x in sent.items():
        exported = sorted(by_request[request_id], key=lambda r: int(r["row"]))  # type: ignore[call-overload]
        got = np.array([[row[f"input.input.{j}"] for j in range(32)] for row in exported], dtype=np.float32)
        np.testing.assert_array_equal(got, x)


def _logged(tmp_path: Path, records: list[Record]) -> Path:
    """A real log directory holding `records`."""
    log_dir = tmp_path / "log"

    async def run() -> None:
        writer = LogWriter(log_dir, LogConfig())
        await _write(writer, records)
        await writer.close()

    asyncio.run(run())
    return log_dir


def _export(log_dir: Path, fmt: str, output: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gateway", "log", "--log-dir", str(log_dir), "export", "--format", fmt]
    result = subprocess.run([*argv, "--output", str(output)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_parquet_export_has_every_column_the_jsonl_export_has_whichever_chunk_it_first_appears_in(
    tmp_path: Path,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = Tensor.of("x", "FP32", np.ones((10_000, 2), np.float32))  # one record fills the first chunk
    big = np.array([2**63 + 5], np.uint64)  # past int64: a type guessed from the value overflows
    records = [
        Record("failed", 1, "m", "1", status=3, inputs=[x]),  # an error: no outputs, no OOD score
        Record(
            "ok",
            2,
            "m",
            "1",
            ood_score=0.5,
            inputs=[Tensor.of("x", "FP32", np.ones((1, 2), np.float32))],
            outputs=[Tensor.of("y", "INT64", np.array([7])), Tensor.of("u", "UINT64", big)],
        ),
    ]
    log_dir = _logged(tmp_path, records)
    _export(log_dir, "jsonl", tmp_path / "out.jsonl")
    result = _export(log_dir, "parquet", tmp_path / "out.parquet")
    assert "exported 10001 rows" in result.stderr
    jsonl_rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == list(dict.fromkeys(k for row in jsonl_rows for k in row))
    assert table.schema.field("output.u").type == pa.uint64()
    assert table.schema.field("ood_score").type == pa.float64()
    last = table.slice(table.num_rows - 1).to_pylist()[0]
    assert last == jsonl_rows[-1] == {**last, "output.y": 7, "output.u": 2**63 + 5, "ood_score": 0.5}


def test_parquet_export_types_columns_by_the_tensors_datatypes(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs = [
        Tensor.of("h", "FP16", np.array([1.5], np.float16)),
        Tensor.of("b", "BOOL", np.array([True])),
        Tensor.of("i8", "INT8", np.array([-3], np.int8)),
        Tensor.of("cube", "FP32", np.zeros((1, 2, 2), np.float32)),
    ]
    log_dir = _logged(tmp_path, [Record("r", 1, "m", "1", inputs=inputs)])
    _export(log_dir, "parquet", tmp_path / "out.parquet")
    schema = pq.read_schema(tmp_path / "out.parquet")
    assert schema.field("input.h").type == pa.float16()
    assert schema.field("input.b").type == pa.bool_()
    assert schema.field("input.i8").type == pa.int8()
    assert schema.field("input.cube").type == pa.list_(pa.list_(pa.float32()))


def test_parquet_export_of_no_records_writes_an_empty_table_with_the_base_columns(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    log_dir = _logged(tmp_path, [])
    result = _export(log_dir, "parquet", tmp_path / "out.parquet")
    assert "exported 0 rows" in result.stderr
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 0
    assert table.column_names[:3] == ["request_id", "ts_ns", "model"] and "row" in table.column_names


def test_jsonl_export_writes_non_finite_floats_as_null_at_any_depth(tmp_path: Path) -> None:
    cube = np.array([[[np.nan, 1.0], [np.inf, 3.0]]], np.float32)
    inputs = [Tensor.of("cube", "FP32", cube), Tensor.of("v", "FP64", np.array([-np.inf]))]
    log_dir = _logged(tmp_path, [Record("r", 1, "m", "1", inputs=inputs)])
    _export(log_dir, "jsonl", tmp_path / "out.jsonl")

    def strict(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    [row] = [json.loads(line, parse_constant=strict) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert row["input.cube"] == [[None, 1.0], [None, 3.0]]
    assert row["input.v"] is None


def test_fsync_mode_shares_one_fsync_among_waiting_answers(tmp_path: Path) -> None:
    writer_holder: list[LogWriter] = []

    async def run() -> None:
        writer = LogWriter(tmp_path, LogConfig(sync="fsync"))
        writer_holder.append(writer)
        await asyncio.gather(*(writer.commit(r) for r in _records(200)))
        await writer.close()

    asyncio.run(run())
    writer = writer_holder[0]
    assert writer.records_written == 200
    assert 0 < writer.fsyncs < 200  # group fsync: concurrent answers share fsyncs
    assert len(list(LogReader(tmp_path).query())) == 200


def _lower_open_files_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def test_the_gateway_raises_its_open_files_limit_for_the_segments_its_readers_keep_open(
    repository: Path, tmp_path: Path
) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard <= 256 or hard == resource.RLIM_INFINITY:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise to")
    argv = [sys.executable, "-m", "gateway", "serve", "--model-repository", str(repository), "--port", "0"]
    argv += ["--state-dir", str(tmp_path / "state")]
    server = subprocess.Popen(argv, preexec_fn=_lower_open_files_limit, stderr=subprocess.DEVNULL)
    try:
        deadline, soft = time.monotonic() + 30, "256"
        while soft == "256" and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.05)
            limits = Path(f"/proc/{server.pid}/limits").read_text().splitlines()
            soft = next(line for line in limits if line.startswith("Max open files")).split()[3]
        assert soft == str(hard)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_max_pending_counts_the_answers_whose_fsync_is_running(tmp_path: Path) -> None:
    """The syncer takes its batch off the waiting list before it fsyncs: those answers went uncounted, so
    up to twice `log.max_pending` could wait (a reviewer saw 3 waiting under a limit of 2)."""
    config = LogConfig(sync="fsync", max_pending=2, fault_fsync_delay_ms=500)

    async def run() -> None:
        writer = LogWriter(tmp_path, config)
        first = [asyncio.create_task(writer.commit(r)) for r in _records(2)]
        await asyncio.sleep(0.2)  # the syncer took both and is inside its (slowed) fsync
        assert writer.queue_depth == 2
        with pytest.raises(ResourceExhausted, match=r"2 answers are waiting for their fsync \(log.max_pending 2\)"):
            writer.admit()
        await asyncio.gather(*first)
        assert writer.queue_depth == 0
        writer.admit()
        await writer.close()

    asyncio.run(run())


def test_a_query_since_a_time_finds_records_newer_than_the_segment_after_theirs(tmp_path: Path) -> None:
    """A clock stepped back names the next segment before the newest records of the one it follows; `since`
    used to skip a segment by the next one's name, so those records were stored (get found them) but never
    queried or exported."""
    ahead = time.time_ns() + 2 * 3600 * 10**9  # written while the clock was two hours ahead

    async def run() -> None:
        writer = LogWriter(tmp_path, LogConfig(segment_max_bytes=64 * 1024))
        late = Record("late", ahead, "m", "1")
        await writer.commit(late)
        await _write(writer, _records(1000, payload=256))  # now at the real time: rotates several times
        await writer.close()

    asyncio.run(run())
    assert len(list_segments(tmp_path)) > 1
    reader = LogReader(tmp_path)
    assert [r.id for r in reader.get("late")] == ["late"]
    assert [r.id for r in reader.query(Query(since_ns=ahead - 10**9))] == ["late"]
