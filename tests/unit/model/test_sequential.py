"""A micro-batch is learned in event order in sub-steps, each tested just before it trains (model.sequential)."""
from __future__ import annotations

import numpy as np
import torch

from model.config import ExtrasConfig, ModelConfig, OptimizerConfig
from model.mf import OnlineBiasedMF
from model.ranking_extras import RankingExtras
from model.sequential import split, step_size
from model.tables import EmbeddingTable, Step

R = 4  # rating action code


def _model(sub_batch: int) -> OnlineBiasedMF:
    """Sub-steps of ``sub_batch`` events whatever the batch size (no budget)."""
    return OnlineBiasedMF(ModelConfig(dim=4, seed=3, optimizer=OptimizerConfig(sub_batch=sub_batch, sub_step_budget=0)))


def _ratings(n: int) -> np.ndarray:
    return np.array([1.0 + k % 5 for k in range(n)])


def test_a_users_second_event_is_scored_after_the_sub_step_holding_the_first_trained() -> None:
    m = _model(sub_batch=2)
    users, items = ["a", "b", "a", "c"], ["x", "y", "z", "x"]
    seen: list[tuple[slice, np.ndarray, int]] = []

    def evaluate(part: slice, offset: np.ndarray) -> None:  # what the model knows of user a when this part is scored
        row = m.users.lookup(["a"])
        seen.append((part, m.user_table.params[row].clone().numpy(), int(m.extras.history_next[row[0]])))

    m.learn_many(users, items, np.full(4, R), _ratings(4), evaluate=evaluate)
    assert [p for p, _, _ in seen] == [slice(0, 2), slice(2, 4)]
    (_, first, history_first), (_, second, history_second) = seen
    untrained = _model(sub_batch=2)
    untrained.admit(users, items, None)
    np.testing.assert_array_equal(first, untrained.user_table.params[untrained.users.lookup(["a"])].numpy())
    assert not np.array_equal(first, second)  # a's first event trained before its second was scored
    assert (history_first, history_second) == (0, 1)  # and it counts in a's history term


def test_no_event_is_scored_after_its_own_update_nor_by_a_model_that_saw_a_later_event() -> None:
    m = _model(sub_batch=3)
    rng = np.random.default_rng(0)
    users = [f"u{k}" for k in rng.integers(0, 4, 20)]
    items = [f"i{k}" for k in rng.integers(0, 6, 20)]
    trained_before: list[tuple[int, int]] = []  # (events of the batch trained, first event of the part scored)

    def evaluate(part: slice, offset: np.ndarray) -> None:
        trained_before.append((m.extras.events_counted, part.start))

    m.learn_many(users, items, np.full(20, R), _ratings(20), evaluate=evaluate)
    # Every event is scored once, in order, by a model trained on exactly the events before its part.
    assert [start for _, start in trained_before] == list(range(0, 20, 3))
    assert all(counted == start for counted, start in trained_before)


def test_sub_steps_of_one_batch_learn_as_separate_batches_of_that_size() -> None:
    users = [f"u{k % 3}" for k in range(8)]
    items = [f"i{k % 5}" for k in range(8)]
    one, many = _model(sub_batch=2), _model(sub_batch=2)
    for m in (one, many):  # every id admitted first, so both tables hold the same rows
        m.learn_many(users, items, np.full(8, R), _ratings(8))
    one.learn_many(users, items, np.full(8, R), _ratings(8))
    for s in range(0, 8, 2):
        many.learn_many(users[s:s + 2], items[s:s + 2], np.full(2, R), _ratings(8)[s:s + 2])
    torch.testing.assert_close(one.user_table.params, many.user_table.params, rtol=0, atol=1e-6)
    torch.testing.assert_close(one.item_table.params, many.item_table.params, rtol=0, atol=1e-6)
    assert one.global_mean == many.global_mean


def test_a_non_finite_sub_step_rolls_the_whole_batch_back_and_every_event_is_still_scored() -> None:
    m = _model(sub_batch=2)
    m.learn_many(["a", "b"], ["x", "y"], np.full(2, R), np.array([4.0, 2.0]))
    before = (m.user_table.params.clone(), m.item_table.params.clone(), m.extras.history.copy(), m.global_mean)
    parts: list[slice] = []
    ratings = np.array([5.0, 1.0, np.nan, 3.0])  # the second sub-step's loss is not finite
    stats = m.learn_many(["a", "b", "a", "b"], ["y", "x", "x", "y"], np.full(4, R), ratings, evaluate=lambda part, offset: parts.append(part))
    assert stats.skipped and m.skipped_batches == 1
    assert parts == [slice(0, 2), slice(2, 4)]
    assert torch.equal(m.user_table.params, before[0]) and torch.equal(m.item_table.params, before[1])
    assert np.array_equal(m.extras.history, before[2]) and m.global_mean == before[3]


def test_small_batches_learn_in_smaller_sub_steps_than_full_ones() -> None:
    assert [step_size(n, 0, 8192) for n in (1, 64, 256, 1024, 4096)] == [1, 1, 8, 128, 2048]
    assert step_size(4096, 512, 8192) == 512 and step_size(4096, 0, 0) == 4096
    m = OnlineBiasedMF(ModelConfig(dim=4, seed=3))  # the defaults: a 256-event batch in 32 sub-steps
    parts: list[slice] = []
    m.learn_many([f"u{k % 7}" for k in range(256)], [f"i{k % 11}" for k in range(256)], np.full(256, R),
                 _ratings(256), evaluate=lambda part, offset: parts.append(part))
    assert len(parts) == 32 and parts[0] == slice(0, 8) and parts[-1] == slice(248, 256)


def test_sub_step_bounds() -> None:
    rows = np.arange(1, 11)
    assert split(rows, 4) == [0, 4, 8, 10] and split(rows, 0) == [0, 10] and split(rows, 20) == [0, 10]
    # One step per user and event: a bound before each user's second event in a step (the fallback row 0 is shared).
    assert split(np.array([1, 2, 1, 3, 3, 0, 0]), 0, once=True) == [0, 2, 4, 7]
    assert split(np.array([1, 2, 3, 4]), 3, once=True) == [0, 3, 4]


def test_a_row_mean_step_moves_a_row_by_the_mean_of_its_entries() -> None:
    t = EmbeddingTable(dim=2, init_std=0.1, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    t.ensure(2)
    before = t.params[1].clone()
    grads = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    t.step(torch.tensor([1, 1]), grads, Step(lr=0.1, optimizer="sgd", row_mean=True))
    torch.testing.assert_close(t.params[1], before - 0.1 * grads.mean(0))


def test_the_vectorised_history_rings_hold_what_one_event_at_a_time_writes() -> None:
    def extras(cooccurrence: float) -> RankingExtras:
        cfg = ModelConfig(dim=2, extras=ExtrasConfig(history_size=3, cooccurrence_weight=cooccurrence,
                                                     cooccurrence_capacity=4096))
        users, items = (EmbeddingTable(2, 0.1, torch.device("cpu"), torch.Generator()) for _ in range(2))
        x = RankingExtras(cfg, torch.device("cpu"), users, items)
        x.grow(20, 200)
        return x

    fast, loop = extras(0.0), extras(1.0)  # co-occurrence on takes the event-by-event path
    rng = np.random.default_rng(1)
    for _ in range(30):
        u = rng.integers(0, 20, int(rng.integers(1, 40)))
        i = rng.integers(0, 100, len(u))
        fast.remember(u, i)
        loop.remember(u, i)
    assert np.array_equal(fast.history, loop.history) and np.array_equal(fast.history_next, loop.history_next)
