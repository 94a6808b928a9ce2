"""The prequential evaluator: hand-computed ranks, candidate growth and seen sets within a batch, rating error with
clipping, user sampling, state round trip, and batch evaluation against a naive per-event reference."""
from __future__ import annotations

import math
import pickle
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.prequential import Prequential, in_sample

from tests.helpers import ML100K
NAN = math.nan


class TableScorer:
    """Scores from a table (item -> score, the same for every user, unless a (user, item) entry overrides it)."""

    def __init__(self, scores: Mapping[str, float] | None = None, pairs: Mapping[tuple[str, str], float] | None = None,
                 ratings: Mapping[str, float] | None = None) -> None:
        self.scores = dict(scores or {})
        self.pairs = dict(pairs or {})
        self.ratings = dict(ratings or {})
        self.calls: list[tuple[list[str], int]] = []

    def predict_ratings(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        return np.array([self.ratings.get(i, 3.0) for i in items])

    def score_items(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        self.calls.append((list(users), len(items)))
        return np.array([[self.pairs.get((u, i), self.scores.get(i, 0.0)) for i in items] for u in users])


def _batch(ev: Prequential, scorer: TableScorer, events: list[tuple[str, str, float, bool]]) -> dict[str, float]:
    users, items, ratings, positive = zip(*events, strict=True) if events else ((), (), (), ())
    return ev.evaluate(scorer, list(users), list(items), np.array(ratings, float), np.array(positive, bool))


def _warm(ev: Prequential, scorer: TableScorer, items: str) -> None:
    """Make ``items`` candidates through a user nobody ranks."""
    _batch(ev, scorer, [("warm", i, NAN, False) for i in items])


# -- ranking by hand


def test_rank_counts_ties_against_the_model() -> None:
    scorer = TableScorer({"a": 1.0, "b": 2.0, "c": 2.0, "d": 3.0})
    for k, hit in [(2, 0), (3, 1)]:
        ev = Prequential(k=k)
        _warm(ev, scorer, "abcd")
        out = _batch(ev, scorer, [("u", "b", NAN, True)])  # c ties with b, d beats it: rank 2
        assert (out["positives"], out["hits"]) == (1, hit)
        assert out["ndcg_sum"] == pytest.approx(hit * 1 / math.log2(4))


def test_hr_and_ndcg_values() -> None:
    scorer = TableScorer({"a": 3.0, "b": 2.0, "c": 1.0})
    ev = Prequential(k=2)
    _warm(ev, scorer, "abc")
    out = _batch(ev, scorer, [("u1", "a", 5.0, True), ("u2", "b", 4.0, True), ("u3", "c", 4.0, True)])
    # ranks 0, 1, 2: two hits at k=2, NDCG 1 + 1/log2(3) over three positives
    assert (out["positives"], out["hits"]) == (3, 2)
    assert out["hr"] == pytest.approx(2 / 3)
    assert out["ndcg"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    s = ev.summary()
    assert (s["hr"], s["positives"], s["events"]) == (out["hr"], 3, 6)


def test_an_item_first_appearing_later_in_the_batch_is_no_candidate_for_an_earlier_event() -> None:
    scorer = TableScorer({"a": 1.0, "z": 9.0})
    ev = Prequential(k=1)
    out = _batch(ev, scorer, [("u", "a", NAN, True), ("v", "z", NAN, False)])
    assert out["hits"] == 1  # z was not there yet: a ranks first
    assert scorer.calls == [(["u"], 2)]  # one call, over the full candidate list
    out = _batch(ev, scorer, [("w", "a", NAN, True)])
    assert out["hits"] == 0  # now z is a candidate and beats a


def test_a_new_item_is_a_candidate_for_its_own_event() -> None:
    ev = Prequential(k=1)
    scorer = TableScorer({"a": 1.0, "b": 2.0})
    out = _batch(ev, scorer, [("x", "a", NAN, False), ("u", "b", NAN, True)])
    assert out["hits"] == 1


def test_items_the_user_met_before_are_excluded_also_within_the_batch() -> None:
    scorer = TableScorer({"a": 5.0, "b": 4.0, "c": 1.0})
    ev = Prequential(k=1)
    _batch(ev, scorer, [("u", "a", 2.0, False)])  # seen in an earlier batch, though not a positive
    out = _batch(ev, scorer, [
        ("u", "b", 3.0, False),  # seen earlier in this batch
        ("u", "c", 5.0, True),  # a and b are excluded: rank 0
        ("v", "c", 5.0, True),  # v met nothing: a and b rank above c
    ])
    assert (out["positives"], out["hits"]) == (2, 1)


def test_a_repeated_item_is_ranked_against_the_other_candidates() -> None:
    scorer = TableScorer({"a": 2.0, "b": 1.0})
    ev = Prequential(k=1)
    out = _batch(ev, scorer, [("u", "a", NAN, True), ("u", "b", NAN, False), ("u", "a", NAN, True)])
    assert (out["positives"], out["hits"]) == (2, 2)


def test_scores_are_per_user() -> None:
    scorer = TableScorer({"a": 1.0, "b": 2.0}, pairs={("u", "a"): 3.0})
    ev = Prequential(k=1)
    _warm(ev, scorer, "ab")
    out = _batch(ev, scorer, [("u", "a", NAN, True), ("v", "a", NAN, True)])
    assert out["hits"] == 1
    assert scorer.calls[-1] == (["u", "v"], 2)  # distinct users, one call


def test_a_batch_without_positives_calls_no_score_items() -> None:
    scorer = TableScorer()
    ev = Prequential()
    out = _batch(ev, scorer, [("u", "a", 3.0, False)])
    assert scorer.calls == [] and out["positives"] == 0 and math.isnan(out["hr"])


# -- rating error


def test_rmse_and_mae_clip_predictions_and_skip_events_without_a_rating() -> None:
    scorer = TableScorer(ratings={"hi": 6.0, "lo": 0.0, "mid": 3.0})
    ev = Prequential()
    out = _batch(ev, scorer, [
        ("u", "hi", 5.0, False),  # 6 -> 5: error 0
        ("u", "lo", 2.0, False),  # 0 -> 1: error 1
        ("u", "mid", 4.0, False),  # error 1
        ("u", "none", NAN, False),  # implicit: no rating error
    ])
    assert (out["rated"], out["events"]) == (3, 4)
    assert out["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert out["mae"] == pytest.approx(2 / 3)
    ev2 = Prequential(rating_min=-math.inf, rating_max=math.inf)  # no clipping
    assert _batch(ev2, scorer, [("u", "hi", 5.0, False)])["mae"] == pytest.approx(1.0)


def test_empty_batch_and_empty_summary() -> None:
    ev = Prequential()
    out = _batch(ev, TableScorer(), [])
    assert out["events"] == 0 and math.isnan(out["rmse"])
    s = ev.summary()
    assert s["events"] == 0 and math.isnan(s["rmse"]) and math.isnan(s["hr"])


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"user_sample": 0.0}, {"user_sample": 1.5},
                                    {"rating_min": 5.0, "rating_max": 1.0}])
def test_bad_settings_are_configuration_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="prequential"):
        Prequential(**kwargs)  # type: ignore[arg-type]


