"""ModelConfig's sections: each validates itself, and the flat keys of older versions map to their place."""
from __future__ import annotations

import dataclasses

import pytest

from model.config import (FLAT_KEYS, SECTIONS, ExtrasConfig, IdsConfig, ModelConfig, ObjectiveConfig,
                          OptimizerConfig, StabilityConfig)


@pytest.mark.parametrize("build, message", [
    (lambda: OptimizerConfig(name="rmsprop"),
     "config: model.optimizer.name must be one of adagrad, adam, sgd, got 'rmsprop'"),
    (lambda: OptimizerConfig(lr=0), "config: model.optimizer.lr must be positive, got 0"),
    (lambda: OptimizerConfig(adam_beta2=1.0), r"config: model.optimizer.adam_beta2 must be in \[0, 1\), got 1.0"),
    (lambda: ObjectiveConfig(negatives="hard"), "config: model.objective.negatives must be one of"),
    (lambda: ObjectiveConfig(implicit_negatives=-1), "config: model.objective.implicit_negatives must be >= 0"),
    (lambda: ExtrasConfig(cooccurrence_capacity=0), "config: model.extras.cooccurrence_capacity must be positive"),
    (lambda: IdsConfig(max_rows=0), "config: model.ids.max_rows must be positive, got 0"),
    (lambda: StabilityConfig(replay_weight=-1.0), "config: model.stability.replay_weight must be >= 0, got -1.0"),
    (lambda: ModelConfig(device="tpu"), "config: model.device must be one of auto, cpu, cuda or cuda:N, got 'tpu'"),
    (lambda: ModelConfig(device="cuda:x"), "config: model.device must be one of auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (lambda: ModelConfig(rating_min=5.0, rating_max=1.0), "config: model.rating_min must be below model.rating_max"),
])
def test_each_section_names_the_key_and_the_value_it_rejects(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_every_old_flat_key_maps_to_one_field_of_a_section() -> None:
    """The alias table is derived from the fields, so it covers every sectioned field exactly once."""
    sectioned = {(s, f.name) for s, t in SECTIONS.items() for f in dataclasses.fields(t)}
    assert set(FLAT_KEYS.values()) == sectioned and len(FLAT_KEYS) == len(sectioned)
    assert FLAT_KEYS["optimizer"] == ("optimizer", "name") and FLAT_KEYS["lr"] == ("optimizer", "lr")
    assert FLAT_KEYS["max_rows"] == ("ids", "max_rows") and FLAT_KEYS["replay_size"] == ("stability", "replay_size")


def test_flat_and_nested_settings_round_trip() -> None:
    cfg = ModelConfig(dim=8, optimizer=OptimizerConfig(name="adam", lr=0.2), ids=IdsConfig(ttl_ms=0))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    flat = cfg.to_flat()
    assert flat["optimizer"] == "adam" and flat["lr"] == 0.2 and flat["ttl_ms"] == 0 and flat["dim"] == 8
    assert ModelConfig.from_dict(flat) == cfg
    with pytest.raises(ValueError, match=r"unknown key 'model.optimizer.lrr' \(model.optimizer has: .*lr,"):
        ModelConfig.from_dict({"optimizer": {"lrr": 1}})
    with pytest.raises(ValueError, match=r"unknown key 'model.nope' \(model has: dim, .*optimizer.lr"):
        ModelConfig.from_dict({"nope": 1})


def test_settings_recorded_with_the_retired_test_seam_still_load() -> None:
    """Model states and stage snapshots of older versions recorded ``testing.inject_nan_every`` (nested) or
    ``inject_nan_every`` (flat): it is dropped, the rest is kept."""
    flat = {**ModelConfig(dim=8).to_flat(), "inject_nan_every": 0}
    assert ModelConfig.from_dict(flat) == ModelConfig(dim=8)
    nested = {**ModelConfig(dim=8).to_dict(), "testing": {"inject_nan_every": 4}}
    assert ModelConfig.from_dict(nested) == ModelConfig(dim=8)
