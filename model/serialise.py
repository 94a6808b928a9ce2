"""The model's whole state as bytes: pickled for the job's own Flink checkpoints, or portable (``model.portable``,
never unpickled) for files other processes load, such as the warm-start model.

Each part of the model writes its own part of the snapshot; this module only lays them out under the keys of
``STATE_VERSION`` 4, so snapshots written before the model was split into parts load unchanged.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from model import portable
from model.config import ModelConfig
from model.replay import Reservoir
from model.sampler import WeightedSampler

if TYPE_CHECKING:
    from model.mf import OnlineBiasedMF

STATE_VERSION = 4
CORE_SCALARS = ("rating_sum", "rating_count", "step", "batches_seen", "skipped_batches")  # the model's own counters
M = TypeVar("M", bound="OnlineBiasedMF")


def state_bytes(m: OnlineBiasedMF) -> bytes:
    """The whole model and optimiser state; ``from_state(pickle.loads(...))`` restores it exactly."""
    # Tensors as numpy arrays under plain pickle: the job serialises this at every bundle, and torch.save took
    # several times as long.
    return pickle.dumps(
        {
            "version": STATE_VERSION,
            "config": m.config.to_flat(),  # the flat keys of format 4
            **m.lifecycle.state(),
            "user_table": m.user_table.state(),
            "item_table": m.item_table.state(),
            "sampler": m.ranking.sampler.state(),
            "reservoir": m.reservoir.state(),
            # its own pickle: it shares no memo entries with the rest
            "extras": pickle.dumps(m.extras.state(m.users.size, m.items.size), pickle.HIGHEST_PROTOCOL),
            "scalars": {"events_counted": m.extras.events_counted, **{k: getattr(m, k) for k in CORE_SCALARS},
                        **m.lifecycle.scalars()},
            "torch_rng": m.generator.get_state().numpy(),
            "np_rng": m.rng.bit_generator.state,
        },
        pickle.HIGHEST_PROTOCOL,
    )


def load_pickle(data: bytes) -> dict[str, Any]:
    """The state ``state_bytes`` wrote. Pickle: only for the job's own state (its Flink checkpoints)."""
    state: dict[str, Any] = pickle.loads(data)
    if "extras" in state:
        state["extras"] = pickle.loads(state["extras"])
    return state


def file_bytes(m: OnlineBiasedMF) -> bytes:
    """``state_bytes`` in a format that cannot run code when read."""
    return portable.dumps(load_pickle(state_bytes(m)))  # made just now, by this process


def load_file(data: bytes, what: str, build: Callable[[dict[str, Any]], M]) -> M:
    """The model ``build`` makes of the state ``file_bytes`` wrote; never unpickles. Raises ``ValueError`` naming
    ``what`` for a pickle or any other content it cannot use."""
    state = portable.loads(data, what)
    try:
        return build(state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as ex:
        raise ValueError(f"{what}: not a usable model state: {type(ex).__name__}: {ex}") from None


def from_state(cls: type[M], state: dict[str, Any], config: ModelConfig | None) -> M:
    """The model of ``state`` under ``config`` (default: the saved one), which may differ: what was learned is kept
    and the new settings apply from then on."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"model: state version {state.get('version')} is not {STATE_VERSION}")
    old = ModelConfig.from_dict(state["config"])
    m = cls(config or old)
    m.lifecycle.load(state)
    m.user_table.load(state["user_table"])
    m.item_table.load(state["item_table"])
    if m.config.optimizer.name != old.optimizer.name:  # the other optimiser's state means nothing to this one
        for t in (m.user_table, m.item_table):
            t.acc.zero_()
            t.steps.zero_()
    _load_scalars(m, state["scalars"])
    m.grow()  # the per-row extras must cover every loaded row before they are filled
    m.extras.load(state.get("extras"), m.users.size)
    m.reservoir = Reservoir.from_state(m.config.stability.replay_size, state["reservoir"])
    m.generator.set_state(torch.from_numpy(state["torch_rng"]))
    m.rng.bit_generator.state = state["np_rng"]
    if (m.config.objective.negatives, m.config.objective.popularity_power) == (
            old.objective.negatives, old.objective.popularity_power):
        m.ranking.sampler = WeightedSampler.from_state(state["sampler"])
    else:
        m.ranking.rebuild(m.items)
    return m


def _load_scalars(m: OnlineBiasedMF, scalars: dict[str, Any]) -> None:
    """Each saved counter back to the part that owns it (freshly unpickled: shared with nobody)."""
    lifecycle = m.lifecycle.scalars()
    for k, v in scalars.items():
        owner: object = m.extras if k == "events_counted" else m.lifecycle if k in lifecycle else m
        setattr(owner, k, v)
