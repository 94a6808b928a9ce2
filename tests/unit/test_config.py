"""The configuration: YAML, environment and overrides in layers."""
from __future__ import annotations
import pytest
from flink_job.config import JobConfig


def test_config_layers_yaml_env_and_overrides(tmp_path, monkeypatch) -> None:
    f = tmp_path / "job.yaml"
    f.write_text("batch:\n  size: 100\nkafka:\n  input_topic: from-yaml\n")
    monkeypatch.setenv("STREAMREC__BATCH__SIZE", "200")
    cfg = JobConfig.load(f, ["kafka.input_topic=from-cli"])
    assert cfg.batch.size == 200 and cfg.kafka.input_topic == "from-cli"
    with pytest.raises(ValueError, match="unknown section"):
        JobConfig.load(overrides=["nope.size=1"])
    with pytest.raises(ValueError, match="expects int"):
        JobConfig.load(overrides=["batch.size=big"])
    with pytest.raises(ValueError, match="must be positive"):
        JobConfig.load(overrides=["batch.size=0"])



def test_model_settings_nest_in_yaml_dotted_overrides_and_the_environment(tmp_path, monkeypatch) -> None:
    f = tmp_path / "job.yaml"
    f.write_text("model:\n  dim: 8\n  optimizer: {lr: 0.1, name: adam}\n  ids:\n    max_rows: 64\n")
    monkeypatch.setenv("STREAMREC__MODEL__OBJECTIVE__NEGATIVES", "in_batch")
    cfg = JobConfig.load(f, ["model.optimizer.lr=0.3", "model.stability.replay_size=5"])
    m = cfg.model
    assert (m.dim, m.optimizer.lr, m.optimizer.name, m.ids.max_rows) == (8, 0.3, "adam", 64)
    assert m.objective.negatives == "in_batch" and m.stability.replay_size == 5
    assert isinstance(m.optimizer.lr, float) and isinstance(m.ids.max_rows, int)


def test_old_flat_model_keys_still_load_and_the_later_setting_wins(tmp_path) -> None:
    """Existing files and overrides use ``model.lr``; each lands where its nested key does, so precedence holds
    whichever form each layer used."""
    f = tmp_path / "old.yaml"
    f.write_text("model:\n  lr: 0.2\n  optimizer: sgd\n  max_rows: 32\n  ttl_ms: 9\n")
    m = JobConfig.load(f).model
    assert (m.optimizer.lr, m.optimizer.name, m.ids.max_rows, m.ids.ttl_ms) == (0.2, "sgd", 32, 9)
    assert JobConfig.load(f, ["model.optimizer.lr=0.4"]).model.optimizer.lr == 0.4
    nested = tmp_path / "new.yaml"
    nested.write_text("model:\n  optimizer: {lr: 0.2, name: adam}\n")
    m = JobConfig.load(nested, ["model.lr=0.7", "model.replay_size=9"]).model
    assert (m.optimizer.lr, m.optimizer.name, m.stability.replay_size) == (0.7, "adam", 9)


def test_unknown_or_misplaced_model_keys_fail_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown key 'model.optimizer.lrate' \(model.optimizer has: name, lr,"):
        JobConfig.load(overrides=["model.optimizer.lrate=0.1"])
    with pytest.raises(ValueError, match=r"unknown key 'model.nope' \(model has: dim, .*optimizer, objective"):
        JobConfig.load(overrides=["model.nope=1"])
    with pytest.raises(ValueError, match=r"config: model.ids.ttl_ms expects int, got 'soon'"):
        JobConfig.load(overrides=["model.ids.ttl_ms=soon"])
    with pytest.raises(ValueError, match=r"config: model.ids.max_rows must be positive, got 0"):
        JobConfig.load(overrides=["model.max_rows=0"])
    with pytest.raises(ValueError, match=r"config: model.dim is a value, not a section"):
        JobConfig.load(overrides=["model.dim=3", "model.dim.x=1"])


def test_a_configuration_that_sets_the_retired_test_seam_fails_saying_why(tmp_path) -> None:
    """``model.testing.inject_nan_every`` was a test seam: a configuration asking for NaN batches gets none, so it
    fails rather than run without them, in every form the key could be written."""
    seam = "model.testing.inject_nan_every is no longer a setting: it was a test seam"
    with pytest.raises(ValueError, match=seam):
        JobConfig.load(overrides=["model.testing.inject_nan_every=4"])
    with pytest.raises(ValueError, match="model.inject_nan_every is no longer a setting"):
        JobConfig.load(overrides=["model.inject_nan_every=4"])
    f = tmp_path / "old.yaml"
    f.write_text("model:\n  testing: {inject_nan_every: 0}\n")
    with pytest.raises(ValueError, match="model.testing is no longer a setting: it was a test seam"):
        JobConfig.load(f)


def test_stage_settings_are_nested_and_old_flat_records_map_into_them() -> None:
    cfg = JobConfig.load(overrides=["model.optimizer.lr=0.3"])
    recorded = cfg.stage_settings()
    assert recorded["model"]["optimizer"]["lr"] == 0.3
    old_record = {**recorded, "model": {"lr": 0.5, "optimizer": "sgd", "ttl_ms": 7, "retired_key": 1,
                                         "inject_nan_every": 4}}
    restored = JobConfig.load().with_stage_settings(old_record).model
    assert (restored.optimizer.lr, restored.optimizer.name, restored.ids.ttl_ms) == (0.5, "sgd", 7)
    assert restored.ids.max_rows == cfg.model.ids.max_rows


def test_a_replay_runs_where_this_run_is_not_where_the_recording_ran() -> None:
    """A checkpoint written on a GPU (``cuda:1`` of a parallel trainer, 8 threads) restores on a CPU machine: the
    recorded learning settings apply to the replay, the device and threads stay this run's."""
    recorded = JobConfig.load(overrides=["model.device=cuda:1", "model.threads=8", "model.optimizer.lr=0.3"])
    here = JobConfig.load(overrides=["model.device=cpu"]).with_stage_settings(recorded.stage_settings()).model
    assert (here.device, here.threads, here.optimizer.lr) == ("cpu", 1, 0.3)


def test_a_written_configuration_loads_back_the_same(tmp_path) -> None:
    """The runner hands its child process ``to_dict()`` as YAML: the nested model sections must load back."""
    import yaml
    cfg = JobConfig.load(overrides=["model.optimizer.name=adam", "model.extras.history_size=3", "model.seed=4"])
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump(cfg.to_dict()))
    assert JobConfig.load(f) == cfg
