"""Running statistics of the cleaning stage: moments merged a batch at a time, a ring of the latest values, and
the outlier bounds read from that ring.

>>> r = Ring(4); r.add(np.log1p(np.array([9.0, 10.0, 11.0, 10.0, 10.0]))); r.ordered().round(3).tolist()
[2.398, 2.485, 2.398, 2.398]
>>> m = Moments(); m.add(np.array([1.0, 3.0])); m.add(np.array([5.0])); m.n, m.mean
(3, 3.0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from model.arrays import Array

MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its standard deviation
MEAN_AD_TO_STD = 1.2533  # sqrt(pi / 2): the same for the mean absolute deviation, used when the MAD is 0


@dataclass
class Moments:
    """Count, mean and sum of squared deviations, merged a batch at a time (Chan et al.'s parallel Welford)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: Array) -> None:
        nb = len(x)
        if not nb:
            return
        mean_b = float(x.mean())
        m2_b = float(np.square(x - mean_b).sum())
        n = self.n + nb
        delta = mean_b - self.mean
        self.mean += delta * nb / n
        self.m2 += m2_b + delta * delta * self.n * nb / n
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n > 1 else 0.0


class Ring:
    """The last ``size`` values added, in a fixed numpy buffer."""

    def __init__(self, size: int) -> None:
        self.values = np.zeros(size, np.float64)
        self.pos = 0
        self.filled = 0

    def add(self, x: Array) -> None:
        size = len(self.values)
        if len(x) >= size:
            self.values[:] = x[len(x) - size:]
            self.pos, self.filled = 0, size
            return
        end = self.pos + len(x)
        if end <= size:
            self.values[self.pos:end] = x
        else:
            split = size - self.pos
            self.values[self.pos:] = x[:split]
            self.values[:end - size] = x[split:]
        self.pos = end % size
        self.filled = min(size, self.filled + len(x))

    def current(self) -> Array:
        """The values held, in no particular order (until full, they sit at the front)."""
        return self.values[:self.filled]

    def ordered(self) -> Array:
        """The values held, oldest first."""
        if self.filled < len(self.values):
            return self.values[:self.filled].copy()
        return np.concatenate([self.values[self.pos:], self.values[:self.pos]])


def outlier_bounds(logs: Array, k: float) -> tuple[float, float] | None:
    """``(low, high)`` on the original scale, from the median and MAD of ``logs`` (log1p of accepted values), ``k``
    scaled deviations either side; None where the values have no spread to judge a value against."""
    med = median(logs)
    dev = np.abs(logs - med)
    scale = MAD_TO_STD * median(dev)
    if scale == 0:  # more than half the values are equal: fall back to the mean absolute deviation
        scale = MEAN_AD_TO_STD * float(dev.mean())
    if scale == 0:
        return None  # all equal
    half = k * scale
    return math.expm1(med - half), math.expm1(min(med + half, 700.0))  # 700: expm1 overflows past ~709


def median(v: Array) -> float:
    """``np.median`` of a non-empty array without NaN, the same number at a quarter of the cost (it skips the NaN
    check and the general reduction machinery).

    >>> median(np.array([3.0, 1.0, 2.0])), median(np.array([4.0, 1.0, 2.0, 3.0]))
    (2.0, 2.5)
    """
    k = len(v) // 2
    if len(v) % 2:
        return float(np.partition(v, k)[k])
    p = np.partition(v, [k - 1, k])
    return float((p[k - 1] + p[k]) / 2)
