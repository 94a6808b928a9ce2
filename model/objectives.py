"""The losses and their gradients, written out by hand for the row parameters ``[vector | rank bias | rating bias]``.

Each function takes gathered parameters and returns the mean loss and per-entry gradients (E, D + 2) for the
user rows and item rows involved; the caller scatters them into the tables. Scores for ranking are
``rank_bias_i + p_u . q_i``; rating predictions are ``mean + bias_u + bias_i + p_u . q_i``.

>>> p, q = torch.zeros(2, 3), torch.ones(2, 3)
>>> loss, gu, gi = rating_grads(3.0, torch.zeros(2), torch.zeros(2), p, q, torch.tensor([4.0, 2.0]))
>>> loss, gu[:, 4].tolist()
(1.0, [-1.0, 1.0])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pack(vec: torch.Tensor, rating_bias: torch.Tensor | None, rank_bias: torch.Tensor | None) -> torch.Tensor:
    out = vec.new_zeros(vec.shape[0], vec.shape[1] + 2)  # (E, D + 2)
    out[:, :-2] = vec
    if rank_bias is not None:
        out[:, -2] = rank_bias
    if rating_bias is not None:
        out[:, -1] = rating_bias
    return out


def rating_grads(
    mean: float, bu: torch.Tensor, bi: torch.Tensor, p: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
    w: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Squared error of biased MF; ``p``, ``q`` (R, D), biases and ratings (R,); ``w`` (R,) optional weights of
    each entry's gradient (of ``w * err^2 / 2``). The loss returned is the unweighted mean squared error."""
    err = mean + bu + bi + (p * q).sum(1) - r  # (R,)
    loss = float(err.pow(2).mean())
    if w is not None:
        err = err * w
    e = err.unsqueeze(1)
    return loss, _pack(e * q, err, None), _pack(e * p, err, None)


def bpr_grads(
    p: torch.Tensor, qi: torch.Tensor, ci: torch.Tensor, qj: torch.Tensor, cj: torch.Tensor, w: torch.Tensor,
) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """BPR of each event's positive ``i`` over its ``K`` negatives ``j``: ``p``, ``qi`` (M, D), ``ci`` (M,);
    ``qj`` (K, M, D), ``cj`` and ``w`` (K, M) weights (0 drops a pair). Returns the weighted mean loss and the
    gradients of the users (M, D + 2) and the positives (M, D + 2), summed over each event's pairs, and of the
    negatives (K * M, D + 2) in ``qj``'s order.
    """
    x = ci - cj + (p * (qi - qj)).sum(2)  # (K, M)
    loss = float((F.softplus(-x) * w).sum() / w.sum().clamp(min=1e-12))
    g = -torch.sigmoid(-x) * w  # (K, M) d loss / d x
    g_sum = g.sum(0)  # (M,)
    gu = qi * g_sum.unsqueeze(1) - torch.einsum("km,kmd->md", g, qj)  # (M, D)
    g_neg = -g.unsqueeze(2) * p  # (K, M, D)
    d = p.shape[1]
    return (loss, _pack(gu, None, None), _pack(p * g_sum.unsqueeze(1), None, g_sum),
            _pack(g_neg.reshape(-1, d), None, -g.reshape(-1)))


def sampled_softmax_grads(
    p: torch.Tensor, q_pos: torch.Tensor, c_pos: torch.Tensor, logq_pos: torch.Tensor,
    q_neg: torch.Tensor, c_neg: torch.Tensor, logq_neg: torch.Tensor, collide: torch.Tensor, w: torch.Tensor,
) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax of each event's positive against shared sampled negatives, logits corrected by ``- log Q``.

    ``p``, ``q_pos`` (N, D); ``c_pos``, ``logq_pos``, ``w`` (N,); ``q_neg`` (K, D); ``c_neg``, ``logq_neg`` (K,);
    ``collide`` (N, K) marks negatives that are the event's own item (left out). Returns the weighted mean loss
    and the gradients of the users (N, D + 2), the positives (N, D + 2) and the negatives (K, D + 2).
    """
    s_pos = (p * q_pos).sum(1) + c_pos - logq_pos  # (N,)
    s_neg = (p @ q_neg.T + (c_neg - logq_neg)).masked_fill(collide, float("-inf"))  # (N, K)
    logits = torch.cat([s_pos.unsqueeze(1), s_neg], 1)  # (N, 1 + K)
    lse = torch.logsumexp(logits, 1)  # (N,)
    loss = float(((lse - s_pos) * w).sum() / w.sum().clamp(min=1e-12))
    g = torch.softmax(logits, 1) * w.unsqueeze(1)  # (N, 1 + K) d loss / d logits
    g[:, 0] -= w
    g_pos, g_neg = g[:, :1], g[:, 1:]  # (N, 1), (N, K)
    grad_p = g_pos * q_pos + g_neg @ q_neg  # (N, D)
    grad_neg = g_neg.T @ p  # (K, D)
    return loss, _pack(grad_p, None, None), _pack(g_pos * p, None, g[:, 0]), _pack(grad_neg, None, g_neg.sum(0))