def test_bad_inputs_name_what_was_received() -> None:
    ev = Prequential()
    with pytest.raises(ValueError, match="one length"):
        ev.evaluate(TableScorer(), ["u"], ["a", "b"], np.array([NAN]), np.array([True]))

    class Wrong(TableScorer):
        def score_items(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
            return np.zeros((len(users), len(items) + 1))

    with pytest.raises(ValueError, match="score_items returned shape"):
        ev.evaluate(Wrong(), ["u"], ["a"], np.array([NAN]), np.array([True]))


# -- sampling and state


def test_user_sample_is_a_stable_hash() -> None:
    users = [f"user-{n}" for n in range(2000)]
    picked = [u for u in users if in_sample(u, 0.25)]
    assert picked == [u for u in users if zlib.crc32(u.encode()) < 0.25 * 2**32]
    assert 400 < len(picked) < 600
    assert all(in_sample(u, 1.0) for u in users)


def test_user_sample_ranks_and_remembers_only_sampled_users_but_rates_everyone() -> None:
    users = [f"user-{n}" for n in range(200)]
    scorer = TableScorer({"a": 1.0})
    ev = Prequential(user_sample=0.3)
    out = _batch(ev, scorer, [(u, "a", 4.0, True) for u in users])
    sampled = [u for u in users if in_sample(u, 0.3)]
    assert out["rated"] == 200 and out["positives"] == len(sampled) == len(ev.state_dict()["seen_users"])
    assert scorer.calls == [(sampled, 1)]
    again = Prequential(user_sample=0.3)
    assert _batch(again, scorer, [(u, "a", 4.0, True) for u in users]) == out


def test_state_round_trip_is_exact() -> None:
    rng = np.random.default_rng(3)
    scorer = TableScorer({f"i{n}": float(rng.integers(0, 4)) for n in range(30)})

    def batch() -> list[tuple[str, str, float, bool]]:
        return [(f"u{rng.integers(0, 8)}", f"i{rng.integers(0, 30)}", float(r), bool(r >= 4))
                for r in rng.integers(1, 6, 50)]

    ev = Prequential(k=5, user_sample=0.7)
    _batch(ev, scorer, batch())
    restored = Prequential(k=5, user_sample=0.7)
    restored.load_state_dict(pickle.loads(pickle.dumps(ev.state_dict())))
    assert _state_eq(restored.state_dict(), ev.state_dict())
    nxt = batch()
    assert _batch(restored, scorer, nxt) == _batch(ev, scorer, nxt)
    assert restored.summary() == ev.summary()
    with pytest.raises(ValueError, match="state has"):
        Prequential(k=10).load_state_dict(ev.state_dict())


def _state_eq(a: dict[str, object], b: dict[str, object]) -> bool:
    return a == b  # the seen log is an array of pairs, compared by value


# -- against a naive per-event reference


class HashScorer:
    """A fixed scorer with many ties: a function of (user, item) only."""

    def predict_ratings(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        return np.array([zlib.crc32(f"r{u}|{i}".encode()) % 70 / 10.0 for u, i in zip(users, items, strict=True)])

    def score_items(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        return np.array([[zlib.crc32(f"{u}|{i}".encode()) % 3 for i in items] for u in users], float)


def _reference(events: list[tuple[str, str, float, bool]], k: int, user_sample: float) -> dict[str, float]:
    scorer = HashScorer()
    appeared: list[str] = []
    seen: dict[str, set[str]] = {}
    hits = positives = rated = 0
    ndcg = sq = ab = 0.0
    for u, i, r, pos in events:
        if not math.isnan(r):
            pred = min(max(float(scorer.predict_ratings([u], [i])[0]), 1.0), 5.0)
            sq += (r - pred) ** 2
            ab += abs(r - pred)
            rated += 1
        if i not in appeared:
            appeared.append(i)
        if pos and in_sample(u, user_sample):
            cands = [c for c in appeared if c not in seen.get(u, set())]
            score = dict(zip(appeared, scorer.score_items([u], appeared)[0], strict=True))
            rank = sum(1 for c in cands if c != i and score[c] >= score[i])
            positives += 1
            if rank < k:
                hits += 1
                ndcg += 1 / math.log2(rank + 2)
        seen.setdefault(u, set()).add(i)
    return {"hits": hits, "positives": positives, "ndcg_sum": ndcg, "rated": rated, "sq_err": sq, "abs_err": ab}


_event = st.tuples(
    st.sampled_from([f"u{n}" for n in range(5)]),
    st.sampled_from([f"i{n}" for n in range(8)]),
    st.one_of(st.just(NAN), st.integers(1, 5).map(float)),
    st.booleans(),
).map(lambda e: (e[0], e[1], e[2], e[2] >= 4 if not math.isnan(e[2]) else e[3]))


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(_event, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=6),
    k=st.integers(1, 4),
    user_sample=st.sampled_from([1.0, 0.5]),
)
def test_batches_match_a_naive_per_event_reference(
    events: list[tuple[str, str, float, bool]], cuts: list[int], k: int, user_sample: float
) -> None:
    ev = Prequential(k=k, user_sample=user_sample)
    bounds = sorted({0, len(events), *(c for c in cuts if c < len(events))})
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        part = events[lo:hi]
        users, items, ratings, positive = zip(*part, strict=True)
        ev.evaluate(HashScorer(), list(users), list(items), np.array(ratings), np.array(positive))
    want = _reference(events, k, user_sample)
    st_ = ev.state_dict()["totals"]
    assert (st_["hits"], st_["positives"], st_["rated"]) == (want["hits"], want["positives"], want["rated"])
    assert st_["ndcg_sum"] == pytest.approx(want["ndcg_sum"])
    assert st_["sq_err"] == pytest.approx(want["sq_err"])
    assert st_["abs_err"] == pytest.approx(want["abs_err"])


# -- the ML-100K benchmark's pieces


def test_load_stream_sorts_by_time_keeping_the_file_order_of_ties(tmp_path: Path) -> None:
    from benchmarks.ml100k import load_stream

    (tmp_path / "u.data").write_text("1\t10\t5\t300\n2\t20\t3\t100\n3\t30\t4\t300\n4\t40\t1\t100\n")
    s = load_stream(tmp_path)
    assert s.users == ["2", "4", "1", "3"] and s.items == ["20", "40", "10", "30"]
    assert s.ratings.tolist() == [3.0, 1.0, 5.0, 4.0] and s.positive.tolist() == [False, False, True, True]


def test_run_model_tests_every_batch_before_training_on_it() -> None:
    from benchmarks.ml100k import Stream, run_model
    from model.config import ModelConfig

    rng = np.random.default_rng(0)
    n = 3000
    stream = Stream([f"u{x}" for x in rng.integers(0, 50, n)], [f"i{x}" for x in rng.integers(0, 80, n)],
                    rng.integers(1, 6, n).astype(float), np.arange(n))
    out = run_model(stream, ModelConfig(dim=8, device="cpu"), batch_size=500)
    s = out.summary
    assert (s["events"], s["rated"], s["positives"]) == (n, n, int(stream.positive.sum()))
    assert 0.0 <= s["hr"] <= 1.0 and 0.5 < s["rmse"] < 2.5 and out.model_seconds > 0


@pytest.mark.skipif(not (ML100K / "u.data").is_file(), reason=f"MovieLens 100K is not at {ML100K}")
def test_river_and_popularity_on_a_slice_of_ml100k() -> None:
    pytest.importorskip("river", reason="river is not installed (pip install -e '.[bench]')")
    from benchmarks.ml100k import RiverScorer, load_stream, river_model, run_popularity, run_river

    stream = load_stream(ML100K).head(3000)
    river, pop = run_river(stream), run_popularity(stream)
    n_pos = int(stream.positive.sum())
    assert river.summary["positives"] == pop.summary["positives"] == n_pos
    assert river.summary["rated"] == 3000 and pop.summary["rated"] == 0
    assert 0.8 < river.summary["rmse"] < 1.3
    assert 0.0 < river.summary["hr"] < 0.5 and 0.0 < pop.summary["hr"] < 0.5

    # the vectorised candidate scores are River's own predict_one
    scorer = RiverScorer(river_model())
    ev = Prequential()
    for j in range(1000):
        u, i = stream.users[j], stream.items[j]
        ev.evaluate(scorer, [u], [i], stream.ratings[j:j + 1], stream.positive[j:j + 1])
        scorer.learn_one(u, i, float(stream.ratings[j]))
    user = stream.users[999]
    got = scorer.score_items([user], ev.candidates)[0]
    want = [scorer.model.predict_one(user, i) for i in ev.candidates]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
