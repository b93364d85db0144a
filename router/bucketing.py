"""Stable bucketing of routing keys and the weighted pick over contiguous bucket ranges (pure-Python reference).

`native/routing.pyx` implements exactly this for the request path; this module is the readable definition
the tests hold it equal to, and it imports nothing compiled.

Hash: FNV-1a 64 over the key's UTF-8 bytes, then MurmurHash3's `fmix64` finaliser. Both are fixed,
published functions, so a key lands in the same bucket in every process, worker and restart (Python's
`hash` is salted per process). FNV-1a alone mixes its low bits poorly (the multiply only carries upward),
so `h % 10000` of raw FNV would follow the last characters of similar keys such as `user-17`, `user-18`;
the finaliser spreads every input bit over the output. A 64-bit salt is XOR-ed in before the finaliser,
which gives each purpose its own independent draw from one pass over the key: a model's split is salted
by the model name (so the same users are not the canary cohort of every model at once) and each shadow
rule by model and version (so whether a request is mirrored does not depend on which version served it).

Pick: the split's versions, in order, own contiguous bucket ranges `[0, w0)`, `[w0, w0 + w1)`, ...;
a key's version is the range its bucket falls in. Moving a boundary moves only the keys between the old
and the new boundary, and only from one neighbour to the other: 1=9500 2=500 → 1=9000 2=1000 moves
buckets [9000, 9500) from version 1 to version 2 and nothing back. Requests without a key draw a random
bucket and use the same ranges, so keyed and unkeyed traffic follow the same weights.

Outcome: one integer saying which version serves and which shadows fire, `index * 2**n_shadows + mask`,
so the route table can map it to a decision built once instead of allocating one per request.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

BUCKETS = 10_000
"""Buckets per split: one bucket is one basis point (0.01%) of traffic."""

MAX_SHADOWS = 8
"""Shadow rules per model; the outcome table has 2**MAX_SHADOWS entries per version at most."""

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def key_hash(key: str) -> int:
    """FNV-1a 64 of the key's UTF-8 bytes: the one pass over the key that every draw derives from."""
    h = FNV_OFFSET
    for byte in key.encode("utf-8"):
        h = ((h ^ byte) * FNV_PRIME) & _MASK64
    return h


def mix(h: int) -> int:
    """MurmurHash3's fmix64 finaliser: a bijection on 64 bits with full avalanche."""
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK64
    h ^= h >> 33
    return h


def salt_for(*parts: str) -> int:
    """The salt of one purpose, e.g. `salt_for(model)` for a split, `salt_for(model, "shadow", version)`."""
    return key_hash("\x00".join(parts))


def bucket(key: str, salt: int = 0) -> int:
    """The key's bucket in [0, BUCKETS) for the draw named by `salt`."""
    return mix(key_hash(key) ^ salt) % BUCKETS


def check_split(
    split: Sequence[tuple[str, int]], shadows: Sequence[tuple[str, int, int]]
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """Versions, cumulative bounds and shadow versions of a split, or ValueError when it cannot be picked from.

    Route rules are validated with messages for operators before they get here (router.rules); this guards
    the invariants the pick relies on (the native pick would read past its table without them).
    """
    if not split:
        raise ValueError("split has no versions")
    weights = [bps for _, bps in split]
    if any(not 0 <= bps <= BUCKETS for bps in weights) or sum(weights) != BUCKETS:
        raise ValueError(f"split weights must be in [0, {BUCKETS}] and sum to {BUCKETS}: {weights}")
    if len(shadows) > MAX_SHADOWS:
        raise ValueError(f"at most {MAX_SHADOWS} shadows, got {len(shadows)}")
    if any(not 0 <= bps <= BUCKETS for _, bps, _ in shadows):
        raise ValueError(f"shadow weights must be in [0, {BUCKETS}]: {[bps for _, bps, _ in shadows]}")
    return tuple(v for v, _ in split), tuple(accumulate(weights)), tuple(v for v, _, _ in shadows)


def outcome_table(versions: Sequence[str], shadow_versions: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """What each outcome number means: entry `index * 2**len(shadow_versions) + mask` is (version, fired shadows)."""
    return tuple(
        (version, tuple(shadow for j, shadow in enumerate(shadow_versions) if mask >> j & 1))
        for version in versions
        for mask in range(1 << len(shadow_versions))
    )


class ReferenceSplit:
    """One route's split and shadow rules, compiled once; the same interface as `native.routing.Split`.

    `split` is ((version, bps), ...) in range order; `salt` names the split's draw; `shadows` is
    ((version, bps, salt), ...); `seed` fixes the random draws of unkeyed requests (tests), None seeds
    from the OS.
    """

    def __init__(
        self,
        split: Sequence[tuple[str, int]],
        salt: int = 0,
        shadows: Sequence[tuple[str, int, int]] = (),
        seed: int | None = None,
    ) -> None:
        self.versions, self._bounds, self.shadow_versions = check_split(split, shadows)
        self._salt = salt
        self._shadows = tuple((bps, shadow_salt) for _, bps, shadow_salt in shadows)
        # A shadow never mirrors a request to the version that already answered it.
        self._exclude = tuple(
            sum(1 << j for j, shadow in enumerate(self.shadow_versions) if shadow == version)
            for version in self.versions
        )
        self._random = random.Random(seed).random

    def bucket(self, key: str) -> int:
        return mix(key_hash(key) ^ self._salt) % BUCKETS

    def pick_bucket(self, b: int) -> str:
        if not 0 <= b < BUCKETS:
            raise ValueError(f"bucket {b} is outside [0, {BUCKETS})")
        return self.versions[bisect_right(self._bounds, b)]

    def pick(self, key: str) -> str:
        return self.pick_bucket(self.bucket(key))

    def pick_random(self) -> str:
        return self.pick_bucket(self._draw())

    def outcome(self, key: str) -> int:
        h = key_hash(key)
        index = bisect_right(self._bounds, mix(h ^ self._salt) % BUCKETS)
        mask = 0
        for j, (bps, shadow_salt) in enumerate(self._shadows):
            if mix(h ^ shadow_salt) % BUCKETS < bps:
                mask |= 1 << j
        return (index << len(self._shadows)) | (mask & ~self._exclude[index])

    def outcome_random(self) -> int:
        index = bisect_right(self._bounds, self._draw())
        mask = 0
        for j, (bps, _) in enumerate(self._shadows):
            if self._draw() < bps:
                mask |= 1 << j
        return (index << len(self._shadows)) | (mask & ~self._exclude[index])

    def _draw(self) -> int:
        return int(self._random() * BUCKETS)
