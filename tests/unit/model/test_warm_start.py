"""Pre-training from a file and the warm-start command."""
from __future__ import annotations
from pathlib import Path
import numpy as np
from model.config import ModelConfig
from model.mf import OnlineBiasedMF
from model.warm_start import main as warm_start_main
from model.warm_start import read_log


def test_pretrain_then_stream_and_the_cli_writes_a_loadable_state(tmp_path: Path) -> None:
    log = tmp_path / "u.data"
    rng = np.random.default_rng(0)
    log.write_text("".join(f"{rng.integers(20)}\t{rng.integers(30)}\t{rng.integers(1, 6)}\t{1000 - k}\n"
                           for k in range(500)))
    data = read_log(log)
    assert (np.diff(data.ts) >= 0).all() and data.ts[0] == 501_000
    m = OnlineBiasedMF(ModelConfig(dim=4))
    assert m.pretrain(data.users, data.items, data.actions, data.values, ts=data.ts, epochs=3, batch_size=100) == 15
    assert int(m.event_counts("user", np.flatnonzero(m.users.live_mask())).sum()) == 500  # counted once
    out = tmp_path / "state.bin"
    warm_start_main(["--input", str(log), "--out", str(out), "--set", "dim=4", "--epochs", "2"])
    loaded = OnlineBiasedMF.from_file_bytes(out.read_bytes())
    assert len(loaded.users) == len(set(data.users)) and loaded.config.dim == 4
    jl = tmp_path / "events.jsonl"
    jl.write_text('{"user_id":"u1","item_id":"i1","action":"click","value":1.0,"ts":5}\n'
                  '{"user_id":"u2","item_id":"i1","action":"rating","value":4.0,"ts":3}\n')
    ev = read_log(jl)
    assert ev.users == ["u2", "u1"] and ev.actions.tolist() == [4, 1]



def test_the_cli_takes_sectioned_and_old_flat_settings(tmp_path: Path) -> None:
    import pytest
    log = tmp_path / "u.data"
    log.write_text("".join(f"{k % 7}\t{k % 5}\t{1 + k % 5}\t{k}\n" for k in range(50)))
    out = tmp_path / "state.bin"
    warm_start_main(["--input", str(log), "--out", str(out), "--set", "dim=4", "--set", "optimizer=sgd",
                     "--set", "optimizer.lr=0.2", "--set", "ids.max_rows=64"])
    cfg = OnlineBiasedMF.from_file_bytes(out.read_bytes()).config
    assert (cfg.dim, cfg.optimizer.name, cfg.optimizer.lr, cfg.ids.max_rows) == (4, "sgd", 0.2, 64)
    with pytest.raises(SystemExit, match="warm start: config: unknown key 'model.optimizer.lrate'"):
        warm_start_main(["--input", str(log), "--out", str(out), "--set", "optimizer.lrate=1"])
