"""Interleaved A/B measurement on a shared machine: windows of A and B alternate in ABBA order, so
each pair sees nearly the same neighbours, and the verdict is a statistic of the per-pair ratios."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


def abba(pairs: int, a: T, b: T) -> Iterator[tuple[int, tuple[T, T]]]:
    """(pair number from 1, the order to measure in): (a, b), (b, a), (a, b), ..."""
    for number in range(1, pairs + 1):
        yield number, (a, b) if number % 2 else (b, a)


def quartiles(ratios: list[float]) -> tuple[float, float, float]:
    """Lower quartile, median and upper quartile of the per-pair ratios (one ratio: itself thrice)."""
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, _, high = statistics.quantiles(ratios, n=4)
    return low, statistics.median(ratios), high
