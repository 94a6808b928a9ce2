"""Warm-start model files cannot run code: an npz read without pickle, exact round trip, clear errors."""
from __future__ import annotations
import io
import os
import pickle
from pathlib import Path
import numpy as np
import pytest
from flink_job.config import JobConfig
from flink_job.stages.train import TrainStage
from model.config import ModelConfig
from model.mf import OnlineBiasedMF
from model.warm_start import main as warm_start


class _RunsCode:
    """Unpickling this runs a shell command that leaves a marker file: what a hostile 'model file' would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _trained(tmp_path: Path) -> Path:
    history = tmp_path / "u.data"
    history.write_text("".join(f"{1 + k % 6}\t{1 + k % 9}\t{1 + k % 5}\t{880000000 + k}\n" for k in range(300)))
    out = tmp_path / "state.npz"
    warm_start(["--input", str(history), "--out", str(out), "--epochs", "2", "--set", "dim=8"])
    return out


def test_the_warm_start_file_is_an_npz_that_restores_the_model_exactly(tmp_path: Path) -> None:
    out = _trained(tmp_path)
    data = out.read_bytes()
    assert data.startswith(b"PK\x03\x04")  # a zip (.npz), not a pickle
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:  # every member loads without pickle
        assert all(archive[name].dtype != object for name in archive.files)
    loaded = OnlineBiasedMF.from_file_bytes(data)
    again = OnlineBiasedMF.from_bytes(loaded.state_bytes())
    assert loaded.step > 0 and len(loaded.users) == 6 and loaded.config.dim == 8
    users, items = ["1", "2", "nobody"], ["1", "5", "new"]
    np.testing.assert_array_equal(loaded.score_items(users, items), again.score_items(users, items))
    # The file holds the same state as the pickled form the job checkpoints.
    m = OnlineBiasedMF(ModelConfig(dim=8, seed=3))
    m.learn_many(["u1", "u2", "u1"], ["i1", "i2", "i3"], np.array([4, 0, 1]), np.array([5.0, 1.0, 1.0]))
    assert OnlineBiasedMF.from_file_bytes(m.file_bytes()).state_bytes() == m.state_bytes()


def test_a_pickled_model_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = tmp_path / "state.bin"
    hostile.write_bytes(pickle.dumps({"version": 4, "payload": _RunsCode(marker)}))
    cfg = JobConfig.load(overrides=[f"flink.initial_model={hostile}"])
    with pytest.raises(ValueError) as err:
        TrainStage(cfg)
    assert f"flink.initial_model {hostile}: a pickle, refused" in str(err.value)
    assert not marker.exists()
    # The old format, an honest pickled state_bytes, is refused the same way: pickle is never read from a file.
    honest = tmp_path / "old.bin"
    honest.write_bytes(OnlineBiasedMF(ModelConfig(dim=4)).state_bytes())
    with pytest.raises(ValueError, match="a pickle, refused"):
        OnlineBiasedMF.from_file_bytes(honest.read_bytes())


def test_an_npz_smuggling_a_pickle_in_an_object_array_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = OnlineBiasedMF(ModelConfig(dim=4)).file_bytes()
    with np.load(io.BytesIO(good), allow_pickle=False) as archive:
        members = {name: archive[name] for name in archive.files}
    # Every array member replaced by an object array whose pickle runs code when NumPy unpickles it.
    hostile = {name: (v if name == "__tree__" else np.array([_RunsCode(marker)], dtype=object))
               for name, v in members.items()}
    buf = io.BytesIO()
    np.savez(buf, **hostile)  # pickles object arrays
    with pytest.raises(ValueError, match="model file: not a readable model file: ValueError: Object arrays"):
        OnlineBiasedMF.from_file_bytes(buf.getvalue())
    assert not marker.exists()


@pytest.mark.parametrize("data", [b"", b"garbage", b"PK\x03\x04broken zip"])
def test_other_content_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"^model file: not a (readable )?model file"):
        OnlineBiasedMF.from_file_bytes(data)


def test_a_well_formed_archive_with_a_wrong_state_is_a_clear_error() -> None:
    from model import portable

    with pytest.raises(ValueError, match="model file: not a usable model state: KeyError"):
        OnlineBiasedMF.from_file_bytes(portable.dumps({"version": 4}))
    nested = b"[" * 100_000 + b"]" * 100_000  # deep JSON in the structure member
    buf = io.BytesIO()
    np.savez(buf, __tree__=np.frombuffer(nested, np.uint8))
    with pytest.raises(ValueError, match="model file: not a readable model file: RecursionError"):
        OnlineBiasedMF.from_file_bytes(buf.getvalue())

