"""Bucketing: a stable hash, weights honoured, sticky keys, minimal movement, native == reference."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from functools import partial
from typing import Any

import numpy as np
import pytest

from native import routing as native
from router import bucketing as reference
from router.bucketing import BUCKETS, ReferenceSplit, salt_for
from router.rules import Route, parse_split
from router.table import RouteTable

SPLITS = [native.Split, ReferenceSplit]
KEYED = [("user-42", 1453, 8768), ("alice@example.com", 3736, 5842), ("Zoë", 9721, 8927), ("", 4342, 211)]


@pytest.mark.parametrize("impl", [native, reference])
def test_key_hash_is_fnv1a_64(impl: Any) -> None:
    # Published FNV-1a 64 test vectors.
    assert impl.key_hash("") == 0xCBF29CE484222325
    assert impl.key_hash("a") == 0xAF63DC4C8601EC8C
    assert impl.key_hash("foobar") == 0x85944171F73967E8


@pytest.mark.parametrize("impl", [native, reference])
def test_buckets_are_fixed_values(impl: Any) -> None:
    """Fixed expected buckets: a key's version survives restarts, other workers and new releases."""
    assert salt_for("credit") == 0xDD92EFEAD02710A4
    for key, unsalted, credit in KEYED:
        assert impl.bucket(key) == unsalted
        assert impl.bucket(key, salt_for("credit")) == credit


def test_buckets_agree_across_processes_with_different_hash_seeds() -> None:
    code = "import sys; from native.routing import bucket; print([bucket(k) for k in sys.argv[1:]])"
    keys = [key for key, _, _ in KEYED]
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code, *keys],
            env=dict(os.environ, PYTHONHASHSEED=seed),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "random")
    }
    assert outputs == {str([unsalted for _, unsalted, _ in KEYED])}


def _within_3_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 3 * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("split_type", SPLITS)
def test_unkeyed_picks_follow_the_weights(split_type: type[native.Split]) -> None:
    split = split_type([("1", 9000), ("2", 1000)], 0, (), 7)
    picks = [split.pick_random() for _ in range(20_000)]
    assert set(picks) == {"1", "2"}
    assert _within_3_sigma(picks.count("2"), 20_000, 0.1), picks.count("2")


def test_unkeyed_decisions_follow_the_weights() -> None:
    table = RouteTable({"credit": Route(split=parse_split("1=90 2=10"))}, split_type=partial(native.Split, seed=11))
    versions = [table.decide("credit", ("1", "2")).version for _ in range(20_000)]
    assert _within_3_sigma(versions.count("2"), 20_000, 0.1), versions.count("2")


@pytest.mark.parametrize("split_type", SPLITS)
def test_keyed_picks_follow_the_weights_for_similar_keys(split_type: type[native.Split]) -> None:
    # Sequential keys differ only in their last characters: the finaliser must still spread them.
    split = split_type([("1", 9000), ("2", 1000)], salt_for("credit"))
    picks = [split.pick(f"user-{i}") for i in range(10_000)]
    assert _within_3_sigma(picks.count("2"), 10_000, 0.1), picks.count("2")


@pytest.mark.parametrize("split_type", SPLITS)
def test_keyed_requests_are_sticky(split_type: type[native.Split]) -> None:
    keys = [f"user-{i}" for i in range(1000)]
    first = [split_type([("1", 5000), ("2", 5000)], salt_for("m")).pick(k) for k in keys]
    again = split_type([("1", 5000), ("2", 5000)], salt_for("m"))
    assert [again.pick(k) for k in keys] == first
    assert [again.pick(k) for k in keys] == first


def test_raising_a_canary_moves_only_the_keys_that_must_move() -> None:
    keys = [f"customer-{i:05d}" for i in range(10_000)]
    before = RouteTable({"credit": Route(split=parse_split("1=95 2=5"), sticky_key=None)})
    after = RouteTable({"credit": Route(split=parse_split("2=10 1=90"))})  # typed in another order: same ranges
    was = [before.decide("credit", ("1", "2"), k).version for k in keys]
    now = [after.decide("credit", ("1", "2"), k).version for k in keys]
    moved_up = sum(a == "1" and b == "2" for a, b in zip(was, now, strict=True))
    moved_down = sum(a == "2" and b == "1" for a, b in zip(was, now, strict=True))
    assert 400 <= moved_up <= 600, moved_up
    assert moved_down == 0


