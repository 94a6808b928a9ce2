"""Item replicas kept in step: what a user-sharded trainer's own training moved on item rows, and applying the other
trainers' changes (``model.item_delta``).

``ItemSync(model)`` watches the model's item table: the first time a row is about to change after a take, its state
is copied (the base); ``take()`` returns the current state minus the base for the rows copied, and forgets them. The
cost is in the rows moved, never in the table's size. ``apply(delta)`` adds another replica's delta (admitting ids
this one does not hold) and adds it to the base of rows copied too, so it is never sent back as this replica's own.

Under a ``tolerance`` > 0, a row moved only as a sampled negative (no event of its own, nothing new about it) stays in
the journal, its base kept, until its parameters have moved by more than ``tolerance`` times their norm at the base:
a batch over a large catalogue moves most of the catalogue a little as negatives, and sending all of it made every
trainer apply every other's whole table. The rows held are state (``state``/``load_state``): a trainer restored
from a checkpoint still owes the others what it held back.

What is exchanged: the item rows' parameters and optimiser state (additive; the Newton rating count clamped at its
window again after the sum, which is the global capped count when every replica saw the same count before), the
event and step counters, the decayed popularity (in log space), the newest event time and, as scalars, the rating
sum and count of the global mean and the popularity frame's event count (so every replica weighs an event at the
same stream position). Not exchanged: the item co-occurrence term (off by default; each replica counts its own
users' pairs), the proximal anchor (it marks what the replica itself published), and the rows' least-recently-used
stamps (each replica stamps a row it applies to at its own batch count).

>>> from model.config import ModelConfig
>>> from model.mf import OnlineBiasedMF
>>> a, b = OnlineBiasedMF(ModelConfig(dim=4, device="cpu")), OnlineBiasedMF(ModelConfig(dim=4, device="cpu"))
>>> sa, sb = ItemSync(a), ItemSync(b)
>>> _ = a.learn_many(["u1", "u2"], ["i1", "i2"], np.array([4, 4]), np.array([5.0, 3.0]))
>>> rows = sb.apply(sa.take())
>>> bool(np.allclose(a.vectors("item", a.items.lookup(["i1"]))[0], b.vectors("item", b.items.lookup(["i1"]))[0]))
True
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.idmap import FALLBACK_ROW, NO_ID
from model.item_delta import ItemDelta

if TYPE_CHECKING:
    from model.mf import OnlineBiasedMF

Array = np.ndarray[Any, Any]
# Per-row tensors of the item table that training moves, and that a delta carries, in ItemDelta's order.
_COLUMNS = ("params", "acc", "moment", "steps", "updates", "events")


class ItemSync:
    """One replica's journal of the item rows it moved since its last ``take`` (module docstring)."""

    def __init__(self, model: OnlineBiasedMF, tolerance: float = 0.0) -> None:
        self.model = model
        self.tolerance = tolerance  # relative move of a negative-only row before it is sent (0: every move)
        self.table = model.item_table
        self.slot = np.full(0, -1, np.int64)  # (table rows,) where each row's base copy is; -1: none
        self.rows = np.zeros(0, np.int64)  # (slots,) the row of each base copy
        self.generation = np.zeros(0, np.int64)  # (slots,) the row's generation when copied
        self.base: dict[str, torch.Tensor] = {}  # column -> (slots, ...) base copies
        self.base_pop = np.zeros(0)  # (slots,)
        self.touched = np.zeros(0, bool)  # (slots,) the row was about to change since the last take
        self.used = 0  # slots in use
        self._scalars = self._now()
        self._reserve(1)
        self.table.watch = self._capture

    def _now(self) -> tuple[float, int, int]:
        m = self.model
        return m.rating_sum, m.rating_count, m.extras.events_counted

    # ------------------------------------------------------------------------------------------ journal

    def _capture(self, rows: torch.Tensor) -> None:
        """Copies the rows about to change that have no base copy yet (or one of a previous holder of the row)."""
        r = np.unique(rows.cpu().numpy())
        r = r[r != FALLBACK_ROW]
        if not len(r):
            return
        self._seed_unmoved(r)
        s = self._slots(r)
        gen = self.table.generation[r]
        stale = s >= 0
        stale[stale] = self.generation[s[stale]] != gen[stale]
        new = r[s < 0]
        self._reserve(self.used + len(new))
        self.slot[new] = np.arange(self.used, self.used + len(new))
        self.used += len(new)
        take = np.concatenate([new, r[stale]])
        where = self.slot[take]
        self.rows[where] = take
        self.generation[where] = self.table.generation[take]
        self.touched[self.slot[r]] = True
        idx, at = torch.from_numpy(take).to(self.table.device), torch.from_numpy(where).to(self.table.device)
        for name in _COLUMNS:
            self.base[name][at] = getattr(self.table, name)[idx]
        self.base_pop[where] = self.model.extras.pop_log[take]

    def _seed_unmoved(self, rows: Array) -> None:
        """Rows never moved (no step, update or event: new, or recycled for a new id) start from a vector drawn from
        their id (``seeded_vectors``), not from the table's order of admission. Two replicas that admit the same
        item in the same exchange period then start it alike: with each one's own random start they differed by
        that noise for good."""
        t = self.table
        idx = torch.from_numpy(rows).to(t.device)
        unmoved = ((t.steps[idx] == 0) & (t.updates[idx] == 0) & (t.events[idx] == 0)).cpu().numpy()
        if not unmoved.any():
            return
        r = rows[unmoved]
        vectors = seeded_vectors(self.model.items.ids(r), t.dim, t.init_std, self.model.config.seed)
        t.params[torch.from_numpy(r).to(t.device), : t.dim] = torch.from_numpy(vectors).to(t.device, t.params.dtype)

    def _slots(self, rows: Array) -> Array:
        """(N,) the slots of ``rows`` (N,); -1 for rows without a base copy."""
        if len(self.slot) < self.table.params.shape[0]:
            self.slot = np.concatenate([self.slot, np.full(self.table.params.shape[0] - len(self.slot), -1)])
        return self.slot[rows]

    def _reserve(self, n: int) -> None:
        if n <= len(self.rows):
            return
        cap = max(n, 2 * len(self.rows), 256)
        grow = cap - len(self.rows)
        self.rows = np.concatenate([self.rows, np.zeros(grow, np.int64)])
        self.generation = np.concatenate([self.generation, np.zeros(grow, np.int64)])
        self.base_pop = np.concatenate([self.base_pop, np.zeros(grow)])
        self.touched = np.concatenate([self.touched, np.zeros(grow, bool)])
        for name in _COLUMNS:
            t = getattr(self.table, name)
            old = self.base.get(name, t[:0])
            self.base[name] = torch.cat([old, torch.zeros((grow, *t.shape[1:]), dtype=t.dtype, device=t.device)])

    # ------------------------------------------------------------------------------------------ take

    def take(self, flush: bool = False) -> ItemDelta:
        """What this replica's own training changed on item rows since the last take; forgets the base copies of the
        rows sent and keeps those held back under the tolerance (module docstring). Only the rows about to change
        since the last take are looked at: one held back and not moved since stays as it was, so the cost is in the
        rows moved, not in the rows held. ``flush`` (or tolerance 0): every row held goes out too."""
        m, t = self.model, self.table
        tolerance = 0.0 if flush else self.tolerance
        look = self.touched[: self.used] | (tolerance <= 0)
        current = t.generation[self.rows[: self.used]] == self.generation[: self.used]  # not recycled since copied
        at = np.flatnonzero(look & current)
        rows = self.rows[at]
        idx, sl = torch.from_numpy(rows).to(t.device), torch.from_numpy(at).to(t.device)
        cols = {name: (getattr(t, name)[idx] - self.base[name][sl]).cpu().numpy() for name in _COLUMNS}
        old_pop, new_pop = self.base_pop[at], m.extras.pop_log[rows]
        pop = _log_added(old_pop, new_pop)
        moved = (np.abs(cols["params"]).sum(1) > 0) | (cols["events"] != 0) | np.isfinite(pop)
        origin_rows = self.base["updates"][sl].cpu().numpy() == 0  # admitted since the last take: never moved before
        origin = self.base["params"][sl].cpu().numpy()
        held = moved & _below_tolerance(tolerance, cols, pop, origin, origin_rows)
        still = np.flatnonzero(~look & current)  # held before, not moved since
        self._keep(np.concatenate([still, at[held]]))
        scalars, self._scalars = self._scalars, self._now()
        k = np.flatnonzero(moved & ~held)
        ids = m.items.ids(rows[k])  # looked up for the rows sent only: per id, in Python
        k, ids = k[[i != NO_ID for i in ids]], [i for i in ids if i != NO_ID]
        return ItemDelta(
            ids, cols["params"][k], cols["acc"][k], cols["moment"][k], cols["steps"][k],
            cols["updates"][k], cols["events"][k], pop[k], t.last_seen[rows[k]].copy(),
            np.flatnonzero(origin_rows[k]), origin[k][origin_rows[k]],
            m.rating_sum - scalars[0], m.rating_count - scalars[1], m.extras.events_counted - scalars[2],
            m.lifecycle.clock_ms)

    def _keep(self, slots: Array) -> None:
        """Empties the journal but for the base copies in ``slots``, which move to its front."""
        self.slot[self.rows[: self.used]] = -1
        n = len(slots)
        self.rows[:n], self.generation[:n], self.base_pop[:n] = self.rows[slots], self.generation[slots], \
            self.base_pop[slots]
        self.touched[: self.used] = False
        at = torch.from_numpy(slots).to(self.table.device)
        for name in _COLUMNS:
            self.base[name][:n] = self.base[name][at]
        self.slot[self.rows[:n]] = np.arange(n)
        self.used = n

    def state(self) -> dict[str, Any]:
        """The rows held back and their base copies (empty after a take at tolerance 0)."""
        n = self.used
        return {"rows": self.rows[:n].copy(), "generation": self.generation[:n].copy(),
                "base_pop": self.base_pop[:n].copy(),
                "base": {name: self.base[name][:n].cpu().numpy() for name in _COLUMNS}}

    def load_state(self, state: dict[str, Any]) -> None:
        """The journal ``state`` saw, over the model's restored table."""
        rows = np.asarray(state["rows"], np.int64)
        n = len(rows)
        self.slot[self.rows[: self.used]] = -1
        self._reserve(n)
        self._slots(rows)
        self.rows[:n], self.generation[:n] = rows, np.asarray(state["generation"], np.int64)
        self.base_pop[:n] = state["base_pop"]
        self.touched[: max(n, self.used)] = False
        for name in _COLUMNS:
            self.base[name][:n] = torch.from_numpy(np.asarray(state["base"][name])).to(self.table.device)
        self.slot[rows] = np.arange(n)
        self.used = n

    # ------------------------------------------------------------------------------------------ apply

    def apply(self, delta: ItemDelta, scale: float = 1.0) -> Array:
        """Adds another replica's ``delta``; ids not held are admitted (from the sender's origin where it sent one).
        ``scale`` multiplies the parameter changes (1: as sent). Returns the rows of the delta's ids (the fallback
        row for those the row cap left out)."""
        m, t = self.model, self.table
        if delta.dim != t.dim or delta.moment.shape[1] != t.moment.shape[1]:
            raise ValueError(f"item sync: delta of dim {delta.dim} (moments {delta.moment.shape[1]}) does not fit "
                             f"a table of dim {t.dim} (moments {t.moment.shape[1]})")
        rows, new = self._rows(delta.ids)
        own = rows != FALLBACK_ROW
        self._seed_unmoved(rows[own & new])
        fresh = np.zeros(len(rows), bool)
        fresh[delta.origin_index] = True
        start = own & new & fresh
        t.params[torch.from_numpy(rows[start]).to(t.device)] = torch.from_numpy(
            delta.origin[np.flatnonzero(start[delta.origin_index])]).to(t.device)
        add = {"params": delta.params * scale, "acc": delta.acc, "moment": delta.moment, "steps": delta.steps,
               "updates": delta.updates, "events": delta.events}
        r = rows[own]
        idx = torch.from_numpy(r).to(t.device)
        at = self._slots(r)
        based = at >= 0  # rows this replica moved too: their base moves with them, so the delta is not sent back
        sl = torch.from_numpy(at[based]).to(t.device)
        for name, value in add.items():
            v = torch.from_numpy(np.ascontiguousarray(value[own])).to(t.device, getattr(t, name).dtype)
            getattr(t, name).index_add_(0, idx, v)
            if len(sl):
                self.base[name].index_add_(0, sl, v[torch.from_numpy(based).to(t.device)])
        opt = m.config.optimizer
        if opt.rating_bias_prior:  # the Newton count: the sum of the replicas' counts, capped as one replica caps it
            t.acc[idx, 2] = t.acc[idx, 2].clamp(max=opt.rating_bias_window)
            if len(sl):
                self.base["acc"][sl, 2] = self.base["acc"][sl, 2].clamp(max=opt.rating_bias_window)
        m.extras.pop_log[r] = np.logaddexp(m.extras.pop_log[r], delta.pop[own])
        self.base_pop[at[based]] = np.logaddexp(self.base_pop[at[based]], delta.pop[own][based])
        seen = delta.last_seen[own]
        t.last_seen[r] = np.where(new[own], seen, np.maximum(t.last_seen[r], seen))
        t.last_used[r] = m.batches_seen
        self._apply_scalars(delta)
        m.ranking.admit(m.items.size, rows[own & new])
        m.ranking.update(r)
        return rows

    def _rows(self, ids: list[str]) -> tuple[Array, Array]:
        """Rows of ``ids``, admitting those not held (the fallback row where the row cap leaves no room); which
        were admitted now."""
        m = self.model
        known = m.items.lookup(ids)
        new = known == FALLBACK_ROW
        if new.any():
            known[new] = m.lifecycle.admit_items([ids[j] for j in np.flatnonzero(new)])
            m.grow()
        return known, new

    def _apply_scalars(self, delta: ItemDelta) -> None:
        m = self.model
        m.rating_sum += delta.rating_sum
        m.rating_count += delta.rating_count
        m.extras.events_counted += delta.events_counted
        m.lifecycle.clock_ms = max(m.lifecycle.clock_ms, delta.clock_ms)
        s = self._scalars
        self._scalars = (s[0] + delta.rating_sum, s[1] + delta.rating_count, s[2] + delta.events_counted)


