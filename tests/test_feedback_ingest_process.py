"""The feedback ingest process: checks and stores batches off the gateway's threads, at low CPU priority,
refuses bad batches with the gateway's errors, and comes back when it dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.config import LogConfig
from gateway.errors import InvalidArgument, Unavailable
from gateway.feedback.ingest import REGRESSOR, submit
from gateway.feedback.ingester import IngestProcess
from gateway.feedback.store import FeedbackStore
from gateway.protocol import admin as pb
from gateway.requestlog.reader import LogReader
from gateway.requestlog.record import Record
from gateway.requestlog.segments import list_segments
from gateway.requestlog.writer import LogWriter


def _batch(ids: list[str], values: list[float]) -> bytes:
    columns = pb.FeedbackColumns(request_ids=ids, values=values)
    return pb.SubmitFeedbackRequest(model="m", columns=columns).SerializeToString()


def test_batches_are_stored_by_a_low_priority_child_that_survives_being_killed(tmp_path: Path) -> None:
    async def log_requests() -> None:
        writer = LogWriter(tmp_path / "log", LogConfig())
        for n in range(3):
            await writer.commit(Record(f"req-{n}", time.time_ns(), "m", "1"))
        await writer.close()

    asyncio.run(log_requests())
    ingester = IngestProcess(tmp_path / "log", tmp_path / "feedback")
    try:
        outcome = ingester.submit("m", REGRESSOR, _batch(["req-0", "req-1", "never-logged"], [1.0, 2.0, 3.0]))
        assert (outcome.stored, outcome.overwritten, outcome.unknown_ids) == (2, 0, ["never-logged"])
        assert ingester.pid is not None and ingester.pid != os.getpid()
        assert os.sched_getscheduler(ingester.pid) == os.SCHED_IDLE  # every serving thread preempts it

        with pytest.raises(InvalidArgument, match=r"columns.values: 1 rows for 2 request_ids"):
            ingester.submit("m", REGRESSOR, _batch(["req-0", "req-1"], [1.0]))

        first = ingester.pid
        with pytest.raises(Unavailable, match="feedback ingest failed, batch not stored"):
            ingester.submit("m", REGRESSOR, b"\xff not a message")  # answered, and the child lives on
        assert ingester.pid == first and ingester.alive

        os.kill(first, signal.SIGKILL)
        while ingester.alive:  # the next batch finds it dead and starts another
            time.sleep(0.01)
        outcome = ingester.submit("m", REGRESSOR, _batch(["req-1", "req-2"], [5.0, 6.0]))
        assert (outcome.stored, outcome.overwritten) == (2, 1)
        assert ingester.pid != first
    finally:
        ingester.close()
    assert ingester.pid is None
    with pytest.raises(Unavailable, match="stopping"):
        ingester.submit("m", REGRESSOR, _batch(["req-0"], [1.0]))

    store = FeedbackStore(tmp_path / "feedback")  # what the gateway's own handle reads
    truths = store.get_many(["req-0", "req-1", "req-2"])
    assert sorted(t.truth for t in truths.values()) == [1.0, 5.0, 6.0]
    store.close()


def test_a_nice_value_instead_of_sched_idle(tmp_path: Path) -> None:
    ingester = IngestProcess(tmp_path / "log", tmp_path / "feedback", priority=12)
    try:
        outcome = ingester.submit("m", REGRESSOR, _batch(["never-logged"], [1.0]))
        assert outcome.unknown_ids == ["never-logged"] and outcome.stored == 0
        assert ingester.pid is not None
        assert os.sched_getscheduler(ingester.pid) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, ingester.pid) == 12
    finally:
        ingester.close()


@pytest.mark.parametrize("cpus", ["spare", "gateway", "last"])
def test_the_child_leaves_a_pinned_gateway_s_cpus_unless_told_to_stay(tmp_path: Path, cpus: str) -> None:
    available = os.sched_getaffinity(0)
    serving, last = min(available), max(available)
    wanted = (last,) if cpus == "last" else cpus
    try:
        os.sched_setaffinity(0, range(os.sysconf("SC_NPROCESSORS_CONF")))
        allowed = os.sched_getaffinity(0)  # every CPU a cgroup's cpuset allows, beyond a taskset
        spare = (allowed - {serving}) or {serving}  # one CPU only: nothing is spare, it stays
        expected = {"spare": spare, "gateway": {serving}, "last": {last}}[cpus]
        os.sched_setaffinity(0, {serving})  # as `taskset` pins a gateway; the child starts from this thread
        ingester = IngestProcess(tmp_path / "log", tmp_path / "feedback", cpus=wanted)
        try:
            assert ingester.submit("m", REGRESSOR, _batch(["never-logged"], [1.0])).unknown_ids == ["never-logged"]
            assert ingester.pid is not None
            assert os.sched_getaffinity(ingester.pid) == expected
        finally:
            ingester.close()
    finally:
        os.sched_setaffinity(0, available)


def test_started_from_the_console_script_the_child_loads_none_of_the_server(tmp_path: Path) -> None:
    """The `canary-gateway` script imports the whole CLI (onnxruntime included). A child that re-ran it (as
    multiprocessing's spawn re-runs the main module) would spend ~0.5 s of CPU on it at the gateway's
    priority before lowering its own."""
    script = tmp_path / "canary-gateway"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            from gateway.cli import main  # what the console script imports
            from gateway.feedback.ingester import IngestProcess

            if __name__ == "__main__":
                ingester = IngestProcess({str(tmp_path / "log")!r}, {str(tmp_path / "feedback")!r})
                outcome = ingester.submit("m", "regressor", {_batch(["never-logged"], [1.0])!r})
                assert outcome.unknown_ids == ["never-logged"], outcome
                with open(f"/proc/{{ingester.pid}}/maps") as maps:
                    print("gateway:", "onnxruntime" in sys.modules, "child:", "onnxruntime" in maps.read())
                ingester.close()
            """
        )
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["gateway:", "True", "child:", "False"]


