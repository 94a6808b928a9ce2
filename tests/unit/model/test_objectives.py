"""The objectives' hand-written gradients against autograd."""
from __future__ import annotations
import torch
from model.objectives import bpr_grads, sampled_softmax_grads


def test_sampled_softmax_gradients_match_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    n, k, d = 5, 7, 3
    p, qp, qn = (torch.randn(s, d, generator=g, requires_grad=True) for s in (n, n, k))
    cp, cn = torch.randn(n, generator=g, requires_grad=True), torch.randn(k, generator=g, requires_grad=True)
    lp, ln = torch.rand(n, generator=g).log(), torch.rand(k, generator=g).log()
    collide = torch.rand(n, k, generator=g) < 0.2
    w = torch.rand(n, generator=g)
    s_pos = (p * qp).sum(1) + cp - lp
    s_neg = (p @ qn.T + cn - ln).masked_fill(collide, float("-inf"))
    loss = ((torch.logsumexp(torch.cat([s_pos[:, None], s_neg], 1), 1) - s_pos) * w).sum()
    loss.backward()
    _, gu, gpos, gneg = sampled_softmax_grads(p.detach(), qp.detach(), cp.detach(), lp, qn.detach(), cn.detach(),
                                              ln, collide, w)
    assert p.grad is not None and qp.grad is not None and qn.grad is not None
    assert torch.allclose(gu[:, :d], p.grad, atol=1e-5) and torch.allclose(gpos[:, :d], qp.grad, atol=1e-5)
    assert torch.allclose(gpos[:, d], cp.grad, atol=1e-5)  # type: ignore[arg-type]
    assert torch.allclose(gneg[:, :d], qn.grad, atol=1e-5) and torch.allclose(gneg[:, d], cn.grad, atol=1e-5)  # type: ignore[arg-type]


def test_bpr_gradients_match_autograd() -> None:
    g = torch.Generator().manual_seed(1)
    k, m, d = 3, 4, 5  # negatives per event, events, dimension
    p, qi = (torch.randn(m, d, generator=g, requires_grad=True) for _ in range(2))
    qj = torch.randn(k, m, d, generator=g, requires_grad=True)
    ci = torch.randn(m, generator=g, requires_grad=True)
    cj = torch.randn(k, m, generator=g, requires_grad=True)
    w = torch.rand(k, m, generator=g)
    (torch.nn.functional.softplus(-(ci - cj + (p * (qi - qj)).sum(2))) * w).sum().backward()
    _, gu, gi, gj = bpr_grads(p.detach(), qi.detach(), ci.detach(), qj.detach(), cj.detach(), w)
    assert torch.allclose(gu[:, :d], p.grad, atol=1e-6) and torch.allclose(gi[:, :d], qi.grad, atol=1e-6)  # type: ignore[arg-type]
    assert torch.allclose(gi[:, d], ci.grad, atol=1e-6)  # type: ignore[arg-type]
    assert torch.allclose(gj[:, :d], qj.grad.reshape(-1, d), atol=1e-6)  # type: ignore[union-attr]
    assert torch.allclose(gj[:, d], cj.grad.reshape(-1), atol=1e-6)  # type: ignore[union-attr]


def test_rating_gradients_with_entry_weights_match_autograd() -> None:
    from model.objectives import rating_grads

    g = torch.Generator().manual_seed(2)
    p, q = (torch.randn(5, 3, generator=g, requires_grad=True) for _ in range(2))
    bu, bi = (torch.randn(5, generator=g, requires_grad=True) for _ in range(2))
    r, w = torch.rand(5, generator=g) * 4 + 1, torch.rand(5, generator=g)
    (w * (3.5 + bu + bi + (p * q).sum(1) - r).pow(2) / 2).sum().backward()
    loss, gu, gi = rating_grads(3.5, bu.detach(), bi.detach(), p.detach(), q.detach(), r, w)
    assert torch.allclose(gu[:, :3], p.grad) and torch.allclose(gi[:, :3], q.grad)  # type: ignore[arg-type]
    assert torch.allclose(gu[:, 4], bu.grad) and torch.allclose(gi[:, 4], bi.grad)  # type: ignore[arg-type]
    unweighted = rating_grads(3.5, bu.detach(), bi.detach(), p.detach(), q.detach(), r)
    assert loss == unweighted[0]  # the loss reported is the plain mean squared error