def seeded_vectors(ids: list[str], dim: int, std: float, seed: int) -> Array:
    """(N, dim) float32: a normal vector of standard deviation ``std`` per id, a function of the id and ``seed``.
    Counter-based (SplitMix64 of the id's hash, the seed and the coordinate, then Box-Muller), so that the whole
    batch is drawn at once: a NumPy Generator per id cost more than the rest of applying a delta of new items.

    >>> a, b = seeded_vectors(["x", "y"], 4, 0.1, 0), seeded_vectors(["y"], 4, 0.1, 0)
    >>> bool(np.array_equal(a[1], b[0])), bool(np.array_equal(a[0], a[1]))
    (True, False)
    """
    keys = np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids),
                       np.uint64, len(ids))
    keys ^= _splitmix64(np.array([seed], np.uint64))
    counters = np.arange(1, 2 * dim + 1, dtype=np.uint64)  # two uniforms per coordinate
    bits = _splitmix64(keys[:, None] + counters[None, :] * np.uint64(0x9E3779B97F4A7C15))  # (N, 2 dim)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53  # in (0, 1)
    normal = np.sqrt(-2.0 * np.log(u[:, :dim])) * np.cos(2.0 * np.pi * u[:, dim:])
    out: Array = (normal * std).astype(np.float32)
    return out


def _splitmix64(x: Array) -> Array:
    """SplitMix64's output function, element-wise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        out: Array = z ^ (z >> np.uint64(31))
    return out


def _below_tolerance(tolerance: float, cols: dict[str, Array], pop: Array, base: Array, new: Array) -> Array:
    """(N,) rows moved only as sampled negatives (no event, no popularity, not new) whose parameters moved by at most
    ``tolerance`` times their norm at the base (none at tolerance 0)."""
    if tolerance <= 0:
        return np.zeros(len(new), bool)
    quiet: Array = (cols["events"] == 0) & ~np.isfinite(pop) & ~new
    change = np.linalg.norm(cols["params"], axis=1)
    small: Array = change <= tolerance * np.maximum(np.linalg.norm(base, axis=1), 1e-6)
    held: Array = quiet & small
    return held


def _log_added(old: Array, new: Array) -> Array:
    """``log(exp(new) - exp(old))`` per entry: what was added to a log-sum; -inf where nothing was."""
    out = np.full(len(new), -np.inf)
    grew = new > old
    with np.errstate(divide="ignore"):
        out[grew] = new[grew] + np.log(-np.expm1(old[grew] - new[grew]))
    return out
