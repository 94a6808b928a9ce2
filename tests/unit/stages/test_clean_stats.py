"""Running statistics: merged moments equal the whole stream's, the ring keeps the latest values, and the
outlier bounds follow the median and spread."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flink_job.stages.clean_stats import Moments, Ring, median, outlier_bounds


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(-1e3, 1e3), max_size=20), max_size=8))
def test_batched_moments_equal_those_of_the_whole_stream(batches: list[list[float]]) -> None:
    m = Moments()
    for b in batches:
        m.add(np.array(b, np.float64))
    whole = np.array([x for b in batches for x in b], np.float64)
    assert m.n == len(whole)
    if len(whole):
        assert m.mean == pytest.approx(whole.mean(), abs=1e-9)
        assert m.std == pytest.approx(whole.std() if len(whole) > 1 else 0.0, rel=1e-6, abs=1e-6)


@given(st.lists(st.lists(st.floats(-1e3, 1e3), max_size=9), max_size=8))
def test_the_ring_holds_the_latest_values_oldest_first(batches: list[list[float]]) -> None:
    ring = Ring(5)
    for b in batches:
        ring.add(np.array(b, np.float64))
    whole = [x for b in batches for x in b]
    assert ring.ordered().tolist() == whole[-5:]
    assert sorted(ring.current().tolist()) == sorted(whole[-5:])


def test_outlier_bounds_widen_with_the_spread_and_need_one() -> None:
    narrow = outlier_bounds(np.log1p(np.array([9.0, 10.0, 11.0] * 10)), k=3.0)
    wide = outlier_bounds(np.log1p(np.array([5.0, 10.0, 20.0] * 10)), k=3.0)
    assert narrow is not None and wide is not None
    assert wide[0] < narrow[0] < 10.0 < narrow[1] < wide[1]
    assert outlier_bounds(np.full(10, 2.0), k=3.0) is None  # no spread


@given(st.lists(st.floats(0, 50), min_size=1, max_size=40))
def test_the_median_is_numpys(values: list[float]) -> None:
    v = np.array(values, np.float64)
    assert median(v) == float(np.median(v))
