"""Rollouts shared by worker processes on real LMDB state: an operator's action through another worker
while slot 0 is inside `tick()` is not written over by slot 0's decision, and rollouts started through
two workers at once get distinct ids.

The other worker is a child process (LMDB opens an environment once per process). It acts from inside
this process's tick or start, at the point where that has read the stored state and not yet saved it;
this process waits until the child has finished, or waits for a lock this process holds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.stats import LATENCY_BUCKETS, Counts
from router.analysis import Thresholds
from router.control import RouteControl
from router.rollout import Plan, RolloutManager, RolloutStore
from router.store import RouteStore

READY = {model: {"1", "2"} for model in ("a", "b")}
STEPS = (1000, 5000, 10000)  # 10%, 50%, promotion


def plan(model: str) -> Plan:
    return Plan(model, "2", STEPS, 60.0, step_shadow_bps=0, thresholds=Thresholds(min_requests=10))


def worker(state: Path, clock: list[float], hook: list[Callable[[], None]]) -> tuple[RouteControl, RolloutManager]:
    """One worker's route control and rollout manager. Every version answers 100 requests a second, all
    fast and right, so every gate passes; the first measure after `hook` is set calls it."""

    def measure(model: str, version: str, role: str) -> Counts:
        if hook:
            hook.pop()()
        requests = int(clock[0] * 100)
        latency = [0] * LATENCY_BUCKETS
        latency[100] = requests
        return Counts(requests=requests, latency=tuple(latency))

    routes = RouteControl(RouteStore(state / "routes"), lambda: READY, poll_s=0)
    rollouts = RolloutStore(state / "rollouts")
    return routes, RolloutManager(rollouts, routes, measure, lambda m, p, s: (0, 0, 0), now=lambda: clock[0])


OTHER_WORKER = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_rollout_workers import plan, worker
state, action, model = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
_, manager = worker(state, [1050.0], [])
if action == "start":
    rollout = manager.start(plan(model), who="bob", why="roll out v2")
else:
    rollout = getattr(manager, action)(model, who="bob", why="looking at a dashboard")
print(json.dumps({"id": rollout.id, "state": rollout.state}))
"""


def waits_for_a_lock(pid: int) -> bool:
    """Whether process `pid` is blocked on an flock (listed as a waiter, `->`, in /proc/locks)."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1:3] == ["->", "FLOCK"] and fields[5] == str(pid):
            return True
    return False


def other_worker(state: Path, action: str, model: str, done: dict[str, Any]) -> Callable[[], None]:
    """A hook: run `action` through another worker process; return once it has finished (its answer in
    `done`) or waits for a lock this process holds (finished later: `done["child"]`)."""

    def act() -> None:
        args = [sys.executable, "-c", OTHER_WORKER, str(Path(__file__).parent), str(state), action, model]
        child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while child.poll() is None and not waits_for_a_lock(child.pid):
            assert time.monotonic() < deadline, "the other worker neither finished nor waited for a lock"
            time.sleep(0.01)
        done["child"] = child

    return act


def answer(done: dict[str, Any]) -> dict[str, Any]:
    out, err = done["child"].communicate(timeout=60)
    assert done["child"].returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.mark.parametrize("action", ["pause", "abort"])
def test_an_action_through_another_worker_during_a_tick_is_not_written_over(tmp_path: Path, action: str) -> None:
    clock, hook = [1000.0], []
    routes, manager = worker(tmp_path, clock, hook)
    routes.promote("a", "1", who="alice", why="baseline")
    manager.start(plan("a"), who="alice", why="roll out v2")
    clock[0] = 1100.0  # step 1's interval has passed: this tick advances to step 2
    done: dict[str, Any] = {}
    hook.append(other_worker(tmp_path, action, "a", done))
    manager.tick()
    told = answer(done)
    (stored,) = manager.rollouts("a")
    assert told["state"] == stored.state == {"pause": "paused", "abort": "aborted"}[action], stored.outcome
    if action == "abort":
        assert routes.route("a").split == (("1", 10000),)  # type: ignore[union-attr]
        manager.start(plan("a"), who="alice", why="again")  # the model has no active rollout left


def test_rollouts_started_through_two_workers_at_once_get_distinct_ids(tmp_path: Path) -> None:
    clock, hook = [1000.0], []
    routes, manager = worker(tmp_path, clock, hook)
    for model in ("a", "b"):
        routes.promote(model, "1", who="alice", why="baseline")
    done: dict[str, Any] = {}
    hook.append(other_worker(tmp_path, "start", "b", done))  # while this start has chosen its id, unsaved
    mine = manager.start(plan("a"), who="alice", why="roll out v2")
    theirs = answer(done)
    stored = {r.id: r.plan.model for r in manager.rollouts()}
    assert mine.id != theirs["id"]
    assert stored == {mine.id: "a", theirs["id"]: "b"}