def test_the_child_runs_the_gateway_s_code_whatever_the_working_directory_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another checkout (here a broken `gateway` package) in the working directory, which is on the gateway's
    import path (`python -m ...` puts it there): the child still imports the package the gateway runs."""
    (tmp_path / "gateway").mkdir()
    (tmp_path / "gateway" / "__init__.py").write_text("raise ImportError('not the gateway that is running')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ingester = IngestProcess(tmp_path / "log", tmp_path / "feedback")
    try:
        assert ingester.submit("m", REGRESSOR, _batch(["never-logged"], [1.0])).unknown_ids == ["never-logged"]
    finally:
        ingester.close()


def test_a_child_that_cannot_start_is_unavailable_with_its_exit_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    ingester = IngestProcess(tmp_path / "log", tmp_path / "feedback")
    try:
        with pytest.raises(Unavailable, match=r"feedback ingest process failed \(FileNotFoundError"):
            ingester.submit("m", REGRESSOR, _batch(["a"], [1.0]))
        monkeypatch.setattr(sys, "executable", "/bin/false")  # starts, and exits at once
        with pytest.raises(Unavailable, match=r"exit status 1"):
            ingester.submit("m", REGRESSOR, _batch(["a"], [1.0]))
    finally:
        ingester.close()


def test_a_child_that_stops_reading_times_out_even_mid_send(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch larger than the socket's buffer, to a child that does not read (stopped here; starved at
    SCHED_IDLE in life): the send itself must time out, not hold the ingest (and the gateway's shutdown)."""
    from gateway.feedback import ingester as module

    monkeypatch.setattr(module, "ANSWER_TIMEOUT_S", 1.0)
    ingester = IngestProcess(tmp_path / "log", tmp_path / "feedback")
    try:
        ingester.submit("m", REGRESSOR, _batch(["a"], [1.0]))
        assert ingester.pid is not None
        os.kill(ingester.pid, signal.SIGSTOP)
        ids = [f"request-{n:08}" for n in range(50_000)]  # ~1.3 MB
        started = time.monotonic()
        with pytest.raises(Unavailable, match="feedback ingest process failed"):
            ingester.submit("m", REGRESSOR, _batch(ids, [1.0] * len(ids)))
        assert time.monotonic() - started < 30
        assert ingester.pid is None  # killed, not asked
    finally:
        ingester.close()


def test_the_child_logs_at_the_gateways_level_and_names_its_worker(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    async def log_a_request() -> None:
        writer = LogWriter(tmp_path / "log", LogConfig())
        await writer.commit(Record("req-0", time.time_ns(), "m", "1"))
        await writer.close()

    asyncio.run(log_a_request())
    [segment] = list_segments(tmp_path / "log")
    (segment / "data.mdb").write_bytes(b"garbage" * 10)  # the child's reader warns that it skips it
    for level, worker in (("warning", 3), ("error", None)):
        ingester = IngestProcess(tmp_path / "log", tmp_path / "feedback", log_level=level, worker=worker)
        try:
            assert ingester.submit("m", REGRESSOR, _batch(["req-0"], [1.0])).unknown_ids == ["req-0"]
        finally:
            ingester.close()
    lines = [line for line in capfd.readouterr().err.splitlines() if "damaged segment skipped" in line]
    assert len(lines) == 1, lines  # at "error" the warning is not written
    assert " WARNING worker 3 gateway.requestlog.reader (feedback ingest process " in lines[0]


def test_a_repeat_in_a_batch_of_entries_and_columns_names_what_it_repeats(tmp_path: Path) -> None:
    """Column rows' indices follow the entries': a repeat used to name `row N` counting the entries too."""

    async def log_requests() -> None:
        writer = LogWriter(tmp_path / "log", LogConfig())
        for request_id in "abcd":
            await writer.commit(Record(request_id, time.time_ns(), "m", "1"))
        await writer.close()

    asyncio.run(log_requests())
    entries = [pb.Feedback(request_id=i, value=1.0) for i in "ab"]
    columns = pb.FeedbackColumns(request_ids=list("cadc"), values=[1.0] * 4)
    reader, store = LogReader(tmp_path / "log"), FeedbackStore(tmp_path / "feedback")
    try:
        outcome = submit(store, reader, "m", REGRESSOR, entries, columns)
    finally:
        reader.close()
        store.close()
    assert outcome.stored == 4
    assert [i.reason for i in outcome.invalid] == [
        "columns.request_ids[1]: 'a' repeats entries[0] in this batch; send one truth per request",
        "columns.request_ids[3]: 'c' repeats row 0 in this batch; send one truth per request",
    ]
