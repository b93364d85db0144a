"""`serve --workers 2`: two processes on one port, one request log, one route table, one status.

Each new gRPC channel (with its own subchannel pool) is a new connection, and the kernel gives each
connection to one of the workers listening with SO_REUSEPORT; the log record's `worker` says which
one answered.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import GatewayProcess
from models import mlp_graph, save_model
from test_admin_cli import cli
from test_routing import Admin, _admin_token, _mlp, _split

from gateway.config import ServerConfig
from gateway.ood.profile import PROFILE_FILE, build_profile, save_profile
from gateway.protocol import Stub, admin
from gateway.requestlog.reader import LogReader, Query
from gateway.workerboard import PUBLISH_INTERVAL_S

CONNECTIONS = 24  # all on one worker by chance: 2 * 2**-24
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # else channels to one address share a connection
# A route change made through one worker reaches the other within its route poll interval (the contract):
# a request the other worker gets sooner may still be routed by the table it had.
ROUTE_OBEYED_S = 10 * ServerConfig().route_poll_ms / 1000


def _channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=OWN_CONNECTION)


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("workers-models")
    save_model(repo, "mlp", "1", mlp_graph(seed=0))
    save_model(repo, "mlp", "2", mlp_graph(seed=1))
    return repo


@pytest.fixture(scope="module")
def workers(two_versions: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    # No repository watcher: a version appears only by LoadModel through one worker, which the other follows.
    config = "[repository]\nwatch_interval_s = 0\n"
    gateway = GatewayProcess(two_versions, config, tmp_path_factory.mktemp("workers"), workers=2)
    gateway.wait_ready()
    yield gateway
    gateway.stop()


def _infer_on_new_connections(address: str, count: int, prefix: str, key: str | None = None) -> dict[str, str]:
    """Request id → the version that answered, one fresh connection per request."""
    answered = {}
    metadata = [("x-user-id", key)] if key else None
    for i in range(count):
        with _channel(address) as channel:
            response = Stub(channel).ModelInfer(_mlp(f"{prefix}-{i}"), metadata=metadata, timeout=10)
            answered[response.id] = response.model_version
    return answered


def _records(gateway: GatewayProcess, prefix: str) -> list:  # type: ignore[type-arg]
    reader = LogReader(gateway.state_dir / "log")
    try:
        return [r for r in reader.query(Query(model="mlp")) if r.id.startswith(prefix)]
    finally:
        reader.close()


def _status(gateway: GatewayProcess) -> admin.GetStatusResponse:
    return Admin(gateway).GetStatus(admin.GetStatusRequest(model="mlp", window_s=600))


def _split_everywhere(ops: Admin, model: str, weights: str, why: str) -> None:
    """Set a split through one worker and wait until every worker routes by it."""
    _split(ops, model, weights, why)
    time.sleep(ROUTE_OBEYED_S)


def test_both_workers_serve_and_log_which_one_answered(workers: GatewayProcess) -> None:
    answered = _infer_on_new_connections(workers.address, CONNECTIONS, "spread")
    records = _records(workers, "spread-")
    assert sorted(r.id for r in records) == sorted(answered)
    assert {r.worker for r in records} == {0, 1}


def test_status_from_any_worker_reports_the_whole_gateway(workers: GatewayProcess) -> None:
    time.sleep(2 * PUBLISH_INTERVAL_S)  # every earlier request published
    before = _status(workers)
    served = {w.slot: w.requests for w in before.workers}
    _infer_on_new_connections(workers.address, CONNECTIONS, "status")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the other worker publishes its figures every second
        after = _status(workers)
        if sum(w.requests for w in after.workers) - sum(served.values()) == CONNECTIONS:
            break
        time.sleep(0.2)
    assert [w.slot for w in after.workers] == [0, 1]
    assert sum(w.requests for w in after.workers) - sum(served.values()) == CONNECTIONS
    assert all(w.requests > served[w.slot] for w in after.workers)  # both took some
    primary = [t for t in after.models[0].traffic if t.role == "primary"]
    assert sum(t.requests for t in primary) == sum(w.requests for w in after.workers)


def test_the_status_command_lists_the_workers(workers: GatewayProcess) -> None:
    result = cli(workers, "status", "mlp")
    assert result.returncode == 0, result.stderr
    assert "2 workers (figures above summed over them)" in result.stdout
    listed = json.loads(cli(workers, "status", "mlp", "--json").stdout)["workers"]
    assert [w["slot"] for w in listed] == [0, 1] and all(w["pid"] > 0 for w in listed)


def test_a_route_change_through_one_worker_is_obeyed_by_both(workers: GatewayProcess) -> None:
    ops = Admin(workers)
    _split_everywhere(ops, "mlp", "2=10000", "workers test: all to v2")
    try:
        answered = _infer_on_new_connections(workers.address, CONNECTIONS, "moved")
        assert set(answered.values()) == {"2"}
        assert {r.worker for r in _records(workers, "moved-")} == {0, 1}
    finally:
        _split_everywhere(ops, "mlp", "1=10000", "workers test: back to v1")
    assert set(_infer_on_new_connections(workers.address, 8, "back").values()) == {"1"}


def test_sticky_keys_get_one_version_whichever_worker_serves(workers: GatewayProcess) -> None:
    ops = Admin(workers)
    ops.SetSticky(admin.SetStickyRequest(model="mlp", sticky_key="x-user-id", reason="workers sticky test"))
    _split_everywhere(ops, "mlp", "1=5000 2=5000", "workers sticky test")
    try:
        versions = {key: _infer_on_new_connections(workers.address, 6, f"sticky-{key}", key) for key in "abcdefgh"}
        assert all(len(set(answers.values())) == 1 for answers in versions.values()), versions
        assert {v for answers in versions.values() for v in answers.values()} == {"1", "2"}
        assert {r.worker for r in _records(workers, "sticky-")} == {0, 1}
    finally:
        _split_everywhere(ops, "mlp", "1=10000", "end of workers sticky test")
        ops.SetSticky(admin.SetStickyRequest(model="mlp", sticky_key="", reason="end of workers sticky test"))


def test_a_killed_worker_loses_no_acknowledged_record_and_is_replaced(workers: GatewayProcess) -> None:
    victim = next(w for w in _status(workers).workers if w.slot == 1)
    acknowledged: list[str] = []
    stop = threading.Event()

    def send() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                with _channel(workers.address) as channel:
                    acknowledged.append(Stub(channel).ModelInfer(_mlp(f"kill-{i}"), timeout=5).id)
            except grpc.RpcError:
                pass  # the connection the dying worker held: not acknowledged, may be lost

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGKILL)
    time.sleep(1.0)
    stop.set()
    sender.join()
    logged = {r.id for r in _records(workers, "kill-")}
    assert acknowledged and set(acknowledged) <= logged
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        slot = next((w for w in _status(workers).workers if w.slot == 1), None)
        if slot is not None and slot.pid != victim.pid and slot.restarts == victim.restarts + 1:
            break
        time.sleep(0.3)
    assert slot is not None and slot.pid != victim.pid, workers.log
    assert slot.restarts == victim.restarts + 1
    assert f"worker 1 (pid {victim.pid}) exited with code -9; restarting it" in workers.log
    while workers.log.count("worker 1 gateway.server: listening on") < 2:  # it listens once its models are warm
        assert time.monotonic() < deadline, workers.log
        time.sleep(0.1)
    answered = _infer_on_new_connections(workers.address, CONNECTIONS, "after-kill")
    assert {r.worker for r in _records(workers, "after-kill-")} == {0, 1}
    assert len(answered) == CONNECTIONS


def _answers_from_version(address: str, version: str, prefix: str) -> Counter[str]:
    """Status code name (OK or the error) of one request per fresh connection asking for `version`."""
    outcomes: Counter[str] = Counter()
    for i in range(CONNECTIONS):
        with _channel(address) as channel:
            try:
                Stub(channel).ModelInfer(_mlp(f"{prefix}-{i}", version=version), timeout=10)
                outcomes["OK"] += 1
            except grpc.RpcError as e:
                outcomes[e.code().name] += 1
    return outcomes


def test_a_version_loaded_through_one_worker_is_loaded_by_every_worker(
    workers: GatewayProcess, two_versions: Path
) -> None:
    save_model(two_versions, "mlp", "3", mlp_graph(seed=2))
    ops = Admin(workers)
    ops.LoadModel(admin.LoadModelRequest(model="mlp", version="3", reason="workers test: load v3"))
    deadline = time.monotonic() + 20
    while True:  # a route may send traffic to v3 only once every worker has it ready
        try:
            _split_everywhere(ops, "mlp", "3=10000", "workers test: all to v3")
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "'3'" in (e.details() or ""), e.details()
            assert time.monotonic() < deadline, workers.log
            time.sleep(0.1)
    assert set(_infer_on_new_connections(workers.address, CONNECTIONS, "routed-v3").values()) == {"3"}
    while _answers_from_version(workers.address, "3", "v3") != {"OK": CONNECTIONS}:
        assert time.monotonic() < deadline, workers.log  # the other worker follows within a second or so
        time.sleep(0.3)
    assert {r.worker for r in _records(workers, "v3-")} == {0, 1}
    assert "loaded, following change" in workers.log
    _split_everywhere(ops, "mlp", "1=10000", "workers test: v3 takes no traffic")
    ops.UnloadModel(admin.UnloadModelRequest(model="mlp", version="3", reason="workers test: unload v3"))
    deadline = time.monotonic() + 20
    while (outcomes := _answers_from_version(workers.address, "3", "gone"))["OK"]:
        assert time.monotonic() < deadline, workers.log
        time.sleep(0.3)
    assert outcomes.keys() == {"NOT_FOUND"} or outcomes.keys() == {"UNAVAILABLE"}, outcomes
    shutil.rmtree(two_versions / "mlp" / "3")


def test_a_second_gateway_cannot_take_the_port_of_a_running_one(workers: GatewayProcess, tmp_path: Path) -> None:
    args = ["serve", "--workers", "2", "--port", str(workers.port), "--state-dir", str(tmp_path / "state")]
    result = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"server.port: cannot listen on 127.0.0.1:{workers.port}: Address already in use" in result.stderr


def test_get_drift_reports_every_workers_window_together(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = save_model(tmp_path / "models", "mlp", "1", mlp_graph(seed=0))
    save_profile(build_profile(rng.standard_normal((2000, 32))), path / PROFILE_FILE)
    config = "[ood]\ndrift_check_interval_s = 0.2\ndrift_min_rows = 10\n"
    gateway = GatewayProcess(tmp_path / "models", config, tmp_path, workers=2)
    try:
        gateway.wait_ready()
        _infer_on_new_connections(gateway.address, 40, "drift")
        assert {r.worker for r in _records(gateway, "drift-")} == {0, 1}
        deadline = time.monotonic() + 20
        while True:  # each worker checks drift every 0.2 s and publishes its window every second
            (v1,) = Admin(gateway).GetDrift(admin.GetDriftRequest(model="mlp")).versions
            if v1.window_rows == 40 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert v1.window_rows == 40  # one worker alone saw fewer
        assert len(v1.features) == 32 and all(sum(f.live_fractions) == pytest.approx(1.0) for f in v1.features)
    finally:
        assert gateway.stop() == 0, gateway.log


def test_sigterm_drains_every_worker(two_versions: Path, tmp_path: Path) -> None:
    gateway = GatewayProcess(two_versions, None, tmp_path, workers=2)
    gateway.wait_ready()
    pids = [w.pid for w in _status(gateway).workers]
    assert gateway.stop() == 0, gateway.log
    assert len(pids) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert gateway.log.count("gateway.server: stopped") == 2


def test_a_worker_that_dies_while_draining_makes_the_gateway_exit_non_zero(two_versions: Path, tmp_path: Path) -> None:
    gateway = GatewayProcess(two_versions, None, tmp_path, workers=2)
    gateway.wait_ready()
    victim = _status(gateway).workers[1].pid
    gateway.process.send_signal(signal.SIGTERM)
    os.kill(victim, signal.SIGKILL)  # during its drain: the drain did not complete
    assert gateway.process.wait(60) == 1, gateway.log
    assert "worker 1 exited with code -9 while draining" in gateway.log


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, from /proc/*/stat (this kernel has no /proc/PID/task/*/children)."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:  # it exited meanwhile
            continue
        if stat and int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    found, parents = [], [pid]
    while parents:
        children = _children(parents.pop())
        found += children
        parents += children
    return found


def _running(pid: int) -> bool:
    """Not gone, and not a zombie waiting for whoever adopted it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_killing_the_supervisor_stops_every_worker_and_frees_the_port(two_versions: Path, tmp_path: Path) -> None:
    gateway = GatewayProcess(two_versions, None, tmp_path, workers=2)
    gateway.wait_ready()
    metadata = [("authorization", f"Bearer {_admin_token(gateway)}")]
    for i in range(CONNECTIONS):  # feedback on fresh connections: each worker starts its ingest child
        with _channel(gateway.address) as channel:
            Stub(channel).ModelInfer(_mlp(f"orphan-{i}"), timeout=10)
            entries = [admin.Feedback(request_id=f"orphan-{i}", value=1.0)]
            request = admin.SubmitFeedbackRequest(model="mlp", entries=entries)
            Stub(channel, admin.AdminService).SubmitFeedback(request, metadata=metadata, timeout=30)
    processes = _descendants(gateway.process.pid)  # workers, their ingest children, the resource tracker
    assert "feedback ingest process" in gateway.log and len(processes) >= 4, (processes, gateway.log)
    try:
        os.kill(gateway.process.pid, signal.SIGKILL)
        gateway.process.wait()
        deadline = time.monotonic() + 30  # each worker drains (grace 10 s, nothing in flight) and exits
        while any(map(_running, processes)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in processes if _running(pid)], gateway.log
        with socket.socket() as probe:  # SO_REUSEADDR passes TIME_WAIT connections, not a listener
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", gateway.port))
            probe.listen()
    finally:
        for pid in processes:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


