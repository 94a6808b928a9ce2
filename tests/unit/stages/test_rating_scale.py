"""A rating scale other than 1-5 by configuration: half stars pass parse, clean, batch, model and evaluation whole."""
from __future__ import annotations

import numpy as np
import orjson
import pytest

from flink_job.config import JobConfig
from flink_job.schema import RATING_CODE
from flink_job.stages.train import TrainStage
from model import rating_offsets
from model.mf import OnlineBiasedMF

HALF_STARS = (0.5, 1.5, 2.5, 3.5, 4.5, 5.0, 3.0)


def _lines(ratings: list[float]) -> list[str]:
    return [f'0,{k},{{"event_id":"r{k}","user_id":"u{k % 5}","item_id":"i{k % 7}","action":"rating",'
            f'"value":{r},"ts":{1_700_000_000_000 + k}}}' for k, r in enumerate(ratings)]


def test_half_stars_reach_the_model_and_the_evaluator_unrounded() -> None:
    ratings = [HALF_STARS[k % len(HALF_STARS)] for k in range(64)]
    # One sub-step per batch (budget 0), so that the whole first batch is scored by the untrained model
    stage = TrainStage(JobConfig.load(overrides=["batch.size=32", "model.rating_min=0.5", "eval.user_sample=1.0",
                                                 "model.optimizer.sub_step_budget=0"]))
    out = stage.on_chunk(_lines(ratings), now_ms=1_700_000_000_000 + 10**6)
    assert out.trained == 64 and out.dead_letters == []
    last = orjson.loads(out.stats[-1])
    assert last["rating_mean"] == pytest.approx(sum(ratings) / 64, abs=1e-12)  # the exact half stars were learned
    assert last["prequential"]["rated"] == 64 and last["prequential"]["positives"] == sum(r >= 4 for r in ratings)
    # the evaluator's error is against the half stars: the first batch is scored by an untrained model (its new rows
    # start near zero, at model.init_std), the middle of the scale moved by what the batch's earlier half stars teach
    # the mean and the biases (model.rating_offsets)
    first = orjson.loads(out.stats[0])["quality"]
    untrained = OnlineBiasedMF(stage.cfg.model, RATING_CODE)
    users, items = [f"u{k % 5}" for k in range(32)], [f"i{k % 7}" for k in range(32)]
    u, i = untrained.admit(users, items, None)
    half = np.array(ratings[:32])
    offset = rating_offsets.in_step(untrained, u, i, half, np.ones(32, bool))
    pred = np.clip(untrained.predict_ratings(users, items) + offset, 0.5, 5.0)
    assert offset[0] == 0.0 and pred[0] == pytest.approx((0.5 + 5.0) / 2, abs=0.2)
    assert first["sq_err"] == pytest.approx(float(((half - pred) ** 2).sum()), rel=1e-4)


def test_the_default_scale_dead_letters_a_half_star_below_one() -> None:
    stage = TrainStage(JobConfig.load(overrides=["batch.size=2"]))
    out = stage.on_chunk(_lines([0.5, 3.5]), now_ms=1_700_000_000_000 + 10**6)
    assert [d.reason for d in out.dead_letters] == ["rating_out_of_range"]
