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