# The real CLI, except that the supervisor gets SIGTERM while it is starting a replacement worker: after the
# process started, before Supervisor._start returned it (a window a fork and exec on a loaded host can widen).
SIGTERM_IN_START = """
import os, signal, sys
from gateway import supervisor
from gateway.cli import main

start = supervisor.Supervisor._start

def start_then_sigterm(self, slot, restarts):
    worker = start(self, slot, restarts)
    if restarts:
        print(f"TEST: replacement pid {worker.process.pid}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next line
    return worker

if __name__ == "__main__":  # not in the workers, which spawn runs this file in as __mp_main__
    supervisor.Supervisor._start = start_then_sigterm
    sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_a_replacement_worker_starts_stops_it_too(two_versions: Path, tmp_path: Path) -> None:
    script = tmp_path / "sigterm_in_start.py"
    script.write_text(SIGTERM_IN_START)
    gateway = GatewayProcess(two_versions, None, tmp_path, workers=2, cli=(str(script),))
    try:
        gateway.wait_ready()
        os.kill(_status(gateway).workers[1].pid, signal.SIGKILL)  # restarted after 0.5 s, and the stop comes
        assert gateway.process.wait(30) == 0, gateway.log
        replacement = int(gateway.log.split("TEST: replacement pid ")[1].split()[0])
        assert not Path(f"/proc/{replacement}").exists(), gateway.log
    finally:
        gateway.stop()


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine cannot bind the IPv6 loopback address ::1")
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("host", ["::1", "[::1]", "::"])
def test_an_ipv6_host_serves_with_and_without_the_supervisor(
    two_versions: Path, tmp_path: Path, host: str, workers: int
) -> None:
    gateway = GatewayProcess(two_versions, f'[server]\nhost = "{host}"\n', tmp_path, workers=workers)
    try:
        gateway.wait_ready()
        _infer_on_new_connections(gateway.address, CONNECTIONS, "ipv6")  # dialled on [::1]:PORT
        assert {r.worker for r in _records(gateway, "ipv6-")} == ({0, 1} if workers == 2 else {None})
        bare = host.strip("[]")
        assert f"listening on [{bare}]:{gateway.port}" in gateway.log
        assert ("which is not a loopback address" in gateway.log) == (bare == "::"), gateway.log
    finally:
        assert gateway.stop() == 0, gateway.log


def test_a_worker_that_cannot_start_stops_the_gateway_with_its_exit_code(tmp_path: Path) -> None:
    path = save_model(tmp_path / "models", "m", "1", mlp_graph()) / PROFILE_FILE
    path.write_bytes(b"not a profile")
    args = ["serve", "--workers", "2", "--model-repository", str(tmp_path / "models"), "--port", "0"]
    args += ["--state-dir", str(tmp_path / "state")]
    result = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"OOD profile {path}" in result.stderr and "could not start (exit code 2); stopping" in result.stderr


def test_workers_log_into_shared_segments_that_rotate_once(two_versions: Path, tmp_path: Path) -> None:
    config = "[log]\nsegment_max_bytes = 32768\n"
    gateway = GatewayProcess(two_versions, config, tmp_path, workers=2)
    gateway.wait_ready()
    try:
        answered = _infer_on_new_connections(gateway.address, 200, "rotate")
    finally:
        assert gateway.stop() == 0, gateway.log
    records = _records(gateway, "rotate-")
    assert sorted(r.id for r in records) == sorted(answered)
    assert Counter(r.worker for r in records).keys() == {0, 1}
    segments = sorted((gateway.state_dir / "log").glob("seg-*"))
    rotations = gateway.log.count("request log rotated to")
    assert len(segments) >= 2 and rotations == len(segments) - 1  # each rotation made one segment
