"""How many requests may wait for a model version: a deep queue for bursts, a shallow one under overload.

A queue that fills for a moment and drains is doing its job (a burst absorbed); one that stays full
only adds latency: the model already runs at its peak rate with one batch waiting, and every request
admitted behind a second batch waits a whole run longer (CoDel's "good queue" and "bad queue"). So
the default bound is two batches, and once the queue has stood full for several runs (requests
refused all along and never less than a batch waiting after a batch left) it holds one batch until
no request has been refused for as long. Under a sustained overload, admitted requests then wait
about as long as at the sustainable point, while a burst at moderate load still finds room.
"""

from __future__ import annotations

STANDING_RUNS = 8  # the queue must stand full this many batch runs before it shrinks, and stay calm as long to grow
STANDING_MIN_S = 0.01  # ...and at least this long (tiny models' runs are microseconds)
RUN_EWMA_WEIGHT = 0.1


class QueueBound:
    """The current limit on waiting requests of one version: `deep`, or `shallow` while a queue stands.
    Called on the event loop, except `ran` (the model's thread; a float assignment)."""

    def __init__(self, deep: int, shallow: int) -> None:
        self.deep = deep
        self.shallow = min(shallow, deep)
        self.limit = deep
        self.run_s = 0.0  # moving average of a batch run's wall time
        self._full_since: float | None = None  # the first refusal since the queue last had slack
        self._last_refusal = 0.0

    @property
    def standing(self) -> bool:
        """The queue stood full and is held to one batch."""
        return self.limit < self.deep

    def _window_s(self) -> float:
        return max(STANDING_RUNS * self.run_s, STANDING_MIN_S)

    def admits(self, waiting: int, now: float) -> bool:
        """Whether one more request may wait behind `waiting` (`now`: time.monotonic())."""
        if self.standing and now - self._last_refusal > self._window_s():
            self.limit = self.deep  # the overload passed: bursts get the deep queue again
        if waiting < self.limit:
            return True
        self._last_refusal = now
        if self._full_since is None:
            self._full_since = now
        elif not self.standing and now - self._full_since >= self._window_s():
            self.limit = self.shallow
        return False

    def taken(self, waiting: int) -> None:
        """A batch left the queue and `waiting` requests remain: fewer than a batch is slack."""
        if waiting < self.shallow:
            self._full_since = None

    def ran(self, seconds: float) -> None:
        self.run_s = seconds if self.run_s == 0.0 else self.run_s + (seconds - self.run_s) * RUN_EWMA_WEIGHT


def queue_bound(max_queue: int, max_batch_size: int) -> QueueBound | None:
    """The bound a model's `max_queue` asks for: 0 is unlimited (None), a number is fixed, -1 (the
    default) is two batches that shrink to one while the queue stands full."""
    if max_queue == 0:
        return None
    if max_queue > 0:
        return QueueBound(max_queue, max_queue)
    batch = max(1, max_batch_size)
    return QueueBound(2 * batch, batch)