def _random_split(rng: np.random.Generator, names: list[str]) -> list[tuple[str, int]]:
    n = int(rng.integers(1, len(names) + 1))
    cuts = np.sort(rng.integers(0, BUCKETS + 1, size=n - 1))
    weights = np.diff(np.concatenate([[0], cuts, [BUCKETS]]))  # zeros included on purpose
    versions = list(rng.choice(names, size=n, replace=False))
    return [(str(v), int(w)) for v, w in zip(versions, weights, strict=True)]


def _random_key(rng: np.random.Generator) -> str:
    length = int(rng.integers(0, 40))
    alphabet = rng.choice(["ascii", "latin", "any"])
    high = {"ascii": 0x7F, "latin": 0x250, "any": 0x10FFFF}[str(alphabet)]
    codes = rng.integers(0, high + 1, size=length)
    return "".join(chr(c) for c in codes if not 0xD800 <= c <= 0xDFFF)  # surrogates are not UTF-8 encodable


def test_native_equals_reference_on_random_inputs() -> None:
    rng = np.random.default_rng(20261123)
    names = [str(i) for i in range(1, 8)] + ["blue", "green"]
    for _ in range(200):
        split = _random_split(rng, names)
        shadow_versions = rng.choice(names, size=int(rng.integers(0, 4)), replace=False)
        shadows = [
            (str(v), int(rng.integers(0, BUCKETS + 1)), int(rng.integers(0, 2**64, dtype=np.uint64)))
            for v in shadow_versions
        ]
        salt = int(rng.integers(0, 2**64, dtype=np.uint64))
        fast, slow = native.Split(split, salt, shadows), ReferenceSplit(split, salt, shadows)
        assert fast.versions == slow.versions and fast.shadow_versions == slow.shadow_versions
        for b in range(0, BUCKETS, 7):
            assert fast.pick_bucket(b) == slow.pick_bucket(b)
        for _ in range(50):
            key = _random_key(rng)
            assert native.key_hash(key) == reference.key_hash(key), key
            assert native.bucket(key, salt) == reference.bucket(key, salt), key
            assert fast.bucket(key) == slow.bucket(key), key
            assert fast.pick(key) == slow.pick(key), key
            assert fast.outcome(key) == slow.outcome(key), key


def test_outcomes_name_the_picked_version_and_never_shadow_it() -> None:
    shadows = [("2", 5000, salt_for("m", "shadow", "2")), ("3", 5000, salt_for("m", "shadow", "3"))]
    split = native.Split([("1", 5000), ("2", 5000)], salt_for("m"), shadows)
    table = reference.outcome_table(split.versions, split.shadow_versions)
    for i in range(2000):
        key = f"k{i}"
        version, fired = table[split.outcome(key)]
        assert version == split.pick(key)
        assert version not in fired
    for _ in range(2000):
        version, fired = table[split.outcome_random()]
        assert version not in fired


def test_shadow_draw_is_independent_of_the_primary_pick() -> None:
    """A 50% shadow mirrors about half of each version's keys, not the keys of one version."""
    split = native.Split([("1", 5000), ("2", 5000)], salt_for("m"), [("3", 5000, salt_for("m", "shadow", "3"))])
    fired = {"1": 0, "2": 0}
    served = {"1": 0, "2": 0}
    for i in range(20_000):
        index = split.outcome(f"user-{i}")
        version = split.versions[index >> 1]
        served[version] += 1
        fired[version] += index & 1
    for version in ("1", "2"):
        assert _within_3_sigma(fired[version], served[version], 0.5), (version, fired, served)


@pytest.mark.parametrize("split_type", SPLITS)
@pytest.mark.parametrize(
    "split, shadows",
    [
        ([], []),
        ([("1", 9000)], []),
        ([("1", 9000), ("2", 2000)], []),
        ([("1", -1), ("2", 10001)], []),
        ([("1", 10000)], [("2", 10001, 0)]),
        ([("1", 10000)], [(str(i), 1, 0) for i in range(9)]),
    ],
)
def test_a_split_that_cannot_be_picked_from_is_refused(
    split_type: type[native.Split], split: list[tuple[str, int]], shadows: list[tuple[str, int, int]]
) -> None:
    with pytest.raises(ValueError):
        split_type(split, 0, shadows)


@pytest.mark.parametrize("split_type", SPLITS)
def test_pick_bucket_outside_the_range_is_refused(split_type: type[native.Split]) -> None:
    split = split_type([("1", 10000)])
    with pytest.raises(ValueError):
        split.pick_bucket(BUCKETS)
    with pytest.raises(ValueError):
        split.pick_bucket(-1)
